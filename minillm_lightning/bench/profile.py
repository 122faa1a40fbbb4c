"""``minillm bench --sections profile``: where the time of one training step goes, per kind of operator.

The config's run is built as ``minillm fit`` builds it (the same LightningCLI), with its progress bar and logging
left on (a TensorBoard logger into a temporary directory; checkpointing and validation off), and ``steps``
optimizer steps after ``warmup`` ones run under ``torch.profiler``. Every operator's own CPU time is put in one
category:

- scopes opened around ``apply_rope``, ``RMSNorm.forward``, ``SwiGLU.forward`` and Muon's ``orthogonalize`` (by
  wrapping them for the measurement only); the backward of an operator goes to its forward's category (matched by
  the autograd sequence number);
- matrix multiplies (``mm``, ``addmm``, ``bmm``...) are "matmuls" wherever they run, except inside Newton-Schulz;
- attention (SDPA and its backward), the loss, the optimizer step (Muon's momentum and AdamW), the DataLoader's
  ``__next__`` (sampling and collation), the rest of the forward/backward;
- "host: Lightning loop, logging, progress bar, Python" is the step's wall time minus all profiled operator time.

The table gives milliseconds per optimizer step and shares of the step. The profiler's own overhead inflates the
host share somewhat; compare the ms/step printed with ``--sections train``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from torch.autograd.profiler import record_function

SCOPES = {
    "rope": "RoPE (cat, neg, mul, add)",
    "rmsnorm": "RMSNorm",
    "swiglu": "SwiGLU activation (silu, mul)",
    "newton_schulz": "Muon Newton-Schulz",
    "optimizer": "optimizer update: Muon momentum + AdamW",
    "clip": "gradient clipping",
    "loss": "loss (log-softmax, NLL)",
}
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")


def _scoped(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(f"scope::{name}"):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def scopes() -> Iterator[None]:
    """Wrap the functions whose cost the table breaks out in named profiler scopes, for the measurement only."""
    import torch
    import torch.optim.adam as torch_adam  # AdamW's update function lives here

    from minillm_lightning import losses, optim
    from minillm_lightning.model import gpt
    from minillm_lightning.stages import pretrain

    patches = [
        (optim.MuonAdamW, "_muon", _scoped(optim.MuonAdamW._muon, "optimizer")),
        (optim.MuonAdamW, "_adamw", _scoped(optim.MuonAdamW._adamw, "optimizer")),
        (torch_adam, "adam", _scoped(torch_adam.adam, "optimizer")),
        (torch.nn.utils, "clip_grad_norm_", _scoped(torch.nn.utils.clip_grad_norm_, "clip")),
        (pretrain, "lm_loss", _scoped(losses.lm_loss, "loss")),
        (gpt, "apply_rope", _scoped(gpt.apply_rope, "rope")),
        (gpt.RMSNorm, "forward", _scoped(gpt.RMSNorm.forward, "rmsnorm")),
        (gpt.SwiGLU, "forward", _scoped(gpt.SwiGLU.forward, "swiglu")),
        (optim, "orthogonalize", _scoped(optim.orthogonalize, "newton_schulz")),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def _ancestors(ev: Any) -> list[Any]:
    out = []
    while ev is not None:
        out.append(ev)
        ev = ev.cpu_parent
    return out


def _scope_of(chain: list[Any]) -> str | None:
    """The innermost named scope in ``chain`` (an event and its ancestors)."""
    return next((SCOPES[e.name[7:]] for e in chain if e.name.startswith("scope::")), None)


def _category(chain: list[Any], seq_category: dict[int, str]) -> str:
    """The category of one profiled operator from its name and its ancestors (``chain``, innermost first)."""
    names = [e.name for e in chain]
    for scope in ("newton_schulz", "optimizer", "clip"):
        if f"scope::{scope}" in names:
            return SCOPES[scope]
    if any("DataLoader" in n for n in names):
        return "data: sampling + collation (DataLoader)"
    if names[0] in MATMULS:
        return "matmuls (forward + backward)"
    if any("scaled_dot_product" in n or "ScaledDotProduct" in n for n in names):
        return "attention (SDPA)"
    scope = _scope_of(chain)
    if scope is not None:
        return scope
    backward = [e for e in chain if e.name.startswith("autograd::engine::evaluate_function")]
    if backward and backward[-1].sequence_nr in seq_category:
        return seq_category[backward[-1].sequence_nr]
    if any(k in n for n in names for k in ("log_softmax", "nll_loss", "LogSoftmax", "NllLoss", "cross_entropy")):
        return "loss (log-softmax, NLL)"
    return "other ops (embedding, residual adds, grad clipping, logging tensors...)"


def categorize(events: list[Any]) -> dict[str, float]:
    """Self CPU microseconds per category over ``events`` (a ``prof.events()`` list)."""
    seq_category: dict[int, str] = {}  # a scoped forward operator lends its category to its backward
    for ev in events:
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            scope = _scope_of(_ancestors(ev))
            if scope is not None and scope not in (SCOPES["newton_schulz"], SCOPES["optimizer"], SCOPES["clip"]):
                seq_category.setdefault(ev.sequence_nr, scope)
    totals: dict[str, float] = defaultdict(float)
    for ev in events:
        totals[_category(_ancestors(ev), seq_category)] += ev.self_cpu_time_total
    return dict(totals)


def profile_section(cli: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Profile ``steps`` optimizer steps of the config's Lightning run (progress bar and logger on) after ``warmup``.

    Returns ms per step, per category, and the host remainder (wall minus profiled operator time).
    """
    import tempfile

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.profiler import ProfilerActivity, profile

    state: dict[str, Any] = {}

    class Window(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == warmup:
                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif trainer.global_step == warmup + steps and "prof" in state:
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    module = cli.model
    module._t_last, module._tokens_since = None, 0
    with tempfile.TemporaryDirectory(prefix="minillm-profile-") as tmp, scopes():
        trainer = cli.instantiate_trainer(
            callbacks=[Window()],
            logger=TensorBoardLogger(tmp, name="tb"),
            enable_progress_bar=True,
            max_steps=warmup + steps,
        )
        trainer.fit(module, datamodule=cli.datamodule)
        totals = categorize(state["prof"].events())
    wall_us = state["wall"] * 1e6
    host = max(0.0, wall_us - sum(totals.values()))
    totals["host: Lightning loop, logging, progress bar, Python"] = host
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "ms_per_step": state["wall"] * 1000 / steps,
        "ms_per_step_by_category": {k: v / 1000 / steps for k, v in rows},
        "share": {k: v / wall_us for k, v in rows},
    }


def format_profile(p: dict[str, Any]) -> str:
    """A Markdown table of the profile."""
    lines = [
        f"  profile: {p['ms_per_step']:.1f} ms/step under torch.profiler ({p['steps']} steps)",
        "",
        "| category | ms/step | share |",
        "|---|---:|---:|",
    ]
    for k, ms in p["ms_per_step_by_category"].items():
        lines.append(f"| {k} | {ms:.2f} | {100 * p['share'][k]:.1f}% |")
    return "\n".join(lines)
