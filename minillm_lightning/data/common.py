"""Shared pieces of the data modules: file globbing, JSONL reading with file:line errors, a resumable
sampler/loader pair, and the run-directory stats file."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minillm_lightning.checkpoint import load_checkpoint
from minillm_lightning.errors import CheckpointError, ConfigError, DataError, MiniLLMError
from minillm_lightning.fileio import write_json
from minillm_lightning.tokenizer import Tokenizer

if TYPE_CHECKING:
    import lightning as L


def expand_paths(pattern: str, suffixes: tuple[str, ...] = (".jsonl", ".json", ".txt")) -> list[Path]:
    """Files matching a path or glob; an empty match is an error naming the pattern."""
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        hint = " (the path does not exist)" if not matches else " (it matches only directories)"
        raise DataError(f"data source {pattern!r} matches no file{hint}; check the path relative to {os.getcwd()}")
    bad = [p for p in files if p.suffix not in suffixes]
    if bad:
        raise DataError(f"unsupported file type {bad[0]} (expected one of {', '.join(suffixes)})")
    return files


@dataclass
class ReadStats:
    """What reading a file produced; ``skipped`` maps a reason to a count."""

    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


UTF8_BOM = "\ufeff"
SKIP_BAD_FIX = "fix or delete the line, or set skip_bad_records: true to skip and count such lines"
"""The fix a malformed-line error suggests to readers of data sources, which have a ``skip_bad_records`` option."""


def _decode(path: Path, raw: bytes, lineno: int) -> str:
    """UTF-8 text of line ``lineno`` (1: also a whole file); a byte-order mark opening the file is dropped.

    Windows tools (Notepad, PowerShell) start UTF-8 files with a BOM, which JSON parsers reject; CRLF line ends
    need nothing here: ``\r`` is whitespace to JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8 "
            f"(e.g. iconv -f GBK -t UTF-8)"
        ) from None
    return text[1:] if lineno == 1 and text.startswith(UTF8_BOM) else text


def iter_records(
    path: Path, stats: ReadStats, skip_bad: bool = False, fix: str = SKIP_BAD_FIX
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from a JSONL file or a JSON array file.

    A malformed line raises :class:`DataError` naming ``file:line`` and ending with ``fix``, the remedy open to
    the caller's user; with ``skip_bad`` it is counted in ``stats`` instead.
    """
    if path.suffix == ".json":
        text = _decode(path, path.read_bytes(), 1)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file must hold one array") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json file must hold an array of records, got {type(data).__name__}")
        for i, rec in enumerate(data, start=1):
            if isinstance(rec, dict):
                stats.records += 1
                yield i, rec
            elif skip_bad:
                stats.skip("not an object")
            else:
                raise DataError(f"{path}: item {i} is {type(rec).__name__}, expected an object")
        return
    with open(path, "rb") as fh:
        yield from iter_jsonl_lines(path, fh, 1, stats, skip_bad, fix)


def iter_jsonl_lines(
    path: Path, lines: Iterable[bytes], first_line: int, stats: ReadStats, skip_bad: bool, fix: str = SKIP_BAD_FIX
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of raw JSONL ``lines`` of ``path`` (the first is line ``first_line``), blank lines
    skipped; a malformed line raises :class:`DataError` naming ``file:line`` and ending with ``fix``, or is
    counted with ``skip_bad``."""
    for lineno, raw in enumerate(lines, start=first_line):
        if not raw.strip():
            continue
        try:
            rec = json.loads(_decode(path, raw, lineno))
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except (json.JSONDecodeError, ValueError) as e:
            if skip_bad:
                stats.skip("malformed JSON")
                continue
            if isinstance(e, DataError):  # not UTF-8: its message already names the line and the fix
                raise
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e}); {fix}") from None
        stats.records += 1
        yield lineno, rec


def check_folder_option(owner: str, option: str, folder: str | os.PathLike, purpose: str) -> None:
    """A one-line ConfigError when the local ``folder`` given as ``owner.option`` is a file, or lies below one (it
    could never be made: mkdir fails with NotADirectoryError or FileExistsError). ``purpose`` says what it is for."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{owner}.{option}={folder} is a file, not a folder; set it to {purpose} (made if missing)")
    for parent in path.parents:
        if parent.exists():  # the nearest existing parent: a folder, or the file in the way
            if not parent.is_dir():
                raise ConfigError(
                    f"{owner}.{option}={folder}: {parent} is a file, not a folder, so {option} cannot be made; "
                    f"set {option} to a path outside that file (or move the file away)"
                )
            return


def check_fits_model(dm: L.LightningDataModule) -> None:
    """Refuse rows longer than the context of the model a Trainer runs ``dm`` with (its ``seq_len`` or
    ``max_length``), before any tokenizing: found later it took a whole corpus's preparation, or hid behind "fewer
    than one batch"."""
    arch = getattr(dm.trainer.lightning_module, "arch", None) if dm.trainer is not None else None
    if arch is not None:
        arch.check_fits(dm)


def split_counts(n: int, val_share: float) -> tuple[int, int]:
    """(train, val) counts: at least one validation item when there are two or more items."""
    if val_share <= 0 or n < 2:
        return n, 0
    n_val = min(n - 1, max(1, round(n * val_share)))
    return n - n_val, n_val


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, sharded across ranks, that can start part-way into an epoch.

    The order of an epoch depends only on (seed, epoch). Resuming skips the first ``start`` positions of
    the permutation (the samples all ranks consumed together), then shards the rest over the current
    ranks, so a run resumed with a different world size still sees no sample twice within the epoch.
    Subclassing DistributedSampler tells Lightning not to wrap it in another one.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.num_replicas, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.epoch = 0
        self.start = 0
        self.drop_last = True

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a pending resume offset belongs to the epoch it was saved in
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        rest = order[self.start :]
        self.start = 0
        usable = len(rest) // self.num_replicas * self.num_replicas
        return iter(rest[self.rank : usable : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.n // self.num_replicas


class EvalSampler(DistributedSampler):
    """Every item of a validation or test split exactly once across the ranks, in order: rank r takes items r,
    r + world, r + 2 world, ... so ranks may hold one item more than others (the metrics are weighted means,
    reduced once at the epoch's end).

    Lightning's own DistributedSampler pads a split to a multiple of the world size by repeating items: on 2 ranks
    the 15 held-out pairs of reward_tiny scored 16, one of them twice (val/accuracy 9/16, 8/15 on one rank).
    With fewer items than ranks each rank takes one item (some repeated): a rank without a batch would not join
    the reduction at the epoch's end, and the others would wait for it. Subclassing DistributedSampler tells
    Lightning not to replace it.
    """

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.drop_last, self.seed, self.epoch = False, False, 0, 0

    def _indices(self) -> range:
        if 0 < self.n < self.num_replicas:
            return range(self.rank % self.n, self.rank % self.n + 1)
        return range(self.rank, self.n, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning recognises as stateful: its checkpointed state is (epoch, global samples
    consumed). ``consumed_batches`` reports how many batches of this epoch training has processed; it
    comes from the trainer's own progress counters, so batches prefetched but not yet trained on are not
    counted as seen."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, consumed_batches: Callable[[], int], **kw) -> None:
        super().__init__(dataset, sampler=sampler, **kw)
        self._consumed_batches = consumed_batches

    def state_dict(self) -> dict[str, int]:
        s: ResumableSampler = self.sampler
        consumed = self._consumed_batches() * self.batch_size * s.num_replicas
        return {"epoch": s.epoch, "samples": consumed, "world_size": s.num_replicas, "seed": s.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        s: ResumableSampler = self.sampler
        s.epoch = state["epoch"]
        s.start = state["samples"] if state["samples"] < s.n else 0


def write_stats(run_dir: str | os.PathLike | None, name: str, stats: dict[str, Any]) -> Path | None:
    """Write (merge) ``<run_dir>/dataset_stats.json``; returns the path."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "dataset_stats.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[name] = stats
    return write_json(path, current)


def checkpoint_tokenizer(path: str | None, owner: str, prerequisite: str, example: str) -> Tokenizer:
    """The tokenizer of the checkpoint a chat stage starts from (``data.tokenizer`` = ``model.init_from``).

    Called from the data modules' ``tokenizer`` property rather than ``__init__``: LightningCLI reads it first
    (the ``vocab_size`` link) and shows a MiniLLMError raised there as is, while one raised in ``__init__``
    reaches the user wrapped. A missing file names the command that produces it.
    """
    if not path:
        raise DataError(
            f"{owner}.tokenizer is not set; set data.init_args.tokenizer to the model.init_args.init_from "
            f"checkpoint (e.g. {example}) so data and model share its tokenizer"
        )
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(
            f"data.tokenizer={file} is a directory; set it to the model.init_args.init_from checkpoint file"
        )
    if not file.is_file():
        # checkpoints/<run>/last.ckpt is written by configs/<run>.yaml: name that config when it exists
        own = f"minillm fit --config {Path('configs') / f'{file.parent.name}.yaml'}"
        own = f" (for this checkpoint: `{own}`)" if Path(own.split()[-1]).is_file() and own != prerequisite else ""
        raise CheckpointError(
            f"data.tokenizer={file} does not exist. It should be the checkpoint this stage starts from "
            f"(model.init_from): run `{prerequisite}` first{own}, or point model.init_args.init_from and "
            f"data.init_args.tokenizer at an existing checkpoint"
        )
    try:
        return Tokenizer.from_file(file)
    except MiniLLMError:
        raise
    except ValueError as e:  # a checkpoint without a tokenizer, or a SentencePiece model without the chat tokens
        raise CheckpointError(f"data.tokenizer: {e}") from None
    except RuntimeError:  # SentencePiece cannot parse it: a checkpoint not named *.ckpt, or not a tokenizer at all
        ckpt = load_checkpoint(file)  # raises the precise "not a minillm checkpoint" / "corrupted" error
        try:
            return Tokenizer.from_checkpoint(ckpt, f"data.tokenizer={file}")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
