"""Save a resumable checkpoint when a run is stopped with Ctrl+C or SIGTERM, and say how to resume."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from minillm_lightning.lightning_private import last_saved_step, mark_last_saved


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same arguments with ``--ckpt_path last``."""
    argv = list(sys.argv if argv is None else argv)
    out, skip = ["minillm"], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        out.append(a)
    return shlex.join(out + ["--ckpt_path", "last"])


def is_worker_crash(exception: BaseException) -> bool:
    """PyTorch's error when a DataLoader worker process exits unexpectedly (killed, out of memory, segfault)."""
    return isinstance(exception, RuntimeError) and "DataLoader worker" in str(exception)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` in the first ModelCheckpoint's directory (where ``--ckpt_path last`` looks)."""
    cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    dirpath = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir)
    return dirpath / (ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


class InterruptCheckpoint(Callback):
    """Keep ``last.ckpt`` resumable: write it on Ctrl+C or SIGTERM, and at the end of fit.

    Lightning turns SIGTERM into an exception raised between batches, so that checkpoint is exact;
    Ctrl+C can land mid-step, in which case the run resumes from the last completed step. At the end
    of fit ``last.ckpt`` is refreshed when training moved on since ModelCheckpoint last wrote it
    (ModelCheckpoint only saves on its own schedule, e.g. after validation).

    Why not Lightning's ``OnExceptionCheckpoint``: it saves on *every* exception (a NaN guard or a data error
    would then leave a checkpoint of a broken state as the newest one), writes its own file instead of the
    ``last.ckpt`` that ``--ckpt_path last`` resumes, deletes that file again in ``teardown``, prints no resume
    command, and does nothing for the final-step save described in ``on_train_batch_end``.

    Args:
        save_on_train_end: refresh ``last.ckpt`` when fit ends.
    """

    def __init__(self, save_on_train_end: bool = True) -> None:
        self.save_on_train_end = save_on_train_end
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # the last step of a max_steps run: save while the loops still say "mid-epoch", so that a later
        # `--ckpt_path last` with a larger max_steps continues the same epoch exactly (a save at the end of
        # the epoch or of fit comes after Lightning marked the epoch finished: the resumed run would start a
        # new epoch). A validation at this step still updates best.ckpt and last.ckpt afterwards. The shipped
        # configs set ModelCheckpoint(save_on_train_epoch_end=False) so it does not overwrite this save with an
        # "epoch finished" copy when the run stops mid-epoch.
        if self.save_on_train_end and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.save_on_train_end or self._saved_step == trainer.global_step:
            return
        if last_saved_step(trainer) != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.checkpoint_callbacks and trainer.global_step > 0 and self._saved_step != trainer.global_step:
            trainer.save_checkpoint(last_checkpoint_path(trainer))
            self._saved_step = trainer.global_step
            mark_last_saved(trainer)  # ModelCheckpoint would otherwise rewrite it in on_train_end

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        worker_died = is_worker_crash(exception)
        fitting = trainer.state.fn == "fit"  # also mid-validation or sanity check inside fit
        if not (isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or worker_died) or not fitting:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        kind = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl+C"
        kind = "A DataLoader worker died" if worker_died else kind
        rank_zero_info(f"\n{kind}: saved {path} at step {trainer.global_step}. Resume with:\n  {resume_command()}\n")
