"""Token shards on LitData: streamed corpus scanning, parallel tokenization into chunks, and block windows.

The pieces a pretraining data module needs to go from text files of any size to training batches without ever
holding the corpus in memory:

* :func:`scan_file` reads a file once, streaming, for its content hash, its number of documents and the byte
  offsets of ~``range_bytes`` ranges that worker processes tokenize independently (memoised per file version).
* :func:`tokenize_task` is the ``litdata.optimize`` function: it reads one byte range of one file line by line,
  keeps the documents whose label (train/val/test, drawn once per document) matches its split, and yields token
  arrays that LitData packs into chunk files.
* :class:`BlockLoader` serves ``seq_len + 1``-token windows of those chunks every ``stride`` tokens (LitData's
  ``TokensLoader`` with overlapping windows), :class:`TokenBlocks` turns them into ``input_ids``/``labels`` and
  :class:`ResumableStreamingLoader` checkpoints the position of training (not of the prefetching loader).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import litdata.processing.functions  # noqa: F401  (patched below)
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader
from litdata.utilities.env import _DistributedEnv

from minillm_lightning.errors import DataError, type_name
from minillm_lightning.fileio import atomic_write_text, file_lock


def _no_version_check(_version: str) -> None:
    """litdata is pinned on purpose (see pyproject.toml); its upgrade check queries PyPI from every process that
    builds a dataset (a 30 s timeout on an offline machine) only to print a warning."""


for _module in ("litdata.streaming.dataset", "litdata.processing.functions"):
    sys.modules[_module]._check_version_and_prompt_upgrade = _no_version_check

# label of each document (one byte per document, kept in a .npy file the workers memory-map)
DROP, TRAIN, VAL, TEST = 0, 1, 2, 3
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}
COMPLETE = "meta.json"  # written last into a prepared directory: its presence means "complete"
# "fork" starts LitData's workers in a fraction of a second instead of re-importing torch in each (spawn); the
# workers only run SentencePiece and numpy
START_METHOD = os.environ.get("MINILLM_PREPARE_START_METHOD", "fork")


def is_remote(path: str) -> bool:
    """True for object-store URIs such as ``s3://bucket/prefix`` (LitData streams them)."""
    return "://" in str(path)


# ---------------------------------------------------------------------------------------------------------------
# scanning
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FileScan:
    """What one streaming pass over a source file learned (no text is kept)."""

    path: str
    sha256: str
    size: int
    docs: int
    """JSONL/JSON: non-blank lines (records); .txt: characters (the whole file is one document)."""
    ranges: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(start byte, end byte, ordinal of its first document, its first line number); JSONL only."""


SCAN_VERSION = 2  # bump when what a scan finds changes: part of the memo's key, so older scans are redone
# 2: a byte-order mark opening a .txt file is no character (scans of 1 counted it in ``docs``)


def _memo_path(cache_dir: Path) -> Path:
    return cache_dir / "file_scans.json"


def scan_file(
    path: Path, cache_dir: Path, range_bytes: int = 16 << 20, log: Callable[[str], None] | None = None
) -> FileScan:
    """Hash and index one file in a single streaming pass; reuse the result while size and mtime are unchanged.
    ``log`` is told when a file of 64 MB or more is read (a gigabyte takes a while, before any other output)."""
    st = path.stat()
    version = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{range_bytes}:v{SCAN_VERSION}"
    memo_file = _memo_path(cache_dir)
    with file_lock(cache_dir / ".scan.lock"):
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    if version in memo:
        hit = memo[version]
        return FileScan(**{**hit, "ranges": [tuple(r) for r in hit["ranges"]]})
    if log is not None and st.st_size >= 64 << 20:
        log(f"scanning {path} ({st.st_size / 1e6:,.0f} MB): content hash, documents, byte ranges (memoised)")
    h = hashlib.sha256()
    ranges: list[tuple[int, int, int, int]] = []
    docs = 0
    if path.suffix == ".txt":  # "utf-8-sig": a byte-order mark opening the file is no character (as in _iter_txt)
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                docs += len(decoder.decode(block))
            docs += len(decoder.decode(b"", final=True))
    elif path.suffix == ".json":  # an array cannot be streamed with the standard library: count its records
        raw = path.read_bytes()
        h.update(raw)
        docs = _json_array_length(path, raw)
        del raw
    else:
        start, first, first_line, offset = 0, 0, 1, 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                h.update(raw)
                if offset - start >= range_bytes:
                    ranges.append((start, offset, first, first_line))
                    start, first, first_line = offset, docs, lineno
                offset += len(raw)
                if raw.strip():
                    docs += 1
        if offset > start:
            ranges.append((start, offset, first, first_line))
    scan = FileScan(str(path), h.hexdigest(), st.st_size, docs, ranges)
    with file_lock(cache_dir / ".scan.lock"):
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        memo = {k: v for k, v in memo.items() if not k.startswith(f"{path.resolve()}:")}  # forget old versions
        memo[version] = asdict(scan)
        atomic_write_text(memo_file, json.dumps(memo))
    return scan


def _json_array_length(path: Path, raw: bytes) -> int:
    """Records in a .json source, or a DataError naming the file and what is wrong with it (never a silent 0)."""
    from minillm_lightning.data.common import _decode

    text = _decode(path, raw, 1)  # not UTF-8: a DataError; a byte-order mark is dropped
    if not text.strip():
        raise DataError(f"{path}: the .json file is empty; write an array of records into it or remove it from sources")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file must hold one array of records (complete it, "
            f"or use .jsonl for one record per line)"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: a .json file must hold an array of records, got {type(data).__name__}; put the records in "
            f"a top-level [...] array (or use .jsonl, one record per line)"
        )
    return len(data)


def draw_labels(n: int, ratio: float, val_share: float, seed: int, split: int | None = None) -> np.ndarray:
    """One label per document: a seeded permutation picks ``round(n * ratio)`` documents, of which the last
    ``val_share`` (at least one when two or more are kept) go to validation. ``split`` labels every kept document
    with that split instead (explicit validation/test files)."""
    from minillm_lightning.data.common import split_counts

    labels = np.zeros(n, dtype=np.uint8)
    order = np.random.default_rng(seed).permutation(n)
    keep = round(n * ratio)
    if split is not None:
        labels[order[:keep]] = split
        return labels
    n_tr, n_va = split_counts(keep, val_share)
    labels[order[:n_tr]] = TRAIN
    labels[order[n_tr : n_tr + n_va]] = VAL
    return labels


# ---------------------------------------------------------------------------------------------------------------
# reading documents (shared by the tokenizer sample, the tokenizing workers and the tests)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One unit of tokenization work: a byte range of a JSONL file, a whole JSON file, or a character span of a
    .txt file, for one split."""

    source: str
    path: str
    split: int
    labels: str
    """.npy file with one label per document of this file (JSONL/JSON)."""
    start: int = 0
    end: int = -1
    first_doc: int = 0
    first_line: int = 1
    text_field: str = "text"
    skip_bad: bool = False


def _record_text(task: Task, lineno: int, rec: Any, counts: dict) -> str | None:
    """The text of a record, or None (counted) when it is missing/empty and bad records are skipped."""
    from minillm_lightning.data.common import DataError

    field_ = task.text_field
    value = rec.get(field_) if isinstance(rec, dict) else None
    if not isinstance(value, str):
        missing = not isinstance(rec, dict) or field_ not in rec
        problem = "is missing" if missing else "is null" if value is None else f"is {type_name(value)}, not a string"
        if task.skip_bad:
            _count(counts, f"field {field_!r} {'missing' if missing else problem}")
            return None
        keys = sorted(rec)[:8] if isinstance(rec, dict) else []
        fix = f"set text_field to the field that holds the text (keys here: {keys})" if missing else "fix the record"
        raise DataError(f"{task.path}:{lineno}: field {field_!r} {problem}; {fix} or skip_bad_records: true")
    if not value.strip():
        _count(counts, "empty text")
        return None
    return value


def _count(counts: dict, reason: str) -> None:
    counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1


LONG_DOC = 1 << 20  # bytes: documents at least this long are sampled piece by piece for the tokenizer


def iter_task_texts(task: Task, counts: dict | None = None, every: int = 1, seed: int = 0) -> Iterator[str]:
    """The texts of ``task``'s split, streamed from disk (one document at a time, never the whole file).

    ``every``/``seed``: keep each matching document with probability ``1/every`` (the tokenizer's sample); the
    choice depends only on (seed, document), so it is reproducible. ``counts`` collects records and skip reasons.
    """
    from minillm_lightning.data.common import ReadStats, _decode, iter_records

    counts = counts if counts is not None else {"records": 0, "skipped": {}}
    path = Path(task.path)
    if path.suffix == ".txt":
        yield from _iter_txt(path, task.start, task.end)
        return
    labels = np.load(task.labels, mmap_mode="r")
    rng = np.random.default_rng(seed) if every > 1 else None
    if path.suffix == ".json":
        rs = ReadStats()
        for lineno, rec in iter_records(path, rs, task.skip_bad):
            k = lineno - 1  # the item's position in the array
            if k < len(labels) and labels[k] == task.split and (rng is None or rng.random() * every < 1):
                counts["records"] += 1
                text = _record_text(task, lineno, rec, counts)
                if text is not None:
                    yield text
        for reason, n in rs.skipped.items():
            counts["skipped"][reason] = counts["skipped"].get(reason, 0) + n
        return
    ordinal = task.first_doc
    with open(path, "rb") as fh:
        fh.seek(task.start)
        offset = task.start
        for line, raw in enumerate(fh, start=task.first_line):
            if offset >= task.end:
                break
            offset += len(raw)
            if not raw.strip():
                continue
            k, ordinal = ordinal, ordinal + 1
            if labels[k] != task.split:
                continue
            if rng is not None and rng.random() * every >= 1 and len(raw) < LONG_DOC:
                continue  # not in the sample (a long document is always read: the caller samples its pieces)
            counts["records"] += 1
            try:
                rec = json.loads(_decode(path, raw, line))
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except (json.JSONDecodeError, ValueError) as e:
                if isinstance(e, DataError):
                    raise
                if task.skip_bad:
                    _count(counts, "malformed JSON")
                    continue
                raise DataError(
                    f"{path}:{line}: malformed JSON line ({e}); fix or delete the line, or set skip_bad_records: "
                    f"true to skip and count such lines"
                ) from None
            text = _record_text(task, line, rec, counts)
            if text is not None:
                yield text


def _iter_txt(path: Path, lo: int, hi: int, piece_chars: int = 1 << 20) -> Iterator[str]:
    """Characters [lo, hi) of a UTF-8 text file as pieces of about ``piece_chars`` that end at a newline."""
    from minillm_lightning.data.common import DataError

    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # drops a byte-order mark opening the file (Notepad)
    pos, pending = 0, ""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)"
                ) from None
            seg_lo, seg_hi = max(lo - pos, 0), min(hi - pos, len(text))
            pos += len(text)
            if seg_hi <= seg_lo:
                if pos >= hi:
                    break
                continue
            pending += text[seg_lo:seg_hi]
            while len(pending) >= piece_chars:
                cut = pending.rfind("\n", 0, piece_chars) + 1 or piece_chars
                yield pending[:cut]
                pending = pending[cut:]
            if pos >= hi:
                break
    if pending:
        yield pending


# ---------------------------------------------------------------------------------------------------------------
# tokenizing worker (runs inside litdata.optimize's processes)
# ---------------------------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


@dataclass
class TokenizeJob:
    """What every worker needs besides its task (pickled once per worker by LitData)."""

    tokenizer: str
    """Path of the SentencePiece model."""
    work_dir: str
    """Where per-task statistics and the first error are written."""
    dtype: str
    batch_chars: int = 1 << 20


def tokenize_task(task: Task, job: TokenizeJob) -> Iterator[np.ndarray]:
    """Yield the token ids of ``task``'s documents, each followed by EOS, in arrays of about ``batch_chars``
    characters; record the task's statistics (and the first DataError) in ``job.work_dir``."""
    import sentencepiece as spm

    sp = _TOKENIZERS.get(job.tokenizer)
    if sp is None:
        sp = _TOKENIZERS[job.tokenizer] = spm.SentencePieceProcessor(model_file=job.tokenizer)
    eos = sp.eos_id()
    dtype = np.dtype(job.dtype)
    counts: dict = {"records": 0, "skipped": {}, "docs": 0, "tokens": 0, "chars": 0, "bytes": 0}
    txt = task.path.endswith(".txt")  # a .txt task streams pieces of ONE document: EOS once, at its end
    batch: list[str] = []
    size = 0

    def encode(texts: list[str], with_eos: bool) -> np.ndarray:
        ids = sp.encode(texts)
        flat = [i for seq in ids for i in (*seq, eos)] if with_eos else [i for seq in ids for i in seq]
        counts["tokens"] += len(flat)
        return np.asarray(flat, dtype=dtype)

    err = Path(job.work_dir) / "error.txt"
    if err.exists():  # another task already failed: the preparation is void, finish quickly
        return
    try:
        for text in iter_task_texts(task, counts):
            counts["chars"] += len(text)
            counts["bytes"] += len(text.encode("utf-8"))
            if not txt:
                counts["docs"] += 1
            if len(text) > job.batch_chars and not txt:  # a long document: piece by piece, then one EOS
                if batch:
                    yield encode(batch, True)
                    batch, size = [], 0
                for piece in _pieces(text, job.batch_chars):
                    yield encode([piece], False)
                counts["tokens"] += 1
                yield np.asarray([eos], dtype=dtype)
                continue
            batch.append(text)
            size += len(text)
            if size >= job.batch_chars:
                yield encode(batch, not txt)
                batch, size = [], 0
        if batch:
            yield encode(batch, not txt)
        if txt and counts["chars"]:
            counts["docs"] = 1
            counts["tokens"] += 1
            yield np.asarray([eos], dtype=dtype)
    except DataError as e:
        # recorded, not raised: LitData terminates its workers on an error and leaves their uploader processes
        # orphaned; ending the task normally lets it shut down cleanly, then write_split raises this error
        if not err.exists():
            err.write_text(str(e))
        return
    name = f"{task.split}-{hashlib.sha1(repr(asdict(task)).encode()).hexdigest()[:12]}.json"
    atomic_write_text(Path(job.work_dir) / "stats" / name, json.dumps({"source": task.source, **counts}))


def _pieces(text: str, max_chars: int = 1 << 20) -> Iterator[str]:
    """A long document in pieces of at most ``max_chars`` that end at a newline (else a space) when one is near, so
    tokenizing piece by piece never holds a multi-megabyte document's ids at once."""
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + max_chars // 2, end)
            cut = cut if cut >= 0 else text.rfind(" ", start + max_chars // 2, end)
            end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end


def write_split(
    tasks: list[Task],
    out_dir: Path,
    job: TokenizeJob,
    workers: int,
    chunk_tokens: int,
) -> None:
    """Tokenize ``tasks`` into a LitData dataset at ``out_dir`` with ``workers`` processes (``litdata.optimize``).

    LitData stages chunks in a scratch folder that it wipes at start, and sets the global multiprocessing start
    method: both are confined here (a private scratch folder; the start method restored afterwards).
    """
    from litdata import optimize

    scratch = Path(job.work_dir) / "scratch"
    env = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(scratch / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(scratch / "data"),
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_method = multiprocessing.get_start_method(allow_none=True)
    os.environ.update(env)
    from functools import partial

    started = _Descendants()
    on_term = on_int = None
    if threading.current_thread() is threading.main_thread():  # `kill` = Ctrl-C: clean up the workers, then exit
        on_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # LitData's optimize installs its own SIGINT handler (stop the workers, then os._exit(0)) and leaves it
        # installed: a later Ctrl+C during training would end the run silently, with no checkpoint
        on_int = signal.getsignal(signal.SIGINT)
    try:
        with started, contextlib.redirect_stdout(sys.stderr), _ctrl_c_raises():  # LitData's chatter: not on stdout
            optimize(
                fn=partial(tokenize_task, job=job),
                inputs=tasks,
                output_dir=str(out_dir),
                chunk_size=chunk_tokens,
                item_loader=BlockLoader(1),  # the index names the loader class that may read it
                num_workers=max(1, min(workers, len(tasks))),
                reorder_files=False,
                start_method=START_METHOD,
            )
    except BaseException:
        started.kill()  # interrupted or failed: LitData would leave worker and uploader processes behind
        raise
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(signal.SIGINT, on_int)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        multiprocessing.set_start_method(saved_method, force=True)
        shutil.rmtree(scratch, ignore_errors=True)
    err = Path(job.work_dir) / "error.txt"
    if err.is_file():
        raise DataError(err.read_text())


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl+C during ``optimize`` raises KeyboardInterrupt, as anywhere else, instead of LitData's handler.

    LitData's handler (``DataProcessor._signal_handler``, installed by ``optimize`` itself) puts to its workers'
    queues from inside the signal handler, which can deadlock (the process then ignores further Ctrl+C), and ends
    with ``os._exit(0)``: exit status 0 for an interrupted run, no ``finally`` (the half-written folder stays).
    Raising instead unwinds through :func:`write_split`, which kills the workers, and the caller's cleanup.
    """
    from litdata.processing.data_processor import DataProcessor

    def raise_interrupt(self: Any, signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    original = DataProcessor.__dict__.get("_signal_handler")
    if original is None:  # moved in a LitData release: its own handling stays
        yield
        return
    DataProcessor._signal_handler = raise_interrupt  # type: ignore[method-assign]
    try:
        yield
    finally:
        DataProcessor._signal_handler = original  # type: ignore[method-assign]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through write_split, which kills LitData's processes


class _Descendants:
    """Records the processes started below this one while active (polled), to kill them if the run fails."""

    def __init__(self) -> None:
        self.procs: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                for child in me.children(recursive=True):
                    self.procs.setdefault(child.pid, child)
            self._stop.wait(0.2)

    def __enter__(self) -> _Descendants:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def kill(self) -> None:
        import psutil

        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running():  # psutil compares the start time too: never a recycled pid
                    proc.kill()


# ---------------------------------------------------------------------------------------------------------------
# serving blocks
# ---------------------------------------------------------------------------------------------------------------


class BlockLoader(TokensLoader):
    """LitData's TokensLoader with windows every ``stride`` tokens instead of back to back.

    A window of ``block_size`` tokens never crosses a chunk boundary (as in TokensLoader), so the last
    ``< block_size`` tokens of each chunk start no window of their own. ``stride = block_size - 1`` makes every
    token a target exactly once (windows share one token: the last input of one is the first of the next);
    ``stride = 1`` starts a window at every token (nanoGPT-style random windows, as a permutation).
    """

    def __init__(self, block_size: int, stride: int | None = None) -> None:
        super().__init__(block_size)
        self._stride = stride or block_size

    def state_dict(self) -> dict:
        return {"block_size": self._block_size, "stride": self._stride}

    def generate_intervals(self) -> list:
        from litdata.streaming.item_loader import Interval

        intervals, begin = [], 0
        for chunk in self._chunks:
            dim = chunk["dim"] or 0
            n = (dim - self._block_size) // self._stride + 1 if dim >= self._block_size else 0
            # LitData's default region of interest assumes back-to-back blocks (dim // block_size); windows every
            # `stride` tokens are more, and this loader is never subsampled: every window of the chunk is in
            intervals.append(Interval(begin, begin, begin + n, begin + n))
            begin += n
        return intervals

    def load_item_from_chunk(self, index: int, chunk_index: int, chunk_filepath: str, begin: int, filesize_bytes: int):
        # the parent waits for the chunk file and maps it (returning the chunk's first window); then read ours
        first = super().load_item_from_chunk(begin, chunk_index, chunk_filepath, begin, filesize_bytes)
        if index == begin:
            return first
        offset = self._dtype.itemsize * (index - begin) * self._stride
        buffer, count = self._buffers[chunk_index], self._block_size
        if self._serializer_name == "no_header_tensor":
            return torch.frombuffer(buffer, dtype=self._dtype, count=count, offset=offset)
        return np.frombuffer(buffer, dtype=self._dtype, count=count, offset=offset)


class _IndexQueue:
    """The window indexes of the chunk being read, in order, with an O(1) ``pop(0)``.

    LitData keeps them in a list and takes each next one with ``list.pop(0)``, which moves the whole rest of the
    list: with a window at every token a chunk holds ~1M windows, and that move was ~60% of the time to draw a
    batch (~3.6 of 5.8 ms per batch of 12 on a 2-core AMD EPYC, by cProfile).
    """

    def __init__(self, items: Any) -> None:
        self._items, self._head = items, 0

    def pop(self, index: int) -> Any:
        if index != 0 or self._head >= len(self._items):
            raise IndexError(f"_IndexQueue only pops its first item (asked for {index}, {len(self)} left)")
        self._head += 1
        return self._items[self._head - 1]

    def __len__(self) -> int:
        return len(self._items) - self._head


class TokenBlocks(StreamingDataset):
    """A StreamingDataset of ``seq_len + 1``-token windows served as ``{"input_ids", "labels"}`` pairs."""

    def __init__(self, input_dir: str, seq_len: int, stride: int | None = None, **kw) -> None:
        super().__init__(input_dir, item_loader=BlockLoader(seq_len + 1, stride), **kw)

    # every assignment LitData makes to its index list goes through here and becomes an _IndexQueue
    @property
    def current_indexes(self) -> _IndexQueue:
        return self._index_queue

    @current_indexes.setter
    def current_indexes(self, items: Any) -> None:
        self._index_queue = _IndexQueue(items)

    def set_batch_size(self, batch_size: int) -> None:
        # LitData trims each worker's share of an epoch to whole batches before shuffling it, so the order would
        # change with the batch size; planning in single windows keeps batch 4 x accumulate 2 == batch 8 (the
        # loader still drops the last incomplete batch, and ranks still get equal shares)
        self.batch_size = 1

    def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
        window = super().__getitem__(index)
        chunk = torch.as_tensor(np.asarray(window, dtype=np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class ResumableStreamingLoader(StreamingDataLoader):
    """StreamingDataLoader whose checkpointed position is what training consumed, not what the loader yielded.

    Lightning fetches one batch ahead (and worker processes prefetch more), so the loader's own count runs ahead of
    training; ``consumed_batches`` reads the trainer's progress instead, which makes a resume bit-exact. The
    state also records the world size: LitData's order depends on it, so resuming with another is refused.
    """

    def __init__(self, dataset: TokenBlocks, consumed_batches: Callable[[], int], **kw) -> None:
        super().__init__(dataset, **kw)
        self._consumed_batches = consumed_batches
        self._resuming_epoch_started = False

    def __iter__(self) -> Any:
        # Lightning ends an epoch after len(loader) batches without exhausting the iterator, so LitData never
        # clears its "restoring" flag and would replay the resumed epoch: clear it when the next epoch starts.
        if self._resuming_epoch_started:
            self.restore = False
            self.dataset.reset_state_dict()
        self._resuming_epoch_started = self.restore
        yield from super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        consumed = self._consumed_batches() * self.batch_size
        state["num_samples_yielded"] = consumed
        state["dataset"]["num_samples_yielded"] = consumed
        workers = max(1, self.num_workers)
        state["latest_worker_idx"] = (self._consumed_batches() - 1) % workers
        state["world_size"] = _DistributedEnv.detect().world_size
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        world = _DistributedEnv.detect().world_size
        saved = obj.get("world_size", world)
        if saved != world:
            raise DataError(
                f"this checkpoint was trained on {saved} processes and is resumed on {world}: the streamed data "
                f"order depends on the world size; resume with --trainer.devices giving {saved} processes"
            )
        if obj.get("num_samples_yielded", 0) == 0:
            obj = {**obj, "latest_worker_idx": -1}
        super().load_state_dict(obj)
