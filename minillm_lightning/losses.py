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


# ---- reinforcement learning: GAE, PPO/GRPO losses, KL estimators ----
# Reinforcement-learning losses and estimators as pure tensor functions (no model, no Lightning).
#
# Shapes: ``N`` sequences (rollout samples), ``R`` response positions. Per-token tensors are ``(N, R)`` and come
# with a boolean/0-1 ``mask`` that is 1 on real response tokens and 0 on the right padding after a response;
# every function ignores masked positions.
#
# References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019 (KL-penalised RLHF,
# adaptive KL controller), Shao et al. 2024 (GRPO, DeepSeekMath), Schulman 2020 "Approximating KL divergence"
# (the k1/k2/k3 estimators).

KLEstimator = Literal["k1", "k2", "k3"]


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected when ``unbiased`` and there are >= 2 entries)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of ``x`` to unit variance (and zero mean when ``shift_mean``).

    Used on the advantages of a whole rollout so the policy-gradient step size does not depend on the reward
    scale. Masked positions come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns), each (N, R).

    ``rewards[:, t]`` is the reward received after emitting token t (the KL penalty on every token, the sequence
    score added on the last one), ``values[:, t]`` the critic's estimate of the return from the state that emits
    token t. The episode ends after the last real token, so the value beyond it is 0.

    Backwards over t:
        delta_t = r_t + gamma * V_{t+1} - V_t          (one-step TD error; V_{t+1} = 0 past the end)
        A_t     = delta_t + gamma * lam * A_{t+1}      (exponentially weighted sum of TD errors)
        return_t = A_t + V_t                           (the critic's regression target)
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # padding: no reward, no value, so nothing flows back
    N, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_adv = rewards.new_zeros(N)  # A_{t+1}
    next_value = rewards.new_zeros(N)  # V_{t+1}
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate objective (to minimise); returns (loss, clip fraction, approximate KL).

    With ratio = pi(a|s) / pi_old(a|s) = exp(logprobs - old_logprobs), per token:
        loss_t = max(-A_t * ratio, -A_t * clamp(ratio, 1 - clip, 1 + clip))
    i.e. the pessimistic bound: the update earns no credit for moving the ratio beyond 1 +- clip in the
    direction the advantage favours. Averaged over the real tokens of the batch (token-level mean).
    clipfrac is the share of tokens where the clipped term is the active one; approx KL is
    0.5 * mean((log ratio)^2), a second-order estimate of KL(pi_old || pi) used to watch the step size.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.pow(2), mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (to minimise); returns (loss, clip fraction).

    Like the policy, the critic may move at most ``clip`` away from its rollout-time estimate before the
    pessimistic bound takes over:
        V_clipped_t = old_V_t + clamp(V_t - old_V_t, -clip, clip)
        loss_t      = 0.5 * max((V_t - R_t)^2, (V_clipped_t - R_t)^2)
    ``clip=None`` gives the plain 0.5 * squared error.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), values.new_zeros(())
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman's estimators).

    With log r = ref_logprobs - logprobs (the log of pi_ref / pi at the sampled token):
        k1 = -log r                   unbiased, can be negative per token (the classic RLHF penalty)
        k2 = 0.5 * (log r)^2          biased, low variance, always >= 0
        k3 = (r - 1) - log r          unbiased and always >= 0 (GRPO's KL term)
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.pow(2)
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at every position: (..., V) -> (...), in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def grpo_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (GRPO): each sample's score against the other samples of the same prompt.

    ``scores`` (N,) holds ``group_size`` consecutive samples per prompt. Per group g:
        A_i = (s_i - mean_g) / (std_g + eps)     (std with Bessel's correction, as torch.std)
    or only ``s_i - mean_g`` when ``scale`` is False (Dr. GRPO: dividing by the std up-weights groups whose
    answers barely differ). A group with identical scores gets A = 0: nothing to learn from it.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 samples per prompt, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores are not a whole number of groups of {group_size}")
    groups = scores.view(-1, group_size).float()  # (prompts, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 is a perfect critic, 0 no better than
    predicting the mean, negative worse than that."""
    var_ret = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_ret.clamp(min=1e-8)


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller steering the KL coefficient towards ``target`` KL.

    After each rollout with mean sequence KL ``kl`` over ``n`` samples:
        error = clip(kl / target - 1, -0.2, 0.2)
        coef  = coef * (1 + error * n / horizon)
    so the coefficient grows while the policy drifts too far and shrinks while it stays too close; ``horizon``
    (in samples) sets how fast. ``target=None`` keeps the coefficient fixed.
    """

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        if init_coef < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {init_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"target KL must be positive (or None for a fixed coefficient), got {target}")
        if horizon <= 0:
            raise ValueError(f"the KL controller horizon must be positive, got {horizon}")
        self.value, self.target, self.horizon = float(init_coef), target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value
