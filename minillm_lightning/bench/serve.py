"""``minillm bench --sections serve``: total tokens/s of ``minillm serve`` with 1, 4 and 16 concurrent clients.

The server runs as a real subprocess (``minillm serve``) on a checkpoint written from the config's architecture
with random weights (speed does not depend on them, and a random model almost never says ``<|im_end|>``, so
every answer runs to ``max_tokens``). Each client is a thread with the official ``openai`` client sending
non-streamed, greedy chat requests one after another; tokens are the ``usage.completion_tokens`` the server
reports. Concurrent requests are decoded as one batch (LitServe batching + left padding + KV cache), which is
where the gain over one client comes from.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from minillm_lightning.checkpoint import META_KEY
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.tokenizer import Tokenizer

CLIENT_LEVELS = (1, 4, 16)
PROMPTS = ["Tell me a story about a cat.", "What is 3 plus 4?", "Name three colours.", "Why is the sky blue?"]


def write_checkpoint(model: MiniGPT, tokenizer: Tokenizer, path: str | os.PathLike, stage: str = "sft") -> Path:
    """Save ``model`` + ``tokenizer`` as a minillm checkpoint that every command (serve, generate, ...) loads."""
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        META_KEY: {"stage": stage, "arch": model.config.to_dict(), "format": 1},
        "tokenizer": tokenizer.state(),
    }
    torch.save(ckpt, path)
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    checkpoint: str | os.PathLike, *args: str, timeout: float = 180.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``minillm serve`` as a subprocess on a free port; yield its base URL once ``/health`` says ok."""
    port = free_port()
    cmd = [sys.executable, "-m", "minillm_lightning.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"minillm serve exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"minillm serve did not become healthy within {timeout:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_clients(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``requests_per_client`` greedy requests in a row; totals and rates."""
    from openai import OpenAI

    def one_client(c: int) -> tuple[int, list[float]]:
        tokens, latencies = 0, []
        for r in range(requests_per_client):
            t0 = time.perf_counter()
            resp = client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                max_tokens=max_tokens,
                temperature=0,
            )
            latencies.append(time.perf_counter() - t0)
            tokens += resp.usage.completion_tokens
        return tokens, latencies

    with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one_client, range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    latencies = [x for _, lat in results for x in lat]
    return {
        "clients": clients,
        "requests": len(latencies),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_sec": tokens / wall,
        "mean_latency_s": sum(latencies) / len(latencies),
    }


def serve_section(
    arch: MiniGPTConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    levels: Sequence[int] = CLIENT_LEVELS,
    max_tokens: int = 64,
    rounds: int = 4,
    max_batch_size: int = 16,
) -> dict[str, Any]:
    """Tokens/s of ``minillm serve`` at each number of concurrent clients (each sends ``rounds`` requests)."""
    torch.manual_seed(0)
    model = MiniGPT(replace(arch, gradient_checkpointing=False))
    with tempfile.TemporaryDirectory(prefix="minillm-serve-bench-") as tmp:
        ckpt = write_checkpoint(model, tokenizer, Path(tmp) / "random.ckpt")
        args = ["--device", device.type, "--max_batch_size", str(max_batch_size)]
        with running_server(ckpt, *args) as url:
            run_clients(url, 1, 1, 8)  # warm-up: first-call costs in the worker
            rows = [run_clients(url, n, rounds, max_tokens) for n in levels]
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["vs_one_client"] = row["tokens_per_sec"] / base
    return {"max_tokens": max_tokens, "rounds": rounds, "max_batch_size": max_batch_size, "levels": rows}


def format_serve(result: dict[str, Any]) -> str:
    """The serve section as a Markdown table."""
    lines = [
        f"  serve (greedy, {result['max_tokens']} new tokens per request, {result['rounds']} requests per client, "
        f"max_batch_size {result['max_batch_size']}):",
        "",
        "| clients | requests | tokens | wall (s) | tokens/s | x one client | mean latency (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["levels"]:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_sec']:.0f} | "
            f"{r['vs_one_client']:.2f} | {r['mean_latency_s']:.2f} |"
        )
    return "\n".join(lines)
