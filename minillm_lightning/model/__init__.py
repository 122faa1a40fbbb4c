"""The MiniGPT backbone (plain PyTorch, no Lightning)."""

from minillm_lightning.model.config import PRESETS, MiniGPTConfig
from minillm_lightning.model.gpt import GPTOutput, KVCache, MiniGPT, padded_causal_mask, segment_causal_mask

__all__ = [
    "PRESETS",
    "GPTOutput",
    "KVCache",
    "MiniGPT",
    "MiniGPTConfig",
    "padded_causal_mask",
    "segment_causal_mask",
]
