"""Shared fixtures: a tiny tokenizer/data module and a tiny pretrained checkpoint, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from minillm_lightning import MiniGPTConfig, PretrainDataModule, PretrainModule

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "data" / "sample"

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
