"""PPOModule: RLHF on an SFT policy with PPO (clipped policy and value losses, GAE, per-token KL penalty against the
frozen reference policy) or GRPO (group-normalised rewards, no critic), on one rollout machinery.

One training step (one batch of prompts) is one iteration of the RL loop:

1. rollout: sample responses with the KV cache (temperature / top-k / top-p), stopping at ``<|im_end|>`` or
   ``max_new_tokens``; ``group_size`` samples per prompt;
2. scoring: a frozen reward model (``reward_model``: a reward-stage checkpoint) or a Python reward function
   (``reward_fn``: a class path, see :mod:`minillm_lightning.rewards`); responses that never end lose
   ``missing_eos_penalty``;
3. a no-grad forward of the policy (log-probs, values, entropy) and of the frozen reference policy (log-probs);
4. advantages: PPO puts ``-kl_coef * KL`` on every token and the score on the last one, then GAE over the
   critic's values; GRPO normalises each score within its prompt's group and keeps KL as a loss term;
5. ``ppo_epochs`` passes over ``num_mini_batches`` shuffled mini-batches, one optimizer step each.

Manual optimization: ``trainer.global_step`` counts optimizer updates, i.e. ``ppo_epochs * num_mini_batches``
per rollout; ``log_every_n_steps`` and ``val_check_interval`` count rollouts.

The critic is a value head (``nn.Linear(dim, 1)``, zero-initialised) on the policy's final hidden states: one
backbone, one forward for log-probs and values, the cheapest design at these sizes. The price is that the
value loss also moves the shared backbone, which ``vf_coef`` keeps small. GRPO has no critic.

Frozen models (reference policy, reward model) take no optimizer state and are left out of checkpoints: they
are rebuilt from ``init_from`` / ``reward_model`` when a run is resumed with ``--ckpt_path``, so those files
must still exist then.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.losses import (
    AdaptiveKLController,
    KLEstimator,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from minillm_lightning.model import MiniGPTConfig, padded_causal_mask
from minillm_lightning.rewards import RewardFunction, load_reward_function
from minillm_lightning.stages.base import StageModule, warmup_cosine

SFT_COMMAND = "minillm fit --config configs/sft_tiny.yaml"
REWARD_COMMAND = "minillm fit --config configs/reward_tiny.yaml"
# frozen submodules: no gradients, not in the optimizer, not in checkpoints (rebuilt from their files on resume)
FROZEN_PREFIXES = ("ref_policy.", "reward_net.")


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


def _disable_dropout(model: nn.Module) -> None:
    """RL needs pi_old == pi at the first update (ratio 1); dropout noise would break that, and the reference
    policy must be deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0


class PPOModule(StageModule):
    """RLHF stage: PPO or GRPO on an SFT policy against a reward model or a reward function.

    Args:
        arch: ignored (the architecture comes from ``init_from``); kept for the shared CLI layout.
        vocab_size: tokenizer vocabulary size; linked from the data module, do not set by hand.
        init_from: the SFT checkpoint: the policy starts from it and the frozen reference policy is a copy of it.
        reward_model: a reward-stage checkpoint scoring (prompt, response) pairs; frozen.
        reward_fn: a Python reward instead of a model: ``"package.module.Class"`` or
            ``{class_path: ..., init_args: {...}}`` (see :mod:`minillm_lightning.rewards`). Exactly one of
            ``reward_model`` and ``reward_fn`` must be set.
        advantage: ``ppo`` (critic + GAE + per-token KL penalty in the reward) or ``grpo`` (group-normalised
            scores, no critic, KL as a loss term).
        group_size: responses sampled per prompt (GRPO compares them; needs >= 2).
        max_new_tokens: most tokens per response (the stop token included).
        temperature: sampling temperature of the rollouts (log-probs are those of logits / temperature).
        top_k: rollout top-k (0: off). Filtering makes the sampler differ from the policy PPO optimises; keep off
            unless the policy produces garbage from the tail.
        top_p: rollout nucleus sampling (1: off); same caveat.
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass; each takes ``batch_size * group_size / num_mini_batches`` samples.
        clip_range: PPO ratio clip epsilon.
        clip_range_value: value clip (None: unclipped value loss).
        vf_coef: weight of the value loss (it also trains the shared backbone, so keep it small).
        ent_coef: entropy bonus weight (> 0 fights entropy collapse).
        gamma: discount over response tokens.
        lam: GAE lambda.
        whiten_advantages: normalise PPO advantages over each rollout.
        grpo_scale: GRPO: divide by the group's std (False: Dr. GRPO, only subtract the mean).
        kl_coef: KL coefficient (initial value when ``kl_target`` is set).
        kl_target: adaptive KL (Ziegler et al.): steer the coefficient so the mean sequence KL approaches this
            value. None keeps ``kl_coef`` fixed.
        kl_horizon: adaptive KL horizon in samples (larger: slower adaptation).
        kl_estimator: per-token KL estimator (k1, k2, k3); default k1 for PPO (in the reward), k3 for GRPO (in
            the loss).
        missing_eos_penalty: subtracted from the score of a response that hits ``max_new_tokens`` without
            ending (0: off).
        max_grad_norm: gradient clipping inside each optimizer step (``trainer.gradient_clip_val`` is refused
            with manual optimization). None: off.
        eval_temperature: temperature of validation and test generation (0: greedy, a deterministic
            ``val/reward_mean``; sampled replies use a seed fixed per batch). Both log ``kl`` (:meth:`sequence_kl`).
        eval_reward_fn: an independent Python reward (same forms as ``reward_fn``) that validation also logs, as
            ``val/eval_reward_mean``. The policy never trains on it, so it shows reward hacking: the trained
            reward rising while this one falls.
        seed: seed of the rollout sampling and mini-batch order; None takes ``seed_everything``'s.
        learning_rate: peak AdamW learning rate; RL fine-tuning wants small steps.
        weight_decay: AdamW weight decay on matrices.
        betas: AdamW betas.
        warmup: warmup (share of total optimizer steps when < 1, else steps). Not 0: Adam's first steps move every
            weight by about the full learning rate whatever its gradient, enough to undo a small policy.
        min_lr_ratio: the cosine schedule ends at ``learning_rate * min_lr_ratio`` (1: constant).
        compile: run the policy's training forward through ``torch.compile``.
    """

    stage_name = "ppo"
    prerequisite = SFT_COMMAND

    def __init__(
        self,
        arch: MiniGPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        reward_model: str | None = None,
        reward_fn: dict[str, Any] | str | None = None,
        advantage: Literal["ppo", "grpo"] = "ppo",
        group_size: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        ppo_epochs: int = 2,
        num_mini_batches: int = 2,
        clip_range: float = 0.2,
        clip_range_value: float | None = 0.2,
        vf_coef: float = 0.1,
        ent_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        grpo_scale: bool = True,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        kl_estimator: KLEstimator | None = None,
        missing_eos_penalty: float = 1.0,
        max_grad_norm: float | None = 1.0,
        eval_temperature: float = 0.0,
        eval_reward_fn: dict[str, Any] | str | None = None,
        seed: int | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.05,
        min_lr_ratio: float = 1.0,
        compile: bool = False,
    ) -> None:
        if not init_from:
            raise CheckpointError(
                f"PPO needs model.init_args.init_from: the SFT checkpoint that becomes the policy and the frozen "
                f"reference (run `{SFT_COMMAND}` first)"
            )
        if not Path(init_from).is_file():
            raise CheckpointError(
                f"model.init_from={init_from} does not exist. PPO improves an SFT policy: run `{SFT_COMMAND}` "
                f"first, or point model.init_args.init_from and data.init_args.tokenizer at an existing checkpoint"
            )
        if (reward_model is None) == (reward_fn is None):
            raise MiniLLMError(
                "set exactly one of model.init_args.reward_model (a reward-stage checkpoint) and "
                "model.init_args.reward_fn (a Python reward, e.g. minillm_lightning.rewards.ArithmeticReward)"
                + ("; both are set" if reward_model is not None else "")
            )
        if advantage not in ("ppo", "grpo"):
            raise MiniLLMError(f"advantage must be 'ppo' or 'grpo', got {advantage!r}")
        checks = [
            (group_size >= (2 if advantage == "grpo" else 1), "group_size must be >= 2 for GRPO (>= 1 for PPO)"),
            (ppo_epochs >= 1 and num_mini_batches >= 1, "ppo_epochs and num_mini_batches must be >= 1"),
            (0 < clip_range < 1, "clip_range must be in (0, 1)"),
            (clip_range_value is None or clip_range_value > 0, "clip_range_value must be positive or null"),
            (vf_coef >= 0 and ent_coef >= 0 and kl_coef >= 0, "vf_coef, ent_coef and kl_coef must be >= 0"),
            (0 < gamma <= 1 and 0 <= lam <= 1, "gamma must be in (0, 1] and lam in [0, 1]"),
            (missing_eos_penalty >= 0, "missing_eos_penalty must be >= 0"),
            (max_grad_norm is None or max_grad_norm > 0, "max_grad_norm must be positive or null"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MiniLLMError(f"PPOModule: {msg}")
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        super().__init__(arch, vocab_size, init_from, learning_rate, weight_decay, betas, warmup, min_lr_ratio, compile)
        self.automatic_optimization = False
        # two Lightning warnings that are expected here: the frozen models are in eval mode on purpose, and a
        # checkpoint taken after a whole rollout's updates is exactly the state to resume from
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        _disable_dropout(self.model)
        # the reference policy: the SFT weights, frozen (a copy of the freshly loaded policy, no second read)
        self.ref_policy = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.value_head = nn.Linear(self.arch.dim, 1) if advantage == "ppo" else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no random critic noise in the first GAE
            nn.init.zeros_(self.value_head.bias)
        self.reward_net: nn.Module | None = None
        self.reward_tokenizer = None
        self.reward_function: RewardFunction | None = None
        if reward_model is not None:
            self.reward_net, self.reward_tokenizer = _load_reward_model(reward_model)
            self.reward_net.requires_grad_(False).eval()
        else:
            self.reward_function = load_reward_function(reward_fn)
        self.eval_reward_function = load_reward_function(eval_reward_fn) if eval_reward_fn is not None else None
        self.kl_estimator: KLEstimator = kl_estimator or ("k1" if advantage == "ppo" else "k3")
        self.kl_ctl = AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.rollouts_done = 0
        self._grad_norms: list[Tensor] = []

    # ---- setup and checks ----
    @property
    def updates_per_rollout(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_mini_batches

    def configure_callbacks(self) -> list:
        # the earliest hook that sees the trainer: refuse what manual optimization cannot do, with the fix
        t = self.trainer
        if t.gradient_clip_val:
            raise MiniLLMError(
                f"trainer.gradient_clip_val={t.gradient_clip_val} is not supported: PPO optimises manually and "
                f"clips inside each optimizer step; remove it and set model.init_args.max_grad_norm instead"
            )
        if t.accumulate_grad_batches != 1:
            raise MiniLLMError(
                f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} is not supported: PPO optimises "
                f"manually; lower data.batch_size or raise model.init_args.num_mini_batches to save memory"
            )
        return []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        prompt_len = getattr(dm, "max_length", None)
        block = self.arch.block_size
        if prompt_len is not None and prompt_len + self.hparams.max_new_tokens > block:
            raise MiniLLMError(
                f"prompts of up to data.max_length={prompt_len} tokens + model.max_new_tokens="
                f"{self.hparams.max_new_tokens} exceed the model context block_size={block}; lower one of them"
            )
        if self.tokenizer is None:
            raise CheckpointError(f"init_from={self.init_from} carries no tokenizer")
        batch_size = getattr(dm, "batch_size", None)
        if batch_size is not None and self.hparams.num_mini_batches > batch_size * self.hparams.group_size:
            raise MiniLLMError(
                f"num_mini_batches={self.hparams.num_mini_batches} exceeds the {batch_size * self.hparams.group_size} "
                f"samples of a rollout (data.batch_size x group_size); lower it or raise data.batch_size"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        max_steps, u = self.trainer.max_steps, self.updates_per_rollout
        if max_steps and max_steps > 0 and max_steps % u:
            self.warn_once(
                f"trainer.max_steps={max_steps} counts optimizer updates, {u} per rollout (ppo_epochs x "
                f"num_mini_batches); the run stops after the rollout that crosses it, at step "
                f"{math.ceil(max_steps / u) * u}"
            )

    def train(self, mode: bool = True) -> PPOModule:
        """Lightning switches the whole module to train mode after validation; frozen models stay in eval."""
        super().train(mode)
        for frozen in (getattr(self, "ref_policy", None), getattr(self, "reward_net", None)):
            if frozen is not None:
                frozen.eval()
        return self

    # ---- checkpoints: frozen models out, controller state in ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint["ppo"] = {"kl_coef": self.kl_ctl.value, "rollouts": self.rollouts_done}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # the frozen weights were rebuilt in __init__ from init_from / reward_model; hand them to the strict load
        own = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}
        if "ppo" in checkpoint:
            self.kl_ctl.value = float(checkpoint["ppo"]["kl_coef"])
            self.rollouts_done = int(checkpoint["ppo"]["rollouts"])

    # ---- optimisation ----
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = super().configure_optimizers()
        if self.trainer.max_steps is None or self.trainer.max_steps < 0:
            # the base estimate counts batches (rollouts); the schedule is stepped per optimizer update
            hp, opt = self.hparams, cfg["optimizer"]
            total = int(self.trainer.estimated_stepping_batches) * self.updates_per_rollout
            warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
            warmup = max(1, warmup) if hp.warmup > 0 else 0
            cfg["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
            )
        return cfg

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm and clip, inside the optimizer step: after AMP unscaling, on true gradients."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # nothing to unscale (32-true, bf16): clip directly. Lightning's AMP plugin refuses to clip for an
            # optimizer that unscales internally (the fused AdamW the base class picks on CUDA) even under bf16,
            # where no scaler exists
            max_norm = self.hparams.max_grad_norm or float("inf")
            self._grad_norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm).detach().float())
            return
        self._grad_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        ro = self.make_rollout(batch, rollout_seed(self.seed, self.rollouts_done, self.global_rank))
        N = ro.ids.shape[0]
        if hp.num_mini_batches > N:
            raise MiniLLMError(f"num_mini_batches={hp.num_mini_batches} exceeds the {N} samples of a rollout")
        t0 = time.perf_counter()
        opt, sched = self.optimizers(), self.lr_schedulers()
        order_rng = torch.Generator().manual_seed(rollout_seed(self.seed, self.rollouts_done, self.global_rank) + 1)
        acc: dict[str, list[Tensor]] = defaultdict(list)
        self._grad_norms = []
        response = ro.ids[:, ro.prompt_len :]
        for _ in range(hp.ppo_epochs):
            # exactly num_mini_batches near-equal mini-batches: updates_per_rollout optimizer steps per rollout
            for idx in torch.randperm(N, generator=order_rng).tensor_split(hp.num_mini_batches):
                idx = idx.to(self.device)
                mask = ro.mask[idx]
                logprobs, logits, hidden, aux = self._response_forward(
                    self._forward, ro.ids[idx], ro.keep[idx], ro.positions[idx], ro.prompt_len, response[idx]
                )
                pg_loss, clipfrac, approx_kl = policy_loss(
                    logprobs, ro.logprobs[idx], ro.advantages[idx], mask, hp.clip_range
                )
                loss = pg_loss + aux
                if hp.advantage == "ppo":
                    vf_loss, vf_clipfrac = value_loss(
                        self._values(hidden), ro.values[idx], ro.returns[idx], mask, hp.clip_range_value
                    )
                    loss = loss + hp.vf_coef * vf_loss
                    acc["loss/value"].append(vf_loss.detach())
                    acc["value/clipfrac"].append(vf_clipfrac)
                elif self.kl_ctl.value > 0:  # GRPO: KL to the reference as a loss term (k3 by default)
                    kl_loss = masked_mean(kl_penalty(logprobs, ro.ref_logprobs[idx], self.kl_estimator), mask)
                    loss = loss + self.kl_ctl.value * kl_loss
                    acc["loss/kl"].append(kl_loss.detach())
                if hp.ent_coef > 0:
                    ent = masked_mean(entropy_from_logits(logits), mask)
                    loss = loss - hp.ent_coef * ent
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                if sched is not None:  # None when configure_optimizers is overridden without a schedule
                    sched.step()
                acc["loss/policy"].append(pg_loss.detach())
                acc["loss/total"].append(loss.detach())
                acc["policy/clipfrac"].append(clipfrac)
                acc["policy/approxkl"].append(approx_kl)
        metrics = dict(ro.stats)
        metrics |= {k: torch.stack(v).mean() for k, v in acc.items()}
        if self._grad_norms:
            metrics["train/grad_norm"] = torch.stack(self._grad_norms).mean()
        metrics["time/update_s"] = torch.tensor(time.perf_counter() - t0, device=self.device)
        metrics["lr"] = torch.tensor(opt.param_groups[0]["lr"], device=self.device)
        # one collective for all metrics (ranks hold equal-sized rollouts, so the mean of means is the mean)
        names = sorted(metrics)
        reduced = self.trainer.strategy.reduce(torch.stack([metrics[k].float() for k in names]), reduce_op="mean")
        metrics = dict(zip(names, reduced))
        self.kl_ctl.update(float(metrics["objective/kl"]), N * self.trainer.world_size)
        self.rollouts_done += 1
        for k in ("env/reward_mean", "objective/kl"):
            self.log(k, metrics.pop(k), prog_bar=True, batch_size=N)
        self.log_dict(metrics, batch_size=N)

    # ---- validation and test: greedy (by default) answers to held-out prompts, scored like the rollouts ----
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, split: Literal["val", "test"]) -> None:
        """Answer a batch of held-out prompts with ``eval_temperature`` (0: greedy; else sampled with a seed fixed
        by the batch index) and log the epoch means ``<split>/reward_mean``, ``/kl`` (see :meth:`sequence_kl`),
        ``/response_length``, ``/ended_share`` and, with ``eval_reward_fn``, ``/eval_reward_mean``."""
        hp = self.hparams
        responses = self._generate(batch["prompt_ids"], hp.eval_temperature, self.seed + batch_idx)
        texts, ended = self._decode(responses)
        raw = self.score_responses(batch["messages"], batch["prompt"], texts)
        n = len(responses)
        lengths = torch.tensor([float(len(r)) for r in responses], device=self.device)
        self.log(f"{split}/reward_mean", raw.mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{split}/kl", self.sequence_kl(batch["prompt_ids"], responses).mean(), sync_dist=True, batch_size=n)
        self.log(f"{split}/response_length", lengths.mean(), sync_dist=True, batch_size=n)
        self.log(f"{split}/ended_share", ended.float().mean(), sync_dist=True, batch_size=n)
        if self.eval_reward_function is not None:
            check = torch.tensor(self.eval_reward_function(list(batch["prompt"]), texts), dtype=torch.float32)
            self.log(f"{split}/eval_reward_mean", check.mean().to(self.device), sync_dist=True, batch_size=n)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def generate_text(self, prompts: list[str], temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Answers of the current policy to plain user prompts (for notebooks and tests)."""
        ids = [
            self.tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts
        ]
        return self._decode(self._generate(ids, temperature, seed))[0]


def _load_reward_model(path: str) -> tuple[nn.Module, Any]:
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
