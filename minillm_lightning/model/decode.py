"""A lean one-token decoding step for MiniGPT with a KV cache (what `TextGenerator` runs after the prompt).

`MiniGPT.forward` handles every case (training, masks, packed sequences, prompts); decoding one token per row
calls it hundreds of times on tiny tensors, where per-operator overhead, not arithmetic, sets the speed. This
step computes the same function with fewer, larger operators:

- q, k and v come from one matmul, as do the SwiGLU gate and up projections (weights concatenated once per
  `generate` call in :class:`DecodeWeights`, so they can never be stale; q and k in the row order of
  `Attention.qk_weights`, as the KV cache holds keys);
- rotary embedding is applied to q and k together;
- the single query's attention is one SDPA call in which the query heads sharing a kv head are that head's
  "queries" (a reshape), so keys are never repeated and no causal mask is needed.

It is checked against `MiniGPT.forward` (logits and greedy tokens) in tests/test_generation.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm_lightning.model.gpt import KVCache, MiniGPT, RMSNorm, SwiGLU, apply_rope


class DecodeWeights:
    """Per-layer concatenated [q; k; v] and [gate; up] weights of a model, taken at construction time."""

    def __init__(self, model: MiniGPT) -> None:
        with torch.no_grad():
            self.qkv = [torch.cat([*b.self_attn.qk_weights(), b.self_attn.v_proj.weight]) for b in model.layers]
            self.gate_up = [
                torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) if isinstance(b.mlp, SwiGLU) else None
                for b in model.layers
            ]


def _norm(norm: RMSNorm, x: Tensor) -> Tensor:
    if x.dtype == torch.float32:  # one kernel; other dtypes normalise in float32 as RMSNorm.forward does
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


@torch.no_grad()
def decode_step(
    model: MiniGPT, weights: DecodeWeights, tokens: Tensor, positions: Tensor, cache: KVCache, keep: Tensor | None
) -> Tensor:
    """Append one token per row and return float32 logits (B, V) for the next one.

    Args:
        tokens: (B,) the new tokens.
        positions: (B,) their RoPE positions (differ per row when prompts were left-padded).
        cache: the KV cache after the prompt; written at ``cache.pos`` and advanced by one.
        keep: (B, cache.pos + 1) False at left padding, or None when no row is padded.
    """
    cfg = model.config
    B, nh, nkv, hs = tokens.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    pos, end = cache.pos, cache.pos + 1
    if end > cache.max_len:
        raise ValueError(f"KV cache full: {end} > {cache.max_len}")
    rot = model.rope[positions][:, None]  # (B, 1, hs/2, 2)
    visible = None if keep is None else keep[:, None, None, :end]  # (B, 1, 1, S)
    x = model.embed_tokens(tokens)  # (B, C)
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        qkv = F.linear(_norm(block.input_layernorm, x), weights.qkv[i])  # (B, (nh + 2 nkv) hs)
        qk = apply_rope(qkv[:, : (nh + nkv) * hs].view(B, nh + nkv, hs), rot)
        cache.k[i][:, :, pos] = qk[:, nh:]
        cache.v[i][:, :, pos] = qkv[:, (nh + nkv) * hs :].view(B, nkv, hs)
        q = qk[:, :nh].reshape(B, nkv, nh // nkv, hs)  # query heads grouped by the kv head they share
        # the group's queries attend to all cached keys of their kv head: no causal mask, no repeated keys
        y = F.scaled_dot_product_attention(q, cache.k[i][:, :, :end], cache.v[i][:, :, :end], attn_mask=visible)
        x = x + attn.o_proj(y.reshape(B, nh * hs))
        h = _norm(block.post_attention_layernorm, x)
        if weights.gate_up[i] is None:  # MoE: the routed experts as in training
            x = x + block.mlp(h[:, None])[0][:, 0]
        else:
            gate, up = F.linear(h, weights.gate_up[i]).chunk(2, dim=-1)
            x = x + block.mlp.down_proj(F.silu(gate) * up)
    cache.pos = end
    return model.lm_head(_norm(model.norm, x)).float()
