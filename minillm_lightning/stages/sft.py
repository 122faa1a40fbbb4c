"""SFTModule: supervised fine-tuning of a pretrained MiniGPT on conversations, loss on assistant tokens only."""

from __future__ import annotations

from typing import Any

from minillm_lightning.stages.pretrain import PretrainModule


class SFTModule(PretrainModule):
    """Supervised fine-tuning stage. Batches carry ``labels`` that are ``IGNORE_INDEX`` everywhere except on
    assistant tokens, so the loss and perplexity are those of the replies; packed batches also carry
    ``segment_ids``/``position_ids`` and attention stays within each conversation. ``minillm test`` reports
    ``test/loss`` and ``test/ppl`` of the replies of ``data.test_sources`` (PretrainModule's test step,
    token-weighted as validation; no ``test/bpb``, which needs the data module's ``test_bytes_per_token``).

    ``init_from`` is the pretrained checkpoint to fine-tune (weights only; optimizer and counters start fresh);
    to continue the SAME SFT run use ``--ckpt_path`` instead. The other arguments are those of every stage
    (:class:`~minillm_lightning.stages.base.StageModule`); only these defaults differ:

    Args:
        learning_rate: peak AdamW learning rate; ~10x below pretraining so fine-tuning adjusts the pretrained
            weights instead of overwriting them.
        weight_decay: AdamW weight decay on matrices; 0 by default: a short run from a good initialisation
            has little to regularise and decay only pulls weights away from the pretrained solution.
        warmup: warmup length (a share of the total steps when < 1, else optimizer steps); short, since
            the weights are already trained and only the fresh AdamW moments need a few steps to settle.
    """

    stage_name = "sft"
    prerequisite = "minillm fit --config configs/pretrain_tiny.yaml"
    starts_from = "a pretrained checkpoint (or the pretrain config of your model size)"

    def __init__(
        self, *, learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup: float = 0.03, **kwargs: Any
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup=warmup, **kwargs)
