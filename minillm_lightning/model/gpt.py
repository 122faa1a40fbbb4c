"""MiniGPT: a Llama-style decoder in plain PyTorch (no Lightning), readable in one sitting.

Pre-norm RMSNorm blocks, rotary position embeddings, grouped-query attention on PyTorch's
``scaled_dot_product_attention`` kernels, a SwiGLU MLP or a Mixture-of-Experts of SwiGLU experts,
an optional tied output head and a pre-allocated KV cache for incremental decoding. Parameter names
follow Hugging Face Llama/Mixtral so weights map one-to-one for export and for the equivalence tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minillm_lightning.model.config import MiniGPTConfig


class GPTOutput(NamedTuple):
    logits: Tensor | None  # (B, T, vocab) or None when not requested
    aux_loss: Tensor  # scalar MoE load-balancing loss (0 for dense models), already weighted
    hidden: Tensor  # (B, T, dim) final normalised hidden states


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel with the weight on GPUs (on a CPU PyTorch composes it from small ones)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in float32 for stability under bf16/fp16, as Llama does, then scale in the input's dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cache(config: MiniGPTConfig) -> Tensor:
    """Rotations ``e^(i t theta_j)`` as (cos, sin) pairs, shape (block_size, head_dim / 2, 2): position t turns the
    pair j of a head by ``t * theta_j`` with ``theta_j = rope_theta^(-2j / head_dim)``, Llama's frequencies. Real,
    not complex: ``module.to(dtype)`` would drop a complex buffer's imaginary part."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rope_rows(n_heads: int, head_dim: int) -> Tensor:
    """The order of a q or k projection's output rows in which each head's pairs are adjacent.

    Llama (and Hugging Face) rotate element j of a head with element j + head_dim/2 ("rotate half"). Taking the
    projection's rows in the order (0, h, 1, h+1, ..., h-1, 2h-1) per head (h = head_dim/2) puts each pair side by
    side, so that the rotation is one complex multiply. Attention only takes dot products of q with k, which the
    same order of both leaves unchanged, so the weights keep Llama's layout and the function is Llama's."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # (head_dim,)
    return (torch.arange(n_heads)[:, None] * head_dim + within).flatten()


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate the adjacent pairs of x (..., hs), in the order of :func:`rope_rows`, by ``rot`` ((cos, sin) pairs
    from :func:`rope_cache`, broadcastable to (..., hs/2, 2)), in float32. One complex multiply where it runs well
    (eager on CPU and CUDA: one kernel each way instead of six); elsewhere (MPS, and ``torch.compile``, which
    generates no code for complex numbers) the same arithmetic on real tensors."""
    work = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    pairs, rot = x.to(work).unflatten(-1, (-1, 2)), rot.to(work)
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rot))
    else:
        (a, b), (cos, sin) = pairs.unbind(-1), rot.unbind(-1)
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class KVCache:
    """Pre-allocated key/value buffers for all layers; ``pos`` is the number of cached positions."""

    def __init__(self, config: MiniGPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        if max_len > config.block_size:
            raise ValueError(f"KV cache length {max_len} exceeds the model context block_size={config.block_size}")
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos}+{t} > {self.max_len}")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the caches of surviving beams)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Attention(nn.Module):
    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        # each head's rotation pairs side by side (rope_rows); the parameters keep Llama's layout
        self.register_buffer("q_rows", rope_rows(config.n_head, config.head_dim), persistent=False)
        self.register_buffer("k_rows", rope_rows(config.n_kv_head, config.head_dim), persistent=False)

    def qk_weights(self) -> tuple[Tensor, Tensor]:
        """The q and k projections with their rows in the order of :func:`rope_rows` (copies, so that gradients
        reach the parameters in their own layout)."""
        return self.q_proj.weight.index_select(0, self.q_rows), self.k_proj.weight.index_select(0, self.k_rows)

    def forward(self, x: Tensor, rot: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        wq, wk = self.qk_weights()
        q = apply_rope(F.linear(x, wq).view(B, T, nh, hs), rot).transpose(1, 2)  # (B, nh, T, hs)
        k = apply_rope(F.linear(x, wk).view(B, T, nkv, hs), rot).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs) with S = cached + T
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
            enable_gqa=nkv != nh,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral routing) with optional always-on shared experts."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.coef = config.n_experts, config.top_k, config.aux_loss_coef
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.dim, config.intermediate_size) for _ in range(config.n_experts))
        self.shared = nn.ModuleList(
            SwiGLU(config.dim, config.intermediate_size) for _ in range(config.n_shared_experts)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(flat[token_idx]) * weights[token_idx, slot, None])
        for expert in self.shared:
            out = out + expert(flat)
        # Switch/Mixtral load balancing: E * sum_e (share of routed slots to e) * (mean router prob of e)
        routed = F.one_hot(chosen, self.n_experts).float().mean(0)  # (k, E)
        aux = self.n_experts * (routed * probs.mean(0)).sum()
        return out.view(B, T, C), self.coef * aux


class Block(nn.Module):
    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.is_moe else SwiGLU(config.dim, config.intermediate_size)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self, x: Tensor, rot: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int
    ) -> tuple[Tensor, Tensor | None]:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rot, mask, cache, layer))
        h = self.mlp(self.post_attention_layernorm(x))
        h, aux = h if isinstance(h, tuple) else (h, None)  # dense blocks have no auxiliary loss
        return x + self.drop(h), aux


class MiniGPT(nn.Module):
    """The decoder every stage shares: Llama's block (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU
    or routed experts), with the parameter names of Hugging Face's ``LlamaForCausalLM`` (``minillm export``).

    Example:
        >>> model = MiniGPT(MiniGPTConfig(size="tiny", vocab_size=2048))
        >>> out = model(torch.randint(0, 2048, (2, 16)))  # out.logits: (2, 16, 2048)
    """

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope", rope_cache(config), persistent=False)  # for apply_rope
        self.apply(self._init_weights)
        # GPT-2 style: shrink residual-branch outputs so the residual stream variance stays ~constant with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied output head counted once); without the token embedding when asked."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    def forward(
        self,
        idx: Tensor,
        *,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
    ) -> GPTOutput:
        """Run the decoder.

        Args:
            idx: token ids (B, T).
            position_ids: (B, T) RoPE positions; default ``cache.pos + arange(T)``.
            attn_mask: boolean (B, 1, T, S) mask, True where a query may attend a key (S = cached + T).
                ``None`` means plain causal attention over the cache and the new tokens.
            cache: KV cache to read and extend (incremental decoding).
            compute_logits: skip the output head when only hidden states are needed (reward/value heads).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            if start + T > self.config.block_size:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds the model context block_size={self.config.block_size}"
                )
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
        rot = self.rope[position_ids].unsqueeze(2)  # (B, T, 1, hs/2, 2)
        if attn_mask is None and cache is not None and start > 0 and T > 1:
            # new tokens see the whole cache plus a causal window over themselves
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.drop(self.embed_tokens(idx))  # (B, T, C)
        aux_total = x.new_zeros((), dtype=torch.float32)
        use_ckpt = self.config.gradient_checkpointing and self.training and cache is None
        for i, block in enumerate(self.layers):
            if use_ckpt:
                x, aux = checkpoint(block, x, rot, attn_mask, None, i, use_reentrant=False)
            else:
                x, aux = block(x, rot, attn_mask, cache, i)
            if aux is not None:
                aux_total = aux_total + aux
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        logits = self.lm_head(x) if compute_logits else None
        return GPTOutput(logits, aux_total, x)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens (default ``block_size``), on the
        model's device and dtype; pass it to :meth:`forward` to decode incrementally."""
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)


def padded_causal_mask(keep: Tensor, q_len: int) -> Tensor:
    """Mask (B, 1, q_len, S) for the last ``q_len`` queries over S keys, hiding keys where ``keep`` is False.

    ``keep`` is (B, S) (False at left padding). Each query always sees itself so fully padded rows stay
    finite instead of producing NaN in the softmax.
    """
    B, S = keep.shape
    causal = torch.ones(q_len, S, dtype=torch.bool, device=keep.device).tril(diagonal=S - q_len)
    mask = causal.unsqueeze(0) & keep[:, None, :]  # (B, q_len, S)
    diag = torch.zeros(q_len, S, dtype=torch.bool, device=keep.device)
    diag[torch.arange(q_len), torch.arange(S - q_len, S)] = True
    return (mask | diag).unsqueeze(1)


def segment_causal_mask(segment_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask (B, 1, T, T) for packed sequences: no attention across segments."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same).unsqueeze(1)
