"""`minillm pipeline --recipe real`: split the corpora, train each stage, score it before and after on held-out data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE

from minillm_lightning.commands.pipeline import _verdict, real_report


def _data_dir(tmp_path: Path) -> Path:
    """The shipped samples laid out as `minillm download` lays out real corpora: <role>/*.jsonl."""
    data = tmp_path / "corpora"
    for role, name in (("pretrain", "pretrain.jsonl"), ("sft", "sft.jsonl"), ("preference", "preference.jsonl")):
        (data / role).mkdir(parents=True)
        shutil.copy(SAMPLE / name, data / role / name)
    return data


def test_real_recipe_splits_trains_and_scores_before_and_after(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    data = _data_dir(tmp_path)
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "pipeline", "--recipe", "real", "--data-dir", str(data)]
    cmd += ["--output", "out", "--max_steps", "2", "--stages", "pretrain,sft,reward"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    split = tmp_path / "out" / "data_tiny"
    for role in ("pretrain", "sft", "preference"):
        report = json.loads((split / role / "split.json").read_text())
        lines = {s: (split / role / f"{s}.jsonl").read_text().splitlines() for s in ("train", "val", "test")}
        assert report["records"] == {s: len(v) for s, v in lines.items()}
        assert lines["test"] and not set(lines["test"]) & set(lines["train"])  # held out for real
    # the generated configs read the split: training never sees the test file
    sft = yaml.safe_load((tmp_path / "out" / "configs" / "sft_tiny.yaml").read_text())["data"]["init_args"]
    assert sft["sources"] == ["out/data_tiny/sft/train.jsonl"] and sft["test_sources"] == [
        "out/data_tiny/sft/test.jsonl"
    ]
    assert yaml.safe_load((tmp_path / "out" / "configs" / "sft_tiny.yaml").read_text())["model"]["init_args"][
        "init_from"
    ].startswith("out/pretrain_tiny/")
    for stage, metric in (("pretrain", "test/loss"), ("sft", "test/loss"), ("reward", "test/accuracy")):
        done = json.loads((tmp_path / "out" / f"{stage}_tiny" / "DONE.json").read_text())
        assert metric in done["test"]["before"] and metric in done["test"]["after"], stage
    pretrain = json.loads((tmp_path / "out" / "pretrain_tiny" / "DONE.json").read_text())["test"]
    # two warm-up steps need not lower the loss; the two scores are of different weights, both real numbers
    assert pretrain["after"]["test/loss"] != pretrain["before"]["test/loss"]
    assert all(0 < v < 20 for v in (pretrain["after"]["test/loss"], pretrain["before"]["test/loss"]))
    assert "| pretrain |" in run.stdout and "| test/loss |" in run.stdout
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already done") == 3 and "already split" in again.stdout


def test_missing_corpus_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "pipeline", "--recipe", "real", "--data-dir", "nowhere"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no pretrain corpus in nowhere/pretrain/*.jsonl" in run.stderr and "minillm download" in run.stderr


@pytest.mark.parametrize(
    ("metric", "before", "after", "verdict"),
    [
        ("test/loss", 5.0, 4.0, "yes"),
        ("test/loss", 4.0, 5.0, "no"),
        ("test/accuracy", 0.5, 0.6, "yes"),
        ("test/rewards/margins", 0.0, -0.1, "no"),
        ("test/kl", 0.0, 0.3, "no"),
        ("test/response_length", 10.0, 12.0, "-"),
        ("test/loss", None, 1.0, "-"),
    ],
)
def test_verdict_direction(metric, before, after, verdict) -> None:
    assert _verdict(metric, before, after) == verdict


def test_real_report_table() -> None:
    data = {"pretrain": {"records": {"train": 90, "val": 5, "test": 5}, "keep_share": 0.5}}
    results = {"pretrain": {"wall_s": 12.3, "test": {"before": {"test/loss": 8.0}, "after": {"test/loss": 6.5}}}}
    table = real_report(results, data, "tiny")
    assert "| pretrain | 90 | 5 | 5 | 50% |" in table
    assert "| pretrain | 12 | test/loss | 8.000 | 6.500 | yes |" in table
