"""``minillm bench --nanogpt PATH``: nanoGPT's CPU Shakespeare-char recipe, then ours, wall clock side by side.

nanoGPT is not part of this project (nor vendored): point the option at a checkout of
https://github.com/karpathy/nanoGPT. Its recipe is the one its README gives for a CPU ("baby GPT": 4 layers,
4 heads, width 128, context 64, batch 12, 2000 iterations, no dropout, eval_iters 20). Its data are prepared with
its own ``data/shakespeare_char/prepare.py``; the text it would download is copied there from ``--nanogpt-text``
first, so nothing is fetched. Its checkpoints go to a temporary directory.

nanoGPT's val loss is estimated on ``eval_iters=20`` random batches of the last 10% of the text; ours
(``val/nats_per_char``) is computed on the whole split. Both are nats per character of the same text.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from minillm_lightning.errors import MiniLLMError

BATCH, BLOCK = 12, 64
README_RECIPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    f"--block_size={BLOCK}",
    f"--batch_size={BATCH}",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
]
_EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
_ITER = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def prepare_nanogpt(checkout: Path, text: Path) -> None:
    """Run nanoGPT's own character-level preparation on ``text`` (copied in as its ``input.txt``)."""
    data = checkout / "data" / "shakespeare_char"
    if not (checkout / "train.py").is_file() or not (data / "prepare.py").is_file():
        raise MiniLLMError(f"--nanogpt {checkout}: not a nanoGPT checkout (no train.py / data/shakespeare_char)")
    if not text.is_file():
        raise MiniLLMError(f"--nanogpt-text {text}: no such file (minillm download tinyshakespeare)")
    if not (data / "input.txt").is_file():
        shutil.copyfile(text, data / "input.txt")
    if not (data / "train.bin").is_file():
        proc = subprocess.run([sys.executable, "prepare.py"], cwd=data, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nanoGPT prepare.py failed:\n{(proc.stdout + proc.stderr)[-2000:]}")


def run_nanogpt(checkout: Path, text: Path, iters: int = 2000) -> dict[str, Any]:
    """nanoGPT's README CPU recipe for ``iters`` iterations: wall clock of ``python train.py`` and its last eval."""
    prepare_nanogpt(checkout, text)
    eval_interval = 250 if iters % 250 == 0 else iters  # the README's 250, or one eval at the end
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as out:
        cmd = [sys.executable, "train.py", *README_RECIPE, f"--max_iters={iters}", f"--lr_decay_iters={iters}"]
        cmd += [f"--eval_interval={eval_interval}", f"--out_dir={out}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"nanoGPT train.py failed ({proc.returncode}):\n{log[-3000:]}")
    evals = _EVAL.findall(log)
    if not evals:
        raise RuntimeError(f"nanoGPT printed no evaluation line:\n{log[-2000:]}")
    step, train_loss, val_loss = evals[-1]
    # nanoGPT prints each iteration's wall time; the median leaves out the iterations that ran an evaluation
    iter_ms = [float(ms) for it, ms in _ITER.findall(log) if int(it) > 0]
    median_ms = statistics.median(iter_ms) if iter_ms else None
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": wall,
        "iters": iters,
        "final_step": int(step),
        "train_loss": float(train_loss),
        "val_loss": float(val_loss),
        "median_ms_per_iter": median_ms,
        "tokens_per_sec": BATCH * BLOCK / median_ms * 1000 if median_ms else None,
    }


def format_nanogpt(nano: dict[str, Any], ours: dict[str, Any]) -> str:
    """A Markdown table: nanoGPT's recipe and ours, wall clock, validation nats/char, training tokens/s (median
    over the logged steps) and the ratios: wall, and the cost per training token (nanoGPT's tokens/s over ours;
    the cost per step too when both recipes take the same tokens per step)."""
    ratio = ours["wall_s"] / nano["wall_s"]
    ours_val = ours.get("val_nats_per_char")
    nano_tps, ours_tps = nano.get("tokens_per_sec"), ours.get("tokens_per_sec")
    token_ratio = f"**x{nano_tps / ours_tps:.2f}**" if nano_tps and ours_tps else "-"
    return "\n".join(
        [
            "",
            "| run | last eval at step | wall (s) | val nats/char | training tokens/s (median) |",
            "|---|---:|---:|---:|---:|",
            f"| nanoGPT CPU recipe | {nano['final_step']} | {nano['wall_s']:.1f} | {nano['val_loss']:.3f} | "
            + (f"{nano_tps:,.0f} |" if nano_tps else "- |"),
            f"| minillm {ours['config']} | {ours.get('final_step', '-')} | {ours['wall_s']:.1f} | "
            + (f"{ours_val:.3f} | " if ours_val is not None else "- | ")
            + (f"{ours_tps:,.0f} |" if ours_tps else "- |"),
            f"| ours / nanoGPT (wall; cost per token) | | **x{ratio:.2f}** | | {token_ratio} |",
        ]
    )
