"""CompletionWriter: `minillm predict` writes one JSON line per prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from minillm_lightning.errors import ConfigError
from minillm_lightning.fileio import check_writable_dir
from minillm_lightning.generation import GenerationConfig


class CompletionWriter(BasePredictionWriter):
    """Write ``{"index", "prompt", "completion"}`` lines to ``output`` as prediction batches finish.

    It also sets the decoding settings the stage's ``predict_step`` uses. Under DDP every rank writes
    ``<output stem>.rank<N>.jsonl``.

    Args:
        output: the JSONL file to write (replaced if it exists).
        max_new_tokens: tokens generated per prompt at most.
        temperature: 0 means greedy decoding.
        top_k: sample among the k most likely tokens (0: off).
        top_p: nucleus sampling threshold (1.0: off).
        repetition_penalty: >1 discourages repeating tokens.
        seed: seed of the sampler.
    """

    def __init__(
        self,
        output: str = "completions.jsonl",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if self.output.is_dir():
            raise ConfigError(f"CompletionWriter.output {output} is a directory; give the JSONL file to write in it")
        check_writable_dir(self.output.parent, "CompletionWriter.output")  # before the model is loaded and run
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        self.written = 0

    def _path(self, trainer: L.Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}{self.output.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.generation_config = self.config
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction: list[dict[str, Any]], batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        with open(self._path(trainer), "a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.written += len(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"wrote {self.written} completions to {self._path(trainer)}")
