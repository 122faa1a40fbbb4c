"""``minillm bench --sections dpo``: the cost of a DPO step against an SFT step on the same batch.

A preference batch of B pairs is 2B sequences (chosen and rejected); the SFT step trains on the same 2B
sequences with the same reply labels. Three optimizer steps are timed, alternating, each from the same weights:

- ``sft``: ``SFTModule``'s loss (next-token NLL of the reply tokens), backward, AdamW;
- ``dpo``: ``DPOModule``'s loss with the frozen reference's forward pass on every batch;
- ``dpo_precomputed``: the same with reference log-probs read from the precomputed table
  (``precompute_ref_logps: true``), so no reference forward.

Random weights and tokens: the cost does not depend on their values. Right-padded replies of random lengths.
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from minillm_lightning.losses import IGNORE_INDEX
from minillm_lightning.model import MiniGPTConfig


def preference_batch(arch: MiniGPTConfig, pairs: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random right-padded pairs: a shared prompt of seq_len/4 tokens, replies filling 50-100% of the rest."""
    g = torch.Generator().manual_seed(0)
    prompt = max(1, seq_len // 4)
    batch: dict[str, torch.Tensor] = {"index": torch.arange(pairs)}
    prompt_ids = torch.randint(4, arch.vocab_size, (pairs, prompt), generator=g)
    for side in ("chosen", "rejected"):
        ids = torch.randint(4, arch.vocab_size, (pairs, seq_len), generator=g)
        ids[:, :prompt] = prompt_ids
        lengths = torch.randint((seq_len + prompt) // 2, seq_len + 1, (pairs,), generator=g)
        real = torch.arange(seq_len)[None, :] < lengths[:, None]
        ids[~real] = 0
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, prompt - 1 : -1] = ids[:, prompt:]  # the reply tokens, predicted from the position before
        labels[:, :-1][~real[:, 1:]] = IGNORE_INDEX
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": real.long(), f"{side}_labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def dpo_section(
    arch: MiniGPTConfig,
    device: torch.device,
    dtype: torch.dtype,
    pairs: int,
    seq_len: int,
    steps: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Median ms per optimizer step of SFT, DPO and DPO with precomputed reference log-probs, and the ratios."""
    from minillm_lightning.stages.dpo import DPOModule, pair_tensors
    from minillm_lightning.stages.sft import SFTModule

    torch.manual_seed(0)
    with warnings.catch_warnings():  # "DPO from random weights": intended here
        warnings.simplefilter("ignore")
        sft, dpo, dpo_pre = (
            SFTModule(arch=arch),
            DPOModule(arch=arch),
            DPOModule(arch=arch, precompute_ref_logps=True),
        )
    init = sft.model.state_dict()
    batch = preference_batch(arch, pairs, seq_len, device)
    input_ids, _, labels = pair_tensors(batch)
    sft_batch = {"input_ids": input_ids, "labels": labels}
    for module in (dpo, dpo_pre):
        module.model.load_state_dict(init)
        module.ref_model.load_state_dict(init)
    with torch.no_grad():  # what precompute_ref_logps stores at fit start, then the reference is freed
        ref = dpo_pre.reference_logps(batch, "train").float()
    dpo_pre._ref_cache["train"] = torch.stack(ref.chunk(2), dim=1)
    dpo_pre.ref_model = None
    losses = {
        "sft": (sft, lambda: sft._lm_loss(sft_batch)[0]),
        "dpo": (dpo, lambda: dpo.pair_step(batch, "train")[0]),
        "dpo_precomputed": (dpo_pre, lambda: dpo_pre.pair_step(batch, "train")[0]),
    }
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    times: dict[str, list[float]] = {name: [] for name in losses}
    opts = {}
    for name, (module, _) in losses.items():
        module.to(device).train()
        opts[name] = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    for rep in range(repeats):
        for name, (_module, loss_fn) in losses.items():  # alternating: drift of the machine hits all three
            for i in range(steps + (warmup if rep == 0 else 0)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with autocast:
                    loss = loss_fn()
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep > 0 or i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "pairs": pairs,
        "seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "ms_per_step": ms,
        "dpo_vs_sft": ms["dpo"] / ms["sft"],
        "dpo_precomputed_vs_sft": ms["dpo_precomputed"] / ms["sft"],
    }


def format_dpo(d: dict[str, Any]) -> str:
    ms = d["ms_per_step"]
    return (
        f"  DPO vs SFT ({d['pairs']} pairs = {2 * d['pairs']} sequences of {d['seq_len']}, {d['dtype']}): "
        f"SFT {ms['sft']:.1f} ms/step, DPO {ms['dpo']:.1f} ms (x{d['dpo_vs_sft']:.2f}), "
        f"DPO with precomputed reference {ms['dpo_precomputed']:.1f} ms (x{d['dpo_precomputed_vs_sft']:.2f})"
    )
