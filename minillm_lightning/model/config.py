"""MiniGPT architecture configuration with named sizes.

Every architecture field may be left as ``None``: it is then filled from the named ``size`` preset
(``tiny``/``small``/``medium``) or, for ``size="custom"``, from the tiny preset. After construction all
fields are concrete, derived fields are computed and the whole config is validated, so a bad value
fails here with a clear message rather than as a shape error deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from minillm_lightning.errors import ConfigError

SizeName = Literal["tiny", "small", "medium", "custom"]

# Presets. tiny: a laptop CPU trains it in minutes. small: ~26M parameters, one consumer GPU
# (the size minimind ships). medium: ~100M parameters, one data-centre GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, dim=128, n_head=4, n_kv_head=2, block_size=256),
    "small": dict(n_layer=8, dim=512, n_head=8, n_kv_head=2, block_size=512),
    "medium": dict(n_layer=16, dim=768, n_head=12, n_kv_head=4, block_size=1024),
}
PRESETS["custom"] = PRESETS["tiny"]

_DEFAULTS: dict[str, Any] = dict(
    vocab_size=4096,
    intermediate_size=None,  # derived from dim below
    rope_theta=10000.0,
    norm_eps=1e-5,
    dropout=0.0,
    tie_embeddings=True,
    n_experts=0,
    top_k=2,
    n_shared_experts=0,
    aux_loss_coef=0.01,
    gradient_checkpointing=False,
    init_std=0.02,
)


@dataclass
class MiniGPTConfig:
    """Architecture of a MiniGPT decoder. ``None`` means "take the value of the size preset"."""

    size: SizeName = "custom"
    """Named size: tiny (4x128), small (8x512, ~26M), medium (16x768, ~100M) or custom (tiny defaults)."""
    vocab_size: int | None = None
    """Vocabulary size; normally linked from the data module's tokenizer."""
    block_size: int | None = None
    """Maximum context length in tokens (RoPE positions)."""
    n_layer: int | None = None
    """Number of transformer blocks."""
    dim: int | None = None
    """Hidden width (embedding size)."""
    n_head: int | None = None
    """Number of query heads; must divide ``dim``."""
    n_kv_head: int | None = None
    """Number of key/value heads for grouped-query attention; must divide ``n_head`` (= n_head: plain MHA)."""
    intermediate_size: int | None = None
    """SwiGLU hidden width; default 8/3*dim rounded up to a multiple of 64."""
    rope_theta: float | None = None
    """RoPE base frequency (10000 as in Llama 2; larger values stretch the usable context)."""
    norm_eps: float | None = None
    """RMSNorm epsilon."""
    dropout: float | None = None
    """Dropout on attention weights and residual branches (0 for pretraining at this scale)."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the output head (saves vocab*dim parameters)."""
    n_experts: int | None = None
    """Mixture-of-Experts: number of routed experts per block; 0 means a dense SwiGLU MLP."""
    top_k: int | None = None
    """Mixture-of-Experts: experts chosen per token."""
    n_shared_experts: int | None = None
    """Mixture-of-Experts: always-on shared experts added to the routed output (0 = none, as in Mixtral)."""
    aux_loss_coef: float | None = None
    """Weight of the MoE load-balancing loss added to the training loss."""
    gradient_checkpointing: bool | None = None
    """Recompute block activations in the backward pass: less memory, about 30% more compute."""
    init_std: float | None = None
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ConfigError(f"MiniGPTConfig.size={self.size!r} is not one of {sorted(PRESETS)}")
        preset = {**_DEFAULTS, **PRESETS[self.size]}
        for f in fields(self):
            if f.name != "size" and getattr(self, f.name) is None and preset.get(f.name) is not None:
                setattr(self, f.name, preset[f.name])
        if self.intermediate_size is None:
            hidden = int(8 * self.dim / 3)
            self.intermediate_size = 64 * ((hidden + 63) // 64)
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` (a ValueError) naming the field and the fix when the architecture is inconsistent."""
        positive = ["vocab_size", "block_size", "n_layer", "dim", "n_head", "n_kv_head", "intermediate_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MiniGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_head:
            raise ConfigError(
                f"MiniGPTConfig: n_head={self.n_head} does not divide dim={self.dim}; "
                f"choose n_head among {[h for h in range(1, self.dim + 1) if self.dim % h == 0 and h <= 64]}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"MiniGPTConfig: head size dim/n_head={self.head_dim} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"MiniGPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (grouped-query attention)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MiniGPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("MiniGPTConfig.rope_theta and norm_eps must be positive")
        if self.n_experts < 0 or self.n_shared_experts < 0:
            raise ConfigError("MiniGPTConfig.n_experts and n_shared_experts must be >= 0")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"MiniGPTConfig.top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")

    def check_fits(self, data) -> None:
        """Refuse a data module whose rows are longer than the context (its ``seq_len`` or ``max_length``)."""
        name = "seq_len" if getattr(data, "seq_len", None) else "max_length"
        length = getattr(data, name, None)
        if length is not None and length > self.block_size:
            raise ConfigError(
                f"data sequence length {length} ({type(data).__name__}.{name}) exceeds the model context "
                f"block_size={self.block_size}; lower {name} to at most {self.block_size} or raise the model's "
                f"arch.block_size"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniGPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"MiniGPTConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: SizeName, **overrides: Any) -> MiniGPTConfig:
        return cls(size=name, **overrides)
