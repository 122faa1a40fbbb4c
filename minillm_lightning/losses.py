"""Loss functions as pure tensor functions (no model, no Lightning), shared by every stage."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy over labelled positions; returns (loss, number of labelled tokens).

    ``labels`` are already aligned with ``logits`` (label t is the token that follows input t) and hold
    ``ignore_index`` where no loss is wanted (padding, prompt tokens).
    """
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    n = (labels != ignore_index).sum()
    return loss / n.clamp(min=1), n


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum of log p(label) over labelled positions of each sequence: (B, T, V), (B, T) -> (B,)."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


# ---- preference losses: Bradley-Terry (reward models) and DPO / cDPO / IPO ----

DPOLossType = Literal["sigmoid", "ipo"]


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float = 0.0,
    center_coef: float = 0.0,
) -> Tensor:
    """Reward-model loss of the Bradley-Terry preference model, averaged over the batch.

    ``P(chosen > rejected) = sigmoid(r_c - r_r)``, so the negative log-likelihood of a pair is
    ``-logsigmoid(r_c - r_r - margin)``. The optional ``margin`` (Llama 2) asks for a larger gap on pairs
    rated as clearly different. The optional centering term ``center_coef * (r_c + r_r)^2`` (Eisenstein
    et al., 2023, "Helping or Herding?") pins the rewards' mean near zero: the Bradley-Terry loss only sees
    differences, so without it rewards can drift to any offset, which hurts a later PPO stage.

    Args:
        chosen_rewards: (B,) scalar rewards of the preferred responses.
        rejected_rewards: (B,) rewards of the dispreferred responses.
        margin: required reward gap, a scalar or (B,) tensor.
        center_coef: weight of the reward-centering term (0 disables it; Eisenstein et al. use 0.01).

    Returns:
        The scalar mean loss.
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss.mean()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization losses per pair, and the implicit rewards.

    With ``pi_logratios = pi(y_c) - pi(y_r)`` and ``ref_logratios = ref(y_c) - ref(y_r)`` (sequence
    log-probabilities of the responses), ``logits = pi_logratios - ref_logratios`` and:

    - ``sigmoid`` (Rafailov et al., 2023): ``-logsigmoid(beta * logits)``; with ``label_smoothing = eps``
      the conservative DPO of Mitchell (2023) that assumes a share ``eps`` of flipped labels:
      ``-(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)``.
    - ``ipo`` (Azar et al., 2023, eq. 17): ``(logits - 1 / (2 * beta))^2``, a squared loss that stops at a
      finite margin instead of pushing the log-ratio to infinity (beta plays the paper's tau).

    The implicit rewards are ``beta * (pi(y) - ref(y))``; they are detached (for logging only).

    Args:
        policy_chosen_logps: (B,) log-probabilities of the chosen responses under the policy.
        policy_rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) log-probabilities of the chosen responses under the frozen reference.
        ref_rejected_logps: (B,) the same for the rejected responses.
        beta: strength of the implicit KL constraint to the reference (higher: stay closer).
        loss_type: ``sigmoid`` or ``ipo``.
        label_smoothing: share of assumed-flipped labels for conservative DPO (``sigmoid`` only), in [0, 0.5).

    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid or ipo")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
