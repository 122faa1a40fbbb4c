"""``minillm bench --sections decode``: greedy tokens/s with and without the KV cache, beam search against
greedy, and Hugging Face ``generate`` on the same weights (when transformers is installed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from minillm_lightning.bench.machine import timed
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.model import MiniGPT, MiniGPTConfig

DECODE_PROMPT_LEN = 16  # random prompt tokens before the timed new tokens


def _hf_model(model: MiniGPT) -> Any:
    """A Hugging Face ``LlamaForCausalLM`` (``MixtralForCausalLM`` for MoE) with ``model``'s weights."""
    from transformers import AutoModelForCausalLM

    from minillm_lightning.model.hf_convert import to_hf_config, to_hf_state_dict

    p = next(model.parameters())
    hf = AutoModelForCausalLM.from_config(to_hf_config(model.config))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"Hugging Face weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.to(device=p.device, dtype=p.dtype).eval()


def decode_section(
    arch: MiniGPTConfig, device: torch.device, dtype: torch.dtype, lengths: list[int], beam_len: int
) -> dict[str, Any]:
    """Greedy tokens/s with and without the KV cache, beam search (4 beams) vs greedy, and HF ``generate``.

    Random weights (speed does not depend on them); batch 1, a random prompt of ``DECODE_PROMPT_LEN`` tokens, no
    stop tokens so every run produces exactly its length. The context is extended when it is too short.
    """
    need = DECODE_PROMPT_LEN + max([*lengths, beam_len])
    extended = need > arch.block_size
    arch = replace(arch, block_size=max(need, arch.block_size), gradient_checkpointing=False)
    torch.manual_seed(0)
    model = MiniGPT(arch).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(4, arch.vocab_size, (DECODE_PROMPT_LEN,)).tolist()
    gen = TextGenerator(model, stop_tokens=(), pad_id=0)

    def run(n: int, **kw: Any) -> tuple[float, list[int]]:
        cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_tokens=(), **kw)
        return timed(lambda: gen.generate([prompt], cfg)[0], device)

    run(8)
    run(8, use_cache=False)
    out: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": DECODE_PROMPT_LEN,
        "block_size": arch.block_size,
        "block_size_extended": extended,
        "lengths": {},
    }
    ours: dict[int, list[int]] = {}
    for n in lengths:
        t_cache, ours[n] = run(n)
        t_full, _ = run(n, use_cache=False)
        out["lengths"][str(n)] = {
            "cache_tokens_per_sec": n / t_cache,
            "no_cache_tokens_per_sec": n / t_full,
            "cache_speedup": t_full / t_cache,
        }
    run(8, num_beams=4)
    t_greedy, _ = run(beam_len)
    t_beam, _ = run(beam_len, num_beams=4)
    out["beam"] = {
        "new_tokens": beam_len,
        "num_beams": 4,
        "greedy_tokens_per_sec": beam_len / t_greedy,
        "beam_tokens_per_sec": beam_len / t_beam,
        "beam_cost": t_beam / t_greedy,
    }
    try:
        hf = _hf_model(model)
    except ImportError:
        out["hf"] = None
        return out
    ids = torch.tensor([prompt], device=device)

    def hf_run(n: int) -> tuple[float, list[int]]:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.inference_mode():
            t, seq = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **kw), device)
        return t, seq[0, ids.shape[1] :].tolist()

    hf_run(8)
    out["hf"] = {}
    for n in lengths:
        t, tokens = hf_run(n)
        ours_rate = out["lengths"][str(n)]["cache_tokens_per_sec"]
        out["hf"][str(n)] = {
            "tokens_per_sec": n / t,
            "ours_vs_hf": ours_rate / (n / t),
            "same_tokens": tokens == ours[n],
        }
    return out
