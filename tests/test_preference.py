"""Tests of the preference stages: pair schemas, bad pairs, prompt truncation, batches, the reward head's
last-token read-out, the Bradley-Terry and DPO losses (hand-computed), the frozen DPO reference, exact
resume, the scoring API, and that both stages learn the sample preferences on a CPU in seconds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MICRO_ARCH, ROOT, SAMPLE, micro_trainer, real_data_path
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.testing import assert_close

from minillm_lightning.checkpoint import backbone_state, load_checkpoint
from minillm_lightning.cli import main as cli_main
from minillm_lightning.data.preference import Pair, PreferenceDataModule, collate, response_ids
from minillm_lightning.errors import CheckpointError, DataError
from minillm_lightning.losses import IGNORE_INDEX, bradley_terry_loss, dpo_loss
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.stages.dpo import DPOModule
from minillm_lightning.stages.pairwise import (
    RIGHT_PADDED,
    NonFiniteLossError,
    check_finite,
    padded_forward,
    pair_tensors,
)
from minillm_lightning.stages.reward import RewardModel, RewardModule, load_reward_model

SYS = {"role": "system", "content": "You are helpful."}
PROMPT = [SYS, {"role": "user", "content": "What is 2 plus 2?"}]
GOOD, BAD = (
    {"role": "assistant", "content": "2 plus 2 equals 4."},
    {"role": "assistant", "content": "2 plus 2 equals 5."},
)
LN2 = math.log(2)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def make_dm(tokenizer: Path | str, sources: Path | str, **kw) -> PreferenceDataModule:
    args = dict(tokenizer=str(tokenizer), max_length=128, batch_size=4, val_share=0.0)
    return PreferenceDataModule([str(sources)], **{**args, **kw})


def first_batch(dm: PreferenceDataModule) -> dict[str, torch.Tensor]:
    dm.setup("fit")
    return next(iter(dm.ordered_dataloader("train")))


# ---- schemas ----
SCHEMAS = {
    "minimind": {"chosen": [*PROMPT, GOOD], "rejected": [*PROMPT, BAD]},
    "trl strings": {
        "system": SYS["content"],
        "prompt": PROMPT[1]["content"],
        "chosen": GOOD["content"],
        "rejected": BAD["content"],
    },
    "trl messages": {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},
    "sharegpt": {
        "system": SYS["content"],
        "conversations": [{"from": "human", "value": PROMPT[1]["content"]}],
        "chosen": {"from": "gpt", "value": GOOD["content"]},
        "rejected": {"from": "gpt", "value": BAD["content"]},
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_schema_gives_the_same_pair(tmp_path, name):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS[name]])
    pairs, stats = make_dm("unused", path).read()
    assert pairs == [Pair(PROMPT, GOOD, BAD)]
    assert stats[str(path)]["format"] == name.split()[0]


def test_shared_files_parse_and_agree():
    """dpo_en.jsonl (minimind lists) and dpo_en_demo.json (ShareGPT JSON array) hold the same 300 pairs."""
    jsonl, s1 = make_dm("unused", real_data_path("preference", "dpo_en.jsonl")).read()
    demo, s2 = make_dm("unused", real_data_path("preference", "dpo_en_demo.json")).read()
    assert len(jsonl) == 300 and jsonl == demo
    assert [s["format"] for s in (*s1.values(), *s2.values())] == ["minimind", "sharegpt"]
    assert sum(p.prompt[0]["role"] == "system" for p in jsonl) == 80 and max(len(p.prompt) for p in jsonl) == 13


# ---- bad pairs ----
BAD_PAIRS = {
    "identical responses": {"chosen": [*PROMPT, GOOD], "rejected": [*PROMPT, dict(GOOD)]},
    "prompts differ": {"chosen": [*PROMPT, GOOD], "rejected": [SYS, {"role": "user", "content": "2+3?"}, BAD]},
    "turns not alternating": {"chosen": [*PROMPT, GOOD, GOOD], "rejected": [*PROMPT, BAD]},
}


@pytest.mark.parametrize("reason", list(BAD_PAIRS))
def test_bad_pair_error_names_file_and_line(tmp_path, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS["minimind"], BAD_PAIRS[reason]])
    with pytest.raises(DataError, match="skip_bad_records") as err:
        make_dm("unused", path).read()
    assert f"{path}:2:" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("cached", [False, True])
def test_a_file_that_switches_schema_midway_is_named_as_such(tmp_path, tiny_pretrain_ckpt, cached):
    """The schema is detected per file from its first record; a later record in another schema failed on a
    missing or mistyped field only. Now the error says which schema the record is in, and the file's."""
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS["trl strings"]] * 2 + [SCHEMAS["minimind"]])
    with pytest.raises(DataError) as err:
        if cached:  # the token cache's (parallel) build
            make_dm(str(tiny_pretrain_ckpt), path, cache_dir=str(tmp_path / "cache"), prepare_workers=1).prepare_data()
        else:
            make_dm("unused", path).read()
    message = str(err.value)
    assert f"{path}:3:" in message, message
    assert "in the minimind schema, but the file's schema is trl" in message, message
    # a record that is bad in the file's own schema is not called a switch
    path = write_jsonl(tmp_path / "e.jsonl", [SCHEMAS["minimind"], BAD_PAIRS["identical responses"]])
    with pytest.raises(DataError) as err:
        make_dm("unused", path).read()
    assert "identical responses" in str(err.value) and "schema" not in str(err.value)


def test_bad_pair_in_json_array_reports_its_line(tmp_path):
    bad = {**SCHEMAS["sharegpt"], "rejected": SCHEMAS["sharegpt"]["chosen"]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([SCHEMAS["sharegpt"], bad], indent=2))
    with pytest.raises(DataError, match="identical responses") as err:
        make_dm("unused", path).read()
    assert f"{path}:19:" in str(err.value)  # the second object starts on line 19 of the indented file


def test_skip_bad_records_counts_them_in_dataset_stats(tmp_path, tiny_pretrain_ckpt):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS["minimind"]] * 4 + [BAD_PAIRS["identical responses"]] * 2)
    with path.open("a") as fh:
        fh.write(json.dumps(BAD_PAIRS["prompts differ"]) + "\n{not json\n")
    dm = make_dm(tiny_pretrain_ckpt, path, skip_bad_records=True)
    dm.trainer = micro_trainer(tmp_path)
    dm.setup("fit")
    stats = json.loads((tmp_path / "dataset_stats.json").read_text())["preference"]
    assert stats["train_pairs"] == 4
    skipped = {"identical responses": 2, "prompts differ": 1, "malformed JSON": 1}
    assert stats["sources"][str(path)] == {"format": "minimind", "raw_records": 7, "kept": 4, "skipped": skipped}


def test_missing_tokenizer_names_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS["minimind"]])
    with pytest.raises(DataError, match="data.init_args.tokenizer"):
        _ = PreferenceDataModule([str(path)]).tokenizer
    with pytest.raises(CheckpointError, match="configs/sft_tiny.yaml"):
        _ = make_dm(tmp_path / "checkpoints" / "sft_tiny" / "last.ckpt", path).tokenizer


# ---- tokens, truncation, batches ----
def test_sequences_follow_the_sft_template_and_label_the_final_reply_only(tmp_path, tiny_pretrain_ckpt):
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rec = {"chosen": [SYS, *earlier, PROMPT[1], GOOD], "rejected": [SYS, *earlier, PROMPT[1], BAD]}
    dm = make_dm(tiny_pretrain_ckpt, write_jsonl(tmp_path / "d.jsonl", [rec]), batch_size=1)
    batch, tok = first_batch(dm), dm.tokenizer
    for side, reply in (("chosen", GOOD), ("rejected", BAD)):
        ids, mask = tok.encode_chat(rec[side])
        assert batch[f"{side}_input_ids"][0, : len(ids) - 1].tolist() == ids[:-1]  # all but the final newline
        labels = batch[f"{side}_labels"][0]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == reply["content"] + "<|im_end|>"
        assert labels[-1] == IGNORE_INDEX and response_ids(tok, reply)[-1] == tok.im_end_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_both_sides_to_one_length(side):
    """prompt [5, 6], chosen reply [7, 8, 9], rejected reply [7]: both rows padded to 5 tokens."""
    items = [{"prompt": [5, 6], "chosen": [7, 8, 9], "rejected": [7], "index": 3}]
    batch = collate(items, pad_id=0, padding_side=side)
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["chosen_labels"].tolist() == [[-100, 7, 8, 9, -100]]  # labels[t] = input t + 1 on the reply
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    expected = {
        "right": ([5, 6, 7, 0, 0], [-100, 7, -100, -100, -100], [1, 1, 1, 0, 0]),
        "left": ([0, 0, 5, 6, 7], [-100, -100, -100, 7, -100], [0, 0, 1, 1, 1]),
    }[side]
    got = tuple(batch[f"rejected_{k}"][0].tolist() for k in ("input_ids", "labels", "attention_mask"))
    assert got == expected and batch["index"].tolist() == [3]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_layout_is_decided_on_the_host_and_honoured(side):
    """The reward/DPO modules mark the layout in on_before_batch_transfer (CPU, no device sync in the step);
    padded_forward then trusts the mark, and gives what inspecting the mask gives."""
    items = [
        {"prompt": [5, 6], "chosen": [7, 8, 9], "rejected": [7], "index": 0},
        {"prompt": [9], "chosen": [3], "rejected": [4, 4, 4, 4], "index": 1},
    ]
    batch = collate(items, pad_id=0, padding_side=side)
    for module in (
        RewardModule(arch=MiniGPTConfig(**MICRO_ARCH, vocab_size=32)),
        DPOModule(arch=MiniGPTConfig(**MICRO_ARCH, vocab_size=32)),
    ):
        marked = module.on_before_batch_transfer(dict(batch), 0)
        assert marked[RIGHT_PADDED] is (side == "right")
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=32)).eval()
    ids, mask, _ = pair_tensors(batch)
    with torch.no_grad():
        inspected = padded_forward(model, ids, mask).logits
        hinted = padded_forward(model, ids, mask, right_padded=side == "right").logits
        assert_close(hinted, inspected, rtol=0, atol=0)
        if side == "left":  # the hint is what decides: a wrong "right" hint skips the mask (and changes logits)
            assert not torch.allclose(padded_forward(model, ids, mask, right_padded=True).logits, inspected)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_replies(tmp_path, tiny_pretrain_ckpt):
    history = [{"role": r, "content": f"old {r} turn number {i}"} for i in range(3) for r in ("user", "assistant")]
    long_user = {"role": "user", "content": "Tell me, " + "please, " * 40 + "what is 2 plus 2?"}
    records = [
        {"chosen": [SYS, *history, PROMPT[1], GOOD], "rejected": [SYS, *history, PROMPT[1], BAD]},  # drops turns
        {"chosen": [SYS, long_user, GOOD], "rejected": [SYS, long_user, BAD]},  # cuts tokens
        {"chosen": [*PROMPT, {"role": "assistant", "content": "4 " * 80}], "rejected": [*PROMPT, BAD]},  # too long
    ]
    dm = make_dm(tiny_pretrain_ckpt, write_jsonl(tmp_path / "d.jsonl", records), max_length=64, batch_size=1)
    dm.setup("fit")
    tok = dm.tokenizer
    assert len(dm.train_set) == 2
    assert {k: dm.stats[k] for k in ("prompt_truncated_turns", "prompt_cut_tokens", "dropped_too_long")} == {
        "prompt_truncated_turns": 1,
        "prompt_cut_tokens": 1,
        "dropped_too_long": 1,
    }
    system = tok.encode_chat([SYS])[0]
    for prompt, chosen, rejected in dm.train_set.rows:
        assert len(prompt) + max(len(chosen), len(rejected)) <= 64
        assert prompt[: len(system)] == system  # the system prompt survives
        assert tok.decode(prompt).endswith("2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
        assert (chosen, rejected) == (response_ids(tok, GOOD), response_ids(tok, BAD))  # replies never cut
    assert "old" not in tok.decode(dm.train_set.rows[0][0])  # the oldest exchanges went first
    dropping = make_dm(tiny_pretrain_ckpt, tmp_path / "d.jsonl", max_length=64, overflow="drop", batch_size=1)
    with pytest.raises(DataError, match="fewer than one batch"):
        dropping.setup("fit")


# ---- the reward head ----
def test_reward_reads_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = RewardModel(MiniGPT(MiniGPTConfig(**{**MICRO_ARCH, "vocab_size": 97}))).eval()
    rows = [torch.randint(4, 97, (n,)) for n in (5, 9, 7)]
    alone = torch.stack([model.score(r[None])[0] for r in rows])
    T = 9
    right = torch.stack([torch.cat([r, r.new_zeros(T - len(r))]) for r in rows])
    left = torch.stack([torch.cat([r.new_zeros(T - len(r)), r]) for r in rows])
    mask_right = torch.stack([torch.arange(T) < len(r) for r in rows]).long()
    mask_left = mask_right.flip(-1)
    assert_close(model.score(right, mask_right), alone, atol=1e-5, rtol=1e-5)
    assert_close(model.score(left, mask_left), alone, atol=1e-5, rtol=1e-5)
    assert_close(model.score(right.masked_fill(mask_right == 0, 3), mask_right), alone, atol=1e-5, rtol=1e-5)
    changed = right.clone()
    changed[0, 4] = 50 if changed[0, 4] != 50 else 51  # the last real token of row 0
    assert not torch.allclose(model.score(changed, mask_right)[0], alone[0])


def test_reward_module_gives_the_same_rewards_with_left_and_right_padding(tiny_pretrain_ckpt):
    model = RewardModule(init_from=str(tiny_pretrain_ckpt)).eval()
    rewards = {}
    for side in ("right", "left"):
        batch = first_batch(make_dm(tiny_pretrain_ckpt, SAMPLE / "preference.jsonl", padding_side=side))
        assert (batch["chosen_attention_mask"][:, 0 if side == "right" else -1] == 1).all()
        rewards[side] = torch.cat(model.pair_rewards(batch)[:2])
    assert_close(rewards["left"], rewards["right"], atol=1e-5, rtol=1e-5)


# ---- losses, derived by hand ----
def test_bradley_terry_loss_values():
    """r_c = 2, r_r = 1: -logsigmoid(1) = log(1 + e^-1) = 0.3132617.
    margin 1: -logsigmoid(2 - 1 - 1) = ln 2 = 0.6931472.
    centering 0.01: 0.3132617 + 0.01 * (2 + 1)^2 = 0.4032617."""
    c, r = torch.tensor([2.0]), torch.tensor([1.0])
    assert_close(bradley_terry_loss(c, r), torch.tensor(0.3132617))
    assert_close(bradley_terry_loss(c, r, margin=1.0), torch.tensor(LN2))
    assert_close(bradley_terry_loss(c, r, center_coef=0.01), torch.tensor(0.4032617))


def test_dpo_loss_values():
    """policy log-probs (chosen, rejected) = (-1, -3), reference (-2, -2), beta = 0.5:
    logits = (-1 - -3) - (-2 - -2) = 2, beta * logits = 1.
    sigmoid: -logsigmoid(1) = log(1 + e^-1) = 0.3132617.
    label smoothing 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e) = 0.3132617 + 0.1 = 0.4132617
        (since log(1 + e) = 1 + log(1 + e^-1)).
    IPO: (logits - 1 / (2 * beta))^2 = (2 - 1)^2 = 1.
    implicit rewards: 0.5 * (-1 - -2) = 0.5 and 0.5 * (-3 - -2) = -0.5."""
    args = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0)]
    loss, chosen, rejected = dpo_loss(*args, beta=0.5)
    assert_close(loss, torch.tensor([0.3132617]))
    assert_close((chosen, rejected), (torch.tensor([0.5]), torch.tensor([-0.5])))
    assert_close(dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0], torch.tensor([0.4132617]))
    assert_close(dpo_loss(*args, beta=0.5, loss_type="ipo")[0], torch.tensor([1.0]))


# ---- DPO: reference, step 0, checkpoints, resume ----
def test_dpo_step_zero_is_ln2_with_zero_margins(tiny_pretrain_ckpt):
    model = DPOModule(init_from=str(tiny_pretrain_ckpt), beta=0.1)
    loss, _, stats = model.pair_step(first_batch(make_dm(tiny_pretrain_ckpt, SAMPLE / "preference.jsonl")), "train")
    assert_close(loss, torch.tensor(LN2))
    assert (stats["rewards/margins"] == 0).all() and (stats["rewards/accuracies"] == 0).all()


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def run_dpo(root: Path, ckpt: Path, steps: int, ckpt_path: str | None = None, **kw) -> tuple[DPOModule, LossRecorder]:
    L.seed_everything(0)
    dm = make_dm(ckpt, SAMPLE / "preference.jsonl", batch_size=4, val_share=0.05)
    model = DPOModule(init_from=str(ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3, warmup=0, **kw)
    rec = LossRecorder()
    saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = micro_trainer(root, max_steps=steps, callbacks=[rec, saver], enable_checkpointing=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, rec


def test_dpo_reference_is_frozen_and_not_checkpointed(tmp_path, tiny_pretrain_ckpt):
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # no filter left by an earlier test's module
        warnings.simplefilter("always")
        model, _ = run_dpo(tmp_path, tiny_pretrain_ckpt, steps=3)
    # Lightning warns about modules in eval mode at fit start: the reference is, on purpose (TrainingSummary counted it)
    assert not [w for w in shown if "in eval mode" in str(w.message)]
    init = backbone_state(load_checkpoint(tiny_pretrain_ckpt)["state_dict"])
    assert all(not p.requires_grad and p.grad is None for p in model.ref_model.parameters())
    for k, v in model.ref_model.state_dict().items():
        assert torch.equal(v, init[k]), k  # untouched by training
    assert not torch.equal(model.model.embed_tokens.weight, init["embed_tokens.weight"])  # the policy moved
    in_optimizer = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.ref_model.parameters()}
    saved = torch.load(tmp_path / "step=3.ckpt", weights_only=True)
    assert saved["minillm"]["stage"] == "dpo" and not [k for k in saved["state_dict"] if k.startswith("ref_model.")]
    reloaded = DPOModule.load_from_checkpoint(tmp_path / "step=3.ckpt")  # strict load: the reference is rebuilt
    assert torch.equal(reloaded.ref_model.embed_tokens.weight, init["embed_tokens.weight"])
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_dpo_exact_resume_mid_epoch(tmp_path, tiny_pretrain_ckpt):
    """6 steps straight == 3 steps, then resume from the step-3 checkpoint for 3 more (same losses and weights)."""
    straight, rec_a = run_dpo(tmp_path / "a", tiny_pretrain_ckpt, steps=6)
    resumed, rec_b = run_dpo(tmp_path / "b", tiny_pretrain_ckpt, steps=6, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    assert len(rec_a.losses) == 6 and rec_b.losses == rec_a.losses[3:]
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_resume_against_a_replaced_reference_is_refused(tmp_path, tiny_pretrain_ckpt):
    """The reference is rebuilt from init_from on resume: a file replaced since (another model copied over the SFT
    checkpoint) trained on against a different reference without a word."""
    sft = tmp_path / "sft.ckpt"
    sft.write_bytes(tiny_pretrain_ckpt.read_bytes())
    run_dpo(tmp_path / "a", sft, steps=3)
    assert "reference (model.init_from)" in load_checkpoint(tmp_path / "a" / "step=3.ckpt")["minillm"]["frozen"]
    other = load_checkpoint(sft)
    other["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["state_dict"].items()}
    torch.save(other, sft)
    with pytest.raises(CheckpointError, match=r"frozen reference \(model.init_from\) of this run was rebuilt from a "):
        run_dpo(tmp_path / "b", sft, steps=4, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))


def test_precomputed_reference_logps_match_and_resume(tmp_path, tiny_pretrain_ckpt):
    _, live = run_dpo(tmp_path / "live", tiny_pretrain_ckpt, steps=3)
    model, cached = run_dpo(tmp_path / "a", tiny_pretrain_ckpt, steps=3, precompute_ref_logps=True)
    assert model.ref_model is None and len(model._ref_cache["train"]) == 281
    assert_close(cached.losses, live.losses, atol=1e-5, rtol=1e-5)
    table = torch.load(tmp_path / "a" / "step=3.ckpt", weights_only=True)["dpo_reference_logps"]
    assert torch.equal(table["train"], model._ref_cache["train"].cpu())
    resumed, _ = run_dpo(
        tmp_path / "b", tiny_pretrain_ckpt, 4, str(tmp_path / "a" / "step=3.ckpt"), precompute_ref_logps=True
    )
    assert torch.equal(resumed._ref_cache["train"], model._ref_cache["train"])


def test_nonfinite_loss_raises_or_skips(tiny_pretrain_ckpt):
    model = DPOModule(init_from=str(tiny_pretrain_ckpt))
    model.trainer = micro_trainer(Path("/tmp"))
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        check_finite(torch.tensor(float("nan")), model, "raise")
    with pytest.warns(UserWarning, match="skipping"):
        assert check_finite(torch.tensor(float("inf")), model, "skip") is None


# ---- learning: both stages raise training-set preference accuracy ----
@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """32 fixed pairs of the shipped sample: small enough to learn in 80 CPU steps."""
    records = [json.loads(line) for line in (SAMPLE / "preference.jsonl").read_text().splitlines()[:32]]
    return write_jsonl(tmp_path_factory.mktemp("subset") / "pairs.jsonl", records)


@torch.no_grad()
def train_accuracy(model: RewardModule | DPOModule, dm: PreferenceDataModule) -> float:
    """Share of the training pairs ranked right: reward r_c > r_r, or DPO's implicit reward margin > 0."""
    model.eval()
    hits = []
    for batch in dm.ordered_dataloader("train"):
        if isinstance(model, RewardModule):
            chosen, rejected, _ = model.pair_rewards(batch)
        else:
            ids, mask, labels = pair_tensors(batch)
            policy = model._logps(model.model(ids).logits, labels)
            chosen, rejected = (policy - model.reference_logps(batch, "train")).chunk(2)
        hits.append((chosen > rejected).float())
    model.train()
    return float(torch.cat(hits).mean())


@pytest.fixture(scope="module")
def trained_reward(tmp_path_factory, tiny_pretrain_ckpt, subset):
    root = tmp_path_factory.mktemp("reward")
    L.seed_everything(1)
    dm = make_dm(tiny_pretrain_ckpt, subset, batch_size=8)
    dm.setup("fit")
    model = RewardModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3, warmup=0.1)
    before = train_accuracy(model, dm)
    trainer = micro_trainer(root, max_steps=80, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(root / "reward.ckpt")
    return model, dm, root / "reward.ckpt", before, train_accuracy(model, dm)


def test_reward_model_learns_the_sample_preferences(trained_reward):
    *_, before, after = trained_reward
    assert 0.2 < before < 0.8 and after > 0.7, (before, after)


def test_dpo_learns_the_sample_preferences(tmp_path, tiny_pretrain_ckpt, subset):
    L.seed_everything(1)
    dm = make_dm(tiny_pretrain_ckpt, subset, batch_size=8)
    dm.setup("fit")
    model = DPOModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3, warmup=0.1)
    assert train_accuracy(model, dm) == 0.0  # policy == reference: every implicit reward margin is 0
    micro_trainer(tmp_path, max_steps=80, limit_val_batches=0).fit(model, datamodule=dm)
    assert train_accuracy(model, dm) > 0.7


def test_load_reward_model_scores_tokens_and_conversations(trained_reward, tiny_pretrain_ckpt):
    module, dm, path, *_ = trained_reward
    model, tok = load_reward_model(path)
    assert tok.sha256 == dm.tokenizer.sha256 and not any(p.requires_grad for p in model.parameters())
    batch = next(iter(dm.ordered_dataloader("train")))
    module.eval()
    chosen, _, _ = module.pair_rewards(batch)
    assert_close(model.score(batch["chosen_input_ids"], batch["chosen_attention_mask"]), chosen.detach())
    pair = make_dm("unused", dm.sources[0]).read()[0][0]
    conversation = [*pair.prompt, pair.chosen]
    ids, mask = model.encode([conversation])
    assert_close(model.score([conversation]), model.score(ids, mask))
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tiny_pretrain_ckpt)


# ---- the shipped configs ----
@pytest.mark.parametrize("config", ["reward_tiny", "dpo_tiny", "reward_small", "dpo_small"])
def test_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "PreferenceDataModule" in out
    assert ("beta: 0.1" in out) == config.startswith("dpo")


@pytest.mark.parametrize("config", ["reward_tiny", "dpo_tiny"])
def test_tiny_config_runs_end_to_end(tmp_path, tiny_pretrain_ckpt, config):
    """The shipped config through the real entry point (micro checkpoint, a few steps), in a fresh-clone layout."""
    (tmp_path / "data").mkdir()
    os.symlink(ROOT / "configs", tmp_path / "configs")
    os.symlink(SAMPLE, tmp_path / "data" / "sample")
    ckpt = str(tiny_pretrain_ckpt)
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "fit", "--config", f"configs/{config}.yaml"]
    cmd += [
        "--model.init_args.init_from",
        ckpt,
        "--data.init_args.tokenizer",
        ckpt,
        "--data.init_args.max_length",
        "128",
    ]
    cmd += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "checkpoints" / config
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["minillm"]["stage"] == config.split("_")[0] and saved["global_step"] == 4
    assert "preference" in json.loads(next(out.rglob("dataset_stats.json")).read_text())
