"""Every private Lightning attribute minillm relies on, in one place.

Lightning has no public API for these facts; each function says why we need it and falls back to a
safe approximation if the attribute moves. ``tests/test_lightning_private.py`` checks every attribute on a
real ``Trainer`` after a real fit, so an upgrade that renames one fails loudly there instead of quietly
degrading logging or resume here.
"""

from __future__ import annotations

import signal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint


def will_log(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this batch's step metrics to the loggers (its ``log_every_n_steps`` rule,
    which also counts accumulation steps), so callbacks compute costly metrics only when they are written."""
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # moved: count optimizer steps instead
        n = trainer.log_every_n_steps
        return bool(n) and trainer.global_step % n == 0


def logged_step(trainer: L.Trainer) -> int:
    """The step value Lightning's loggers use for the current batch (``_batches_that_stepped``; it differs
    from ``global_step`` under manual optimization with several optimizer steps per batch)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def batches_done_in_epoch(trainer: L.Trainer | None) -> int:
    """Training batches already processed in the current epoch: where a resumed data loader must continue."""
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def mark_last_saved(trainer: L.Trainer) -> None:
    """Tell every ModelCheckpoint that ``last.ckpt`` is current, so its ``on_train_end`` does not rewrite our
    mid-epoch save of the final step with an "epoch finished" copy (which would break exact resume)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and hasattr(cb, "_last_checkpoint_saved"):
            cb._last_checkpoint_saved = True


def last_saved_step(trainer: L.Trainer) -> int:
    """The global step of the checkpoint callback's most recent save (-1 when none or unknown)."""
    return int(getattr(trainer.checkpoint_callback, "_last_global_step_saved", -1))


def forget_unfinished_batch(checkpoint: dict) -> None:
    """In a checkpoint taken after Ctrl+C landed mid-step, count the interrupted batch as never fetched.

    Lightning's batch progress then reads e.g. ready=started=11, processed=completed=10. On resume it rolls its
    per-epoch counters back to ``completed`` but not the run-wide ``total`` ones, which decide when validation runs
    (``val_check_interval`` with ``check_val_every_n_epoch: null``): every later validation, best-checkpoint choice
    and RegressionSuite round came one step early. Here ``ready`` and ``started`` go back to ``processed`` (the
    batches whose optimizer step ran; the data loader resumes after those, see :func:`batches_done_in_epoch`).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loop.get("epoch_loop.batch_progress")
    if not isinstance(progress, dict):
        return
    for part in ("total", "current"):
        counts = progress.get(part)
        if isinstance(counts, dict) and counts.get("ready", 0) > counts.get("processed", 0):
            counts["ready"] = counts["started"] = counts["processed"]


def requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
    """The signal on which Lightning's SLURM auto-requeue writes ``hpc_ckpt_N.ckpt`` and requeues the job (SIGUSR1
    unless the SLURMEnvironment plugin says otherwise), or None when auto-requeue is not armed. Lightning keeps the
    cluster environment on its private accelerator connector (a single-device strategy has none of its own)."""
    env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    if not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
        return None
    return env.requeue_signal
