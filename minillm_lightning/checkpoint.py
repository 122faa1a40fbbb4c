"""Reading minillm checkpoints outside Lightning: clear errors for bad files, and the backbone + tokenizer
rebuilt from the checkpoint file alone."""

from __future__ import annotations

import codecs
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from minillm_lightning.errors import CheckpointError
from minillm_lightning.model import MiniGPT, MiniGPTConfig

META_KEY = "minillm"  # {"stage": ..., "arch": MiniGPTConfig dict, "format": 1}


ZIP_MAGIC = b"PK\x03\x04"  # torch.save (and so every Lightning checkpoint) writes a zip archive
_RETRY = "use another checkpoint from the same directory (e.g. best.ckpt or an older step)"


def _not_a_checkpoint(path: Path, head: bytes) -> CheckpointError:
    """The error for a file that is not a zip archive at all; says what it looks like instead."""
    try:  # an incremental decoder accepts a character cut off at the end of the sample
        sample = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        sample = None
    if not head:
        what = "it is empty (0 bytes)"
    elif sample is not None and all(c.isprintable() or c in "\t\r\n" for c in sample):
        what = "it holds text"
    else:
        what = "it is some other binary format"
    return CheckpointError(
        f"{path} is not a minillm checkpoint: {what}, not the zip archive `minillm fit` writes (.ckpt); "
        f"pass a checkpoint such as checkpoints/<run>/last.ckpt"
    )


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint with tensors and plain data only (``weights_only``), refusing bad files in one line.

    With ``mmap`` the tensors stay in the file, read only where used: for a check of the metadata of a checkpoint
    that Lightning then loads itself (milliseconds instead of a second read of gigabytes). Only where the tensors
    are dropped at once: a mapped file replaced in place (``cp`` over it) kills the process with SIGBUS.

    A file that is not a zip archive (a text file, an empty file) is "not a minillm checkpoint"; a zip archive
    that is cut short or whose CRCs do not match (a partial copy, a bit flip in the weights, which torch itself
    would load silently) is "corrupted or truncated".

    Raises:
        CheckpointError: the file is missing, a directory, unreadable, not a checkpoint, or damaged.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass a .ckpt file in it (e.g. {path / 'last.ckpt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if not head.startswith(ZIP_MAGIC):
        raise _not_a_checkpoint(path, head)
    if not is_intact(path):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (zip archive damaged); {_RETRY}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # an intact archive holding objects other than tensors and plain data
        raise CheckpointError(
            f"{path} is not a minillm checkpoint: it holds Python objects a minillm checkpoint never contains "
            f"({str(e).splitlines()[-1][:200]})"
        ) from None
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError, KeyError, ... on archives it cannot read)
        raise CheckpointError(
            f"{path} is not a minillm checkpoint: a zip archive torch.load cannot read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a minillm checkpoint: a PyTorch file without a Lightning state_dict")
    return ckpt


def is_intact(path: str | os.PathLike) -> bool:
    """True when the file is a complete zip archive whose every member passes its CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def newest_intact_checkpoint(
    dirs: list[str | os.PathLike], extra: list[Path] | None = None
) -> tuple[Path | None, list[Path]]:
    """The checkpoint ``--ckpt_path last`` should resume from, and the damaged ones skipped on the way.

    ``last*.ckpt`` files and SLURM's requeue checkpoints (``hpc_ckpt_N.ckpt``, which ``extra`` may add from
    outside ``dirs``) come first, newest first, then any other checkpoint in the same directories, newest
    first, so a truncated ``last.ckpt`` falls back to the most recent intact save.
    """
    files = {p for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ckpt")}
    known = {p.resolve() for p in files}
    files |= {p for p in extra or [] if p.resolve() not in known}  # the same file by another path counts once
    ordered = sorted(files, key=lambda p: (not p.name.startswith(("last", "hpc_ckpt_")), -p.stat().st_mtime))
    skipped: list[Path] = []
    for path in ordered:
        if is_intact(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def checkpoint_meta(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    meta = ckpt.get(META_KEY)
    if meta is None:
        raise CheckpointError(f"{source} was not written by minillm-lightning (no '{META_KEY}' entry)")
    return meta


def backbone_state(state_dict: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The MiniGPT weights of a stage checkpoint (the stage keeps its backbone as ``self.model``)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_backbone_weights(model: MiniGPT, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy the backbone weights of a stage checkpoint's ``state_dict`` into ``model``, in place.

    With tied embeddings the output head is the embedding matrix, so a state dict without ``lm_head.weight``
    is complete; any other missing or unexpected weight is an error.

    Raises:
        CheckpointError: the weights do not fit ``model``'s architecture (``source`` names the file in the message).
    """
    missing, unexpected = model.load_state_dict(backbone_state(state_dict), strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: backbone weights do not match its architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was the checkpoint written by another version of minillm-lightning?"
        )


def load_backbone(path: str | os.PathLike, map_location: str = "cpu") -> tuple[MiniGPT, dict[str, Any]]:
    """Rebuild the trained MiniGPT of any stage checkpoint; returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    meta = checkpoint_meta(ckpt, str(path))
    config = MiniGPTConfig.from_dict(meta["arch"])
    config.gradient_checkpointing = False
    model = MiniGPT(config)
    load_backbone_weights(model, ckpt["state_dict"], str(path))
    return model.eval(), ckpt
