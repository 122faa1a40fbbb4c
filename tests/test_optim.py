"""MuonAdamW: Newton-Schulz against the SVD, the AdamW half against torch.optim.AdamW, the Muon half against a
per-matrix re-implementation, the param split, and training under Lightning."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from torch import nn

from minillm_lightning import MiniGPTConfig, PretrainModule, optim
from minillm_lightning.errors import ConfigError
from minillm_lightning.model import MiniGPT
from minillm_lightning.optim import MuonAdamW, muon_param_groups, orthogonalize, resolve_ns_dtype


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_orthogonalize_approximates_the_polar_factor(shape) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 0.5, shape[1]))  # condition ~30
    o = orthogonalize(g, steps=5)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, s  # singular values pushed towards 1 (not exactly: quintic NS)
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.95, cos
    # a batch is orthogonalised matrix by matrix
    batch = torch.stack([g, 2 * g.flip(0)])
    ob = orthogonalize(batch)
    torch.testing.assert_close(ob[0], o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ob[1], orthogonalize(2 * g.flip(0)), rtol=1e-4, atol=1e-5)


def _plain_newton_schulz_f64(g: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / (g.double().norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(6, 128, 384), (4, 384, 128), (3, 64, 96), (3, 96, 80)])
@pytest.mark.parametrize("steps", [1, 5])
def test_orthogonalize_in_float32_stays_near_the_plain_iteration_in_float64(shape, steps) -> None:
    """Aspect >= 1.5 takes the Gram-matrix path (same polynomial, fewer FLOPs); it must be as accurate as the plain
    float32 iteration, including on a nearly rank-deficient update."""
    torch.manual_seed(0)
    full = torch.randn(*shape)
    low_rank = torch.randn(shape[0], shape[1], 3) @ torch.randn(shape[0], 3, shape[2]) + 1e-3 * full
    for g in (full, low_rank):
        ref = _plain_newton_schulz_f64(g, steps)
        err = (orthogonalize(g, steps).double() - ref).abs().max()
        assert err < 2e-5, err
        assert orthogonalize(g, steps).dtype == torch.float32


@pytest.mark.parametrize("shape", [(16, 64, 64), (6, 64, 192)])
def test_orthogonalize_in_bfloat16_takes_the_plain_iteration_and_stays_near_float64(shape) -> None:
    """bfloat16 (Muon's dtype on a GPU): near the float64 iteration on a full-rank update, and bounded on a nearly
    rank-deficient one, where the Gram path's bfloat16 error grows to ~100 (so bfloat16 must not take it)."""
    torch.manual_seed(0)
    full = torch.randn(*shape)
    o = orthogonalize(full, 5, dtype=torch.bfloat16)
    assert o.dtype == torch.float32
    ref = _plain_newton_schulz_f64(full, 5)
    cos = (o.double() * ref).sum(dim=(-2, -1)) / (o.double().norm(dim=(-2, -1)) * ref.norm(dim=(-2, -1)))
    assert cos.min() > 0.999, cos
    low_rank = torch.randn(shape[0], shape[1], 3) @ torch.randn(shape[0], 3, shape[2]) + 1e-3 * full
    s = torch.linalg.svdvals(orthogonalize(low_rank, 5, dtype=torch.bfloat16))
    assert s.max() < 1.5, s.max()
    x = low_rank / low_rank.norm(dim=(-2, -1), keepdim=True)
    if shape[2] >= 1.5 * shape[1]:  # the reason: the Gram path on the same input in bfloat16
        assert torch.linalg.svdvals(optim._gram_newton_schulz(x.bfloat16(), 5).float()).max() > 10


def test_ns_dtype_auto_is_bfloat16_on_cuda_and_on_cpus_with_bfloat16_matmuls(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(optim, "cpu_has_bf16_matmul", lambda: False)  # an AVX2 host (AMD EPYC Zen 3)
    assert resolve_ns_dtype("auto", cpu) == torch.float32
    assert resolve_ns_dtype("auto", cuda) == torch.bfloat16
    assert resolve_ns_dtype("auto", torch.device("mps")) == torch.float32
    assert resolve_ns_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(optim, "cpu_has_bf16_matmul", lambda: True)  # AMX / AVX-512 BF16 Xeon
    assert resolve_ns_dtype("auto", cpu) == torch.bfloat16
    assert resolve_ns_dtype("float32", cpu) == torch.float32
    seen: list[torch.dtype] = []
    real = optim.orthogonalize
    monkeypatch.setattr(
        optim, "orthogonalize", lambda g, steps, dtype: seen.append(dtype) or real(g, steps, dtype=dtype)
    )
    p = nn.Parameter(torch.randn(8, 8))
    for choice, expected in (("auto", torch.bfloat16), ("float32", torch.float32)):
        p.grad = torch.randn(8, 8)
        MuonAdamW([{"params": [p], "use_muon": True}], ns_dtype=choice).step()
        assert seen[-1] == expected
    with pytest.raises(ValueError, match="ns_dtype"):
        MuonAdamW([p], ns_dtype="float16")


def _adam_params(seed: int) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]


def test_adamw_groups_match_torch_adamw() -> None:
    ours, ref = _adam_params(0), _adam_params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    opt = MuonAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}], **kw)
    ref_opt = torch.optim.AdamW(
        [{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}], **kw
    )
    for step in range(6):
        torch.manual_seed(100 + step)
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_muon_step_matches_a_per_matrix_reimplementation() -> None:
    """Nesterov momentum, NS orthogonalisation, sqrt(rows/cols) scale for tall matrices, decoupled decay;
    four matrices of three shapes (the two squares are batched together, and so are the tall one and the wide one
    of the same shape, which also take the Gram path at aspect 3)."""
    torch.manual_seed(0)
    shapes = [(8, 8), (12, 4), (8, 8), (4, 12)]
    ours = [nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    lr, mom, wd = 0.05, 0.9, 0.1
    opt = MuonAdamW([{"params": ours, "use_muon": True, "weight_decay": wd}], lr=lr, momentum=mom, ns_dtype="float32")
    bufs = [torch.zeros_like(p) for p in ref]
    a, b, c = 3.4445, -4.7750, 2.0315
    for _step in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(ref, grads)):
            bufs[i] = mom * bufs[i] + g
            x = g + mom * bufs[i]
            x = x / x.norm()
            tall = x.shape[0] > x.shape[1]
            x = x.T if tall else x
            for _ in range(5):
                A = x @ x.T
                x = a * x + (b * A + c * A @ A) @ x
            x = x.T if tall else x
            ref[i] = w * (1 - lr * wd) - lr * math.sqrt(max(1, w.shape[0] / w.shape[1])) * x
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-5)


def test_param_split_keeps_embeddings_head_norms_and_routers_on_adamw() -> None:
    model = MiniGPT(MiniGPTConfig(**{**MICRO_ARCH, "n_experts": 2, "top_k": 1, "tie_embeddings": False}))
    groups = muon_param_groups(model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon and all(n.startswith("layers.") and "norm" not in n for n in muon)
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adam
    assert not any(n.endswith("mlp.gate.weight") for n in muon)  # MoE router
    assert any("experts" in n and n.endswith("down_proj.weight") for n in muon)
    assert muon | adam == set(names.values()) and not muon & adam
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])


def test_muon_trains_under_lightning_and_refuses_sharded_strategies(tmp_path, pretrain_dm_factory) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    dm = pretrain_dm_factory()
    model = PretrainModule(
        arch=MiniGPTConfig(**MICRO_ARCH),
        vocab_size=dm.vocab_size,
        optimizer="muon",
        learning_rate=3e-3,
        muon_ns_steps=3,
        muon_ns_dtype="bfloat16",
    )
    losses: list[float] = []

    class Rec(__import__("lightning").pytorch.callbacks.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = micro_trainer(tmp_path, max_steps=40, callbacks=[Rec()])
    trainer.fit(model, datamodule=dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, MuonAdamW) and any(g["use_muon"] for g in opt.param_groups)
    assert {g["ns_steps"] for g in opt.param_groups} == {3}  # model.init_args.muon_ns_steps reaches the optimizer
    assert {g["ns_dtype"] for g in opt.param_groups} == {"bfloat16"}  # and so does muon_ns_dtype
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    model.trainer = SimpleNamespace(strategy=FSDPStrategy(), max_steps=10, precision="32-true")
    with pytest.raises(ConfigError, match="model.optimizer=adamw"):
        model.configure_optimizers()
    with pytest.raises(ValueError, match="optimizer must be"):
        PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, optimizer="sgd")
    with pytest.raises(ValueError, match="muon_ns_steps must be >= 1"):
        PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, muon_ns_steps=0)
    with pytest.raises(ValueError, match="muon_ns_dtype must be"):
        PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, muon_ns_dtype="fp8")


def test_stage_adamw_is_fused_on_a_cpu_and_updates_as_the_unfused_one() -> None:
    """On a CPU in 32-true the stage's AdamW is PyTorch's fused one (one kernel per group); its updates equal the
    for-each implementation's, taken as the reference; a clipped bf16-mixed run keeps the unfused one."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=40, weight_decay=0.1)
    module.trainer = SimpleNamespace(max_steps=10, precision="32-true", gradient_clip_val=1.0)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    ref_model = MiniGPT(module.arch)
    ref_model.load_state_dict(module.model.state_dict())
    index = {id(p): i for i, p in enumerate(module.model.parameters())}
    ref_params = list(ref_model.parameters())
    ref = torch.optim.AdamW(
        [
            {
                "params": [ref_params[index[id(p)]] for p in g["params"]],
                "weight_decay": g["weight_decay"],
                "lr": g["lr"],
            }
            for g in opt.param_groups
        ],
        betas=opt.defaults["betas"],
        foreach=True,
    )
    start = [p.detach().clone() for p in ref_params]
    x = torch.randint(0, 40, (2, 16))
    for _ in range(3):
        for m, o in ((module.model, opt), (ref_model, ref)):
            m(x).logits.square().mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, p), q, p0 in zip(module.model.named_parameters(), ref_params, start):
        assert not torch.equal(p, p0), name  # every parameter was updated
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    module.trainer = SimpleNamespace(max_steps=10, precision="bf16-mixed", gradient_clip_val=1.0)
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]


def record_compiles(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Replace torch.compile by a recorder that wraps the backbone: each call of the "compiled" model appends
    whether autograd was on, so which path each step takes is observable without paying for a compile."""
    calls: list[bool] = []

    def recording_compile(model):
        assert isinstance(model, MiniGPT)

        def compiled(*args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return model(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    return calls


def test_compile_runs_training_steps_compiled_and_evaluation_eager(tmp_path, pretrain_dm_factory, monkeypatch) -> None:
    """``compile=True``: training steps call the backbone through ``torch.compile``, validation the eager one (it
    would need graphs of its own); the stored weights stay under ``model.`` only. torch.compile is replaced by a
    recorder that wraps the backbone, so which path each step takes is observable without paying for a compile."""
    calls = record_compiles(monkeypatch)
    dm = pretrain_dm_factory()
    module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, compile=True)
    seen: list[tuple[bool, bool]] = []  # (training, compiled) at every batch

    class Spy(__import__("lightning").pytorch.callbacks.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append((pl_module.training, pl_module._forward is not pl_module.model))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            seen.append((pl_module.training, pl_module._forward is not pl_module.model))

    trainer = micro_trainer(tmp_path, max_steps=3, val_check_interval=3, limit_val_batches=2, callbacks=[Spy()])
    trainer.fit(module, datamodule=dm)
    assert calls == [True, True, True]  # the three training steps, with autograd; no validation batch
    assert seen == [(True, True)] * 3 + [(False, False)] * 2
    assert all(k.startswith("model.") for k in module.state_dict())
    eager = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    assert eager.train()._forward is eager.model and len(calls) == 3  # compile=False: never compiled


def test_compile_auto_compiles_on_cuda_with_one_device_or_ddp_only(monkeypatch) -> None:
    """``compile=auto`` decides by device, strategy, Triton and GPU generation; the CUDA branches are checked
    without a GPU by handing the decision a CUDA device and stand-ins for what it asks CUDA and Triton."""
    import importlib.util

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    import minillm_lightning.stages.base as base

    cuda = torch.device("cuda", 0)
    capability = {"value": (8, 0)}
    has_triton = {"value": True}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if has_triton["value"] else None) if name == "triton" else real_find_spec(name, *a),
    )
    assert base.why_not_compile(cuda, SingleDeviceStrategy(cuda)) is None
    assert base.why_not_compile(cuda, DDPStrategy()) is None
    cpu = base.why_not_compile(torch.device("cpu"), SingleDeviceStrategy(torch.device("cpu")))
    assert cpu is not None and "on cpu" in cpu
    assert "FSDPStrategy" in base.why_not_compile(cuda, FSDPStrategy())
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # a DDPStrategy subclass; needs no deepspeed here
    assert "DeepSpeedStrategy" in base.why_not_compile(cuda, deepspeed)
    capability["value"] = (6, 0)  # e.g. a P100
    assert "compute capability" in base.why_not_compile(cuda, DDPStrategy())
    capability["value"], has_triton["value"] = (9, 0), False
    assert "Triton" in base.why_not_compile(cuda, SingleDeviceStrategy(cuda))
    with pytest.raises(ConfigError, match="model.compile='yes'"):
        PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64, compile="yes")


@pytest.mark.parametrize("decision", ["cpu", "pays back"])
def test_compile_auto_follows_the_decision_at_fit_start(tmp_path, pretrain_dm_factory, monkeypatch, decision) -> None:
    """A fit with ``compile=auto`` on this CPU stays eager; where the decision says the compile pays back, the
    training steps go through torch.compile (a recorder here) and evaluation stays eager, as with compile=True."""
    import minillm_lightning.stages.base as base

    calls = record_compiles(monkeypatch)
    if decision == "pays back":
        monkeypatch.setattr(base, "why_not_compile", lambda device, strategy: None)
    messages: list[str] = []
    monkeypatch.setattr(base, "rank_zero_info", lambda msg, *a, **k: messages.append(str(msg)))
    dm = pretrain_dm_factory()
    module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, compile="auto")
    assert module.__dict__["_compiled"] is None  # nothing is compiled before the trainer's device is known
    micro_trainer(tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=1).fit(module, datamodule=dm)
    said = [m for m in messages if m.startswith("compile=auto")]
    if decision == "cpu":
        assert calls == [] and said == [
            "compile=auto: eager (on cpu the compile did not repay its one-off cost in the recipes measured)"
        ]
    else:
        assert calls == [True, True] and said == ["compile=auto: training steps compiled"]
