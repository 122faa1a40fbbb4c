"""On-disk token cache of chat files: tokenize a file once, in parallel, and read it back without holding it in memory.

A file's cache is a directory ``<cache_dir>/chat/<file stem>-<key>`` whose key hashes the file's fingerprint
(size, modification time and the first and last MiB), the tokenizer's sha256 and every setting that changes the
records or their tokens (the codec's settings, ``skip_bad_records``, the format version). It holds, per item
(a conversation, a pair, ...), named *ragged fields*: ``<name>.bin`` is the concatenation of every item's values
and ``<name>.idx.npy`` the item offsets into it. ``meta.json`` (the per-file statistics) is written last, inside
a temporary directory that is renamed into place: an interrupted build never leaves a directory that a later run
would take as complete, and two processes building the same cache both end with the same complete one.

Building streams the file: JSONL files are cut into byte ranges of about :data:`CHUNK_BYTES` at line boundaries
(a scan that counts lines, so errors still name ``file:line``), and worker processes each read, parse, validate
and tokenize their own ranges; the main process writes their results in file order, so the cache and every
count are the same whatever the number of workers. A .json array file is parsed whole (it is one JSON value) in
the main process.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.data.common import ReadStats, expand_paths, iter_jsonl_lines, iter_records
from minillm_lightning.errors import DataError
from minillm_lightning.tokenizer import Tokenizer

CACHE_VERSION = 2  # bump when the layout, what an item's fields mean, or how content is encoded changes
# 2: a literal <|im_start|>/<|im_end|> inside message content is encoded as text, not as the control tokens
CHUNK_BYTES = 4 << 20
"""Bytes of JSONL one task reads, parses and tokenizes (a worker holds about 10x this while it works)."""
SCAN_BLOCK = 16 << 20
EDGE_BYTES = 1 << 20
FIELD_TYPES = {"int32": "i", "uint8": "B"}
"""Field kinds: ``token`` (uint16 when the vocabulary fits, else int32), ``int32``, ``uint8``."""


class BadRecord(Exception):
    """A record that is not a usable item; ``reason`` is the category counted in the stats."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ChatCodec(Protocol):
    """What a data module tells the cache about its records; must be picklable (it goes to worker processes)."""

    what: str
    """What the items are called in warnings ("conversations")."""
    fields: dict[str, str]
    """Ragged fields of an encoded item: name -> kind (see :data:`FIELD_TYPES`)."""

    def settings(self) -> dict[str, Any]:
        """Everything, besides the file and the tokenizer, that changes the items or their tokens (JSON-able)."""

    def detect(self, rec: dict[str, Any]) -> str | None:
        """The schema of a record, or None."""

    def unknown_schema(self, rec: dict[str, Any]) -> str:
        """The message when no schema matches."""

    def convert(self, rec: dict[str, Any], fmt: str) -> Any:
        """A record -> an item; raises :class:`BadRecord`."""

    def encode(self, item: Any, tok: Tokenizer) -> dict[str, list[int]]:
        """An item -> its values per field."""


# ---- reading records ----
def bad_record_error(
    path: Path,
    lineno: int,
    e: BadRecord,
    rec: dict[str, Any],
    detect: Callable[[dict[str, Any]], str | None],
    file_fmt: str | None,
    detected: bool,
) -> DataError:
    """The error for a bad record: file and line, what is wrong, and the fix. When the file's schema was detected
    from its first record and this record is in another one, that is said too: a file that switches schema midway
    failed with a missing field only."""
    line = json_item_line(path, lineno) if path.suffix == ".json" else lineno
    where = f"{path}:{line}" if line else f"{path} item {lineno}"
    other = detect(rec) if detected and file_fmt is not None else None
    switch = (
        f"; this record is in the {other} schema, but the file's schema is {file_fmt} (detected from its first "
        f"record): keep one schema per file"
        if other not in (None, file_fmt)
        else ""
    )
    return DataError(
        f"{where}: {e} ({e.reason}){switch}; fix the record, or set skip_bad_records: true to skip and count such "
        f"records in dataset_stats.json"
    )


def json_item_line(path: Path, item: int) -> int | None:
    """Line on which item ``item`` (1-based) of a JSON array file starts (for error messages only)."""
    text, dec = path.read_text("utf-8"), json.JSONDecoder()
    pos = text.find("[") + 1
    try:
        for i in range(1, item + 1):
            while text[pos] in " \t\r\n,":
                pos += 1
            if i == item:
                return text.count("\n", 0, pos) + 1
            _, pos = dec.raw_decode(text, pos)
    except (IndexError, ValueError):
        return None
    return None


def iter_jsonl_range(
    path: Path, start: int, end: int, first_line: int, stats: ReadStats, skip_bad: bool
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of the JSONL lines in bytes ``[start, end)``, which begin on line ``first_line``.

    The same records, counts and ``file:line`` errors as :func:`~minillm_lightning.data.common.iter_records`
    reading the whole file.
    """
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    yield from iter_jsonl_lines(path, data.split(b"\n"), first_line, stats, skip_bad)


def line_ranges(path: Path, chunk: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first line)`` byte ranges of about ``chunk`` bytes covering ``path``, cut after a newline."""
    start, first_line, newlines, pos = 0, 1, 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(SCAN_BLOCK):
            base, pos, at = pos, pos + len(block), 0
            while True:
                nl = block.find(b"\n", max(start + chunk - base - 1, at))
                if nl < 0:
                    newlines += block.count(b"\n", at)
                    break
                newlines += block.count(b"\n", at, nl + 1)
                yield start, base + nl + 1, first_line
                start, first_line, newlines, at = base + nl + 1, first_line + newlines, 0, nl + 1
    if start < pos:
        yield start, pos, first_line


# ---- encoding (in worker processes or in-process) ----
@dataclass
class _Job:
    path: Path
    codec: ChatCodec
    model_bytes: bytes
    skip_bad: bool
    fmt: str | None
    fmt_from: int
    """Line (JSONL) or item (.json) of the first record whose schema was detected: earlier ones match none."""
    detected: bool
    """``fmt`` was detected from the file, not configured."""
    kinds: dict[str, str]


@dataclass
class _Part:
    """The encoded items of one range: per field the concatenated values and the per-item lengths."""

    values: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    stats: ReadStats = field(default_factory=ReadStats)


class _Encoder:
    def __init__(self, job: _Job) -> None:
        self.job, self.tok = job, Tokenizer(job.model_bytes)

    def run(self, records: Iterator[tuple[int, dict[str, Any]]], stats: ReadStats) -> _Part:
        job = self.job
        values = {k: array.array(FIELD_TYPES[kind]) for k, kind in job.kinds.items()}
        lengths = {k: array.array("i") for k in job.kinds}
        for lineno, rec in records:
            try:
                if job.fmt is None or lineno < job.fmt_from:
                    raise BadRecord("unknown schema", job.codec.unknown_schema(rec))
                item = job.codec.convert(rec, job.fmt)
            except BadRecord as e:
                if job.skip_bad:
                    stats.skip(e.reason)
                    continue
                raise bad_record_error(job.path, lineno, e, rec, job.codec.detect, job.fmt, job.detected) from None
            for k, vals in job.codec.encode(item, self.tok).items():
                values[k].extend(vals)
                lengths[k].append(len(vals))
        return _Part(
            {k: np.array(v, dtype=v.typecode) for k, v in values.items()},
            {k: np.array(v, dtype=np.int32) for k, v in lengths.items()},
            stats,
        )

    def range(self, task: tuple[int, int, int]) -> _Part:
        stats = ReadStats()
        return self.run(iter_jsonl_range(self.job.path, *task, stats, self.job.skip_bad), stats)


_WORKER: _Encoder | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER
    _WORKER = _Encoder(job)


def _run_range(task: tuple[int, int, int]) -> _Part:
    assert _WORKER is not None
    return _WORKER.range(task)


def _detect(path: Path, codec: ChatCodec) -> tuple[str | None, int]:
    """(schema, line or item where it was detected) from the first record any schema matches (auto format)."""
    records = (
        iter_records(path, ReadStats(), skip_bad=True)
        if path.suffix == ".json"
        else (
            r
            for s, e, first in line_ranges(path, CHUNK_BYTES)
            for r in iter_jsonl_range(path, s, e, first, ReadStats(), True)
        )
    )
    for lineno, rec in records:
        if (fmt := codec.detect(rec)) is not None:
            return fmt, lineno
    return None, 0


def _run_in_order(pool: Any, tasks: list[tuple[int, int, int]], window: int, take: Callable[[_Part], None]) -> None:
    """``take`` each ``_run_range(task)`` result in task order, with at most ``window`` tasks in the pool at a time.

    A build that fails (a bad record) leaves the ``with Pool`` block, which terminates the pool. With ``imap``, every
    task was queued and workers kept sending results (tens of kB each) that no one read any more; the pool's own
    threads then blocked writing into full pipes and ``terminate`` waited for them forever: the build hung instead of
    failing, now and then. Here the tasks in flight are few, and on a failure they are waited for before the pool
    is terminated, so its pipes are empty."""
    pending: deque[Any] = deque()
    queued = iter(tasks)
    try:
        for task in itertools.islice(queued, window):
            pending.append(pool.apply_async(_run_range, (task,)))
        while pending:
            part = pending.popleft().get()
            for task in itertools.islice(queued, 1):
                pending.append(pool.apply_async(_run_range, (task,)))
            take(part)
    except Exception:
        for result in pending:
            result.wait(timeout=300)
        raise


def _pool_context() -> mp.context.BaseContext:
    # fork: the workers inherit the imported modules (no second torch import); they only parse and tokenize
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


# ---- the cache ----
def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a file's content cheaply: size, modification time, and a hash of its first and last MiB."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(EDGE_BYTES))
        fh.seek(max(st.st_size - EDGE_BYTES, 0))
        h.update(fh.read(EDGE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def cache_key(path: Path, codec: ChatCodec, tok: Tokenizer, skip_bad: bool, fmt: str | None) -> str:
    spec = {
        "version": CACHE_VERSION,
        "file": fingerprint(path),
        "tokenizer": tok.sha256,
        "codec": type(codec).__name__,
        "settings": codec.settings(),
        "format": fmt,
        "skip_bad_records": skip_bad,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TokenCache:
    """A complete cache directory: item offsets in memory, values read from disk on demand (``os.pread``, so
    reading does not grow the resident memory the way touching a memory map would)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        self.dtypes = {k: np.dtype(v) for k, v in self.meta["dtypes"].items()}
        self.offsets = {k: np.load(directory / f"{k}.idx.npy") for k in self.dtypes}
        self._fds: dict[str, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.meta["kept"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def lengths(self, name: str) -> np.ndarray:
        return np.diff(self.offsets[name])

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of field ``name`` (positions in the concatenated values)."""
        if self._pid != os.getpid():  # a DataLoader worker: descriptors are per process
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(self.dir / f"{name}.bin", os.O_RDONLY)
        dtype = self.dtypes[name]
        n = max(stop - start, 0)
        raw = os.pread(self._fds[name], n * dtype.itemsize, int(start) * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype, count=n)

    def load(self, name: str) -> np.ndarray:
        """All values of a (small) field in memory."""
        return self.read(name, 0, int(self.offsets[name][-1]))


def load_or_build(
    path: Path,
    codec: ChatCodec,
    tok: Tokenizer,
    skip_bad: bool,
    fmt: str | None,
    cache_dir: Path,
    workers: int,
) -> tuple[TokenCache, bool]:
    """The complete cache of ``path`` (building it when missing) and whether it was built now.

    ``fmt``: the configured schema (None: detected from the file's first record that matches one).
    ``workers``: processes that tokenize (1: in this process).
    """
    key = cache_key(path, codec, tok, skip_bad, fmt)
    final = Path(cache_dir) / "chat" / f"{path.stem}-{key}"
    if (final / "meta.json").is_file():
        return TokenCache(final), False
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        _build(path, codec, tok, skip_bad, fmt, work, workers)
        try:
            os.rename(work, final)
        except OSError:  # another process completed the same cache first: keep its copy
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return TokenCache(final), True


def _build(
    path: Path, codec: ChatCodec, tok: Tokenizer, skip_bad: bool, fmt: str | None, work: Path, workers: int
) -> None:
    t0 = time.time()
    fmt_from, detected = 0, fmt is None
    if detected:
        fmt, fmt_from = _detect(path, codec)
    token_dtype = "uint16" if tok.vocab_size <= 1 << 16 else "int32"  # halves the cache of a usual vocabulary
    dtypes = {k: (token_dtype if v == "token" else v) for k, v in codec.fields.items()}
    kinds = {k: ("int32" if v == "token" else v) for k, v in codec.fields.items()}
    job = _Job(path, codec, tok.model_bytes, skip_bad, fmt, fmt_from, detected, kinds)
    files = {k: open(work / f"{k}.bin", "wb") for k in dtypes}
    lengths: dict[str, list[np.ndarray]] = {k: [] for k in dtypes}
    stats = ReadStats()

    def take(part: _Part) -> None:
        for k, fh in files.items():
            fh.write(part.values[k].astype(dtypes[k], copy=False).tobytes())
            lengths[k].append(part.lengths[k])
        stats.records += part.stats.records
        for reason, n in part.stats.skipped.items():
            stats.skipped[reason] = stats.skipped.get(reason, 0) + n

    try:
        if path.suffix == ".json":
            whole = ReadStats()
            take(_Encoder(job).run(iter_records(path, whole, skip_bad), whole))
        else:
            tasks = list(line_ranges(path, CHUNK_BYTES))
            workers = max(1, min(workers, len(tasks)))
            if workers == 1:
                encoder = _Encoder(job)
                for task in tasks:
                    take(encoder.range(task))
            else:
                with _pool_context().Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                    _run_in_order(pool, tasks, 2 * workers, take)
    finally:
        for fh in files.values():
            fh.close()
    kept = 0
    for k, parts in lengths.items():
        lens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        kept = len(lens)
        np.save(work / f"{k}.idx.npy", np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))
    meta = {
        "file": str(path),
        "format": fmt,
        "raw_records": stats.records,
        "kept": kept,
        "skipped": stats.skipped,
        "dtypes": dtypes,
        "workers": workers,
        "seconds": round(time.time() - t0, 2),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2))
    rank_zero_info(
        f"tokenized {path} once into the cache ({kept:,} {codec.what}, {meta['seconds']} s, {workers} process(es))"
    )


def load_files(
    sources: list[str],
    codec: ChatCodec,
    tok: Tokenizer,
    skip_bad: bool,
    fmt: str | None,
    cache_dir: Path,
    workers: int,
) -> tuple[list[TokenCache], dict[str, Any]]:
    """The caches of every file of ``sources`` (building the missing ones) and the per-file statistics of
    ``dataset_stats.json``, warning about skipped records and files that contribute nothing."""
    caches: list[TokenCache] = []
    stats: dict[str, Any] = {}
    for path in (p for s in sources for p in expand_paths(s, (".jsonl", ".json"))):
        cache, _ = load_or_build(path, codec, tok, skip_bad, fmt, cache_dir, workers)
        meta = cache.meta
        if meta["skipped"]:
            rank_zero_warn(f"{path}: skipped {sum(meta['skipped'].values())} unusable records: {meta['skipped']}")
        if not len(cache):
            rank_zero_warn(f"!!! {path} contributes NO {codec.what} (records={meta['raw_records']}); check its schema")
        caches.append(cache)
        stats[str(path)] = {
            "format": meta["format"],
            "raw_records": meta["raw_records"],
            "kept": len(cache),
            "skipped": meta["skipped"],
        }
    return caches, stats


def ragged(caches: list[TokenCache], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, item offsets) of a small per-item field (e.g. message ends) over several caches, as one table."""
    values = [c.load(name) for c in caches]
    bases = np.cumsum([0] + [len(v) for v in values])
    offsets = [c.offsets[name][:-1] + b for c, b in zip(caches, bases)]
    return np.concatenate(values), np.concatenate([*offsets, bases[-1:]]).astype(np.int64)
