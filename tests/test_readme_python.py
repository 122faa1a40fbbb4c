"""The README's "From Python" block, run as it stands: the Python API (stage and data modules under a plain
``lightning.Trainer``, ``TextGenerator.from_checkpoint``) works the way the README shows it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minillm_lightning import TextGenerator
from minillm_lightning.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def readme_block() -> str:
    text = (ROOT / "README.md").read_text("utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the From Python section should hold one python block"
    return blocks[0]


def test_the_readme_python_block_trains_two_stages_and_generates(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(ROOT / "data" / "sample")
    script = tmp_path / "script.py"
    script.write_text(readme_block())
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = run.stdout + run.stderr
    assert "training summary (pretrain): 300 steps" in logs and "training summary (sft): 150 steps" in logs, logs[
        -3000:
    ]
    replies = ast.literal_eval(run.stdout.strip().splitlines()[-1])  # the printed list of two generated replies
    assert isinstance(replies, list) and len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    for name in ("pretrain.ckpt", "sft.ckpt"):
        assert (tmp_path / "checkpoints" / "python" / name).is_file()
    gen = TextGenerator.from_checkpoint(tmp_path / "checkpoints" / "python" / "sft.ckpt")
    assert gen.meta["stage"] == "sft" and gen.tokenizer is not None and not gen.model.training


def test_from_checkpoint_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a minillm checkpoint"):
        TextGenerator.from_checkpoint(bad)
