"""Checkpoints survive crashes during save; damaged checkpoints are named, and `--ckpt_path last` skips them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MICRO_ARCH, micro_trainer
from test_cli import CONFIG, FAST, minillm, training_process, wait_for_training, workdir  # noqa: F401

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning.callbacks import TrainingSummary
from minillm_lightning.checkpoint import is_intact, load_checkpoint, newest_intact_checkpoint
from minillm_lightning.errors import CheckpointError

SAVER = """
import sys, torch
from minillm_lightning.checkpoint_io import AtomicCheckpointIO
blob = {"state_dict": {"w": torch.randn(4_000_000)}}
i = 0
while True:
    blob["i"] = i
    AtomicCheckpointIO().save_checkpoint(blob, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


def test_kill_during_save_never_leaves_a_truncated_file(tmp_path: Path, tmp_path_factory) -> None:
    """SIGKILL a process that keeps rewriting a 16 MB checkpoint: the file is always complete. $TMPDIR is another
    filesystem where the machine has /dev/shm: Lightning's own writer staged the file there and then copied it,
    which a kill could cut short. A killed writer's temporary file is removed by the next save."""
    from minillm_lightning.checkpoint_io import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path_factory.mktemp("scratch")
    env = {**os.environ, "TMPDIR": str(scratch)}
    before = set(scratch.iterdir())
    for delay in (0.6, 1.1, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
        proc.stdout.readline()  # at least one save finished
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert is_intact(target)
        assert load_checkpoint(target)["state_dict"]["w"].numel() == 4_000_000
    assert set(scratch.iterdir()) == before  # nothing staged in $TMPDIR
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "i": -1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and load_checkpoint(target)["i"] == -1


def test_the_cli_trainer_writes_checkpoints_atomically(workdir: Path, monkeypatch) -> None:  # noqa: F811
    from minillm_lightning.checkpoint_io import AtomicCheckpointIO
    from minillm_lightning.trainer_cli import run_lightning

    monkeypatch.chdir(workdir)
    cli = run_lightning(["--config", CONFIG, *FAST], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_failing_writer_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, pretrain_dm_factory) -> None:
    dm = pretrain_dm_factory()
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    trainer = micro_trainer(tmp_path, max_steps=2)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    import fsspec.implementations.local as local

    def broken_write(self, data):  # the disk fills up half-way through the write
        self.f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", broken_write)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and is_intact(path)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path: Path, pretrain_dm_factory, caplog) -> None:
    """Lightning skips the training loop of a run resumed at its max_steps (no on_train_start): no "continuing at
    step" line, only "`Trainer.fit` stopped: `max_steps=2` reached.". Now a line says why and what to change, and
    the training summary counts no steps for this process."""
    dm = pretrain_dm_factory()
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    trainer = micro_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    trainer = micro_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[TrainingSummary()])
    with caplog.at_level(logging.INFO):
        trainer.fit(model, datamodule=dm, ckpt_path=path)
    out = caplog.text
    line = f"resumed from {path} at step 2: max_steps=2 already reached, nothing to train; raise --trainer.max_steps"
    assert line in out and "continuing at step" not in out, out[-2000:]
    assert "training summary (pretrain): 0 steps in" in out and "(resumed at step 2, now at step 2)" in out


def test_damaged_checkpoints_are_named_and_skipped(tmp_path: Path, tiny_pretrain_ckpt: Path) -> None:
    good = tmp_path / "step10.ckpt"
    good.write_bytes(tiny_pretrain_ckpt.read_bytes())
    time.sleep(0.01)
    last = tmp_path / "last.ckpt"
    last.write_bytes(tiny_pretrain_ckpt.read_bytes()[:5000])  # truncated
    with pytest.raises(CheckpointError, match=r"last\.ckpt is corrupted or truncated"):
        load_checkpoint(last)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt is not a minillm checkpoint: it holds text"):
        load_checkpoint(garbage)
    flipped = bytearray(tiny_pretrain_ckpt.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # a bit flip inside the weights
    bad_crc = tmp_path / "flipped.ckpt"
    bad_crc.write_bytes(bytes(flipped))
    assert not is_intact(bad_crc)
    os.utime(garbage, (time.time() + 5, time.time() + 5))  # newest, but broken
    found, skipped = newest_intact_checkpoint([tmp_path])
    assert found == good
    assert skipped[0] == last and garbage in skipped


def test_resume_last_falls_back_to_newest_intact(workdir: Path) -> None:  # noqa: F811
    args = ["fit", "--config", CONFIG, *FAST, "--trainer.val_check_interval=4"]
    first = minillm([*args, "--trainer.max_steps=8"], workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    run = workdir / "checkpoints" / "pretrain_tiny"
    (run / "best.ckpt").rename(run / "intact.ckpt")
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])
    resumed = minillm([*args, "--trainer.max_steps=10", "--ckpt_path", "last"], workdir)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "last.ckpt is truncated or corrupted; skipping it" in out
    assert "resuming from" in out and "continuing at step" in out
    assert torch.load(last, weights_only=True)["global_step"] == 10
    explicit = minillm([*args, "--ckpt_path", str(run / "garbage.ckpt")], workdir)
    assert explicit.returncode == 2 and "no such file" in explicit.stderr
    folder = minillm([*args, "--ckpt_path", str(run)], workdir)
    assert folder.returncode == 2 and f"--ckpt_path {run} is a directory; pass a .ckpt file in it" in folder.stderr
    hpc = minillm([*args, "--ckpt_path", "hpc"], workdir)
    assert hpc.returncode == 2 and "--ckpt_path hpc: not supported by minillm" in hpc.stderr

    # validate/test resolve `last` (skipping a damaged file) and `best` as fit does; `best` was refused as "not
    # configured to save the best model" in any process but the one that wrote it
    last.write_bytes(last.read_bytes()[:4096])
    check = ["validate", "--config", CONFIG, *FAST]
    validated = minillm([*check, "--ckpt_path", "last"], workdir)
    assert validated.returncode == 0 and "last.ckpt is truncated or corrupted; skipping it" in validated.stderr
    (run / "intact.ckpt").rename(run / "best.ckpt")
    best = minillm([*check, "--ckpt_path", "best"], workdir)
    assert best.returncode == 0 and str(run / "best.ckpt") in best.stdout + best.stderr


def test_dataloader_worker_crash_is_an_error_with_a_checkpoint(
    tmp_path: Path, pretrain_dm_factory, monkeypatch
) -> None:
    """A worker process that dies mid-epoch surfaces as an error (not a hang) and last.ckpt is written.

    The worker waits a second before it dies, so the main process has taken every batch it sent and learns of
    the death while it waits for the next. A worker killed while a batch is being handed over breaks the
    channel first; that order is made deterministic in the test below."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minillm_lightning.callbacks import InterruptCheckpoint
    from minillm_lightning.callbacks.interrupt import is_worker_crash
    from minillm_lightning.data.shards import TokenBlocks

    original = TokenBlocks.__getitem__
    parent = os.getpid()
    served = {"n": 0}

    def dying(self, i):
        if os.getpid() != parent:
            served["n"] += 1  # counts inside the (forked) worker
            if served["n"] > 40:
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, i)

    monkeypatch.setattr(TokenBlocks, "__getitem__", dying)
    dm = pretrain_dm_factory(num_workers=1)
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    trainer = micro_trainer(
        tmp_path,
        max_steps=1000,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), InterruptCheckpoint()],
    )
    t0 = time.time()
    with pytest.raises(RuntimeError, match="DataLoader worker") as info:
        trainer.fit(model, datamodule=dm)
    assert time.time() - t0 < 120
    assert is_worker_crash(info.value)
    assert (tmp_path / "last.ckpt").is_file() and trainer.global_step > 0


@pytest.fixture
def fitted(tmp_path: Path, pretrain_dm_factory):
    """A trainer after 2 steps, with no last.ckpt yet, and its InterruptCheckpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minillm_lightning.callbacks import InterruptCheckpoint

    dm = pretrain_dm_factory()
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    callback = InterruptCheckpoint(save_on_train_end=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=False)
    trainer = micro_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints, callback])
    trainer.fit(model, datamodule=dm)
    assert trainer.state.fn == "fit" and not (tmp_path / "last.ckpt").exists()
    return trainer, model, callback


def report_from_a_child(delay: float) -> int:
    """Fork a child that exits after ``delay`` s; its SIGCHLD raises PyTorch's dead-worker report once."""
    child = os.fork()
    if child == 0:
        time.sleep(delay)
        os._exit(0)
    previous = signal.getsignal(signal.SIGCHLD)

    def report(signum, frame):
        signal.signal(signal.SIGCHLD, previous)
        os.waitpid(child, 0)
        raise RuntimeError(f"DataLoader worker (pid {child}) is killed by signal: Killed. ")

    signal.signal(signal.SIGCHLD, report)
    return child


def test_worker_killed_during_handover_still_saves(fitted, tmp_path: Path) -> None:
    """The channel breaks first and PyTorch's SIGCHLD report comes a little later: on_exception waits for it."""
    from minillm_lightning.callbacks.interrupt import is_worker_crash, worker_crash_report

    trainer, model, callback = fitted
    report_from_a_child(0.3)
    broken = ConnectionResetError(104, "Connection reset by peer")
    callback.on_exception(trainer, model, broken)
    assert (tmp_path / "last.ckpt").is_file()
    assert is_worker_crash(broken) and "is killed by signal" in str(worker_crash_report(broken))


def test_worker_report_landing_mid_save_is_retried(fitted, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM to the whole process group also kills the workers; their report can land inside the save."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    trainer, model, callback = fitted
    save, calls = trainer.save_checkpoint, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated. ")
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_once)
    callback.on_exception(trainer, model, SIGTERMException())
    assert len(calls) == 2 and (tmp_path / "last.ckpt").is_file()


def test_sigterm_exits_143(monkeypatch) -> None:
    """Lightning ends a run stopped by SIGTERM with a SystemExit without a code (exit 0): `minillm` exits 143
    (128 + 15) instead, so that `minillm fit ... && next` does not carry on. The checkpoint is saved before."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import minillm_lightning.trainer_cli as trainer_cli
    from minillm_lightning.cli import main

    def stopped_by_sigterm(args: list[str] | None = None) -> None:
        raise SIGTERMException()  # as Lightning's loops raise it between batches

    monkeypatch.setattr(trainer_cli, "run_lightning", stopped_by_sigterm)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", CONFIG])
    assert exc.value.code == 128 + signal.SIGTERM == 143


def test_a_connection_error_without_a_dead_worker_saves_nothing(fitted, tmp_path: Path) -> None:
    """Only interrupts and worker deaths save: any other error may have left a state not worth resuming."""
    from minillm_lightning.callbacks.interrupt import is_worker_crash

    trainer, model, callback = fitted
    broken = ConnectionResetError(104, "Connection reset by peer")
    t0 = time.monotonic()
    callback.on_exception(trainer, model, broken)
    assert 1.5 < time.monotonic() - t0 < 10  # waited for a report that did not come
    assert not (tmp_path / "last.ckpt").exists() and not is_worker_crash(broken)
    callback.on_exception(trainer, model, ValueError("loss is nan"))
    assert not (tmp_path / "last.ckpt").exists()


def test_incompatible_init_from_and_too_long_sequences(tmp_path: Path, tiny_pretrain_ckpt: Path, pretrain_dm_factory):
    from minillm_lightning.errors import ConfigError

    ckpt = torch.load(tiny_pretrain_ckpt, weights_only=True)
    ckpt["minillm"]["arch"]["n_layer"] += 1  # the config promises a layer the weights do not have
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    with pytest.raises(CheckpointError, match="backbone weights do not match its architecture"):
        PretrainModule(init_from=str(foreign))
    dm = pretrain_dm_factory(seq_len=256, dataset_dir=str(tmp_path / "fresh"))  # the micro model's context is 128
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    with pytest.raises(ConfigError, match="exceeds the model context block_size=128"):
        micro_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)
    assert not dm.is_prepared()  # refused before the corpus is tokenized, not after (minutes on a real corpus)
    # so long that the corpus holds fewer than one batch of it: the context is named, not "add data"
    dm = pretrain_dm_factory(seq_len=100_000)
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    with pytest.raises(ConfigError, match="exceeds the model context block_size=128"):
        micro_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)


class _Interrupt(L.Callback):
    """Ctrl+C inside the training step of optimizer step ``at + 1`` (after the backward, before the update), or
    before the first batch with ``at=None``; records the global step of every validation."""

    def __init__(self, at: int | None) -> None:
        self.at, self.val_steps = at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at is None:
            raise KeyboardInterrupt

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_steps.append(trainer.global_step)


def _probed_fit(root: Path, dm, probe: L.Callback, ckpt_path: str | None = None) -> PretrainModule:
    """10 micro steps validating every 4, with the CLI's InterruptCheckpoint and ``probe``; the trained model."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minillm_lightning.callbacks import InterruptCheckpoint

    torch.manual_seed(0)
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size)
    saver = ModelCheckpoint(dirpath=root, save_last=True, save_on_train_epoch_end=False)
    trainer = micro_trainer(
        root,
        max_steps=10,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        enable_checkpointing=True,
        callbacks=[saver, InterruptCheckpoint(), probe],
    )
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    except SystemExit:  # how Lightning ends a run after Ctrl+C
        pass
    return model


def _interruptible_fit(root: Path, dm, at: int | None, ckpt_path: str | None = None) -> tuple[_Interrupt, Path]:
    probe = _Interrupt(at)
    _probed_fit(root, dm, probe, ckpt_path)
    return probe, root / "last.ckpt"


def test_ctrl_c_mid_step_resumes_on_the_same_validation_schedule(tmp_path: Path, pretrain_dm_factory) -> None:
    """A Ctrl+C checkpoint taken mid-step counted the interrupted batch as fetched: after the resume every
    validation (and so best.ckpt and RegressionSuite rounds) came one step early, at 7 instead of 8."""
    dm = pretrain_dm_factory()
    straight, _ = _interruptible_fit(tmp_path / "straight", dm, at=-1)
    first, last = _interruptible_fit(tmp_path / "stopped", dm, at=5)
    assert load_checkpoint(last)["global_step"] == 5 and first.val_steps == [4]
    resumed, _ = _interruptible_fit(tmp_path / "stopped", dm, at=-1, ckpt_path=str(last))
    assert straight.val_steps == [4, 8] and first.val_steps + resumed.val_steps == [4, 8]


def test_ctrl_c_before_the_first_step_keeps_last_ckpt(tmp_path: Path, pretrain_dm_factory, capsys) -> None:
    """A new run stopped before its first step (say, the user forgot --ckpt_path last) replaced the previous run's
    last.ckpt with a step-0 checkpoint."""
    dm = pretrain_dm_factory()
    _, last = _interruptible_fit(tmp_path, dm, at=-1)
    before = last.read_bytes()
    _interruptible_fit(tmp_path, dm, at=None)
    assert last.read_bytes() == before and load_checkpoint(last)["global_step"] == 10


def test_resume_with_another_model_shape_names_the_settings(tmp_path: Path, pretrain_dm_factory) -> None:
    """--ckpt_path with a changed n_layer or vocabulary ended in torch's list of every mismatched tensor."""
    dm = pretrain_dm_factory()
    trainer = micro_trainer(tmp_path, max_steps=1)
    trainer.fit(PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=dm.vocab_size), datamodule=dm)
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    deeper = MiniGPTConfig(**{**MICRO_ARCH, "n_layer": MICRO_ARCH["n_layer"] + 1})
    with pytest.raises(CheckpointError) as err:
        micro_trainer(tmp_path, max_steps=2).fit(
            PretrainModule(arch=deeper, vocab_size=dm.vocab_size), datamodule=dm, ckpt_path=str(path)
        )
    n = MICRO_ARCH["n_layer"]
    assert str(err.value).startswith(
        f"{path}: its weights do not fit this run's model (n_layer: {n} there, {n + 1} here)"
    )
    assert "--model.init_from" in str(err.value)
    same = PretrainModule(arch=MiniGPTConfig(**{**MICRO_ARCH, "dropout": 0.1}), vocab_size=dm.vocab_size)
    micro_trainer(tmp_path, max_steps=2).fit(same, datamodule=dm, ckpt_path=str(path))  # fits: resumes


def test_flags_given_with_a_checkpoint_file_win_as_with_last(workdir: Path) -> None:  # noqa: F811
    """LightningCLI merged an explicit checkpoint file's hyperparameters over the command line: `--ckpt_path FILE
    --model.init_args.learning_rate 0.5` trained with the checkpoint's rate, while `--ckpt_path last` used 0.5."""
    args = ["fit", "--config", CONFIG, *FAST, "--trainer.val_check_interval=2"]
    first = minillm([*args, "--trainer.max_steps=2"], workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    last = workdir / "checkpoints" / "pretrain_tiny" / "last.ckpt"
    kept = workdir / "step2.ckpt"
    kept.write_bytes(last.read_bytes())
    assert load_checkpoint(kept)["hyper_parameters"]["learning_rate"] != 0.5
    resumed = minillm(
        [*args, "--trainer.max_steps=4", "--ckpt_path", str(kept), "--model.init_args.learning_rate=0.5"], workdir
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["learning_rate"] == 0.5


class _Requeue(L.Callback):
    """SLURM's requeue signal inside the training step of optimizer step ``at + 1`` (after the backward, before
    the update); records the global step of every validation."""

    def __init__(self, at: int) -> None:
        self.at, self.val_steps = at, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)  # Lightning's handler saves hpc_ckpt_1.ckpt right here

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_steps.append(trainer.global_step)


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch) -> Path:
    """A one-task SLURM job as Lightning detects it, with a stand-in `scontrol` that records the requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in dict(
        SLURM_NTASKS="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="train", SLURM_NODELIST="localhost", SLURM_LOCALID="0",
        SLURM_PROCID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return calls


def test_slurm_requeue_checkpoint_resumes_on_the_same_schedule(tmp_path: Path, pretrain_dm_factory, slurm_job) -> None:
    """Lightning writes SLURM's requeue checkpoint from its signal handler, mid-step. It counted the interrupted
    batch as fetched, so the requeued job validated one step early (at 399 and 599 instead of 400 and 600 in
    pretrain_tiny) on other batches than the uninterrupted run. Now it resumes exactly: same validations, same
    weights."""
    dm = pretrain_dm_factory()

    def fit(root: Path, at: int) -> tuple[_Requeue, PretrainModule]:
        probe = _Requeue(at)  # no ckpt_path: under SLURM, Lightning resumes from an hpc_ckpt_N.ckpt it finds
        return probe, _probed_fit(root, dm, probe)

    straight, reference = fit(tmp_path / "straight", at=-1)
    fit(tmp_path / "signalled", at=5)
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    saved = tmp_path / "signalled" / "hpc_ckpt_1.ckpt"
    assert load_checkpoint(saved)["global_step"] == 5
    requeued = tmp_path / "requeued"  # the requeued job finds only the requeue checkpoint
    requeued.mkdir()
    saved.rename(requeued / saved.name)
    resumed, model = fit(requeued, at=-1)
    assert straight.val_steps == [4, 8] and resumed.val_steps == [8]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_resume_last_prefers_the_newest_of_last_and_requeue_checkpoints(tmp_path: Path, tiny_pretrain_ckpt) -> None:
    """`--ckpt_path last` in a requeued SLURM job resumed from last.ckpt, older than the requeue checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    blob = tiny_pretrain_ckpt.read_bytes()
    for i, name in enumerate(["best.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt"]):
        (run / name).write_bytes(blob)
        os.utime(run / name, (1000 + i, 1000 + i))
    assert newest_intact_checkpoint([run]) == (run / "hpc_ckpt_1.ckpt", [])
    os.utime(run / "last.ckpt", (2000, 2000))
    assert newest_intact_checkpoint([run]) == (run / "last.ckpt", [])
    elsewhere = tmp_path / "root" / "hpc_ckpt_2.ckpt"  # default_root_dir outside the ModelCheckpoint folder
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(blob)
    assert newest_intact_checkpoint([run], [elsewhere]) == (elsewhere, [])
    same = Path(os.path.relpath(run / "last.ckpt"))  # the same file by another path is one candidate, not two
    assert newest_intact_checkpoint([run], [same]) == (run / "last.ckpt", [])


def test_the_weights_only_note_of_a_requeue_save_is_dropped(caplog) -> None:
    """Lightning's requeue save passes no weights_only, and Lightning said so in the job's log at every requeue."""
    from minillm_lightning.trainer_cli import quiet_lightning_notices

    quiet_lightning_notices()
    log = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("`weights_only` was not set, defaulting to `False`.")
        log.info("Restoring states from the checkpoint path at x.ckpt")
    assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint path at x.ckpt"]


def test_requeued_cli_job_resumes_from_the_requeue_checkpoint(workdir: Path, slurm_job, tmp_path: Path) -> None:  # noqa: F811
    """`minillm fit` as a SLURM job: SIGUSR1 writes hpc_ckpt_1.ckpt and requeues. The requeued command resumes from
    it, with `--ckpt_path last` (which picked the older last.ckpt) or without (Lightning's own choice; it warned
    that the run's directory was not empty)."""
    run = workdir / "checkpoints" / "pretrain_tiny"
    args = ["fit", "--config", CONFIG, *FAST, "--trainer.val_check_interval=1000"]
    first = minillm([*args, "--trainer.max_steps=5"], workdir)  # an older last.ckpt, at step 5
    assert first.returncode == 0, first.stderr[-3000:]
    with training_process([*args, "--trainer.max_steps=100000", "--ckpt_path", "last"], workdir) as proc:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "continuing at step 5" in line:
                break
        else:
            pytest.fail("the job ended before it resumed:\n" + "".join(seen[-40:]))
        time.sleep(2)  # some steps on
        proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 240
        while not slurm_job.is_file() and time.time() < deadline and proc.poll() is None:  # requeued after the save
            time.sleep(0.2)
        proc.kill()  # SLURM ends the job
        out, _ = proc.communicate()
    hpc = run / "hpc_ckpt_1.ckpt"
    assert slurm_job.is_file() and slurm_job.read_text().split() == ["requeue", "4242"], out[-3000:]
    step = load_checkpoint(hpc)["global_step"]
    assert step > load_checkpoint(run / "last.ckpt")["global_step"]
    requeued = tmp_path / "requeued"  # Lightning's own choice, where only the requeue checkpoint is
    (requeued / "checkpoints" / "pretrain_tiny").mkdir(parents=True)
    (requeued / "configs").symlink_to(workdir / "configs")
    (requeued / "data").symlink_to(workdir / "data")
    hpc_copy = requeued / "checkpoints" / "pretrain_tiny" / hpc.name
    hpc_copy.write_bytes(hpc.read_bytes())
    for cwd, extra in ((workdir, ["--ckpt_path", "last"]), (requeued, [])):
        r = minillm([*args, f"--trainer.max_steps={step + 2}", *extra], cwd)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert f"hpc_ckpt_1.ckpt: continuing at step {step}" in out and "exists and is not empty" not in out
