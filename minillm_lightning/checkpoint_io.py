"""Checkpoint files written atomically in their own folder, whatever filesystem ``$TMPDIR`` is on.

Lightning's default writer stages a local checkpoint in ``$TMPDIR`` (an fsspec transaction) and moves it into
place. Where ``$TMPDIR`` is another filesystem (``/tmp`` on tmpfs, a node-local scratch disk with checkpoints on
NFS or Lustre) that move is a copy, and a process killed during it leaves a truncated ``last.ckpt`` and a full-size
temporary file behind. :class:`AtomicCheckpointIO` writes ``.<name>.<pid>.tmp`` beside the target, flushes it to
disk and renames it over the target (one ``os.replace``: a reader sees the old file or the new one). Temporary files
of writers that were killed are removed at the next save. Remote paths (``s3://``, ...) keep Lightning's writer.
``minillm fit|validate|test|predict`` install it (``trainer_cli.run_lightning``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.tmp`` files beside ``target`` left by writers that no longer run; returns them."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_torch_save(obj: Any, target: Path) -> None:
    """``torch.save(obj)`` to ``target`` through a temporary file in the same folder, flushed, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local saves through :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))
