"""Option and input validation of GradientHealthMonitor, MemoryGuard, RegressionSuite and TrainingSummary, the
one-value-per-step logging of GradientHealthMonitor under manual optimization, and docs/callbacks.md agreeing
with what TrainingSummary prints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT, micro_trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from minillm_lightning.callbacks import GradientHealthMonitor, MemoryGuard, RegressionSuite, TrainingSummary
from minillm_lightning.callbacks.training_summary import NO_THROUGHPUT, WarningLog
from minillm_lightning.errors import ConfigError, DataError

DOCS = ROOT / "docs" / "callbacks.md"
PASS = {"id": "passes", "prompt": "A duck says", "checks": [{"type": "not_contains", "value": "x"}]}


# ---- option ranges ----
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"clip_val": -1}, r"GradientHealthMonitor.clip_val must be > 0 or null .*, got -1"),
        ({"clip_val": 0}, r"GradientHealthMonitor.clip_val must be > 0 or null .*, got 0"),
        ({"max_consecutive_skips": -1}, r"GradientHealthMonitor.max_consecutive_skips must be >= 0 .*, got -1"),
        ({"warn_every_n_steps": -3}, r"GradientHealthMonitor.warn_every_n_steps must be >= 0 .*, got -3"),
        ({"layer_every_n_logs": -1}, r"GradientHealthMonitor.layer_every_n_logs must be >= 0 .*, got -1"),
    ],
)
def test_gradient_health_refuses_out_of_range_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        GradientHealthMonitor(**kw)


def test_gradient_health_accepts_the_documented_edges():
    mon = GradientHealthMonitor(clip_val=0.5, max_consecutive_skips=0, warn_every_n_steps=0, layer_every_n_logs=0)
    assert (mon.clip_val, mon.max_consecutive_skips, mon.layer_every_n_logs) == (0.5, 0, 0)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"leak_threshold_mb": -1}, r"MemoryGuard.leak_threshold_mb must be > 0 .*, got -1"),
        ({"leak_threshold_mb": 0}, r"MemoryGuard.leak_threshold_mb must be > 0 .*, got 0"),
        ({"leak_warmup_steps": -5}, r"MemoryGuard.leak_warmup_steps must be >= 0, got -5"),
    ],
)
def test_memory_guard_refuses_out_of_range_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        MemoryGuard(threshold=0.9, **kw)


# ---- RegressionSuite prompt files ----
def write_prompts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps(PASS), *lines]) + "\n")
    return path


def check_line(**check) -> str:
    return json.dumps({"id": "x", "prompt": "hi", "checks": [check]})


@pytest.mark.parametrize(
    "check, message",
    [
        ({"type": "no_repetition", "n": 3, "max_repeats": -1}, r"integer 'max_repeats' >= 1 .*, got -1"),
        ({"type": "no_repetition", "max_repeats": 0}, r"integer 'max_repeats' >= 1 .*, got 0"),
        ({"type": "no_repetition", "max_repeats": True}, r"integer 'max_repeats' >= 1 .*, got True"),
        ({"type": "no_repetition", "n": 0}, r"no_repetition check needs an integer 'n' >= 1, got 0"),
        ({"type": "no_repetition", "n": 2.5}, r"no_repetition check needs an integer 'n' >= 1, got 2.5"),
        ({"type": "contains", "value": "a", "ignore_case": "yes"}, r"'ignore_case' must be true or false, got 'yes'"),
        ({"type": "regex", "value": "a", "ignore_case": 1}, r"'ignore_case' must be true or false, got 1"),
    ],
)
def test_regression_check_fields_are_validated(tmp_path, check, message):
    path = write_prompts(tmp_path, check_line(**check))
    with pytest.raises(DataError, match=message) as err:
        RegressionSuite(prompt_files=str(path))
    assert str(err.value).startswith(f"{path}:2: ")


def test_regression_malformed_line_hint_fits_the_suite(tmp_path):
    """The suite has no skip_bad_records option, so its hint must not offer one."""
    path = write_prompts(tmp_path, '{"id": "x", "prompt": "hi", "checks": [')
    with pytest.raises(DataError, match=r"malformed JSON line .*; fix or delete the line$") as err:
        RegressionSuite(prompt_files=str(path))
    assert str(err.value).startswith(f"{path}:2: ") and "skip_bad_records" not in str(err.value)


# ---- GradientHealthMonitor under manual optimization ----
class StepLog(Logger):
    """Records every (metric name, step) pair written to it."""

    name, version = "steplog", 0

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[str, int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.pairs += [(k, step) for k in metrics]

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class ThreeUpdates(L.LightningModule):
    """Manual optimization with three optimizer updates per training step, as PPO makes several."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(3):
            loss = self.net(batch[0]).square().mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss.detach()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_manual_optimization_writes_one_value_per_logged_step(tmp_path):
    log, mon = StepLog(), GradientHealthMonitor(layer_every_n_logs=2)
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = micro_trainer(tmp_path, max_steps=12, log_every_n_steps=1, logger=log, callbacks=[mon])
    torch.manual_seed(0)
    trainer.fit(ThreeUpdates(), train_dataloaders=data)
    assert trainer.global_step == 12 and mon.steps == 12  # 4 batches of 3 updates
    for key in ("grad_health/grad_norm", "grad_health/update_ratio"):
        assert [s for k, s in log.pairs if k == key] == [0, 1, 2, 3]
    for group in ("net.0", "net.1"):  # every 2nd logged step (not every 2nd update), once each
        assert [s for k, s in log.pairs if k == f"grad_health/grad_norm/{group}"] == [1, 3]
        assert [s for k, s in log.pairs if k == f"grad_health/update_ratio/{group}"] == [1, 3]


# ---- TrainingSummary ----
def summary_of(*callbacks) -> dict:
    trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(stage_name="pretrain"), global_step=3, current_epoch=0, should_stop=False,
        callbacks=list(callbacks), callback_metrics={},
    )  # fmt: skip
    return TrainingSummary().collect(trainer)


def test_summary_memory_line_counts_the_leak_report():
    guard = MemoryGuard(threshold=0.9)
    guard.leak_reported, guard.peak_rss = True, 2**30
    summary = summary_of(guard)
    assert summary["memory"]["threshold_warnings"] == 0 and summary["memory"]["leak_reported"] is True
    assert "  memory: peak RSS 1.00 GiB, 0 threshold warnings, leak reported\n" in TrainingSummary.render(summary)
    guard.leak_reported, guard.warnings_issued = False, 2
    text = TrainingSummary.render(summary_of(guard))
    assert "  memory: peak RSS 1.00 GiB, 2 threshold warnings\n" in text
    assert "threshold warnings" in DOCS.read_text()


def test_summary_says_when_no_validation_or_regression_round_ran():
    """A run shorter than the validation interval printed "val/loss: final n/a (step -1), best n/a (step -1)" and
    "regression pass rate: n/a (step None), best n/a (step -1)"; now what did not run, and why."""
    suite = RegressionSuite(interval=2)
    suite.rounds = 1  # one validation round ran; the suite runs on every 2nd
    text = TrainingSummary.render(summary_of(suite))
    assert "n/a (step" not in text, text
    assert "  val/loss: no validation round ran before this run stopped at step 3\n" in text
    line = "  regression pass rate: no round ran (the suite runs every 2nd validation round; 1 ran before this run "
    assert line + "stopped at step 3)\n" in text
    suite.interval, suite.rounds = 1, 0
    summary = summary_of(suite)
    summary["validation"]["val_check_interval"] = 200
    text = TrainingSummary.render(summary)
    assert (
        "  val/loss: no validation round ran before this run stopped at step 3 (trainer.val_check_interval=200)" in text
    )
    assert "regression pass rate: no round ran (the suite runs every validation round; 0 ran before" in text
    summary["validation"]["rounds"] = 2  # validation ran but never logged the monitored metric
    assert "  val/loss: no finite value in 2 validation rounds (not logged, or NaN)\n" in TrainingSummary.render(
        summary
    )


def test_warning_log_counts_while_started_and_unhooks():
    """PRE_FIT_WARNINGS' kind of log: counts the warnings shown while started, passes them on, and when another hook
    wraps it and it starts again, the new hook counts each warning once (the old one only passes it on)."""
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args: shown.append(str(message))
        before = warnings.showwarning
        log = WarningLog()
        log.start()
        warnings.warn("one", UserWarning, stacklevel=1)
        warnings.warn("one", UserWarning, stacklevel=1)
        assert log.take() == (2, ["UserWarning: one"]) and warnings.showwarning is before
        log.start()
        inner = warnings.showwarning
        warnings.showwarning = lambda *args: inner(*args)  # another hook wraps the log's
        log.start()
        warnings.warn("two", UserWarning, stacklevel=1)
        assert log.take() == (1, ["UserWarning: two"])
    assert shown == ["one", "one", "two"]


def test_docs_describe_the_summary_without_throughput():
    summary = summary_of()
    assert summary["throughput"]["tokens"] is None
    line = f"throughput: n/a tokens/s ({NO_THROUGHPUT})"
    assert line in TrainingSummary.render(summary)
    docs = " ".join(DOCS.read_text().split())  # joined across line breaks
    assert f"`{line}`" in docs and "tokens counted here" not in docs
