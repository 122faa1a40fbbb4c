"""Bad records and bad text that used to end in a traceback from deep inside a library, or in a silently wrong result:
each is now one clear error naming the file, the line and the field (or, in `minillm chat`, one line and the next
prompt). All of them run without a trained checkpoint."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, MICRO_ARCH, user_error

from minillm_lightning import MiniGPTConfig, PreferenceDataModule, PromptDataModule, SFTDataModule
from minillm_lightning.commands import generate
from minillm_lightning.data.split import split_jsonl
from minillm_lightning.errors import DataError
from minillm_lightning.eval.tasks import ensure_files, load_task
from minillm_lightning.generation import TextGenerator
from minillm_lightning.model.gpt import MiniGPT
from minillm_lightning.tokenizer import Tokenizer, TokenizerSettings, train_or_load

NOT_UTF8 = "a\udcffb"  # how Python hands over the bytes b"a\xffb" from argv or stdin (surrogateescape)


def jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_and_log(tmp_path_factory) -> tuple[Tokenizer, list[str]]:
    """A BPE tokenizer trained on the small committed corpus with far more vocabulary asked than it yields, and
    the log of its training."""
    corpus = FIXTURES / "tokenizer_corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    log: list[str] = []
    path, _ = train_or_load(
        [corpus], texts, TokenizerSettings(vocab_size=60000), tmp_path_factory.mktemp("t"), log=log.append
    )
    return Tokenizer.from_file(path), log


# ---------------------------------------------------------------- chat records: wrongly typed fields


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
TURNS = "must be a string or a list of turns"
GOOD = {
    SFTDataModule: {"conversations": CHAT},
    PreferenceDataModule: {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    PromptDataModule: {"prompt": "2+2?"},
}


@pytest.mark.parametrize(
    "module, bad, message",
    [
        (PreferenceDataModule, {"prompt": "2+2?", "chosen": 4, "rejected": "5"}, f"'chosen' {TURNS}, got an int"),
        (PreferenceDataModule, {"prompt": "2+2?", "chosen": "4", "rejected": None}, f"'rejected' {TURNS}, got null"),
        (PreferenceDataModule, {**GOOD[PreferenceDataModule], "system": 5}, "field 'system' is an int, not a string"),
        (
            PreferenceDataModule,
            {"prompt": [CHAT[0]], "chosen": "a", "rejected": "b", "system": [1]},
            "field 'system' is a list",
        ),
        (SFTDataModule, {"instruction": "add", "input": 3, "output": "4"}, "field 'input' is an int, not a string"),
        (SFTDataModule, {**GOOD[SFTDataModule], "system": 5}, "field 'system' is an int, not a string"),
        (PromptDataModule, {"prompt": "hi", "system": 5}, "field 'system' is an int, not a string"),
        (PromptDataModule, {"instruction": "add", "input": 3}, "field 'input' is an int, not a string"),
        (PromptDataModule, {"prompt": 5}, "field 'prompt' is an int, not a string"),
        (PromptDataModule, {"prompt": None}, "field 'prompt' is null"),
    ],
)
def test_wrongly_typed_fields_name_the_line_and_can_be_skipped(module, bad, message, tmp_path: Path) -> None:
    alpaca = {"instruction": "add", **({"output": "4"} if module is SFTDataModule else {})}
    good = alpaca if "instruction" in bad else GOOD[module]  # the same schema
    path = jsonl(tmp_path / "data.jsonl", bad, good)  # the bad record first: it also decides the schema
    with pytest.raises(DataError) as exc:
        module([str(path)]).read()
    assert str(exc.value).startswith(f"{path}:1: {message}") and "skip_bad_records" in str(exc.value)
    items, stats = module([str(path)], skip_bad_records=True).read()
    assert len(items) == 1 and stats[str(path)]["skipped"] == {"missing field": 1}


def test_null_system_and_input_still_mean_none(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", {"instruction": "add", "input": None, "output": "4", "system": None})
    assert SFTDataModule([str(path)]).read()[0] == [
        [{"role": "user", "content": "add"}, {"role": "assistant", "content": "4"}]
    ]


# ---------------------------------------------------------------- text that is not UTF-8


def test_tokenizer_names_text_that_is_not_utf8(tokenizer_and_log) -> None:
    tok, _ = tokenizer_and_log
    for encode in (tok.encode, tok.encode_content):
        with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 0xff at character 2\)"):
            encode(NOT_UTF8)
    assert tok.decode(tok.encode_content("a b")) == "a b"


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path: Path, capfd) -> None:
    """Checked before the checkpoint loads (here it does not even exist)."""
    args = ["generate", "--checkpoint", str(tmp_path / "none.ckpt"), "--prompt", NOT_UTF8]
    line = user_error(args, capfd)
    assert line.startswith("error: --prompt is not valid UTF-8 (byte 0xff at character 2)")
    line = user_error([*args, "--prompt", "fine", "--system", "ok"], capfd)
    assert line.startswith("error: --prompt 1 is not valid UTF-8")


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(tokenizer_and_log, monkeypatch, capsys) -> None:
    tok, _ = tokenizer_and_log
    model = MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tok.vocab_size)).eval()
    monkeypatch.setattr(generate, "_load", lambda args: (TextGenerator(model, tok), "sft"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hi{NOT_UTF8} there\nhello\n"))
    generate.chat_main(["--checkpoint", "x.ckpt", "--max_new_tokens", "3", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert "error: the message is not valid UTF-8 (byte 0xff at character 4); send UTF-8 text" in err
    assert out.count("assistant: ") == 1  # the next message got its answer


# ---------------------------------------------------------------- minillm download --from


@pytest.mark.parametrize("value, what", [(5, "an int"), (None, "null")])
def test_download_hh_names_a_wrongly_typed_field(value, what, tmp_path: Path, capfd) -> None:
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    src = jsonl(tmp_path / "train.jsonl", good, {"chosen": value, "rejected": "x"})
    line = user_error(["download", "hh-rlhf", "--from", str(src), "--output", str(tmp_path / "out.jsonl")], capfd)
    assert (
        line
        == f"error: {src}:2: field 'chosen' is {what}, not a transcript string; expected HH-RLHF's train.jsonl(.gz)"
    )
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("minimind-sft", b"hello, not json\n", "garbage:1: not a JSON line (Expecting value)"),
        ("minimind-sft", b'\n{"conversations": []}\n{"text": "x"}\n', "garbage:3: field 'conversations' is missing"),
        ("minimind-pretrain", b'{"text": 5}\n', "garbage:1: field 'text' is an int, not a string"),
        ("minimind-dpo", b'{"chosen": [], "rejected": null}\n', "garbage:1: field 'rejected' is null, not a list"),
        (
            "alpaca",
            b'[\n{"instruction": "a", "output": "b"},\n [1]]',
            "garbage:3: a record is a list, not a JSON object",
        ),
        ("alpaca", b'{"instruction": "a", "output": "b"}', "garbage:1: not a JSON array of records"),
        ("tinyshakespeare", b"First Citizen:\nbad \xff byte\n", "garbage:2: not valid UTF-8 (invalid start byte"),
    ],
)
def test_download_checks_a_copied_corpus_format(name, content, message, tmp_path: Path, capfd) -> None:
    (tmp_path / "garbage").write_bytes(content)
    out = tmp_path / "out"
    line = user_error(["download", name, "--from", str(tmp_path / "garbage"), "--output", str(out)], capfd)
    assert line.startswith(f"error: --from {tmp_path / message}") and "; expected " in line
    assert not out.exists()


def test_download_reads_only_a_sample_of_a_large_corpus(tmp_path: Path) -> None:
    """Records that do not fit the sample whole are not judged by it, nor is anything after it."""
    from minillm_lightning.commands.download import SAMPLE_BYTES, fetch

    big = {"instruction": "x" * (SAMPLE_BYTES // 3), "input": "", "output": "hi"}  # the third one is cut
    for name, text in [
        ("alpaca", json.dumps([big] * 6) + "[not json"),
        ("minimind-pretrain", "".join(json.dumps({"text": big["instruction"]}) + "\n" for _ in range(6)) + "[1]\n"),
    ]:
        src = tmp_path / f"{name}.src"
        src.write_text(text, encoding="utf-8")
        assert fetch(name, tmp_path / name, src, log=lambda *_: None).read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- minillm prepare --config


@pytest.mark.parametrize(
    "content, message",
    [
        (b"data:\n  a: [1, 2\n b: 3\n", "not valid YAML at line 3, column 3"),
        (b"- data\n- model\n", "holds a list, not a mapping"),
        ('data:\n  x: "café"\n'.encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_prepare_names_a_broken_config(content, message, tmp_path: Path, capfd) -> None:
    config = tmp_path / "broken.yaml"
    config.write_bytes(content)
    assert user_error(["prepare", "--config", str(config)], capfd).startswith(f"error: --config {config}")
    assert message in user_error(["prepare", "--config", str(config)], capfd)


# ---------------------------------------------------------------- the real-data split


def test_split_requires_json_objects_and_names_the_source_line(tmp_path: Path) -> None:
    (tmp_path / "pretrain").mkdir()
    src = jsonl(tmp_path / "pretrain" / "a.jsonl", {"text": "x"}, {"text": "y"}, [1])
    with pytest.raises(DataError) as exc:
        split_jsonl(str(src), tmp_path / "out")
    assert str(exc.value).startswith(f"{src}:3: malformed JSON line (expected a JSON object, got list)")


# ---------------------------------------------------------------- evaluation task files


def lambada(root: Path, content: bytes) -> Path:
    path = root / "lambada" / "lambada_test.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def test_eval_task_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    lambada(tmp_path, b"\xef\xbb\xbf" + b'{"text": "the cat sat on the mat"}\r\n')
    docs = load_task("lambada", tmp_path)
    assert [(d.context, d.target) for d in docs] == [("the cat sat on the", " mat")]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"text": 5}, "(TypeError): field 'text' is an int, not a string"),
        ({"txt": "a b"}, "(KeyError: 'text'): field 'text' is missing"),
        ([1], "(TypeError): the record is a list, not a JSON object"),
        ({"text": "oneword"}, "(ValueError): field 'text' has no space before a last word"),
    ],
)
def test_eval_task_field_errors_name_the_line_and_the_field(record, problem, tmp_path: Path) -> None:
    path = lambada(tmp_path, (json.dumps({"text": "a fine line"}) + "\n" + json.dumps(record) + "\n").encode())
    with pytest.raises(DataError) as exc:
        load_task("lambada", tmp_path)
    assert str(exc.value) == (
        f"task lambada: {path}:2 is not in the expected format {problem}; delete the file so that minillm eval "
        f"downloads it again"
    )


def test_eval_choice_task_labels_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "hellaswag" / "hellaswag_val_1000.jsonl"
    path.parent.mkdir()
    row = {"activity_label": "A", "ctx": "A man sits. he", "endings": ["x", "y"], "label": "two"}
    jsonl(path, row)
    with pytest.raises(
        DataError,
        match=re.escape(f"{path}:1 is not in the expected format (ValueError): field 'label' is 'two', not a number"),
    ):
        load_task("hellaswag", tmp_path)


def test_eval_task_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "lambada" / "lambada_test.jsonl").mkdir(parents=True)
    with pytest.raises(DataError, match=r"lambada_test.jsonl is a directory, not the task's file"):
        ensure_files("lambada", tmp_path, download=False)


# ---------------------------------------------------------------- tokenizer training log


def test_training_log_gives_the_real_vocabulary_size(tokenizer_and_log) -> None:
    tok, log = tokenizer_and_log
    assert tok.vocab_size < 60000
    assert re.fullmatch(rf"trained bpe tokenizer \(vocab {tok.vocab_size} of 60000 requested\) in [\d.]+s", log[-1])
