"""``minillm curves``: a run's TensorBoard curves as a table in the terminal, for machines without a browser.

minillm curves checkpoints/ppo_tiny --tags env/reward_mean objective/kl 'val/*'
minillm curves checkpoints/ppo_a checkpoints/ppo_b --tags val/reward_mean     # two runs side by side

Each scalar gets its first and last value, the means of its first and last part (a fifth by default: a noisy
curve such as PPO's reward reads better as "first fifth -> last fifth" than as two single points), and its
minimum and maximum. A run resumed with ``--ckpt_path`` writes a new ``tb/version_N``; the versions are read in
the order they were written and a step logged twice keeps its later value, so the table shows the whole run; a
version that starts over (a new run in the same folder) replaces the ones before it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

from minillm_lightning.commands import CommandParser
from minillm_lightning.errors import DataError


@dataclass(frozen=True)
class Curve:
    """One scalar of a run: its (step, value) points in step order."""

    tag: str
    steps: list[int]
    values: list[float]

    def part_means(self, parts: int) -> tuple[float, float]:
        """Means of the first and of the last ``1/parts`` of the points (at least one point each)."""
        n = max(1, len(self.values) // parts)
        return math.fsum(self.values[:n]) / n, math.fsum(self.values[-n:]) / n


def event_dirs(run: Path) -> list[Path]:
    """The folders holding event files of ``run``: ``run`` itself when it holds them (a ``tb/version_N``), else
    every ``tb/version_*`` (or any folder below ``run`` with event files), oldest first. Logs of several runs
    (``checkpoints/`` holding ``pretrain_tiny/tb`` and ``sft_tiny/tb``) are refused: the error lists them."""
    if not run.exists():
        raise DataError(f"{run} does not exist; give a run folder such as checkpoints/sft_tiny")
    if any(run.glob("events.out.tfevents.*")):
        return [run]
    dirs = {p.parent for p in run.rglob("events.out.tfevents.*")}
    if not dirs:
        raise DataError(
            f"no TensorBoard event files under {run}; train first (minillm fit --config ...) or point at the "
            f"run's folder (the config's trainer.logger save_dir)"
        )
    runs = sorted({str(d.parent if d.name.startswith("version_") else d) for d in dirs})
    if len(runs) > 1:
        raise DataError(f"{run} holds {len(runs)} runs' logs; name one of them: {', '.join(runs)}")
    return sorted(dirs, key=lambda d: max(f.stat().st_mtime for f in d.glob("events.out.tfevents.*")))


def read_curves(run: Path) -> tuple[list[Curve], list[Path]]:
    """Every scalar under ``run`` (see :func:`event_dirs`) and the folders they came from. Folders are merged in
    the order written (a resumed run continues in a new one); a folder whose first step is not after the steps
    read so far is a fresh run in the same place, and replaces them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = {}
    used: list[Path] = []
    for folder in event_dirs(run):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        found = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags().get("scalars", [])}
        first = min((min(p) for p in found.values() if p), default=None)
        if first is None:
            continue
        if points and first <= min(min(p) for p in points.values()):
            points, used = {}, []
        for tag, p in found.items():
            points.setdefault(tag, {}).update(p)
        used.append(folder)
    return [Curve(tag, sorted(p), [p[s] for s in sorted(p)]) for tag, p in sorted(points.items())], used


def select(curves: list[Curve], patterns: list[str] | None, run: Path | None = None) -> list[Curve]:
    """The curves whose tag matches one of ``patterns`` (shell-style, ``val/*``), in pattern order; ``run`` names
    the run in the error."""
    if not patterns:
        return curves
    out: list[Curve] = []
    for pattern in patterns:
        hits = [c for c in curves if fnmatch.fnmatchcase(c.tag, pattern) and c not in out]
        if not hits:
            tags = ", ".join(c.tag for c in curves)
            raise DataError(f"no scalar matches --tags {pattern!r}; {run or 'the run'} has: {tags}")
        out.extend(hits)
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def table(curves: list[Curve], parts: int, runs: list[str] | None = None) -> str:
    """The markdown table ``minillm curves`` prints; with ``runs`` (one name per curve) a first column names the
    run of each row."""
    part = "fifth" if parts == 5 else f"1/{parts}"
    lead = "| run " if runs else ""
    rows = [
        f"{lead}| tag | points | steps | first | first {part} (mean) | last {part} (mean) | last | min | max |",
        ("|---" if runs else "") + "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(curves):
        head, tail = c.part_means(parts)
        finite = [v for v in c.values if math.isfinite(v)] or [math.nan]
        cells = [c.values[0], head, tail, c.values[-1], min(finite), max(finite)]
        steps = f"{c.steps[0]}-{c.steps[-1]}"
        name = f"| {runs[i]} " if runs else ""
        rows.append(f"{name}| {c.tag} | {len(c.values)} | {steps} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return "\n".join(rows)


def curves_main(argv: list[str]) -> None:
    p = CommandParser(
        prog="minillm curves",
        description="Print a run's TensorBoard scalars as a table: first and last value, the means of the first "
        "and last part of each curve, minimum and maximum. Reads every tb/version_* of the run (a resumed run "
        "continues in a new version). Several runs: one table, each tag's rows side by side.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="run",
        help="the run's folder (e.g. checkpoints/ppo_tiny), its tb/ folder or one tb/version_N; several to compare",
    )
    p.add_argument("--tags", nargs="+", help="scalars to show, shell-style patterns such as 'val/*' (default: all)")
    p.add_argument("--parts", type=int, default=5, help="average the first and the last 1/PARTS of each curve")
    args = p.parse_args(argv)
    if args.parts < 1:
        p.error(f"--parts must be at least 1, got {args.parts}")
    rows: list[tuple[str, Curve]] = []
    for arg in args.runs:
        run = Path(arg)
        curves, folders = read_curves(run)
        if not curves:
            raise DataError(f"the event files under {run} hold no scalars yet; wait for the first logged step")
        chosen = select(curves, args.tags, run)
        print(f"{run}: {len(chosen)} of {len(curves)} scalars, from {', '.join(str(f) for f in folders)}")
        rows.extend((arg, c) for c in chosen)
    if len(args.runs) > 1:  # each tag's rows together, runs in the order given
        order = {tag: i for i, tag in enumerate(dict.fromkeys(c.tag for _, c in rows))}
        rows.sort(key=lambda row: order[row[1].tag])
    print(table([c for _, c in rows], args.parts, [r for r, _ in rows] if len(args.runs) > 1 else None))
