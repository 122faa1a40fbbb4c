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

Steps 1-4 live in :mod:`minillm_lightning.stages.rollout`; this module holds the stage: settings, checks, the
update loop, validation and checkpoints.

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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.generation import GenerationConfig
from minillm_lightning.losses import (
    AdaptiveKLController,
    KLEstimator,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    policy_loss,
    value_loss,
)
from minillm_lightning.optim import grad_norms
from minillm_lightning.rewards import RewardFunction, describe_reward_function, load_reward_function
from minillm_lightning.stages.base import StageModule, expect_frozen_models, weights_digest
from minillm_lightning.stages.pairwise import SFT_COMMAND
from minillm_lightning.stages.rollout import (
    RolloutMixin,
    disable_dropout,
    distinct_n,
    load_frozen_reward_model,
    render_for_scoring,
    repeated_ngram_rate,
    rollout_seed,
)

__all__ = ["PPOModule", "distinct_n", "render_for_scoring", "repeated_ngram_rate"]

# frozen submodules: no gradients, not in the optimizer, not in checkpoints (rebuilt from their files on resume)
FROZEN_PREFIXES = ("ref_policy.", "reward_net.")


class PPOModule(RolloutMixin, StageModule):
    """RLHF stage: PPO or GRPO on an SFT policy against a reward model or a reward function.

    Args:
        reward_model: a reward-stage checkpoint scoring (prompt, response) pairs; frozen.
        reward_fn: a Python reward instead of a model: ``"package.module.Class"`` or
            ``{class_path: ..., init_args: {...}}`` (see :mod:`minillm_lightning.rewards`); from Python also the
            reward itself, an instance such as ``ArithmeticReward()`` or any callable
            ``fn(prompts, responses) -> list[float]`` (the checkpoint's hyper-parameters then record only its class
            path). Exactly one of ``reward_model`` and ``reward_fn`` must be set.
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
        max_grad_norm: gradient clipping inside each optimizer step, with Lightning's ``clip_gradients``
            (``trainer.gradient_clip_val`` is refused with manual optimization). None: off.
        eval_temperature: temperature of validation and test generation (0: greedy, a deterministic
            ``val/reward_mean``; sampled replies use a seed fixed per batch). Both log ``kl`` (:meth:`sequence_kl`).
        eval_reward_fn: an independent Python reward (same forms as ``reward_fn``) that validation also logs, as
            ``val/eval_reward_mean``. The policy never trains on it, so it shows reward hacking: the trained
            reward rising while this one falls.
        seed: seed of the rollout sampling and mini-batch order; None takes ``seed_everything``'s.
        learning_rate: peak AdamW learning rate; RL fine-tuning wants small steps.
        weight_decay: AdamW weight decay on matrices.
        warmup: warmup (share of total optimizer steps when < 1, else steps). Not 0: Adam's first steps move every
            weight by about the full learning rate whatever its gradient, enough to undo a small policy.
        min_lr_ratio: the cosine schedule ends at ``learning_rate * min_lr_ratio`` (1: constant).

    ``init_from`` (required) is the SFT checkpoint: the policy starts from it and the frozen reference policy is
    a copy of it. The other arguments every stage shares (``arch`` is ignored: the architecture comes from
    ``init_from``) are listed by :class:`~minillm_lightning.stages.base.StageModule`.
    """

    stage_name = "ppo"
    prerequisite = SFT_COMMAND
    starts_from = "the SFT checkpoint that becomes the policy and the frozen reference"
    requires_init_from = True
    data_modules = ("PromptDataModule",)

    def __init__(
        self,
        *,
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
        warmup: float = 0.05,
        min_lr_ratio: float = 1.0,
        **kwargs: Any,
    ) -> None:
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
            (eval_temperature >= 0, "eval_temperature must be >= 0 (0 = greedy)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MiniLLMError(f"PPOModule: {msg}")
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        optim = dict(learning_rate=learning_rate, weight_decay=weight_decay, warmup=warmup, min_lr_ratio=min_lr_ratio)
        super().__init__(**optim, **kwargs)
        # a reward function given as a Python object is recorded by its class path: checkpoints hold plain data
        self.hparams["reward_fn"] = describe_reward_function(reward_fn)
        self.hparams["eval_reward_fn"] = describe_reward_function(eval_reward_fn)
        self.automatic_optimization = False
        # two Lightning warnings that are expected here: the frozen models are in eval mode on purpose, and a
        # checkpoint taken after a whole rollout's updates is exactly the state to resume from
        expect_frozen_models()
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        disable_dropout(self.model)
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
            self.reward_net, self.reward_tokenizer = load_frozen_reward_model(reward_model)
            self.reward_net.requires_grad_(False).eval()
        else:
            self.reward_function = load_reward_function(reward_fn)
        self.eval_reward_function = load_reward_function(eval_reward_fn) if eval_reward_fn is not None else None
        self.frozen_digests = {"reference policy (model.init_from)": weights_digest(self.ref_policy)}
        if self.reward_net is not None:
            self.frozen_digests["reward model (model.reward_model)"] = weights_digest(self.reward_net)
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
        # any value, 0 included, and any algorithm: Lightning refuses clip_gradients() next to a Trainer setting
        if t.gradient_clip_val is not None or t.gradient_clip_algorithm is not None:
            algorithm = getattr(t.gradient_clip_algorithm, "value", t.gradient_clip_algorithm)  # the enum's "value"
            raise MiniLLMError(
                f"trainer.gradient_clip_val={t.gradient_clip_val}, gradient_clip_algorithm="
                f"{algorithm}: not supported: PPO optimises manually and clips inside each optimizer "
                f"step (by norm); remove them and set model.init_args.max_grad_norm instead"
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
        theirs = "ppo" if any(k.startswith("value_head.") for k in checkpoint.get("state_dict", {})) else "grpo"
        ours = "ppo" if self.value_head is not None else "grpo"
        if theirs != ours:  # the critic's weights are there and not wanted, or wanted and not there
            source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise CheckpointError(
                f"{source} was trained with advantage={theirs} ({'a critic' if theirs == 'ppo' else 'no critic'}) "
                f"but this run has advantage={ours}; set --model.init_args.advantage {theirs} to resume or test it"
            )
        # the frozen weights were rebuilt in __init__ from init_from / reward_model; hand them to the strict load
        own = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}
        if "ppo" in checkpoint:
            self.kl_ctl.value = float(checkpoint["ppo"]["kl_coef"])
            self.rollouts_done = int(checkpoint["ppo"]["rollouts"])

    # ---- optimisation ----
    def schedule_steps(self) -> int:
        """The schedule is stepped per optimizer update; without ``max_steps`` the base estimate counts rollouts."""
        max_steps = self.trainer.max_steps
        per_batch = 1 if max_steps is not None and max_steps >= 0 else self.updates_per_rollout
        return super().schedule_steps() * per_batch

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the gradient norm and clip, inside the optimizer step: after AMP unscaling, on true gradients.
        (Under a mixed precision the base class then picks a non-fused AdamW, which Lightning can clip.)"""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        self._grad_norms.append(grad_norms(params)[1])
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

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
