"""Throughput: training tokens/s, FLOP/s and model FLOPs utilisation (MFU), from the MiniGPT config.

Model FLOPs per token (a multiply-add counts 2; training is forward + backward = 3 x forward)::

    training:      6 * N + 12 * L * d_attn * T
    forward only:  2 * N +  4 * L * d_attn * T

``N`` counts the weights of the matrix multiplies one token goes through: per block the attention projections
``d * (2*d_attn + 2*dkv)`` (q and o, k and v with grouped-query heads) and the SwiGLU MLP ``3*d*I`` (MoE: the
router ``d*E`` plus ``(top_k + n_shared_experts) * 3*d*I``), and the output head ``V*d`` (counted once also when
tied: the embedding lookup is no matmul). Norms, RoPE, softmax and the loss are elementwise and left out.
``12 * L * d_attn * T``: per layer and token, ``Q K^T`` and the attention-weighted sum of ``V`` each cost
``2 * d_attn * T`` forward, with ``d_attn = n_head * head_dim`` and ``T`` the sequence length, not halved for the
causal mask: the convention of PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT, so MFU figures compare with
theirs. These are model FLOPs: the forward recomputed by activation checkpointing is not counted, and for packed
SFT rows the attention term is computed over the whole row, not per conversation.

MFU = achieved FLOP/s per device / the device's peak FLOP/s for the run's precision (Lightning's
``get_available_flops``: known NVIDIA GPUs and TPUs, plus :data:`EXTRA_PEAK_FLOPS` for chips its table lacks;
``None`` on a CPU, where only tokens/s and FLOP/s are logged unless ``peak_flops`` is given).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as ThroughputMeter
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

from minillm_lightning.callbacks.common import will_log
from minillm_lightning.model import MiniGPTConfig

# Dense peak FLOP/s of GPUs missing from Lightning 2.6's table (it warns "FLOPs not found for 'NVIDIA H200'").
# H200 SXM: NVIDIA's data sheet halved (the sheet quotes 2:4-sparsity figures); same tensor cores as the H100 SXM.
EXTRA_PEAK_FLOPS: dict[str, dict[torch.dtype | str, float]] = {
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in ``dtype``; None when unknown (always on a CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        table = next((t for chip, t in EXTRA_PEAK_FLOPS.items() if chip in name), None)
        if table is not None:
            tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
            return table.get("tfloat32" if tf32 else dtype)
    return get_available_flops(device, dtype)


def matmul_params(config: MiniGPTConfig) -> int:
    """Weights of the matrix multiplies one token goes through (the ``N`` of ``6*N``; see the module docstring)."""
    d, inter = config.dim, config.intermediate_size
    d_attn, dkv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    attn = d * (2 * d_attn + 2 * dkv)
    if config.is_moe:
        mlp = d * config.n_experts + (config.top_k + config.n_shared_experts) * 3 * d * inter
    else:
        mlp = 3 * d * inter
    return config.n_layer * (attn + mlp) + config.vocab_size * d


def flops_per_token(config: MiniGPTConfig, seq_len: int, training: bool = True) -> int:
    """Model FLOPs per token of a MiniGPT on sequences of ``seq_len`` tokens (formula in the module docstring).

    Args:
        config: the architecture.
        seq_len: tokens per sequence (the attention term grows with it).
        training: forward + backward (``6*N + 12*L*d_attn*T``); False: forward only (``2*N + 4*L*d_attn*T``).
    """
    forward = 2 * matmul_params(config) + 4 * config.n_layer * config.n_head * config.head_dim * seq_len
    return 3 * forward if training else forward


def batch_shape(batch: Any) -> tuple[int, int, int]:
    """(sequences, tokens, longest sequence) of a batch: the ``input_ids`` of a dict batch (every key ending in
    ``input_ids``, so chosen and rejected both count) or a tensor batch; padding counts as tokens."""
    if isinstance(batch, dict):
        ids = [v for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)]
    else:
        ids = [batch] if isinstance(batch, torch.Tensor) else []
    if not ids:
        return 0, 0, 0
    return sum(t.shape[0] for t in ids), sum(t.numel() for t in ids), max(t.shape[-1] for t in ids)


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (what the peak FLOP/s depend on)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float64 if p.startswith("64") else torch.float32


class Throughput(Callback):
    """Log training tokens/s, TFLOP/s and MFU at every ``trainer.log_every_n_steps`` step.

    Built on Lightning's ``Throughput`` meter (the engine of its ``ThroughputMonitor`` callback), fed with what
    that callback cannot know: the tokens of our batches (``input_ids``) and FLOPs from the module's
    ``arch`` (:func:`flops_per_token`). Rates are rolling averages over the last ``window_size`` logging
    intervals; validation time is excluded. On a GPU the device is synchronised at logging steps only.

    Args:
        window_size: logging intervals averaged over (>= 2); the first rates appear after that many.
        peak_flops: peak FLOP/s of one device for MFU; default: :func:`device_peak_flops` for the GPU and precision
            (Lightning's table, plus the H200; none on a CPU: then MFU is not logged).
    """

    def __init__(self, window_size: int = 5, peak_flops: float | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"Throughput.window_size must be >= 2, got {window_size}")
        self.window_size, self.peak_flops = window_size, peak_flops
        self.available_flops: float | None = peak_flops
        self._meter: ThroughputMeter | None = None
        self._world = 1
        self._t0 = self._val_t0 = 0.0
        self._val_time = 0.0
        self._last_step = -1
        self._flops_pending = 0
        # totals of this process's run (not checkpointed: rates of another process are not comparable)
        self.tokens = self.samples = self.batches = 0
        self.flops = 0
        self.train_time = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.peak_flops is None:
            self.available_flops = device_peak_flops(trainer.strategy.root_device, compute_dtype(trainer.precision))
        self._world = trainer.world_size
        self._meter = ThroughputMeter(self.available_flops, world_size=self._world, window_size=self.window_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._val_time, self._last_step = time.perf_counter(), 0.0, trainer.global_step
        self.tokens = self.samples = self.batches = self.flops = self._flops_pending = 0
        self.train_time = 0.0
        self._meter.reset()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_time += time.perf_counter() - self._val_t0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples, tokens, seq_len = batch_shape(batch)
        arch = getattr(pl_module, "arch", None)
        flops = flops_per_token(arch, seq_len) * tokens if isinstance(arch, MiniGPTConfig) and tokens else 0
        self.samples, self.tokens, self.batches = self.samples + samples, self.tokens + tokens, self.batches + 1
        self.flops += flops
        self._flops_pending += flops
        step = trainer.global_step
        if step == self._last_step or not will_log(trainer) or not tokens:  # mid-accumulation, or not a log step
            return
        self._last_step = step
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # queued kernels belong to the elapsed time
        self.train_time = time.perf_counter() - self._t0 - self._val_time
        self._meter.update(
            time=self.train_time,
            batches=self.batches,
            samples=self.samples,
            lengths=self.tokens,
            flops=self._flops_pending or None,
        )
        self._flops_pending = 0
        m = self._meter.compute()
        metrics = {}
        if "device/items_per_sec" in m:
            metrics["throughput/tokens_per_sec"] = m["device/items_per_sec"] * self._world
            metrics["throughput/tokens_per_sec_per_device"] = m["device/items_per_sec"]
            metrics["throughput/samples_per_sec"] = m["device/samples_per_sec"] * self._world
        if "device/flops_per_sec" in m:
            metrics["throughput/tflops_per_device"] = m["device/flops_per_sec"] / 1e12
        if "device/mfu" in m:
            metrics["throughput/mfu"] = m["device/mfu"]
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batches:
            self.train_time = time.perf_counter() - self._t0 - self._val_time

    def summary(self) -> dict[str, float | None]:
        """Averages over this process's training time (validation excluded), all devices together."""
        t = max(self.train_time, 1e-9)
        per_device = self.flops / t if self.flops else None
        return {
            "tokens": self.tokens * self._world,
            "train_time_s": self.train_time,
            "tokens_per_sec": self.tokens * self._world / t if self.train_time else None,
            "tflops_per_device": per_device / 1e12 if per_device else None,
            "mfu": per_device / self.available_flops if per_device and self.available_flops else None,
        }


__all__ = ["Throughput", "batch_shape", "compute_dtype", "flops_per_token", "device_peak_flops", "matmul_params"]
