"""The rollout machinery of the RL stage (:class:`~minillm_lightning.stages.ppo.PPOModule`): sample responses,
score them, evaluate policy / reference / critic on them, and turn the scores into advantages.

:class:`RolloutMixin` holds the steps that need the stage's models; the functions around it are plain helpers
(seeds, diversity metrics, rendering for a reward model, loading a frozen reward model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    whiten,
)
from minillm_lightning.model import padded_causal_mask

REWARD_COMMAND = "minillm fit --config configs/reward_tiny.yaml"


@dataclass
class Rollout:
    """One batch of sampled responses and what the update needs, all on the model's device.

    Layout of ``ids`` (N, P + R): each prompt left-padded to P tokens, then its response right-padded to R.
    Per-token tensors are (N, R) and aligned with the response tokens.
    """

    ids: Tensor  # (N, P+R) token ids
    keep: Tensor  # (N, P+R) True on real tokens
    positions: Tensor  # (N, P+R) RoPE positions counted from each row's first real token
    prompt_len: int  # P
    mask: Tensor  # (N, R) 1.0 on response tokens
    logprobs: Tensor  # (N, R) policy log-probs at rollout time
    ref_logprobs: Tensor  # (N, R) reference policy log-probs
    values: Tensor | None  # (N, R) critic values at rollout time (PPO)
    advantages: Tensor  # (N, R)
    returns: Tensor | None  # (N, R) critic targets (PPO)
    stats: dict[str, float]  # rollout metrics


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    """A seed that depends only on (run seed, rollout index, rank): a resumed run samples what the
    uninterrupted run would have, whatever else consumed the global RNG meanwhile."""
    return int(np.random.SeedSequence([seed, rollout, rank]).generate_state(1)[0])


def repeated_ngram_rate(seqs: Sequence[Sequence[int]], n: int = 3) -> float:
    """Mean over sequences of the share of n-grams that already occurred earlier in the same sequence.

    0 for varied text; it climbs towards 1 when a policy falls into loops ("the the the ...").
    """
    rates = []
    for s in seqs:
        grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def distinct_n(seqs: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the whole batch. Falls when the policy
    collapses onto the same few replies (mode collapse, reward hacking with one canned answer)."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def render_for_scoring(tokenizer: Any, conversations: list[list[dict]]) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask) of conversations ending with the reply to score, each cut after the
    reply's ``<|im_end|>`` (the template's trailing newline dropped), as preference pairs are rendered."""
    rows = []
    for conv in conversations:
        ids, mask = tokenizer.encode_chat(conv)
        rows.append(ids[: max(i for i, m in enumerate(mask) if m) + 1])
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask


def disable_dropout(model: nn.Module) -> None:
    """RL needs pi_old == pi at the first update (ratio 1); dropout noise would break that, and the reference
    policy must be deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0


class RolloutMixin:
    """Steps 1-4 of the RL loop (see :mod:`minillm_lightning.stages.ppo`) for a LightningModule that has:
    ``model`` (the policy MiniGPT) and ``_forward`` (its training forward), ``ref_policy``, ``value_head``
    (None for GRPO), ``reward_net`` + ``reward_tokenizer`` or ``reward_function``, ``tokenizer``, ``kl_ctl``,
    ``kl_estimator``, and in ``hparams`` the sampling and advantage settings of PPOModule.
    """

    # ---- forward passes ----
    def _response_forward(
        self, model: nn.Module, ro_ids: Tensor, keep: Tensor, positions: Tensor, prompt_len: int, response: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log-probs (n, R), logits (n, R, V) float32, hidden states (n, R, C), MoE aux loss) for the response
        tokens: position P-1+t predicts response token t."""
        T = ro_ids.shape[1]
        mask = padded_causal_mask(keep, T)
        out = model(ro_ids, position_ids=positions, attn_mask=mask, compute_logits=False)
        hidden = out.hidden[:, prompt_len - 1 : T - 1]  # (n, R, C)
        logits = model.lm_head(hidden).float() / (self.hparams.temperature or 1.0)  # (n, R, V)
        logprobs = torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)  # (n, R)
        return logprobs, logits, hidden, out.aux_loss

    def _values(self, hidden: Tensor) -> Tensor:
        return self.value_head(hidden).squeeze(-1).float()  # (n, R)

    # ---- scoring ----
    @torch.no_grad()
    def score_responses(self, messages: list[list[dict]], prompts: list[str], texts: list[str]) -> Tensor:
        """Raw scores (N,) of the responses, from the reward function or the reward model."""
        if self.reward_function is not None:
            scores = self.reward_function(list(prompts), list(texts))
            if len(scores) != len(texts):
                raise MiniLLMError(f"the reward function returned {len(scores)} scores for {len(texts)} responses")
            return torch.tensor([float(s) for s in scores], dtype=torch.float32, device=self.device)
        # re-rendered from text with the reward model's own tokenizer and template, as its training pairs were
        conversations = [[*m, {"role": "assistant", "content": t}] for m, t in zip(messages, texts)]
        if hasattr(self.reward_net, "encode"):  # the reward stage's RewardModel renders its own inputs
            ids, attn = self.reward_net.encode(conversations)
        else:
            ids, attn = render_for_scoring(self.reward_tokenizer, conversations)
        return self.reward_net.score(ids.to(self.device), attn.to(self.device)).float().reshape(-1)

    def _generate(self, prompt_ids: list[list[int]], temperature: float, seed: int) -> list[list[int]]:
        hp = self.hparams
        cfg = GenerationConfig(
            max_new_tokens=hp.max_new_tokens, temperature=temperature, top_k=hp.top_k, top_p=hp.top_p, seed=seed
        )
        return TextGenerator(self.model, self.tokenizer).generate(prompt_ids, cfg)

    def _decode(self, responses: list[list[int]]) -> tuple[list[str], Tensor]:
        """(texts without the stop token, ended (N,) bool)."""
        stops = {self.tokenizer.im_end_id, self.tokenizer.eos_id}
        ended = [bool(r) and r[-1] in stops for r in responses]
        texts = [self.tokenizer.decode(r[:-1] if e else r) for r, e in zip(responses, ended)]
        return texts, torch.tensor(ended, device=self.device)

    def _join(self, prompt_ids: list[list[int]], responses: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, int]:
        """(ids, keep, positions, P) of prompts left-padded to P tokens followed by right-padded responses,
        on the model's device (the :class:`Rollout` layout)."""
        N, P, R = len(responses), max(len(p) for p in prompt_ids), max(len(r) for r in responses)
        ids = torch.full((N, P + R), self.tokenizer.pad_id, dtype=torch.long)
        keep = torch.zeros(N, P + R, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            ids[i, P - len(p) : P] = torch.tensor(p)
            ids[i, P : P + len(r)] = torch.tensor(r)
            keep[i, P - len(p) : P + len(r)] = True
        ids, keep = ids.to(self.device), keep.to(self.device)
        return ids, keep, (keep.long().cumsum(-1) - 1).clamp(min=0), P

    @torch.no_grad()
    def sequence_kl(self, prompt_ids: list[list[int]], responses: list[list[int]]) -> Tensor:
        """(N,) KL(policy || reference) of each response, summed over its tokens: at every response position the
        exact KL between the two next-token distributions (at the rollout temperature, the distributions the
        training penalty compares). Exact per token, so it is meaningful for greedy replies too."""
        ids, keep, positions, P = self._join(prompt_ids, responses)
        response, mask = ids[:, P:], keep[:, P:].float()
        policy = torch.log_softmax(self._response_forward(self.model, ids, keep, positions, P, response)[1], -1)
        reference = torch.log_softmax(self._response_forward(self.ref_policy, ids, keep, positions, P, response)[1], -1)
        per_token = (policy.exp() * (policy - reference)).sum(-1)  # (N, R)
        return (per_token * mask).sum(-1)

    # ---- the RL step ----
    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any], seed: int) -> Rollout:
        """Sample, score and evaluate one batch of prompts (steps 1-4 of the module docstring)."""
        hp, K = self.hparams, self.hparams.group_size
        t0 = time.perf_counter()
        prompt_ids = [p for p in batch["prompt_ids"] for _ in range(K)]
        messages = [m for m in batch["messages"] for _ in range(K)]
        prompts = [p for p in batch["prompt"] for _ in range(K)]
        responses = self._generate(prompt_ids, hp.temperature, seed)
        t_gen = time.perf_counter() - t0
        texts, ended = self._decode(responses)
        raw = self.score_responses(messages, prompts, texts)
        scores = raw - hp.missing_eos_penalty * (~ended).float()

        ids, keep, positions, P = self._join(prompt_ids, responses)
        N, mask, response = len(responses), keep[:, P:].float(), ids[:, P:]  # mask (N, R): 1.0 on response tokens

        logprobs, logits, hidden, _ = self._response_forward(self._forward, ids, keep, positions, P, response)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        del logits
        ref_logprobs = self._response_forward(self.ref_policy, ids, keep, positions, P, response)[0]
        kl_tokens = kl_penalty(logprobs, ref_logprobs, self.kl_estimator) * mask  # (N, R) the penalised estimate
        seq_kl = ((logprobs - ref_logprobs) * mask).sum(-1)  # (N,) k1 estimate of the sequence KL, for logging
        coef = self.kl_ctl.value
        values = returns = None
        if hp.advantage == "ppo":
            values = self._values(hidden) * mask
            rewards = -coef * kl_tokens
            last = mask.sum(-1).long() - 1  # index of each response's last token
            rewards[torch.arange(N, device=self.device), last] += scores
            advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
            ev = explained_variance(values, returns, mask)
            if hp.whiten_advantages:
                advantages = whiten(advantages, mask)
        else:
            adv = grpo_advantages(scores, K, scale=hp.grpo_scale)  # (N,)
            advantages = adv[:, None] * mask
        lengths = mask.sum(-1)
        stats = {
            "env/reward_mean": raw.mean(),
            "env/reward_std": raw.std() if N > 1 else raw.new_zeros(()),
            "objective/scores": scores.mean(),
            "objective/kl": seq_kl.mean(),
            "objective/kl_coef": torch.tensor(coef),
            "objective/rlhf_reward": (scores - coef * (kl_tokens.sum(-1))).mean(),
            "objective/entropy": entropy,
            "response/length_mean": lengths.mean(),
            "response/ended_share": ended.float().mean(),
            "response/repeated_3gram_rate": torch.tensor(repeated_ngram_rate(responses, 3)),
            "response/distinct_2": torch.tensor(distinct_n(responses, 2)),
            "time/generate_s": torch.tensor(t_gen),
        }
        if hp.advantage == "ppo":
            stats["value/explained_variance"] = ev
            stats["value/mean"] = masked_mean(values, mask)
        else:
            groups = raw.view(-1, K)
            stats["grpo/zero_std_groups"] = (groups.std(-1) == 0).float().mean()
        stats = {k: v.detach().float().to(self.device) for k, v in stats.items()}
        return Rollout(ids, keep, positions, P, mask, logprobs, ref_logprobs, values, advantages, returns, stats)


def load_frozen_reward_model(path: str) -> tuple[nn.Module, Any]:
    """The frozen reward model and its tokenizer, from a reward-stage checkpoint."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"model.reward_model={path} does not exist: train it with `{REWARD_COMMAND}`, or use a Python reward "
            f"instead (--model.init_args.reward_model null --model.init_args.reward_fn "
            f"minillm_lightning.rewards.ArithmeticReward)"
        )
    try:
        from minillm_lightning.stages.reward import load_reward_model
    except ImportError as e:
        raise MiniLLMError(f"the reward stage is not available ({e}); use model.init_args.reward_fn instead") from None
    model, tokenizer = load_reward_model(path)
    if not hasattr(model, "score"):
        raise CheckpointError(f"{path}: the loaded reward model has no score(input_ids, attention_mask) method")
    return model, tokenizer
