"""``minillm bench --fit-wall CONFIG``: the wall clock of a whole ``minillm fit`` run as a subprocess, and the final
validation numbers it logged to TensorBoard."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from minillm_lightning.errors import MiniLLMError


def _events_file(workdir: Path, config: str, since: float) -> Path | None:
    """The newest TensorBoard events file the run wrote under its logger/root directory."""
    import yaml

    trainer_cfg = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer", {}) or {}
    logger = trainer_cfg.get("logger")
    save_dir = logger.get("init_args", {}).get("save_dir") if isinstance(logger, dict) else None
    roots = [d for d in (save_dir, trainer_cfg.get("default_root_dir"), "lightning_logs") if d]
    found = [p for r in roots if (workdir / r).is_dir() for p in (workdir / r).rglob("events.out.tfevents.*")]
    found = [p for p in found if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def fit_wall(config: str, keep: bool, overrides: list[str]) -> dict[str, Any]:
    """Time ``minillm fit --config config`` as a subprocess and read its final validation numbers.

    Without ``keep`` the run happens in a temporary directory that mirrors the current one through symbolic links
    (so relative data paths and the tokenizer/token cache are shared) except ``checkpoints/`` and
    ``lightning_logs/``, where it writes its own.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config_path = str(Path(config).resolve())
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "fit", "--config", config_path]
    cmd += [o if o.startswith("--") else "--" + o for o in overrides]
    with tempfile.TemporaryDirectory(prefix="minillm-fit-") as tmp:
        workdir = Path.cwd() if keep else Path(tmp)
        if not keep:
            for entry in Path.cwd().iterdir():
                if entry.name not in ("checkpoints", "lightning_logs"):
                    (workdir / entry.name).symlink_to(entry.resolve())
        since = time.time() - 1
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        if proc.returncode:
            lines = [line for line in log.splitlines() if line.strip()]
            said = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "")
            raise MiniLLMError(f"minillm fit --config {config} failed (exit {proc.returncode}): {said.strip()}")
        out: dict[str, Any] = {
            "config": config,
            "wall_s": wall,
            "tokenizer": next((s for s in ("trained", "reused from cache") if f"({s})" in log), "given"),
            "token_cache": "built" if "\ntokenized " in "\n" + log else "reused",
            "run_dir": str(workdir) if keep else None,
        }
        events = _events_file(workdir, config_path, since)
        if events is None:
            out["note"] = "no TensorBoard events found: val/loss and val/nats_per_char unknown"
            return out
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "throughput/tokens_per_sec" in tags:  # median over the logged steps: the per-step cost
            out["tokens_per_sec"] = statistics.median(e.value for e in acc.Scalars("throughput/tokens_per_sec"))
        for tag in ("val/loss", "val/nats_per_char", "train/loss"):
            if tag in tags:
                last = acc.Scalars(tag)[-1]
                out[tag.replace("/", "_")] = last.value
                out["final_step"] = max(out.get("final_step", 0), last.step)
    return out
