"""What every stage shares: the MiniGPT backbone, ``init_from``, the tokenizer carried in checkpoints,
AdamW with decay/no-decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
import random
import time
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.checkpoint import (
    META_KEY,
    CheckpointError,
    backbone_state,
    checkpoint_meta,
    load_checkpoint,
)
from minillm_lightning.errors import ConfigError
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.optim import MuonAdamW, muon_param_groups
from minillm_lightning.tokenizer import Tokenizer


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: 1) linear warmup from ~0 to 1 over ``warmup_steps``; 2) cosine decay to
    ``min_ratio`` at ``total_steps``; 3) ``min_ratio`` afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_states() -> dict[str, Any]:
    """Random number generator states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StageModule(L.LightningModule):
    """Base class of the stage modules; not used directly.

    Args:
        arch: backbone architecture (ignored with ``init_from``: the checkpoint's architecture is used).
        vocab_size: tokenizer vocabulary size; linked from the data module, do not set by hand.
        init_from: start a NEW stage from this checkpoint's weights (optimizer and counters start fresh).
            To continue the SAME run use ``--ckpt_path`` instead.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay on weight matrices and embeddings; 1-D parameters (norm weights) get none.
        betas: AdamW betas.
        warmup: warmup length: a share of the total steps when < 1, else a number of optimizer steps.
        min_lr_ratio: the cosine schedule ends at ``learning_rate * min_lr_ratio``.
        compile: run the backbone through ``torch.compile`` (faster steps after a one-off compile cost).
        optimizer: ``adamw``, or ``muon``: Muon (orthogonalised momentum) on the transformer blocks' weight
            matrices and AdamW at ``learning_rate`` on embeddings, head and norms; trains a small model from
            scratch in fewer steps (configs/shakespeare_char.yaml). Not with FSDP or DeepSpeed (sharded matrices).
        muon_learning_rate: peak Muon learning rate (follows the same warmup/cosine schedule).
    """

    stage_name = "base"

    def __init__(
        self,
        arch: MiniGPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.02,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_learning_rate: float = 0.02,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        if muon_learning_rate <= 0:
            raise ValueError(f"muon_learning_rate must be positive, got {muon_learning_rate}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if warmup < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError("warmup must be >= 0 and min_lr_ratio in [0, 1]")
        arch = arch if arch is not None else MiniGPTConfig(size="tiny")
        if isinstance(arch, dict):
            arch = MiniGPTConfig.from_dict(arch)
        self.tokenizer: Tokenizer | None = None
        init_state = None
        if init_from:
            ckpt = load_checkpoint(init_from)
            meta = checkpoint_meta(ckpt, init_from)
            arch = MiniGPTConfig.from_dict({**meta["arch"], "gradient_checkpointing": arch.gradient_checkpointing})
            self.tokenizer = Tokenizer.from_checkpoint(ckpt, init_from)
            init_state = backbone_state(ckpt["state_dict"])
            if vocab_size is not None and vocab_size != arch.vocab_size:
                raise CheckpointError(
                    f"init_from={init_from} has vocabulary {arch.vocab_size} but the data module's tokenizer has "
                    f"{vocab_size}; set data.tokenizer to the same checkpoint so both use its tokenizer"
                )
        elif vocab_size is not None:
            arch = MiniGPTConfig.from_dict({**arch.to_dict(), "vocab_size": vocab_size})
        self.arch = arch
        self.save_hyperparameters(ignore=["arch"])
        # plain dicts only: LightningCLI reads hparams back with torch.load(weights_only=True)
        self.hparams["arch"] = arch.to_dict()
        self.model = MiniGPT(arch)
        if init_state is not None:
            missing, unexpected = self.model.load_state_dict(init_state, strict=False)
            missing = [k for k in missing if not (arch.tie_embeddings and k == "lm_head.weight")]
            if missing or unexpected:
                raise CheckpointError(f"init_from={init_from}: incompatible weights (missing {missing[:3]})")
        self.init_from = init_from
        # not a registered submodule (plain __dict__ entry): the weights are stored once, under `model.`
        self.__dict__["_forward"] = torch.compile(self.model) if compile else self.model
        self._t_last: float | None = None
        self._tokens_since = 0

    # ---- tokenizer bookkeeping ----
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        dm_tok: Tokenizer | None = getattr(dm, "tokenizer", None) if dm is not None else None
        if dm_tok is not None:
            if self.tokenizer is not None and dm_tok.sha256 != self.tokenizer.sha256:
                raise CheckpointError(
                    f"the data module's tokenizer ({dm_tok.sha256[:12]}) is not the tokenizer of init_from="
                    f"{self.init_from} ({self.tokenizer.sha256[:12]}); set data.tokenizer to that checkpoint"
                )
            if dm_tok.vocab_size != self.arch.vocab_size:
                raise CheckpointError(
                    f"tokenizer vocabulary {dm_tok.vocab_size} != model vocab_size {self.arch.vocab_size}"
                )
            self.tokenizer = dm_tok
        seq_len = getattr(dm, "seq_len", None) or getattr(dm, "max_length", None)
        if seq_len is not None and seq_len > self.arch.block_size:
            raise ConfigError(
                f"data sequence length {seq_len} exceeds the model context block_size={self.arch.block_size}; "
                f"lower the data module's length or raise model.arch.block_size"
            )

    def on_fit_start(self) -> None:
        n, n_emb = self.model.num_parameters(), self.model.embed_tokens.weight.numel()
        a = self.arch
        rank_zero_info(
            f"MiniGPT[{a.size}] {self.stage_name}: {n / 1e6:.2f}M parameters ({(n - n_emb) / 1e6:.2f}M without "
            f"embeddings), {a.n_layer} layers x {a.dim} wide, {a.n_head} heads / {a.n_kv_head} kv heads"
            + (f", MoE {a.n_experts} experts top-{a.top_k}" if a.is_moe else "")
        )

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            rank_zero_info(
                f"resumed from {self.trainer.ckpt_path}: continuing at step {self.global_step}, "
                f"epoch {self.current_epoch}, learning rate {lr:.3g}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {"stage": self.stage_name, "arch": self.arch.to_dict(), "format": 1}
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state()
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY, {})
        if meta.get("stage") not in (None, self.stage_name):
            raise CheckpointError(
                f"this is a {meta['stage']} checkpoint but the run is a {self.stage_name} stage; to start "
                f"{self.stage_name} from it use --model.init_from, --ckpt_path only resumes the same stage"
            )
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    # ---- prediction (`minillm predict`): completions of a PromptDataModule's prompts ----
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate a completion per prompt with ``self.generation_config`` (set by CompletionWriter; greedy
        128 tokens by default) and return ``{"index", "prompt", "completion"}`` records."""
        from minillm_lightning.generation import GenerationConfig, TextGenerator

        if self.tokenizer is None:
            raise CheckpointError("prediction needs a tokenizer: set model.init_from and data.tokenizer")
        cfg = getattr(self, "generation_config", None) or GenerationConfig(max_new_tokens=128, temperature=0.0)
        gen = TextGenerator(self.model, self.tokenizer)
        outputs = gen.generate(batch["prompt_ids"], cfg)
        stops = set(gen.stop_tokens)
        return [
            {"index": int(i), "prompt": p, "completion": self.tokenizer.decode([t for t in toks if t not in stops])}
            for i, p, toks in zip(batch["index"], batch["prompt"], outputs)
        ]

    # ---- optimisation ----
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = self._muon_optimizer() if hp.get("optimizer", "adamw") == "muon" else self._adamw_optimizer()
        total = self.trainer.max_steps
        if total is None or total < 0:
            # only when no max_steps is set: estimating touches the train loader, see Lightning's caveat
            total = int(self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
        warmup = max(1, warmup) if hp.warmup > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def _adamw_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW: fastest on GPU, but Lightning's mixed-precision plugin refuses it with gradient clipping
        mixed = "mixed" in str(self.trainer.precision)
        fused = all(p.is_cuda for p in self.parameters()) and not (mixed and self.trainer.gradient_clip_val)
        return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), fused=fused or None)

    def _muon_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        strategy = type(getattr(self.trainer, "strategy", None)).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ConfigError(
                f"model.optimizer=muon needs whole weight matrices but {strategy} shards them; "
                f"use model.optimizer=adamw with this strategy, or DDP"
            )
        lrs = dict(lr=hp.learning_rate, muon_lr=hp.muon_learning_rate)
        groups = muon_param_groups(self, **lrs, weight_decay=hp.weight_decay)
        return MuonAdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            norms = [p.grad.detach().norm(2) for p in self.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm(2))

    # ---- throughput ----
    def count_tokens(self, n: int) -> None:
        """Log tokens/s over each logging window (wall clock, so it includes data loading)."""
        now = time.perf_counter()
        if self._t_last is None:
            self._t_last = now
            return
        self._tokens_since += n
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            rate = self._tokens_since * self.trainer.world_size / max(now - self._t_last, 1e-9)
            self.log("train/tokens_per_sec", rate, prog_bar=True)
            self._t_last, self._tokens_since = now, 0

    def warn_once(self, msg: str) -> None:
        rank_zero_warn(msg)
