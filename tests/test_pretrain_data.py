"""PretrainDataModule on LitData: sampling and splits, the prepared directory (reuse, hash key, interrupted
preparation), lazy reading, held-out val/test files, long documents, windows and exact resume of the loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE, real_data_path, user_error
from test_cli import minillm, workdir  # noqa: F401  (fixture re-used)

from minillm_lightning import PretrainDataModule
from minillm_lightning.data import shards
from minillm_lightning.data.common import ResumableSampler
from minillm_lightning.errors import ConfigError, DataError, MiniLLMError
from minillm_lightning.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, split_long


def _dm(tmp_path: Path, sources, **kw) -> PretrainDataModule:
    args = dict(
        sources=sources, seq_len=32, batch_size=2, vocab_size=512, cache_dir=str(tmp_path / "cache"), prepare_workers=1
    )
    return PretrainDataModule(**{**args, **kw})


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def _docs(n: int, words: int = 30, tag: str = "doc") -> list[dict]:
    return [{"text": " ".join(f"{tag}{i} word{j % 17} and more text {j}" for j in range(words))} for i in range(n)]


def _index_tokens(split_dir: Path) -> int:
    return sum(c["dim"] for c in json.loads((split_dir / "index.json").read_text())["chunks"])


def test_sampling_ratios_val_share_and_stats(tmp_path) -> None:
    en, zh = real_data_path("pretrain", "pretrain_en.jsonl"), real_data_path("pretrain", "pretrain_zh.jsonl")
    dm = _dm(
        tmp_path,
        [{"path": str(en)}, {"path": str(zh), "sample_ratio": 0.1, "val_share": 0.2}],
        val_share=0.1,
        vocab_size=4096,
    )
    dm.setup("fit")
    s_en, s_zh = dm.stats["sources"][str(en)], dm.stats["sources"][str(zh)]
    assert s_en["raw_records"] == 330 and s_zh["raw_records"] == 2313
    assert s_en["sampled"] == 330 and s_en["val_docs"] == 33
    assert s_zh["sampled"] == round(2313 * 0.1) and s_zh["val_docs"] == round(s_zh["sampled"] * 0.2)
    train = [t for _, t in dm.iter_documents("train")]
    val = [t for _, t in dm.iter_documents("val")]
    assert len(train) + len(val) == s_en["sampled"] + s_zh["sampled"]
    assert not set(train) & set(val)  # no document in both splits
    assert dm.stats["tokens_per_source"][str(en)] > 0
    root = Path(dm.stats["dataset_dir"])
    assert dm.stats["train_tokens"] == _index_tokens(root / "train")
    # the shards hold exactly the tokenized documents, each followed by EOS
    expected = sum(len(ids) + 1 for ids in dm.tokenizer.encode_batch(val))
    assert dm.stats["val_tokens"] == _index_tokens(root / "val") == expected


def test_prepared_dir_is_reused_and_keyed_by_content(tmp_path) -> None:
    corpus = _jsonl(tmp_path / "c.jsonl", _docs(60))
    dm = _dm(tmp_path, [{"path": str(corpus)}])
    assert not dm.is_prepared()
    dm.setup("fit")
    root = Path(dm.dataset_path)
    assert dm.is_prepared() and root.parent == tmp_path / "cache" / "tokens"
    assert (root / "meta.json").is_file() and (root / "tokenizer.model").is_file()
    stamp = (root / "meta.json").stat().st_mtime_ns
    item = dm.train_set[3]
    assert item["input_ids"].shape == (32,)
    assert (item["labels"][:-1] == item["input_ids"][1:]).all()  # labels are the next tokens

    again = _dm(tmp_path, [{"path": str(corpus)}], seq_len=16, batch_size=4)  # windows are not part of the key
    assert again.is_prepared() and again.dataset_path == str(root)
    again.setup("fit")
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # used, not rebuilt
    assert again.tokenizer.sha256 == dm.tokenizer.sha256

    other_ratio = _dm(tmp_path, [{"path": str(corpus)}], sample_ratio=0.5)
    assert other_ratio.dataset_path != str(root)
    _jsonl(corpus, _docs(60, tag="changed"))  # same name, new content
    changed = _dm(tmp_path, [{"path": str(corpus)}])
    assert changed.dataset_path != str(root) and not changed.is_prepared()

    pinned = _dm(tmp_path, [], dataset_dir=str(root))  # a pinned prepared dir needs no sources at all
    pinned.setup("fit")
    assert pinned.tokenizer.sha256 == dm.tokenizer.sha256 and pinned.stats["train_tokens"] == dm.stats["train_tokens"]


def test_interrupted_preparation_is_not_taken_as_complete(tmp_path, monkeypatch) -> None:
    corpus = _jsonl(tmp_path / "c.jsonl", _docs(60))
    real_write = shards.write_split
    calls = []

    def dies_on_val(tasks, out_dir, job, workers, chunk_tokens):
        calls.append(out_dir.name)
        if out_dir.name == "val":  # the train split is written, then the process is interrupted
            raise KeyboardInterrupt
        return real_write(tasks, out_dir, job, workers, chunk_tokens)

    import minillm_lightning.data.pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "write_split", dies_on_val)
    dm = _dm(tmp_path, [{"path": str(corpus)}])
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert calls == ["train", "val"]
    assert not Path(dm.dataset_path).exists() and not dm.is_prepared()
    assert not list(Path(dm.dataset_path).parent.glob(".*.tmp-*"))  # the half-written folder is removed
    monkeypatch.undo()

    # a stale folder under the final name without meta.json (e.g. copied half-way) is not complete either
    Path(dm.dataset_path, "train").mkdir(parents=True)
    fresh = _dm(tmp_path, [{"path": str(corpus)}])
    assert not fresh.is_prepared()
    fresh.setup("fit")
    assert fresh.is_prepared() and fresh.stats["train_tokens"] > 0 and fresh.stats["val_tokens"] > 0


def test_documents_are_read_lazily(tmp_path) -> None:
    """The reader streams: the first document arrives before the broken last line is ever read."""
    rows = [*_docs(200), '{"text": "broken']
    corpus = _jsonl(tmp_path / "c.jsonl", rows)
    dm = _dm(tmp_path, [{"path": str(corpus)}], val_share=0.0)
    docs = dm.iter_documents("train")
    first = next(docs)
    assert first[0] == str(corpus) and first[1].startswith("doc")
    with pytest.raises(DataError, match=r"c\.jsonl:201: malformed JSON line"):
        list(docs)


def test_tokenizer_sample_is_bounded(tmp_path) -> None:
    corpus = _jsonl(tmp_path / "c.jsonl", _docs(2000))  # ~1.7 MB
    dm = _dm(tmp_path, [{"path": str(corpus)}], tokenizer_sample_bytes=200_000, val_share=0.0)
    total = corpus.stat().st_size
    sample = sum(len(t.encode()) for t in dm._tokenizer_sample())
    assert 100_000 < sample < 300_000 < total
    full = _dm(tmp_path, [{"path": str(corpus)}], val_share=0.0)  # budget above the corpus: everything
    assert sum(1 for _ in full._tokenizer_sample()) == 2000


def test_val_and_test_sources(tmp_path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", _docs(80, tag="train"))
    val = _jsonl(tmp_path / "val.jsonl", _docs(10, tag="val"))
    test = _jsonl(tmp_path / "test.jsonl", _docs(12, tag="test"))
    dm = _dm(
        tmp_path,
        [{"path": str(train), "val_share": 0.5}],  # ignored: explicit validation files replace the share
        val_sources=[{"path": str(val)}],
        test_sources=[{"path": str(test)}],
    )
    assert all(t.startswith("train") for _, t in dm.iter_documents("train"))
    assert sum(1 for _ in dm.iter_documents("train")) == 80
    assert sorted(src for src, _ in dm.iter_documents("val")) == [str(val)] * 10
    test_texts = [t for _, t in dm.iter_documents("test")]
    assert len(test_texts) == 12 and all(t.startswith("test") for t in test_texts)
    dm.setup("test")
    assert dm.val_set is not None and dm.test_set is not None
    n_tokens = sum(len(ids) + 1 for ids in dm.tokenizer.encode_batch(test_texts))
    assert dm.stats["test_tokens"] == n_tokens
    assert dm.test_bytes_per_token == pytest.approx(sum(len(t.encode()) for t in test_texts) / n_tokens)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape == (2, 32)
    val_only = _dm(tmp_path, [{"path": str(train)}])  # no test files: `test` scores the validation split, loudly
    val_only.setup("test")
    with pytest.warns(UserWarning, match="scores the VALIDATION split"):
        assert next(iter(val_only.test_dataloader()))["input_ids"].shape == (2, 32)
    val_text = [t for _, t in val_only.iter_documents("val")]
    assert val_only.test_bytes_per_token == pytest.approx(
        sum(len(t.encode()) for t in val_text) / val_only.stats["val_tokens"]
    )
    neither = _dm(tmp_path, [{"path": str(train)}], val_share=0.0)
    neither.setup("fit")
    with pytest.raises(DataError, match="no test split: set data.init_args.test_sources"):
        neither.test_dataloader()


def test_txt_file_tail_is_validation(tmp_path) -> None:
    text = "".join(f"Line {i}: some words of a play, spoken aloud.\n" for i in range(3000))
    path = tmp_path / "play.txt"
    path.write_text(text)
    dm = _dm(tmp_path, [{"path": str(path)}], val_share=0.1)
    cut = int(len(text) * 0.9)
    assert "".join(t for _, t in dm.iter_documents("train")) == text[:cut]
    assert "".join(t for _, t in dm.iter_documents("val")) == text[cut:]


def test_stride_windows_match_the_token_stream(tmp_path) -> None:
    """block_stride=1 (the character recipes): window i is tokens [i, i + seq_len] of the training text."""
    text = "".join(f"line {i} of a small text file\n" for i in range(400))
    path = tmp_path / "small.txt"
    path.write_text(text)
    kw = dict(val_share=0.1, tokenizer_type="char", vocab_size=64, character_coverage=1.0, seq_len=16)
    dm = _dm(tmp_path, [{"path": str(path)}], block_stride=1, **kw)
    dm.setup("fit")
    cut = int(len(text) * 0.9)
    stream = torch.tensor([*dm.tokenizer.encode(text[:cut]), dm.tokenizer.eos_id])
    assert dm.stats["train_tokens"] == len(stream)
    assert dm.stats["train_blocks"] == len(stream) - 16  # one window per start offset
    for i in (0, 1, 7, len(stream) - 17):
        item = dm.train_set[i]
        assert torch.equal(item["input_ids"], stream[i : i + 16]) and torch.equal(
            item["labels"], stream[i + 1 : i + 17]
        )
    disjoint = _dm(tmp_path, [{"path": str(path)}], **kw)  # default stride seq_len: every token a target once
    disjoint.setup("fit")
    assert disjoint.stats["train_blocks"] == (len(stream) - 17) // 16 + 1
    assert torch.equal(disjoint.train_set[2]["input_ids"], stream[32:48])


def test_window_order_is_litdatas_own(tmp_path) -> None:
    """TokenBlocks takes its next window index from an O(1) queue instead of LitData's ``list.pop(0)``: the
    shuffled order of windows is still exactly the order LitData's own StreamingDataset yields with the same
    loader and seed (the reference), over two epochs."""
    from litdata import StreamingDataset

    text = "".join(f"line {i} of a small text file\n" for i in range(300))
    (tmp_path / "small.txt").write_text(text)
    kw = dict(val_share=0.1, tokenizer_type="char", vocab_size=64, character_coverage=1.0, seq_len=16)
    dm = _dm(tmp_path, [{"path": str(tmp_path / "small.txt")}], block_stride=1, **kw)
    dm.setup("fit")
    train_dir = f"{dm.dataset_path.rstrip('/')}/train"
    ours = shards.TokenBlocks(train_dir, 16, 1, shuffle=True, seed=7)
    reference = StreamingDataset(train_dir, item_loader=shards.BlockLoader(17, 1), shuffle=True, seed=7)
    for _ in range(2):
        got = [item["input_ids"].tolist() for item in ours]
        want = [np.asarray(window, dtype=np.int64)[:-1].tolist() for window in reference]
        assert len(got) == dm.stats["train_blocks"] > 100
        assert got == want
    assert isinstance(ours.current_indexes, shards._IndexQueue)
    queue = shards._IndexQueue([5, 3, 9])
    assert [queue.pop(0), len(queue), queue.pop(0), queue.pop(0), len(queue)] == [5, 2, 3, 9, 0]
    with pytest.raises(IndexError):
        queue.pop(0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_exactly_mid_epoch(tmp_path, num_workers: int) -> None:
    """Batches after a restored loader state are the batches an uninterrupted loader yields next, also across the
    epoch boundary (the state is what training consumed, not what the loader prefetched)."""
    corpus = _jsonl(tmp_path / "c.jsonl", _docs(120))
    dm = _dm(tmp_path, [{"path": str(corpus)}], batch_size=4, num_workers=num_workers)
    dm.setup("fit")
    consumed = {"n": 0}

    def epochs(loader, n_epochs: int):
        out = []
        for _ in range(n_epochs):
            consumed["n"] = 0
            for batch in loader:
                consumed["n"] += 1
                out.append(batch["input_ids"])
                if consumed["n"] == per_epoch:
                    break  # Lightning stops after len(loader) batches
        return out

    straight = shards.ResumableStreamingLoader(
        dm.train_set, lambda: consumed["n"], batch_size=4, drop_last=True, num_workers=num_workers
    )
    per_epoch = len(straight)
    assert per_epoch >= 4
    expected = epochs(straight, 2)
    assert not torch.equal(expected[0], expected[per_epoch])  # epoch 2 is reshuffled

    stop = per_epoch // 2 + 1
    first = shards.ResumableStreamingLoader(
        dm.train_set, lambda: consumed["n"], batch_size=4, drop_last=True, num_workers=num_workers
    )
    consumed["n"] = 0
    it = iter(first)
    for _ in range(stop + 1):  # one batch more than training consumed: prefetched, must not count
        next(it)
    consumed["n"] = stop
    state = first.state_dict()
    del it

    again = _dm(tmp_path, [{"path": str(corpus)}], batch_size=4, num_workers=num_workers)
    again.setup("fit")
    resumed = shards.ResumableStreamingLoader(
        again.train_set, lambda: consumed["n"], batch_size=4, drop_last=True, num_workers=num_workers
    )
    resumed.load_state_dict(state)
    rest = []
    consumed["n"] = stop
    for batch in resumed:
        consumed["n"] += 1
        rest.append(batch["input_ids"])
        if consumed["n"] == per_epoch:
            break
    rest += epochs(resumed, 1)
    assert len(rest) == len(expected) - stop
    for a, b in zip(rest, expected[stop:]):
        assert torch.equal(a, b)


def test_long_single_line_documents_train_the_tokenizer(tmp_path) -> None:
    """A book per JSON line (multi-megabyte lines): SentencePiece would drop every such line and fail."""
    sentence = "The old ship sailed on through the long grey night. 船在夜里继续航行。 "
    books = [{"text": f"Book {b}. " + sentence * (2_000_000 // len(sentence))} for b in range(3)]
    corpus = _jsonl(tmp_path / "books.jsonl", books)
    dm = _dm(tmp_path, [{"path": str(corpus)}], vocab_size=400, val_share=0.0, tokenizer_sample_bytes=1_000_000)
    tok = dm.tokenizer
    ids = tok.encode(sentence)
    assert tok.decode(ids) == sentence and len(ids) < len(sentence) / 2  # merges were learned
    dm.setup("fit")
    assert dm.stats["train_tokens"] > 3 * 1_000_000 // 4


def test_split_long_keeps_every_character_within_the_limit() -> None:
    line = ("word " * 30 + "end. ") * 3000 + "x" * 100_000  # sentences, then a run with no break at all
    pieces = list(split_long(line))
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces) and len(pieces) > 3
    assert list(split_long("short line")) == ["short line"]


def test_fit_on_book_per_line_corpus_trains(workdir) -> None:  # noqa: F811
    """`minillm fit` on a corpus of multi-megabyte single-line documents trains without a traceback."""
    sentence = "It was a bright cold day in April, and the clocks were striking thirteen. "
    rows = [{"text": f"Volume {b}. " + sentence * (2_200_000 // len(sentence))} for b in range(2)]
    _jsonl(workdir / "books.jsonl", rows)
    args = [
        "fit",
        "--config",
        "configs/pretrain_tiny.yaml",
        "--data.init_args.sources=[{path: books.jsonl}]",
        "--data.init_args.vocab_size=300",
        "--data.init_args.tokenizer_sample_bytes=1000000",  # below one document: pieces of it are sampled
        "--data.init_args.seq_len=64",
        "--data.init_args.prepare_workers=1",
        "--model.init_args.arch.n_layer=2",
        "--model.init_args.arch.dim=64",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    r = minillm(args, workdir, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "sentences_.empty" not in out
    assert torch.load(workdir / "checkpoints" / "pretrain_tiny" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_source_sampled_to_zero_warns_loudly(tmp_path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"document number {i} " * 20} for i in range(50)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "tiny"}])
    dm = _dm(tmp_path, [{"path": str(a)}, {"path": str(b), "sample_ratio": 0.0}])
    with pytest.warns(UserWarning, match="contributes NOTHING"):
        dm._check_plan()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:2: malformed JSON line"),
        ([{"text": "ok"}, {"body": "wrong field"}], r"bad\.jsonl:2: field 'text' is missing"),
        ([{"text": "ok"}, {"text": 42}], r"bad\.jsonl:2: field 'text' is an int, not a string"),
        ([{"text": "ok"}, {"text": None}], r"bad\.jsonl:2: field 'text' is null; fix the record or skip_bad"),
        (['["a", "list"]', '{"text": "ok"}'], r"bad\.jsonl:1: malformed JSON line \(expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, rows, message) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):  # found while reading the tokenizer's sample
        _dm(tmp_path, [{"path": str(bad)}], val_share=0.0).prepare_data()


def test_bad_line_found_by_a_tokenizing_worker_is_one_error(tmp_path) -> None:
    """With a given tokenizer nothing is read in the main process: the worker's error comes back as a DataError."""
    model = tmp_path / "tok.model"
    model.write_bytes(_dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}]).tokenizer.model_bytes)
    bad = _jsonl(tmp_path / "bad.jsonl", [*_docs(30), {"body": "no text"}])
    dm = _dm(tmp_path, [{"path": str(bad)}], tokenizer=str(model), val_share=0.0)
    with pytest.raises(DataError, match=r"bad\.jsonl:31: field 'text' is missing"):
        dm.prepare_data()
    assert not dm.is_prepared()


def test_skip_bad_records_counts_them(tmp_path) -> None:
    good = [{"text": f"a perfectly fine document {i} " * 10} for i in range(20)]
    bad = _jsonl(tmp_path / "mixed.jsonl", [*good, '{"text": "broken', {"body": "x"}, {"text": ""}])
    dm = _dm(tmp_path, [{"path": str(bad)}], skip_bad_records=True, seq_len=8)
    dm.setup("fit")
    stats = dm.stats["sources"][str(bad)]
    assert stats["raw_records"] == 23  # non-blank lines
    assert stats["skipped"] == {"malformed JSON": 1, "field 'text' missing": 1, "empty text": 1}


def test_skipped_records_are_not_counted_as_documents(tmp_path) -> None:
    """201 lines, 1 malformed and 1 of the wrong type: the split counts add up to the 199 documents kept."""
    rows = [{"text": f"a perfectly fine document {i} " * 10} for i in range(199)]
    path = _jsonl(tmp_path / "mixed.jsonl", [*rows[:50], '{"text": "broken', *rows[50:100], {"text": 7}, *rows[100:]])
    dm = _dm(tmp_path, [{"path": str(path)}], skip_bad_records=True, seq_len=8)
    dm.setup("fit")
    stats = dm.stats["sources"][str(path)]
    assert stats["raw_records"] == 201
    assert stats["sampled"] == stats["train_docs"] + stats["val_docs"] + stats["test_docs"] == 199
    assert stats["skipped"] == {"malformed JSON": 1, "field 'text' is an int, not a string": 1}
    assert stats["val_docs"] == sum(1 for _ in dm.iter_documents("val"))
    assert stats["train_docs"] == sum(1 for _ in dm.iter_documents("train"))


def test_empty_glob_empty_corpus_and_not_utf8(tmp_path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        _dm(tmp_path, [{"path": str(tmp_path / "nothing" / "*.jsonl")}]).prepare_data()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        _dm(tmp_path, [{"path": str(empty)}]).prepare_data()
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"text": "中文"}, ensure_ascii=False).encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"gbk\.jsonl:1: not valid UTF-8"):
        _dm(tmp_path, [{"path": str(gbk)}]).prepare_data()


def test_multi_megabyte_line_is_read(tmp_path) -> None:
    big = _jsonl(tmp_path / "big.jsonl", [{"text": "word " * 600_000}, {"text": "small doc " * 50}])
    dm = _dm(tmp_path, [{"path": str(big)}], val_share=0.0)
    lengths = [len(t) for _, t in dm.iter_documents("train")]
    assert sorted(lengths) == [500, 3_000_000]


def test_vocab_too_small_for_the_characters_is_explained(tmp_path) -> None:
    zh = real_data_path("pretrain", "pretrain_zh.jsonl")
    dm = _dm(tmp_path, [{"path": str(zh)}], vocab_size=300)
    with pytest.raises(MiniLLMError, match="raise vocab_size or lower character_coverage"):
        _ = dm.tokenizer


def test_bad_sizes_are_refused(tmp_path) -> None:
    src = [{"path": str(SAMPLE / "pretrain.jsonl")}]
    for kw, field in [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"val_share": 1.5}, "val_share"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
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


def test_remote_dataset_dir_is_passed_through(tmp_path) -> None:
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], dataset_dir="s3://bucket/minillm/tiny")
    assert dm.dataset_path == "s3://bucket/minillm/tiny" and shards.is_remote(dm.dataset_path)


def test_labels_are_exact_counts_and_seeded() -> None:
    a = shards.draw_labels(1000, 0.3, 0.1, seed=[1, 0])
    assert (a > 0).sum() == 300 and (a == shards.VAL).sum() == 30
    assert np.array_equal(a, shards.draw_labels(1000, 0.3, 0.1, seed=[1, 0]))
    assert not np.array_equal(a, shards.draw_labels(1000, 0.3, 0.1, seed=[2, 0]))
    assert (shards.draw_labels(10, 1.0, 0.5, seed=0, split=shards.TEST) == shards.TEST).all()


def test_tokenizer_travels_in_the_prepared_dir(tmp_path) -> None:
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}])
    dm.prepare_data()
    assert Tokenizer.from_file(Path(dm.dataset_path) / "tokenizer.model").sha256 == dm.tokenizer.sha256


def test_sampler_shards_without_overlap_and_resumes_across_world_sizes() -> None:
    """(The SFT/preference loaders' sampler.) Two ranks see disjoint halves; resuming after 10 global samples with
    3 ranks skips exactly them."""
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


# ---------------------------------------------------------------- bad input: one clear error, never a silent result


@pytest.mark.parametrize("content", ["", '{"text": "hi"}\n'], ids=["empty", "too-short"])
def test_test_sources_too_small_is_an_error_not_the_validation_split(tmp_path, content) -> None:
    """`test` with test_sources holding fewer than seq_len+1 tokens scored the validation split with a warning."""
    held_out = tmp_path / "t.jsonl"
    held_out.write_text(content)
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], test_sources=[{"path": str(held_out)}])
    dm.setup("test")
    assert dm.val_set is not None and dm.test_set is None
    with pytest.raises(DataError, match=r"test_sources \[.*t\.jsonl'\] hold \d+ tokens, fewer than seq_len\+1=33"):
        dm.test_dataloader()


def test_damaged_prepared_dir_is_one_error(tmp_path) -> None:
    """LitData raised deep in its reader (a missing index) or hung (a missing chunk file); json a decode error."""
    import shutil

    good = tmp_path / "ds"
    _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], dataset_dir=str(good)).prepare_data()
    damage = {
        "train/chunk-0-0.bin": r"is missing train/chunk-0-0\.bin: the prepared dataset is incomplete; delete",
        "train/index.json": r"is missing train/index\.json: the prepared dataset is incomplete; delete",
        "meta.json": r"meta\.json is not valid JSON \(.*\): the prepared dataset is damaged; delete .* prepare it",
    }
    for i, (name, message) in enumerate(damage.items()):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(good, broken)
        if name == "meta.json":
            (broken / name).write_text('{"format": 1,')
        else:
            (broken / name).unlink()
        with pytest.raises(DataError, match=rf"broken{i}.*{message}"):
            _dm(tmp_path, [], dataset_dir=str(broken)).setup("fit")
        with pytest.raises(DataError, match=message):  # `minillm prepare` says so too, not "already prepared"
            _dm(tmp_path, [], dataset_dir=str(broken)).prepare_data()


def test_remote_dataset_dir_without_its_filesystem_package(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # not installed
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], dataset_dir="s3://bucket/minillm/tiny")
    with pytest.raises(
        DataError, match=r"s3://bucket/minillm/tiny/meta\.json: cannot read s3:// URLs .*pip install s3fs"
    ):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "one record"}', r"bad\.json: a \.json file must hold an array of records, got dict"),
        (b'[{"text": "truncated"', r"bad\.json:1: invalid JSON \(.*\); a \.json file must hold one array"),
        (b'[{"text": "\xc4\xe3\xba\xc3"}]', r"bad\.json:1: not valid UTF-8"),
        (b"", r"bad\.json: the \.json file is empty"),
    ],
    ids=["object", "truncated", "gbk", "empty"],
)
def test_bad_json_source_is_an_error_not_dropped(tmp_path, content, message) -> None:
    """scan_file counted such a file as 0 documents: it was dropped with only a "contributes NOTHING" warning."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}, {"path": str(bad)}])
    with pytest.raises(DataError, match=message):
        dm.prepare_data()


def test_source_with_every_record_skipped_warns_loudly(tmp_path) -> None:
    import warnings

    bad = _jsonl(tmp_path / "bad.jsonl", [{"txt": f"the wrong field {i}"} for i in range(500)])
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}, {"path": str(bad)}], skip_bad_records=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()  # `minillm prepare` shows them
        dm.setup("fit")  # ... and a fit that prepares shows them once
    messages = [str(w.message) for w in caught if "bad.jsonl" in str(w.message)]
    assert len(messages) == 2, messages
    assert messages[0].endswith("bad.jsonl: skipped 500 unusable records: {\"field 'text' missing\": 500}")
    assert messages[1].startswith(f"!!! {bad} contributes NOTHING: every record it was to use was skipped")
    reused = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}, {"path": str(bad)}], skip_bad_records=True)
    with pytest.warns(UserWarning, match="contributes NOTHING"):  # also when the prepared dataset is reused
        reused.setup("fit")


@pytest.mark.parametrize(
    ("kind", "message"),
    [("missing", "does not exist"), ("directory", "is a directory"), ("text", "is not a SentencePiece model")],
)
def test_bad_tokenizer_option_is_one_error(tmp_path, kind, message) -> None:
    path = tmp_path / "tok.model"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a tokenizer\n")
    dm = _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], tokenizer=str(path))
    expected = rf"^data\.init_args\.tokenizer=.*tok\.model {message}; set it to a SentencePiece \.model file"
    with pytest.raises(DataError, match=expected):
        _ = dm.tokenizer
    with pytest.raises(DataError, match=expected):  # the prepared directory's key needs it first
        dm.prepare_data()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"character_coverage": 2.0}, r"character_coverage must be in \[0\.98, 1\] \(SentencePiece's range\), got 2"),
        ({"character_coverage": 0}, r"character_coverage must be in \[0\.98, 1\]"),
        ({"num_workers": -1}, r"PretrainDataModule\.num_workers must be >= 0, got -1"),
        ({"val_share": 1.0}, r"PretrainDataModule\.val_share must be in \[0, 1\) .*got 1\.0"),
        ({"sample_ratio": 1.5}, r"PretrainDataModule\.sample_ratio must be in \[0, 1\] .*got 1\.5"),
        ({"s": {"sample_ratio": -0.5}}, r"sources\[0\]\.sample_ratio \(.*pretrain\.jsonl\) must be in \[0, 1\]"),
        ({"s": {"sample_ratio": 3}}, r"sources\[0\]\.sample_ratio \(.*\) must be in \[0, 1\] .*got 3"),
        ({"s": {"val_share": -0.2}}, r"sources\[0\]\.val_share \(.*\) must be in \[0, 1\) .*got -0\.2"),
        ({"s": {"val_share": 1.5}}, r"sources\[0\]\.val_share \(.*\) must be in \[0, 1\) .*got 1\.5"),
    ],
)
def test_out_of_range_options_are_refused(tmp_path, kw, message) -> None:
    source = {"path": str(SAMPLE / "pretrain.jsonl"), **kw.pop("s", {})}
    with pytest.raises(ConfigError, match=message):
        _dm(tmp_path, [source], **kw)


def test_dataset_dir_that_is_a_file_is_refused(tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"dataset_dir=.*notes\.txt is a file, not a folder; set it to a prepared"):
        _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], dataset_dir=str(notes))
    with pytest.raises(ConfigError, match=r"cache_dir=.*notes\.txt is a file, not a folder; set it to a folder for"):
        _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], cache_dir=str(notes)).prepare_data()


@pytest.mark.parametrize("option", ["dataset_dir", "cache_dir"])
@pytest.mark.parametrize("below", ["ds", "a/b"])
def test_folder_below_a_file_is_one_error(tmp_path, option, below) -> None:
    """Preparing failed with a raw FileExistsError/NotADirectoryError traceback from mkdir or the lock file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    folder = notes / below
    with pytest.raises(ConfigError) as caught:
        _dm(tmp_path, [{"path": str(SAMPLE / "pretrain.jsonl")}], **{option: str(folder)}).prepare_data()
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"PretrainDataModule\.{option}={re.escape(str(folder))}: {re.escape(str(notes))} is a file, not a folder, "
        rf"so {option} cannot be made; set {option} to a path outside that file \(or move the file away\)",
        message,
    ), message


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--data.init_args.num_workers=-1", "error: PretrainDataModule.num_workers must be >= 0, got -1"),
        (
            "--data.init_args.sources=[{path: data/sample/pretrain.jsonl, val_share: 1.5}]",
            "error: PretrainDataModule.sources[0].val_share (data/sample/pretrain.jsonl) must be in [0, 1)",
        ),
        ("--data.init_args.tokenizer=data", "error: data.init_args.tokenizer=data is a directory"),
        (
            "--data.init_args.dataset_dir=configs/pretrain_tiny.yaml/tokens",
            "error: PretrainDataModule.dataset_dir=configs/pretrain_tiny.yaml/tokens: configs/pretrain_tiny.yaml is "
            "a file, not a folder, so dataset_dir cannot be made; set dataset_dir to a path outside that file",
        ),
        (
            "--data.init_args.cache_dir=configs/pretrain_tiny.yaml/cache",
            "error: PretrainDataModule.cache_dir=configs/pretrain_tiny.yaml/cache: configs/pretrain_tiny.yaml is a "
            "file, not a folder, so cache_dir cannot be made",
        ),
    ],
)
def test_bad_options_are_one_line_in_the_cli(option, message, workdir, capfd, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(workdir)
    assert user_error(["fit", "--config", "configs/pretrain_tiny.yaml", option], capfd).startswith(message)


def test_bom_opening_a_txt_file_is_dropped(tmp_path) -> None:
    """Notepad's UTF-8 byte-order mark stayed in the training text ('\\ufeffhello'); the .jsonl reader drops it."""
    text = "hello from a Windows editor\n" * 50
    path = tmp_path / "notepad.txt"
    path.write_bytes(("\ufeff" + text).encode())
    dm = _dm(tmp_path, [{"path": str(path)}], val_share=0.0)
    assert "".join(t for _, t in dm.iter_documents("train")) == text
    assert dm.plan()[0].scan.docs == len(text)


def test_caches_of_the_format_before_the_bom_fix_are_rebuilt(tmp_path, monkeypatch) -> None:
    """Dropping the BOM changed what a .txt file tokenizes to, but file scans, tokenizers and prepared directories
    of the code before were still reused (their keys were unchanged), and kept the BOM's tokens."""
    import codecs

    import minillm_lightning.data.pretrain as pretrain_mod

    text = "".join(f"line {i} from a Windows editor\n" for i in range(300))
    path = tmp_path / "notepad.txt"
    path.write_bytes(("\ufeff" + text).encode())
    # the code before the fix: format and scan version 1, .txt files decoded as "utf-8" (a BOM read as U+FEFF)
    real_decoder = codecs.getincrementaldecoder
    monkeypatch.setattr(codecs, "getincrementaldecoder", lambda name: real_decoder(name.replace("utf-8-sig", "utf-8")))
    monkeypatch.setattr(pretrain_mod, "FORMAT_VERSION", 1)
    monkeypatch.setattr(shards, "SCAN_VERSION", 1)
    old = _dm(tmp_path, [{"path": str(path)}])
    old.prepare_data()
    old_meta = json.loads(Path(old.dataset_path, "meta.json").read_text())
    assert old_meta["format"] == 1 and old.plan()[0].scan.docs == len(text) + 1
    assert old_meta["splits"]["train"]["chars"] + old_meta["splits"]["val"]["chars"] == len(text) + 1  # the BOM
    monkeypatch.undo()

    new = _dm(tmp_path, [{"path": str(path)}])
    assert new.plan()[0].scan.docs == len(text)  # scanned again, not the memoised scan that counted the BOM
    assert new.dataset_path != old.dataset_path and not new.is_prepared()
    new.prepare_data()
    meta = json.loads(Path(new.dataset_path, "meta.json").read_text())
    assert meta["format"] == pretrain_mod.FORMAT_VERSION > 1
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == len(text)


# ---- sources given as plain paths: `[a.jsonl, {path: b.txt, sample_ratio: 0.5}]` ----
MICRO_FIT = [
    "--model.init_args.arch.n_layer=2",
    "--model.init_args.arch.dim=64",
    "--data.init_args.seq_len=64",
    "--data.init_args.vocab_size=1024",
    "--data.init_args.prepare_workers=1",
    "--trainer.max_steps=1",
    "--trainer.val_check_interval=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_plain_path_sources_train_from_the_command_line(workdir, monkeypatch) -> None:  # noqa: F811
    """`--data.init_args.test_sources '[data/my_test.jsonl]'` (as the SFT and reward modules take it) failed with
    jsonargparse's "Invalid content in sub-config file": only `[{path: ...}]` was accepted."""
    from minillm_lightning.cli import main

    monkeypatch.chdir(workdir)
    _jsonl(workdir / "held.jsonl", _docs(40, tag="held"))
    sources = ["--data.init_args.sources=[data/sample/pretrain.jsonl]", "--data.init_args.test_sources=[held.jsonl]"]
    main(["fit", "--config", "configs/pretrain_tiny.yaml", *MICRO_FIT, *sources])
    stats = json.loads(next((workdir / "checkpoints").rglob("dataset_stats.json")).read_text())["pretrain"]
    assert stats["train_tokens"] > 0 and stats["test_tokens"] > 0
    assert {Path(p).name for p in stats["sources"]} == {"pretrain.jsonl", "held.jsonl"}
    saved = next((workdir / "checkpoints").rglob("config.yaml")).read_text()  # the run's resolved config
    assert "- data/sample/pretrain.jsonl" in saved and "- held.jsonl" in saved


def _prepared_dir(args: list[str], capsys) -> tuple[str, bool]:
    """`minillm prepare <args>` in-process: the prepared directory it names, and whether it was already there."""
    from minillm_lightning.cli import main

    capsys.readouterr()
    main(["prepare", *args])
    line = next(x for x in capsys.readouterr().out.splitlines() if ": already prepared" in x or ": prepared in" in x)
    return line.rsplit(": ", 1)[0], "already prepared" in line


def test_plain_paths_and_mappings_share_one_prepared_dir(workdir, monkeypatch, capsys) -> None:  # noqa: F811
    """A string is `{path: <it>}` with defaults: the cache key is the same, so a corpus prepared from one form is
    reused by the other; strings and mappings mix in one list, from the command line and from YAML."""
    import yaml

    monkeypatch.chdir(workdir)
    (workdir / "extra.txt").write_text("".join(f"An extra line of plain text, number {i}.\n" for i in range(200)))
    _jsonl(workdir / "held.jsonl", _docs(30, tag="held"))
    tiny = yaml.safe_load(Path("configs/pretrain_tiny.yaml").read_text())
    common = {"cache_dir": "cache", "vocab_size": 1024, "prepare_workers": 1}

    def config(name: str, **init_args) -> list[str]:
        data = {**tiny["data"], "init_args": {**tiny["data"]["init_args"], **common, **init_args}}
        (workdir / name).write_text(yaml.safe_dump({"data": data}))
        return ["--config", name]

    as_mappings = config(
        "mappings.yaml",
        sources=[{"path": "data/sample/pretrain.jsonl"}, {"path": "extra.txt", "sample_ratio": 0.5}],
        test_sources=[{"path": "held.jsonl"}],
    )
    first, reused = _prepared_dir(as_mappings, capsys)
    assert not reused and Path(first, "meta.json").is_file()
    mixed_yaml = config(
        "mixed.yaml", sources=["data/sample/pretrain.jsonl", {"path": "extra.txt", "sample_ratio": 0.5}]
    )
    assert "- data/sample/pretrain.jsonl\n" in (workdir / "mixed.yaml").read_text()  # a plain YAML string
    flags = ["--data.init_args.test_sources=[held.jsonl]"]
    assert _prepared_dir([*mixed_yaml, *flags], capsys) == (first, True)
    mixed_flag = ["--data.init_args.sources=[data/sample/pretrain.jsonl, {path: extra.txt, sample_ratio: 0.5}]"]
    assert _prepared_dir([*as_mappings, *mixed_flag, *flags], capsys) == (first, True)
    # and a different ratio is another corpus
    other = ["--data.init_args.sources=[data/sample/pretrain.jsonl, {path: extra.txt, sample_ratio: 0.25}]"]
    assert _prepared_dir([*as_mappings, *other, *flags], capsys)[0] != first


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_mixed_sources_print_config(workdir, monkeypatch, capsys) -> None:  # noqa: F811
    """`--print_config` shows each entry as given (a path, or a mapping with every field); `+` appends either."""
    import yaml

    from minillm_lightning.cli import main

    monkeypatch.chdir(workdir)
    args = ["fit", "--config", "configs/pretrain_tiny.yaml", "--print_config"]
    args += ["--data.init_args.sources=[data/sample/pretrain.jsonl, {path: b.txt, sample_ratio: 0.5}]"]
    args += ["--data.init_args.sources+=c.json", "--data.init_args.sources+={path: d.txt, val_share: 0.1}"]
    args += ["--data.init_args.test_sources=[held.jsonl]"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    none = {"sample_ratio": None, "val_share": None, "text_field": None}
    assert data["sources"] == [
        "data/sample/pretrain.jsonl",
        {"path": "b.txt", **none, "sample_ratio": 0.5},
        "c.json",
        {"path": "d.txt", **none, "val_share": 0.1},
    ]
    assert data["test_sources"] == ["held.jsonl"]


def test_plain_path_sources_in_python_match_the_mapping_form(tmp_path) -> None:
    """Strings are normalised before every check and before the cache key."""
    corpus = _jsonl(tmp_path / "c.jsonl", _docs(60))
    as_strings = _dm(tmp_path, [str(corpus)], test_sources=[str(corpus)])
    as_mappings = _dm(tmp_path, [{"path": str(corpus)}], test_sources=[{"path": str(corpus)}])
    assert as_strings.sources == as_mappings.sources and as_strings.test_sources == as_mappings.test_sources
    assert as_strings.dataset_path == as_mappings.dataset_path
    with pytest.raises(ConfigError, match=r"sources\[1\]\.val_share \(.*c\.jsonl\) must be in \[0, 1\)"):
        _dm(tmp_path, [str(corpus), {"path": str(corpus), "val_share": 1.5}])
    with pytest.raises(ConfigError, match=r"test_sources\[0\] is not a source \(the unknown key 'bogus'\)"):
        _dm(tmp_path, [str(corpus)], test_sources=[{"path": str(corpus), "bogus": 1}])
    with pytest.raises(ConfigError, match=r"sources\[1\] is not a source \(no path\)"):
        _dm(tmp_path, [str(corpus), {"sample_ratio": 0.5}])
    with pytest.raises(DataError, match="`sources` is empty"):
        _dm(tmp_path, [])


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (  # one string, not a list: jsonargparse read the file as a config, or as a list of paths, one per line
            "--data.init_args.test_sources=data/sample/pretrain.jsonl",
            "error: PretrainDataModule.test_sources is a list of files or globs, not one string; write it in "
            "brackets: --data.init_args.test_sources '[data/sample/pretrain.jsonl]' (in YAML: test_sources: "
            "[data/sample/pretrain.jsonl])",
        ),
        (
            "--data.init_args.sources=data/sample/pretrain.jsonl",
            "error: PretrainDataModule.sources is a list of files or globs, not one string; write it in brackets: "
            "--data.init_args.sources '[data/sample/pretrain.jsonl]'",
        ),
        (  # a .json array named alone became one source per record
            "--data.init_args.test_sources=array.json",
            "error: PretrainDataModule.test_sources is a list of files or globs, not one string; write it in "
            "brackets: --data.init_args.test_sources '[array.json]'",
        ),
        (  # a text file named alone: jsonargparse replaced the path by the file's text
            "--data.init_args.test_sources=book.txt",
            "error: PretrainDataModule.test_sources is a list of files or globs, not one string; write it in "
            "brackets: --data.init_args.test_sources '[data/my_corpus.jsonl]'",
        ),
        (
            "--data.init_args.sources+=book.txt",
            "error: PretrainDataModule.sources[1] is lines of text, not a path: jsonargparse reads a file named alone",
        ),
        (  # mappings are checked as before, also next to strings
            "--data.init_args.sources=[data/sample/pretrain.jsonl, {path: b.txt, bogus: 1}]",
            "error: --data.init_args.sources.bogus: not an option of PretrainSource",
        ),
        (
            "--data.init_args.test_sources=[held.jsonl, {path: data/sample/pretrain.jsonl, val_share: 1.5}]",
            "error: PretrainDataModule.test_sources[1].val_share (data/sample/pretrain.jsonl) must be in [0, 1)",
        ),
    ],
)
def test_sources_that_are_no_list_are_one_line(option, message, workdir, capfd, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(workdir)
    (workdir / "array.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (workdir / "book.txt").write_text("It was a bright cold day in April\nand the clocks were striking thirteen.\n")
    line = user_error(["fit", "--config", "configs/pretrain_tiny.yaml", option], capfd)
    assert line.startswith(message), line


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_one_string_in_yaml_is_one_line(workdir, capfd, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(workdir)
    (workdir / "one.yaml").write_text("data:\n  init_args:\n    sources: data/sample/pretrain.jsonl\n")
    line = user_error(["fit", "--config", "configs/pretrain_tiny.yaml", "--config", "one.yaml"], capfd)
    assert line.startswith("error: PretrainDataModule.sources is a list of files or globs, not one string"), line
    assert "(in YAML: sources: [data/sample/pretrain.jsonl])" in line


def test_scanning_a_large_file_is_announced_once(tmp_path) -> None:
    """The first pass over a multi-gigabyte corpus (hash, documents, byte ranges) printed nothing; a file of 64 MB
    or more is now named before it is read, once: the scan is memoised while the file is unchanged."""
    from minillm_lightning.data.shards import scan_file

    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    line = json.dumps({"text": "x" * 1000}) + "\n"
    big.write_text(line * ((64 << 20) // len(line) + 1))
    small.write_text(line * 10)
    said: list[str] = []
    for _ in range(2):
        assert scan_file(big, tmp_path / "cache", log=said.append).docs == (64 << 20) // len(line) + 1
        assert scan_file(small, tmp_path / "cache", log=said.append).docs == 10
    assert len(said) == 1 and said[0].startswith(f"scanning {big} (67 MB): ")
