"""Deterministic train / val / test files from JSONL corpora, streamed line by line.

A record's split depends only on its own bytes (a hash of the line), so the split is the same on every
machine, for every order of the input files, and a record that appears twice lands in the same split both
times: the test split never shares a record with the training split. ``budget_bytes`` keeps a slice of a
large corpus (every record is kept with the same probability, again decided by its hash), which is how the
CPU recipe trains on a few MB of a 1.6 GB download without reading it into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm_lightning.data.common import expand_paths
from minillm_lightning.errors import DataError
from minillm_lightning.fileio import write_json

SPLITS = ("train", "val", "test")
_BUCKETS = 1_000_000


@dataclass
class SplitReport:
    """What :func:`split_jsonl` read and wrote."""

    sources: list[str]
    keep_share: float
    val_share: float
    test_share: float
    read_bytes: int = 0
    records: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    bytes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})


def _bucket(line: bytes, salt: bytes) -> float:
    """A number in [0, 1) fixed by the line's bytes (and the salt that separates the two draws)."""
    digest = hashlib.blake2b(line, digest_size=8, key=salt).digest()
    return (int.from_bytes(digest, "little") % _BUCKETS) / _BUCKETS


def split_jsonl(
    pattern: str | list[str],
    out_dir: str | os.PathLike,
    val_share: float = 0.01,
    test_share: float = 0.01,
    budget_bytes: int | None = None,
    made_from: dict | None = None,
) -> SplitReport:
    """Write ``out_dir/{train,val,test}.jsonl`` from the JSONL files matching ``pattern``.

    Args:
        pattern: file(s) or glob(s) of ``.jsonl`` files.
        out_dir: folder for the three files and ``split.json`` (the report); written atomically: a finished
            split has ``split.json``, an interrupted one does not and is redone.
        val_share: share of the kept records that go to ``val.jsonl``.
        test_share: share of the kept records that go to ``test.jsonl``.
        budget_bytes: keep about this many bytes of the corpus (a hash-chosen slice); ``None`` keeps all.
        made_from: recorded as is under ``made_from`` in ``split.json`` (the pipeline's record of its inputs; a
            split without one is made again by the pipeline).
    """
    if not 0 <= val_share < 1 or not 0 <= test_share < 1 or val_share + test_share >= 1:
        raise DataError(f"val_share={val_share} and test_share={test_share} must be in [0, 1) and sum below 1")
    files: list[Path] = []
    for p in [pattern] if isinstance(pattern, str) else pattern:
        files += expand_paths(p, suffixes=(".jsonl",))
    if not files:
        raise DataError(f"{pattern}: no .jsonl files match; run `minillm download ...` first (see data/README.md)")
    total = sum(f.stat().st_size for f in files)
    keep = 1.0 if budget_bytes is None else min(1.0, budget_bytes / max(total, 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").unlink(missing_ok=True)  # from here on the folder is unfinished until rewritten
    report = SplitReport([str(f) for f in files], keep, val_share, test_share)
    handles = {s: open(out / f"{s}.jsonl.partial", "wb") for s in SPLITS}
    try:
        for path in files:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    report.read_bytes += len(raw)
                    line = raw.strip()
                    if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM written by Windows tools
                        line = line[3:]
                    if not line or (keep < 1.0 and _bucket(line, b"keep") >= keep):
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                    except ValueError as e:
                        raise DataError(f"{path}:{lineno}: malformed JSON line ({e}); fix or remove it") from None
                    u = _bucket(line, b"split")
                    split = "test" if u < test_share else "val" if u < test_share + val_share else "train"
                    handles[split].write(line + b"\n")
                    report.records[split] += 1
                    report.bytes[split] += len(line) + 1
    finally:
        for h in handles.values():
            h.close()
    for s in SPLITS:
        os.replace(out / f"{s}.jsonl.partial", out / f"{s}.jsonl")
    write_json(out / "split.json", {**asdict(report), "made_from": made_from})
    return report


def finished_split(out_dir: str | os.PathLike) -> dict | None:
    """The report of the finished split in ``out_dir`` (written last), or ``None``."""
    path = Path(out_dir) / "split.json"
    return json.loads(path.read_text()) if path.is_file() else None
