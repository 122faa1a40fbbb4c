"""TestReport: when ``trainer.test`` (``minillm test``) ends, write its metrics to a JSON file beside the checkpoint."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import IterableDataset

from minillm_lightning.fileio import write_json


def report_path(ckpt_path: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path:
    """``<checkpoint stem>.test.json`` beside the checkpoint; without a checkpoint (the ``init_from`` weights, a
    baseline) ``test.json`` in the run directory."""
    if ckpt_path:
        path = Path(ckpt_path)
        return path.with_name(f"{path.stem}.test.json")
    return Path(run_dir) / "test.json"


def _sum_over_ranks(trainer: L.Trainer, n: int) -> int:
    """``n`` summed over all ranks (each rank scores its own share of the test set); ``n`` itself on one."""
    if trainer.world_size == 1:
        return n
    total = trainer.strategy.reduce(torch.tensor(float(n), device=trainer.strategy.root_device), reduce_op="sum")
    return int(total.item())


def _examples(trainer: L.Trainer) -> int | None:
    """Items in the test loaders, for data modules without ``test_summary``; None when a loader has no length.
    A map-style dataset's length is the whole set; an iterable one's (LitData's) is this rank's share, so those
    are summed over ranks. Every rank must call it."""
    try:
        datasets = [loader.dataset for loader in _loaders(trainer.test_dataloaders)]
        whole = sum(len(d) for d in datasets if not isinstance(d, IterableDataset))
        shares = sum(len(d) for d in datasets if isinstance(d, IterableDataset))
    except (TypeError, AttributeError):
        return None
    return whole + _sum_over_ranks(trainer, shares)


def _loaders(loaders: Any) -> list[Any]:
    """``trainer.test_dataloaders`` as a list: one loader, or a list/tuple of them."""
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _batches(trainer: L.Trainer) -> dict[str, Any]:
    """The test batches scored on all ranks together; when ``limit_test_batches`` cut the loaders short, a note
    that the counts describe the whole test set while the metrics come from part of it. Every rank must call it."""
    finite = [n for n in trainer.num_test_batches if not math.isinf(n)]
    scored = _sum_over_ranks(trainer, int(sum(finite)))
    out: dict[str, Any] = {"batches_scored": scored if finite else None}
    try:
        total = sum(len(loader) for loader in _loaders(trainer.test_dataloaders))
    except TypeError:  # a loader without a length
        return out
    total = _sum_over_ranks(trainer, total)
    if finite and scored < total:
        out["partial"] = (
            f"limit_test_batches={trainer.limit_test_batches}: the metrics come from {scored} of {total} "
            f"batches; the counts describe the whole test set"
        )
    return out


def test_report(trainer: L.Trainer) -> dict[str, Any]:
    """The report of the test run ``trainer`` just finished: metrics, checkpoint, stage and test data.

    Metrics are the ``test*`` entries of ``trainer.callback_metrics`` (epoch values, already reduced across
    ranks); batch counts are summed over ranks, so every rank must call it. The data module may describe its
    test data with ``test_summary()`` (files, examples scored); else the report counts the items of the test
    loaders.
    """
    module, dm = trainer.lightning_module, trainer.datamodule
    metrics = {
        k: float(v) if isinstance(v, torch.Tensor) else v
        for k, v in sorted(trainer.callback_metrics.items())
        if k.startswith("test")
    }
    summary = getattr(dm, "test_summary", None)
    data = summary() if callable(summary) else {"examples": _examples(trainer)}
    data.update(_batches(trainer))
    return {
        "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        "init_from": getattr(module, "init_from", None),
        "stage": getattr(module, "stage_name", None),
        "model": f"{type(module).__module__}.{type(module).__qualname__}",
        "data": f"{type(dm).__module__}.{type(dm).__qualname__}" if dm is not None else None,
        "metrics": metrics,
        **data,
    }


class TestReport(Callback):
    """Write :func:`test_report` as JSON when a test run ends (see :func:`report_path` for where).

    Args:
        path: write here instead (a file path); ``None`` picks the place from the checkpoint.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.written: Path | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = test_report(trainer)
        path = (
            Path(self.path)
            if self.path
            else report_path(trainer.ckpt_path, trainer.log_dir or trainer.default_root_dir)
        )
        if trainer.is_global_zero:
            write_json(path, report)
            rank_zero_info(f"test report: {path}")
        self.written = path
