"""PretrainModule under a real Trainer: exact mid-epoch resume, Trainer flags, LR schedule, checkpoints."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning.checkpoint import load_backbone
from minillm_lightning.errors import CheckpointError
from minillm_lightning.stages.base import OptimConfig, warmup_cosine


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _model(dm, **kw) -> PretrainModule:
    return PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size, learning_rate=2e-3, **kw)


def test_warmup_cosine_by_hand() -> None:
    """warmup 4, total 12, min 0.1: steps 0..3 rise as 1/4..4/4; step 8 is halfway through the cosine
    (0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55); step 12 and later stay at the floor 0.1."""
    assert [warmup_cosine(s, 4, 12, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 12, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(8, 4, 12, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(12, 4, 12, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, 4, 12, 0.1) == pytest.approx(0.1)


def test_warmup_linear_decay_by_hand() -> None:
    """decay="linear", warmup 4, total 12, min 0.1: the same warmup, then 0.1 + 0.9 * (1 - progress):
    step 6 (progress 1/4) 0.775 where the cosine gives 0.1 + 0.9 * 0.5 * (1 + cos(pi/4)) = 0.868; step 10 0.325."""
    assert [warmup_cosine(s, 4, 12, 0.1, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(6, 4, 12, 0.1, "linear") == pytest.approx(0.775)
    assert warmup_cosine(6, 4, 12, 0.1) == pytest.approx(0.1 + 0.45 * (1 + 2**-0.5))
    assert warmup_cosine(10, 4, 12, 0.1, "linear") == pytest.approx(0.325)
    assert warmup_cosine(12, 4, 12, 0.1, "linear") == pytest.approx(0.1)


def test_linear_decay_reaches_the_scheduler() -> None:
    """``decay: linear`` from the config drives the LambdaLR the module hands to Lightning."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = OptimConfig(warmup=4, min_lr_ratio=0.1, decay="linear").schedule(opt, 12)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[6] == pytest.approx(0.775) and lrs[10] == pytest.approx(0.325)
    with pytest.raises(ValueError, match="decay"):
        OptimConfig(decay="step")


def test_loss_falls_and_checkpoint_is_self_contained(tmp_path, pretrain_dm_factory) -> None:
    L.seed_everything(0)
    dm = pretrain_dm_factory()
    model = _model(dm)
    rec = LossRecorder()
    trainer = micro_trainer(tmp_path, max_steps=60, callbacks=[rec])
    trainer.fit(model, datamodule=dm)
    first, last = sum(list(rec.losses.values())[:5]) / 5, sum(list(rec.losses.values())[-5:]) / 5
    assert first > math.log(dm.vocab_size) - 1.0  # starts near uniform
    assert last < first - 1.5, (first, last)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    backbone, ckpt = load_backbone(path)
    assert ckpt["minillm"]["stage"] == "pretrain"
    assert ckpt["tokenizer"]["sha256"] == dm.tokenizer.sha256
    x = torch.randint(0, dm.vocab_size, (1, 16))
    torch.testing.assert_close(backbone(x).logits, model.model.eval()(x).logits)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_mid_epoch(tmp_path, pretrain_dm_factory, optimizer: str) -> None:
    """N steps straight == N/2 steps, save, resume, N/2 steps: identical losses and weights.

    The corpus is cut to ~11 batches per epoch so the run crosses epoch boundaries and stops mid-epoch.
    With Muon the momentum buffers and AdamW moments must round-trip through the checkpoint too.
    """
    n, half = 30, 15

    def run(root, ckpt_path=None, max_steps=n, save_at=None):
        L.seed_everything(0)
        dm = pretrain_dm_factory(sample_ratio=0.05)
        model = _model(dm, optimizer=optimizer)
        rec = LossRecorder()
        cbs = [rec]
        if save_at:
            cbs.append(
                ModelCheckpoint(
                    dirpath=root,
                    every_n_train_steps=save_at,
                    save_top_k=-1,
                    filename="s{step}",
                    auto_insert_metric_name=False,
                )
            )
        trainer = micro_trainer(root, max_steps=max_steps, callbacks=cbs, enable_checkpointing=bool(save_at))
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, rec.losses, dm, trainer

    straight, losses_a, dm, _ = run(tmp_path / "a")
    per_epoch = len(dm.train_dataloader())
    assert per_epoch < half and half % per_epoch != 0, "the resume point must fall inside an epoch"
    _, losses_b1, _, _ = run(tmp_path / "b", save_at=half)
    ckpt = tmp_path / "b" / f"s{half}.ckpt"
    assert ckpt.is_file()
    resumed, losses_b2, _, trainer = run(tmp_path / "c", ckpt_path=str(ckpt))
    assert sorted(losses_b2) == list(range(half + 1, n + 1))
    for step in range(1, half + 1):
        assert losses_b1[step] == losses_a[step]
    for step in range(half + 1, n + 1):
        assert losses_b2[step] == losses_a[step], step
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert trainer.global_step == n


@pytest.mark.parametrize(
    "flags",
    [
        dict(precision="bf16-mixed"),
        dict(accumulate_grad_batches=2),
        dict(gradient_clip_val=0.5),
    ],
    ids=["bf16-mixed", "accumulate", "clip"],
)
def test_trainer_flags(tmp_path, pretrain_dm_factory, flags) -> None:
    L.seed_everything(0)
    dm = pretrain_dm_factory()
    model = _model(dm)
    rec = LossRecorder()
    trainer = micro_trainer(tmp_path, max_steps=12, callbacks=[rec], **flags)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 12
    values = list(rec.losses.values())
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]


def test_accumulation_matches_larger_batch(tmp_path, pretrain_dm_factory) -> None:
    """batch 4 x accumulate_grad_batches=2 trains the same weights as batch 8 (same samples, same order:
    the sampler's permutation does not depend on the batch size)."""

    def train(batch_size: int, accumulate: int) -> PretrainModule:
        L.seed_everything(0)
        dm = pretrain_dm_factory(batch_size=batch_size)
        model = _model(dm)
        micro_trainer(tmp_path, max_steps=3, accumulate_grad_batches=accumulate).fit(model, datamodule=dm)
        return model

    big, small = train(8, 1), train(4, 2)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    untrained = _model(pretrain_dm_factory())
    assert not torch.equal(untrained.model.norm.weight, big.model.norm.weight)


def test_moe_aux_loss_reaches_training_loss(pretrain_dm_factory) -> None:
    dm = pretrain_dm_factory()
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=2)))
    arch = MiniGPTConfig(**{**MICRO_ARCH, "n_experts": 4, "top_k": 2, "aux_loss_coef": 0.5})
    model = PretrainModule(arch=arch, vocab_size=dm.vocab_size)
    loss = model.training_step(batch, 0)
    out = model.model(batch["input_ids"])
    from minillm_lightning.losses import lm_loss

    ce, _ = lm_loss(out.logits, batch["labels"])
    torch.testing.assert_close(loss, ce + out.aux_loss)
    assert out.aux_loss > 0


def test_init_from_missing_and_wrong_stage(tmp_path, tiny_pretrain_ckpt) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        PretrainModule(init_from=str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(tiny_pretrain_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        PretrainModule(init_from=str(bad))
    model = PretrainModule(init_from=str(tiny_pretrain_ckpt))
    assert model.tokenizer is not None and model.arch.n_layer == MICRO_ARCH["n_layer"]
    with pytest.raises(CheckpointError, match="vocabulary"):
        PretrainModule(init_from=str(tiny_pretrain_ckpt), vocab_size=model.arch.vocab_size + 1)
