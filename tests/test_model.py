"""Tests of the MiniGPT backbone: equivalence with Hugging Face Llama/Mixtral, KV cache, masks,
gradient checkpointing, the MoE load-balancing loss and config validation.

Everything runs in float32 on the CPU with small random configs and fixed seeds. The Hugging Face comparisons
need the optional ``transformers`` extra and are skipped without it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from minillm_lightning.model import MiniGPT, MiniGPTConfig, padded_causal_mask, segment_causal_mask
from minillm_lightning.model.gpt import apply_rope, rope_cache, rope_rows
from minillm_lightning.model.hf_convert import from_hf_state_dict, to_hf_config, to_hf_state_dict

VOCAB = 101
# float32 reference comparisons: different kernels/summation orders, so allow a few ulps of drift
TOL = dict(atol=2e-5, rtol=1e-4)


def make_config(**overrides: Any) -> MiniGPTConfig:
    """A small custom config: 2 layers, width 64, 4 query heads over 2 KV heads (GQA), non-default RoPE base."""
    base: dict[str, Any] = dict(
        vocab_size=VOCAB,
        block_size=64,
        n_layer=2,
        dim=64,
        n_head=4,
        n_kv_head=2,
        intermediate_size=96,
        rope_theta=500000.0,
        norm_eps=1e-5,
        dropout=0.0,
    )
    base.update(overrides)
    return MiniGPTConfig(**base)


def make_moe_config(**overrides: Any) -> MiniGPTConfig:
    """A small Mixtral-like config: 4 routed experts, top-2, no shared expert."""
    return make_config(**{"n_experts": 4, "top_k": 2, "n_shared_experts": 0, "aux_loss_coef": 0.1, **overrides})


def make_model(cfg: MiniGPTConfig, seed: int = 0) -> MiniGPT:
    """A MiniGPT in eval mode with weights that exercise every mapping.

    The default init leaves the RMSNorm weights at exactly 1 (so swapped norms would go unnoticed) and the router
    logits near 0 (so top-k choices are near ties that float noise could flip); both are randomised here.
    """
    torch.manual_seed(seed)
    model = MiniGPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def tokens(*shape: int, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=gen)


def hf_model(model: MiniGPT):
    """The Hugging Face twin of ``model`` (eager attention and eager expert loop), with the same weights."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    hf_cfg = to_hf_config(model.config)
    hf_cfg._attn_implementation = "eager"
    if model.config.is_moe:
        hf_cfg._experts_implementation = "eager"
    cls = MixtralForCausalLM if model.config.is_moe else LlamaForCausalLM
    hf = cls(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if model.config.tie_embeddings else [])
    return hf


# --------------------------------------------------------------------------------------------------------------
# 1-2. Equivalence with Hugging Face
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", [1, 2], ids=["mqa", "gqa"])
def test_dense_matches_hf_llama(tie: bool, n_kv_head: int) -> None:
    """Dense MiniGPT logits equal LlamaForCausalLM logits for the same weights (GQA, tied/untied, rope_theta=5e5)."""
    model = make_model(make_config(tie_embeddings=tie, n_kv_head=n_kv_head))
    hf = hf_model(model)
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    idx = tokens(2, 17)
    with torch.no_grad():
        ours = model(idx).logits
        ref = hf(idx).logits
    assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_dense_gradients_match_hf_llama(n_kv_head: int) -> None:
    """The backward pass too: every parameter's gradient of the same loss equals Hugging Face Llama's. This covers
    RMSNorm and the RoPE of q and k in the row order of `rope_rows` (MHA and GQA)."""
    model = make_model(make_config(n_kv_head=n_kv_head)).train()
    hf = hf_model(model).train()
    idx = tokens(3, 19)
    F.cross_entropy(model(idx).logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    F.cross_entropy(hf(idx).logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    # to_hf_state_dict holds our own parameter tensors under Hugging Face names: find each one's gradient by storage
    ours_by_storage = {p.data_ptr(): p for p in model.parameters()}
    hf_params = dict(hf.named_parameters())
    ours_named = to_hf_state_dict(model)
    assert set(ours_named) == set(hf_params) and len(ours_by_storage) == len(hf_params)
    for hf_name, ours in ours_named.items():
        assert hf_params[hf_name].grad is not None, hf_name
        grad = ours_by_storage[ours.data_ptr()].grad
        assert_close(grad, hf_params[hf_name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=hf_name: f"{n}: {m}")


def rotate_half_rope(x: Tensor, theta: float) -> Tensor:
    """Llama's RoPE as Hugging Face writes it, on heads in the weights' layout: ``x * cos + rotate_half(x) * sin``,
    x (B, T, H, hs) at positions 0..T-1; angles in float32 as Hugging Face computes them."""
    T, hs = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (T, 1, hs)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    return x * emb.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * emb.sin().to(x.dtype)


@pytest.mark.parametrize("path", ["complex", "real"])
def test_rope_in_pair_order_is_rotate_half(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`apply_rope` on a head's elements in `rope_rows` order equals Llama's rotate-half RoPE taken in that order,
    values and gradients in float64, on both paths: one complex multiply (eager CPU) and the real arithmetic that
    runs under torch.compile and on MPS."""
    if path == "real":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cfg = make_config(block_size=40)
    heads, hs = 3, cfg.head_dim
    order = rope_rows(heads, hs)[:hs]  # the first head's order; every head's is the same within the head
    assert sorted(order.tolist()) == list(range(hs)) and order[:4].tolist() == [0, hs // 2, 1, hs // 2 + 1]
    assert rope_rows(heads, hs)[hs:].tolist() == (order + hs).tolist() + (order + 2 * hs).tolist()
    x = torch.randn(2, 40, heads, hs, dtype=torch.float64, requires_grad=True)
    rot = rope_cache(cfg)[:, None]  # (T, 1, hs/2, 2)
    ours = apply_rope(x[..., order], rot)
    ref = rotate_half_rope(x, cfg.rope_theta)[..., order]
    assert ours.dtype == torch.float64
    assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(ours)
    assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0], atol=1e-6, rtol=1e-6)


def test_bfloat16_model_keeps_its_rotations() -> None:
    """`module.to(torch.bfloat16)` (Lightning's bf16-true) would drop the imaginary part of a complex buffer; the
    rotation table is real (cos, sin), so the sines survive and the logits stay near float32's."""
    model = make_model(make_config())
    idx = tokens(2, 17)
    with torch.no_grad():
        ref = model(idx).logits
        half = make_model(make_config()).to(torch.bfloat16)
        out = half(idx).logits.float()
    assert half.rope.dtype == torch.bfloat16 and half.rope[..., 1].abs().max() > 0.9
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_moe_matches_hf_mixtral(tie: bool) -> None:
    """MoE MiniGPT logits equal MixtralForCausalLM logits; the fused 3D expert tensors are mapped correctly."""
    model = make_moe_config(tie_embeddings=tie)
    model = make_model(model)
    hf = hf_model(model)
    # transformers 5.x fuses each layer's experts into gate_up_proj (E, 2I, C) = [gate; up] and down_proj (E, C, I)
    experts = hf.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 96, 64) and experts.down_proj.shape == (4, 64, 96)
    idx = tokens(2, 17)
    with torch.no_grad():
        ours = model(idx).logits
        ref = hf(idx).logits
    assert_close(ours, ref, **TOL)


def _routing_stats(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Per-layer Switch statistics from (N, E) router logits: f_e = top-k slots routed to e / N (sums to
    top_k, as in both implementations) and P_e = mean router probability of e."""
    probs = router_logits.float().softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    f = F.one_hot(chosen, probs.shape[-1]).float().sum((0, 1)) / probs.shape[0]
    return f, probs.mean(0)


@pytest.mark.parametrize("n_layer", [1, 3])
def test_moe_aux_loss_vs_hf(n_layer: int) -> None:
    """Our aux loss vs Mixtral's ``load_balancing_loss_func``: equal (times the coefficient) for one layer.

    Both use the Switch loss E * sum_e f_e * P_e per routing step, with the same f (top-k counts / tokens) and P.
    They differ in how layers are combined:

    * MiniGPT: coef * sum_l [E * sum_e f_le * P_le]  (per-layer losses, summed; Switch/GShard convention)
    * HF:             E * sum_e mean_l(f_le) * mean_l(P_le)  (statistics over all layers' tokens concatenated)

    HF's value is *not* the mean (or any fixed multiple) of the per-layer losses: it contains cross-layer products
    f_le * P_me. So for n_layer > 1 there is no constant factor between them; the test asserts both closed forms
    from the (identical) per-layer router logits, and equality coef * HF for a single layer.
    HF also returns the raw loss; ``router_aux_loss_coef`` is applied only when it is added to the LM loss.
    """
    cfg = make_moe_config(n_layer=n_layer)
    model = make_model(cfg)
    hf = hf_model(model)
    assert hf.config.router_aux_loss_coef == cfg.aux_loss_coef

    ours_logits: list[Tensor] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out: ours_logits.append(out.detach()))
        for layer in model.layers
    ]
    idx = tokens(2, 13)
    with torch.no_grad():
        ours = model(idx)
        ref = hf(idx, output_router_logits=True)
    for h in hooks:
        h.remove()

    # routing inputs are the same layer by layer
    assert len(ref.router_logits) == n_layer
    for ours_l, ref_l in zip(ours_logits, ref.router_logits):
        assert_close(ours_l, ref_l, **TOL)

    E = cfg.n_experts
    stats = [_routing_stats(r, cfg.top_k) for r in ref.router_logits]
    f = torch.stack([s[0] for s in stats])  # (L, E)
    P = torch.stack([s[1] for s in stats])  # (L, E)
    assert_close(ours.aux_loss, cfg.aux_loss_coef * E * (f * P).sum(), **TOL)
    assert_close(ref.aux_loss.float(), E * (f.mean(0) * P.mean(0)).sum(), **TOL)
    if n_layer == 1:
        assert_close(ours.aux_loss, cfg.aux_loss_coef * ref.aux_loss.float(), **TOL)
    else:
        # no definitional constant relates them (neither "sum" nor "mean over layers")
        assert not torch.allclose(ours.aux_loss, cfg.aux_loss_coef * n_layer * ref.aux_loss.float(), rtol=1e-3)
        assert not torch.allclose(ours.aux_loss, cfg.aux_loss_coef * ref.aux_loss.float(), rtol=1e-3)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hf_state_dict_round_trip(moe: bool) -> None:
    """``from_hf_state_dict`` inverts ``to_hf_state_dict``, also starting from the HF model's own state dict."""
    cfg = make_moe_config(tie_embeddings=False) if moe else make_config()
    model = make_model(cfg)
    hf = hf_model(model)
    restored = MiniGPT(cfg)
    restored.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_export_refuses_shared_experts() -> None:
    """Mixtral has no shared experts, so exporting such a model fails with a message naming the field."""
    with pytest.raises(ValueError, match="n_shared_experts"):
        to_hf_config(make_moe_config(n_shared_experts=1))


# --------------------------------------------------------------------------------------------------------------
# 3-5. KV cache and masks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_kv_cache_matches_full_forward(moe: bool) -> None:
    """Prefill + one token at a time, and prefill + a multi-token chunk, reproduce the full-sequence logits."""
    model = make_model(make_moe_config() if moe else make_config())
    idx = tokens(2, 14)
    with torch.no_grad():
        full = model(idx).logits

        # prefix of 6, then 8 single steps
        cache = model.new_cache(batch_size=2, max_len=16)
        steps = [model(idx[:, :6], cache=cache).logits]
        for t in range(6, 14):
            steps.append(model(idx[:, t : t + 1], cache=cache).logits)
        assert cache.pos == 14
        assert_close(torch.cat(steps, dim=1), full, **TOL)

        # prefix of 5, a chunk of 4 (causal within the chunk, full view of the cache), then the last 5 at once
        cache = model.new_cache(batch_size=2, max_len=14)
        chunks = [model(idx[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 9), (9, 14)]]
        assert_close(torch.cat(chunks, dim=1), full, **TOL)


def test_kv_cache_overflow_raises() -> None:
    """Writing past the cache length or past block_size fails loudly instead of silently wrapping."""
    model = make_model(make_config())
    cache = model.new_cache(batch_size=1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(tokens(1, 5), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model.new_cache(batch_size=1, max_len=model.config.block_size + 1)


def _left_pad(seqs: list[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad 1D sequences; return ids, keep mask (False at padding) and positions counted from the first real
    token (padding gets position 0, which is never attended by real tokens)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    keep = torch.zeros(len(seqs), T, dtype=torch.bool)
    for row, s in enumerate(seqs):
        idx[row, T - len(s) :] = s
        keep[row, T - len(s) :] = True
    position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
    return idx, keep, position_ids


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_left_padding_matches_unpadded(moe: bool) -> None:
    """Left-padded batch with ``padded_causal_mask`` and shifted positions gives the unpadded logits on real tokens,
    for the prompt and for cached decoding steps after it."""
    model = make_model(make_moe_config() if moe else make_config())
    seqs = [tokens(11, seed=2), tokens(6, seed=3), tokens(1, seed=4)]
    idx, keep, pos = _left_pad(seqs)
    T = idx.shape[1]
    with torch.no_grad():
        batch = model(idx, position_ids=pos, attn_mask=padded_causal_mask(keep, T)).logits
        for row, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert_close(batch[row, T - len(s) :], alone, **TOL)
            assert torch.isfinite(batch[row]).all()  # padding rows stay finite (they see themselves)

        # same through the KV cache: prefill the padded prompt, then decode 3 tokens per row
        new = tokens(len(seqs), 3, seed=5)
        cache = model.new_cache(batch_size=len(seqs), max_len=T + 3)
        model(idx, position_ids=pos, attn_mask=padded_causal_mask(keep, T), cache=cache)
        for t in range(3):
            keep = torch.cat([keep, torch.ones(len(seqs), 1, dtype=torch.bool)], dim=1)
            step_pos = pos[:, -1:] + 1 + t
            step = model(new[:, t : t + 1], position_ids=step_pos, attn_mask=padded_causal_mask(keep, 1), cache=cache)
            for row, s in enumerate(seqs):
                alone = model(torch.cat([s, new[row, : t + 1]])[None]).logits[0, -1]
                assert_close(step.logits[row, 0], alone, **TOL)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_segment_mask_matches_separate_sequences(moe: bool) -> None:
    """Packed sequences with ``segment_causal_mask`` and per-segment positions equal each sequence run alone."""
    model = make_model(make_moe_config() if moe else make_config())
    a, b, c = tokens(5, seed=6), tokens(7, seed=7), tokens(4, seed=8)
    packed = torch.stack([torch.cat([a, b]), torch.cat([b, c, tokens(1, seed=9)])])  # (2, 12), 2 and 3 segments
    segment_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 7 + [1] * 4 + [2]])
    position_ids = torch.stack(
        [torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(7), torch.arange(4), torch.arange(1)])]
    )
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, attn_mask=segment_causal_mask(segment_ids)).logits
        assert_close(out[0, :5], model(a[None]).logits[0], **TOL)
        assert_close(out[0, 5:], model(b[None]).logits[0], **TOL)
        assert_close(out[1, :7], model(b[None]).logits[0], **TOL)
        assert_close(out[1, 7:11], model(c[None]).logits[0], **TOL)


# --------------------------------------------------------------------------------------------------------------
# 6. Gradients
# --------------------------------------------------------------------------------------------------------------


def _loss_and_grads(model: MiniGPT, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(idx[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), idx[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gradient_checkpointing_same_loss_and_grads(moe: bool) -> None:
    """Training with gradient checkpointing gives the same loss and gradients, and really recomputes blocks."""
    cfg = make_moe_config() if moe else make_config()
    plain = make_model(cfg).train()
    ckpt = MiniGPT(MiniGPTConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    for key, m in (("plain", plain), ("ckpt", ckpt)):  # count executions of block 0 (hooks skip the recompute)
        block_forward = m.layers[0].forward

        def counting_forward(*args: Any, _key: str = key, _fwd: Any = block_forward, **kwargs: Any) -> Any:
            calls[_key] += 1
            return _fwd(*args, **kwargs)

        m.layers[0].forward = counting_forward

    idx = tokens(2, 12)
    loss_a, grads_a = _loss_and_grads(plain, idx)
    loss_b, grads_b = _loss_and_grads(ckpt, idx)
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block ran again in the backward pass
    assert_close(loss_b, loss_a, **TOL)
    assert grads_a.keys() == grads_b.keys() == {n for n, _ in plain.named_parameters()}
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_moe_aux_loss_reaches_router() -> None:
    """The load-balancing loss alone produces a nonzero, finite gradient on every layer's router; dense models
    report an aux loss of exactly zero."""
    model = make_model(make_moe_config()).train()
    out = model(tokens(2, 12))
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    for i, layer in enumerate(model.layers):
        grad = layer.mlp.gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all(), f"layer {i}"
        assert grad.abs().sum() > 0, f"layer {i}: router gets no gradient from the aux loss"

    dense = make_model(make_config())
    assert dense(tokens(1, 5)).aux_loss.item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# 7. Config validation and sizes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(dim=100, n_head=3), "n_head"),
        (dict(dim=64, n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(dim=12, n_head=4, n_kv_head=4), "n_head"),  # head size 3 is odd: RoPE needs pairs
        (dict(n_experts=2, top_k=3), "top_k"),
        (dict(n_experts=4, top_k=0), "top_k"),
        (dict(n_experts=-1), "n_experts"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-8), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(dim=0), "dim"),
        (dict(dim=-64), "dim"),
        (dict(dim=64.0), "dim"),
        (dict(n_head=0), "n_head"),
        (dict(n_kv_head=-2), "n_kv_head"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(size="huge"), "size"),
    ],
)
def test_config_validation(overrides: dict[str, Any], field: str) -> None:
    """Inconsistent or non-positive architecture values raise ValueError naming the offending field."""
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MiniGPTConfig(**{"vocab_size": 256, **overrides})


def test_config_unknown_field_and_presets() -> None:
    """``from_dict`` rejects unknown keys; ``None`` fields are filled from the preset and survive a round trip."""
    with pytest.raises(ValueError, match="n_layers"):
        MiniGPTConfig.from_dict({"n_layers": 2})
    cfg = MiniGPTConfig.from_name("small", n_layer=3)
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.n_kv_head, cfg.block_size) == (3, 512, 8, 2, 512)
    assert cfg.intermediate_size == 1408 and cfg.intermediate_size % 64 == 0
    assert MiniGPTConfig.from_dict(cfg.to_dict()) == cfg


def expected_num_params(c: MiniGPTConfig) -> int:
    """Parameter count from the architecture formula, independent of the model code."""
    hd = c.dim // c.n_head
    hidden = c.intermediate_size
    attn = c.dim * c.n_head * hd * 2 + c.dim * c.n_kv_head * hd * 2  # q, o + k, v
    swiglu = 3 * c.dim * hidden
    mlp = c.dim * c.n_experts + (c.n_experts + c.n_shared_experts) * swiglu if c.n_experts else swiglu
    per_layer = attn + mlp + 2 * c.dim  # + two RMSNorm weights
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return embeddings + c.n_layer * per_layer + c.dim  # + final norm


@pytest.mark.parametrize(
    ("cfg_kwargs", "documented"),
    [
        (dict(size="tiny"), None),
        (dict(size="small"), 26e6),
        (dict(size="medium"), 100e6),
        (dict(size="tiny", tie_embeddings=False), None),
        (dict(size="tiny", n_experts=4, top_k=2, n_shared_experts=1), None),
    ],
    ids=["tiny", "small", "medium", "tiny-untied", "tiny-moe"],
)
def test_parameter_counts(cfg_kwargs: dict[str, Any], documented: float | None) -> None:
    """Named sizes have the parameter count of the formula, and roughly the documented size (~26M, ~100M)."""
    cfg = MiniGPTConfig(**cfg_kwargs)
    assert cfg.intermediate_size == 64 * math.ceil(8 * cfg.dim / 3 / 64)  # documented SwiGLU width rule
    with torch.device("meta"):  # no memory, no init cost
        model = MiniGPT(cfg)
    expected = expected_num_params(cfg)
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - cfg.vocab_size * cfg.dim
    if documented is not None:
        assert abs(expected - documented) / documented < 0.1, f"{cfg.size}: {expected / 1e6:.1f}M"
