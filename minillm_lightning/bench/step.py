"""``minillm bench --nanogpt PATH --sections nanostep``: one training step of our block against nanoGPT's, at
nanoGPT's CPU shape (4 layers, 4 heads, width 128, context 64, batch 12), in one process.

nanoGPT's ``GPT`` is imported from the checkout (``model.py``), not vendored. Its step is what its ``train.py``
does on a CPU: forward with the loss, backward, ``clip_grad_norm_(1.0)``, the AdamW of its
``configure_optimizers``, ``zero_grad``. Ours is what ``minillm fit`` runs for :class:`PretrainModule`: the
backbone (through ``torch.compile`` with ``compile=True``), ``lm_loss``, backward, the same clipping, and the
stage's own ``configure_optimizers`` (AdamW or Muon + AdamW). Both see the same fixed random batch, so the data
path is left out. The variants take turns in every round (the order rotates), so a drift of the host's speed hits
all of them alike; the ratio is per round, against nanoGPT's time in the same round.

With ``--ablate`` the eager AdamW step is also timed with parts of our block swapped for nanoGPT's, to show
where the difference goes: the SwiGLU narrowed to nanoGPT's MLP parameter count, then on top of that LayerNorm
for RMSNorm, no rotary embedding, a 4x GELU MLP, and all three. These are cost measurements only (a model
without RoPE has no position information; nanoGPT pays one add for its learned position embedding instead).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import statistics
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from minillm_lightning.errors import MiniLLMError
from minillm_lightning.losses import lm_loss
from minillm_lightning.model import MiniGPTConfig, gpt

LAYERS, HEADS, WIDTH, BLOCK, BATCH, VOCAB = 4, 4, 128, 64, 12, 65  # nanoGPT's CPU recipe; 65 characters
VARIANTS = (("adamw", False), ("adamw", True), ("muon", False), ("muon", True))
# SwiGLU's three hidden x width matrices at this width hold nanoGPT's MLP parameter count (2 x 4 x 128^2): 341
MATCHED_WIDTH = round(8 * WIDTH / 3)
PARTS = {"layernorm": "LayerNorm", "no-rope": "no RoPE", "gelu": "GELU 4x MLP"}
ABLATIONS: tuple[tuple[str, ...], ...] = ((), ("layernorm",), ("no-rope",), ("gelu",), tuple(PARTS))


def _nanogpt_model(checkout: Path) -> Any:
    """nanoGPT's ``model`` module, loaded from ``checkout/model.py``."""
    path = checkout / "model.py"
    if not path.is_file():
        raise MiniLLMError(f"--nanogpt {checkout}: not a nanoGPT checkout (no model.py)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nanogpt_step(checkout: Path) -> Any:
    """A function taking one training step of nanoGPT's model at its CPU shape, as its ``train.py`` does."""
    ng = _nanogpt_model(checkout)
    cfg = ng.GPTConfig(
        block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, dropout=0.0, bias=False
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its parameter count and optimizer report
        model = ng.GPT(cfg)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class _GeluMLP(nn.Module):
    """nanoGPT's MLP: width -> 4 x width, exact GELU, back to width."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def _no_rotation(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    return x


def _our_module(optimizer: str, compile: bool, parts: tuple[str, ...] | None = None) -> Any:
    """``PretrainModule`` at nanoGPT's shape; with ``parts`` (a subset of :data:`PARTS`, maybe empty) the SwiGLU is
    :data:`MATCHED_WIDTH` wide and the named parts of the block are nanoGPT's."""
    from minillm_lightning.stages.pretrain import PretrainModule

    arch = MiniGPTConfig(
        size="custom",
        n_layer=LAYERS,
        n_head=HEADS,
        n_kv_head=HEADS,
        dim=WIDTH,
        block_size=BLOCK,
        tie_embeddings=False,
        intermediate_size=None if parts is None else MATCHED_WIDTH,
    )
    module = PretrainModule(arch=arch, vocab_size=VOCAB, compile=compile, optimizer=optimizer)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if "layernorm" in (parts or ()) and isinstance(child, gpt.RMSNorm):
                setattr(parent, name, nn.LayerNorm(WIDTH, bias=False))
            if "gelu" in (parts or ()) and isinstance(child, gpt.SwiGLU):
                setattr(parent, name, _GeluMLP())
    return module


def _our_step(optimizer: str, compile: bool, parts: tuple[str, ...] | None = None) -> Any:
    """A function taking one ``PretrainModule`` training step at nanoGPT's shape, as the plain loop of
    :func:`minillm_lightning.bench.main.plain_loop_run` does (same loss, clipping and optimizer construction);
    ``parts`` as in :func:`_our_module`."""
    from minillm_lightning.bench.main import _optimizer

    module = _our_module(optimizer, compile, parts)
    opt, _ = _optimizer(module, 1000, "32-true", clip_val=1.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    rotation = mock.patch.object(gpt, "apply_rope", _no_rotation) if "no-rope" in (parts or ()) else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with rotation or contextlib.nullcontext():
            out = module._forward(x)
            (lm_loss(out.logits, y)[0] + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ablation_name(parts: tuple[str, ...]) -> str:
    """The row name of the eager AdamW step with ``parts`` swapped for nanoGPT's."""
    swaps = [PARTS[p] for p in parts]
    if "gelu" not in parts:
        swaps.insert(0, f"SwiGLU width {MATCHED_WIDTH}")
    return "adamw eager, " + " + ".join(swaps)


def nanostep_section(
    checkout: Path,
    rounds: int = 8,
    steps: int = 5,
    variants: tuple[tuple[str, bool], ...] | None = None,
    ablations: tuple[tuple[str, ...], ...] = (),
) -> dict[str, Any]:
    """ms per training step of nanoGPT's block and of ours (each ``(optimizer, compile)`` variant, default
    :data:`VARIANTS`, then the eager AdamW step with each of ``ablations``' parts swapped for nanoGPT's, e.g.
    :data:`ABLATIONS`), and ours / nanoGPT per round."""
    variants = VARIANTS if variants is None else variants
    torch.manual_seed(0)
    x, y = torch.randint(0, VOCAB, (BATCH, BLOCK)), torch.randint(0, VOCAB, (BATCH, BLOCK))
    steps_of = {"nanoGPT": _nanogpt_step(checkout)}
    steps_of.update({f"{opt} {'compiled' if c else 'eager'}": _our_step(opt, c) for opt, c in variants})
    steps_of.update({ablation_name(parts): _our_step("adamw", False, parts) for parts in ablations})
    first_s = {}
    for name, step in steps_of.items():  # the first step pays torch.compile's one-off cost
        t0 = time.perf_counter()
        step(x, y)
        first_s[name] = time.perf_counter() - t0
        for _ in range(2):
            step(x, y)
    ms: dict[str, list[float]] = {name: [] for name in steps_of}
    names = list(steps_of)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_of[name](x, y)
            ms[name].append((time.perf_counter() - t0) / steps * 1000)
    out: dict[str, Any] = {"shape": f"{LAYERS}x{WIDTH}, {HEADS} heads, context {BLOCK}, batch {BATCH}", "rows": {}}
    for name, times in ms.items():
        ratios = [a / b for a, b in zip(times, ms["nanoGPT"])]
        out["rows"][name] = {
            "ms_per_step": statistics.median(times),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "first_step_s": first_s[name],
        }
    return out


def format_nanostep(res: dict[str, Any]) -> str:
    """The Markdown table of :func:`nanostep_section`'s results, nanoGPT's row first."""
    lines = [
        "",
        f"Training step at nanoGPT's shape ({res['shape']}), one process, variants alternating:",
        "| step | ms/step (median) | / nanoGPT (median of rounds) | range over rounds | first step (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in res["rows"].items():
        label = "nanoGPT (AdamW, eager)" if name == "nanoGPT" else f"ours, {name}"
        lines.append(
            f"| {label} | {row['ms_per_step']:.1f} | **x{row['ratio']:.2f}** | "
            f"x{row['ratio_min']:.2f}-{row['ratio_max']:.2f} | {row['first_step_s']:.1f} |"
        )
    return "\n".join(lines)
