"""Tests of the token cache of chat files (data/chat_cache.py) and the SFT data built on it: the cached rows equal
those of the previous in-memory path (kept here as the reference), a second setup does not tokenize, the cache
follows the file and the settings, an interrupted build is not reused, and parallel tokenizing equals serial."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, micro_trainer, real_data_path

from minillm_lightning.data import chat_cache
from minillm_lightning.data.chat_cache import line_ranges
from minillm_lightning.data.common import split_counts
from minillm_lightning.data.sft import SFTCodec, SFTDataModule, split_system
from minillm_lightning.errors import DataError
from minillm_lightning.losses import IGNORE_INDEX


# ---- the reference: the in-memory SFT path the cache replaced (read all, shuffle, encode, pack) ----
def ref_encode(dm: SFTDataModule, messages: list[dict], counts: dict[str, int]) -> tuple[list, list] | None:
    tok, limit = dm.tokenizer, dm.max_length + 1
    ids, mask = tok.encode_chat(messages)
    if len(ids) > limit and dm.overflow == "drop":
        counts["dropped_too_long"] += 1
        return None
    if len(ids) > limit:
        head, exchanges = split_system(messages)
        if len(exchanges) > 1:
            counts["truncated_turns"] += 1
        while len(ids) > limit and len(exchanges) > 1:
            exchanges = exchanges[1:]
            ids, mask = tok.encode_chat(head + [m for ex in exchanges for m in ex])
        if len(ids) > limit:
            ids, mask = ids[:limit], mask[:limit]
            counts["cut_to_max_length"] += 1
            if not any(mask[1:]):
                counts["dropped_too_long"] += 1
                return None
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def ref_truncate_turns(dm: SFTDataModule, conversations: list[list[dict]]) -> int:
    if dm.turn_truncation <= 0:
        return 0
    rng, changed = random.Random(f"turn-truncation-{dm.seed}"), 0
    for i, messages in enumerate(conversations):
        head, exchanges = split_system(messages)
        if len(exchanges) > 1 and rng.random() < dm.turn_truncation:
            keep = rng.randint(1, len(exchanges) - 1)
            conversations[i] = head + [m for ex in exchanges[:keep] for m in ex]
            changed += 1
    return changed


def ref_rows(examples: list[tuple[list, list]], max_length: int, packing: bool) -> list[dict[str, list[int]]]:
    if not packing:
        return [{"input_ids": x, "labels": y} for x, y in examples]
    rows, group, used = [], [], 0

    def flush() -> None:
        rows.append(
            {
                "input_ids": [t for x, _ in group for t in x],
                "labels": [t for _, y in group for t in y],
                "segment_ids": [s for s, (x, _) in enumerate(group, 1) for _ in x],
                "position_ids": [p for x, _ in group for p in range(len(x))],
            }
        )

    for ex in examples:
        if group and used + len(ex[0]) > max_length:
            flush()
            group, used = [], 0
        group.append(ex)
        used += len(ex[0])
    if group:
        flush()
    return rows


def reference(dm: SFTDataModule) -> tuple[list, list, dict[str, int]]:
    conversations, _ = dm.read()
    random.Random(dm.seed).shuffle(conversations)
    n_train, n_val = split_counts(len(conversations), dm.val_share)
    train, val = conversations[:n_train], conversations[n_train : n_train + n_val]
    counts = {"turn_truncated": 0, "truncated_turns": 0, "cut_to_max_length": 0, "dropped_too_long": 0}
    counts["turn_truncated"] += ref_truncate_turns(dm, train)
    out = []
    for split in (train, val):
        examples = [ex for m in split if (ex := ref_encode(dm, m, counts)) is not None]
        out.append(ref_rows(examples, dm.max_length, dm.packing))
    return out[0], out[1], counts


def as_lists(dataset) -> list[dict[str, list[int]]]:
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


def make(tok: Path, sources: list[Path], cache: Path, **kw) -> SFTDataModule:
    args = dict(tokenizer=str(tok), max_length=64, batch_size=1, val_share=0.1, cache_dir=str(cache))
    return SFTDataModule([str(s) for s in sources], **{**args, **kw})


def assert_matches_reference(dm: SFTDataModule) -> None:
    dm.setup("fit")
    train, val, counts = reference(dm)
    assert as_lists(dm.train_set) == train
    assert as_lists(dm.val_set) == val
    assert {k: dm.stats[k] for k in counts} == counts
    assert dm.stats["train_tokens"] == sum(len(r["input_ids"]) for r in train)
    assert dm.stats["train_assistant_tokens"] == sum(t != IGNORE_INDEX for r in train for t in r["labels"])


SETTINGS = {
    "plain": {},
    "packed, turn truncation": {"packing": True, "turn_truncation": 0.5},
    "drop, system prompt": {"overflow": "drop", "system_prompt": "Be brief.", "max_length": 96},
    "cut hard": {"max_length": 24, "turn_truncation": 0.3},
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Ranges of ~16 kB, so the 200 kB sample is tokenized as a dozen tasks."""
    monkeypatch.setattr(chat_cache, "CHUNK_BYTES", 16_000)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cached_rows_equal_the_in_memory_reference(name, tmp_path, tiny_pretrain_ckpt, small_chunks):
    dm = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, prepare_workers=2, **SETTINGS[name])
    assert_matches_reference(dm)
    assert sum(dm.stats[k] for k in ("truncated_turns", "cut_to_max_length", "dropped_too_long")) > 0 or name == "plain"


def test_cached_rows_equal_the_reference_on_real_conversations(tmp_path, tiny_pretrain_ckpt):
    files = [real_data_path("sft", "sft_en.jsonl"), real_data_path("sft", "sft_zh.jsonl")]
    dm = make(tiny_pretrain_ckpt, files, tmp_path, max_length=256, packing=True, turn_truncation=0.3, seed=3)
    assert_matches_reference(dm)
    assert dm.stats["truncated_turns"] + dm.stats["cut_to_max_length"] > 0


def test_val_and_test_files_match_the_reference(tmp_path, tiny_pretrain_ckpt):
    dm = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, val_sources=[str(SAMPLE / "sft.jsonl")])
    dm.test_sources = [str(SAMPLE / "sft.jsonl")]
    dm.setup("fit")
    dm.setup("test")
    conversations, _ = dm.read()
    counts = {"truncated_turns": 0, "cut_to_max_length": 0, "dropped_too_long": 0}
    in_order = ref_rows([ex for m in conversations if (ex := ref_encode(dm, m, counts)) is not None], 64, False)
    assert as_lists(dm.val_set) == in_order and as_lists(dm.test_set) == in_order
    assert dm.test_stats["records"] == len(conversations) and dm.test_stats["examples"] == len(in_order)


# ---- the cache ----
def test_second_setup_reads_the_cache_without_tokenizing(tmp_path, tiny_pretrain_ckpt, monkeypatch):
    first = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, packing=True)
    first.setup("fit")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(SFTCodec, "encode", no_tokenizing)
    again = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, packing=True)
    again.setup("fit")
    assert as_lists(again.train_set) == as_lists(first.train_set) and again.stats == first.stats
    # the length policy and the split are computed from the cached boundaries: other values need no tokenizing
    other = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, max_length=32, turn_truncation=0.5, seed=5)
    other.setup("fit")
    assert len(list((tmp_path / "chat").iterdir())) == 1
    monkeypatch.undo()
    assert_matches_reference(make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path / "fresh", **vars_of(other)))


def vars_of(dm: SFTDataModule) -> dict:
    return {"max_length": dm.max_length, "turn_truncation": dm.turn_truncation, "seed": dm.seed}


def test_cache_follows_the_file_and_the_settings(tmp_path, tiny_pretrain_ckpt):
    data = tmp_path / "d.jsonl"
    data.write_bytes((SAMPLE / "sft.jsonl").read_bytes())
    cache = tmp_path / "cache"

    def caches() -> set[str]:
        return {p.name for p in (cache / "chat").iterdir()}

    make(tiny_pretrain_ckpt, [data], cache).setup("fit")
    first = caches()
    make(tiny_pretrain_ckpt, [data], cache, system_prompt="Be brief.").setup("fit")  # changes the tokens
    assert len(caches()) == 2
    record = {"conversations": [{"role": "user", "content": "new?"}, {"role": "assistant", "content": "yes"}]}
    with data.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    dm = make(tiny_pretrain_ckpt, [data], cache, val_share=0.0)
    dm.setup("fit")
    assert len(caches()) == 3 and first < caches()
    assert dm.stats["sources"][str(data)]["kept"] == dm.stats["train_conversations"] == len(dm.read()[0])


def test_interrupted_build_is_not_reused(tmp_path, tiny_pretrain_ckpt, monkeypatch, small_chunks):
    calls = {"n": 0}
    encode = SFTCodec.encode

    def dies_midway(self, messages, tok):
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt  # the user pressing Ctrl-C while the cache is written
        return encode(self, messages, tok)

    monkeypatch.setattr(SFTCodec, "encode", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path, prepare_workers=1).setup("fit")
    assert list((tmp_path / "chat").iterdir()) == []  # neither a complete-looking cache nor the half-written one
    # a build killed outright leaves only its temporary directory, which no run takes for a cache
    (tmp_path / "chat" / ".sft-0000.tmp-1-dead").mkdir()
    monkeypatch.undo()
    assert_matches_reference(make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path))


def test_parallel_build_writes_the_same_cache_as_serial(tmp_path, tiny_pretrain_ckpt, small_chunks):
    dirs = []
    for workers in (1, 2):
        dm = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path / str(workers), prepare_workers=workers)
        dm.setup("fit")
        (built,) = (tmp_path / str(workers) / "chat").iterdir()
        dirs.append(built)
    assert json.loads((dirs[1] / "meta.json").read_text())["workers"] == 2
    files = sorted(p.name for p in dirs[0].iterdir() if p.name != "meta.json")
    assert len(files) == 2 * len(SFTCodec.fields)
    for name in files:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name


def test_line_ranges_cover_the_file_at_line_boundaries(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [("x" * random.Random(i).randint(0, 300)) + "\n" for i in range(500)]
    path.write_text("".join(lines) + "tail without newline")
    data = path.read_bytes()
    ranges = list(line_ranges(path, 1000))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) > 50
    for (s, e, _), (s2, _, _) in zip(ranges, ranges[1:]):
        assert e == s2 and data[e - 1 : e] == b"\n" and e - s >= 1000
    for s, _, first in ranges:
        assert first == data.count(b"\n", 0, s) + 1


# ---- errors and skipped records through the cache: as when reading in memory ----
def test_bad_record_deep_in_a_parallel_build_names_its_line(tmp_path, tiny_pretrain_ckpt, small_chunks):
    lines = (SAMPLE / "sft.jsonl").read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:700]) + '{"conversations": [{"role": "robot", "content": "x"}]}\n' + "".join(lines))
    dm = make(tiny_pretrain_ckpt, [bad], tmp_path, prepare_workers=2)
    with pytest.raises(DataError) as cached:
        dm.setup("fit")
    with pytest.raises(DataError) as in_memory:
        dm.read()
    assert str(cached.value) == str(in_memory.value) and f"{bad}:701:" in str(cached.value)
    assert list((tmp_path / "chat").iterdir()) == []


def test_skipped_records_are_counted_through_the_cache(tmp_path, tiny_pretrain_ckpt, small_chunks):
    lines = (SAMPLE / "sft.jsonl").read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    junk = ["{not json\n", '{"conversations": [{"role": "user", "content": ""}]}\n', "[1]\n"]
    bad.write_text("".join(lines[:300] + junk + lines[300:600] + junk[:1] + lines[600:]))
    dm = make(tiny_pretrain_ckpt, [bad], tmp_path, prepare_workers=2, skip_bad_records=True)
    dm.trainer = micro_trainer(tmp_path / "run")
    dm.setup("fit")
    _, stats = dm.read()
    written = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())["sft"]["sources"]
    assert written == stats and stats[str(bad)]["skipped"] == {"malformed JSON": 3, "empty content": 1}
    assert stats[str(bad)]["kept"] == len(lines)


def test_token_dtype_fits_the_vocabulary(tmp_path, tiny_pretrain_ckpt):
    dm = make(tiny_pretrain_ckpt, [SAMPLE / "sft.jsonl"], tmp_path)
    conversations, _ = dm.load([str(SAMPLE / "sft.jsonl")])
    cache = conversations.caches[0]
    assert cache.dtypes["ids"] == np.uint16 and len(cache) == len(dm.read()[0])
    first = dm.tokenizer.encode_chat(dm.read()[0][0])[0]
    assert cache.read("ids", 0, len(first)).tolist() == first


def test_parallel_build_keeps_few_tasks_in_flight_and_drains_them_on_failure(monkeypatch) -> None:
    """A failing parallel build once hung in `Pool.terminate`: with `imap` every task was queued and the workers'
    results filled pipes no one read. `_run_in_order` hands the pool at most `window` tasks, takes the results in
    task order, and on a failure waits for the tasks in flight before the pool is terminated."""

    class Result:
        def __init__(self, log: list, task) -> None:
            self.task, self.log, self.waited = task, log, False

        def get(self):
            self.log.append(("get", self.task))
            if self.task == (5, 0, 0):
                raise chat_cache.DataError("bad record")
            return self.task

        def wait(self, timeout=None) -> None:
            self.waited = True

    class Pool:
        def __init__(self) -> None:
            self.log: list = []
            self.results: list[Result] = []

        def apply_async(self, fn, args):
            self.log.append(("put", args[0]))
            self.results.append(Result(self.log, args[0]))
            return self.results[-1]

        def in_flight(self) -> int:  # the most tasks put and not yet taken at any time
            most = now = 0
            for kind, _ in self.log:
                now += 1 if kind == "put" else -1
                most = max(most, now)
            return most

    tasks = [(i, 0, 0) for i in range(9)]
    pool, taken = Pool(), []
    chat_cache._run_in_order(pool, tasks[:5], 2, taken.append)
    assert taken == tasks[:5] and pool.in_flight() == 2
    pool = Pool()
    with pytest.raises(chat_cache.DataError, match="bad record"):
        chat_cache._run_in_order(pool, tasks, 3, lambda part: None)
    assert [r.task for r in pool.results] == tasks[:8] and pool.in_flight() == 3
    assert [r.waited for r in pool.results] == [False] * 6 + [True] * 2  # the two still in flight were waited for
