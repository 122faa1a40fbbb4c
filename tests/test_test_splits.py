"""Held-out splits of the chat stages: ``val_sources`` / ``test_sources`` on the SFT, preference and prompt data
modules, each stage's ``test_step`` against an independent computation, and ``minillm test`` end to end (the
metrics table and the ``<checkpoint stem>.test.json`` report) for SFT, reward, DPO and PPO."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SAMPLE, micro_trainer

from minillm_lightning.callbacks.test_report import TestReport, report_path
from minillm_lightning.cli import main as cli_main
from minillm_lightning.data.preference import PreferenceDataModule
from minillm_lightning.data.prompts import PromptDataModule
from minillm_lightning.data.sft import SFTDataModule
from minillm_lightning.errors import DataError
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.rewards import load_reward_function
from minillm_lightning.stages.dpo import DPOModule
from minillm_lightning.stages.ppo import PPOModule
from minillm_lightning.stages.reward import RewardModel, RewardModule
from minillm_lightning.stages.sft import SFTModule

EQUALS = {"class_path": "minillm_lightning.rewards.ContainsReward", "init_args": {"target": "equals"}}
MODULES = {"sft": SFTDataModule, "preference": PreferenceDataModule, "prompts": PromptDataModule}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Disjoint train / val / test files cut from each shipped sample (train 96, val 8, test 12 records)."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for name in MODULES:
        lines = (SAMPLE / f"{name}.jsonl").read_text().splitlines()
        parts = {"train": lines[:96], "val": lines[96:104], "test": lines[104:116]}
        out[name] = {split: write_lines(root / f"{name}_{split}.jsonl", part) for split, part in parts.items()}
    return out


def make_dm(name: str, ckpt: Path, sources: Path, **kw):
    args = dict(tokenizer=str(ckpt), max_length=128 if name != "prompts" else 64, batch_size=4)
    return MODULES[name]([str(sources)], **{**args, **kw})


# ---- data: explicit validation and test files ----
@pytest.mark.parametrize("name", list(MODULES))
def test_val_sources_replace_the_share_and_test_sources_load_in_file_order(tiny_pretrain_ckpt, splits, name):
    files = splits[name]
    dm = make_dm(name, tiny_pretrain_ckpt, files["train"], val_sources=[str(files["val"])])
    dm.setup("fit")
    assert len(dm.train_set) == 96 and len(dm.val_set) == 8  # all of train trains; val_share is ignored
    assert list(dm.stats["val_sources"]) == [str(files["val"])]
    assert dm.test_set is None  # fit does not read the test files
    with pytest.raises(DataError, match="test_sources"):
        dm.setup("test")

    dm = make_dm(name, tiny_pretrain_ckpt, files["train"], test_sources=[str(files["test"])])
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 12  # test reads only the test files
    assert dm.test_summary() == {"test_files": [str(files["test"])], "examples": 12, "rows": 12}
    # file order, and each row is what the module's own encoding of that record gives
    test_items, _ = dm.load([str(files["test"])])
    encoded = dm.encode_items(test_items, [0], dm.new_counts(), "test")
    expected = dm.make_dataset(encoded)[0] if name == "sft" else encoded[0]
    first = next(iter(dm.test_dataloader()))
    if name == "sft":
        assert first["input_ids"][0, : len(expected["input_ids"])].tolist() == expected["input_ids"].tolist()
    elif name == "preference":
        assert dm.test_set.rows[0] == expected and first["index"].tolist() == [0, 1, 2, 3]
    else:
        assert first["prompt_ids"][0] == expected.ids and first["index"].tolist() == [0, 1, 2, 3]


def test_default_split_is_unchanged_without_the_new_arguments(tiny_pretrain_ckpt):
    """No val_sources: the shuffled val_share split as before (sft_tiny's 1140 / 60 conversations)."""
    dm = SFTDataModule([str(SAMPLE / "sft.jsonl")], tokenizer=str(tiny_pretrain_ckpt), max_length=128)
    dm.setup("fit")
    assert (dm.stats["train_conversations"], dm.stats["val_conversations"]) == (1140, 60)
    assert "val_sources" not in dm.stats and dm.test_set is None


# ---- each stage's test metrics against an independent computation ----
def run_test(module: L.LightningModule, dm, root: Path) -> dict[str, float]:
    report = TestReport()
    trainer = micro_trainer(root, callbacks=[report], limit_test_batches=1.0)
    trainer.test(module, datamodule=dm, verbose=False)
    written = json.loads(report.written.read_text())
    assert written["examples"] == dm.test_summary()["examples"] and written["checkpoint"] is None
    assert written["batches_scored"] == sum(trainer.num_test_batches) and "partial" not in written
    return written["metrics"]


def test_report_says_when_limit_test_batches_scored_part_of_the_test_set(tmp_path, tiny_pretrain_ckpt, splits):
    """test.json said 1000 examples while --trainer.limit_test_batches 3 had scored 24 of them."""
    dm = make_dm("sft", tiny_pretrain_ckpt, splits["sft"]["train"], test_sources=[str(splits["sft"]["test"])])
    module = SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)
    report = TestReport()
    micro_trainer(tmp_path, callbacks=[report], limit_test_batches=1).test(module, datamodule=dm, verbose=False)
    written = json.loads(report.written.read_text())
    assert written["batches_scored"] == 1 and written["examples"] == dm.test_summary()["examples"] > 1
    assert written["partial"].startswith("limit_test_batches=1: the metrics come from 1 of ")


@torch.no_grad()
def assistant_logprob(model, tok, messages: list[dict], start: int = 1) -> tuple[float, int]:
    """(sum of log p of the tokens the template marks as the assistant's from position ``start`` on, their
    number): the conversation run alone, unpadded and unpacked."""
    ids, mask = tok.encode_chat(messages)
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    picked = [logp[t - 1, ids[t]] for t in range(max(start, 1), len(ids)) if mask[t]]
    return float(sum(picked)), len(picked)


def test_sft_test_loss_is_the_token_weighted_reply_nll(tmp_path, tiny_pretrain_ckpt, splits):
    """test/loss over packed rows == NLL of the reply tokens of each conversation run alone, token-weighted."""
    dm = make_dm("sft", tiny_pretrain_ckpt, splits["sft"]["train"], test_sources=[str(splits["sft"]["test"])])
    dm.packing = True
    module = SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)
    metrics = run_test(module, dm, tmp_path)
    assert len(dm.test_set) < 12  # the test conversations really were packed
    total, count = 0.0, 0
    for messages in dm.read([str(splits["sft"]["test"])])[0]:  # every assistant turn of a conversation counts
        lp, n = assistant_logprob(module.model.eval(), dm.tokenizer, messages)
        total, count = total - lp, count + n
    assert metrics["test/loss"] == pytest.approx(total / count, rel=1e-4)
    assert metrics["test/ppl"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-4)


def test_reward_test_accuracy_and_margin(tmp_path, tiny_pretrain_ckpt, splits):
    files = splits["preference"]
    dm = make_dm("preference", tiny_pretrain_ckpt, files["train"], test_sources=[str(files["test"])])
    L.seed_everything(3)
    module = RewardModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)  # a random head
    metrics = run_test(module, dm, tmp_path)
    scorer = RewardModel(module.model, module.head, dm.tokenizer).eval()
    pairs = dm.read([str(files["test"])])[0]
    chosen = scorer.score([[*p.prompt, p.chosen] for p in pairs])
    rejected = scorer.score([[*p.prompt, p.rejected] for p in pairs])
    assert 0 < metrics["test/accuracy"] < 1  # a random head ranks some pairs right, some wrong
    assert metrics["test/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert metrics["test/margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)


def test_dpo_test_metrics_at_the_reference(tmp_path, tiny_pretrain_ckpt, splits):
    """Policy == reference: every implicit reward is 0 (accuracy 0, margins 0); the log-probs are the replies'."""
    files = splits["preference"]
    dm = make_dm("preference", tiny_pretrain_ckpt, files["train"], test_sources=[str(files["test"])])
    module = DPOModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)
    metrics = run_test(module, dm, tmp_path)
    assert metrics["test/rewards/accuracies"] == 0.0 and metrics["test/rewards/margins"] == 0.0
    pairs = dm.read([str(files["test"])])[0]
    model = module.model.eval()
    tok = dm.tokenizer
    for side in ("chosen", "rejected"):
        replies = [  # the final reply only: its tokens start after the prompt and the assistant header
            assistant_logprob(model, tok, [*p.prompt, getattr(p, side)], len(tok.encode_chat(p.prompt, True)[0]))[0]
            for p in pairs
        ]
        expected = sum(replies) / len(pairs)
        assert metrics[f"test/logps/{side}"] == pytest.approx(expected, rel=1e-4)


def test_dpo_test_after_a_precomputed_reference_rebuilds_it(tmp_path, tiny_pretrain_ckpt, splits):
    """fit with precompute_ref_logps frees the reference; a test in the same process rebuilds it from init_from."""
    files = splits["preference"]
    dm = make_dm("preference", tiny_pretrain_ckpt, files["train"], test_sources=[str(files["test"])])
    module = DPOModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, precompute_ref_logps=True)
    trainer = micro_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert module.ref_model is None
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert module.ref_model is not None and 0 <= metrics["test/rewards/accuracies"] <= 1
    reference = DPOModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size).model.state_dict()
    for key, value in module.ref_model.state_dict().items():
        assert torch.equal(value.cpu(), reference[key]), key


@torch.no_grad()
def test_ppo_test_reward_and_kl(tmp_path, tiny_pretrain_ckpt, splits):
    """test/reward_mean == the reward of the greedy replies; test/kl == the exact token KL summed over each reply,
    computed here one unpadded sequence at a time (0 at the reference, > 0 once the policy moves)."""
    files = splits["prompts"]
    dm = make_dm("prompts", tiny_pretrain_ckpt, files["train"], test_sources=[str(files["test"])])
    module = PPOModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, reward_fn=EQUALS, max_new_tokens=12)
    assert run_test(module, dm, tmp_path / "a")["test/kl"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    for p in module.model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    metrics = run_test(module, dm, tmp_path / "b")

    tok, rows = dm.tokenizer, dm.test_set.rows
    prompt_ids = [r.ids for r in rows]
    assert len({len(p) for p in prompt_ids}) > 1  # batches are left-padded
    replies = TextGenerator(module.model, tok).generate(prompt_ids, GenerationConfig(max_new_tokens=12, temperature=0))
    texts = [tok.decode([t for t in r if t not in (tok.im_end_id, tok.eos_id)]) for r in replies]
    rewards = load_reward_function(EQUALS)([r.text for r in rows], texts)
    assert metrics["test/reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    kls = []
    for p, r in zip(prompt_ids, replies):
        ids = torch.tensor([p + r])
        at = slice(len(p) - 1, len(p) - 1 + len(r))
        policy = torch.log_softmax(module.model(ids).logits[0, at].float(), -1)
        reference = torch.log_softmax(module.ref_policy(ids).logits[0, at].float(), -1)
        kls.append(float((policy.exp() * (policy - reference)).sum()))
    assert min(kls) >= 0 and metrics["test/kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-3)
    assert metrics["test/kl"] > 1e-3


# ---- `minillm test` end to end ----
STAGES = {
    # stage: (config, data file, overrides, metrics the report must hold)
    "sft": ("sft_tiny", "sft", [], ["test/loss", "test/ppl"]),
    "reward": ("reward_tiny", "preference", [], ["test/accuracy", "test/margin"]),
    "dpo": (
        "dpo_tiny",
        "preference",
        [],
        ["test/rewards/accuracies", "test/rewards/margins", "test/logps/chosen", "test/logps/rejected"],
    ),
    "ppo": (
        "ppo_tiny",
        "prompts",
        ["--model.init_args.reward_model", "null", "--model.init_args.reward_fn", json.dumps(EQUALS)]
        + ["--model.init_args.max_new_tokens", "16", "--trainer.max_steps", "4"],
        ["test/reward_mean", "test/kl", "test/eval_reward_mean"],
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_minillm_test_prints_and_writes_the_report(tmp_path, monkeypatch, capsys, tiny_pretrain_ckpt, splits, stage):
    """Fit the shipped tiny config for a couple of steps, then `minillm test --ckpt_path last.ckpt` on held-out
    files: Lightning's table on stdout, last.test.json beside the checkpoint."""
    config, data, extra, names = STAGES[stage]
    (tmp_path / "data").mkdir()
    os.symlink(ROOT / "configs", tmp_path / "configs")
    os.symlink(SAMPLE, tmp_path / "data" / "sample")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minillm"])  # the CLI runs in-process: pytest's own arguments are not its
    ckpt = str(tiny_pretrain_ckpt)
    common = ["--config", f"configs/{config}.yaml", "--model.init_args.init_from", ckpt]
    common += ["--data.init_args.tokenizer", ckpt, "--data.init_args.max_length", "64" if data == "prompts" else "128"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    quick = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
    cli_main(["fit", *common, *quick, *extra])
    last = Path("checkpoints") / config / "last.ckpt"
    assert last.is_file()
    capsys.readouterr()

    test_file = str(splits[data]["test"])
    with pytest.raises(SystemExit) as exit_info:  # no test files: one clear line, exit code 2
        cli_main(["test", *common, *extra, "--ckpt_path", str(last)])
    assert exit_info.value.code == 2 and "test_sources" in capsys.readouterr().err

    held_out = ["--data.init_args.test_sources", json.dumps([test_file])]
    cli_main(["test", *common, *extra, "--ckpt_path", str(last), *held_out])
    printed = capsys.readouterr().out
    report = json.loads(report_path(last, ".").read_text())
    assert report_path(last, ".") == last.with_name("last.test.json")
    assert report["checkpoint"] == str(last) and report["stage"] == stage
    assert report["test_files"] == [test_file] and report["examples"] == 12
    for name in names:
        assert name in report["metrics"] and name in printed, name
        assert report["metrics"][name] == report["metrics"][name]  # not NaN
