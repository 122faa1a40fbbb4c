"""The arguments of ``minillm bench``, kept apart from the measurements so that ``minillm bench --help`` and a
mistyped option answer at once instead of after importing torch and Lightning."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minillm_lightning.commands import CommandParser
from minillm_lightning.fileio import check_config_file

SECTIONS = ("train", "loop", "decode", "data", "dpo", "serve", "eval", "profile", "nanostep")
# the profile and the serving benchmark (it starts a server per config) are asked for by name
DEFAULT_SECTIONS = [s for s in SECTIONS if s not in ("profile", "serve", "nanostep")]
DEFAULT_CONFIGS = ["configs/pretrain_tiny.yaml", "configs/pretrain_small.yaml"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CommandParser(
        prog="minillm bench",
        description="Training, decoding and data-preparation speed of configs; see docs/performance.md.",
    )
    p.add_argument(
        "--config", action="append", default=None, help=f"config to measure (repeatable; default {DEFAULT_CONFIGS})"
    )
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps run before measuring (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="alternating Lightning / plain-loop repetitions (median)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--precision", default=None, help="override the configs' trainer.precision (e.g. 32-true)")
    p.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but profile, serve and nanostep; "
        "nanostep: a training step of our block against nanoGPT's at its shape, needs --nanogpt)",
    )
    p.add_argument("--decode-lengths", type=_ints, default=[128, 256, 512], help="new tokens per decode run")
    p.add_argument("--beam-length", type=int, default=128, help="new tokens of the beam search vs greedy run")
    p.add_argument(
        "--eval-vocab", type=int, default=None, help="eval section: vocabulary of its random model (default: config's)"
    )
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak FLOP/s (cpu 2048, gpu 8192)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run, e.g. data.init_args.batch_size=8 (repeatable)",
    )
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--fit-wall", metavar="CONFIG", default=None, help="time a complete `minillm fit --config CONFIG`")
    p.add_argument("--keep", action="store_true", help="--fit-wall: run in the current directory and keep the run")
    p.add_argument(
        "--nanogpt",
        metavar="PATH",
        type=Path,
        default=None,
        help="run nanoGPT's CPU Shakespeare-char recipe from this nanoGPT checkout, then --fit-wall (default "
        "configs/shakespeare_char.yaml), and print both wall times and the ratio; with --sections nanostep (and "
        "no --fit-wall): only the per-step comparison",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="--sections nanostep: also time our eager AdamW step with its SwiGLU narrowed to nanoGPT's MLP "
        "parameter count, then with LayerNorm, no RoPE, a GELU MLP, and all three, in place of ours (where the "
        "difference goes)",
    )
    p.add_argument("--nanogpt-iters", type=int, default=2000, help="--nanogpt: iterations of nanoGPT's recipe")
    p.add_argument(
        "--nanogpt-text",
        type=Path,
        default=Path("data/tinyshakespeare/input.txt"),
        help="--nanogpt: Tiny Shakespeare text for nanoGPT's prepare.py (instead of its download)",
    )
    args = p.parse_args(argv)
    for config in args.config or []:  # a broken file: one line naming it (jsonargparse names no file)
        check_config_file(config)
    if args.fit_wall is not None:
        check_config_file(args.fit_wall, "--fit-wall")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    if not args.decode_lengths or min(args.decode_lengths) < 1:
        p.error(f"--decode-lengths must be new-token counts >= 1, e.g. 128,256; got {args.decode_lengths}")
    if args.beam_length < 1:
        p.error(f"--beam-length must be >= 1 (new tokens of the beam search run), got {args.beam_length}")
    bad = set((args.sections or ",".join(SECTIONS)).split(",")) - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {','.join(SECTIONS)}")
    if "nanostep" in (args.sections or "").split(",") and args.nanogpt is None:
        p.error("--sections nanostep compares against nanoGPT: give --nanogpt PATH (a nanoGPT checkout)")
    if args.ablate and "nanostep" not in (args.sections or "").split(","):
        p.error("--ablate adds rows to the per-step comparison: use it with --sections nanostep")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def bench_main(argv: list[str]) -> dict[str, Any]:
    """``minillm bench``: parse first (help and bad options need no torch), then import and run the measurements;
    returns the results it prints."""
    args = parse_args(argv)
    from minillm_lightning.bench.main import run_bench

    return run_bench(args)
