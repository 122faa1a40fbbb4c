"""PretrainDataModule: sampling, validation split, token cache, stats and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, SHARED_DATA

from minillm_lightning import PretrainDataModule
from minillm_lightning.data.common import ResumableSampler
from minillm_lightning.errors import DataError, MiniLLMError


def _dm(tmp_path: Path, sources, **kw) -> PretrainDataModule:
    args = dict(sources=sources, seq_len=32, batch_size=2, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    return PretrainDataModule(**{**args, **kw})


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def test_sampling_ratios_val_share_and_stats(tmp_path) -> None:
    en, zh = SHARED_DATA / "pretrain" / "pretrain_en.jsonl", SHARED_DATA / "pretrain" / "pretrain_zh.jsonl"
    dm = _dm(
        tmp_path,
        [{"path": str(en)}, {"path": str(zh), "sample_ratio": 0.1, "val_share": 0.2}],
        val_share=0.1,
        vocab_size=4096,
    )
    train, val, stats = dm.documents()
    s_en, s_zh = stats[str(en)], stats[str(zh)]
    assert s_en["raw_records"] == 330 and s_zh["raw_records"] == 2313
    assert s_en["sampled"] == 330 and s_en["val_docs"] == 33
    assert s_zh["sampled"] == round(2313 * 0.1) and s_zh["val_docs"] == round(s_zh["sampled"] * 0.2)
    assert len(train) + len(val) == s_en["sampled"] + s_zh["sampled"]
    assert not {t for _, t in train} & {t for _, t in val}  # no document in both splits
    dm.setup("fit")
    assert dm.stats["tokens_per_source"][str(en)] > 0
    assert dm.stats["train_tokens"] == len(dm.train_set.tokens)


def test_token_cache_is_memory_mapped_and_reused(tmp_path) -> None:
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}])
    dm.setup("fit")
    assert isinstance(dm.train_set.tokens, np.memmap)
    first = dm._cache_paths()["train"]
    mtime = first.stat().st_mtime_ns
    again = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}])
    again.setup("fit")
    assert again._cache_paths()["train"] == first and first.stat().st_mtime_ns == mtime
    item = dm.train_set[3]
    assert item["input_ids"].shape == (32,)
    assert (item["labels"][:-1] == item["input_ids"][1:]).all()  # labels are the next tokens


def test_txt_file_tail_is_validation(tmp_path) -> None:
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()
    dm = _dm(tmp_path, [{"path": str(SHARED_DATA / "tinyshakespeare" / "input.txt")}], val_share=0.1)
    train, val, _ = dm.documents()
    cut = int(len(text) * 0.9)
    assert train[0][1] == text[:cut] and val[0][1] == text[cut:]


def test_source_sampled_to_zero_warns_loudly(tmp_path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"document number {i} " * 20} for i in range(50)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "tiny"}])
    dm = _dm(tmp_path, [{"path": str(a)}, {"path": str(b), "sample_ratio": 0.0}])
    with pytest.warns(UserWarning, match="contributes NOTHING"):
        dm.documents()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:2: malformed JSON line"),
        ([{"text": "ok"}, {"body": "wrong field"}], r"bad\.jsonl:2: field 'text' is missing"),
        ([{"text": "ok"}, {"text": 42}], r"bad\.jsonl:2: field 'text' is a int, not a string"),
        (['["a", "list"]'], r"bad\.jsonl:1: malformed JSON line \(expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, rows, message) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        _dm(tmp_path, [{"path": str(bad)}]).documents()


def test_skip_bad_records_counts_them(tmp_path) -> None:
    good = [{"text": f"a perfectly fine document {i} " * 10} for i in range(20)]
    bad = _jsonl(tmp_path / "mixed.jsonl", [*good, '{"text": "broken', {"body": "x"}, {"text": ""}])
    dm = _dm(tmp_path, [{"path": str(bad)}], skip_bad_records=True)
    _, _, stats = dm.documents()
    assert stats[str(bad)]["raw_records"] == 22
    assert stats[str(bad)]["skipped"] == {"malformed JSON": 1, "field 'text' missing": 1, "empty text": 1}


def test_empty_glob_empty_corpus_and_not_utf8(tmp_path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        _dm(tmp_path, [{"path": str(tmp_path / "nothing" / "*.jsonl")}]).documents()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        _dm(tmp_path, [{"path": str(empty)}]).documents()
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"text": "中文"}, ensure_ascii=False).encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"gbk\.jsonl:1: not valid UTF-8"):
        _dm(tmp_path, [{"path": str(gbk)}]).documents()


def test_multi_megabyte_line_is_read(tmp_path) -> None:
    big = _jsonl(tmp_path / "big.jsonl", [{"text": "word " * 600_000}, {"text": "small doc " * 50}])
    train, val, stats = _dm(tmp_path, [{"path": str(big)}], val_share=0.0).documents()
    assert stats[str(big)]["raw_records"] == 2 and max(len(t) for _, t in train) == 3_000_000


def test_vocab_too_small_for_the_characters_is_explained(tmp_path) -> None:
    dm = _dm(tmp_path, [{"path": str(SHARED_DATA / "pretrain" / "pretrain_zh.jsonl")}], vocab_size=300)
    with pytest.raises(MiniLLMError, match="raise vocab_size or lower character_coverage"):
        _ = dm.tokenizer


def test_bad_sizes_are_refused(tmp_path) -> None:
    src = [{"path": str(SAMPLE / "pretrain.jsonl")}]
    for kw, field in [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"val_share": 1.5}, "val_share"),
    ]:
        with pytest.raises(ValueError, match=field):
            _dm(tmp_path, src, **kw)
    with pytest.raises(DataError, match="sources"):
        _dm(tmp_path, [])


def test_too_little_data_for_one_batch(tmp_path) -> None:
    small = _jsonl(tmp_path / "s.jsonl", [{"text": f"short text {i}"} for i in range(10)])
    dm = _dm(tmp_path, [{"path": str(small)}], seq_len=256, batch_size=64, vocab_size=300)
    with pytest.raises(DataError, match="fewer than one batch"):
        dm.setup("fit")


def test_sampler_shards_without_overlap_and_resumes_across_world_sizes() -> None:
    """Two ranks see disjoint halves; resuming after 10 global samples with 3 ranks skips exactly them."""
    full = list(ResumableSampler(40, 1, 0, seed=5))
    r0, r1 = list(ResumableSampler(40, 2, 0, seed=5)), list(ResumableSampler(40, 2, 1, seed=5))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(full)
    seen = full[:10]
    rest = []
    for rank in range(3):
        s = ResumableSampler(40, 3, rank, seed=5)
        s.start = 10
        rest += list(s)
    assert not set(rest) & set(seen) and len(rest) == 30
