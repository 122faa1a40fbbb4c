"""The private Lightning attributes wrapped in lightning_private.py still exist and mean what we assume.

If a Lightning upgrade renames one, these tests fail by name instead of the wrappers quietly falling back.
"""

from __future__ import annotations

import torch
from conftest import MICRO_ARCH, micro_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from minillm_lightning import MiniGPTConfig, PretrainModule
from minillm_lightning import lightning_private as lp


class Probe(Callback):
    """Records what the wrappers say at each batch, and that the raw attributes are there."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert hasattr(trainer, "_logger_connector") and hasattr(trainer._logger_connector, "should_update_logs")
        assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped")
        assert hasattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed")
        self.rows.append((trainer.global_step, lp.logged_step(trainer), lp.will_log(trainer), batch_idx))


def _loader() -> DataLoader:
    ids = torch.randint(0, 64, (40, 17), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
    return DataLoader(rows, batch_size=4)


def test_private_attributes_exist_and_track_the_loop(tmp_path) -> None:
    model = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64)
    probe = Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    trainer = micro_trainer(
        tmp_path, max_steps=6, log_every_n_steps=2, callbacks=[probe, ckpt], enable_checkpointing=True
    )
    trainer.fit(model, train_dataloaders=_loader())
    steps = [r[0] for r in probe.rows]
    assert steps == [1, 2, 3, 4, 5, 6]
    # automatic optimization, no accumulation: the logged step is the optimizer step count before this batch
    # stepped... Lightning increments it after the batch-end hooks, so it trails global_step by one here
    assert [r[1] for r in probe.rows] == [s - 1 for s in steps]
    # log_every_n_steps=2: Lightning writes at logged steps 1, 3, 5 (its (step + 1) % n rule)
    assert [r[2] for r in probe.rows] == [(s - 1 + 1) % 2 == 0 for s in steps]
    assert lp.batches_done_in_epoch(trainer) == 6 and lp.batches_done_in_epoch(None) == 0
    assert hasattr(ckpt, "_last_global_step_saved") and lp.last_saved_step(trainer) == 6
    assert hasattr(ckpt, "_last_checkpoint_saved")
    ckpt._last_checkpoint_saved = False
    lp.mark_last_saved(trainer)
    assert ckpt._last_checkpoint_saved is True


def test_rich_bar_labels_step_bound_runs_without_a_negative_epoch_count(tmp_path) -> None:
    """After a real fit bounded by `max_steps` (Lightning then stores max_epochs = -1) the training bar reads
    "Epoch 0", not Lightning's "Epoch 0/-2"; an epoch-bound fit keeps "Epoch 0/1"; a bar a config set up keeps its
    settings; the logger's run number reads "v_num: 0", not "v_num: 0.000". The label comes from Lightning's private
    `RichProgressBar._get_train_description`."""
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
    from lightning.pytorch.loggers import CSVLogger

    from minillm_lightning.trainer_cli import MiniLLMRichProgressBar, choose_progress_bar

    labels = {}
    for name, limits in {"steps": {"max_steps": 2}, "epochs": {"max_epochs": 2, "max_steps": -1}}.items():
        bar = RichProgressBar(refresh_rate=7, theme=RichProgressBarTheme(description="red"))
        trainer = micro_trainer(
            tmp_path / name,
            **limits,
            callbacks=[bar],
            enable_progress_bar=True,
            limit_train_batches=2,
            limit_val_batches=0,
            logger=CSVLogger(tmp_path / name),
        )
        choose_progress_bar(trainer, terminal=True)
        assert isinstance(trainer.progress_bar_callback, MiniLLMRichProgressBar)
        module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64)
        trainer.fit(module, _loader())
        assert bar.refresh_rate == 7 and bar.theme.description == "red"
        labels[name] = bar._get_train_description(0)
        assert labels[name] != RichProgressBar._get_train_description(bar, 0) or name == "epochs"
        assert RichProgressBar.get_metrics(bar, trainer, module)["v_num"] == 0  # Lightning's: an int, shown "0.000"
        assert bar.get_metrics(trainer, module)["v_num"] == "0"
    assert labels["steps"].rstrip() == "Epoch 0"
    assert len(labels["steps"]) >= len("Validation")  # padded as Lightning pads, so the bar does not jump
    assert labels["epochs"].rstrip() == "Epoch 0/1"


def test_rich_bar_total_after_a_mid_epoch_resume(tmp_path) -> None:
    """Resumed mid-epoch at step 3 of 6, Lightning's bar showed "6/2": its total is the optimizer steps left while
    the bar counts the batch index within the epoch. Ours ends at its total, fresh or resumed, also with
    accumulation (2 batches per step: 12 batches for 6 steps, which cross from the 10-batch epoch 0 into epoch 1)."""
    from lightning.pytorch.callbacks import RichProgressBar

    from minillm_lightning.trainer_cli import MiniLLMRichProgressBar

    class Seen(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not hasattr(self, "lightnings"):  # a resumed run starts mid-epoch, without on_train_epoch_start
                self.lightnings = RichProgressBar.total_train_batches.fget(trainer.progress_bar_callback)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # after the bar's
            bar = trainer.progress_bar_callback
            task = bar.progress.tasks[bar.train_progress_bar_id]
            self.shown = (int(task.completed), task.total, self.lightnings)

    for accumulate in (1, 2):
        root = tmp_path / f"acc{accumulate}"
        shown = []
        for max_steps, ckpt_path in ((3, None), (6, str(root / "last.ckpt"))):
            seen = Seen()
            trainer = micro_trainer(
                root,
                max_steps=max_steps,
                accumulate_grad_batches=accumulate,
                limit_val_batches=0,
                enable_progress_bar=True,
                enable_checkpointing=True,
                callbacks=[MiniLLMRichProgressBar(), seen, ModelCheckpoint(dirpath=root, save_last=True)],
            )
            module = PretrainModule(arch=MiniGPTConfig(**MICRO_ARCH), vocab_size=64)
            trainer.fit(module, _loader(), ckpt_path=ckpt_path)
            shown.append(seen.shown)
        (fresh_done, fresh_total, _), (resumed_done, resumed_total, lightnings) = shown
        assert fresh_done == fresh_total == 3 * accumulate
        # the epoch's batch index at max_steps: batch 6 of epoch 0; with accumulation batch 12 = batch 2 of epoch 1
        assert resumed_done == resumed_total == {1: 6, 2: 2}[accumulate]
        assert lightnings == 3  # Lightning's own total: the optimizer steps left ("6/3", or "12/3")


def test_requeue_signal_is_armed_only_under_slurm(tmp_path, monkeypatch) -> None:
    import signal

    from lightning.fabric.plugins.environments import SLURMEnvironment

    assert lp.requeue_signal(micro_trainer(tmp_path)) is None  # not a SLURM job
    for key, value in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="1", SLURM_NODELIST="n1").items():
        monkeypatch.setenv(key, value)
    assert lp.requeue_signal(micro_trainer(tmp_path)) == signal.SIGUSR1
    off = SLURMEnvironment(auto_requeue=False)
    assert lp.requeue_signal(micro_trainer(tmp_path, plugins=[off])) is None
    usr2 = SLURMEnvironment(requeue_signal=signal.SIGUSR2)
    assert lp.requeue_signal(micro_trainer(tmp_path, plugins=[usr2])) == signal.SIGUSR2
