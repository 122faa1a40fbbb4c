"""Small helpers shared by the callbacks: units and sparse logging."""

from __future__ import annotations

import lightning as L

from minillm_lightning.lightning_private import logged_step, will_log

GIB = 2**30
MIB = 2**20

__all__ = ["GIB", "MIB", "log_sparse", "will_log"]


def log_sparse(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write metrics logged only now and then straight to the loggers, at the step Lightning logs this batch at.

    ``LightningModule.log`` keeps a step value until the epoch ends and writes it again at every later log
    step, which would repeat stale per-layer values; dense metrics go through ``log`` as usual.
    """
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
