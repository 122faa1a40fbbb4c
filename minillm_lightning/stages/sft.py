"""SFTModule: supervised fine-tuning of a pretrained MiniGPT on conversations, loss on assistant tokens only."""

from __future__ import annotations

from pathlib import Path

from minillm_lightning.errors import CheckpointError
from minillm_lightning.model import MiniGPTConfig
from minillm_lightning.stages.pretrain import PretrainModule


class SFTModule(PretrainModule):
    """Supervised fine-tuning stage. Batches carry ``labels`` that are ``IGNORE_INDEX`` everywhere except on
    assistant tokens, so the loss and perplexity are those of the replies; packed batches also carry
    ``segment_ids``/``position_ids`` and attention stays within each conversation. ``minillm test`` reports
    ``test/loss`` and ``test/ppl`` of the replies of ``data.test_sources`` (PretrainModule's test step,
    token-weighted as validation; no ``test/bpb``, which needs the data module's ``test_bytes_per_token``).

    Args:
        arch: backbone architecture (ignored with ``init_from``: the checkpoint's architecture is used).
        vocab_size: tokenizer vocabulary size; linked from the data module, do not set by hand.
        init_from: the pretrained checkpoint to fine-tune (weights only; optimizer and counters start fresh).
            To continue the SAME SFT run use ``--ckpt_path`` instead.
        learning_rate: peak AdamW learning rate; ~10x below pretraining so fine-tuning adjusts the pretrained
            weights instead of overwriting them.
        weight_decay: AdamW weight decay on matrices; 0 by default: a short run from a good initialisation
            has little to regularise and decay only pulls weights away from the pretrained solution.
        betas: AdamW betas.
        warmup: warmup length (a share of the total steps when < 1, else optimizer steps); short, since
            the weights are already trained and only the fresh AdamW moments need a few steps to settle.
        min_lr_ratio: the cosine schedule ends at ``learning_rate * min_lr_ratio``.
        compile: run the backbone through ``torch.compile``.
    """

    stage_name = "sft"
    prerequisite = "minillm fit --config configs/pretrain_tiny.yaml"
    """The command that produces the checkpoint SFT starts from (named when ``init_from`` is missing)."""

    def __init__(
        self,
        arch: MiniGPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.03,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
    ) -> None:
        if init_from and not Path(init_from).is_file():
            raise CheckpointError(
                f"model.init_from={init_from} does not exist. SFT fine-tunes a pretrained model: run "
                f"`{self.prerequisite}` first (or the pretrain config of your model size), or point "
                f"model.init_from and data.tokenizer at an existing checkpoint"
            )
        super().__init__(
            arch=arch,
            vocab_size=vocab_size,
            init_from=init_from,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            betas=betas,
            warmup=warmup,
            min_lr_ratio=min_lr_ratio,
            compile=compile,
        )
        if not init_from:
            self.warn_once(
                f"SFT from random weights: set model.init_from to a pretrained checkpoint ({self.prerequisite})"
            )
