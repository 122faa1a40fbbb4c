"""split_jsonl: deterministic, disjoint train/val/test files and a hash-chosen slice, streamed."""

from __future__ import annotations

import json

import pytest

from minillm_lightning.data.split import finished_split, split_jsonl
from minillm_lightning.errors import DataError


def _corpus(path, n: int, start: int = 0):
    path.write_text(
        "".join(json.dumps({"text": f"document number {i} " + "x" * (i % 50)}) + "\n" for i in range(start, n))
    )
    return path


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_split_is_disjoint_complete_and_near_the_shares(tmp_path) -> None:
    src = _corpus(tmp_path / "a.jsonl", 4000)
    report = split_jsonl(str(src), tmp_path / "out", val_share=0.1, test_share=0.05)
    parts = {s: _lines(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(_lines(src))  # every record once, none twice
    assert report.records == {s: len(v) for s, v in parts.items()}
    # binomial(4000, p): 5 standard deviations either side
    assert abs(len(parts["val"]) - 400) < 5 * (4000 * 0.1 * 0.9) ** 0.5
    assert abs(len(parts["test"]) - 200) < 5 * (4000 * 0.05 * 0.95) ** 0.5
    assert finished_split(tmp_path / "out")["test_share"] == 0.05


def test_split_depends_on_the_record_not_its_position(tmp_path) -> None:
    """The same records in other files and another order land in the same splits."""
    one = _corpus(tmp_path / "one.jsonl", 1000)
    split_jsonl(str(one), tmp_path / "a", 0.1, 0.1)
    lines = _lines(one)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x.jsonl").write_text("\n".join(lines[500:][::-1]) + "\n")
    (tmp_path / "two" / "y.jsonl").write_text("\n".join(lines[:500]) + "\n")
    split_jsonl(str(tmp_path / "two" / "*.jsonl"), tmp_path / "b", 0.1, 0.1)
    for s in ("train", "val", "test"):
        assert set(_lines(tmp_path / "a" / f"{s}.jsonl")) == set(_lines(tmp_path / "b" / f"{s}.jsonl"))


def test_budget_keeps_a_proportional_slice(tmp_path) -> None:
    src = _corpus(tmp_path / "a.jsonl", 5000)
    size = src.stat().st_size
    report = split_jsonl(str(src), tmp_path / "out", 0.0, 0.1, budget_bytes=size // 4)
    kept = sum(report.bytes.values())
    assert report.keep_share == pytest.approx(0.25, rel=1e-3)
    assert 0.2 * size < kept < 0.3 * size
    full = split_jsonl(str(src), tmp_path / "full", 0.0, 0.1)
    # the slice's test records are exactly the full split's test records that the slice kept
    sliced_test = set(_lines(tmp_path / "out" / "test.jsonl"))
    assert sliced_test <= set(_lines(tmp_path / "full" / "test.jsonl")) and full.keep_share == 1.0


def test_bom_crlf_and_blank_lines(tmp_path) -> None:
    src = tmp_path / "win.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    report = split_jsonl(str(src), tmp_path / "out", 0.0, 0.0)
    assert report.records["train"] == 2
    assert [json.loads(x)["text"] for x in _lines(tmp_path / "out" / "train.jsonl")] == ["a", "b"]


def test_errors_name_the_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        split_jsonl(str(bad), tmp_path / "out")
    assert finished_split(tmp_path / "out") is None  # an interrupted split is not taken as finished
    with pytest.raises(DataError, match="matches no file"):
        split_jsonl(str(tmp_path / "missing" / "*.jsonl"), tmp_path / "out2")
    with pytest.raises(DataError, match="sum below 1"):
        split_jsonl(str(bad), tmp_path / "out3", val_share=0.6, test_share=0.5)
