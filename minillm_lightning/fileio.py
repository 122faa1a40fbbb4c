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


def read_yaml_config(path: str | os.PathLike, option: str = "--config") -> dict[str, Any]:
    """A YAML config file as a dict (empty for an empty file), or a ConfigError naming ``option``, the file and,
    for a syntax error, its line and column: jsonargparse reports those as "<unicode string>", line N, which
    says nothing about which of several ``--config`` files is broken."""
    import yaml

    from minillm_lightning.errors import ConfigError, type_name

    where = f"{option} {path}"
    if Path(path).is_dir():
        raise ConfigError(f"{where} is a directory; give a YAML file such as configs/pretrain_tiny.yaml")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds {type_name(data)}, not a mapping of settings (e.g. `trainer:`, `model:`)")
    return data


def check_config_file(path: str | os.PathLike, option: str = "--config") -> None:
    """A ConfigError naming ``path`` unless it is a YAML mapping of settings: :func:`read_yaml_config`'s faults, and
    an empty (or comments-only) file, for which jsonargparse says only "Unexpected config:"."""
    from minillm_lightning.errors import ConfigError

    if not read_yaml_config(path, option):
        raise ConfigError(f"{option} {path} holds no settings (empty or only comments); fill or drop it")
