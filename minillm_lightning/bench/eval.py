"""``minillm bench --sections eval``: scored tokens/s of ``minillm eval``'s perplexity scorer against training.

Rolling-window perplexity (what WikiText-2 costs) is measured on random documents with random weights (the cost
depends on neither), with the scorer ``minillm eval`` uses, at the default stride (half a window: every token is
fed twice, half of them scored per window) and at stride = block size (every token fed once). The reference is a
training step of the same model in plain PyTorch (forward, backward, AdamW) on batches of the config's shape.
The three are measured alternately, ``repeats`` times, so load drift hits all alike; the ratios are per repetition.
Next to each ratio: the ratio at equal FLOP/s (training FLOPs per token over scoring FLOPs per scored token), the
ceiling a scorer reaches by running its matmuls as efficiently as the training step does.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from minillm_lightning.bench.machine import sync
from minillm_lightning.callbacks.throughput import flops_per_token
from minillm_lightning.eval.scorer import LogLikelihoodScorer
from minillm_lightning.model import MiniGPT, MiniGPTConfig


def scoring_flops_per_token(arch: MiniGPTConfig, window: int, forward_tokens: int, scored_tokens: int) -> float:
    """Model FLOPs per scored token of rolling-window scoring: every fed token goes through the blocks (attention
    over ``window`` tokens), only the scored ones through the output head (as :class:`LogLikelihoodScorer` runs a
    MiniGPT). Same conventions as :func:`flops_per_token` (``2*N + 4*L*d_attn*T`` forward)."""
    head = 2 * arch.vocab_size * arch.dim
    blocks = flops_per_token(arch, window, training=False) - head
    return (forward_tokens * blocks + scored_tokens * head) / scored_tokens


def eval_section(
    arch: MiniGPTConfig,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    seq_len: int,
    steps: int,
    repeats: int,
    eval_batch_size: int = 16,
    windows: int = 24,
) -> dict[str, Any]:
    """Training tokens/s and scored tokens/s at stride block/2 and block, alternating; medians, ranges and ratios.

    Args:
        arch: the architecture (``vocab_size`` and ``block_size`` as the scorer will see them).
        device, dtype: where and in which weight dtype to score (training runs in fp32 weights, autocast to bf16
            when ``dtype`` is bf16).
        batch_size, seq_len: the training batch shape.
        steps: timed training steps per repetition (after one untimed).
        repeats: alternating repetitions.
        eval_batch_size: windows per forward pass while scoring (``minillm eval --batch-size``).
        windows: documents' length in full windows at stride = block size (at half stride about twice as many).
    """
    arch = replace(arch, dropout=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    train_model = MiniGPT(arch).to(device)
    score_model = copy.deepcopy(train_model).to(dtype).eval()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    block = arch.block_size
    g = torch.Generator().manual_seed(0)
    docs = [[0, *torch.randint(4, arch.vocab_size, (4 * block,), generator=g).tolist()] for _ in range(windows // 4)]
    scorer = LogLikelihoodScorer(score_model, SimpleNamespace(pad_id=0, eos_id=0), batch_size=eval_batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def train_step() -> None:
        x = torch.randint(4, arch.vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
        with autocast:
            logits = train_model(x[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn: Any) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def train_rate() -> float:
        train_step()
        return steps * batch_size * seq_len / timed(lambda: [train_step() for _ in range(steps)])

    fed: dict[int, int] = {}

    def score_rate(stride: int) -> float:
        before, fed_before = scorer.scored_tokens, scorer.forward_tokens
        t = timed(lambda: scorer.rolling_nll(docs, stride))
        fed[stride] = scorer.forward_tokens - fed_before
        return (scorer.scored_tokens - before) / t

    scorer.rolling_nll(docs[:1], block)  # warm-up
    strides = {"half": max(1, block // 2), "block": block}
    rates: dict[str, list[float]] = {"train": [], "half": [], "block": []}
    for rep in range(repeats):
        order = ["train", "half", "block"] if rep % 2 == 0 else ["block", "half", "train"]
        for name in order:
            rates[name].append(train_rate() if name == "train" else score_rate(strides[name]))
    ratio = {k: [s / t for s, t in zip(rates[k], rates["train"])] for k in strides}
    scored = sum(len(d) - 1 for d in docs)
    train_flops = flops_per_token(arch, seq_len, training=True)
    # the ratio scoring would reach at the training step's FLOP/s: training FLOPs per token / scoring's
    parity = {k: train_flops / scoring_flops_per_token(arch, block, fed[s], scored) for k, s in strides.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "block_size": block,
        "vocab_size": arch.vocab_size,
        "eval_batch_size": eval_batch_size,
        "train_shape": [batch_size, seq_len],
        "scored_tokens": scored,
        "forward_tokens": {k: fed[s] for k, s in strides.items()},
        "strides": strides,
        "tokens_per_sec": {k: statistics.median(v) for k, v in rates.items()},
        "tokens_per_sec_all": rates,
        "vs_train": {k: statistics.median(v) for k, v in ratio.items()},
        "vs_train_all": ratio,
        "flop_parity": parity,
    }


def format_eval(e: dict[str, Any]) -> str:
    """Lines of the bench table for the eval section."""
    tps, all_ = e["tokens_per_sec"], e["tokens_per_sec_all"]

    def rng(k: str) -> str:
        return f"{min(all_[k]):,.0f}-{max(all_[k]):,.0f}"

    def ratio_rng(k: str) -> str:
        return f"x{min(e['vs_train_all'][k]):.2f}-{max(e['vs_train_all'][k]):.2f}"

    b, t = e["train_shape"]
    lines = [
        f"  eval (rolling perplexity, vocab {e['vocab_size']}, {e['dtype']}, {e['eval_batch_size']} windows of "
        f"{e['block_size']} per forward, "
        f"{e['scored_tokens']:,} tokens; vs training at batch {b} x {t}, median [range]):",
        f"    training         {tps['train']:,.0f} tok/s [{rng('train')}]",
    ]
    for k, label in (("half", "stride block/2"), ("block", "stride block  ")):
        lines.append(
            f"    {label}   {tps[k]:,.0f} scored tok/s [{rng(k)}]  x{e['vs_train'][k]:.2f} training [{ratio_rng(k)}]"
            f"  (x{e['flop_parity'][k]:.2f} at training's FLOP/s)"
        )
    return "\n".join(lines)
