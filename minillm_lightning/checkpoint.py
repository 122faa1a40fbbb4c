"""Reading minillm checkpoints outside Lightning: clear errors for bad files, and the backbone + tokenizer
rebuilt from the checkpoint file alone."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from minillm_lightning.errors import CheckpointError
from minillm_lightning.model import MiniGPT, MiniGPTConfig

META_KEY = "minillm"  # {"stage": ..., "arch": MiniGPTConfig dict, "format": 1}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"use another checkpoint from the same directory (e.g. best.ckpt or an older step)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def is_intact(path: str | os.PathLike) -> bool:
    """True when the file is a complete zip archive whose every member passes its CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def newest_intact_checkpoint(dirs: list[str | os.PathLike]) -> tuple[Path | None, list[Path]]:
    """The checkpoint ``--ckpt_path last`` should resume from, and the damaged ones skipped on the way.

    ``last*.ckpt`` files come first (newest first), then any other checkpoint in the same directories,
    newest first, so a truncated ``last.ckpt`` falls back to the most recent intact save.
    """
    files = {p for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ckpt")}
    ordered = sorted(files, key=lambda p: (not p.name.startswith("last"), -p.stat().st_mtime))
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


def load_backbone(path: str | os.PathLike, map_location: str = "cpu") -> tuple[MiniGPT, dict[str, Any]]:
    """Rebuild the trained MiniGPT of any stage checkpoint; returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    meta = checkpoint_meta(ckpt, str(path))
    config = MiniGPTConfig.from_dict(meta["arch"])
    config.gradient_checkpointing = False
    model = MiniGPT(config)
    missing, unexpected = model.load_state_dict(backbone_state(ckpt["state_dict"]), strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: backbone weights do not match its config (missing {missing[:3]})")
    return model.eval(), ckpt
