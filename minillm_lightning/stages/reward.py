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
from typing import Any

import torch
from torch import Tensor, nn

from minillm_lightning.checkpoint import backbone_state, checkpoint_meta, load_backbone
from minillm_lightning.errors import CheckpointError
from minillm_lightning.losses import bradley_terry_loss
from minillm_lightning.model import GPTOutput, MiniGPT
from minillm_lightning.stages.pairwise import RIGHT_PADDED, PairwiseModule, Split, padded_forward
from minillm_lightning.tokenizer import Tokenizer


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
    backbone, ckpt = load_backbone(path, map_location)
    stage = checkpoint_meta(ckpt, str(path)).get("stage")
    if stage != RewardModule.stage_name:
        raise CheckpointError(
            f"{path} is a {stage} checkpoint, not a reward model (it has no reward head); train one "
            f"with `minillm fit --config configs/reward_tiny.yaml`"
        )
    model = RewardModel(backbone, tokenizer=Tokenizer.from_checkpoint(ckpt, str(path)))
    try:
        model.head.load_state_dict(backbone_state(ckpt["state_dict"], prefix="head."))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the reward head does not match its config ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False), model.tokenizer


# ---- the stage ----
class RewardModule(PairwiseModule):
    """Reward-model stage: backbone + scalar head, Bradley-Terry loss on (chosen, rejected) pairs.

    Both halves of a preference batch run as one (2B, T) forward. Logged (see
    :class:`~minillm_lightning.stages.pairwise.PairwiseModule`): ``train/loss`` and, per step and as epoch
    means, ``{train,val,test}/accuracy`` (share of pairs with r_chosen > r_rejected), ``/margin`` (mean
    r_c - r_r), ``/reward_chosen``, ``/reward_rejected``; ``val/loss``, ``test/loss``. ``test/`` comes from
    ``minillm test`` on ``data.test_sources``.

    ``init_from`` is normally the SFT model: its backbone is loaded and the reward head starts fresh (to continue
    the SAME reward run use ``--ckpt_path``). The arguments every stage shares are listed by
    :class:`~minillm_lightning.stages.base.StageModule`; the learning-rate default differs here.

    Args:
        learning_rate: peak AdamW learning rate; ~1e-5 for real models (InstructGPT used 9e-6): the backbone
            already knows language, the head and a light adjustment are all that is needed.
        weight_decay: AdamW weight decay on matrices.
        warmup: warmup length (a share of the total steps when < 1, else optimizer steps).
        margin: required reward gap in the Bradley-Terry loss (0: the plain loss).
        center_coef: weight of the reward-centering term ``(r_c + r_r)^2`` (Eisenstein et al.); 0.01 keeps
            rewards near zero mean, which helps PPO. 0 disables it.
    """

    stage_name = "reward"
    pair_stats = ("accuracy", "margin", "reward_chosen", "reward_rejected")
    prog_bar_stat = "accuracy"

    def __init__(
        self,
        *,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup: float = 0.03,
        margin: float = 0.0,
        center_coef: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {center_coef}")
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup=warmup, **kwargs)
        self.margin, self.center_coef = margin, center_coef
        self.head = new_reward_head(self.arch.dim)
        if not self.arch.tie_embeddings:
            # the LM head never sees a gradient here; frozen, it stays out of the optimizer and DDP's reducer
            self.model.lm_head.requires_grad_(False)
        self._init_metrics(self.pair_stats)

    def pair_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(chosen rewards (B,), rejected rewards (B,), MoE aux loss) of a preference batch, in one forward."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        rewards, aux = sequence_rewards(self._forward, self.head, ids, mask, batch.get(RIGHT_PADDED))
        chosen, rejected = rewards.chunk(2)
        return chosen, rejected, aux

    def pair_step(self, batch: dict[str, Tensor], split: Split) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        chosen, rejected, aux = self.pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, self.margin, self.center_coef)
        stats = {
            "accuracy": (chosen > rejected).float(),
            "margin": (chosen - rejected).detach(),
            "reward_chosen": chosen.detach(),
            "reward_rejected": rejected.detach(),
        }
        return loss, aux, stats
