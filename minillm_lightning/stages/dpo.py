"""Direct Preference Optimization: fine-tune a policy on preference pairs against a frozen reference copy.

The policy (``self.model``) and the reference (``self.ref_model``) both start from ``init_from`` (normally
the SFT checkpoint). The reference is frozen (``requires_grad=False``, always in eval mode, outside the
optimizer) and is NOT written to checkpoints: it is exactly the ``init_from`` weights, so a resumed run
(``--ckpt_path``, which re-creates the module with the same ``init_from``) rebuilds it from that file;
``init_from`` must therefore still exist when resuming. ``load_backbone`` on a DPO checkpoint returns the
trained policy.

With ``precompute_ref_logps`` the reference log-probabilities of every train and validation pair are
computed once at the start of fit (sharded over the ranks, then summed), cached in a tensor indexed by the
pair's ``index`` (which every batch carries) and saved with the checkpoint; the reference model is then
freed, saving its memory and one forward pass per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from minillm_lightning.checkpoint import load_backbone
from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.losses import IGNORE_INDEX, DPOLossType, dpo_loss, lm_loss, sequence_logprobs
from minillm_lightning.model import MiniGPT
from minillm_lightning.stages.base import expect_frozen_models, weights_digest
from minillm_lightning.stages.pairwise import RIGHT_PADDED, PairwiseModule, Split, padded_forward, pair_tensors

__all__ = ["DPOModule", "METRICS", "pair_tensors"]

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
CACHE_KEY = "dpo_reference_logps"


class DPOModule(PairwiseModule):
    """DPO stage (sigmoid DPO, conservative/label-smoothed DPO, IPO; optional NLL term on the chosen replies).

    Log-probabilities are summed over the reply tokens only (``losses.sequence_logprobs``; prompt and
    padding carry ``IGNORE_INDEX``); IPO averages them per token, as its paper and TRL do. Logged (TRL
    names, per step and as epoch means over all ranks): ``rewards/chosen``, ``rewards/rejected`` (implicit
    rewards ``beta * (log pi - log ref)``), ``rewards/margins``, ``rewards/accuracies`` (share of pairs with
    a higher chosen reward; 0 at step 0, where policy == reference), ``logps/chosen``, ``logps/rejected``,
    under ``train/`` and ``val/`` (and ``test/`` from ``minillm test`` on ``data.test_sources``); plus
    ``train/loss``, ``val/loss``, ``test/loss`` and ``train/nll_loss`` with ``rpo_alpha``.

    ``init_from`` is the checkpoint both the policy and the frozen reference start from, normally the SFT model;
    it is needed again when resuming with ``--ckpt_path`` (the reference is rebuilt from it). The arguments every
    stage shares are listed by :class:`~minillm_lightning.stages.base.StageModule` and
    :class:`~minillm_lightning.stages.pairwise.PairwiseModule`; these defaults differ here:

    Args:
        learning_rate: peak AdamW learning rate; 5e-7..1e-6 for real models (the DPO paper and TRL use 1e-6):
            the loss keeps pushing the log-ratio apart, so a large step quickly degrades the policy.
        weight_decay: AdamW weight decay on matrices.
        warmup: warmup length (a share of the total steps when < 1, else optimizer steps); 0.1 as in the
            DPO/Zephyr recipes.
        beta: strength of the implicit KL penalty to the reference (0.1: the DPO paper's default; higher
            stays closer to the reference, lower lets the policy move further).
        loss_type: ``sigmoid`` (DPO; with ``label_smoothing`` > 0 conservative DPO) or ``ipo``.
        label_smoothing: assumed share of flipped preference labels, in [0, 0.5) (conservative DPO).
        rpo_alpha: weight of an NLL (SFT) loss on the chosen replies added to the preference loss (RPO,
            Pang et al. 2024; 1.0 in the paper); keeps the chosen replies likely. 0 disables it.
        precompute_ref_logps: compute the reference log-probs once at fit start and free the reference
            model (needs a data module with ``ordered_dataloader``, such as PreferenceDataModule).
    """

    stage_name = "dpo"
    pair_stats = METRICS
    prog_bar_stat = "rewards/accuracies"

    def __init__(
        self,
        *,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup: float = 0.1,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        precompute_ref_logps: bool = False,
        **kwargs: Any,
    ) -> None:
        if beta <= 0 or rpo_alpha < 0:
            raise ValueError("DPOModule: beta must be > 0 and rpo_alpha >= 0")
        if loss_type not in ("sigmoid", "ipo") or not 0 <= label_smoothing < 0.5:
            raise ValueError(
                f"DPOModule: loss_type must be sigmoid or ipo (got {loss_type!r}), label_smoothing in [0, 0.5)"
            )
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("DPOModule: label_smoothing (conservative DPO) applies to loss_type sigmoid only")
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup=warmup, **kwargs)
        expect_frozen_models()
        # the frozen reference: the init_from weights, never trained, never checkpointed (see the module docstring)
        self.ref_model: MiniGPT | None = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.frozen_digests = {"reference (model.init_from)": weights_digest(self.ref_model)}
        self._ref_cache: dict[str, Tensor] = {}  # split -> (N, 2) reference log-probs (chosen, rejected)
        self._init_metrics(METRICS + (("nll_loss",) if rpo_alpha else ()))

    def train(self, mode: bool = True) -> DPOModule:
        """Lightning switches the whole module to train mode; the reference stays in eval (no dropout)."""
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    # ---- log-probabilities ----
    def _logps(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(2B,) log-probs of the replies: summed over reply tokens; per-token mean for IPO."""
        logps = sequence_logprobs(logits, labels)
        if self.hparams.loss_type == "ipo":
            logps = logps / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        return logps

    @torch.no_grad()
    def _reference_forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, right_padded: bool | None = None
    ) -> Tensor:
        if self.ref_model is None:
            raise RuntimeError("the reference model was freed after precomputing, but this split has no cache")
        out = padded_forward(self.ref_model, input_ids, attention_mask, True, right_padded)
        return self._logps(out.logits, labels)

    def reference_logps(self, batch: dict[str, Tensor], split: Split) -> Tensor:
        """(2B,) reference log-probs of a batch: from the precomputed cache when there is one."""
        cache = self._ref_cache.get(split)
        if cache is not None:
            rows = cache[batch["index"].to(cache.device)].to(batch["chosen_input_ids"].device)  # (B, 2)
            return torch.cat([rows[:, 0], rows[:, 1]])
        return self._reference_forward(*pair_tensors(batch), batch.get(RIGHT_PADDED))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.precompute_ref_logps:
            self._precompute_reference()

    def _precompute_reference(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "ordered_dataloader"):
            raise MiniLLMError(
                "precompute_ref_logps needs a data module with ordered_dataloader (PreferenceDataModule)"
            )
        world, rank = self.trainer.world_size, self.trainer.global_rank
        for split in ("train", "val"):
            loader = dm.ordered_dataloader(split, rank, world)
            n = len(loader.dataset)
            if split in self._ref_cache and len(self._ref_cache[split]) == n:
                self._ref_cache[split] = self._ref_cache[split].to(self.device)
                continue  # restored from the checkpoint of a resumed run
            cache = torch.zeros(n, 2, device=self.device)
            with self.trainer.precision_plugin.forward_context():
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    chosen, rejected = self._reference_forward(*pair_tensors(batch)).float().chunk(2)
                    cache[batch["index"]] = torch.stack([chosen, rejected], dim=1)
            # each rank filled its shard (rank::world) and left zeros elsewhere: the sum is the full table
            self._ref_cache[split] = self.trainer.strategy.reduce(cache, reduce_op="sum")
        rank_zero_info(
            f"DPO: reference log-probs precomputed for {len(self._ref_cache['train'])} train / "
            f"{len(self._ref_cache['val'])} val pairs; the reference model is freed"
        )
        self.ref_model = None

    # ---- steps ----
    def pair_step(self, batch: dict[str, Tensor], split: Split) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        input_ids, attention_mask, labels = pair_tensors(batch)
        out = padded_forward(self._forward, input_ids, attention_mask, True, batch.get(RIGHT_PADDED))
        policy_chosen, policy_rejected = self._logps(out.logits, labels).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch, split).chunk(2)
        hp = self.hparams
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing
        )
        loss = losses.mean()
        stats = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_chosen.detach(),
            "logps/rejected": policy_rejected.detach(),
        }
        if hp.rpo_alpha:
            B = batch["chosen_input_ids"].shape[0]
            nll, _ = lm_loss(out.logits[:B], labels[:B])  # mean NLL of the chosen replies' tokens
            loss = loss + hp.rpo_alpha * nll
            stats["nll_loss"] = nll.detach()
        return loss, out.aux_loss, stats

    def on_test_start(self) -> None:
        if self.ref_model is None:  # freed after precomputing in this process; the test split has no cache
            self.ref_model = self._load_reference().to(self.device)

    def _load_reference(self) -> MiniGPT:
        """The frozen reference rebuilt from ``init_from`` (what ``__init__`` copied before training)."""
        if not self.init_from:
            raise CheckpointError("DPO test after a precomputed reference needs model.init_from to rebuild it")
        return load_backbone(self.init_from)[0].requires_grad_(False)

    # ---- checkpoints: the reference stays out ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ref_model.")]:
            del state[key]
        if self._ref_cache:
            checkpoint[CACHE_KEY] = {k: v.cpu() for k, v in self._ref_cache.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ref_model is not None:
            # the reference was rebuilt from init_from in __init__; hand its own weights to the strict load
            state = checkpoint["state_dict"]
            for key, value in self.ref_model.state_dict().items():
                state.setdefault(f"ref_model.{key}", value)
        if self.hparams.precompute_ref_logps and CACHE_KEY in checkpoint:
            self._ref_cache = {k: v.to(self.device) for k, v in checkpoint[CACHE_KEY].items()}
