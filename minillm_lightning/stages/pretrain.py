"""PretrainModule: next-token prediction on packed text blocks."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

from minillm_lightning.losses import lm_loss
from minillm_lightning.model import segment_causal_mask
from minillm_lightning.stages.base import StageModule


class PretrainModule(StageModule):
    """Pretraining stage: causal language modelling (arguments: :class:`StageModule` and :class:`OptimConfig`).

    SFT reuses this module's loss and metrics; its batches only label the assistant tokens."""

    stage_name = "pretrain"
    data_modules = ("PretrainDataModule", "SFTDataModule")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_nll = MeanMetric()  # token-weighted mean NLL, reduced across ranks -> val/loss, val/ppl
        self.test_nll = MeanMetric()  # the same on the test split -> test/loss, test/ppl, test/bpb

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean NLL of the labelled tokens, their number, MoE auxiliary loss) of one batch.

        Packed batches (SFT) also carry ``segment_ids``/``position_ids``: attention then stays within each
        segment and positions restart at every segment.
        """
        segments = batch.get("segment_ids")
        out = self._forward(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attn_mask=segment_causal_mask(segments) if segments is not None else None,
        )
        loss, n_tokens = lm_loss(out.logits, batch["labels"])
        return loss, n_tokens, out.aux_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, aux = self._lm_loss(batch)
        self.log("train/loss", loss, prog_bar=True)  # every step: the progress bar shows it
        if self.logs_this_step():
            self.log("train/ppl", torch.exp(loss.detach()))
        if self.arch.is_moe:
            self.log("train/moe_aux_loss", aux)
        return loss + aux

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens, _ = self._lm_loss(batch)
        self.val_nll.update(loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        if not self.val_nll.update_called:
            return
        nll = self.val_nll.compute()
        self.val_nll.reset()
        # already reduced across ranks by the metric; sync_dist averages identical values (and silences a warning)
        self.log("val/loss", nll, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(nll), sync_dist=True)
        cpt = getattr(self.trainer.datamodule, "val_chars_per_token", None) if self._trainer else None
        if cpt:  # per character, so models with different tokenizers compare
            self.log("val/nats_per_char", nll / cpt, sync_dist=True)
            self.log("val/bits_per_char", nll / cpt / math.log(2), sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens, _ = self._lm_loss(batch)
        self.test_nll.update(loss, weight=n_tokens)

    def on_test_epoch_end(self) -> None:
        if not self.test_nll.update_called:
            return
        nll = self.test_nll.compute()
        self.test_nll.reset()
        self.log("test/loss", nll, sync_dist=True)
        self.log("test/ppl", torch.exp(nll), sync_dist=True)
        bpt = getattr(self.trainer.datamodule, "test_bytes_per_token", None) if self._trainer else None
        if bpt:  # bits per UTF-8 byte of the test text: comparable across tokenizers and languages
            self.log("test/bpb", nll / bpt / math.log(2), sync_dist=True)
