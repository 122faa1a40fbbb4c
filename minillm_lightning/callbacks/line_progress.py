"""Progress as plain lines, for output that is not a terminal (``nohup``, SLURM logs, ``> run.log``, CI).

A live progress bar redraws one line in place; written to a file, Lightning's rich bar shows nothing until the
run ends, so a log of a long run says nothing for hours. ``minillm fit``/``validate``/``test``/``predict`` put this
callback in the rich bar's place when standard output is not a terminal (see ``trainer_cli.choose_progress_bar``);
it can also be listed under ``trainer.callbacks`` to get lines on a terminal.
"""

from __future__ import annotations

import time
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["LineProgress"]


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LineProgress(ProgressBar):
    """One line of progress every ``interval`` seconds: ``step 120/600 (20%) | train/loss 4.123 | 9.81 steps/s |
    elapsed 0:00:12, eta 0:00:49``, with the metrics a stage shows in the progress bar; a line at the first and last
    step of a fit, and one after each validation with its metrics. Evaluation loops (validate, test, predict) get a
    line per ``interval`` too. Only the global-zero process prints.

    Args:
        interval: seconds between two lines of the same loop.
    """

    def __init__(self, interval: float = 15.0) -> None:
        super().__init__()
        if interval < 0:
            raise ValueError(f"LineProgress: interval must be >= 0 seconds, got {interval}")
        self.interval = interval
        self._enabled = True
        self._last = 0.0  # when the last line of the running loop was printed
        self._start = 0.0  # when the running loop started
        self._first_step = 0  # global step at the start of fit (a resumed run starts past 0)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _metrics(self, trainer: Trainer, pl_module: LightningModule, prefix: str | None = None) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return " | ".join(f"{k} {_number(v)}" for k, v in items.items() if prefix is None or k.startswith(prefix))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.monotonic()
        self._last = 0.0
        self._first_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        step, total = trainer.global_step, trainer.max_steps
        last = total is not None and 0 < total <= step
        if not self.is_enabled or (now - self._last < self.interval and step != self._first_step + 1 and not last):
            return
        self._last = now
        elapsed, done = now - self._start, step - self._first_step
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total and total > 0 else f"step {step}"]
        metrics = self._metrics(trainer, pl_module)
        parts += [metrics] if metrics else []
        parts.append(f"{done / elapsed:.3g} steps/s" if elapsed > 0 and done > 0 else "")
        eta = f", eta {_clock(elapsed / done * (total - step))}" if total and total > 0 and done > 0 else ""
        parts.append(f"elapsed {_clock(elapsed)}{eta}")
        self.print(f"epoch {trainer.current_epoch} " + " | ".join(p for p in parts if p), flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.is_enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            metrics = self._metrics(trainer, pl_module, prefix="val")
            self.print(f"validation at step {trainer.global_step}: {metrics or 'done'}", flush=True)

    # ---- evaluation loops: a line per interval with the batch count ----
    def _eval_start(self) -> None:
        self._start = self._last = time.monotonic()

    def _eval_batch(self, trainer: Trainer, what: str, batch_idx: int, total: int | float) -> None:
        now = time.monotonic()
        if not self.is_enabled or trainer.sanity_checking or now - self._last < self.interval:
            return
        self._last = now
        of = f"/{int(total)}" if total != float("inf") else ""
        self.print(f"{what} batch {batch_idx + 1}{of} | elapsed {_clock(now - self._start)}", flush=True)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._eval_start()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dl: int = 0
    ) -> None:
        if trainer.state.fn != "fit":  # inside fit the training lines cover it
            self._eval_batch(trainer, "validation", batch_idx, trainer.num_val_batches[dl])

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start()

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dl: int = 0
    ) -> None:
        self._eval_batch(trainer, "test", batch_idx, trainer.num_test_batches[dl])

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start()

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dl: int = 0
    ) -> None:
        self._eval_batch(trainer, "predict", batch_idx, trainer.num_predict_batches[dl])
