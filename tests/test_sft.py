"""Tests of the SFT stage: conversation schemas, malformed records, the assistant-only loss mask (golden),
length policies, turn truncation, packing, init_from, tokenizer checks, exact resume and the CLI config."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MICRO_ARCH, ROOT, SAMPLE, micro_trainer, real_data_path
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.testing import assert_close

from minillm_lightning.checkpoint import backbone_state, load_checkpoint
from minillm_lightning.cli import main as cli_main
from minillm_lightning.data.sft import SFTDataModule, SFTFields, collate
from minillm_lightning.errors import CheckpointError, DataError
from minillm_lightning.losses import IGNORE_INDEX
from minillm_lightning.model import MiniGPT, MiniGPTConfig, segment_causal_mask
from minillm_lightning.stages.sft import SFTModule
from minillm_lightning.tokenizer import Tokenizer, TokenizerSettings, train_sentencepiece

PRETRAIN_CMD = "minillm fit --config configs/pretrain_tiny.yaml"
SYS = {"role": "system", "content": "You are helpful."}


def msgs(*pairs: str, system: bool = False) -> list[dict]:
    """[system], user, assistant, ... from alternating texts."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(pairs)]
    return ([SYS] if system else []) + turns


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def make_dm(tokenizer: Path | str, sources: Path | str | list, **kw) -> SFTDataModule:
    sources = [str(s) for s in sources] if isinstance(sources, list) else [str(sources)]
    args = dict(tokenizer=str(tokenizer), max_length=128, batch_size=1, val_share=0.0)
    return SFTDataModule(sources, **{**args, **kw})


def pieces(tok: Tokenizer, ids) -> list[str]:
    return [tok.id_to_piece(i) for i in ids]


@pytest.fixture(scope="session")
def char_tok(tmp_path_factory) -> Path:
    """A character-level tokenizer: one piece per character, so golden token tables stay readable."""
    texts = ["system user assistant hi yo 2+2? 4 S", "You are helpful. be brief"]
    blob = train_sentencepiece(texts, TokenizerSettings(vocab_size=64, model_type="char", character_coverage=1.0))
    path = tmp_path_factory.mktemp("chartok") / "char.model"
    path.write_bytes(blob)
    return path


# ---- schemas ----
SCHEMAS = {
    "messages": {"messages": [SYS, *msgs("hi", "yo", "2+2?", "4")]},
    "conversations": {"conversations": [SYS, *msgs("hi", "yo", "2+2?", "4")]},
    "sharegpt": {
        "system": SYS["content"],
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ],
    },
    "alpaca": {"system": SYS["content"], "history": [["hi", "yo"]], "instruction": "2+2?", "input": "", "output": "4"},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("explicit", [False, True])
def test_every_schema_gives_the_same_conversation(tmp_path, char_tok, name, explicit):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS[name]])
    fmt = {"messages": "messages", "conversations": "messages"}.get(name, name) if explicit else "auto"
    convs, stats = make_dm(char_tok, path, format=fmt).read()
    assert convs == [[SYS, *msgs("hi", "yo", "2+2?", "4")]]
    assert stats[str(path)]["format"] == {"conversations": "messages"}.get(name, name)


def test_alpaca_input_and_custom_field_names(tmp_path, char_tok):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"q": "Sum", "ctx": "2+2", "a": "4"}])
    fields = SFTFields(instruction="q", input="ctx", output="a")
    assert make_dm(char_tok, alpaca, fields=fields).read()[0] == [msgs("Sum\n2+2", "4")]
    custom = write_jsonl(
        tmp_path / "c.jsonl", [{"dialog": [{"who": "user", "text": "hi"}, {"who": "gpt", "text": "yo"}]}]
    )
    fields = SFTFields(messages="dialog", role="who", content="text")
    assert make_dm(char_tok, custom, fields=fields).read()[0] == [msgs("hi", "yo")]
    # a default system prompt goes to conversations without one
    assert make_dm(char_tok, custom, fields=fields, system_prompt="be brief").read()[0][0][0] == {
        "role": "system",
        "content": "be brief",
    }


def test_shared_alpaca_and_rekeyed_jsonl_agree(tiny_pretrain_ckpt):
    """alpaca_en_demo.json (Alpaca JSON array) and sft_en.jsonl (the same records re-keyed) read identically."""
    alpaca, alpaca_stats = make_dm(tiny_pretrain_ckpt, real_data_path("sft", "alpaca_en_demo.json")).read()
    jsonl, jsonl_stats = make_dm(tiny_pretrain_ckpt, real_data_path("sft", "sft_en.jsonl")).read()
    assert len(alpaca) == len(jsonl) == 999 and alpaca == jsonl
    assert [s["format"] for s in (*alpaca_stats.values(), *jsonl_stats.values())] == ["alpaca", "messages"]


# ---- malformed records ----
BAD = {
    "unknown role": {"conversations": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "empty content": {"conversations": msgs("hi", "   ")},
    "turns not alternating": {"conversations": [*msgs("hi"), *msgs("again")]},
    "missing field": {"conversations": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
    "no final assistant turn": {"conversations": msgs("hi", "yo", "more?")},
    "unknown schema": {"text": "plain"},
}


@pytest.mark.parametrize("reason", list(BAD))
def test_malformed_record_error_names_file_and_line(tmp_path, char_tok, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": msgs("hi", "yo")}, BAD[reason]])
    if reason == "unknown schema":  # detection happens on the first record
        path = write_jsonl(tmp_path / "d.jsonl", [BAD[reason]])
    with pytest.raises(DataError, match="skip_bad_records") as err:
        make_dm(char_tok, path).read()
    line = 1 if reason == "unknown schema" else 2
    assert f"{path}:{line}:" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"instruction": "hi"}, "field 'output' is missing"),
        ({"instruction": "hi", "output": None}, "field 'output' is null"),
        ({"conversations": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}, "is null"),
        ({"conversations": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "turn 1 'content' is missing"),
    ],
)
def test_null_and_absent_fields_are_told_apart(tmp_path, char_tok, record, words):
    first = {"instruction": "a", "output": "b"} if "instruction" in record else {"conversations": msgs("hi", "yo")}
    path = write_jsonl(tmp_path / "d.jsonl", [first, record])
    with pytest.raises(DataError, match="missing field") as err:
        make_dm(char_tok, path).read()
    assert f"{path}:2:" in str(err.value) and words in str(err.value), str(err.value)


def test_malformed_json_array_item_reports_its_line(tmp_path, char_tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "hi", "output": "yo"}, {"instruction": "hi", "output": ""}], indent=2))
    with pytest.raises(DataError, match="empty content") as err:
        make_dm(char_tok, path).read()
    assert f"{path}:6:" in str(err.value)  # the second object starts on line 6 of the indented file


def test_skip_bad_records_counts_them_in_dataset_stats(tmp_path, char_tok):
    good = [{"conversations": msgs("hi", "yo")}] * 3
    path = tmp_path / "d.jsonl"
    write_jsonl(path, good + [BAD["unknown role"], BAD["empty content"], BAD["empty content"]])
    with path.open("a") as fh:
        fh.write("{not json\n")
    dm = make_dm(char_tok, path, skip_bad_records=True)
    dm.trainer = micro_trainer(tmp_path)
    dm.setup("fit")
    stats = json.loads((tmp_path / "dataset_stats.json").read_text())["sft"]
    assert stats["sources"][str(path)]["skipped"] == {"unknown role": 1, "empty content": 2, "malformed JSON": 1}
    assert stats["train_conversations"] == 3


# ---- labels ----
# The golden 2-turn conversation, token by token: each row is one template line, with the input tokens and
# the label of each (None = IGNORE_INDEX). label[t] is the token that FOLLOWS input t, and only the tokens an
# assistant turn produces (its reply and its <|im_end|>) are targets: so the header's "\n" carries the first
# reply token, and <|im_end|> itself carries nothing (the "\n" after it is template, not reply).
S, E, N = "<|im_start|>", "<|im_end|>", "\n"
GOLDEN = [
    ([S, "s", "y", "s", "t", "e", "m", N, "S", E, N], [None] * 11),
    ([S, "u", "s", "e", "r", N, "h", "i", E, N], [None] * 10),
    (
        [S, "a", "s", "s", "i", "s", "t", "a", "n", "t", N, "y", "o", E, N],
        [None, None, None, None, None, None, None, None, None, None, "y", "o", E, None, None],
    ),
    ([S, "u", "s", "e", "r", N, "2", "+", "2", "?", E, N], [None] * 12),
    (  # the final "\n" is never an input: nothing follows it
        [S, "a", "s", "s", "i", "s", "t", "a", "n", "t", N, "4", E],
        [None, None, None, None, None, None, None, None, None, None, "4", E, None],
    ),
]


def test_golden_assistant_only_labels(tmp_path, char_tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"conversations": [{"role": "system", "content": "S"}, *msgs("hi", "yo", "2+2?", "4")]}]
    )
    dm = make_dm(char_tok, path)
    dm.setup()
    row = dm.train_set[0]
    tok = dm.tokenizer
    want_inputs = [p for inputs, _ in GOLDEN for p in inputs]
    want_labels = [p for _, labels in GOLDEN for p in labels]
    assert pieces(tok, row["input_ids"]) == want_inputs
    got = [None if i == IGNORE_INDEX else tok.id_to_piece(i) for i in row["labels"].tolist()]
    assert got == want_labels


def test_labels_are_the_shifted_template_mask(tiny_pretrain_ckpt):
    dm = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", max_length=128)
    dm.setup()
    tok = dm.tokenizer
    conversations, _ = dm.read()
    order = list(range(len(conversations)))
    random.Random(dm.seed).shuffle(order)  # the training rows follow the seeded shuffle of the conversations
    assert dm.stats["dropped_too_long"] == 0
    checked = 0
    for i in range(40):
        ids, mask = tok.encode_chat(conversations[order[i]])
        row = dm.train_set[i]
        if len(ids) <= 129:  # not truncated
            assert row["input_ids"].tolist() == ids[:-1]
            assert row["labels"].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            checked += 1
    assert checked >= 20
    assert 0.05 < dm.stats["assistant_token_share"] < 0.6


def test_collate_pads_right_without_labels(char_tok, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"conversations": msgs("hi", "yo")}, {"conversations": msgs("2+2?", "4")}]
    )
    dm = make_dm(char_tok, path)
    dm.setup()
    batch = collate([dm.train_set[0], dm.train_set[1]], pad_id=dm.tokenizer.pad_id)
    short = int(batch["input_ids"].shape[1] - min(len(dm.train_set[i]["input_ids"]) for i in range(2)))
    assert short > 0
    row = int(torch.argmin(torch.tensor([len(dm.train_set[i]["input_ids"]) for i in range(2)])))
    assert (batch["input_ids"][row, -short:] == dm.tokenizer.pad_id).all()
    assert (batch["labels"][row, -short:] == IGNORE_INDEX).all()


# ---- length policies and augmentation ----
def length_of(tok: Tokenizer, messages: list[dict]) -> int:
    return len(tok.encode_chat(messages)[0]) - 1


def test_truncate_drops_oldest_exchanges_and_keeps_system(tmp_path, char_tok):
    long = msgs("hi", "yo", "2+2?", "4", "hi", "yo yo", system=True)
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": long}])
    tok = Tokenizer.from_file(char_tok)
    limit = length_of(tok, [SYS, *long[-2:]])  # room for the system prompt and the last exchange only
    dm = make_dm(char_tok, path, max_length=limit)
    dm.setup()
    assert dm.train_set[0]["input_ids"].tolist() == tok.encode_chat([SYS, *long[-2:]])[0][:-1]
    assert dm.stats["truncated_turns"] == 1 and dm.stats["dropped_too_long"] == 0


def test_truncate_cuts_a_single_long_exchange_and_drop_policy_drops(tmp_path, char_tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"conversations": msgs("hi", "yo yo yo yo yo")}, {"conversations": msgs("hi", "yo")}]
    )
    tok = Tokenizer.from_file(char_tok)
    limit = length_of(tok, msgs("hi", "yo"))
    dm = make_dm(char_tok, path, max_length=limit)
    dm.setup()
    rows = sorted((dm.train_set[i] for i in range(2)), key=lambda r: r["labels"].tolist())
    assert all(len(r["input_ids"]) == limit for r in rows)
    assert dm.stats["cut_to_max_length"] == 1
    dm = make_dm(char_tok, path, max_length=limit, overflow="drop")
    dm.setup()
    assert len(dm.train_set) == 1 and dm.stats["dropped_too_long"] == 1
    # a prompt that leaves no room for a single reply token is dropped even under truncate
    dm = make_dm(char_tok, path, max_length=length_of(tok, msgs("hi")) - 2)
    with pytest.raises(DataError, match="fewer than one batch"):
        dm.setup()


def test_turn_truncation_is_seeded_and_keeps_system(tiny_pretrain_ckpt):
    def train_rows(**kw) -> list[list[int]]:
        dm = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", val_share=0.05, **kw)
        dm.setup()
        return [dm.train_set[i]["input_ids"].tolist() for i in range(len(dm.train_set))], dm

    base, _ = train_rows()
    a, dm = train_rows(turn_truncation=0.5, seed=1337)
    b, _ = train_rows(turn_truncation=0.5, seed=1337)
    c, _ = train_rows(turn_truncation=0.5, seed=7)
    assert a == b and a != base and c != a
    assert 0 < dm.stats["turn_truncated"] < dm.stats["train_conversations"]
    # every changed row is a strict prefix of its full conversation, ending after an assistant turn
    tok = dm.tokenizer
    changed = [(x, y) for x, y in zip(a, base) if x != y]
    assert len(changed) == dm.stats["turn_truncated"]
    for short, full in changed:
        assert len(short) < len(full) and full[: len(short)] == short and short[-1] == tok.im_end_id


# ---- packing ----
def test_packing_keeps_labels_and_isolates_conversations(tiny_pretrain_ckpt):
    plain = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", max_length=128)
    packed = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", max_length=128, packing=True)
    plain.setup()
    packed.setup()
    assert len(packed.train_set) < 0.6 * len(plain.train_set)
    # the packed rows are the plain examples laid end to end, positions restarting at 0 for each conversation
    first = 0
    for r in range(len(packed.train_set)):
        row = packed.train_set[r]
        seg, pos = row["segment_ids"], row["position_ids"]
        assert len(row["input_ids"]) <= 128 and seg.unique().tolist() == list(range(1, int(seg.max()) + 1))
        for s in range(1, int(seg.max()) + 1):
            alone = plain.train_set[first + s - 1]
            assert row["input_ids"][seg == s].tolist() == alone["input_ids"].tolist()
            assert row["labels"][seg == s].tolist() == alone["labels"].tolist()
            assert pos[seg == s].tolist() == list(range(len(alone["input_ids"])))
        first += int(seg.max())
    assert first == len(plain.train_set)
    # logits of a packed row equal the logits of each conversation run alone: no attention across them
    r = next(r for r in range(len(packed.train_set)) if packed.train_set[r]["segment_ids"].max() >= 3)
    first = sum(int(packed.train_set[i]["segment_ids"].max()) for i in range(r))
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=packed.vocab_size)).eval()
    batch = collate([packed.train_set[r], packed.train_set[0]], pad_id=packed.tokenizer.pad_id)
    seg = batch["segment_ids"][0]
    with torch.no_grad():
        out = model(
            batch["input_ids"], position_ids=batch["position_ids"], attn_mask=segment_causal_mask(batch["segment_ids"])
        )
        for s in range(1, int(seg.max()) + 1):
            alone = model(plain.train_set[first + s - 1]["input_ids"][None]).logits[0]
            assert_close(out.logits[0][seg == s], alone, atol=1e-5, rtol=1e-4)
        # a plain causal pass over the same tokens differs: the comparison would catch attention leaking across
        leaky = model(batch["input_ids"]).logits[0]
        assert not torch.allclose(leaky[seg == 2], out.logits[0][seg == 2], atol=1e-3)


# ---- the stage module ----
class FirstStepProbe(Callback):
    """Records, before the first optimizer step, what the run starts from."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and not hasattr(self, "state"):
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.opt_state = dict(trainer.optimizers[0].state)
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def test_init_from_loads_weights_and_starts_fresh(tmp_path, tiny_pretrain_ckpt):
    dm = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", batch_size=4)
    model = SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3, warmup=10)
    probe = FirstStepProbe()
    trainer = micro_trainer(tmp_path, max_steps=2, callbacks=[probe], limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    pretrained = backbone_state(load_checkpoint(tiny_pretrain_ckpt)["state_dict"])
    for k, v in probe.state.items():
        assert_close(v, pretrained[k], atol=0, rtol=0)
    assert probe.opt_state == {}  # fresh AdamW: no moments carried over
    assert probe.lr == pytest.approx(1e-3 / 10)  # fresh schedule: first warmup step
    assert model.tokenizer.sha256 == dm.tokenizer.sha256
    assert model.hparams.learning_rate == 1e-3 and SFTModule(vocab_size=64).hparams.learning_rate == 5e-5


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_training_summary_counts_the_warnings_of_building_the_stage(tmp_path, tiny_pretrain_ckpt, monkeypatch):
    """The stage warns in its constructor that arch.n_layer is ignored with init_from, before fit starts, where
    TrainingSummary began counting: the summary said "warnings: 0" under that warning. It counts it now."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(SAMPLE)
    monkeypatch.chdir(tmp_path)
    ckpt = str(tiny_pretrain_ckpt)
    cli_main(
        ["fit", "--config", "configs/sft_tiny.yaml", f"--model.init_args.init_from={ckpt}",
         f"--data.init_args.tokenizer={ckpt}", "--model.init_args.arch.n_layer=3", "--trainer.max_steps=1",
         "--data.init_args.max_length=128", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]
    )  # fmt: skip
    summary = json.loads(next((tmp_path / "checkpoints" / "sft_tiny").glob("tb/version_*/summary.json")).read_text())
    ignored = [m for m in summary["warnings"]["distinct"] if "arch.n_layer=3 ignored" in m]
    assert ignored and summary["warnings"]["count"] >= 1, summary["warnings"]


def test_missing_pretrain_checkpoint_names_the_pretrain_command(tmp_path, char_tok):
    missing = str(tmp_path / "checkpoints" / "pretrain_tiny" / "last.ckpt")
    with pytest.raises(CheckpointError, match=PRETRAIN_CMD):
        SFTModule(init_from=missing)
    with pytest.raises(CheckpointError, match=PRETRAIN_CMD):
        _ = make_dm(missing, SAMPLE / "sft.jsonl").vocab_size
    with pytest.raises(DataError, match="set data.init_args.tokenizer to the model.init_args.init_from"):
        _ = SFTDataModule([str(SAMPLE / "sft.jsonl")]).vocab_size


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, tiny_pretrain_ckpt, char_tok):
    dm = make_dm(char_tok, SAMPLE / "sft.jsonl")  # not the pretrained model's tokenizer
    with pytest.raises(CheckpointError, match="set data.tokenizer"):
        SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)  # as the CLI link passes it
    model = SFTModule(init_from=str(tiny_pretrain_ckpt))
    with pytest.raises(CheckpointError, match="set data.tokenizer to that checkpoint"):
        micro_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_exact_resume_mid_epoch(tmp_path, tiny_pretrain_ckpt):
    """8 steps straight == 4 steps, then resume from the step-4 checkpoint for 4 more (same weights, same losses)."""

    def run(root: Path, ckpt_path: str | None = None) -> tuple[SFTModule, LossRecorder]:
        L.seed_everything(0)
        dm = make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", batch_size=8, val_share=0.05)
        model = SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size, learning_rate=1e-3)
        rec = LossRecorder()
        saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=4, save_top_k=-1)
        trainer = micro_trainer(root, max_steps=8, callbacks=[rec, saver], enable_checkpointing=True)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, rec

    straight, rec_a = run(tmp_path / "a")
    resumed, rec_b = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=4.ckpt"))
    assert len(rec_a.losses) == 8 and len(rec_b.losses) == 4
    assert rec_b.losses == rec_a.losses[4:]
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


# ---- the shipped configs through the real command ----
def clone_layout(root: Path) -> None:
    """A working directory laid out like a fresh clone: configs/ and data/sample/, no checkpoints."""
    (root / "data").mkdir()
    os.symlink(ROOT / "configs", root / "configs")
    os.symlink(SAMPLE, root / "data" / "sample")


def test_sft_tiny_on_a_fresh_clone_names_the_pretrain_command(tmp_path, monkeypatch, capsys):
    clone_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "configs/sft_tiny.yaml"])
    assert exit_info.value.code == 2
    assert PRETRAIN_CMD in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # sft_small parses (every key is a real argument)
        cli_main(["fit", "--config", "configs/sft_small.yaml", "--print_config"])
    assert exit_info.value.code == 0 and "SFTDataModule" in capsys.readouterr().out


def test_sft_tiny_config_runs_end_to_end(tmp_path, tiny_pretrain_ckpt):
    """The shipped config through the real entry point (micro pretrained checkpoint, a few steps)."""
    clone_layout(tmp_path)
    ckpt = str(tiny_pretrain_ckpt)
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "fit", "--config", "configs/sft_tiny.yaml"]
    cmd += ["--model.init_args.init_from", ckpt, "--data.init_args.tokenizer", ckpt]
    cmd += ["--data.init_args.max_length", "128"]  # the micro model's block_size
    cmd += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2"]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "checkpoints" / "sft_tiny"
    assert (out / "last.ckpt").is_file() and (out / "best.ckpt").is_file()
    last = load_checkpoint(out / "last.ckpt")
    assert last["minillm"]["stage"] == "sft" and last["global_step"] == 6
    saver = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saver["monitor"] == "val/loss" and torch.isfinite(saver["best_model_score"])
    stats = json.loads(next(out.glob("tb/version_*/dataset_stats.json")).read_text())["sft"]
    assert stats["packing"] is True and stats["train_conversations"] == 1140


def test_rows_longer_than_the_context_are_refused_before_encoding(tmp_path, tiny_pretrain_ckpt, monkeypatch):
    """max_length above the model's block_size is named first, not after encoding the corpus, and not hidden
    behind "fewer than one batch" (a batch larger than the packed rows)."""
    from minillm_lightning.errors import ConfigError

    dm = make_dm(
        tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", batch_size=10_000, max_length=4096, cache_dir=str(tmp_path / "c")
    )
    encoded = []
    monkeypatch.setattr(type(dm), "encode_items", lambda self, *a, **k: encoded.append(1))
    model = SFTModule(init_from=str(tiny_pretrain_ckpt), vocab_size=dm.vocab_size)
    wanted = r"length 4096 \(SFTDataModule.max_length\) exceeds the model context block_size=\d+; lower max_length"
    with pytest.raises(ConfigError, match=wanted):
        micro_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)
    assert encoded == []
    assert not (tmp_path / "c").exists()  # no token cache built first (prepare_data runs before setup)


@pytest.mark.parametrize("below", ["", "cache", "a/b"])
def test_cache_dir_that_is_or_lies_below_a_file_is_one_error(tmp_path, tiny_pretrain_ckpt, below):
    """mkdir of the token cache failed with a raw FileExistsError/NotADirectoryError at prepare time."""
    from minillm_lightning.errors import ConfigError

    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    folder = notes / below if below else notes
    with pytest.raises(ConfigError) as caught:
        make_dm(tiny_pretrain_ckpt, SAMPLE / "sft.jsonl", cache_dir=str(folder))
    expected = (
        f"SFTDataModule.cache_dir={folder}: {notes} is a file, not a folder, so cache_dir cannot be made"
        if below
        else f"SFTDataModule.cache_dir={notes} is a file, not a folder; set it to a folder for the token caches"
    )
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
@pytest.mark.parametrize("config", ["configs/sft_tiny.yaml", "configs/dpo_tiny.yaml", "configs/ppo_tiny.yaml"])
def test_chat_sources_take_one_path_or_a_list(tmp_path, monkeypatch, capsys, config):
    """`--data.init_args.test_sources data/x.jsonl` (one path, as `sources` in most examples) was refused with
    "expected list"; the chat data modules take one path or a list, and `+=` still appends."""
    import yaml

    clone_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", config, "--print_config", "--data.init_args.test_sources", "held.jsonl"]
    args += ["--data.init_args.val_sources", "[a.jsonl, b.jsonl]", "--data.init_args.sources+=extra.jsonl"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["test_sources"] == "held.jsonl" and data["val_sources"] == ["a.jsonl", "b.jsonl"]
    assert data["sources"][-1] == "extra.jsonl" and len(data["sources"]) >= 2
    dm = SFTDataModule(sources="x.jsonl", test_sources="held.jsonl", tokenizer=None)
    assert dm.sources == ["x.jsonl"] and dm.test_sources == ["held.jsonl"] and dm.val_sources == []
