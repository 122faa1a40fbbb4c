"""Small helpers shared by the callbacks: units, sparse logging and attribute state for checkpoints."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import Callback

from minillm_lightning.lightning_private import logged_step, will_log

GIB = 2**30
MIB = 2**20

__all__ = ["GIB", "MIB", "StatefulCallback", "log_sparse", "will_log"]


def log_sparse(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write metrics logged only now and then straight to the loggers, at the step Lightning logs this batch at.

    ``LightningModule.log`` keeps a step value until the epoch ends and writes it again at every later log
    step, which would repeat stale per-layer values; dense metrics go through ``log`` as usual.
    """
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class StatefulCallback(Callback):
    """A callback whose state is the attributes named in ``state_attrs``: saved in every checkpoint and restored
    on resume (names missing from an older checkpoint keep their initial values)."""

    state_attrs: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.state_attrs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in self.state_attrs:
            if k in state_dict:
                setattr(self, k, state_dict[k])
