"""What ``minillm bench`` measures about the machine: matmul peak FLOP/s, the GPU's datasheet peak, the largest
training batch that fits in GPU memory, and this process's resident memory."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psutil
import torch

from minillm_lightning.callbacks.throughput import device_peak_flops
from minillm_lightning.losses import lm_loss
from minillm_lightning.model import MiniGPT, MiniGPTConfig

CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device = CPU) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int, min_seconds: float = 1.0) -> float:
    """This machine's matmul FLOP/s in ``dtype``: an ``n x n`` matmul (2*n^3 FLOPs) repeated for ``min_seconds``.

    The MFU denominator: what the hardware does on the best case our models reduce to, measured, not a datasheet
    figure (a CPU has none, and one of several intra-op threads may be all a loaded machine gives us).
    """
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):  # warm up the kernels (and the GPU clocks)
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < min_seconds:
        a @ b
        reps += 1
        if reps % 8 == 0 or device.type != "cuda":
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def datasheet_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's datasheet peak TFLOP/s in ``dtype`` (``callbacks.throughput.device_peak_flops``: Lightning's table
    plus the chips it lacks, e.g. the H200); None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    flops = device_peak_flops(device, dtype)
    return flops / 1e12 if flops else None


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int = 4096) -> int | None:
    """The largest batch size ``n <= limit`` with ``fits(n)``, assuming fitting is monotone: double from ``start``
    until a size fails, then bisect between the last success and the failure. None if ``start`` fails."""
    if not fits(start):
        return None
    good, bad = start, None
    while bad is None and good < limit:
        n = min(2 * good, limit)
        good, bad = (n, None) if fits(n) else (good, n)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def cuda_max_batch(arch: MiniGPTConfig, device: torch.device, precision: str, seq_len: int, start: int) -> int | None:
    """Largest training batch (sequences of ``seq_len``) whose forward, backward and fused AdamW step fit in the GPU's
    memory, with the run's precision (bf16 autocast for ``bf16-mixed``); CUDA only (None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.manual_seed(0)
    model = MiniGPT(replace(arch, dropout=0.0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))

    def fits(batch: int) -> bool:
        try:
            x = torch.randint(0, arch.vocab_size, (batch, seq_len + 1), device=device)
            with autocast:
                logits = model(x[:, :-1]).logits
            lm_loss(logits, x[:, 1:])[0].backward()
            opt.step()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return largest_fitting(fits, start)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The host as a published number needs it: CPU model, family/model, the vector units that set the matmul peak
    (AVX-512, AMX, AVX2, NEON) and the logical CPU count, from ``/proc/cpuinfo`` on Linux (``platform`` elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    first: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if first:  # the end of the first processor's block
                break
            continue
        first.setdefault(key.strip(), value.strip())
    name = first.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in first and "model" in first:
        name += f" (family {first['cpu family']} model {first['model']})"
    flags = set(first.get("flags", first.get("Features", "")).split())
    units = [
        unit
        for unit, present in [
            ("AVX-512", "avx512f" in flags),
            ("AMX", "amx_tile" in flags),
            ("AVX2", "avx2" in flags and "avx512f" not in flags),
            ("NEON", "asimd" in flags),
        ]
        if present
    ]
    return f"{name}{', ' + '/'.join(units) if units else ''}, {os.cpu_count()} CPUs"


def rss() -> int:
    return psutil.Process().memory_info().rss
