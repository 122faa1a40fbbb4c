"""Small file helpers the package shares: atomic writes and an exclusive lock across processes.

Every report, statistics file and completion marker is written with :func:`atomic_write_text` (a temporary
file in the same folder, then ``os.replace``), so a reader or a resumed run never sees half a file, whatever
interrupts the writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_writable_dir(folder: Path, option: str) -> None:
    """Raise a MiniLLMError naming ``option`` unless files can be created in ``folder`` (made if missing): checked
    before a long job, so that its result is not lost to an unwritable path at the end."""
    from minillm_lightning.errors import MiniLLMError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise MiniLLMError(f"{option}: cannot write in {folder} ({e.strerror}); choose a writable path") from None


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented UTF-8 JSON at ``path``, atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Serialises one-off work that several processes may start at once (every DDP rank builds the data module):
    the first holder does it, the others wait and then find it done.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
