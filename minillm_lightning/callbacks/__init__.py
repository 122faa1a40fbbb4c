"""Lightning callbacks shipped with minillm-lightning."""

from minillm_lightning.callbacks.gradient_health import GradientHealthMonitor
from minillm_lightning.callbacks.interrupt import InterruptCheckpoint
from minillm_lightning.callbacks.memory_guard import MemoryGuard

__all__ = ["GradientHealthMonitor", "InterruptCheckpoint", "MemoryGuard"]
