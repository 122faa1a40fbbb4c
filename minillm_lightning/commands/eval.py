"""``minillm eval``: zero-shot benchmarks of a checkpoint, from local copies of the data sets (``--data-dir``,
default ``data/eval``; a missing file is downloaded there unless ``--no-download``).

minillm eval --checkpoint checkpoints/pretrain_tiny/best.ckpt
minillm eval --checkpoint ckpt.ckpt --tasks hellaswag,piqa --limit 200 --device cuda
minillm eval --checkpoint ckpt.ckpt --tasks wikitext2 --text my_notes.txt     # perplexity of any text file too
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from minillm_lightning.checkpoint import checkpoint_meta, load_backbone
from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import CheckpointError, DataError, MiniLLMError
from minillm_lightning.eval import TASKS, LogLikelihoodScorer, harness_lm, results_table, run_tasks
from minillm_lightning.fileio import check_writable_dir, write_json
from minillm_lightning.tokenizer import Tokenizer

# --harness: our task names -> lm-evaluation-harness task names
HARNESS_TASKS = {"wikitext2": "wikitext", "lambada": "lambada_openai"}


DEFAULT_DATA_DIR = Path("data/eval")  # relative to the working directory; missing files are downloaded into it


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="minillm eval",
        description="Zero-shot evaluation (lm-eval-harness prompt formats and metrics) of a checkpoint of any stage.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt) of any stage; it carries its tokenizer")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks among {', '.join(TASKS)} (default: all)",
    )
    p.add_argument(
        "--text", action="append", default=[], help="also report perplexity and bits per byte of this text file"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"directory of the task files; missing ones are downloaded into it (default: {DEFAULT_DATA_DIR})",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--no-download", action="store_true", help="fail on a missing task file instead of downloading it")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (>= 1)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="perplexity: tokens a rolling window advances (default block_size/2; with --harness block_size, as "
        "lm-eval's own backends); --stride <block_size> feeds every token once: about twice as fast, with less "
        "context for the first tokens of each window",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights dtype while scoring"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results JSON (default: <checkpoint dir>/eval_<checkpoint stem>_<YYYYmmdd-HHMMSS>.json)",
    )
    p.add_argument(
        "--harness",
        action="store_true",
        help="run the tasks through lm-evaluation-harness (pip install 'lm_eval>=0.4.10,<0.5') instead of the "
        "built-in scorer; its task names are accepted too",
    )
    p.add_argument(
        "--harness-include",
        type=Path,
        default=None,
        help="--harness: directory of lm-eval task YAMLs to use instead of lm-eval's own (keeps lookups local)",
    )
    return p


def check_text_file(path: Path, option: str) -> None:
    """A file to score must exist, be a file, hold something and be UTF-8; else one DataError naming it."""
    if path.is_dir():
        raise DataError(f"{option} {path} is a directory; give a text file")
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{option} {path} is empty; there is no text to score")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{option} {path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8 "
            f"(e.g. iconv -f GBK -t UTF-8)"
        ) from None


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA device is available; use --device cpu")
    return "cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu")


def _check_harness_tasks(names: list[str], known: list[str], include: Path | None) -> None:
    """Each of ``names`` must be a task, group or tag lm-eval knows (or a task YAML file); else one MiniLLMError."""
    for name in names:
        if name in known or Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        elif include:
            hint = f"; it has {', '.join(known[:10])}{', ...' if len(known) > 10 else ''}" if known else "; it has none"
        else:
            hint = ""
        where = f"the task YAMLs of --harness-include {include}" if include else "lm-eval's tasks"
        raise MiniLLMError(f"--tasks: unknown lm-eval task {name!r}, not among {where}{hint}")


def _run_harness(scorer: LogLikelihoodScorer, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    lm = harness_lm(scorer, stride=args.stride)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [HARNESS_TASKS.get(t, t) for t in tasks]
    if args.harness_include:
        manager = TaskManager(
            include_path=str(args.harness_include), include_defaults=False, metadata={"data_dir": str(args.data_dir)}
        )
    else:
        manager = TaskManager()
    _check_harness_tasks(names, manager.all_tasks, args.harness_include)
    try:
        out = simple_evaluate(model=lm, tasks=names, limit=args.limit, task_manager=manager, log_samples=False)
    except OSError as e:  # ConnectionError from the Hub included: lm-eval loads every task's data set first
        which = f"task {names[0]!r}" if len(names) == 1 else f"one of the tasks {', '.join(map(repr, names))}"
        raise MiniLLMError(
            f"--harness: the data of {which} could not be fetched or read ({e}); without network, write task "
            f"YAMLs that read local copies of the data and pass their folder with --harness-include DIR "
            f"(docs/inference.md, lm-evaluation-harness)"
        ) from None
    return {name: {k: v for k, v in metrics.items() if k != "alias"} for name, metrics in out["results"].items()}


def eval_main(argv: list[str]) -> None:
    """``minillm eval``: score the tasks, print a table, write the results JSON next to the checkpoint."""
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise MiniLLMError("--limit must be >= 1")
    if args.batch_size < 1:
        raise MiniLLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stride is not None and args.stride < 1:
        raise MiniLLMError(f"--stride must be >= 1 (tokens a window advances), got {args.stride}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] + [f"text:{p}" for p in args.text]
    tasks = list(dict.fromkeys(tasks))  # a task named twice is scored once
    if not tasks:
        raise MiniLLMError(f"no tasks to evaluate: give --tasks (among {', '.join(TASKS)}) or --text FILE")
    if args.harness_include is not None and not args.harness:
        raise MiniLLMError("--harness-include names task YAMLs for --harness; add --harness or drop it")
    if args.harness_include is not None and not args.harness_include.is_dir():
        what = "is a file" if args.harness_include.exists() else "does not exist"
        raise MiniLLMError(
            f"--harness-include {args.harness_include} {what}; give the folder of your lm-eval task YAMLs"
        )
    if args.harness and args.text:
        raise MiniLLMError("--text is scored by the built-in scorer only; drop --harness or --text")
    if not args.harness:
        unknown = [t for t in tasks if t not in TASKS and not t.startswith("text:")]
        if unknown:
            raise MiniLLMError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    for t in tasks:
        if t.startswith("text:"):
            check_text_file(Path(t[5:]), "--text")
    args.data_dir = args.data_dir or DEFAULT_DATA_DIR
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise MiniLLMError(f"--data-dir {args.data_dir} is a file; give the directory holding the task files")
    ckpt_path = Path(args.checkpoint)
    if args.output is not None and args.output.is_dir():
        raise MiniLLMError(f"--output {args.output} is a directory; give the results file's path")
    model, ckpt = load_backbone(ckpt_path)
    check_writable_dir(args.output.parent if args.output else ckpt_path.parent, "--output")  # before the scoring
    try:
        tokenizer = Tokenizer.from_checkpoint(ckpt, str(ckpt_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    stage = checkpoint_meta(ckpt, str(ckpt_path)).get("stage", "unknown")
    block = int(model.config.block_size)
    if args.stride is not None and args.stride > block:
        raise MiniLLMError(f"--stride {args.stride} exceeds the model's context block_size={block}; give 1..{block}")
    device = _device(args.device)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    scorer = LogLikelihoodScorer(model, tokenizer, batch_size=args.batch_size)
    print(
        f"evaluating {ckpt_path} ({stage}, {model.num_parameters() / 1e6:.2f}M parameters) on {device}", file=sys.stderr
    )
    t0 = time.perf_counter()
    if args.harness:
        results = _run_harness(scorer, tasks, args)
    else:
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        results = run_tasks(scorer, tasks, args.data_dir, args.limit, not args.no_download, args.stride, log)
    stamp = datetime.now()
    report = {
        "checkpoint": str(ckpt_path.resolve()),
        "stage": stage,
        "arch": checkpoint_meta(ckpt)["arch"],
        "parameters": model.num_parameters(),
        "timestamp": stamp.isoformat(timespec="seconds"),
        "settings": {
            "tasks": tasks,
            "data_dir": str(Path(args.data_dir).resolve()),
            "limit": args.limit,
            "batch_size": args.batch_size,
            "stride": args.stride or model.config.block_size // 2,
            "device": device,
            "dtype": args.dtype,
            "scorer": "lm-evaluation-harness" if args.harness else "minillm",
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    out = args.output or ckpt_path.parent / f"eval_{ckpt_path.stem}_{stamp:%Y%m%d-%H%M%S}.json"
    write_json(out, report)
    if not args.harness:
        print(results_table(results))
    else:
        print(json.dumps(results, indent=2))
    print(f"results written to {out}", file=sys.stderr)
