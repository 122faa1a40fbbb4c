"""``minillm curves``: a run's TensorBoard scalars as a table, checked against hand-computed values, resumed and
restarted runs, and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import user_error
from lightning.pytorch.loggers import TensorBoardLogger

from minillm_lightning.cli import main as cli_main


def log_version(run: Path, points: dict[str, list[tuple[int, float]]], when: float) -> Path:
    """One ``tb/version_N`` of ``run`` holding ``points``, its event file dated ``when``."""
    logger = TensorBoardLogger(save_dir=str(run), name="tb")
    for tag, series in points.items():
        for step, value in series:
            logger.log_metrics({tag: value}, step=step)
    logger.finalize("success")
    folder = Path(logger.log_dir)
    for f in folder.glob("events.out.tfevents.*"):
        os.utime(f, (when, when))
    return folder


def rows(capsys, *args: str) -> dict[str, list[str]]:
    cli_main(["curves", *args])
    out = capsys.readouterr().out.splitlines()
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in out[3:])}


def test_table_values_by_hand(tmp_path, capsys):
    run = tmp_path / "run"
    log_version(run, {"val/loss": [(s, 10.0 - s) for s in range(10)], "lr": [(0, 0.5), (9, 0.25)]}, 1000)
    table = rows(capsys, str(run))
    # 10 points: first fifth = steps 0-1 (10, 9) -> 9.5, last fifth = steps 8-9 (2, 1) -> 1.5
    assert table["val/loss"] == ["10", "0-9", "10", "9.5", "1.5", "1", "1", "10"]
    assert table["lr"] == ["2", "0-9", "0.5", "0.5", "0.25", "0.25", "0.25", "0.5"]  # one point per part
    # --parts 2: halves (10+9+8+7+6)/5 = 8, (5+4+3+2+1)/5 = 3; --tags picks by pattern
    table = rows(capsys, str(run), "--parts", "2", "--tags", "val/*")
    assert list(table) == ["val/loss"] and table["val/loss"][3:5] == ["8", "3"]


def test_resumed_run_continues_and_a_new_run_replaces(tmp_path, capsys):
    run = tmp_path / "run"
    log_version(run, {"train/loss": [(0, 4.0), (1, 3.0), (2, 2.0)]}, 1000)
    # resumed from step 2: continues in version_1, and its value for step 2 wins
    log_version(run, {"train/loss": [(2, 2.5), (3, 1.0)]}, 2000)
    assert rows(capsys, str(run))["train/loss"] == ["4", "0-3", "4", "4", "1", "1", "1", "4"]
    # a fresh run in the same folder (starting at step 0 again) replaces what came before
    log_version(run, {"train/loss": [(0, 7.0), (1, 6.0)]}, 3000)
    cli_main(["curves", str(run)])
    out = capsys.readouterr().out
    assert "| train/loss | 2 | 0-1 | 7 |" in out and out.splitlines()[0].endswith("version_2")
    # one version on its own
    assert rows(capsys, str(run / "tb" / "version_0"))["train/loss"][:2] == ["3", "0-2"]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda run: None, [], "does not exist; give a run folder"),
        (lambda run: run.mkdir(), [], "no TensorBoard event files under"),
        (lambda run: log_version(run, {"val/loss": [(1, 1.0)]}, 1000), ["--tags", "val/acc*"], "run has: val/loss"),
        (lambda run: log_version(run, {"val/loss": [(1, 1.0)]}, 1000), ["--parts", "0"], "--parts must be at least 1"),
        (
            lambda run: [log_version(run / name, {"val/loss": [(1, 1.0)]}, 1000) for name in ("a", "b")],
            [],
            "holds 2 runs' logs; name one of them: ",
        ),
    ],
)
def test_errors_are_one_line(tmp_path, capfd, make, args, message):
    run = tmp_path / "run"
    make(run)
    assert message in user_error(["curves", str(run), *args], capfd)


def test_several_runs_side_by_side(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    log_version(a, {"val/loss": [(1, 3.0), (2, 2.0)], "lr": [(1, 0.1)]}, 1000)
    log_version(b, {"val/loss": [(1, 4.0), (2, 1.0)], "lr": [(1, 0.2)]}, 1000)
    cli_main(["curves", str(a), str(b), "--tags", "val/*", "lr"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{a}: 2 of 2 scalars") and out[1].startswith(f"{b}: 2 of 2 scalars")
    assert out[2].startswith("| run | tag | points |")
    # each tag's rows together, the runs in the order given
    assert [line.split(" | ")[:2] for line in out[4:]] == [
        [f"| {a}", "val/loss"],
        [f"| {b}", "val/loss"],
        [f"| {a}", "lr"],
        [f"| {b}", "lr"],
    ]
    assert out[5] == f"| {b} | val/loss | 2 | 1-2 | 4 | 4 | 1 | 1 | 1 | 4 |"  # one point per fifth of 2


def test_a_tag_missing_from_one_of_several_runs_names_that_run(tmp_path, capfd):
    a, b = tmp_path / "a", tmp_path / "b"
    log_version(a, {"val/acc": [(1, 0.5)]}, 1000)
    log_version(b, {"val/loss": [(1, 1.0)]}, 1000)
    error = user_error(["curves", str(a), str(b), "--tags", "val/acc"], capfd)
    assert f"no scalar matches --tags 'val/acc'; {b} has: val/loss" in error
