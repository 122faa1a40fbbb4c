"""SystemMonitor: CPU and GPU utilisation and memory every N optimizer steps, from psutil and torch.cuda.

Why not Lightning's ``DeviceStatsMonitor``: on a CPU it logs only system-wide ``cpu_percent``,
``cpu_vm_percent`` and ``cpu_swap_percent`` (psutil), nothing about this process; on a GPU it logs dozens of
``torch.cuda.memory_stats`` allocator counters but no utilisation; it logs at the start and the end of every
logged batch under keys like ``DeviceStatsMonitor.on_train_batch_start/cpu_percent``, and refuses to run
without a logger. This callback logs a handful of keys at its own, sparser interval.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from minillm_lightning.callbacks.common import GIB, log_sparse


def gpu_utilization(device: torch.device) -> float | None:
    """GPU busy percentage over the last sample period (NVML through ``torch.cuda.utilization``; None without it)."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml / amdsmi missing, or the driver does not report it
        return None


class SystemMonitor(Callback):
    """Log CPU and GPU utilisation and memory every ``every_n_steps`` optimizer steps.

    Each rank reads its own process and device; the loggers write rank zero's values. Reading costs a few
    ``/proc`` reads and, on a GPU, one NVML query: no device synchronisation.

    Args:
        every_n_steps: optimizer steps between two readings.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SystemMonitor.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._proc = psutil.Process()
        self._device: torch.device | None = None
        self._last_step = -1
        self._gpu_util_ok = True
        self.last: dict[str, float] = {}
        self.peak_rss_gib = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device if pl_module.device.type == "cuda" else None
        psutil.cpu_percent(None)  # both counters report the time since their previous call: start them now
        self._proc.cpu_percent(None)
        self._last_step = trainer.global_step

    def read(self) -> dict[str, float]:
        """One reading of every metric (see docs/callbacks.md for the keys)."""
        rss = self._proc.memory_info().rss / GIB
        self.peak_rss_gib = max(self.peak_rss_gib, rss)
        m = {
            "system/cpu_percent": psutil.cpu_percent(None),
            "system/process_cpu_percent": self._proc.cpu_percent(None),
            "system/ram_percent": psutil.virtual_memory().percent,
            "system/rss_gib": rss,
        }
        if self._device is not None:
            free, total = torch.cuda.mem_get_info(self._device)
            m["system/gpu_mem_used_gib"] = (total - free) / GIB
            m["system/gpu_mem_percent"] = 100 * (total - free) / total
            util = gpu_utilization(self._device) if self._gpu_util_ok else None
            if util is None and self._gpu_util_ok:
                self._gpu_util_ok = False
                rank_zero_info("SystemMonitor: GPU utilisation needs pynvml (pip install nvidia-ml-py); not logged")
            if util is not None:
                m["system/gpu_util_percent"] = util
        self.last = m
        return m

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:  # mid-accumulation, or not due
            return
        self._last_step = step
        log_sparse(trainer, self.read())

    def summary(self) -> dict[str, float]:
        return {**self.last, "system/peak_rss_gib": self.peak_rss_gib}


__all__ = ["SystemMonitor", "gpu_utilization"]
