"""What every stage shares: the optimizer settings (OptimConfig) reach every stage through the CLI, flat, with each
stage's own defaults; one checkpoint-loading function for the backbone."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from conftest import ROOT, SAMPLE

from minillm_lightning.checkpoint import load_backbone, load_backbone_weights, load_checkpoint
from minillm_lightning.cli import main as cli_main
from minillm_lightning.errors import CheckpointError
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.stages.base import OptimConfig
from minillm_lightning.stages.dpo import DPOModule
from minillm_lightning.stages.ppo import PPOModule
from minillm_lightning.stages.reward import RewardModule
from minillm_lightning.stages.sft import SFTModule

EQUALS = {"class_path": "minillm_lightning.rewards.ContainsReward", "init_args": {"target": "equals"}}
# stage -> (learning_rate, weight_decay, warmup, min_lr_ratio) defaults it declares; the rest come from OptimConfig
STAGE_DEFAULTS = {
    SFTModule: (5e-5, 0.0, 0.03, 0.1),
    RewardModule: (1e-5, 0.0, 0.03, 0.1),
    DPOModule: (1e-6, 0.0, 0.1, 0.1),
}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_muon_on_every_stage_through_the_cli(tmp_path, monkeypatch, tiny_pretrain_ckpt, stage):
    """``minillm fit --config configs/<stage>_tiny.yaml --model.init_args.optimizer muon --trainer.max_steps 2``
    trains with Muon (it was refused for every stage but pretraining: "Expected a <class 'NoneType'>")."""
    (tmp_path / "data").mkdir()
    os.symlink(ROOT / "configs", tmp_path / "configs")
    os.symlink(SAMPLE, tmp_path / "data" / "sample")
    monkeypatch.chdir(tmp_path)
    ckpt = str(tiny_pretrain_ckpt)
    argv = ["fit", "--config", f"configs/{stage}_tiny.yaml", "--model.init_args.optimizer", "muon"]
    argv += ["--model.init_args.muon_learning_rate", "0.01", "--trainer.max_steps", "2"]
    argv += ["--model.init_args.init_from", ckpt, "--data.init_args.tokenizer", ckpt]
    argv += ["--data.init_args.max_length", "64" if stage == "ppo" else "128"]  # the micro model's block_size: 128
    if stage == "ppo":  # one rollout of 4 prompts, 1 update; a programmatic reward (no reward checkpoint here)
        argv += ["--model.init_args.reward_model", "null", "--model.init_args.reward_fn", json.dumps(EQUALS)]
        argv += ["--model.init_args.max_new_tokens", "8", "--model.init_args.ppo_epochs", "1"]
        argv += ["--model.init_args.num_mini_batches", "2", "--data.init_args.batch_size", "4"]
    argv += ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    argv += ["--trainer.enable_model_summary", "false"]
    cli_main(argv)
    saved = load_checkpoint(tmp_path / "checkpoints" / f"{stage}_tiny" / "last.ckpt")
    assert saved["minillm"]["stage"] == stage and saved["global_step"] == 2
    hp = saved["hyper_parameters"]
    assert hp["optimizer"] == "muon" and hp["muon_learning_rate"] == 0.01
    groups = saved["optimizer_states"][0]["param_groups"]
    muon = [g for g in groups if g["use_muon"]]
    assert muon and all(g["initial_lr"] == 0.01 for g in muon)  # the blocks' matrices are on Muon at its rate
    assert any(not g["use_muon"] and g["initial_lr"] == hp["learning_rate"] for g in groups)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_print_config_lists_every_optimizer_setting(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / f"{stage}_tiny.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in OptimConfig.__dataclass_fields__:
        assert f"    {name}:" in out, name


@pytest.mark.parametrize("cls", list(STAGE_DEFAULTS))
def test_stages_only_change_their_optimizer_defaults(cls):
    """Each stage's own defaults, the shared rest from OptimConfig, all recorded in hparams (read back on resume)."""
    module = cls(vocab_size=64)
    lr, wd, warmup, min_lr = STAGE_DEFAULTS[cls]
    expected = OptimConfig(learning_rate=lr, weight_decay=wd, warmup=warmup, min_lr_ratio=min_lr)
    assert module.optim == expected
    assert {k: module.hparams[k] for k in OptimConfig.__dataclass_fields__} == expected.__dict__
    assert cls(vocab_size=64, optimizer="muon", betas=[0.8, 0.9]).optim.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        cls(vocab_size=64, learning_rate=0)


def test_arch_overridden_by_init_from_is_named_in_one_warning(tiny_pretrain_ckpt):
    """``--model.init_args.arch.n_layer 6`` with init_from trained the checkpoint's architecture silently; now one
    warning names the ignored fields, and an ``arch`` left at its defaults (or matching the checkpoint) says nothing."""
    ckpt = str(tiny_pretrain_ckpt)  # MICRO_ARCH: 2 layers x 64 wide
    expected = (
        rf"^arch\.n_layer=6 ignored: the architecture comes from init_from {re.escape(ckpt)} "
        r"\(n_layer=2\); drop --model\.init_args\.arch or init_from$"
    )
    with pytest.warns(UserWarning, match=expected) as record:
        module = SFTModule(init_from=ckpt, arch=MiniGPTConfig(n_layer=6, dropout=0.1))
    assert module.arch.n_layer == 2 and sum("ignored" in str(w.message) for w in record) == 1
    # dropout shapes no weight: it applies on top of the checkpoint's architecture (fine-tuning with dropout)
    assert module.arch.dropout == 0.1 and module.model.layers[0].drop.p == 0.1
    assert SFTModule(init_from=ckpt).arch.dropout == 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the architecture comes from init_from")
        SFTModule(init_from=ckpt)
        SFTModule(init_from=ckpt, arch=MiniGPTConfig())  # what the CLI passes for an untouched arch
        SFTModule(init_from=ckpt, arch={"n_layer": 2, "dim": 64, "gradient_checkpointing": True})


def test_a_reward_model_as_policy_init_from_warns(tmp_path, tiny_pretrain_ckpt):
    """PPO started from a reward checkpoint trained a broken policy without a word; now a warning says what
    init_from should be. Continuing a reward model from one stays quiet."""
    from minillm_lightning.checkpoint import META_KEY

    ckpt = torch.load(tiny_pretrain_ckpt, weights_only=False)
    ckpt[META_KEY] = {**ckpt[META_KEY], "stage": "reward"}
    reward = tmp_path / "reward.ckpt"
    torch.save(ckpt, reward)
    expected = rf"^init_from={re.escape(str(reward))} is a reward model: .* ppo normally starts from the SFT checkpoint"
    with pytest.warns(UserWarning, match=expected):
        PPOModule(init_from=str(reward), reward_fn=EQUALS)
    with pytest.warns(UserWarning, match="dpo normally starts from the SFT model"):
        DPOModule(init_from=str(reward))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is a reward model")
        RewardModule(init_from=str(reward))
        SFTModule(init_from=str(tiny_pretrain_ckpt))


def test_ppo_optimizer_defaults(tiny_pretrain_ckpt):
    module = PPOModule(init_from=str(tiny_pretrain_ckpt), reward_fn=EQUALS)
    assert module.optim == OptimConfig(learning_rate=1e-5, weight_decay=0.0, warmup=0.05, min_lr_ratio=1.0)


def test_one_backbone_loader(tmp_path, tiny_pretrain_ckpt):
    """load_backbone_weights fills a MiniGPT from a stage checkpoint (tied head absent is fine) and refuses a
    checkpoint of another architecture in one line naming the source."""
    model, ckpt = load_backbone(tiny_pretrain_ckpt)
    fresh = MiniGPT(model.config)
    load_backbone_weights(fresh, ckpt["state_dict"], "test")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    other = MiniGPT(MiniGPTConfig.from_dict({**model.config.to_dict(), "n_layer": model.config.n_layer + 1}))
    with pytest.raises(CheckpointError, match=r"^init_from=x: backbone weights do not match"):
        load_backbone_weights(other, ckpt["state_dict"], "init_from=x")
