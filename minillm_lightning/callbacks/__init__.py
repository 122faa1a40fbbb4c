"""Lightning callbacks shipped with minillm-lightning."""

from minillm_lightning.callbacks.interrupt import InterruptCheckpoint

__all__ = ["InterruptCheckpoint"]
