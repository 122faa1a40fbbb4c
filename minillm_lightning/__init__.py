"""minillm-lightning: train a small Llama-style language model through every stage of an LLM pipeline."""

from minillm_lightning.callbacks import (
    GradientHealthMonitor,
    InterruptCheckpoint,
    MemoryGuard,
    RegressionSuite,
    SystemMonitor,
    Throughput,
    TrainingSummary,
)
from minillm_lightning.data.preference import PreferenceDataModule
from minillm_lightning.data.pretrain import PretrainDataModule, PretrainSource
from minillm_lightning.data.prompts import PromptDataModule
from minillm_lightning.data.sft import SFTDataModule, SFTFields
from minillm_lightning.eval import TASKS, LogLikelihoodScorer
from minillm_lightning.generation import ContextLengthError, GenerationConfig, GenerationOutput, TextGenerator
from minillm_lightning.hf_export import export_hf
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.rewards import ArithmeticReward, ContainsReward, RewardFunction
from minillm_lightning.stages.dpo import DPOModule
from minillm_lightning.stages.ppo import PPOModule
from minillm_lightning.stages.pretrain import PretrainModule
from minillm_lightning.stages.reward import RewardModel, RewardModule, load_reward_model
from minillm_lightning.stages.sft import SFTModule
from minillm_lightning.tokenizer import Tokenizer

__all__ = [
    "ArithmeticReward",
    "ContainsReward",
    "PPOModule",
    "PromptDataModule",
    "RewardFunction",
    "TASKS",
    "LogLikelihoodScorer",
    "export_hf",
    "DPOModule",
    "PreferenceDataModule",
    "RewardModel",
    "RewardModule",
    "load_reward_model",
    "ContextLengthError",
    "GenerationConfig",
    "GenerationOutput",
    "TextGenerator",
    "GradientHealthMonitor",
    "InterruptCheckpoint",
    "MemoryGuard",
    "RegressionSuite",
    "SystemMonitor",
    "Throughput",
    "TrainingSummary",
    "MiniGPT",
    "MiniGPTConfig",
    "PretrainDataModule",
    "PretrainModule",
    "PretrainSource",
    "SFTDataModule",
    "SFTFields",
    "SFTModule",
    "Tokenizer",
]
__version__ = "0.1.0"
