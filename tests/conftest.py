"""Shared fixtures: a tiny tokenizer/data module and a tiny pretrained checkpoint, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from minillm_lightning import MiniGPTConfig, PretrainDataModule, PretrainModule

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The large real data sets (Tiny Shakespeare, pretraining/SFT/preference excerpts, evaluation sets) are opt-in:
# tests that need them read the folder named by this variable and skip, saying why, when it is unset.
REAL_DATA_ENV = "MINILLM_TEST_DATA"


def real_data_path(*parts: str) -> Path:
    """The path ``$MINILLM_TEST_DATA/<parts>``; skips the calling test (with the reason) when unavailable."""
    root = os.environ.get(REAL_DATA_ENV)
    if not root:
        pytest.skip(f"{REAL_DATA_ENV} is unset: point it at the real data sets to run this test")
    path = Path(root).joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} does not exist (from {REAL_DATA_ENV}={root})")
    return path


@pytest.fixture
def real_data() -> Path:
    """The real-data folder named by ``$MINILLM_TEST_DATA``, or a skip with the reason."""
    return real_data_path()


# A model small enough that a few dozen CPU steps take seconds.
MICRO_ARCH = dict(size="custom", n_layer=2, dim=64, n_head=4, n_kv_head=2, block_size=128)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def micro_trainer(root: Path, **kw) -> L.Trainer:
    """A quiet CPU trainer for tests."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    return L.Trainer(**{**defaults, **kw})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def pretrain_dm_factory(cache_dir):
    def make(**kw) -> PretrainDataModule:
        args = dict(
            sources=[{"path": str(SAMPLE / "pretrain.jsonl")}],
            seq_len=64,
            batch_size=8,
            vocab_size=1024,
            cache_dir=str(cache_dir),
        )
        return PretrainDataModule(**{**args, **kw})

    return make


@pytest.fixture(scope="session")
def tiny_pretrain_ckpt(tmp_path_factory, pretrain_dm_factory) -> Path:
    """A micro MiniGPT pretrained for 40 steps on the shipped sample; its checkpoint carries the tokenizer."""
    root = tmp_path_factory.mktemp("pretrain")
    L.seed_everything(0)
    dm = pretrain_dm_factory()
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, learning_rate=3e-3)
    trainer = micro_trainer(root, max_steps=40)
    trainer.fit(model, datamodule=dm)
    path = root / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path


# Tiny models on a 2-core machine: one intra-op thread per process is much faster than two competing ones
# (and DDP tests run two processes). Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def user_error(args: list[str], capfd: pytest.CaptureFixture[str]) -> str:
    """Run ``minillm <args>`` in-process; assert exit code 2, one ``error:`` line (``minillm <verb>: error:`` from a
    verb's option parser), last, and no traceback; return that line."""
    from minillm_lightning.cli import main

    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capfd.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    return errors[0]
