"""TrainingSummary: at the end of fit, a short text summary of the run, printed and written to summary.json."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from minillm_lightning.callbacks.common import GIB, StatefulCallback
from minillm_lightning.callbacks.gradient_health import GradientHealthMonitor
from minillm_lightning.callbacks.memory_guard import MemoryGuard
from minillm_lightning.callbacks.regression_suite import RegressionSuite
from minillm_lightning.callbacks.system_stats import SystemMonitor
from minillm_lightning.callbacks.throughput import Throughput
from minillm_lightning.fileio import write_json

MAX_DISTINCT_WARNINGS = 20
NO_THROUGHPUT = "not measured: add the callback minillm_lightning.callbacks.Throughput"
# PPO's batches are prompts; its rollouts time themselves (time/generate_s, time/update_s)
NO_PPO_THROUGHPUT = "not measured for PPO, whose batches are prompts: see time/generate_s and time/update_s"


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _warning_text(message: Any, category: type) -> str:
    lines = str(message).strip().splitlines()
    return f"{category.__name__}: {(lines[0] if lines else '')[:200]}"


class WarningLog:
    """Counts the Python warnings shown while it is started (and keeps the first distinct messages), passing each
    on to the ``warnings.showwarning`` it found.

    ``minillm fit`` starts :data:`PRE_FIT_WARNINGS` before it parses the config: a :class:`TrainingSummary` takes
    its warnings when fit starts, so warnings shown while the model and data are built and set up (e.g. a stage's
    "arch.n_layer=2 ignored: the architecture comes from init_from ...") count as well as those shown in fit."""

    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []
        self._hook: Any = None  # the function installed as warnings.showwarning by the latest start()
        self._previous: Any = None  # what it replaced
        self._generation = 0

    def start(self) -> None:
        self.stop()
        self.count, self.messages = 0, []
        self._generation += 1
        generation, previous = self._generation, warnings.showwarning

        def show(message: Any, category: type, filename: str, lineno: int, *args: Any) -> None:
            # a hook of an earlier start() that another hook still wraps only passes warnings on
            if self._generation == generation:
                self.count += 1
                text = _warning_text(message, category)
                if text not in self.messages and len(self.messages) < MAX_DISTINCT_WARNINGS:
                    self.messages.append(text)
            previous(message, category, filename, lineno, *args)

        self._hook, self._previous = show, previous
        warnings.showwarning = show

    def stop(self) -> None:
        self._generation += 1  # the installed hook counts no more
        if self._hook is not None and warnings.showwarning is self._hook:
            warnings.showwarning = self._previous
        self._hook = self._previous = None

    def take(self) -> tuple[int, list[str]]:
        """The count and distinct messages so far; the log stops and starts over empty."""
        self.stop()
        taken = self.count, self.messages
        self.count, self.messages = 0, []
        return taken


PRE_FIT_WARNINGS = WarningLog()


class TrainingSummary(StatefulCallback):
    """At the end of fit, print a short summary (rank zero) and write ``<run dir>/summary.json``.

    The run dir is ``trainer.log_dir`` (resolved on every rank in ``on_fit_start``, as it is a collective). The
    summary holds the final and best value of ``monitor`` (tracked at every validation round, kept across
    resumes), the run's average throughput (from the :class:`Throughput` callback, the one place tokens/s is
    measured; without it the summary says so), the latest and best regression pass rate
    (:class:`RegressionSuite`), the counters of :class:`GradientHealthMonitor` and :class:`MemoryGuard` (threshold
    warnings, whether a leak was reported) and the last :class:`SystemMonitor` reading when those callbacks are
    used, the Python warnings shown during fit (count and the distinct messages; under ``minillm fit`` also those
    shown while the model and data were built, see :data:`PRE_FIT_WARNINGS`), and every scalar in
    ``trainer.callback_metrics``.

    Args:
        monitor: validation metric whose final and best values are reported.
        mode: ``min`` or ``max``: which value of ``monitor`` is best.
        filename: name of the JSON file in the run dir.
    """

    def __init__(self, monitor: str = "val/loss", mode: Literal["min", "max"] = "min", filename: str = "summary.json"):
        if mode not in ("min", "max"):
            raise ValueError(f"TrainingSummary.mode must be min or max, got {mode!r}")
        self.monitor, self.mode, self.filename = monitor, mode, filename
        self._run_dir: Path | None = None
        self._t0 = 0.0
        # global_step when this process's training started (after a resume: where it resumed); None while the
        # training loop has not started (a resumed run that had reached max_steps never starts it)
        self._first_step: int | None = 0
        self._showwarning: Any = None
        # state kept in checkpoints
        self.final: float | None = None
        self.final_step = -1
        self.best: float | None = None
        self.best_step = -1
        self.validation_rounds = 0
        self.warning_count = 0
        self.warning_messages: list[str] = []

    # ---- collecting ----
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: all ranks
        self._t0 = time.perf_counter()
        self._first_step = None
        count, messages = PRE_FIT_WARNINGS.take()  # shown while the model and data were built (minillm fit)
        self.warning_count += count
        for text in messages:
            self._keep_message(text)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._record_warning  # shows it as before, and counts it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # restored by now (on_fit_start runs before the loops are)

    def _record_warning(self, message: Any, category: type, filename: str, lineno: int, *args: Any) -> None:
        self.warning_count += 1
        self._keep_message(_warning_text(message, category))
        self._showwarning(message, category, filename, lineno, *args)

    def _keep_message(self, text: str) -> None:
        if text not in self.warning_messages and len(self.warning_messages) < MAX_DISTINCT_WARNINGS:
            self.warning_messages.append(text)

    def _restore_warnings(self) -> None:
        if self._showwarning is not None and warnings.showwarning == self._record_warning:
            warnings.showwarning = self._showwarning
        self._showwarning = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validation_rounds += 1
        value = _scalar(trainer.callback_metrics.get(self.monitor))
        if value is None or not math.isfinite(value):
            return
        self.final, self.final_step = value, trainer.global_step
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_step = value, trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_warnings()

    # ---- the summary ----
    def collect(self, trainer: L.Trainer) -> dict[str, Any]:
        """The summary as a JSON-ready dict."""
        module = trainer.lightning_module
        elapsed = time.perf_counter() - self._t0
        first = trainer.global_step if self._first_step is None else self._first_step
        out: dict[str, Any] = {
            "stage": getattr(module, "stage_name", type(module).__name__),
            "global_step": trainer.global_step,
            "steps_this_run": trainer.global_step - first,
            "resumed_at_step": first or None,
            "epoch": trainer.current_epoch,
            "stopped_early": bool(trainer.should_stop),
            "fit_time_s": round(elapsed, 2),
            "validation": {
                "monitor": self.monitor,
                "mode": self.mode,
                "final": self.final,
                "final_step": self.final_step,
                "best": self.best,
                "best_step": self.best_step,
                "rounds": self.validation_rounds,
                "val_check_interval": getattr(trainer, "val_check_interval", None),
            },
        }

        def find(cls: type) -> Any:
            return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)

        if (tp := find(Throughput)) is not None:
            out["throughput"] = tp.summary()
        else:
            ppo = getattr(module, "stage_name", None) == "ppo"
            out["throughput"] = {
                "tokens": None,
                "tokens_per_sec": None,
                "note": NO_PPO_THROUGHPUT if ppo else NO_THROUGHPUT,
            }
        if (rs := find(RegressionSuite)) is not None:
            last = rs.history[-1] if rs.history else {}
            out["regression"] = {
                "evaluations": len(rs.history),
                "pass_rate": last.get("pass_rate"),
                "step": last.get("step"),
                "best_pass_rate": rs.best_pass_rate,
                "best_step": rs.best_step,
                "failing": last.get("failed", []),
                "validation_rounds": rs.rounds,
                "interval": rs.interval,
            }
        if (gh := find(GradientHealthMonitor)) is not None:
            out["gradient_health"] = {k: getattr(gh, k) for k in GradientHealthMonitor.state_attrs}
        if (mg := find(MemoryGuard)) is not None:
            out["memory"] = {
                "peak_rss_gib": mg.peak_rss / GIB,
                "peak_cuda_gib": mg.peak_cuda / GIB,
                "threshold_warnings": mg.warnings_issued,
                "leak_reported": mg.leak_reported,
            }
        if (sm := find(SystemMonitor)) is not None:
            out["system"] = sm.summary()
        out["warnings"] = {"count": self.warning_count, "distinct": self.warning_messages}
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        out["metrics"] = {k: v for k, v in sorted(metrics.items()) if v is not None}
        return out

    @staticmethod
    def render(summary: dict[str, Any]) -> str:
        """The summary as a few lines of text."""
        v, tp = summary["validation"], summary.get("throughput", {})
        lines = [
            f"training summary ({summary['stage']}): {summary.get('steps_this_run', summary['global_step'])} steps in "
            f"{summary['fit_time_s']:.1f}s"
            + (
                f" (resumed at step {summary['resumed_at_step']}, now at step {summary['global_step']})"
                if summary.get("resumed_at_step")
                else ""
            )
            + (" (stopped early)" if summary["stopped_early"] else ""),
            f"  {v['monitor']}: " + TrainingSummary._validation_text(summary),
            f"  throughput: {_fmt(tp.get('tokens_per_sec'), ',.0f')} tokens/s"
            + (f" ({tp['note']})" if tp.get("note") else "")
            + (f", {_fmt(tp['tflops_per_device'], '.3g')} TFLOP/s per device" if tp.get("tflops_per_device") else "")
            + (f", MFU {tp['mfu']:.1%}" if tp.get("mfu") else ""),
        ]
        if r := summary.get("regression"):
            if r["pass_rate"] is None:  # no evaluation yet: "n/a (step None), best n/a (step -1)" said nothing
                every = "every" if (r.get("interval") or 1) <= 1 else f"every {_ordinal(r['interval'])}"
                lines.append(
                    f"  regression pass rate: no round ran (the suite runs {every} validation round; "
                    f"{r.get('validation_rounds', 0)} ran before this run stopped at step {summary['global_step']})"
                )
            else:
                lines.append(
                    f"  regression pass rate: {_fmt(r['pass_rate'], '.2f')} (step {r['step']}), best "
                    f"{_fmt(r['best_pass_rate'], '.2f')} (step {r['best_step']})"
                )
        if g := summary.get("gradient_health"):
            lines.append(
                f"  gradients: {g['nonfinite_steps']} non-finite steps ({g['skipped_steps']} skipped), "
                f"{g['loss_spikes']} loss spikes, max norm {g['max_norm']:.4g}"
            )
        if m := summary.get("memory"):
            lines.append(
                f"  memory: peak RSS {m['peak_rss_gib']:.2f} GiB, {m['threshold_warnings']} threshold warnings"
                + (", leak reported" if m["leak_reported"] else "")
            )
        w = summary["warnings"]
        lines.append(f"  warnings: {w['count']}" + "".join(f"\n    - {msg}" for msg in w["distinct"][:5]))
        return "\n".join(lines)

    @staticmethod
    def _validation_text(summary: dict[str, Any]) -> str:
        v = summary["validation"]
        if v["final"] is not None:
            return f"final {_fmt(v['final'])} (step {v['final_step']}), best {_fmt(v['best'])} (step {v['best_step']})"
        if v.get("rounds"):
            return f"no finite value in {v['rounds']} validation rounds (not logged, or NaN)"
        interval = v.get("val_check_interval")
        return f"no validation round ran before this run stopped at step {summary['global_step']}" + (
            f" (trainer.val_check_interval={interval})" if interval is not None else ""
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_warnings()
        if not trainer.is_global_zero:
            return
        summary = self.collect(trainer)
        path = (self._run_dir or Path(trainer.default_root_dir)) / self.filename
        write_json(path, summary)
        rank_zero_info(self.render(summary) + f"\n  written to {path}")

    state_attrs = (
        "final",
        "final_step",
        "best",
        "best_step",
        "validation_rounds",
        "warning_count",
        "warning_messages",
    )


__all__ = ["PRE_FIT_WARNINGS", "TrainingSummary", "WarningLog"]
