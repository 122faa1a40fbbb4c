"""minillm-lightning: train a small Llama-style language model through every stage of an LLM pipeline.

Every public name below is importable from ``minillm_lightning`` and loaded on first use (PEP 562), so that
``minillm generate``, ``minillm eval`` and ``minillm --help`` start without importing Lightning: the package
itself imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "CompletionWriter": "minillm_lightning.callbacks",
    "GradientHealthMonitor": "minillm_lightning.callbacks",
    "InterruptCheckpoint": "minillm_lightning.callbacks",
    "LineProgress": "minillm_lightning.callbacks",
    "MemoryGuard": "minillm_lightning.callbacks",
    "RegressionSuite": "minillm_lightning.callbacks",
    "SystemMonitor": "minillm_lightning.callbacks",
    "Throughput": "minillm_lightning.callbacks",
    "TrainingSummary": "minillm_lightning.callbacks",
    "PreferenceDataModule": "minillm_lightning.data.preference",
    "PretrainDataModule": "minillm_lightning.data.pretrain",
    "PretrainSource": "minillm_lightning.data.pretrain",
    "PromptDataModule": "minillm_lightning.data.prompts",
    "SFTDataModule": "minillm_lightning.data.sft",
    "SFTFields": "minillm_lightning.data.sft",
    "TASKS": "minillm_lightning.eval",
    "LogLikelihoodScorer": "minillm_lightning.eval",
    "ContextLengthError": "minillm_lightning.generation",
    "GenerationConfig": "minillm_lightning.generation",
    "GenerationOutput": "minillm_lightning.generation",
    "TextGenerator": "minillm_lightning.generation",
    "export_hf": "minillm_lightning.hf_export",
    "MiniGPT": "minillm_lightning.model",
    "MiniGPTConfig": "minillm_lightning.model",
    "ArithmeticReward": "minillm_lightning.rewards",
    "ContainsReward": "minillm_lightning.rewards",
    "RewardFunction": "minillm_lightning.rewards",
    "DPOModule": "minillm_lightning.stages.dpo",
    "PPOModule": "minillm_lightning.stages.ppo",
    "PretrainModule": "minillm_lightning.stages.pretrain",
    "RewardModel": "minillm_lightning.stages.reward",
    "RewardModule": "minillm_lightning.stages.reward",
    "load_reward_model": "minillm_lightning.stages.reward",
    "SFTModule": "minillm_lightning.stages.sft",
    "Tokenizer": "minillm_lightning.tokenizer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minillm_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
