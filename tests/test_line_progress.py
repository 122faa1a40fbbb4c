"""LineProgress: progress as lines where standard output is not a terminal (a live bar shows nothing there)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning.callbacks import LineProgress
from minillm_lightning.trainer_cli import MiniLLMRichProgressBar, choose_progress_bar


def _loader(rows: int = 24) -> DataLoader:
    ids = torch.randint(0, 64, (rows, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4)


def test_fit_and_test_print_lines(tmp_path, capsys) -> None:
    """interval=0: a line per training step with the step count, the bar's metrics, rate and ETA; one per validation
    with its metrics; a line per test batch. A long interval: only the first and the last step."""
    module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64)
    trainer = micro_trainer(
        tmp_path, max_steps=6, val_check_interval=3, callbacks=[LineProgress(interval=0)], enable_progress_bar=True
    )
    trainer.fit(module, _loader(), _loader(8))
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("epoch 0 step ")]
    assert [int(re.search(r"step (\d+)/6", line)[1]) for line in steps] == [1, 2, 3, 4, 5, 6]
    assert all("train/loss " in line and "steps/s" in line and ", eta " in line for line in steps)
    assert "(100%)" in steps[-1] and "eta 0:00:00" in steps[-1]
    assert [line.split(":")[0] for line in out if line.startswith("validation")] == ["validation at step 3"] * 1 + [
        "validation at step 6"
    ]
    assert all(re.search(r"val/loss \d", line) for line in out if line.startswith("validation at"))

    trainer.test(module, _loader(12))
    tests = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test batch")]
    assert [line.split(" |")[0] for line in tests] == ["test batch 1/3", "test batch 2/3", "test batch 3/3"]

    quiet = micro_trainer(tmp_path, max_steps=6, callbacks=[LineProgress(interval=3600)], enable_progress_bar=True)
    quiet.fit(PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64), _loader())
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 0 step ")]
    assert [line.split(" (")[0] for line in steps] == ["epoch 0 step 1/6", "epoch 0 step 6/6"]


def test_only_global_zero_prints_and_disable(tmp_path, capsys) -> None:
    line = LineProgress(interval=0)
    trainer = micro_trainer(tmp_path, max_steps=2, callbacks=[line], enable_progress_bar=True)
    line.disable()
    trainer.fit(PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64), _loader())
    assert "step" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="interval must be >= 0"):
        LineProgress(interval=-1)


def test_the_rich_bar_gives_way_to_lines_off_a_terminal(tmp_path) -> None:
    """Lightning's default bar (rich) is replaced by lines when stdout is not a terminal, kept (with our labels) on
    one; a TQDM bar the config asked for is left alone."""
    for terminal, kind in ((True, MiniLLMRichProgressBar), (False, LineProgress)):
        trainer = micro_trainer(tmp_path, callbacks=[RichProgressBar()], enable_progress_bar=True)
        choose_progress_bar(trainer, terminal=terminal)
        assert type(trainer.progress_bar_callback) is kind
    tqdm = TQDMProgressBar()
    trainer = micro_trainer(tmp_path, callbacks=[tqdm], enable_progress_bar=True)
    choose_progress_bar(trainer, terminal=False)
    assert trainer.progress_bar_callback is tqdm
