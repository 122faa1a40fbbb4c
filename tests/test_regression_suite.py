"""Tests of RegressionSuite, Throughput, SystemMonitor and TrainingSummary on a micro model on the CPU.

The suite's prompts check for ``§never§``: the micro model decodes at most 4 new tokens and ``§`` alone is two
byte-fallback tokens, so no output can contain it; ``contains`` it always fails, ``not_contains`` always passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning.callbacks import RegressionSuite, SystemMonitor, Throughput, TrainingSummary, flops_per_token
from minillm_lightning.callbacks.regression_suite import DEFAULT_FILES, Check, load_prompts, parse_check
from minillm_lightning.callbacks.throughput import compute_dtype, device_peak_flops
from minillm_lightning.errors import DataError

NEVER = "§never§"
FAIL = {"id": "fails", "prompt": "3 plus 4 equals", "checks": [{"type": "contains", "value": NEVER}]}
PASS = {"id": "passes", "prompt": "A duck says", "checks": [{"type": "not_contains", "value": NEVER}]}


class RecordingLogger(Logger):
    """Keeps logged metrics and TensorBoard-style ``add_text`` calls; its save_dir is the run dir."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.texts: list[tuple[str, str, int]] = []
        self._experiment = SimpleNamespace(
            add_text=lambda tag, text, global_step: self.texts.append((tag, text, global_step))
        )

    name, version = "rec", 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def experiment(self) -> SimpleNamespace:
        return self._experiment

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {k for _, m in self.metrics for k in m}


@pytest.fixture
def dm(pretrain_dm_factory):
    return pretrain_dm_factory()


def micro_model(dm) -> PretrainModule:
    L.seed_everything(0)
    return PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, learning_rate=3e-3)


def prompt_file(tmp_path: Path, *records: dict | str, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def suite(path: Path, **kw) -> RegressionSuite:
    return RegressionSuite(prompt_files=[str(path)], max_new_tokens=4, **kw)


def fit(root: Path, dm, callbacks: list, max_steps: int = 4, ckpt_path: Path | None = None, **kw) -> L.Trainer:
    """Validation every 2 steps (one batch); logging every step."""
    trainer = micro_trainer(
        root, max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        log_every_n_steps=1, callbacks=callbacks, **kw,
    )  # fmt: skip
    trainer.fit(micro_model(dm), datamodule=dm, ckpt_path=ckpt_path)
    return trainer


# ---- checks ----
@pytest.mark.parametrize(
    "check, text, tokens, ok",
    [
        ({"type": "contains", "value": "7"}, "3 plus 4 equals 7.", [], True),
        ({"type": "contains", "value": "Quack"}, "a duck says quack", [], False),
        ({"type": "contains", "value": "Quack", "ignore_case": True}, "a duck says quack", [], True),
        ({"type": "not_contains", "value": "moo"}, "quack", [], True),
        ({"type": "not_contains", "value": "moo"}, "moo moo", [], False),
        ({"type": "regex", "value": r"^\s*7\b"}, " 7. 1 plus", [], True),
        ({"type": "regex", "value": r"^\s*7\b"}, " 17.", [], False),
        ({"type": "exact", "value": "Grass is green."}, " Grass is green.\n", [], True),
        ({"type": "exact", "value": "Grass is green."}, "Grass is green. Snow", [], False),
        ({"type": "max_length", "value": 3}, "a long text", [1, 2, 3], True),
        ({"type": "max_length", "value": 3}, "abc", [1, 2, 3, 4], False),
        ({"type": "max_length", "value": 3, "unit": "chars"}, "abcd", [1], False),
        ({"type": "max_length", "value": 4, "unit": "chars"}, "abcd", [1, 2, 3, 4, 5], True),
        ({"type": "no_repetition", "n": 2, "max_repeats": 2}, "", [1, 2, 1, 2, 3], True),
        ({"type": "no_repetition", "n": 2, "max_repeats": 2}, "", [1, 2, 1, 2, 1, 2], False),
        ({"type": "no_repetition", "n": 3, "max_repeats": 1}, "", [5, 5], True),  # shorter than n: nothing repeats
    ],
)
def test_check_types(check, text, tokens, ok):
    assert parse_check(check, "f:1")(text, tokens) is ok


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": "x", "prompt": "hi", "checks": [', "malformed JSON"),
        ({"id": "x", "prompt": "hi", "checks": [{"type": "startswith", "value": "a"}]}, "check type 'startswith'"),
        ({"id": "x", "prompt": "hi", "checks": []}, "'checks' must be a non-empty list"),
        ({"id": "x", "prompt": "hi", "messages": [], "checks": [PASS["checks"][0]]}, "exactly one of"),
        ({"id": "x", "prompt": "hi", "checks": [{"type": "regex", "value": "("}]}, "invalid regex"),
        ({"id": "x", "prompt": "hi", "checks": [{"type": "contains", "vlaue": "a"}]}, "unknown keys"),
        (
            {"id": "x", "prompt": "hi", "checks": [{"type": "max_length", "value": 5, "unit": "words"}]},
            "tokens or chars",
        ),
        ({"id": "x", "messages": [{"role": "user", "content": "hi"}], "chat": False, "checks": PASS["checks"]}, "chat"),
        (
            {"id": "x", "messages": [{"role": "assistant", "content": "a"}], "checks": PASS["checks"]},
            "ending with a user",
        ),
        ({**PASS, "max_new_tokens": 0}, "max_new_tokens"),
        (PASS, "duplicate prompt id 'passes'"),
    ],
)
def test_malformed_prompt_file_names_file_and_line(tmp_path, bad, message):
    path = prompt_file(tmp_path, PASS, bad)
    with pytest.raises(DataError, match=message) as err:
        RegressionSuite(prompt_files=str(path))
    assert f"{path}:2:" in str(err.value)


def test_missing_prompt_file():
    with pytest.raises(DataError, match="not found"):
        load_prompts(["no/such/prompts.jsonl"])


def test_shipped_prompt_files_and_stage_defaults():
    for files in DEFAULT_FILES.values():
        assert len(load_prompts(files)) >= 5
    assert all(p.chat is False for p in load_prompts(DEFAULT_FILES["pretrain"]))
    for stage, files in (("pretrain", DEFAULT_FILES["pretrain"]), ("sft", DEFAULT_FILES["chat"])):
        s = RegressionSuite()
        s.setup(None, SimpleNamespace(stage_name=stage), "fit")
        assert s.prompt_files == files


def test_env_overrides_interval(monkeypatch):
    monkeypatch.delenv("MINIGPT_REGRESSION_INTERVAL", raising=False)
    monkeypatch.setenv("MINILLM_REGRESSION_INTERVAL", "3")
    assert RegressionSuite(interval=1).interval == 3
    monkeypatch.setenv("MINILLM_REGRESSION_INTERVAL", "")  # empty: not set
    monkeypatch.setenv("MINIGPT_REGRESSION_INTERVAL", "0")  # the seed project's name still works
    assert RegressionSuite(interval=5).interval == 0
    monkeypatch.delenv("MINIGPT_REGRESSION_INTERVAL")
    assert RegressionSuite(interval=5).interval == 5
    monkeypatch.setenv("MINILLM_REGRESSION_INTERVAL", "often")
    with pytest.raises(ValueError, match="MINILLM_REGRESSION_INTERVAL='often'"):
        RegressionSuite()


# ---- the suite in a real Trainer ----
def test_half_passing_suite_logs_and_writes_json(tmp_path, dm):
    run_dir, logger = tmp_path / "run", RecordingLogger(tmp_path / "run")
    s = suite(prompt_file(tmp_path, FAIL, PASS), interval=0)
    trainer = fit(tmp_path, dm, [s], logger=logger)
    assert [h["step"] for h in s.history] == [2, 4]
    assert all(h["pass_rate"] == 0.5 and h["failed"] == ["fails"] for h in s.history)
    assert trainer.callback_metrics["regression/pass_rate"] == 0.5
    assert [m["regression/pass_rate"] for _, m in logger.metrics if "regression/pass_rate" in m] == [0.5, 0.5]
    assert sorted(p.name for p in (run_dir / "regression").iterdir()) == [
        "step_000002.json", "step_000004.json", "summary.json",
    ]  # fmt: skip
    step = json.loads((run_dir / "regression" / "step_000004.json").read_text())
    assert (step["pass_rate"], step["passed"], step["total"], step["stage"]) == (0.5, 1, 2, "pretrain")
    assert [(r["id"], r["passed"], r["chat"]) for r in step["results"]] == [
        ("fails", False, False),
        ("passes", True, False),
    ]
    assert step["results"][0]["output_tokens"] <= 4
    summary = json.loads((run_dir / "regression" / "summary.json").read_text())
    assert [h["pass_rate"] for h in summary["history"]] == [0.5, 0.5]
    assert (summary["best_pass_rate"], summary["best_step"], summary["rounds"]) == (0.5, 2, 2)
    assert [(tag, step) for tag, _, step in logger.texts] == [("regression/results", 2), ("regression/results", 4)]
    assert "| fails | FAIL |" in logger.texts[-1][1] and "| passes | PASS |" in logger.texts[-1][1]
    assert "pass rate 0.50 (1/2) at step 4" in s.summary()
    # a prompt longer than the model context is refused with its file:line
    long = SimpleNamespace(**{**vars(s.prompts[0]), "prompt": "plus " * 200})
    with pytest.raises(DataError, match=r"prompts.jsonl:1: prompt 'fails' is \d+ tokens"):
        s._encode(long, trainer.lightning_module.tokenizer, 128)


def test_interval_two_runs_every_other_validation_round(tmp_path, dm):
    s = suite(prompt_file(tmp_path, PASS), interval=2)
    fit(tmp_path, dm, [s], max_steps=8)
    assert s.rounds == 4
    assert [(h["round"], h["step"]) for h in s.history] == [(2, 4), (4, 8)]
    assert sorted(p.name for p in (tmp_path / "regression").glob("step_*.json")) == [
        "step_000004.json",
        "step_000008.json",
    ]


class BreakPrompt(Callback):
    """After optimizer step ``step``, gives the suite's prompt ``pid`` a check no output passes."""

    def __init__(self, suite: RegressionSuite, pid: str, step: int) -> None:
        self.suite, self.pid, self.step = suite, pid, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(p for p in self.suite.prompts if p.id == self.pid).checks = [Check("contains", NEVER)]


def test_drop_is_reported_and_stops_training(tmp_path, dm):
    other = {**PASS, "id": "other", "prompt": "The sky is"}
    s = suite(prompt_file(tmp_path, PASS, other), interval=0, drop_threshold=0.2, stop_on_drop=True)
    with pytest.warns(UserWarning, match=r"pass rate fell from 1.00 \(step 2\) to 0.50 at step 4.*Failing now: other"):
        trainer = fit(tmp_path, dm, [BreakPrompt(s, "other", 3), s], max_steps=10)
    assert trainer.global_step == 4  # stopped at the validation that saw the drop
    assert [h["pass_rate"] for h in s.history] == [1.0, 0.5]
    assert (s.best_pass_rate, s.best_step, s.best_passed) == (1.0, 2, ["passes", "other"])


def test_state_survives_resume(tmp_path, dm):
    path = prompt_file(tmp_path, FAIL, PASS)
    first = suite(path, interval=2)
    trainer = fit(tmp_path, dm, [first], max_steps=4)
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    assert ([h["step"] for h in first.history], first.rounds) == ([4], 2)
    resumed = suite(path, interval=2)
    fit(tmp_path, dm, [resumed], max_steps=10, ckpt_path=ckpt)
    # rounds go on counting from 2: round 4 (step 8) runs; a fresh count would have run at step 8 only
    assert resumed.rounds == 5
    assert [h["step"] for h in resumed.history] == [4, 8]
    assert (resumed.best_pass_rate, resumed.best_step) == (0.5, 4)
    summary = json.loads((tmp_path / "regression" / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [4, 8]


def test_training_summary_counts_the_steps_of_a_resumed_run(tmp_path, dm):
    """After a resume at step 4 of 10 the summary said "10 steps in <this process's time>"; it now counts the 6
    steps this process ran and says where it resumed."""
    trainer = fit(tmp_path, dm, [TrainingSummary()], max_steps=4)
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    fit(tmp_path, dm, [TrainingSummary()], max_steps=10, ckpt_path=ckpt)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["global_step"], summary["steps_this_run"], summary["resumed_at_step"]) == (10, 6, 4)
    assert TrainingSummary.render(summary).startswith("training summary (pretrain): 6 steps in ")
    assert "(resumed at step 4, now at step 10)" in TrainingSummary.render(summary)


# ---- throughput ----
def test_flops_per_token_hand_count():
    """MICRO_ARCH with a 100-token vocabulary: d=64, 4 heads of 16, 2 kv heads (dkv=32), SwiGLU width
    I = 64 * ceil(int(8*64/3) / 64) = 192, 2 layers, tied embeddings.

    attention projections per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288
    MLP per layer: 3 * 64 * 192 = 36864
    N = 2 * (12288 + 36864) + lm_head 100*64 = 98304 + 6400 = 104704
    training at T=32: 6*N + 12*L*d_attn*T = 628224 + 12*2*64*32 = 628224 + 49152 = 677376
    forward only: 2*N + 4*L*d_attn*T = 209408 + 16384 = 225792
    """
    arch = MiniGPTConfig(**MICRO_ARCH, vocab_size=100)
    assert arch.intermediate_size == 192
    assert flops_per_token(arch, 32) == 677376
    assert flops_per_token(arch, 32, training=False) == 225792
    moe = MiniGPTConfig(**MICRO_ARCH, vocab_size=100, n_experts=4, top_k=2, n_shared_experts=1)
    # router 64*4 per layer, and three experts' MLPs (two routed + one shared) instead of one
    assert flops_per_token(moe, 32) == 677376 + 6 * 2 * (64 * 4 + 2 * 36864)


def test_training_summary_throughput_and_system_stats(tmp_path, dm):
    run_dir, logger = tmp_path / "run", RecordingLogger(tmp_path / "run")
    s = suite(prompt_file(tmp_path, FAIL, PASS), interval=0)
    callbacks = [s, Throughput(window_size=2, peak_flops=1e12), SystemMonitor(every_n_steps=2), TrainingSummary()]
    trainer = fit(tmp_path, dm, callbacks, max_steps=6, logger=logger)
    summary = json.loads((run_dir / "summary.json").read_text())
    final = trainer.callback_metrics["val/loss"].item()
    assert summary["validation"]["final"] == pytest.approx(final)
    assert summary["validation"]["final_step"] == 6
    assert summary["validation"]["best"] <= final
    assert summary["metrics"]["val/loss"] == pytest.approx(final)
    assert (summary["regression"]["pass_rate"], summary["regression"]["failing"]) == (0.5, ["fails"])
    tp = summary["throughput"]
    assert tp["tokens"] == 6 * 8 * 64 and tp["tokens_per_sec"] > 0 and 0 < tp["mfu"] < 1
    assert summary["system"]["system/rss_gib"] > 0
    keys = logger.keys()
    assert {"throughput/tokens_per_sec", "throughput/tflops_per_device", "throughput/mfu"} <= keys
    assert {"system/cpu_percent", "system/process_cpu_percent", "system/ram_percent", "system/rss_gib"} <= keys
    assert [step for step, m in logger.metrics if "system/rss_gib" in m] == [1, 3, 5]  # steps 2, 4, 6 (0-based log)
    text = TrainingSummary.render(summary)
    assert "val/loss: final" in text and "regression pass rate: 0.50" in text and "MFU" in text


def test_device_peak_flops(monkeypatch):
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200"
    )  # missing from Lightning's table
    assert device_peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and compute_dtype("32-true") is torch.float32
