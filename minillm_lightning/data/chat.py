"""ChatDataModule: what the SFT, preference and prompt data modules share.

The base owns the checkpoint's tokenizer, the train / validation / test splits and their loaders, the
resumable training order, ``dataset_stats.json`` and the state checked on resume. A subclass provides only:

- :meth:`ChatDataModule.read`: records of some files -> items (conversations, pairs, prompts) and per-file stats;
- optionally :meth:`ChatDataModule.load`: the same items as an indexable table kept out of memory (SFT: the token
  cache of :mod:`minillm_lightning.data.chat_cache`, built once in parallel); by default it is :meth:`read`;
- :meth:`ChatDataModule.encode_items`: items (by index) -> token rows, per split (training-only augmentation
  lives here);
- :meth:`ChatDataModule.make_dataset`: rows -> a ``Dataset`` (SFT packs rows here);
- :meth:`ChatDataModule.collate_fn` and :meth:`ChatDataModule.describe` (the statistics of the fit splits).

Splits: validation is either ``val_share`` of ``sources`` (shuffled with ``seed``) or, when ``val_sources`` is
set, those files (and all of ``sources`` trains). ``test_sources`` are files read only by ``trainer.test``
(``minillm test``), in file order. The split shuffles item *indices* with ``random.Random(seed)`` (the same
permutation as shuffling the items themselves), so no module needs its items as one Python list.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from minillm_lightning.data.common import (
    EvalSampler,
    ResumableDataLoader,
    ResumableSampler,
    check_fits_model,
    check_folder_option,
    checkpoint_tokenizer,
    split_counts,
    write_stats,
)
from minillm_lightning.errors import DataError
from minillm_lightning.lightning_private import batches_done_in_epoch
from minillm_lightning.tokenizer import Tokenizer

Split = Literal["train", "val", "test"]


def _as_list(sources: list[str] | str | None) -> list[str]:
    if sources is None:
        return []
    return [sources] if isinstance(sources, str) else [str(s) for s in sources]


class ChatDataModule(L.LightningDataModule):
    """Base of the chat-template data modules; not used directly (see the module docstring).

    Args:
        sources: files or globs of .jsonl / .json (array) records (a list, or one path).
        tokenizer: the checkpoint given as ``model.init_from`` (it carries its tokenizer) or a .model file.
        max_length: most tokens per row (subclasses say what a row is).
        batch_size: items per batch on each device.
        val_share: share of ``sources`` held out for validation (ignored when ``val_sources`` is set).
        val_sources: validation files (same schema as ``sources``) instead of a share of ``sources``.
        test_sources: held-out files (same schema) scored by ``minillm test`` with the stage's test metrics.
        skip_bad_records: skip and count malformed records instead of stopping at the first one.
        num_workers: DataLoader worker processes.
        seed: seed of the split, of the training augmentation (SFT) and of the batch order.
        cache_dir: where the token caches of SFT and preference files are kept (``<cache_dir>/chat/<file>-<key>``):
            a file is tokenized once, and again only when it, the tokenizer or a setting that changes its tokens
            changes. Prompt files are not cached (they are small).
        prepare_workers: processes that tokenize a file into its cache (None: the CPU count, at most 8).
    """

    kind: ClassVar[str] = "chat"
    """Name in messages ("the SFT training split") and the key of this module in ``dataset_stats.json``."""
    stats_key: ClassVar[str] = "chat"
    row_name: ClassVar[str] = "rows"
    """What a training row is called in the "fewer than one batch" message."""
    item_name: ClassVar[str] = "records"
    """What the module adds more of to fix a too-small split."""
    prerequisite: ClassVar[str] = "minillm fit --config configs/sft_tiny.yaml"
    """The command producing the checkpoint whose tokenizer this module reads."""
    example_checkpoint: ClassVar[str] = "checkpoints/sft_tiny/last.ckpt"
    pin_memory: ClassVar[bool] = True
    split_encoded: ClassVar[bool] = False
    """Split ``val_share`` after encoding (over usable rows) instead of over the records read."""
    cached: ClassVar[bool] = False
    """Whether :meth:`load` builds on-disk caches (then :meth:`prepare_data` builds them once per node)."""

    def __init__(
        self,
        sources: str | list[str],
        tokenizer: str | None,
        max_length: int,
        batch_size: int,
        val_share: float = 0.05,
        val_sources: str | list[str] | None = None,
        test_sources: str | list[str] | None = None,
        skip_bad_records: bool = False,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "data/.cache",
        prepare_workers: int | None = None,
    ) -> None:
        super().__init__()
        sources = _as_list(sources)
        name = type(self).__name__
        if not sources:
            raise DataError(f"{name}: `sources` is empty; give at least one file or glob")
        if batch_size <= 0 or not 0 <= val_share < 1 or num_workers < 0:
            raise ValueError(
                f"{name}: batch_size must be positive (got {batch_size}), val_share in [0, 1) (got {val_share}) "
                f"and num_workers >= 0 (got {num_workers})"
            )
        self.sources, self.tokenizer_path, self.max_length = sources, tokenizer, max_length
        self.val_sources, self.test_sources = _as_list(val_sources), _as_list(test_sources)
        self.batch_size, self.val_share, self.skip_bad = batch_size, val_share, skip_bad_records
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir)
        check_folder_option(name, "cache_dir", cache_dir, "a folder for the token caches")
        if prepare_workers is not None and prepare_workers < 1:
            raise ValueError(f"{name}: prepare_workers must be at least 1, got {prepare_workers}")
        self.prepare_workers = prepare_workers or min(os.cpu_count() or 1, 8)
        self._tokenizer: Tokenizer | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.stats: dict[str, Any] = {}
        self.test_stats: dict[str, Any] = {}

    # ---- what subclasses provide ----
    def read(self, sources: list[str] | None = None) -> tuple[list[Any], dict[str, Any]]:
        """The usable items of ``sources`` (default: ``self.sources``) and per-file statistics."""
        raise NotImplementedError

    def load(self, sources: list[str]) -> tuple[Sequence[Any], dict[str, Any]]:
        """The items of ``sources`` as an indexable sequence, and per-file statistics (default: :meth:`read`)."""
        return self.read(sources)

    def new_counts(self) -> dict[str, int]:
        """Zeroed counters that :meth:`encode_items` increments (truncations, drops)."""
        return {}

    def encode_items(self, items: Sequence[Any], indices: Sequence[int], counts: dict[str, int], split: Split) -> Any:
        """Token rows of ``items[i] for i in indices``, in that order (dropping what does not fit); ``split`` lets
        training augment. The result supports ``len`` and (``split_encoded``) slicing."""
        raise NotImplementedError

    def make_dataset(self, rows: Any) -> Dataset:
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def describe(
        self, n_items: tuple[int, int], train: Dataset, val: Dataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        """(statistics of the fit splits for ``dataset_stats.json``, one summary line); ``n_items`` counts
        the (train, val) items before encoding."""
        raise NotImplementedError

    # ---- tokenizer ----
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = checkpoint_tokenizer(
                self.tokenizer_path, type(self).__name__, self.prerequisite, self.example_checkpoint
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- splits ----
    def prepare_data(self) -> None:
        """Build the token caches of the fit files once per node (Lightning calls this on one process per node
        before ``setup`` on every process)."""
        check_fits_model(self)
        if self.cached:
            self.load(self.sources)
            if self.val_sources:
                self.load(self.val_sources)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._setup_fit()
        if (stage == "test" or stage is None and self.test_sources) and self.test_set is None:
            self._setup_test()

    def _setup_fit(self) -> None:
        check_fits_model(self)
        items, sources = self.load(self.sources)
        order = list(range(len(items)))
        random.Random(self.seed).shuffle(order)
        counts = self.new_counts()
        extra: dict[str, Any] = {}
        if self.val_sources:
            val_items, extra["val_sources"] = self.load(self.val_sources)
            n_items = (len(items), len(val_items))
            train = self.encode_items(items, order, counts, "train")
            val = self.encode_items(val_items, range(len(val_items)), counts, "val")
        elif self.split_encoded:
            rows = self.encode_items(items, order, counts, "train")
            n_items = split_counts(len(rows), self.val_share)
            train, val = rows[: n_items[0]], rows[n_items[0] : sum(n_items)]
        else:
            n_items = split_counts(len(items), self.val_share)
            train = self.encode_items(items, order[: n_items[0]], counts, "train")
            val = self.encode_items(items, order[n_items[0] : sum(n_items)], counts, "val")
        del order
        self.train_set, self.val_set = self.make_dataset(train), self.make_dataset(val)
        world = self.trainer.world_size if self.trainer else 1
        if len(self.train_set) < world * self.batch_size:
            raise DataError(
                f"the {self.kind} training split has {len(self.train_set)} {self.row_name}, fewer than one batch "
                f"({self.batch_size} x {world} devices); add {self.item_name} or lower batch_size"
            )
        body, line = self.describe(n_items, self.train_set, self.val_set, counts)
        self.stats = {
            "sources": sources,
            **extra,
            **body,
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
        }
        rank_zero_info(line)
        self._write_stats(self.stats_key, self.stats)

    def _setup_test(self) -> None:
        if not self.test_sources:
            raise DataError(
                f"{type(self).__name__} has no test files: set data.init_args.test_sources to held-out files the "
                f"model never trained on (e.g. --data.init_args.test_sources '[data/my_test.jsonl]')"
            )
        items, sources = self.load(self.test_sources)
        counts = self.new_counts()
        rows = self.encode_items(items, range(len(items)), counts, "test")
        self.test_set = self.make_dataset(rows)
        if len(self.test_set) == 0:
            raise DataError(f"no usable {self.item_name} in test_sources {self.test_sources}; dropped: {counts}")
        self.test_stats = {
            "sources": sources,
            "records": len(items),
            "examples": len(rows),
            "rows": len(self.test_set),
            **counts,
            "tokenizer_sha256": self.tokenizer.sha256,
        }
        rank_zero_info(f"{self.kind} test data: {len(rows)} {self.item_name} -> {len(self.test_set)} rows; {counts}")
        self._write_stats(f"{self.stats_key}_test", self.test_stats)

    def test_summary(self) -> dict[str, Any]:
        """What ``minillm test`` reports about the test data: its files and how many examples were scored."""
        return {
            "test_files": list(self.test_stats.get("sources", {})),
            "examples": self.test_stats.get("examples"),
            "rows": self.test_stats.get("rows"),
        }

    def _write_stats(self, key: str, stats: dict[str, Any]) -> None:
        if self.trainer is not None:
            run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank
            if self.trainer.is_global_zero:
                write_stats(run_dir, key, stats)

    # ---- loaders ----
    def _progress(self) -> int:
        return batches_done_in_epoch(self.trainer)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return ResumableDataLoader(
            self.train_set,
            ResumableSampler(len(self.train_set), world, rank, self.seed),
            self._progress,
            batch_size=self.batch_size,
            drop_last=True,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        """Every item once, in order; under DDP sharded without the repeated items of Lightning's sampler
        (:class:`EvalSampler`), so a held-out metric on N ranks is the one-rank value."""
        assert dataset is not None
        collate, workers = self.collate_fn(), self.num_workers
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = EvalSampler(len(dataset), world, rank) if world > 1 else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def ordered_dataloader(self, split: Split, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Every item of a split once, in index order, sharded ``rank::world_size`` (no shuffling, no drop):
        what a stage iterates to precompute per-item values such as reference log-probabilities."""
        if (self.test_set if split == "test" else self.train_set) is None:
            self.setup("test" if split == "test" else "fit")
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=list(range(rank, len(dataset), world_size)),
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
        )

    # ---- checkpoint state ----
    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer_sha256": self.tokenizer.sha256, "max_length": self.max_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("tokenizer_sha256") not in (None, self.tokenizer.sha256):
            raise DataError(
                "the checkpoint was trained with a different tokenizer than data.tokenizer "
                f"({state['tokenizer_sha256'][:12]} vs {self.tokenizer.sha256[:12]}); resume with the same settings"
            )
