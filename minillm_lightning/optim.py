"""Muon for the transformer's weight matrices with AdamW for everything else, as one ``torch.optim.Optimizer``.

Muon (Jordan et al., 2024; used by modded-nanogpt and Moonlight) replaces each hidden weight matrix's momentum
update by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations. Embeddings, the output
head, norm weights and heads with a single output row stay on AdamW. One optimizer object (not two) keeps
Lightning's automatic optimization, gradient clipping, accumulation, LR schedulers and checkpoints unchanged;
each param group carries ``use_muon`` to say which update it gets.

Matrices of the same shape (up to a transpose) are orthogonalised together in one batched matmul chain: on a small
model this halves the optimizer's cost compared with one matrix at a time.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

# quintic Newton-Schulz coefficients tuned for fast convergence of the singular values towards ~1 (Keller Jordan)
NS_COEFFS = (3.4445, -4.7750, 2.0315)

NSDtype = Literal["auto", "float32", "bfloat16"]
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the choices besides "auto"


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16: recent Xeons); asked once;
    elsewhere (AVX2 hosts such as AMD EPYC Zen 3) a bfloat16 matmul is emulated and slower than float32."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and bool(check()) for check in checks)


def resolve_ns_dtype(choice: NSDtype, device: torch.device) -> torch.dtype:
    """The dtype Newton-Schulz runs in. ``auto``: bfloat16 where matmuls are faster in it (CUDA, as in Keller
    Jordan's Muon; CPUs with :func:`cpu_has_bf16_matmul`), float32 elsewhere."""
    if choice == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul())
        return torch.bfloat16 if fast else torch.float32
    return NS_DTYPES[choice]


def _fma(x: Tensor):
    """``beta * input + alpha * (m1 @ m2)`` in one call (fewer passes over memory), batched or not."""
    return torch.baddbmm if x.dim() == 3 else torch.addmm


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximate ``U @ V^T`` of the SVD ``g = U S V^T`` for a (..., m, n) batch of matrices; the singular values
    of the result lie roughly in [0.7, 1.2] (enough for Muon; exactness is not the goal).

    Each iteration is ``x <- a x + (b A + c A^2) x`` with ``A = x x^T`` (x oriented wide, m <= n), in ``dtype``
    (float32 or bfloat16; the normalisation is in float32). In float32, matrices at least 1.5x wider than tall
    evaluate the same polynomial through the small Gram matrix instead (:func:`_gram_newton_schulz`), which needs
    ~1/3 fewer FLOPs at aspect 3 (the SwiGLU projections); in bfloat16 that path loses nearly rank-deficient
    updates (``tests/test_optim.py``), so bfloat16 always takes the plain iteration."""
    a, b, c = NS_COEFFS
    x = g.float()
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)  # spectral norm <= Frobenius norm <= 1
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    if dtype == torch.float32 and 2 * x.size(-1) >= 3 * x.size(-2):
        x = _gram_newton_schulz(x, steps)
    else:
        fma = _fma(x)
        for _ in range(steps):
            A = x @ x.mT
            B = fma(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
            x = fma(x, B, x, beta=a)  # a*x + B@x
    return (x if wide else x.mT).to(g.dtype)


def _gram_newton_schulz(x: Tensor, steps: int) -> Tensor:
    """The Newton-Schulz iterations of :func:`orthogonalize` on a wide ``x`` (m x n, n >= 1.5 m), carried on m x m
    matrices: every iterate is ``x_k = M_k x`` with ``M_k`` a polynomial in ``G = x x^T``, so ``M_k`` and ``G``
    commute, ``x_k x_k^T = M_k G M_k`` and ``M_{k+1} = a M_k + (b A_k + c A_k^2) M_k``. The n-wide products are
    paid twice (G, and the final ``M x``) instead of twice per iteration; in float32 the result stays as close to
    a float64 run of the plain iteration as the plain float32 iteration does (``tests/test_optim.py``)."""
    a, b, c = NS_COEFFS
    fma = _fma(x)
    G = x @ x.mT
    M = fma(G, G, G, beta=b, alpha=c)  # first iteration from M_0 = I: A_0 = G
    M.diagonal(dim1=-2, dim2=-1).add_(a)
    for _ in range(steps - 1):
        A = (M @ G) @ M
        B = fma(A, A, A, beta=b, alpha=c)
        M = fma(M, B, M, beta=a)
    return M @ x


def grad_norms(params: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """(per-parameter L2 norms (n,) in float32, their global L2 norm) of the gradients of ``params``.

    The one gradient-norm computation of the package (stage logging, PPO, GradientHealthMonitor): one fused
    ``torch._foreach_norm`` on the device, as ``clip_grad_norm_`` computes it, and no host sync. Lightning's
    ``utilities.grad_norm`` is not used because it copies every parameter's norm to the host (one device sync
    per parameter) and keeps no per-parameter tensor to group by layer.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        zero = torch.zeros(())
        return zero.new_zeros(0), zero
    per_param = torch.stack(torch._foreach_norm(grads)).float()
    return per_param, torch.linalg.vector_norm(per_param)


def muon_param_groups(
    module: nn.Module, *, lr: float, muon_lr: float, weight_decay: float, muon_prefix: str = "layers."
) -> list[dict]:
    """Split a MiniGPT(-holding) module's trainable parameters into Muon and AdamW groups.

    Muon: the 2-D weights of the transformer blocks (attention and MLP projections) found under ``muon_prefix``,
    except MoE routers. AdamW: embeddings, the output head, norm weights (no decay), routers, scalar heads.
    """
    muon, decay, no_decay = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        in_blocks = f".{muon_prefix}" in f".{name}"
        if p.dim() == 2 and in_blocks and min(p.shape) > 1 and not name.endswith("mlp.gate.weight"):
            muon.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": muon, "lr": muon_lr, "weight_decay": 0.0, "use_muon": True},
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "use_muon": False},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "use_muon": False},
    ]
    return [g for g in groups if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True``, AdamW (decoupled weight decay) on the others.

    Args:
        params: param groups, each with ``use_muon`` (default False); see :func:`muon_param_groups`.
        lr: default learning rate (per-group ``lr`` wins).
        betas, eps, weight_decay: AdamW settings; ``weight_decay`` also decays Muon matrices (``p *= 1 - lr*wd``).
        momentum: Muon momentum (Nesterov).
        ns_steps: Newton-Schulz iterations.
        ns_dtype: dtype of the Newton-Schulz iterations (see :func:`resolve_ns_dtype`; ``auto``: bfloat16 on CUDA and on
            CPUs with bfloat16 matmul hardware, float32 elsewhere).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: NSDtype = "auto",
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"MuonAdamW: need lr > 0, 0 <= momentum < 1, ns_steps >= 1; got {lr, momentum, ns_steps}")
        if ns_dtype != "auto" and ns_dtype not in NS_DTYPES:
            raise ValueError(f"MuonAdamW: ns_dtype must be 'auto', 'float32' or 'bfloat16', got {ns_dtype!r}")
        muon = dict(momentum=momentum, ns_steps=ns_steps, ns_dtype=ns_dtype)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, use_muon=False, **muon)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("MuonAdamW: Muon groups may only hold 2-D weight matrices")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["use_muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[Tensor]) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        # a tall matrix is orthogonalised as its wide transpose: stack both orientations of one shape together
        by_shape: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
        for p in params:
            by_shape[(min(p.shape), max(p.shape))].append(p)
        for ps in by_shape.values():
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            grads = [p.grad for p in ps]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=mom)  # Nesterov: g + mom * buf
            tall = [p.size(0) > p.size(1) for p in ps]
            stacked = torch.stack([u.mT if t else u for u, t in zip(updates, tall)])
            dtype = resolve_ns_dtype(group.get("ns_dtype", "auto"), stacked.device)
            ortho = orthogonalize(stacked, group["ns_steps"], dtype=dtype)
            updates = [o.mT if t else o for o, t in zip(ortho.unbind(0), tall)]
            # keep the update's RMS independent of the aspect: sqrt(rows / cols) for tall matrices
            torch._foreach_mul_(updates, [-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))) for p in ps])
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, updates)

    def _adamw(self, group: dict, params: list[Tensor]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            exp_avg.append(st["exp_avg"])
            exp_avg_sq.append(st["exp_avg_sq"])
            steps.append(st["step"])
        grads = [p.grad for p in params]
        torch._foreach_lerp_(exp_avg, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sq, b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        # step counts live on the CPU (no device sync); params that missed steps keep their own bias correction
        ts = [float(s) for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1 - b2**t) for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-lr / (1 - b1**t) for t in ts])
