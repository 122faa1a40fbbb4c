"""Save a resumable checkpoint when a run is stopped with Ctrl+C or SIGTERM, and say how to resume."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


class InterruptCheckpoint(Callback):
    """On KeyboardInterrupt or SIGTERM during fit, write ``last.ckpt`` where ModelCheckpoint keeps it.

    Lightning turns SIGTERM into an exception raised between batches, so that checkpoint is exact;
    Ctrl+C can land mid-step, in which case the run resumes from the last completed step.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training:
            return
        cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        dirpath = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir)
        path = dirpath / (ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        kind = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl+C"
        rank_zero_info(
            f"\n{kind}: saved {path} at step {trainer.global_step}. Resume with:\n  {resume_command()}\n"
        )
