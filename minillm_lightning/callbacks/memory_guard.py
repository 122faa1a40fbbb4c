"""MemoryGuard: refuse runs that cannot fit, watch memory every step, flag leaks, and explain out-of-memory errors.

Pre-flight estimate (bytes per device), checked in ``on_fit_start`` before the first step::

    weights      N * p          p: bytes per parameter, 4 (32-true, *-mixed) or 2 (16-true, bf16-true)
    autocast     N * 2          *-mixed only: autocast keeps a half-precision copy of each weight for the step
    gradients    N_train * p
    AdamW        N_train * 2p   exp_avg and exp_avg_sq, in the parameter dtype
    activations  B*T * (L * layer + 12*d + (8 + a)*V)

B = batch size x sequences per example, T = sequence length, L = layers, d = width, dkv = n_kv_head * head_dim,
I = SwiGLU width, V = vocabulary, a = bytes of an activation (4 in fp32, 2 under mixed or half precision).
``layer`` is what one transformer block keeps for its backward pass, per token::

    layer = a * (2*dkv + 4*I) + r*d

``2*dkv``: keys and values; ``4*I``: gate, SiLU, up and their product in the SwiGLU MLP; ``r*d``: the d-wide
tensors (queries, attention output and its reshaped copy, the two RMSNorms' inputs, float32 internals and
outputs). r = 32 (32-true), 30 (*-mixed: the residual stream and RMSNorm internals stay fp32), 20 (half
true). This is the Megatron per-layer estimate (Korthikanti et al. 2022, ``34*d + 5*h*T`` bytes per token in
fp16) recounted for this block: SwiGLU instead of a 4d GELU MLP, grouped-query K/V, and no ``5*h*T`` term
because ``scaled_dot_product_attention`` uses a fused kernel that keeps no T x T attention matrix. The
coefficients were counted from autograd's saved tensors (``tests/test_callbacks_health.py`` checks the
estimate against them). With activation checkpointing a block keeps only its fp32 input (``4*d``, or ``a*d``
in half-true precision) and one block's full ``layer`` is alive while it is recomputed. Mixture-of-Experts
blocks use ``(4*I + 2*d) * top_k + 4*I * n_shared_experts`` for the MLP. Outside the blocks: ``12*d`` for the
final norm, and ``(8 + a)*V`` for the logits, the fp32 log-softmax cross-entropy keeps, and its gradient.

On CUDA in fp32 with grouped-query attention no fused kernel applies and SDPA falls back to its math kernel,
which keeps the softmax: ``a * (n_head*T + 2*(d - dkv))`` more per token and layer. Measured on an H200 (two
AdamW steps, peak ``torch.cuda.max_memory_allocated``, sizes small and medium; table in docs/callbacks.md):
within 5% for 32-true, bf16-mixed and bf16-true; with activation checkpointing 0-35% over (on the safe side).
Not counted: dropout masks (dropout is 0 by default), attention masks, allocator fragmentation, and
stage-specific extras (DPO's frozen reference model is counted through its weights only).

The check compares what is still to be allocated (everything but the weights, which are already on the device
by ``on_fit_start``) with what is available: psutil's available RAM on CPU, or ``torch.cuda.mem_get_info``'s
free memory plus this process's cached blocks on GPU.
"""

from __future__ import annotations

import gc
import os
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.callbacks.common import GIB, MIB, will_log
from minillm_lightning.errors import ConfigError, ResourceError
from minillm_lightning.model import MiniGPTConfig

THRESHOLD_ENV = ("MINILLM_MEMORY_THRESHOLD", "MINIGPT_MEMORY_THRESHOLD")  # ours first, then the seed project's
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def precision_bytes(precision: str) -> tuple[int, int, bool]:
    """(bytes per parameter, bytes per activation, mixed?) of a Lightning precision string."""
    p = str(precision)
    if "mixed" in p:
        return 4, 2, True
    if p.startswith(("16", "bf16")):
        return 2, 2, False
    if p.startswith("64"):
        return 8, 8, False
    return 4, 4, False


def count_parameters(arch: MiniGPTConfig) -> int:
    """Parameters of a MiniGPT with this architecture, without building it."""
    d, dkv, I = arch.dim, arch.n_kv_head * arch.head_dim, arch.intermediate_size
    attn = 2 * d * d + 2 * d * dkv
    mlp = (arch.n_experts + arch.n_shared_experts) * 3 * d * I + d * arch.n_experts if arch.is_moe else 3 * d * I
    emb = arch.vocab_size * d * (1 if arch.tie_embeddings else 2)
    return emb + arch.n_layer * (attn + mlp + 2 * d) + d


@dataclass
class MemoryEstimate:
    """Pre-flight estimate of the memory one device needs to train, in bytes (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    """Activations if ``arch.gradient_checkpointing`` were on (equal to ``activations`` when it already is)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW state", self.optimizer)]
        parts.append(("activations", self.activations))
        return f"~{self.total / GIB:.2f} GiB (" + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts) + ")"


def estimate_training_memory(
    arch: MiniGPTConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "32-true",
    n_params: int | None = None,
    n_trainable: int | None = None,
    math_attention: bool = False,
) -> MemoryEstimate:
    """Estimate the training memory of one device (formula and assumptions in the module docstring).

    Args:
        arch: the backbone architecture.
        batch_size: sequences per forward pass on this device (chosen + rejected count twice).
        seq_len: tokens per sequence.
        precision: Lightning precision string, e.g. ``32-true``, ``bf16-mixed``, ``bf16-true``.
        n_params: parameters of the whole module (default: counted from ``arch``).
        n_trainable: parameters that get gradients and optimizer state (default: ``n_params``).
        math_attention: attention runs PyTorch's unfused math kernel, which keeps the (B, n_head, T, T) softmax.
    """
    p, a, mixed = precision_bytes(precision)
    n = n_params if n_params is not None else count_parameters(arch)
    n_train = n_trainable if n_trainable is not None else n
    d, dkv, I, V = arch.dim, arch.n_kv_head * arch.head_dim, arch.intermediate_size, arch.vocab_size
    r = 30 if mixed else {8: 64, 4: 32}.get(a, 20)
    mlp = (4 * I + 2 * d) * arch.top_k + 4 * I * arch.n_shared_experts if arch.is_moe else 4 * I
    layer = a * (2 * dkv + mlp) + r * d + (8 * arch.n_experts if arch.is_moe else 0)
    if math_attention:  # per token: its row of the softmax in every head, and K/V expanded to all heads
        layer += a * (arch.n_head * seq_len + 2 * (d - dkv))
    kept_by_checkpoint = (4 if mixed or a >= 4 else a) * d
    outside = 12 * d + (8 + a) * V
    tokens = batch_size * seq_len
    full = tokens * (arch.n_layer * layer + outside)
    ckpt = tokens * (arch.n_layer * kept_by_checkpoint + layer + outside)
    return MemoryEstimate(
        weights=n * p + (n * 2 if mixed else 0),
        gradients=n_train * p,
        optimizer=n_train * 2 * p,
        activations=ckpt if arch.gradient_checkpointing else full,
        activations_checkpointed=ckpt,
    )


def check_fits(
    estimate: MemoryEstimate,
    available: int,
    *,
    resident: int = 0,
    batch_size: int,
    seq_len: int,
    precision: str,
    gradient_checkpointing: bool,
    where: str = "this device",
) -> None:
    """Raise :class:`ResourceError` naming what to reduce when the estimate exceeds the available memory.

    Args:
        estimate: the pre-flight estimate.
        available: bytes still free for this run.
        resident: bytes of the estimate already allocated (the weights, once the model is on its device).
        batch_size: per-device batch size, to suggest one that fits.
        seq_len: sequence length, for the message.
        precision: the trainer's precision, for the message.
        gradient_checkpointing: whether activation checkpointing is already on.
        where: the memory the estimate was compared with, for the message.
    """
    needed = estimate.total - resident
    if needed <= available:
        return
    fixed = estimate.total - estimate.activations
    per_sample = estimate.activations / max(1, batch_size)
    fitting_batch = int((available + resident - fixed) // per_sample) if per_sample else 0
    advice = [
        f"lower data.batch_size (now {batch_size}; about {fitting_batch} would fit, raise "
        f"trainer.accumulate_grad_batches to keep the effective batch)"
        if fitting_batch >= 1
        else f"lower data.batch_size (now {batch_size}; even 1 does not fit at this length)",
        f"lower the sequence length data.seq_len / data.max_length (now {seq_len}; activations scale with it)",
    ]
    if not gradient_checkpointing:
        advice.append(
            "turn on activation checkpointing: --model.init_args.arch.gradient_checkpointing true "
            f"(activations {estimate.activations / GIB:.2f} -> {estimate.activations_checkpointed / GIB:.2f} GiB)"
        )
    if "mixed" not in precision and not precision.startswith(("16", "bf16")):
        advice.append(f"use --trainer.precision bf16-mixed (now {precision}; halves most activations)")
    raise ResourceError(
        f"MemoryGuard: this run needs {estimate.describe()} but {where} has {available / GIB:.2f} GiB "
        f"available (besides {resident / GIB:.2f} GiB of weights already loaded). Reduce one of:\n  - "
        + "\n  - ".join(advice)
        + "\n(set MemoryGuard(preflight=false) to skip this check)"
    )


def linear_slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (units of y per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    x_mean, y_mean = (n - 1) / 2, sum(ys) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    return num / sum((i - x_mean) ** 2 for i in range(n))


def is_out_of_memory(exception: BaseException) -> bool:
    """True for CUDA/CPU allocator failures and Python's ``MemoryError``."""
    if isinstance(exception, (_OOM, MemoryError)):
        return True
    msg = str(exception).lower()
    return isinstance(exception, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _share(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 else f"{x:.2g}"


def _default_threshold() -> float:
    for name in THRESHOLD_ENV:
        if value := os.environ.get(name):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number; use a fraction such as 0.9") from None
    return 0.9


class MemoryGuard(Callback):
    """Keeps a run inside its memory: pre-flight estimate, per-step watch, leak detection, OOM checkpoint.

    Every training step it reads the process RSS (psutil, a ``/proc`` read) and, on CUDA, the allocator's
    allocated/reserved counters (host-side, no device sync). When RSS over total RAM or reserved over device
    memory exceeds ``threshold`` it runs ``gc.collect()`` and ``torch.cuda.empty_cache()`` and warns, at most
    once every ``cooldown_steps``. Each rank frees its own caches: that needs no agreement across ranks.

    Args:
        threshold: fraction of system RAM / device memory that triggers freeing caches and a warning. Default:
            the environment variable ``MINILLM_MEMORY_THRESHOLD`` (or the seed project's
            ``MINIGPT_MEMORY_THRESHOLD``), else 0.9.
        cooldown_steps: minimum steps between two free-and-warn actions.
        preflight: estimate the memory of the configured run in ``on_fit_start`` and refuse one that cannot fit.
        leak_warmup_steps: steps (>= 0) ignored before leak sampling starts (allocator and optimizer state warm-up).
        leak_window: steps in the window whose least-squares slope is tested; checked every ``leak_window`` steps.
        leak_threshold_mb: slope (MiB per step, > 0) of RSS or CUDA allocated memory reported as a leak (once).
    """

    def __init__(
        self,
        threshold: float | None = None,
        cooldown_steps: int = 100,
        preflight: bool = True,
        leak_warmup_steps: int = 50,
        leak_window: int = 100,
        leak_threshold_mb: float = 1.0,
    ) -> None:
        threshold = _default_threshold() if threshold is None else threshold
        if not 0 < threshold <= 1:
            raise ConfigError(f"MemoryGuard.threshold must be in (0, 1], got {threshold}")
        if leak_window < 2 or cooldown_steps < 1:
            raise ConfigError("MemoryGuard: leak_window must be >= 2 and cooldown_steps >= 1")
        if leak_warmup_steps < 0:
            raise ConfigError(f"MemoryGuard.leak_warmup_steps must be >= 0, got {leak_warmup_steps}")
        if not leak_threshold_mb > 0:
            raise ConfigError(f"MemoryGuard.leak_threshold_mb must be > 0 (MiB per step), got {leak_threshold_mb}")
        self.threshold, self.cooldown_steps, self.preflight = threshold, cooldown_steps, preflight
        self.leak_warmup_steps, self.leak_window = leak_warmup_steps, leak_window
        self.leak_threshold_mb = leak_threshold_mb
        self._proc = psutil.Process()
        self._ram_total = psutil.virtual_memory().total
        self._device: torch.device | None = None
        self._dev_total = 0
        self._last_step = -1
        self._steps_this_run = 0  # leak warm-up counts from the start of this process, also after a resume
        self._host_window: deque[float] = deque(maxlen=leak_window)
        self._dev_window: deque[float] = deque(maxlen=leak_window)
        # state kept in checkpoints
        self.peak_rss = 0
        self.peak_cuda = 0
        self.warnings_issued = 0
        self.last_warn_step = -(10**9)
        self.leak_reported = False

    # ---- pre-flight ----
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device if pl_module.device.type == "cuda" else None
        if self._device is not None:
            self._dev_total = torch.cuda.get_device_properties(self._device).total_memory
        if not self.preflight:
            return
        arch = getattr(pl_module, "arch", None)
        dm = getattr(trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        seq_len = getattr(dm, "seq_len", None) or getattr(dm, "max_length", None)
        if not isinstance(arch, MiniGPTConfig) or not batch or not seq_len:
            rank_zero_info("MemoryGuard: no MiniGPT arch or data module batch_size/seq_len; pre-flight skipped")
            return
        # sequences per example: 2 for modules that score chosen and rejected answers in one batch
        batch *= int(getattr(pl_module, "sequences_per_example", 1))
        params = list(pl_module.parameters())
        est = estimate_training_memory(
            arch,
            batch,
            seq_len,
            str(trainer.precision),
            n_params=sum(p.numel() for p in params),
            n_trainable=sum(p.numel() for p in params if p.requires_grad),
            # CUDA's fused kernels take fp32 only without grouped-query attention; else SDPA falls back to math
            math_attention=self._device is not None
            and precision_bytes(str(trainer.precision))[1] >= 4
            and arch.n_kv_head != arch.n_head,
        )
        resident = sum(p.numel() * p.element_size() for p in params)
        if self._device is not None:
            free, _ = torch.cuda.mem_get_info(self._device)
            available = free + torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)
            where = f"GPU {self._device}"
        else:
            available, where = psutil.virtual_memory().available, "system RAM"
        ckpt = bool(arch.gradient_checkpointing)
        error: ResourceError | None = None
        try:
            check_fits(
                est, available, resident=resident, batch_size=batch, seq_len=seq_len,
                precision=str(trainer.precision), gradient_checkpointing=ckpt, where=where,
            )  # fmt: skip
        except ResourceError as e:
            error = e
        # refuse on every rank or on none, so no rank waits forever in a collective
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            raise error or ResourceError("MemoryGuard: another rank cannot fit this run; see its message")
        needed = est.total - resident
        rank_zero_info(f"MemoryGuard: estimated {est.describe()}; {available / GIB:.2f} GiB available in {where}")
        if needed > self.threshold * available:
            rank_zero_warn(
                f"MemoryGuard: the run needs {needed / GIB:.2f} GiB of the {available / GIB:.2f} GiB available "
                f"(over the {_share(self.threshold)} threshold); it may run out of memory"
            )

    # ---- per step ----
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a gradient-accumulation micro-batch: the step is not over yet
            return
        self._last_step = step
        self._steps_this_run += 1
        rss = self._proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        fractions = {"RSS": rss / self._ram_total}
        metrics = {"memory/rss_gib": rss / GIB, "memory/rss_peak_gib": self.peak_rss / GIB}
        metrics["memory/host_frac"] = fractions["RSS"]
        alloc = 0
        if self._device is not None:
            alloc, reserved = torch.cuda.memory_allocated(self._device), torch.cuda.memory_reserved(self._device)
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated(self._device))
            fractions["CUDA reserved"] = reserved / self._dev_total
            metrics.update(
                {
                    "memory/cuda_allocated_gib": alloc / GIB,
                    "memory/cuda_reserved_gib": reserved / GIB,
                    "memory/cuda_peak_gib": self.peak_cuda / GIB,
                    "memory/cuda_frac": fractions["CUDA reserved"],
                }
            )
        over = {k: v for k, v in fractions.items() if v > self.threshold}
        if over and step - self.last_warn_step >= self.cooldown_steps:
            self.free_caches()
            self.warnings_issued += 1
            self.last_warn_step = step
            what = ", ".join(f"{k} at {v:.1%}" for k, v in over.items())
            rank_zero_warn(
                f"MemoryGuard: step {step}: memory above the {_share(self.threshold)} threshold ({what}); freed "
                "caches. If it keeps growing, lower data.batch_size or the sequence length, or enable "
                "--model.init_args.arch.gradient_checkpointing true"
            )
        if self._steps_this_run > self.leak_warmup_steps and not self.leak_reported:
            self.record_leak_sample(rss / MIB, alloc / MIB if self._device is not None else None)
            if (self._steps_this_run - self.leak_warmup_steps) % self.leak_window == 0:  # same step on all ranks
                leaks = self.leaks()
                if trainer.strategy.reduce_boolean_decision(bool(leaks), all=False):
                    self.leak_reported = True
                    rank_zero_warn(
                        f"MemoryGuard: memory grows steadily (a leak?): {self._describe(leaks) or 'on another rank'} "
                        f"over the last {self.leak_window} steps. Look for tensors kept across steps (appending "
                        "losses without .detach()/.item(), growing caches or lists)"
                    )
        if will_log(trainer):
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @staticmethod
    def free_caches() -> None:
        """Collect Python garbage and return PyTorch's cached CUDA blocks to the driver."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def record_leak_sample(self, host_mb: float, device_mb: float | None = None) -> None:
        """Add one step's RSS (and CUDA allocated) reading, in MiB, to the leak window."""
        self._host_window.append(host_mb)
        if device_mb is not None:
            self._dev_window.append(device_mb)

    def leaks(self) -> dict[str, float]:
        """The series whose slope over a full window exceeds ``leak_threshold_mb`` MiB per step."""
        out = {}
        for name, window in (("RSS", self._host_window), ("CUDA allocated", self._dev_window)):
            if len(window) == self.leak_window:
                slope = linear_slope(list(window))
                if slope > self.leak_threshold_mb:
                    out[name] = slope
        return out

    @staticmethod
    def _describe(leaks: dict[str, float]) -> str:
        return ", ".join(f"{k} +{v:.1f} MiB/step" for k, v in leaks.items())

    # ---- out of memory ----
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not is_out_of_memory(exception):
            return
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self._device is not None:
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated(self._device))
        self.free_caches()
        dm = getattr(trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", "?")
        seq_len = getattr(dm, "seq_len", None) or getattr(dm, "max_length", "?")
        saved = ""
        if trainer.training and trainer.world_size == 1:  # under DDP the other ranks would hang in its barrier
            cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
            path = Path(cb.dirpath if cb is not None and cb.dirpath else trainer.default_root_dir) / "oom.ckpt"
            try:
                trainer.save_checkpoint(path, weights_only=False)
                saved = f"\nSaved {path} (step {trainer.global_step}); resume with --ckpt_path {path}"
            except Exception as e:  # best effort: memory is short, saving can fail too
                saved = f"\n(could not save a checkpoint: {e})"
        msg = (
            f"MemoryGuard: out of memory at step {trainer.global_step} (peak RSS {self.peak_rss / GIB:.2f} GiB"
            + (f", peak CUDA {self.peak_cuda / GIB:.2f} GiB" if self._device is not None else "")
            + f"). Reduce one of: data.batch_size (now {batch}; halve it and double "
            f"trainer.accumulate_grad_batches to keep the effective batch), the sequence length (now {seq_len}), "
            "activations with --model.init_args.arch.gradient_checkpointing true, or precision with "
            f"--trainer.precision bf16-mixed (now {trainer.precision})." + saved
        )
        if hasattr(exception, "add_note"):  # Python 3.11+: shown under the traceback
            exception.add_note(msg)
        print(f"[rank {trainer.global_rank}] {msg}", file=sys.stderr)

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        # The leak window is not saved: RSS of a resumed process is not comparable with the old one's,
        # so sampling restarts after the warm-up instead of fitting a slope across the restart.
        keys = ("peak_rss", "peak_cuda", "warnings_issued", "last_warn_step", "leak_reported")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, v in state_dict.items():
            setattr(self, k, v)


__all__ = [
    "MemoryEstimate",
    "MemoryGuard",
    "check_fits",
    "count_parameters",
    "estimate_training_memory",
    "is_out_of_memory",
    "linear_slope",
]
