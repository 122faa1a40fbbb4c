"""Map MiniGPT configs and weights to and from Hugging Face ``LlamaForCausalLM`` / ``MixtralForCausalLM``.

Dense MiniGPT models are Llama models; MoE models without shared experts are Mixtral models. Parameter names
already follow Hugging Face, so the mapping is mostly a ``model.`` prefix. The exception is the Mixtral expert
weights: transformers 5.x stores the experts of a layer as two fused 3D tensors,

* ``model.layers.N.mlp.experts.gate_up_proj`` of shape ``(E, 2 * intermediate, dim)``: ``[gate; up]`` stacked
  along dim 1 (the forward does ``linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` -> ``gate, up``),
* ``model.layers.N.mlp.experts.down_proj`` of shape ``(E, dim, intermediate)``,

and the router as ``model.layers.N.mlp.gate.weight`` ``(E, dim)``, where MiniGPT keeps one ``nn.Linear`` per expert
(``layers.N.mlp.experts.E.{gate,up,down}_proj.weight``).

``transformers`` is an optional extra (``pip install minillm-lightning[hf]``): it is imported inside the functions
that need it, never at module import.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minillm_lightning.model.config import MiniGPTConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from minillm_lightning.model.gpt import MiniGPT

__all__ = ["from_hf_state_dict", "to_hf_config", "to_hf_state_dict"]

_PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _check_exportable(cfg: MiniGPTConfig) -> None:
    if cfg.n_shared_experts:
        raise ValueError(
            f"MiniGPTConfig.n_shared_experts={cfg.n_shared_experts}: Mixtral has no shared experts, "
            "so this model has no Hugging Face equivalent; train with n_shared_experts=0 to export"
        )


def to_hf_config(cfg: MiniGPTConfig) -> PretrainedConfig:
    """Return the ``LlamaConfig`` (dense) or ``MixtralConfig`` (MoE) describing the same architecture.

    Raises ``ValueError`` for MoE configs with shared experts, which Mixtral cannot express.
    """
    _check_exportable(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=cfg.dropout,
    )
    if cfg.is_moe:
        from transformers import MixtralConfig

        return MixtralConfig(
            **common,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    from transformers import LlamaConfig

    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def to_hf_state_dict(model: MiniGPT) -> dict[str, Tensor]:
    """Hugging Face state dict (``model.``-prefixed, fused Mixtral experts) for ``model``'s weights.

    With tied embeddings ``lm_head.weight`` is left out, as in Hugging Face checkpoints (the HF model re-ties it).
    Tensors are detached; expert tensors are new (stacked) tensors, the others share storage with ``model``.
    """
    cfg = model.config
    _check_exportable(cfg)
    out: dict[str, Tensor] = {}
    experts: dict[int, dict[str, list[Tensor | None]]] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = tensor
            continue
        m = _EXPERT_KEY.match(name)
        if m:
            layer, expert, proj = int(m[1]), int(m[2]), m[3]
            slots = experts.setdefault(layer, {p: [None] * cfg.n_experts for p in _PROJS})
            slots[proj][expert] = tensor
            continue
        out[f"model.{name}"] = tensor
    for layer, slots in experts.items():
        gate, up, down = (torch.stack(slots[p]) for p in _PROJS)  # type: ignore[arg-type]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2I, C)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = down  # (E, C, I)
    return out


def from_hf_state_dict(state_dict: dict[str, Tensor], cfg: MiniGPTConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_hf_state_dict`: a MiniGPT state dict for ``MiniGPT(cfg).load_state_dict``.

    Accepts the ``state_dict()`` of ``LlamaForCausalLM``/``MixtralForCausalLM`` (or a loaded checkpoint). A missing
    ``lm_head.weight`` is filled from the embedding when ``cfg.tie_embeddings`` is set.
    """
    _check_exportable(cfg)
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # non-persistent buffer in old checkpoints
            continue
        key = name.removeprefix("model.")
        m = _FUSED_KEY.match(key)
        if m:
            layer, kind = int(m[1]), m[2]
            if kind == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"layers.{layer}.mlp.experts.{e}.gate_proj.weight"] = gate[e]
                    out[f"layers.{layer}.mlp.experts.{e}.up_proj.weight"] = up[e]
            else:
                for e in range(tensor.shape[0]):
                    out[f"layers.{layer}.mlp.experts.{e}.down_proj.weight"] = tensor[e]
            continue
        out[key] = tensor
    if "lm_head.weight" not in out:
        if not cfg.tie_embeddings:
            raise ValueError("state dict has no lm_head.weight but MiniGPTConfig.tie_embeddings is False")
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
