"""GradientHealthMonitor: gradient norms, clipping share, update-to-weight ratios, NaN/Inf handling, loss spikes.

Cost per optimizer step: one fused gradient-norm pass (``optim.grad_norms``, on the device) and one scalar
copy to the host, the global norm, which is both the NaN/Inf check and what the clipping share and max norm
are computed from; plus one host copy of the loss per training batch for the spike detector. That is one
device sync per step, worth it: a NaN that reaches the weights ruins the run. Per-layer norms, update ratios
and the snapshot of the weights they need are only computed at logging steps. Under manual optimization (PPO:
several optimizer updates per training step) the values of a logged step are those of its last update.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.callbacks.common import StatefulCallback, log_sparse, will_log
from minillm_lightning.errors import ConfigError
from minillm_lightning.lightning_private import logged_step
from minillm_lightning.optim import grad_norms

NonFiniteAction = Literal["skip", "stop", "warn"]


def param_group_name(name: str) -> str:
    """Group a parameter name for per-layer norms: ``model.layers.3.mlp.up_proj.weight`` -> ``layers.3``,
    ``model.embed_tokens.weight`` -> ``embed_tokens``, ``model.lm_head.weight`` -> ``lm_head``."""
    parts = [p for p in name.split(".") if p != "model"]
    if "layers" in parts[:-2]:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) or parts[0]


class GradientHealthMonitor(StatefulCallback):
    """Watches gradients and the loss each optimizer step; acts on NaN/Inf, warns on loss spikes.

    Measured in ``on_before_optimizer_step``, i.e. on unscaled gradients before clipping:

    - the global L2 gradient norm; per-group norms (each transformer block ``layers.N``, ``embed_tokens``,
      ``lm_head`` when untied, ``norm``, heads of later stages) at every ``layer_every_n_logs``-th log step;
    - whether clipping engaged: the pre-clip norm (or the largest absolute gradient for
      ``gradient_clip_algorithm="value"``) above ``trainer.gradient_clip_val`` (or ``clip_val``);
    - the update-to-weight ratio ``||w_after - w_before|| / ||w_before||``, measured from the parameter change
      of the logged step (a copy of the weights is taken at log steps only). Measured rather than approximated
      by ``lr * ||g|| / ||w||``, which is wrong for Adam: its update size does not scale with the gradient norm.

    Under manual optimization with several optimizer updates per training step (PPO) every value is written once
    per logged step, that of the step's last update, and ``layer_every_n_logs`` counts logged steps.

    Non-finite gradients (a NaN/Inf loss makes them non-finite too) trigger ``on_nonfinite``:

    - ``skip``: the gradients are set to ``None``, so AdamW leaves every parameter untouched for that step (zeroed
      gradients would not do: momentum and weight decay would still move the weights). The step still counts
      for ``global_step`` and the LR schedule. After ``max_consecutive_skips`` non-finite steps in a row the
      monitor stops instead: a run that only skips makes no progress.
    - ``stop``: the update is skipped as well, then ``nonfinite.ckpt`` is saved where ModelCheckpoint saves (else
      ``default_root_dir``) at the end of the batch and training stops (``trainer.should_stop``).
    - ``warn``: only warn and count; the optimizer applies the step.

    Under 16-mixed precision the GradScaler already skips steps with overflowing gradients and lowers its scale;
    those are counted as ``scaler_skips``, not acted on. A NaN/Inf loss whose gradients are finite (a loss term not
    backpropagated) is counted and, with ``stop``, stops training. With several ranks both decisions are agreed
    across ranks (one small all-reduce per step); sharded strategies (FSDP) see shard-local norms.

    Loss spikes: a loss above ``spike_factor`` times the median of the previous ``spike_window`` losses (once at
    least ``spike_min_history`` are known) is counted and warned about.

    Args:
        on_nonfinite: ``skip``, ``stop`` or ``warn``.
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row (0: never).
        spike_window: losses in the running median.
        spike_factor: a loss above this multiple of the running median is a spike.
        spike_min_history: losses needed before spikes are detected.
        layer_every_n_logs: log per-group norms and update ratios at every n-th log step (0: never).
        update_ratio: measure update-to-weight ratios at log steps (costs a copy of the weights at those steps).
        clip_val: clipping threshold (> 0) used for the clipped share (default: ``trainer.gradient_clip_val``; set it
            for manual optimization, where the module clips by itself).
        warn_every_n_steps: minimum steps between two warnings of the same kind (the counts keep counting; 0: no
            limit).
    """

    def __init__(
        self,
        on_nonfinite: NonFiniteAction = "skip",
        max_consecutive_skips: int = 20,
        spike_window: int = 100,
        spike_factor: float = 2.0,
        spike_min_history: int = 20,
        layer_every_n_logs: int = 10,
        update_ratio: bool = True,
        clip_val: float | None = None,
        warn_every_n_steps: int = 50,
    ) -> None:
        if on_nonfinite not in ("skip", "stop", "warn"):
            raise ConfigError(f"GradientHealthMonitor.on_nonfinite must be skip, stop or warn, got {on_nonfinite!r}")
        if spike_factor <= 1 or spike_window < 1 or not 1 <= spike_min_history <= spike_window:
            raise ConfigError("GradientHealthMonitor: need spike_factor > 1 and 1 <= spike_min_history <= spike_window")
        counts = {
            "max_consecutive_skips": (max_consecutive_skips, " (0: never stop)"),
            "layer_every_n_logs": (layer_every_n_logs, " (0: never)"),
            "warn_every_n_steps": (warn_every_n_steps, " (0: no limit)"),
        }
        for name, (value, meaning) in counts.items():
            if value < 0:
                raise ConfigError(f"GradientHealthMonitor.{name} must be >= 0{meaning}, got {value}")
        if clip_val is not None and not clip_val > 0:
            raise ConfigError(
                f"GradientHealthMonitor.clip_val must be > 0 or null (null: trainer.gradient_clip_val), got {clip_val}"
            )
        self.on_nonfinite, self.max_consecutive_skips = on_nonfinite, max_consecutive_skips
        self.spike_factor, self.spike_min_history = spike_factor, spike_min_history
        self.layer_every_n_logs, self.update_ratio, self.clip_val = layer_every_n_logs, update_ratio, clip_val
        self.warn_every_n_steps = warn_every_n_steps
        self._names: dict[int, str] = {}
        self._warned: dict[str, int] = {}
        self._snapshot: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None
        self._snapshot_per_group = False
        self._group_norms_pending: dict[str, float] | None = None  # written once per batch, in on_train_batch_end
        self._log_count = 0
        self._log_batch = -1  # logged step last counted in _log_count (manual optimization: several updates each)
        self._event_step: int | None = None  # step whose gradients were non-finite (not to count its loss again)
        self._stop_pending = False
        # state kept in checkpoints
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.steps = 0
        self.clipped_steps = 0
        self.nonfinite_steps = 0
        self.skipped_steps = 0
        self.scaler_skips = 0
        self.consecutive_nonfinite = 0
        self.loss_spikes = 0
        self.max_norm = 0.0
        self.max_norm_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    # ---- gradients ----
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        step = trainer.global_step
        self.steps += 1
        per_param, _ = grad_norms(params)  # the package's one gradient-norm computation (fused, on the device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # 16-mixed with a fused optimizer: it unscales inside step(), so the gradients here are still scaled
            per_param = per_param / scaler.get_scale()
        total = torch.linalg.vector_norm(per_param).item()  # the one host sync per step
        finite = math.isfinite(total)
        if trainer.world_size > 1:  # DDP grads are all-reduced already; this also covers NaNs added after that
            finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if not finite:
            self._nonfinite(trainer, params, step)
            return
        self.consecutive_nonfinite = 0
        if total > self.max_norm:
            self.max_norm, self.max_norm_step = total, step
        clip = self.clip_val if self.clip_val is not None else trainer.gradient_clip_val
        if clip:
            if trainer.gradient_clip_algorithm == "value":
                engaged = torch.stack(torch._foreach_norm([p.grad for p in params], math.inf)).max().item() > clip
            else:
                engaged = total > clip
            self.clipped_steps += int(engaged)
        if not will_log(trainer):
            return
        if (batch := logged_step(trainer)) != self._log_batch:  # this logged step's first update
            self._log_batch = batch
            self._log_count += 1
        per_group = bool(self.layer_every_n_logs) and self._log_count % self.layer_every_n_logs == 0
        metrics = {
            "grad_health/grad_norm": total,
            "grad_health/grad_norm_max": self.max_norm,
            "grad_health/clipped_frac": self.clipped_steps / self.steps,
            "grad_health/nonfinite_steps": float(self.nonfinite_steps),
            "grad_health/loss_spikes": float(self.loss_spikes),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)  # a later update of the same batch overwrites
        if per_group:  # likewise: the last update's norms are written, at the end of the batch
            self._group_norms_pending = self._group_norms(params, per_param)
        if self.update_ratio:
            # the weights before this step; compared with the weights after it in on_train_batch_end
            self._snapshot = [(self._group(p), p, p.detach().clone()) for p in params]
            self._snapshot_per_group = per_group

    def _group(self, p: torch.Tensor) -> str:
        return param_group_name(self._names.get(id(p), "other.weight"))

    def _group_norms(self, params: list[torch.Tensor], per_param: torch.Tensor) -> dict[str, float]:
        groups: dict[str, int] = {}
        index = torch.tensor([groups.setdefault(self._group(p), len(groups)) for p in params], device=per_param.device)
        sq = torch.zeros(len(groups), device=per_param.device).index_add_(0, index, per_param.square())
        return dict(zip(groups, sq.sqrt().tolist()))

    def _nonfinite(self, trainer: L.Trainer, params: list[torch.Tensor], step: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: the GradScaler skips this step and lowers its scale by itself
            self.scaler_skips += 1
            return
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        self._event_step = step
        bad = sorted({self._group(p) for p in params if not torch.isfinite(p.grad).all()})
        action = self.on_nonfinite
        if action == "skip" and 0 < self.max_consecutive_skips <= self.consecutive_nonfinite:
            action = "stop"
            rank_zero_warn(f"GradientHealthMonitor: {self.consecutive_nonfinite} non-finite steps in a row; stopping")
        if action in ("skip", "stop"):
            for p in params:
                p.grad = None  # AdamW skips parameters without a gradient: no momentum, no weight decay
            self.skipped_steps += 1
        if action == "stop":
            self._stop_pending = True
        self._warn(
            "nonfinite",
            step,
            f"GradientHealthMonitor: non-finite gradients at step {step} in {', '.join(bad[:5]) or '?'}"
            + {"skip": "; update skipped", "stop": "; update skipped, stopping", "warn": ""}[action]
            + f" ({self.nonfinite_steps} so far). Lower the learning rate, check the data, or clip gradients",
            force=action == "stop",
        )

    # ---- loss ----
    def observe_loss(self, loss: float, step: int = -1) -> bool:
        """Record a finite loss; True (and a warning) when it spikes above ``spike_factor`` x the running median.

        Only a positive median is compared against (language-model, reward and DPO losses); objectives that
        go negative, like PPO's, are recorded but never flagged.
        """
        spike = False
        if len(self.losses) >= self.spike_min_history:
            median = statistics.median(self.losses)
            if median > 0 and loss > self.spike_factor * median:
                spike = True
                self.loss_spikes += 1
                self._warn(
                    "spike",
                    step,
                    f"GradientHealthMonitor: loss spike at step {step}: {loss:.4g} is {loss / median:.1f}x the "
                    f"running median {median:.4g} ({self.loss_spikes} spikes so far)",
                )
        self.losses.append(loss)
        return spike

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._group_norms_pending is not None:
            log_sparse(trainer, {f"grad_health/grad_norm/{k}": v for k, v in self._group_norms_pending.items()})
            self._group_norms_pending = None
        if self._snapshot is not None:
            self._log_update_ratio(trainer, pl_module)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.item()
            if pl_module.automatic_optimization:
                value *= trainer.accumulate_grad_batches  # Lightning divides the returned loss by it
            if math.isfinite(value):
                self.observe_loss(value, trainer.global_step)
            elif self._event_step != trainer.global_step - 1:  # not already counted through its gradients
                self.nonfinite_steps += 1
                self._warn("nonfinite_loss", trainer.global_step, f"GradientHealthMonitor: loss is {value}")
                self._stop_pending |= self.on_nonfinite == "stop"
        stop = self._stop_pending
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._stop_pending = False
            self._stop(trainer)

    def _log_update_ratio(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        delta_sq: dict[str, torch.Tensor] = {}
        weight_sq: dict[str, torch.Tensor] = {}
        for group, p, before in self._snapshot:
            delta_sq[group] = delta_sq.get(group, 0) + (p.detach() - before).float().square().sum()
            weight_sq[group] = weight_sq.get(group, 0) + before.float().square().sum()
        self._snapshot = None
        total = (sum(delta_sq.values()) / sum(weight_sq.values()).clamp(min=1e-30)).sqrt()
        pl_module.log("grad_health/update_ratio", total, on_step=True, on_epoch=False)
        if self._snapshot_per_group:
            ratios = torch.stack([delta_sq[g] / weight_sq[g].clamp(min=1e-30) for g in delta_sq]).sqrt().tolist()
            log_sparse(trainer, {f"grad_health/update_ratio/{g}": r for g, r in zip(delta_sq, ratios)})

    def _stop(self, trainer: L.Trainer) -> None:
        cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        path = Path(cb.dirpath if cb is not None and cb.dirpath else trainer.default_root_dir) / "nonfinite.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        trainer.should_stop = True
        rank_zero_warn(
            f"GradientHealthMonitor: stopped training at step {trainer.global_step} after non-finite gradients or "
            f"loss; saved {path} (weights before the bad update). Lower the learning rate or check the data, then "
            f"resume with --ckpt_path {path}"
        )

    def _warn(self, kind: str, step: int, msg: str, force: bool = False) -> None:
        if force or step - self._warned.get(kind, -(10**9)) >= self.warn_every_n_steps:
            self._warned[kind] = step
            rank_zero_warn(msg)

    # ---- summary and state ----
    def summary(self) -> str:
        """One line on the run's gradient health."""
        clip = f"{self.clipped_steps / self.steps:.0%}" if self.steps else "n/a"
        return (
            f"gradient health: {self.steps} steps, clipping engaged on {clip}, max grad norm {self.max_norm:.4g} "
            f"(step {self.max_norm_step}), {self.nonfinite_steps} non-finite ({self.skipped_steps} updates skipped"
            + (f", {self.scaler_skips} GradScaler skips" if self.scaler_skips else "")
            + f"), {self.loss_spikes} loss spikes"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(self.summary())

    state_attrs = (
        "steps", "clipped_steps", "nonfinite_steps", "skipped_steps", "scaler_skips", "consecutive_nonfinite",
        "loss_spikes", "max_norm", "max_norm_step",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.losses.clear()
        self.losses.extend(state_dict.get("losses", []))
