"""Tests of the RL stage: the pure losses against hand-computed values, GRPO group normalisation, the shipped reward
functions, the prompt data module, rollout consistency with the KV-cache sampler, learning runs (PPO and GRPO) on a
programmatic reward, frozen models out of the optimizer and the checkpoints, exact resume, manual-optimization
guards and the shipped configs through the real command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SAMPLE, micro_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from minillm_lightning.checkpoint import load_backbone, load_checkpoint
from minillm_lightning.cli import main as cli_main
from minillm_lightning.data.preference import PreferenceDataModule
from minillm_lightning.data.prompts import PromptDataModule, collate_prompts
from minillm_lightning.errors import CheckpointError, DataError, MiniLLMError
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.losses import (
    AdaptiveKLController,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    value_loss,
    whiten,
)
from minillm_lightning.rewards import ArithmeticReward, ContainsReward, load_reward_function
from minillm_lightning.stages.base import use_fused_adamw
from minillm_lightning.stages.ppo import PPOModule
from minillm_lightning.stages.reward import RewardModule, load_reward_model
from minillm_lightning.stages.rollout import distinct_n, render_for_scoring, repeated_ngram_rate

SFT_CMD = "minillm fit --config configs/sft_tiny.yaml"
EQUALS = {"class_path": "minillm_lightning.rewards.ContainsReward", "init_args": {"target": "equals"}}


# ---- pure functions, expected values derived by hand ----
def test_gae_by_hand():
    """gamma = 0.9, lam = 0.5 (so gamma * lam = 0.45); V beyond the last real token is 0.

    Row 1, rewards [0, 0, 1], values [0.5, 0.6, 0.7], three real tokens:
        t=2: delta = 1 + 0.9*0   - 0.7 = 0.3      A2 = 0.3
        t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03     A1 = 0.03 + 0.45*0.3   = 0.165
        t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04     A0 = 0.04 + 0.45*0.165 = 0.11425
        returns = A + V = [0.61425, 0.765, 1.0]
    Row 2, rewards [0.2, -1, 9], values [1, 2, 5], the last position is padding (its 9 and 5 must not leak):
        t=2: padding                              A2 = 0
        t=1: delta = -1  + 0.9*0 - 2 = -3         A1 = -3
        t=0: delta = 0.2 + 0.9*2 - 1 = 1.0        A0 = 1.0 + 0.45*(-3) = -0.35
        returns = [0.65, -1.0, 0]
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, -1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3], [-0.35, -3.0, 0.0]]))
    assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0], [0.65, -1.0, 0.0]]))
    # gamma = lam = 1: every advantage is the sum of the rewards to go minus the value
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]]))


def test_clipped_policy_loss_by_hand():
    """clip = 0.2; per token (ratio, A) -> max(-A*ratio, -A*clamp(ratio, 0.8, 1.2)):
        (1.5, +1): max(-1.5, -1.2) = -1.2   clipped (no credit beyond 1.2)
        (0.5, -1): max( 0.5,  0.8) =  0.8   clipped (no credit below 0.8)
        (1.1, +2): max(-2.2, -2.2) = -2.2   inside the range
        (0.5, +1): max(-0.5, -0.8) = -0.5   moved the wrong way: the unclipped (worse) term counts
    loss = (-1.2 + 0.8 - 2.2 - 0.5) / 4 = -0.775, clipfrac = 2/4; a fifth, masked token is ignored.
    approx KL = 0.5 * mean(log(ratio)^2) = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.480453) / 4 = 0.141799.
    """
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 50.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.full_like(ratio, -2.0)
    loss, clipfrac, approx_kl = policy_loss(old + ratio.log(), old, adv, mask, clip=0.2)
    assert_close(loss, torch.tensor(-0.775))
    assert_close(clipfrac, torch.tensor(0.5))
    assert_close(approx_kl, torch.tensor(0.141799), atol=1e-6, rtol=1e-5)


def test_clipped_value_loss_by_hand():
    """clip = 0.2, V_clipped = old + clamp(V - old, -0.2, 0.2), per token 0.5 * max((V-R)^2, (V_clipped-R)^2):
        V=1.0, old=0.5, R=1.2: (1-1.2)^2 = 0.04, V_clipped = 0.7: (0.7-1.2)^2 = 0.25 -> 0.25 clipped
        V=0.6, old=0.5, R=0.0: 0.36, V_clipped = 0.6: 0.36                          -> 0.36
        V=0.0, old=0.5, R=0.0: 0,    V_clipped = 0.3: 0.09                          -> 0.09 clipped
    loss = 0.5 * (0.25 + 0.36 + 0.09) / 3 = 0.116667, clipfrac = 2/3; unclipped: 0.5 * 0.4 / 3.
    """
    v, old, ret = torch.tensor([[1.0, 0.6, 0.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[1.2, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = value_loss(v, old, ret, mask, clip=0.2)
    assert_close(loss, torch.tensor(0.7 / 6))
    assert_close(clipfrac, torch.tensor(2 / 3))
    assert_close(value_loss(v, old, ret, mask, clip=None)[0], torch.tensor(0.4 / 6))


def test_grpo_group_normalisation_by_hand():
    """Groups of 4 (std with Bessel's correction):
        [1, 0, 0, 1]: mean 0.5, std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
        [2, 2, 2, 2]: std 0 -> all 0 (nothing to learn from identical answers)
        [0, 0, 0, 3]: mean 0.75, var (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5 -> [-0.5, -0.5, -0.5, 1.5]
    Without scaling (Dr. GRPO) only the mean is subtracted.
    """
    scores = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3])
    a = 0.866025
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5])
    assert_close(grpo_advantages(scores, 4), expected, atol=1e-5, rtol=1e-5)
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])
    assert_close(grpo_advantages(scores, 4, scale=False), centred)
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(scores, 1)
    with pytest.raises(ValueError, match="whole number of groups"):
        grpo_advantages(scores, 5)


def test_kl_estimators_whiten_and_controller_by_hand():
    """pi = 0.5, pi_ref = 0.25 at the sampled token: log r = log(pi_ref / pi) = -0.693147
        k1 = -log r = 0.693147;  k2 = 0.5 (log r)^2 = 0.240227;  k3 = (r - 1) - log r = -0.5 + 0.693147 = 0.193147
    Controller (init 0.1, target 6, horizon 100), 10 samples per update:
        KL 9:   error = clip(9/6 - 1, +-0.2) = 0.2  -> 0.1   * (1 + 0.2 * 10/100) = 0.102
        KL 5.4: error = -0.1                       -> 0.102 * (1 - 0.1 * 10/100) = 0.10098
    whiten([1, 2, 3] + a masked 100): mean 2, unbiased var 1 -> [-1, 0, 1, 0].
    """
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.693147]))
    assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.240227]))
    assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([0.193147]))
    assert (kl_penalty(ref, lp, "k3") >= 0).all() and kl_penalty(lp, lp, "k1").item() == 0
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(9.0, 10) == pytest.approx(0.102)
    assert ctl.update(5.4, 10) == pytest.approx(0.10098)
    assert AdaptiveKLController(0.1).update(100.0, 10) == 0.1  # no target: fixed
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert_close(whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(explained_variance(x, x, m), torch.tensor(1.0))


def test_degeneration_metrics():
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3]], n=3) == pytest.approx(1 / 4)  # (1,2,3) seen twice in 4 grams
    assert repeated_ngram_rate([[7, 7, 7, 7, 7]], n=3) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], n=2) == pytest.approx(3 / 4)


# ---- reward functions ----
def test_shipped_reward_functions():
    contains = ContainsReward("moo")
    assert contains(["?", "?"], ["A cow says moo.", "A cow says baa."]) == [1.0, 0.0]
    arith = ArithmeticReward()
    prompts = ["What is 6 plus 5?"] * 4 + ["7加7等于几？"] * 3 + ["What sound does a cow make?"]
    responses = [
        "6 plus 5 equals 11.",  # correct statement
        "5 plus 6 equals 11.",  # operands swapped: still correct
        "It is 11.",  # right number without the statement: partial credit
        "6 plus 5 equals 12.",  # wrong
        "7加7等于14。",
        "8加6等于14。",  # the right sum of the wrong operands earns nothing
        "7加7等于15。",
        "A cow says moo.",  # not an addition question
    ]
    assert arith(prompts, responses) == [1.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0]
    fn = load_reward_function({"class_path": "minillm_lightning.rewards.ContainsReward", "init_args": {"target": "x"}})
    assert isinstance(fn, ContainsReward) and fn.target == "x"
    assert isinstance(load_reward_function("minillm_lightning.rewards.ArithmeticReward"), ArithmeticReward)
    with pytest.raises(MiniLLMError, match="cannot be imported"):
        load_reward_function("minillm_lightning.rewards.NoSuchReward")
    with pytest.raises(MiniLLMError, match="bad init_args"):
        load_reward_function({"class_path": "minillm_lightning.rewards.ContainsReward", "init_args": {"nope": 1}})


# ---- prompt data ----
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def prompt_dm(tokenizer, sources, **kw) -> PromptDataModule:
    args = dict(tokenizer=str(tokenizer), batch_size=2, val_share=0.0, max_length=64)
    return PromptDataModule([str(s) for s in sources], **{**args, **kw})


def test_prompt_schemas_render_up_to_the_assistant_header(tmp_path, tiny_pretrain_ckpt):
    user = {"role": "user", "content": "What is 2 plus 2?"}
    records = [
        {"prompt": "What is 2 plus 2?"},
        {"messages": [user]},
        {"conversations": [{"from": "human", "value": "What is 2 plus 2?"}]},
        {"instruction": "What is 2 plus 2?", "input": ""},
    ]
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [r]) for i, r in enumerate(records)]
    dm = prompt_dm(tiny_pretrain_ckpt, files, batch_size=4)
    prompts, stats = dm.read()
    assert prompts == [[user]] * 4
    assert [s["format"] for s in stats.values()] == ["prompt", "messages", "sharegpt", "alpaca"]
    dm.setup()
    batch = collate_prompts([dm.train_set[i] for i in range(4)])
    tok = dm.tokenizer
    expected = tok.encode_chat([user], add_generation_prompt=True)[0]
    assert (
        batch["prompt_ids"] == [expected] * 4 and expected[-len(tok.generation_prompt()) :] == tok.generation_prompt()
    )
    assert batch["prompt"] == [user["content"]] * 4 and batch["index"].tolist() == [0, 1, 2, 3]
    # multi-turn with a system prompt: everything before the final user turn is kept
    conv = [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": "4."}, user]
    assert prompt_dm(tiny_pretrain_ckpt, [write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])]).read()[0] == [conv]


def test_prompt_errors_name_file_and_line_and_final_reply_policy(tmp_path, tiny_pretrain_ckpt):
    sft_like = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, sft_like])
    with pytest.raises(DataError, match="final_reply: drop") as err:
        prompt_dm(tiny_pretrain_ckpt, [path]).read()
    assert f"{path}:2:" in str(err.value)
    prompts, stats = prompt_dm(tiny_pretrain_ckpt, [path], final_reply="drop").read()
    assert prompts[1] == [{"role": "user", "content": "hi"}] and stats[str(path)]["final_replies_dropped"] == 1
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ok"}, {"prompt": "  "}, {"text": "no schema"}])
    with pytest.raises(DataError, match="empty content") as err:
        prompt_dm(tiny_pretrain_ckpt, [bad]).read()
    assert f"{bad}:2:" in str(err.value)
    prompts, stats = prompt_dm(tiny_pretrain_ckpt, [bad], skip_bad_records=True).read()
    assert len(prompts) == 1 and sum(stats[str(bad)]["skipped"].values()) == 2
    with pytest.raises(DataError, match="data.init_args.tokenizer"):
        _ = PromptDataModule([str(path)]).tokenizer
    with pytest.raises(CheckpointError, match=SFT_CMD):
        _ = PromptDataModule([str(path)], tokenizer=str(tmp_path / "missing.ckpt")).tokenizer


def test_long_prompts_lose_their_oldest_exchanges(tmp_path, tiny_pretrain_ckpt):
    long = "word " * 40
    conv = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "hi"},
    ]
    convs = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long * 3}, {"prompt": "x"}])  # one schema per file
    dm = prompt_dm(tiny_pretrain_ckpt, [convs, plain], batch_size=1)
    dm.setup()
    kept = sorted(r.text for r in dm.train_set.rows)  # setup shuffles
    assert kept == ["hi", "x"] and [conv[-1]] in [r.messages for r in dm.train_set.rows]
    assert dm.stats["truncated_turns"] == 1 and dm.stats["dropped_too_long"] == 1
    assert max(len(r.ids) for r in dm.train_set.rows) <= 64


# ---- the stage ----
def make_module(ckpt: Path, dm: PromptDataModule, **kw) -> PPOModule:
    args = dict(init_from=str(ckpt), vocab_size=dm.vocab_size, reward_fn=EQUALS, max_new_tokens=16)
    args.update(missing_eos_penalty=0.0, learning_rate=5e-4, seed=0)  # the micro model is not SFT-trained: no ends
    return PPOModule(**{**args, **kw})


class MetricRecorder(Callback):
    """Per-rollout values of a few logged metrics."""

    KEYS = ("env/reward_mean", "objective/kl", "loss/policy")

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {k: [] for k in self.KEYS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for k in self.KEYS:
            self.values[k].append(float(trainer.callback_metrics[k]))


def test_rollout_matches_the_kv_cache_sampler(tiny_pretrain_ckpt):
    """The training-time layout (left-padded prompts, right-padded responses, one full forward) reproduces the
    tokens and log-probs the KV-cache sampler produced."""
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=6)
    dm.setup()
    module = make_module(tiny_pretrain_ckpt, dm, advantage="grpo", group_size=2)
    batch = collate_prompts([dm.train_set[i] for i in range(6)])
    ro = module.make_rollout(batch, seed=7)
    prompts = [p for p in batch["prompt_ids"] for _ in range(2)]
    ref = TextGenerator(module.model, dm.tokenizer).generate_full(
        prompts, GenerationConfig(max_new_tokens=16, seed=7), logprobs=True
    )
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded on the left
    for i, (tokens, lps) in enumerate(zip(ref.tokens, ref.logprobs)):
        n = len(tokens)
        assert ro.ids[i, ro.prompt_len : ro.prompt_len + n].tolist() == tokens and ro.mask[i].sum() == n
        assert_close(ro.logprobs[i, :n], lps, atol=1e-4, rtol=1e-4)
    assert_close(ro.logprobs, ro.ref_logprobs)  # policy == reference before any update
    assert ro.stats["objective/kl"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("advantage", ["ppo", "grpo"])
def test_mean_reward_rises_with_finite_kl(tmp_path, tiny_pretrain_ckpt, advantage):
    """ContainsReward("equals"): the micro pretrained model writes the word in ~15% of its answers; 20 rollouts
    make it the usual answer while the KL to the reference stays finite."""
    L.seed_everything(0)
    grpo = advantage == "grpo"
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=4 if grpo else 16)
    module = make_module(tiny_pretrain_ckpt, dm, advantage=advantage, group_size=4 if grpo else 1)
    rec = MetricRecorder()
    trainer = micro_trainer(tmp_path, max_steps=20 * module.updates_per_rollout, callbacks=[rec], limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    rewards, kls = rec.values["env/reward_mean"], rec.values["objective/kl"]
    assert len(rewards) == 20
    first, last = sum(rewards[:2]) / 2, sum(rewards[-5:]) / 5
    assert first < 0.4 and last > first + 0.3, rewards
    assert all(math.isfinite(k) for k in kls) and max(kls) < 20, kls


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory, tiny_pretrain_ckpt) -> Path:
    """A reward-stage checkpoint: the micro model with a reward head, 4 steps on the sample preference pairs."""
    root = tmp_path_factory.mktemp("reward")
    L.seed_everything(0)
    dm = PreferenceDataModule([str(SAMPLE / "preference.jsonl")], tokenizer=str(tiny_pretrain_ckpt), max_length=96)
    model = RewardModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3)
    trainer = micro_trainer(root, max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(root / "reward.ckpt")
    return root / "reward.ckpt"


def test_reward_model_scores_what_it_was_trained_on(tiny_pretrain_ckpt, reward_ckpt):
    """PPO scores (conversation + answer) with the reward stage's own rendering; the fallback renderer for reward
    models without ``encode`` produces the same tokens."""
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"])
    module = make_module(tiny_pretrain_ckpt, dm, reward_fn=None, reward_model=str(reward_ckpt))
    net, _ = load_reward_model(reward_ckpt)
    messages = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 2
    texts = ["2 plus 3 equals 5.", "2 plus 3 equals 6. It is."]
    conversations = [[*m, {"role": "assistant", "content": t}] for m, t in zip(messages, texts)]
    ids, attn = render_for_scoring(net.tokenizer, conversations)
    expected_ids, expected_attn = net.encode(conversations)
    assert torch.equal(ids, expected_ids) and torch.equal(attn, expected_attn)
    assert_close(module.score_responses(messages, ["q", "q"], texts), net.score(conversations))


def test_frozen_models_get_no_gradients_and_stay_out_of_checkpoints(tmp_path, tiny_pretrain_ckpt, reward_ckpt):
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=8)
    module = make_module(tiny_pretrain_ckpt, dm, reward_fn=None, reward_model=str(reward_ckpt))
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(("ref_", "reward_"))}
    assert frozen and not any(p.requires_grad for n, p in module.named_parameters() if n in frozen)
    trainer = micro_trainer(tmp_path, max_steps=2 * module.updates_per_rollout, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    trainable = {id(p) for n, p in module.named_parameters() if n.startswith(("model.", "value_head."))}
    assert optimised == trainable
    for name, p in module.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
    assert not torch.equal(module.model.layers[0].mlp.up_proj.weight, module.ref_policy.layers[0].mlp.up_proj.weight)
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    ckpt = load_checkpoint(tmp_path / "ppo.ckpt")
    keys = list(ckpt["state_dict"])
    assert not any(k.startswith(("ref_policy.", "reward_net.")) for k in keys)
    assert "value_head.weight" in keys and any(k.startswith("model.") for k in keys)
    assert ckpt["minillm"]["stage"] == "ppo" and ckpt["ppo"]["rollouts"] == 2
    model, _ = load_backbone(tmp_path / "ppo.ckpt")  # `minillm generate` reads the policy from it
    assert torch.equal(model.embed_tokens.weight, module.model.embed_tokens.weight)
    # resumed or tested with the other advantage: one line naming the setting (was torch's missing/unexpected keys)
    grpo = make_module(tiny_pretrain_ckpt, dm, advantage="grpo", group_size=2)
    with pytest.raises(CheckpointError, match="trained with advantage=ppo .* set --model.init_args.advantage ppo"):
        grpo.on_load_checkpoint(ckpt)
    del ckpt["state_dict"]["value_head.weight"], ckpt["state_dict"]["value_head.bias"]
    with pytest.raises(CheckpointError, match="trained with advantage=grpo .* this run has advantage=ppo"):
        module.on_load_checkpoint(ckpt)


def test_exact_resume(tmp_path, tiny_pretrain_ckpt, reward_ckpt):
    """4 rollouts straight == 2, then --ckpt_path resume for 2 more: same metrics, same weights, same KL coefficient
    (the frozen reference and reward model are rebuilt from their files)."""

    def run(root: Path, ckpt_path: str | None = None) -> tuple[PPOModule, MetricRecorder]:
        L.seed_everything(0)
        dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=8)
        module = make_module(tiny_pretrain_ckpt, dm, reward_fn=None, reward_model=str(reward_ckpt), kl_target=1.0)
        u = module.updates_per_rollout
        rec = MetricRecorder()
        saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2 * u, save_top_k=-1)
        trainer = micro_trainer(root, max_steps=4 * u, callbacks=[rec, saver], enable_checkpointing=True)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module, rec

    straight, rec_a = run(tmp_path / "a")
    u = straight.updates_per_rollout
    resumed, rec_b = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / f"step={2 * u}.ckpt"))
    for k in MetricRecorder.KEYS:
        assert len(rec_a.values[k]) == 4 and rec_b.values[k] == rec_a.values[k][2:], k
    assert straight.kl_ctl.value == resumed.kl_ctl.value != 0.05  # adapted, then restored exactly
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_fused_adamw_only_where_lightning_can_clip():
    """Fused AdamW unscales AMP gradients inside step(), so Lightning refuses to clip them: the base class keeps it
    for unclipped or non-mixed runs on a GPU or a CPU, never for clipped mixed-precision runs (PPO's manual
    optimization clips itself), and not on a device PyTorch does not fuse on."""
    assert use_fused_adamw({"cuda"}, precision="bf16-mixed", clips=False)
    assert use_fused_adamw({"cuda"}, precision="bf16-true", clips=True)
    assert use_fused_adamw({"cpu"}, precision="32-true", clips=True)
    assert not use_fused_adamw({"cuda"}, precision="bf16-mixed", clips=True)
    assert not use_fused_adamw({"cpu"}, precision="bf16-mixed", clips=True)
    assert not use_fused_adamw({"cuda"}, precision="16-mixed", clips=True)
    assert not use_fused_adamw({"mps"}, precision="32-true", clips=False)
    assert not use_fused_adamw({"cpu", "meta"}, precision="32-true", clips=False)


def test_bf16_mixed_clips_gradients_with_lightning(tmp_path, tiny_pretrain_ckpt):
    """bf16-mixed (autocast) rollouts and updates, clipped by Lightning's clip_gradients inside each optimizer
    step: every update's norm is at most max_grad_norm, and the logged norms are those before clipping."""
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=8)
    module = make_module(tiny_pretrain_ckpt, dm, max_grad_norm=1e-3)
    norms_after: list[float] = []
    step = module.on_before_optimizer_step

    def record(optimizer):
        step(optimizer)
        grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
        norms_after.append(float(torch.stack(grads).norm()))

    module.on_before_optimizer_step = record
    trainer = micro_trainer(tmp_path, max_steps=8, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert len(norms_after) == 8 and max(norms_after) <= 1e-3 * 1.01
    assert all(n > 1e-3 for n in module._grad_norms)  # the logged norms are those before clipping
    assert math.isfinite(trainer.callback_metrics["objective/kl"])


def test_manual_optimization_guards_and_argument_checks(tmp_path, tiny_pretrain_ckpt):
    dm = prompt_dm(tiny_pretrain_ckpt, [SAMPLE / "prompts.jsonl"], batch_size=8)
    refused = [
        ({"gradient_clip_val": 1.0}, "max_grad_norm"),
        ({"gradient_clip_val": 0}, "max_grad_norm"),  # 0 passed this check, then Lightning failed after validation
        ({"gradient_clip_algorithm": "value"}, "max_grad_norm"),  # named as given, not GradClipAlgorithmType.VALUE
        ({"gradient_clip_algorithm": "value"}, "gradient_clip_algorithm=value: not supported"),
        ({"accumulate_grad_batches": 2}, ""),
    ]
    for trainer_kw, match in refused:
        with pytest.raises(MiniLLMError, match=match if "=" in match else f"not supported.*{match}"):
            micro_trainer(tmp_path, max_steps=4, **trainer_kw).fit(make_module(tiny_pretrain_ckpt, dm), datamodule=dm)
    with pytest.raises(MiniLLMError, match="exactly one"):
        make_module(tiny_pretrain_ckpt, dm, reward_fn=None)
    with pytest.raises(MiniLLMError, match="both are set"):
        make_module(tiny_pretrain_ckpt, dm, reward_model="r.ckpt")
    with pytest.raises(ValueError, match="group_size must be >= 2 for GRPO"):
        make_module(tiny_pretrain_ckpt, dm, advantage="grpo")
    with pytest.raises(MiniLLMError, match="eval_temperature must be >= 0"):  # was a traceback at the 1st validation
        make_module(tiny_pretrain_ckpt, dm, eval_temperature=-1.0)
    with pytest.raises(CheckpointError, match="reward_tiny.yaml"):
        make_module(tiny_pretrain_ckpt, dm, reward_fn=None, reward_model=str(tmp_path / "none.ckpt"))
    with pytest.raises(CheckpointError, match=SFT_CMD):
        make_module(tmp_path / "no_sft.ckpt", dm)
    module = make_module(tiny_pretrain_ckpt, dm, max_new_tokens=100)  # 64 prompt + 100 > block_size 128
    with pytest.raises(ValueError, match="block_size=128"):
        micro_trainer(tmp_path, max_steps=4).fit(module, datamodule=dm)


# ---- the shipped configs through the real command ----
def clone_layout(root: Path) -> None:
    (root / "data").mkdir()
    os.symlink(ROOT / "configs", root / "configs")
    os.symlink(SAMPLE, root / "data" / "sample")


def test_ppo_configs_on_a_fresh_clone(tmp_path, monkeypatch, capsys):
    clone_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/ppo_tiny.yaml"])
    assert exit_info.value.code == 2 and SFT_CMD in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # ppo_small parses (every key is a real argument)
        cli_main(["fit", "--config", "configs/ppo_small.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "PPOModule" in out and "bf16-mixed" in out


def test_ppo_tiny_config_runs_two_rollouts(tmp_path, tiny_pretrain_ckpt):
    """configs/ppo_tiny.yaml through the real entry point, switched to a programmatic reward (micro checkpoint)."""
    clone_layout(tmp_path)
    ckpt = str(tiny_pretrain_ckpt)
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "fit", "--config", "configs/ppo_tiny.yaml"]
    cmd += ["--model.init_args.init_from", ckpt, "--data.init_args.tokenizer", ckpt]
    cmd += ["--model.init_args.reward_model", "null", "--model.init_args.reward_fn", json.dumps(EQUALS)]
    cmd += ["--data.init_args.max_length", "64", "--model.init_args.max_new_tokens", "16"]  # block_size 128
    cmd += ["--trainer.max_steps", "8", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    cmd += ["--trainer.log_every_n_steps", "1"]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "checkpoints" / "ppo_tiny"
    last = load_checkpoint(out / "last.ckpt")
    assert last["minillm"]["stage"] == "ppo" and last["global_step"] == 8 and last["ppo"]["rollouts"] == 2
    assert last["hyper_parameters"]["reward_fn"] == EQUALS
    saver = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saver["monitor"] == "val/reward_mean" and torch.isfinite(saver["best_model_score"])
    assert (out / "best.ckpt").is_file()
    events = EventAccumulator(str(next(out.glob("tb/version_*"))))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in (
        "env/reward_mean",
        "objective/kl",
        "policy/clipfrac",
        "value/explained_variance",
        "val/eval_reward_mean",
    ):
        assert tag in tags, tag  # val/eval_reward_mean: the config's independent ArithmeticReward check
    stats = json.loads(next(out.glob("tb/version_*/dataset_stats.json")).read_text())["prompts"]
    assert stats["train_prompts"] == 190 and stats["val_prompts"] == 10
    # the config's TrainingSummary: best of the checkpoint's monitor (max), and no "add Throughput" advice for PPO
    summary = json.loads(next(out.glob("tb/version_*/summary.json")).read_text())
    assert summary["validation"]["monitor"] == "val/reward_mean" and summary["validation"]["mode"] == "max"
    assert summary["validation"]["best"] == pytest.approx(float(saver["best_model_score"]))
    assert "training summary (ppo): 8 steps" in proc.stderr and "not measured for PPO" in proc.stderr
