"""Tests of MemoryGuard and GradientHealthMonitor: every trigger fires for real on a micro model on the CPU.

NaN gradients are injected by a callback at a chosen step; memory triggers use a tiny threshold, an impossible
batch, and a callback that leaks 16 MiB per step; resume goes through ``trainer.fit(ckpt_path=...)``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import psutil
import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning.callbacks import GradientHealthMonitor, MemoryGuard
from minillm_lightning.callbacks.gradient_health import param_group_name
from minillm_lightning.callbacks.memory_guard import (
    check_fits,
    count_parameters,
    estimate_training_memory,
    is_out_of_memory,
    linear_slope,
)
from minillm_lightning.errors import ResourceError
from minillm_lightning.losses import lm_loss
from minillm_lightning.model import MiniGPT


@pytest.fixture
def dm(pretrain_dm_factory):
    return pretrain_dm_factory()


def micro_model(dm, **kw) -> PretrainModule:
    L.seed_everything(0)
    return PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, learning_rate=3e-3, **kw)


class NanAt(Callback):
    """Puts a NaN into one gradient after the backward pass of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class WeightTrace(Callback):
    """Records whether each optimizer step changed the weights."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = list(pl_module.parameters())
        self.changed[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(after, self._before))


# ---- GradientHealthMonitor ----
def test_nan_gradient_skip_leaves_weights_unchanged_and_continues(tmp_path, dm):
    mon, trace = GradientHealthMonitor(on_nonfinite="skip"), WeightTrace()
    trainer = micro_trainer(tmp_path, max_steps=6, callbacks=[NanAt(3), mon, trace])
    with pytest.warns(UserWarning, match="non-finite gradients at step 3"):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert trainer.global_step == 6
    assert (mon.nonfinite_steps, mon.skipped_steps, mon.steps) == (1, 1, 6)
    assert trace.changed == {0: True, 1: True, 2: True, 3: False, 4: True, 5: True}
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_nan_gradient_stop_saves_checkpoint_and_stops(tmp_path, dm):
    mon = GradientHealthMonitor(on_nonfinite="stop")
    ckpt_dir = tmp_path / "ckpts"
    callbacks = [NanAt(3), mon, ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0)]
    trainer = micro_trainer(tmp_path, max_steps=20, callbacks=callbacks, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="stopped training at step 4"):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert trainer.global_step == 4 and trainer.should_stop
    ckpt = torch.load(ckpt_dir / "nonfinite.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["callbacks"]["GradientHealthMonitor"]["nonfinite_steps"] == 1


def test_nan_gradient_warn_lets_the_update_through(tmp_path, dm):
    mon = GradientHealthMonitor(on_nonfinite="warn")
    trainer = micro_trainer(tmp_path, max_steps=3, callbacks=[NanAt(1), mon])
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert mon.nonfinite_steps == 2 and mon.skipped_steps == 0  # the NaN reached the weights: step 2 is NaN too
    assert not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_loss_spike_against_running_median():
    mon = GradientHealthMonitor(spike_window=10, spike_factor=2.0, spike_min_history=5)
    assert not mon.observe_loss(50.0)  # too early to judge: no history
    losses = [3.0, 2.9, 3.1, 2.8, 3.0, 2.95]
    assert not any(mon.observe_loss(x) for x in losses)
    with pytest.warns(UserWarning, match="loss spike"):
        assert mon.observe_loss(9.0)  # 3x the median of ~3
    assert not mon.observe_loss(5.5)  # below 2x the median
    assert not mon.observe_loss(3.0)
    assert mon.loss_spikes == 1


@pytest.mark.parametrize("clip, share", [(1e-8, 1.0), (1e8, 0.0)])
def test_clipping_share(tmp_path, dm, clip, share):
    mon = GradientHealthMonitor()
    trainer = micro_trainer(tmp_path, max_steps=4, gradient_clip_val=clip, log_every_n_steps=1, callbacks=[mon])
    trainer.fit(micro_model(dm), datamodule=dm)
    assert mon.steps == 4 and mon.clipped_steps == share * 4
    m = trainer.callback_metrics
    assert m["grad_health/clipped_frac"] == share
    assert 0 < m["grad_health/update_ratio"] < 1 and m["grad_health/grad_norm"] > 0
    assert f"clipping engaged on {share:.0%}" in mon.summary()


class Capture(Logger):
    """Keeps what Lightning writes to a logger: {step: {key: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    name, version = "capture", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_per_layer_norms_grouped_by_block(tmp_path, dm):
    assert param_group_name("model.layers.3.mlp.up_proj.weight") == "layers.3"
    assert param_group_name("model.embed_tokens.weight") == "embed_tokens"
    assert param_group_name("value_head.weight") == "value_head"
    mon, log = GradientHealthMonitor(layer_every_n_logs=2), Capture()
    trainer = micro_trainer(tmp_path, max_steps=4, log_every_n_steps=1, logger=log, callbacks=[mon])
    trainer.fit(micro_model(dm), datamodule=dm)
    groups = {"embed_tokens", "layers.0", "layers.1", "norm"}  # lm_head is tied to the embedding
    for step, m in log.steps.items():
        per_layer = {k.split("/")[-1] for k in m if k.startswith("grad_health/grad_norm/")}
        assert per_layer == (groups if step in (1, 3) else set()), step  # every 2nd log step, never repeated
        assert {k.split("/")[-1] for k in m if k.startswith("grad_health/update_ratio/")} == per_layer
        assert "grad_health/grad_norm" in m and "grad_health/update_ratio" in m
        if per_layer:
            total = math.sqrt(sum(m[f"grad_health/grad_norm/{g}"] ** 2 for g in groups))
            assert math.isclose(total, m["grad_health/grad_norm"], rel_tol=1e-4)


def test_state_round_trip_and_real_resume(tmp_path, dm):
    mon = GradientHealthMonitor(on_nonfinite="skip")
    guard = MemoryGuard(threshold=1e-6, cooldown_steps=1000)
    trainer = micro_trainer(tmp_path, max_steps=5, callbacks=[NanAt(2), mon, guard])
    with pytest.warns(UserWarning):
        trainer.fit(micro_model(dm), datamodule=dm)
    state = mon.state_dict()
    assert state["steps"] == 5 and state["nonfinite_steps"] == 1 and len(state["losses"]) == 5
    copy = GradientHealthMonitor()
    copy.load_state_dict(state)
    assert copy.state_dict() == state and list(copy.losses) == list(mon.losses)
    assert guard.warnings_issued == 1
    g2 = MemoryGuard()
    g2.load_state_dict(guard.state_dict())
    assert g2.state_dict() == guard.state_dict()

    path = tmp_path / "step5.ckpt"
    trainer.save_checkpoint(path)
    mon2, guard2 = GradientHealthMonitor(), MemoryGuard(threshold=1e-6, cooldown_steps=1000)
    trainer2 = micro_trainer(tmp_path, max_steps=8, callbacks=[mon2, guard2])
    trainer2.fit(micro_model(dm), datamodule=dm, ckpt_path=path)  # the cooldown carries over: no new warning
    assert (mon2.steps, mon2.nonfinite_steps, len(mon2.losses)) == (8, 1, 8)
    assert guard2.warnings_issued == 1 and guard2.last_warn_step == guard.last_warn_step


# ---- MemoryGuard ----
def test_tiny_threshold_frees_caches_and_warns_and_logs(tmp_path, dm, monkeypatch):
    freed = []
    monkeypatch.setattr(MemoryGuard, "free_caches", staticmethod(lambda: freed.append(1)))
    guard = MemoryGuard(threshold=1e-6, cooldown_steps=2)
    trainer = micro_trainer(tmp_path, max_steps=5, log_every_n_steps=1, callbacks=[guard])
    with pytest.warns(UserWarning, match="above the 1e-06 threshold"):
        trainer.fit(micro_model(dm), datamodule=dm)  # pre-flight accepts the micro config
    assert guard.warnings_issued == len(freed) == 3  # steps 1, 3, 5: rate-limited by the cooldown
    assert trainer.callback_metrics["memory/rss_gib"] > 0
    assert guard.peak_rss > 0


def test_threshold_from_environment(monkeypatch):
    monkeypatch.setenv("MINIGPT_MEMORY_THRESHOLD", "0.5")
    assert MemoryGuard().threshold == 0.5
    monkeypatch.setenv("MINILLM_MEMORY_THRESHOLD", "0.7")
    assert MemoryGuard().threshold == 0.7
    assert MemoryGuard(threshold=0.8).threshold == 0.8
    with pytest.raises(ValueError, match="threshold"):
        MemoryGuard(threshold=1.5)
    monkeypatch.setenv("MINILLM_MEMORY_THRESHOLD", "90%")
    with pytest.raises(ValueError, match="MINILLM_MEMORY_THRESHOLD='90%' is not a number"):
        MemoryGuard()


def test_preflight_refuses_impossible_config_and_names_the_fixes():
    arch = MiniGPTConfig(size="medium")
    est = estimate_training_memory(arch, batch_size=4096, seq_len=1024)
    with pytest.raises(ResourceError) as err:
        check_fits(est, 139 * 2**30, batch_size=4096, seq_len=1024, precision="32-true", gradient_checkpointing=False)
    msg = str(err.value)
    for fix in ["data.batch_size (now 4096", "seq_len", "gradient_checkpointing true", "bf16-mixed"]:
        assert fix in msg
    small = estimate_training_memory(MiniGPTConfig(**MICRO_ARCH), batch_size=8, seq_len=64)
    check_fits(small, 2**30, batch_size=8, seq_len=64, precision="32-true", gradient_checkpointing=False)


def test_preflight_refuses_in_fit_before_the_first_step(tmp_path, pretrain_dm_factory, monkeypatch):
    dm = pretrain_dm_factory(batch_size=512)  # ~0.8 GiB of activations
    guard = MemoryGuard()
    ram = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=ram.total, available=64 * 2**20))
    trainer = micro_trainer(tmp_path, max_steps=2, callbacks=[guard])
    with pytest.raises(ResourceError, match=r"system RAM has 0.06 GiB available(.|\n)*lower data.batch_size \(now 512"):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert trainer.global_step == 0


def test_parameter_count_matches_model():
    for kw in [MICRO_ARCH, dict(size="tiny", tie_embeddings=False), dict(size="tiny", n_experts=4, n_shared_experts=1)]:
        cfg = MiniGPTConfig(**kw)
        assert count_parameters(cfg) == MiniGPT(cfg).num_parameters()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_estimate_matches_saved_tensors(precision):
    """The activation term agrees within 15% with what autograd keeps plus the logits-sized transients."""
    cfg = MiniGPTConfig(**{**MICRO_ARCH, "vocab_size": 512})
    model, B, T = MiniGPT(cfg), 4, 64
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="mixed" in precision):
            lm_loss(model(idx).logits, idx)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in weights)  # autocast's half weight copies included
    saved -= sum(p.numel() * 2 for p in model.parameters()) if "mixed" in precision else 0
    a = 2 if "mixed" in precision else 4
    measured = saved + B * T * cfg.vocab_size * (a + 4)  # + the logits themselves and their fp32 gradient
    est = estimate_training_memory(cfg, B, T, precision).activations
    assert abs(est - measured) / measured < 0.15, (est, measured)


def test_checkpointing_and_precision_shrink_the_estimate():
    full = estimate_training_memory(MiniGPTConfig(size="medium"), 8, 1024)
    ckpt = estimate_training_memory(MiniGPTConfig(size="medium", gradient_checkpointing=True), 8, 1024)
    bf16 = estimate_training_memory(MiniGPTConfig(size="medium"), 8, 1024, "bf16-mixed")
    assert ckpt.activations < full.activations / 2 and bf16.activations < full.activations
    assert full.optimizer == 2 * full.weights == 2 * full.gradients
    assert bf16.weights == full.weights * 1.5  # autocast's half copy of the weights
    math_attn = estimate_training_memory(MiniGPTConfig(size="medium"), 8, 1024, math_attention=True)
    n_head, tokens, layers = 12, 8 * 1024, 16  # plus the fp32 softmax rows: 12 heads x 1024 keys per token
    assert math_attn.activations - full.activations >= layers * tokens * n_head * 1024 * 4


def test_leak_detection_unit():
    guard = MemoryGuard(leak_window=20, leak_threshold_mb=1.0)
    for i in range(20):
        guard.record_leak_sample(1000 + (7 if i % 3 else -5), 500.0)  # steady, noisy
    assert guard.leaks() == {}
    for i in range(20):
        guard.record_leak_sample(1000 + 4 * i, 500 + 2.5 * i)
    leaks = guard.leaks()
    assert leaks.keys() == {"RSS", "CUDA allocated"} and math.isclose(leaks["RSS"], 4.0)
    assert linear_slope([1, 3, 5, 7]) == 2.0 and linear_slope([2]) == 0.0


class Leaky(Callback):
    """Keeps 16 MiB more every step, like appending tensors to a list."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.kept.append(torch.ones(2**22))


def test_leak_detection_fires_on_a_real_growing_allocation(tmp_path, dm):
    guard = MemoryGuard(leak_warmup_steps=1, leak_window=6, leak_threshold_mb=4.0)
    trainer = micro_trainer(tmp_path, max_steps=7, callbacks=[Leaky(), guard])
    with pytest.warns(UserWarning, match="memory grows steadily.*RSS"):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert guard.leak_reported


class OomAt(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_saves_checkpoint_and_names_the_fixes(tmp_path, dm, capsys):
    ckpt_dir = tmp_path / "ckpts"
    cbs = [OomAt(), MemoryGuard(), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0)]
    trainer = micro_trainer(tmp_path, max_steps=5, callbacks=cbs, enable_checkpointing=True)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(micro_model(dm), datamodule=dm)
    assert (ckpt_dir / "oom.ckpt").exists()
    err = capsys.readouterr().err
    assert "data.batch_size (now 8" in err and "gradient_checkpointing true" in err and "bf16-mixed" in err
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))


def test_enabled_from_yaml_class_paths():
    """The docs' YAML snippets name importable classes with these init args."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cb", type=list[Callback])
    cfg = parser.parse_args(
        [
            '--cb=[{"class_path": "minillm_lightning.callbacks.MemoryGuard", "init_args": {"threshold": 0.85}},'
            '{"class_path": "minillm_lightning.callbacks.GradientHealthMonitor",'
            ' "init_args": {"on_nonfinite": "stop"}}]'
        ]
    )
    objs = parser.instantiate_classes(cfg).cb
    assert isinstance(objs[0], MemoryGuard) and objs[0].threshold == 0.85
    assert isinstance(objs[1], GradientHealthMonitor) and objs[1].on_nonfinite == "stop"
