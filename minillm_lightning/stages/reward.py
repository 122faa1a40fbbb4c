"""Reward modelling: a MiniGPT backbone with a scalar head trained on preference pairs (Bradley-Terry).

The reward of a sequence is a linear read-out of the backbone's final hidden state at its LAST REAL token
(the reply's ``<|im_end|>`` in preference batches), wherever the padding is. Two entry points:

- :class:`RewardModule`: the Lightning stage (``minillm fit --config configs/reward_tiny.yaml``).
- :class:`RewardModel` + :func:`load_reward_model`: a plain ``nn.Module`` that scores token batches or
  conversations, for PPO, evaluation and scripts::

      model, tok = load_reward_model("checkpoints/reward_tiny/last.ckpt")
      model.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])
      model.score(input_ids, attention_mask)  # right- or left-padded (B, T) token batches
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from minillm_lightning.checkpoint import checkpoint_meta, load_checkpoint
from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.losses import bradley_terry_loss
from minillm_lightning.model import GPTOutput, MiniGPT, MiniGPTConfig, padded_causal_mask
from minillm_lightning.stages.base import StageModule
from minillm_lightning.tokenizer import Tokenizer

OnNonFinite = Literal["raise", "skip"]
SFT_COMMAND = "minillm fit --config configs/sft_tiny.yaml"


class NonFiniteLossError(MiniLLMError):
    """A NaN/Inf loss: stepping on it would poison the weights, so the run stops instead."""


# ---- padding-aware forward, shared by the reward and DPO stages ----
RIGHT_PADDED = "right_padded"  # batch key: the padding layout, decided on the host before the batch moves


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is real tokens followed only by padding (a host sync if the mask is on a GPU)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def mark_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Store in a preference batch whether both sides are right-padded; called by the reward and DPO modules'
    ``on_before_batch_transfer``, on the host, so their training steps need no device sync to know it."""
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


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)  # the largest position whose mask is 1


def sequence_rewards(
    model: Callable[..., GPTOutput],
    head: nn.Linear,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    right_padded: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """(rewards (B,) in float32, MoE auxiliary loss): the head applied to each row's last real hidden state."""
    if attention_mask is None:
        attention_mask, right_padded = torch.ones_like(input_ids), True
    out = padded_forward(model, input_ids, attention_mask, compute_logits=False, right_padded=right_padded)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = out.hidden[rows, last_token_index(attention_mask)]  # (B, dim)
    return head(last).squeeze(-1).float(), out.aux_loss


def new_reward_head(dim: int) -> nn.Linear:
    """A fresh scalar head; std 1/sqrt(dim + 1) (Ziegler et al. 2019) starts rewards near unit scale."""
    head = nn.Linear(dim, 1)
    nn.init.normal_(head.weight, std=1 / math.sqrt(dim + 1))
    nn.init.zeros_(head.bias)
    return head


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


# ---- the scoring API ----
class RewardModel(nn.Module):
    """A MiniGPT backbone and a scalar reward head, without Lightning.

    Args:
        backbone: the MiniGPT (its language-model head is unused).
        head: the ``Linear(dim, 1)`` reward head; a fresh one when omitted.
        tokenizer: needed only to score conversations (``load_reward_model`` sets it).
    """

    def __init__(self, backbone: MiniGPT, head: nn.Linear | None = None, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.model = backbone
        self.head = head if head is not None else new_reward_head(backbone.config.dim)
        self.tokenizer = tokenizer

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards (B,) of a (B, T) token batch, with gradients."""
        return sequence_rewards(self.model, self.head, input_ids, attention_mask)[0]

    def encode(self, conversations: Sequence[Sequence[dict]]) -> tuple[Tensor, Tensor]:
        """Right-padded (input_ids, attention_mask) of conversations that end with the assistant reply to score.

        Each is rendered with the chat template and ends at the reply's ``<|im_end|>``, exactly like the
        sequences of the preference data the model was trained on.
        """
        if self.tokenizer is None:
            raise ValueError("RewardModel.tokenizer is not set; pass token ids, or load with load_reward_model")
        rows = []
        for conv in conversations:
            if not conv or conv[-1]["role"] != "assistant":
                raise ValueError("each conversation to score must end with the assistant reply")
            ids, mask = self.tokenizer.encode_chat(conv)
            rows.append(ids[: max(i for i, m in enumerate(mask) if m) + 1])  # drop the template's final newline
        T = max(len(r) for r in rows)
        device = self.head.weight.device
        input_ids = torch.tensor([r + [self.tokenizer.pad_id] * (T - len(r)) for r in rows], device=device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
        return input_ids, attention_mask

    @torch.no_grad()
    def score(self, input_ids: Tensor | Sequence[Sequence[dict]], attention_mask: Tensor | None = None) -> Tensor:
        """Rewards (B,) in float32, without gradients.

        Args:
            input_ids: a (B, T) token batch (right- or left-padded), or a list of conversations
                (``[{"role", "content"}, ...]`` ending with the assistant reply to score).
            attention_mask: (B, T), 1 on real tokens; ``None`` means no padding. Ignored for conversations.
        """
        if not isinstance(input_ids, Tensor):
            input_ids, attention_mask = self.encode(input_ids)
        return self(input_ids, attention_mask)


def load_reward_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[RewardModel, Tokenizer]:
    """Rebuild the reward model of a reward checkpoint; returns (model in eval mode and frozen, tokenizer)."""
    ckpt = load_checkpoint(path, map_location)
    meta = checkpoint_meta(ckpt, str(path))
    if meta.get("stage") != RewardModule.stage_name:
        raise CheckpointError(
            f"{path} is a {meta.get('stage')} checkpoint, not a reward model (it has no reward head); train one "
            f"with `minillm fit --config configs/reward_tiny.yaml`"
        )
    config = MiniGPTConfig.from_dict(meta["arch"])
    config.gradient_checkpointing = False
    tokenizer = Tokenizer.from_checkpoint(ckpt, str(path))
    model = RewardModel(MiniGPT(config), tokenizer=tokenizer)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("model.", "head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "model.lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: reward model weights do not match its config (missing {missing[:3]})")
    return model.eval().requires_grad_(False), tokenizer


# ---- the stage ----
class RewardModule(StageModule):
    """Reward-model stage: backbone + scalar head, Bradley-Terry loss on (chosen, rejected) pairs.

    Batches come from :class:`~minillm_lightning.data.preference.PreferenceDataModule`; both halves run as
    one (2B, T) forward. Logged: ``train/loss`` and, as epoch means over all ranks (torchmetrics),
    ``{train,val,test}/accuracy`` (share of pairs with r_chosen > r_rejected), ``/margin`` (mean r_c - r_r),
    ``/reward_chosen``, ``/reward_rejected``; ``val/loss``, ``test/loss``. ``test/`` comes from ``minillm test``
    on ``data.test_sources``.

    Args:
        arch: backbone architecture (ignored with ``init_from``: the checkpoint's architecture is used).
        vocab_size: tokenizer vocabulary size; linked from the data module, do not set by hand.
        init_from: the checkpoint to start from, normally the SFT model: its backbone is loaded and the
            reward head starts fresh. To continue the SAME reward run use ``--ckpt_path`` instead.
        learning_rate: peak AdamW learning rate; ~1e-5 for real models (InstructGPT used 9e-6): the backbone
            already knows language, the head and a light adjustment are all that is needed.
        weight_decay: AdamW weight decay on matrices.
        betas: AdamW betas.
        warmup: warmup length (a share of the total steps when < 1, else optimizer steps).
        min_lr_ratio: the cosine schedule ends at ``learning_rate * min_lr_ratio``.
        compile: run the backbone through ``torch.compile``.
        margin: required reward gap in the Bradley-Terry loss (0: the plain loss).
        center_coef: weight of the reward-centering term ``(r_c + r_r)^2`` (Eisenstein et al.); 0.01 keeps
            rewards near zero mean, which helps PPO. 0 disables it.
        on_nonfinite: a NaN/Inf loss: ``raise`` (stop) or ``skip`` the batch with a warning (single device only).
    """

    stage_name = "reward"

    def __init__(
        self,
        arch: MiniGPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.03,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        margin: float = 0.0,
        center_coef: float = 0.0,
        on_nonfinite: OnNonFinite = "raise",
    ) -> None:
        if init_from and not Path(init_from).is_file():
            raise CheckpointError(
                f"model.init_from={init_from} does not exist. The reward model starts from the SFT model: run "
                f"`{SFT_COMMAND}` first, or point model.init_args.init_from and data.init_args.tokenizer at an "
                f"existing checkpoint"
            )
        if center_coef < 0 or on_nonfinite not in ("raise", "skip"):
            raise ValueError("center_coef must be >= 0 and on_nonfinite raise or skip")
        super().__init__(arch, vocab_size, init_from, learning_rate, weight_decay, betas, warmup, min_lr_ratio, compile)
        if not init_from:
            self.warn_once(
                f"reward model from random weights: set model.init_from to the SFT checkpoint ({SFT_COMMAND})"
            )
        self.head = new_reward_head(self.arch.dim)
        if not self.arch.tie_embeddings:
            # the LM head never sees a gradient here; frozen, it stays out of the optimizer and DDP's reducer
            self.model.lm_head.requires_grad_(False)
        names = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected")
        self.train_metrics = nn.ModuleDict({n: MeanMetric() for n in names[1:]})
        self.val_metrics = nn.ModuleDict({n: MeanMetric() for n in names})
        self.test_metrics = nn.ModuleDict({n: MeanMetric() for n in names})

    def pair_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(chosen rewards (B,), rejected rewards (B,), MoE aux loss) of a preference batch, in one forward."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        rewards, aux = sequence_rewards(self._forward, self.head, ids, mask, batch.get(RIGHT_PADDED))
        chosen, rejected = rewards.chunk(2)
        return chosen, rejected, aux

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return mark_padding(batch) if isinstance(batch, dict) else batch

    def _step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        chosen, rejected, aux = self.pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, self.hparams.margin, self.hparams.center_coef)
        stats = {
            "accuracy": (chosen > rejected).float(),
            "margin": (chosen - rejected).detach(),
            "reward_chosen": chosen.detach(),
            "reward_rejected": rejected.detach(),
        }
        return loss, aux, stats

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, aux, stats = self._step(batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in stats.items():
            metric = self.train_metrics[name]
            metric(value)  # batch value now, accumulated for the epoch mean
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, prog_bar=name == "accuracy")
        if self.arch.is_moe:
            self.log("train/moe_aux_loss", aux)
        self.count_tokens(2 * batch["chosen_input_ids"].numel())
        return check_finite(loss + aux, self, self.hparams.on_nonfinite)

    def _eval_step(self, batch: dict[str, Tensor], split: Literal["val", "test"]) -> None:
        """Accumulate the epoch means of a held-out split: ``<split>/loss``, ``/accuracy``, ``/margin``, ..."""
        loss, _, stats = self._step(batch)
        metrics = self.val_metrics if split == "val" else self.test_metrics
        for name, value in {"loss": loss.expand(len(stats["margin"])), **stats}.items():
            metrics[name].update(value)
            self.log(f"{split}/{name}", metrics[name], on_epoch=True, prog_bar=name == "accuracy")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")
