"""What the reward and DPO stages share: preference batches run as one padded (2B, T) forward, per-pair statistics
accumulated as epoch means, and the NaN/Inf loss policy.

- padding: :func:`mark_padding` records on the host whether a batch is right-padded; :func:`padded_forward`
  then runs it with or without an attention mask and positions that skip the pads.
- :class:`PairwiseModule`: the training, validation and test loops over ``pair_step``, which each stage defines.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from minillm_lightning.errors import MiniLLMError
from minillm_lightning.model import GPTOutput, padded_causal_mask
from minillm_lightning.stages.base import StageModule

OnNonFinite = Literal["raise", "skip"]
Split = Literal["train", "val", "test"]
SFT_COMMAND = "minillm fit --config configs/sft_tiny.yaml"
RIGHT_PADDED = "right_padded"  # batch key: the padding layout, decided on the host before the batch moves


class NonFiniteLossError(MiniLLMError):
    """A NaN/Inf loss: stepping on it would poison the weights, so the run stops instead."""


# ---- padding-aware forward ----
def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is real tokens followed only by padding (a host sync if the mask is on a GPU)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def mark_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Store in a preference batch whether both sides are right-padded; called in ``on_before_batch_transfer``,
    on the host, so the training steps need no device sync to know it."""
    masks = [batch[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    if masks and all(isinstance(m, Tensor) and m.device.type == "cpu" for m in masks):
        batch[RIGHT_PADDED] = all(is_right_padded(m) for m in masks)
    return batch


def padded_forward(
    model: Callable[..., GPTOutput],
    input_ids: Tensor,
    attention_mask: Tensor | None,
    compute_logits: bool = True,
    right_padded: bool | None = None,
) -> GPTOutput:
    """Run a MiniGPT on a padded (B, T) batch so that every real token is computed as without padding.

    Right padding needs nothing (causal attention never lets a real token see the pads after it). Any other
    layout (left padding, or pads in the middle) gets positions that count real tokens only and an attention
    mask that hides the pads. ``right_padded``: the layout when the caller knows it (see :func:`mark_padding`);
    ``None`` inspects the mask.
    """
    if right_padded is None:
        right_padded = attention_mask is None or is_right_padded(attention_mask)
    if attention_mask is None or right_padded:
        return model(input_ids, compute_logits=compute_logits)
    T = input_ids.shape[1]
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and T > block_size:
        raise ValueError(f"sequence of {T} tokens exceeds the model context block_size={block_size}")
    keep = attention_mask.bool()
    position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
    return model(
        input_ids, position_ids=position_ids, attn_mask=padded_causal_mask(keep, T), compute_logits=compute_logits
    )


def pair_tensors(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) of a preference batch as one (2B, T) batch: chosen rows first."""
    return tuple(
        torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")
    )


def check_finite(loss: Tensor, module: StageModule, on_nonfinite: OnNonFinite) -> Tensor | None:
    """``loss`` when finite; otherwise raise :class:`NonFiniteLossError`, or warn and return ``None`` (Lightning
    then skips the optimizer step) with ``on_nonfinite="skip"`` on a single device."""
    if bool(torch.isfinite(loss)):
        return loss
    msg = (
        f"{module.stage_name}: the loss is {loss.item()} at step {module.global_step}. Usual causes: a learning "
        f"rate too high (lower model.learning_rate), fp16 overflow (use precision bf16-mixed or 32-true), or "
        f"an init_from checkpoint that already holds NaN weights"
    )
    if on_nonfinite == "skip" and module.trainer.world_size == 1:
        module.warn_once(msg + "; skipping this batch (on_nonfinite: skip)")
        return None
    raise NonFiniteLossError(msg + "; the run stops before the weights are poisoned")


# ---- the shared stage loops ----
class PairwiseModule(StageModule):
    """Base of the stages trained on (chosen, rejected) pairs (``PreferenceDataModule`` batches).

    A subclass defines :meth:`pair_step` (loss, MoE aux loss, per-pair statistics) and the statistics' names
    (:attr:`pair_stats`); this class logs ``train/loss`` and every statistic under ``train/``, ``val/`` and
    ``test/`` as per-step values and epoch means over all ranks (torchmetrics), plus ``val/loss`` and
    ``test/loss``.

    Args:
        on_nonfinite: a NaN/Inf loss: ``raise`` (stop) or ``skip`` the batch with a warning (single device only).
    """

    prerequisite = SFT_COMMAND
    starts_from = "the SFT model"
    data_modules = ("PreferenceDataModule",)
    pair_stats: ClassVar[tuple[str, ...]] = ()
    """Names of the per-pair statistics ``pair_step`` returns (``/`` allowed: TRL names)."""
    prog_bar_stat: ClassVar[str] = ""
    """The statistic shown in the progress bar."""

    def __init__(self, *, on_nonfinite: OnNonFinite = "raise", **kwargs: Any) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be raise or skip, got {on_nonfinite!r}")
        super().__init__(**kwargs)
        self.on_nonfinite = on_nonfinite
        # Lightning notes that this module's on_before_batch_transfer (it marks the padding layout) runs although a
        # data module was passed: that is the intent, with any data module or loader
        warnings.filterwarnings(
            "ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but have passed"
        )

    def _init_metrics(self, stats: tuple[str, ...]) -> None:
        """One running mean per statistic and split (``loss`` too on held-out splits: training logs its own)."""

        def means(names: tuple[str, ...]) -> nn.ModuleDict:
            return nn.ModuleDict({n.replace("/", "_"): MeanMetric() for n in names})

        self.train_metrics = means(stats)
        self.val_metrics = means(("loss", *stats))
        self.test_metrics = means(("loss", *stats))

    def pair_step(self, batch: dict[str, Tensor], split: Split) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(mean loss, MoE auxiliary loss, statistics (B,) per pair) of one preference batch."""
        raise NotImplementedError

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return mark_padding(batch) if isinstance(batch, dict) else batch

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, aux, stats = self.pair_step(batch, "train")
        self.log("train/loss", loss, prog_bar=True)
        for name, value in stats.items():
            metric = self.train_metrics[name.replace("/", "_")]
            metric(value)  # batch value now, accumulated for the epoch mean
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, prog_bar=name == self.prog_bar_stat)
        if self.arch.is_moe:
            self.log("train/moe_aux_loss", aux)
        return check_finite(loss + aux, self, self.on_nonfinite)

    def _eval_step(self, batch: dict[str, Tensor], split: Literal["val", "test"]) -> None:
        """Accumulate the epoch means of a held-out split: ``<split>/loss`` and ``<split>/<statistic>``."""
        loss, _, stats = self.pair_step(batch, split)
        metrics = self.val_metrics if split == "val" else self.test_metrics
        pairs = batch["chosen_input_ids"].shape[0]
        for name, value in {"loss": loss.expand(pairs), **stats}.items():
            metric = metrics[name.replace("/", "_")]
            metric.update(value)
            self.log(f"{split}/{name}", metric, on_epoch=True, prog_bar=name == self.prog_bar_stat)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")
