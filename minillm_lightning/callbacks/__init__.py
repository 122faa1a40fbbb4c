"""Lightning callbacks shipped with minillm-lightning."""

from minillm_lightning.callbacks.completion_writer import CompletionWriter
from minillm_lightning.callbacks.gradient_health import GradientHealthMonitor
from minillm_lightning.callbacks.interrupt import InterruptCheckpoint
from minillm_lightning.callbacks.line_progress import LineProgress
from minillm_lightning.callbacks.memory_guard import MemoryGuard
from minillm_lightning.callbacks.regression_suite import RegressionSuite
from minillm_lightning.callbacks.system_stats import SystemMonitor
from minillm_lightning.callbacks.throughput import Throughput, flops_per_token
from minillm_lightning.callbacks.training_summary import TrainingSummary

__all__ = [
    "CompletionWriter",
    "GradientHealthMonitor",
    "InterruptCheckpoint",
    "LineProgress",
    "MemoryGuard",
    "RegressionSuite",
    "SystemMonitor",
    "Throughput",
    "TrainingSummary",
    "flops_per_token",
]
