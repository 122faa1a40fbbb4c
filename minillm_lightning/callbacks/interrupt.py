"""Save a resumable checkpoint when a run is stopped with Ctrl+C or SIGTERM, and say how to resume; keep SLURM's
auto-requeue checkpoint exact."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from minillm_lightning.errors import worker_crash_report
from minillm_lightning.lightning_private import (
    forget_unfinished_batch,
    last_saved_step,
    mark_last_saved,
    requeue_signal,
)


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


def is_worker_crash(exception: BaseException | None) -> bool:
    """Whether ``exception`` is, or was caused by, a DataLoader worker's unexpected exit."""
    return worker_crash_report(exception) is not None


def await_worker_report(seconds: float = 2.0) -> RuntimeError | None:
    """Wait for PyTorch's report of a dead DataLoader worker; None if none comes within ``seconds``.

    PyTorch learns of a dead worker from SIGCHLD: its handler raises the report in the main thread, at
    whatever line runs then. A worker killed while the main process is fetching a batch it sent first breaks
    that channel (``ConnectionResetError``, ``ConnectionRefusedError``, ``EOFError``), and its SIGCHLD comes
    a few milliseconds later, once the kernel has torn the process down. Waiting here takes that report in a
    known place instead of in the middle of the checkpoint save or of Lightning's teardown.
    """
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers only run in the main thread
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except RuntimeError as report:
        if is_worker_crash(report):
            return report
        raise
    return None


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` in the first ModelCheckpoint's directory (where ``--ckpt_path last`` looks)."""
    cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    dirpath = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir)
    return dirpath / (ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


class InterruptCheckpoint(Callback):
    """Keep ``last.ckpt`` resumable: write it on Ctrl+C or SIGTERM, and at the end of fit.

    Lightning turns SIGTERM into an exception raised between batches, so that checkpoint is exact;
    Ctrl+C can land mid-step, in which case the run resumes from the last completed step (the interrupted batch is
    counted as never fetched, :func:`~minillm_lightning.lightning_private.forget_unfinished_batch`). A stop before
    the run's first training step saves nothing: the ``last.ckpt`` there (of this run being resumed, or of an
    earlier run the user may have meant to resume) is left as it was. At the end
    of fit ``last.ckpt`` is refreshed when training moved on since ModelCheckpoint last wrote it
    (ModelCheckpoint only saves on its own schedule, e.g. after validation).

    Why not Lightning's ``OnExceptionCheckpoint``: it saves on *every* exception (a NaN guard or a data error
    would then leave a checkpoint of a broken state as the newest one), writes its own file instead of the
    ``last.ckpt`` that ``--ckpt_path last`` resumes, deletes that file again in ``teardown``, prints no resume
    command, and does nothing for the final-step save described in ``on_train_batch_end``.

    Under SLURM with auto-requeue (Lightning's default there), the requeue signal (SIGUSR1; ``#SBATCH
    --signal=SIGUSR1@90``) makes Lightning write ``hpc_ckpt_N.ckpt`` from inside its signal handler, so in the
    middle of a step, and requeue the job; the requeued job resumes from it. That save gets the same treatment as
    a Ctrl+C save, so the resumed run validates and checkpoints on the uninterrupted run's schedule.

    Args:
        save_on_train_end: refresh ``last.ckpt`` when fit ends.
    """

    def __init__(self, save_on_train_end: bool = True) -> None:
        self.save_on_train_end = save_on_train_end
        self._saved_step = -1
        self._first_step: int | None = None  # global_step when this fit's training began; None before that
        self._saving_interrupt = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resume: the restored step
        self._wrap_requeue_handler(trainer)

    def _wrap_requeue_handler(self, trainer: L.Trainer) -> None:
        """Mark Lightning's SLURM requeue save as taken mid-step (see the class docstring). Lightning installed
        the handler when fit started and puts the previous one back when fit ends."""
        sig = requeue_signal(trainer)
        if sig is None or threading.current_thread() is not threading.main_thread():
            return
        lightning_handler = signal.getsignal(sig)
        if not callable(lightning_handler) or getattr(lightning_handler, "marks_mid_step_save", False):
            return

        def handler(signum: int, frame: object) -> None:
            self._saving_interrupt = True
            try:
                lightning_handler(signum, frame)
            finally:
                self._saving_interrupt = False

        handler.marks_mid_step_save = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saving_interrupt:
            forget_unfinished_batch(checkpoint)

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
            trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)
            self._saved_step = trainer.global_step
            mark_last_saved(trainer)  # ModelCheckpoint would otherwise rewrite it in on_train_end

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit":  # fit includes its validation and sanity check
            return
        worker_died = is_worker_crash(exception)
        if not worker_died and isinstance(exception, (ConnectionError, EOFError)):
            report = await_worker_report()  # a worker killed while handing over a batch
            if report is not None:
                exception.__cause__ = report  # so that the CLI's worker-crash message applies
                worker_died = True
        if not (isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or worker_died):
            return
        path = last_checkpoint_path(trainer)
        kind = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl+C"
        kind = "A DataLoader worker died" if worker_died else kind
        if self._first_step is None or trainer.global_step == self._first_step:
            rank_zero_info(f"\n{kind} before this run's first training step: nothing saved ({path} left as it was)\n")
            return
        for attempt in range(3):
            self._saving_interrupt = True
            try:
                # written atomically: an interrupted save leaves no file
                trainer.save_checkpoint(path, weights_only=False)
                break
            except RuntimeError as report:
                # a worker's death reported mid-save (e.g. SIGTERM sent to the whole process group): PyTorch
                # reports each dead worker once, so the next attempt is not interrupted by the same one
                if attempt == 2 or not is_worker_crash(report):
                    raise
                worker_died = True
                kind = "A DataLoader worker died"
            finally:
                self._saving_interrupt = False
        rank_zero_info(f"\n{kind}: saved {path} at step {trainer.global_step}. Resume with:\n  {resume_command()}\n")
