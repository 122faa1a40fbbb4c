"""`minillm download`: conversions run offline on local copies."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import FIXTURES, real_data_path

from minillm_lightning.commands.download import CORPORA, fetch, parse_hh_dialogue
from minillm_lightning.errors import MiniLLMError

HH = [
    {
        "chosen": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: And 3 plus 3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: And 3 plus 3?\n\nAssistant: 7.",
    },
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
    {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    {"chosen": "no speaker tags at all", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
]


def test_parse_hh_dialogue() -> None:
    msgs = parse_hh_dialogue(HH[0]["chosen"])
    assert msgs == [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6."},
    ]
    with pytest.raises(ValueError):
        parse_hh_dialogue("\n\nHuman: unanswered")


def test_hh_conversion_keeps_only_usable_pairs(tmp_path: Path) -> None:
    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in HH)
    out = fetch("hh-rlhf", tmp_path / "hh.jsonl", source=src, log=lambda *_: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1  # identical pair, different prompts and an unparsable transcript are skipped
    assert rows[0]["chosen"][:-1] == rows[0]["rejected"][:-1]
    assert rows[0]["rejected"][-1] == {"role": "assistant", "content": "7."}


def test_copy_corpus_from_local_file(tmp_path: Path) -> None:
    """``--from`` copies a plain-text corpus byte for byte (no network)."""
    src = FIXTURES / "tokenizer_corpus.jsonl"
    out = fetch("tinyshakespeare", tmp_path / "input.txt", src, lambda *_: None)
    assert out.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(MiniLLMError, match="unknown corpus"):
        fetch("nope", tmp_path / "x")
    assert {"tinyshakespeare", "alpaca", "hh-rlhf", "minimind-pretrain", "minimind-sft", "minimind-dpo"} <= set(CORPORA)


def test_copy_the_real_tinyshakespeare(tmp_path: Path) -> None:
    out = fetch("tinyshakespeare", tmp_path / "input.txt", real_data_path("tinyshakespeare", "input.txt"), print)
    assert out.stat().st_size == 1_115_394
