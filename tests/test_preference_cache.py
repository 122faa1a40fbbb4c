"""Tests of the preference data on the chat token cache (data/preference.py on data/chat_cache.py): the cached rows
equal those of the previous in-memory path (kept here as the reference: read every pair, shuffle, tokenize each
prompt and shorten it by re-encoding), a second setup does not tokenize, the cache follows the file, and parallel
tokenizing writes the same cache as serial."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, micro_trainer, real_data_path

from minillm_lightning.data import chat_cache
from minillm_lightning.data.common import split_counts
from minillm_lightning.data.preference import Pair, PreferenceCodec, PreferenceDataModule, collate, response_ids
from minillm_lightning.errors import DataError


# ---- the reference: the in-memory path the cache replaced ----
def ref_fit_prompt(dm: PreferenceDataModule, pair: Pair, longest: int, counts: dict[str, int]) -> list[int] | None:
    tok = dm.tokenizer
    ids = tok.encode_chat(pair.prompt, add_generation_prompt=True)[0]
    budget = dm.max_length - longest
    if len(ids) <= budget:
        return ids
    if dm.overflow == "drop" or budget <= len(tok.generation_prompt()):
        counts["dropped_too_long"] += 1
        return None
    head = pair.prompt[:1] if pair.prompt[0]["role"] == "system" else []
    rest = pair.prompt[len(head) :]
    if len(rest) > 1:
        counts["prompt_truncated_turns"] += 1
    while len(ids) > budget and len(rest) > 1:
        rest = rest[2:]
        ids = tok.encode_chat(head + rest, add_generation_prompt=True)[0]
    if len(ids) > budget:
        counts["prompt_cut_tokens"] += 1
        system = tok.encode_chat(head)[0] if head else []
        room = budget - len(system)
        ids = system + ids[-room:] if head and room > len(tok.generation_prompt()) else ids[-budget:]
    return ids


def ref_encode(dm: PreferenceDataModule, pairs: list[Pair], counts: dict[str, int]) -> list[tuple]:
    rows = []
    for pair in pairs:
        chosen, rejected = response_ids(dm.tokenizer, pair.chosen), response_ids(dm.tokenizer, pair.rejected)
        prompt = ref_fit_prompt(dm, pair, max(len(chosen), len(rejected)), counts)
        if prompt is not None:
            rows.append((prompt, chosen, rejected))
    return rows


def reference(dm: PreferenceDataModule) -> tuple[list, list, dict[str, int]]:
    pairs, _ = dm.read()
    random.Random(dm.seed).shuffle(pairs)
    n_train, n_val = split_counts(len(pairs), dm.val_share)
    counts = {"prompt_truncated_turns": 0, "prompt_cut_tokens": 0, "dropped_too_long": 0}
    train = ref_encode(dm, pairs[:n_train], counts)
    val = ref_encode(dm, pairs[n_train : n_train + n_val], counts)
    return train, val, counts


def items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def ref_items(rows: list[tuple]) -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r, "index": i} for i, (p, c, r) in enumerate(rows)]


def make(tok: Path, sources: list[Path], cache: Path, **kw) -> PreferenceDataModule:
    args = dict(tokenizer=str(tok), max_length=64, batch_size=1, val_share=0.1, cache_dir=str(cache))
    return PreferenceDataModule([str(s) for s in sources], **{**args, **kw})


def assert_matches_reference(dm: PreferenceDataModule) -> dict[str, int]:
    dm.trainer = micro_trainer(dm.cache_dir / "run")
    dm.setup("fit")
    train, val, counts = reference(dm)
    assert items(dm.train_set) == ref_items(train)
    assert items(dm.val_set) == ref_items(val)
    assert {k: dm.stats[k] for k in counts} == counts
    written = json.loads((dm.cache_dir / "run" / "dataset_stats.json").read_text())["preference"]
    assert written["mean_prompt_tokens"] == round(sum(len(p) for p, _, _ in train) / len(train), 1)
    assert written["mean_response_tokens"] == round(sum(len(c) + len(r) for _, c, r in train) / (2 * len(train)), 1)
    assert written["max_sequence_tokens"] == max(len(p) + max(len(c), len(r)) for p, c, r in train)
    assert written["sources"] == dm.read()[1]
    # the collated batches are the old ones too (both padding sides)
    for side in ("right", "left"):
        batch = collate(items(dm.train_set)[:5], dm.tokenizer.pad_id, side)
        expected = collate(ref_items(train)[:5], dm.tokenizer.pad_id, side)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
    return counts


def multi_turn_file(path: Path, n: int = 240) -> Path:
    """Pairs with 0-4 earlier exchanges, no / a short / a long system prompt and replies of varied length: every
    truncation branch (drop turns, cut keeping the system prompt, cut into the system prompt, drop) occurs."""
    rng = random.Random(7)
    words = "the cat sat on a mat while two dogs ran far away and one bird sang 12 34 56".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    records = []
    for i in range(n):
        turns = []
        system = rng.choice([None, text(3), text(30)])
        if system:
            turns.append({"role": "system", "content": system})
        for _ in range(rng.randint(0, 4)):
            turns += [{"role": "user", "content": text(rng.randint(1, 12))}]
            turns += [{"role": "assistant", "content": text(rng.randint(1, 12))}]
        turns.append({"role": "user", "content": text(rng.randint(1, 40))})
        good, bad = text(rng.randint(1, 20)), text(rng.randint(1, 20)) + f" {i}"
        records.append(
            {
                "chosen": [*turns, {"role": "assistant", "content": good}],
                "rejected": [*turns, {"role": "assistant", "content": bad}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SETTINGS = {
    "wide": {"max_length": 128},
    "tight": {"max_length": 48},
    "tighter": {"max_length": 32, "padding_side": "left"},
    "very tight": {"max_length": 24, "seed": 3},
    "drop": {"max_length": 48, "overflow": "drop"},
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Ranges of ~8 kB, so the test files are tokenized as many tasks."""
    monkeypatch.setattr(chat_cache, "CHUNK_BYTES", 8_000)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cached_rows_equal_the_in_memory_reference(name, tmp_path, tiny_pretrain_ckpt, small_chunks):
    data = multi_turn_file(tmp_path / "multi.jsonl")
    dm = make(tiny_pretrain_ckpt, [data, SAMPLE / "preference.jsonl"], tmp_path, prepare_workers=2, **SETTINGS[name])
    counts = assert_matches_reference(dm)
    if name != "wide":
        assert counts["dropped_too_long"] > 0
    if name in ("tight", "tighter"):
        assert counts["prompt_truncated_turns"] > 0 and counts["prompt_cut_tokens"] > 0


def test_truncation_branches_all_occur(tmp_path, tiny_pretrain_ckpt):
    """The synthetic file reaches the cut that keeps the whole system prompt and the one that keeps only its end
    (the settings the reference comparison runs under therefore cover both)."""
    found = {"system kept, turns cut": 0, "system cut": 0}
    for max_length in (48, 32, 24):
        dm = make(tiny_pretrain_ckpt, [multi_turn_file(tmp_path / "multi.jsonl")], tmp_path, max_length=max_length)
        dm.setup("fit")
        rows, pairs = dm.train_set.rows, dm.train_set.rows.pairs
        for r, i in enumerate(rows.pair.tolist()):
            o, start = int(pairs.msg_offsets[i]), int(pairs.start[i])
            bounds = {start, *(start + pairs.ends[o : o + pairs.n_messages[i]]).tolist()}
            head = int(pairs.ends[o]) if pairs.system[i] else 0
            if head and rows.head_length[r] == head and int(rows.body_start[r]) not in bounds:
                found["system kept, turns cut"] += 1
            if head and 0 < rows.head_length[r] < head:
                found["system cut"] += 1
    assert all(found.values()), found


def test_sample_and_real_pairs_equal_the_reference(tmp_path, tiny_pretrain_ckpt):
    files = [real_data_path("preference", "dpo_en.jsonl"), real_data_path("preference", "dpo_zh.jsonl")]
    dm = make(tiny_pretrain_ckpt, [SAMPLE / "preference.jsonl", *files], tmp_path, max_length=256, val_share=0.05)
    counts = assert_matches_reference(dm)
    assert counts["prompt_cut_tokens"] + counts["dropped_too_long"] > 0


def test_val_and_test_files_match_the_reference(tmp_path, tiny_pretrain_ckpt):
    sample = str(SAMPLE / "preference.jsonl")
    dm = make(tiny_pretrain_ckpt, [SAMPLE / "preference.jsonl"], tmp_path, val_sources=[sample], max_length=32)
    dm.test_sources = [sample]
    dm.setup("fit")
    dm.setup("test")
    pairs, _ = dm.read()
    counts = {"prompt_truncated_turns": 0, "prompt_cut_tokens": 0, "dropped_too_long": 0}
    in_order = ref_items(ref_encode(dm, pairs, counts))
    assert items(dm.val_set) == in_order and items(dm.test_set) == in_order
    assert dm.test_stats["records"] == len(pairs) and dm.test_stats["examples"] == len(in_order)
    assert {k: dm.test_stats[k] for k in counts} == counts


# ---- the cache ----
def test_second_setup_reads_the_cache_without_tokenizing(tmp_path, tiny_pretrain_ckpt, monkeypatch):
    data = multi_turn_file(tmp_path / "multi.jsonl")
    first = make(tiny_pretrain_ckpt, [data], tmp_path / "c")
    first.setup("fit")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(PreferenceCodec, "encode", no_tokenizing)
    again = make(tiny_pretrain_ckpt, [data], tmp_path / "c")
    again.setup("fit")
    assert items(again.train_set) == items(first.train_set) and again.stats == first.stats
    # the length policy and the split are computed from the cached boundaries: other values need no tokenizing
    other = make(tiny_pretrain_ckpt, [data], tmp_path / "c", max_length=40, seed=5, padding_side="left")
    other.setup("fit")
    assert len(list((tmp_path / "c" / "chat").iterdir())) == 1
    monkeypatch.undo()
    fresh = make(tiny_pretrain_ckpt, [data], tmp_path / "fresh", max_length=40, seed=5)
    assert_matches_reference(fresh)
    assert items(fresh.train_set) == items(other.train_set)


def test_cache_follows_the_file_and_the_fields(tmp_path, tiny_pretrain_ckpt):
    data = tmp_path / "d.jsonl"
    data.write_bytes((SAMPLE / "preference.jsonl").read_bytes())
    cache = tmp_path / "cache"

    def caches() -> set[str]:
        return {p.name for p in (cache / "chat").iterdir()}

    make(tiny_pretrain_ckpt, [data], cache).setup("fit")
    first = caches()
    make(tiny_pretrain_ckpt, [data], cache, fields={"system": "sys"}).setup("fit")  # other fields: other records
    assert len(caches()) == 2
    turn = {"role": "user", "content": "new?"}
    record = {
        "chosen": [turn, {"role": "assistant", "content": "yes"}],
        "rejected": [turn, {"role": "assistant", "content": "no"}],
    }
    with data.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    dm = make(tiny_pretrain_ckpt, [data], cache, val_share=0.0)
    dm.setup("fit")
    assert len(caches()) == 3 and first < caches()
    assert dm.stats["sources"][str(data)]["kept"] == dm.stats["train_pairs"] == len(dm.read()[0])


def test_parallel_build_writes_the_same_cache_as_serial(tmp_path, tiny_pretrain_ckpt, small_chunks):
    data = multi_turn_file(tmp_path / "multi.jsonl")
    dirs = []
    for workers in (1, 2):
        dm = make(tiny_pretrain_ckpt, [data], tmp_path / str(workers), prepare_workers=workers)
        dm.setup("fit")
        (built,) = (tmp_path / str(workers) / "chat").iterdir()
        dirs.append(built)
    assert json.loads((dirs[1] / "meta.json").read_text())["workers"] == 2
    files = sorted(p.name for p in dirs[0].iterdir() if p.name != "meta.json")
    assert len(files) == 2 * len(PreferenceCodec.fields)
    for name in files:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name


def test_bad_pair_deep_in_a_parallel_build_names_its_line(tmp_path, tiny_pretrain_ckpt, small_chunks):
    lines = multi_turn_file(tmp_path / "multi.jsonl").read_text().splitlines(keepends=True)
    same = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:150]) + json.dumps({**same, "rejected": same["chosen"]}) + "\n" + "".join(lines))
    dm = make(tiny_pretrain_ckpt, [bad], tmp_path / "c", prepare_workers=2)
    with pytest.raises(DataError) as cached:
        dm.setup("fit")
    with pytest.raises(DataError) as in_memory:
        dm.read()
    assert str(cached.value) == str(in_memory.value) and f"{bad}:151:" in str(cached.value)
    assert "identical responses" in str(cached.value)
