"""The LightningCLI behind ``minillm fit|validate|test|predict``: the links every stage needs, checks on
``--ckpt_path`` and ``--ckpt_path last`` that skips damaged checkpoints. :mod:`minillm_lightning.cli` imports this
module only for those four verbs."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

import minillm_lightning
from minillm_lightning.callbacks import InterruptCheckpoint, LineProgress
from minillm_lightning.callbacks.test_report import TestReport
from minillm_lightning.callbacks.training_summary import PRE_FIT_WARNINGS
from minillm_lightning.checkpoint import META_KEY, load_checkpoint, newest_intact_checkpoint
from minillm_lightning.checkpoint_io import AtomicCheckpointIO
from minillm_lightning.cli import wants_help
from minillm_lightning.errors import CheckpointError, ConfigError
from minillm_lightning.stages.base import StageModule


class MiniLLMRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar with two labels and a total fixed.

    - Lightning labels the training bar ``Epoch {epoch}/{max_epochs - 1}``; every recipe here sets ``max_steps``
      and leaves ``max_epochs`` unset, which Lightning stores as -1, so it read "Epoch 0/-2". Such runs are
      labelled ``Epoch {epoch}``, as the TQDM bar labels every run; epoch-bound runs keep Lightning's label.
    - The logger's run number ``v_num`` went through the bar's float format ("v_num: 1.000"); it is shown as is.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # same padding as Lightning's: as wide as "Validation" so the bar does not jump between the two
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"

    _first_batch = 0  # batch index this epoch's bar started at: 0, or where a mid-epoch resume continues

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_batch = 0
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch: no epoch-start hook
            self._first_batch = batch_idx
            self._initialize_train_progress_bar_id()  # before the step, while global_step is the resumed one

    @property
    def total_train_batches(self) -> int | float:
        """Lightning's total for a step-bound run is the optimizer steps left, while the bar counts the batch index
        within the epoch, which after a mid-epoch resume starts past 0: resumed at step 3 of 6 it read "6/2". The
        total here is the batch index the epoch will have reached at ``max_steps`` (accumulation counted)."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, self._first_batch + left)
        return super().total_train_batches

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(items.get("v_num"), int):
            items["v_num"] = str(items["v_num"])
        return items


def choose_progress_bar(trainer: Trainer, terminal: bool | None = None) -> None:
    """Give a plain ``RichProgressBar`` (Lightning's default when ``rich`` is installed, or one a config lists
    with its own theme) the labels of :class:`MiniLLMRichProgressBar`, every setting kept; where standard output is
    not a terminal (``terminal``, default: ``sys.stdout.isatty()``), where a live bar shows nothing until the run
    ends, put :class:`~minillm_lightning.callbacks.LineProgress` in its place."""
    terminal = sys.stdout.isatty() if terminal is None else terminal
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            if terminal:
                callback.__class__ = MiniLLMRichProgressBar  # adds no state: only two display methods differ
            else:
                trainer.callbacks[i] = LineProgress()


_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS = re.compile(r"- Problem with given class_path '([^']+)':")
_BOILERPLATE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "- Expected a <class 'NoneType'>",
)


def concise_parser_error(message: str, prog: str) -> str:
    """One line for jsonargparse's message ``message`` of ``prog`` (e.g. ``minillm fit``).

    For a bad ``--model``/``--data`` key jsonargparse nests one block per level (the stage class, then e.g. its
    ``arch``), each listing every type of a union it tried (the class and ``None``) and the raw value. Kept: the
    flag as the user spells it and what was wrong at the innermost level, e.g.
    ``--model.init_args.learnig_rate: not an option of PretrainModule (its options: minillm fit --model.help
    minillm_lightning.PretrainModule)``. Any other message (``unrecognized arguments: ...``) is kept as it is,
    with where to find all options."""
    lines = message.splitlines()
    keys = [m[1] for line in lines if (m := _KEY.search(line))]
    classes = [m[1] for line in lines if (m := _CLASS.search(line))]
    if "Does not validate against any of the Union subtypes" not in message or not keys:
        return f"{message} (all options: {prog} --help)"
    last = max(i for i, line in enumerate(lines) if _KEY.search(line) or _CLASS.search(line))
    depth = len(lines[last]) - len(lines[last].lstrip())
    block = []
    for line in lines[last + 1 :]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        block.append(line.strip())
    reasons = [r for r in block if not r.startswith(_BOILERPLATE)]
    expected = [
        re.sub(r"<class '(\w+)'>", r"\1", r[len("- Expected a ") :]) for r in reasons if r.startswith("- Expected a ")
    ]
    got = [r[len("Given value: ") :] for r in reasons if r.startswith("Given value: ")]
    other = [r for r in reasons if not r.startswith(("- Expected a ", "Given value: "))]
    what = "; ".join([*other, *(["expected " + " or ".join(expected)] if expected else []), *[f"got {g}" for g in got]])
    flag = ".".join([f"--{keys[0]}.init_args", *keys[1:]]) if classes else "--" + ".".join(keys)
    unknown = [m[1] for r in other if (m := re.fullmatch(r"Option '([^']+)' is not accepted", r))]
    if unknown and len(unknown) == len(reasons):
        names = ", ".join(f"{flag}.{k}" for k in unknown)
        where = f"{prog} --{keys[0]}.help {classes[0]}"
        return f"{names}: not an option of {classes[-1].rsplit('.', 1)[-1]} (its options: {where})"
    return f"{flag}: {what or message} (all options: {prog} --help)"


class MiniLLMArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with a user error on one line (:func:`concise_parser_error`) instead of the ~50-line
    usage of ``fit`` and every union member jsonargparse tried."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises, as jsonargparse does inside nested parsers and in debug mode
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {concise_parser_error(message, parser.prog.replace(' [options]', ''))}\n")
        self.exit(2)


LISTED_IN_HELP = (
    "PretrainModule",
    "SFTModule",
    "RewardModule",
    "DPOModule",
    "PPOModule",
    "PretrainDataModule",
    "SFTDataModule",
    "PreferenceDataModule",
    "PromptDataModule",
)
CKPT_PATH_HELP = (
    "Resume this run from a checkpoint (fit), or evaluate one (validate/test/predict): a .ckpt file; `last`, the "
    "newest intact checkpoint in the ModelCheckpoint folder or a SLURM requeue checkpoint (hpc_ckpt_N.ckpt), "
    "whichever is newer (damaged files are skipped, and fit starts fresh when there is none); or `best`, "
    "<dirpath>/<filename>.ckpt of the ModelCheckpoint that monitors a metric. Weights, optimizer, schedule, loop "
    "counters, RNG and data position are restored. To start a NEW stage from an earlier stage's weights use "
    "--model.init_args.init_from instead."
)


def repeated_stateful_callbacks(entries: list[Any]) -> tuple[int, int] | None:
    """Positions ``(i, j)`` of the first two entries of ``trainer.callbacks`` (parsed ``class_path``/``init_args``)
    whose callbacks would keep their state in checkpoints under the same key (Lightning's ``state_key``), which
    Lightning's Trainer refuses with a traceback; None if there are none. Only callbacks whose key depends on their
    settings (ModelCheckpoint, EarlyStopping) are built for it; an entry that cannot be is left to the run."""
    seen: dict[str, int] = {}
    for j, entry in enumerate(entries):
        try:
            module, _, name = entry.class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if not isinstance(cls, type) or not issubclass(cls, Callback) or cls.state_dict is Callback.state_dict:
                continue
            if cls.state_key is Callback.state_key:  # Lightning's default: the class name
                key = cls.__qualname__
            else:
                init_args = entry.get("init_args") or {}
                key = cls(**(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)).state_key
        except Exception:
            continue
        if key in seen:
            return seen[key], j
        seen[key] = j
    return None


class MiniLLMCLI(LightningCLI):
    """LightningCLI with the links every stage needs and checks on ``--ckpt_path``."""

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # Lightning's text for ckpt_path advertises `hpc` and `registry` and an in-process `best`
        subparsers = [a.choices for a in self.parser._actions if isinstance(getattr(a, "choices", None), dict)]
        for parser in [self.parser, *(p for choices in subparsers for p in choices.values())]:
            for action in parser._actions:
                if action.dest == "ckpt_path":
                    action.help = CKPT_PATH_HELP

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        choose_progress_bar(self.trainer)
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; a plugin given by
            # the user is kept. Checkpoints are staged beside the target, not in $TMPDIR (maybe another filesystem)
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def before_instantiate_classes(self) -> None:
        self._refuse_repeated_callbacks()

    def _refuse_repeated_callbacks(self) -> None:
        """A second stateful callback of a kind the config lists (``--trainer.callbacks+=RegressionSuite`` on a
        config with one) failed in Lightning's Trainer with a traceback ending in "state_key must be unique", after
        the data module was prepared. One line instead, up front, with ways to change the settings of the callback
        the config has."""
        entries = (self._get(self.config, "trainer") or {}).get("callbacks") or []
        entries = entries if isinstance(entries, list) else [entries]
        pair = repeated_stateful_callbacks(entries)
        if pair is None:
            return
        first, second = pair
        name = entries[first].class_path.rpartition(".")[2]
        config = next(iter(self._get(self.config, "config") or []), "CONFIG")
        # jsonargparse applies --trainer.callbacks.init_args.X to the last callback of the list, and to no other
        last = (
            f"; --trainer.callbacks.init_args.OPTION VALUE works too, as the config's {name} is its last callback"
            if (first, second) == (len(entries) - 2, len(entries) - 1)
            else ""
        )
        raise ConfigError(
            f"trainer.callbacks lists {name} twice (the config's and one added by --trainer.callbacks+=?): a run "
            f"takes one, as its state is saved in checkpoints under one key. Drop the second; to change the "
            f"settings of the first, edit its init_args in a copy of the config (minillm {self.subcommand or 'fit'} "
            f"--config {config} --print_config > my.yaml, then --config my.yaml), or give the whole list: "
            f"--trainer.callbacks '[{{class_path: ..., init_args: {{...}}}}, ...]'{last}"
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's vocabulary is whatever tokenizer the data module trained or loaded
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads hyperparameters from it.

        Done here (a public hook that runs right before LightningCLI's private ``_parse_ckpt_path``) rather
        than by overriding that private method.
        """
        super().parse_arguments(parser, args)
        self._check_trainer_numbers()
        self._check_ckpt_path()
        # LightningCLI then merges a checkpoint FILE's hyperparameters over the parsed config, silently undoing the
        # --model flags given with it, while `last`/`best` (files only later) kept them. Held back until the run
        # starts, an explicit file behaves as `last` does: the config and command line rule, and a checkpoint whose
        # weights do not fit the model they describe is refused (StageModule._check_backbone_fits).
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        self._ckpt_file = ckpt_path if ckpt_path not in (None, "last", "best") else None
        if self._ckpt_file:
            self.config[sub]["ckpt_path"] = None

    def _check_trainer_numbers(self) -> None:
        """Values Lightning takes, then fails on in the first step with a ZeroDivisionError (0), silently misuses (a
        negative accumulation; a negative clip value turns clipping off) or refuses with numpy's traceback (a seed
        outside 0..2**32-1)."""
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        seed = config.get("seed_everything")
        if type(seed) is int and not 0 <= seed < 2**32:
            raise ConfigError(f"seed_everything must be in 0..2**32-1 (numpy's range), got {seed}")
        trainer = config.get("trainer") or {}
        accumulate, interval = trainer.get("accumulate_grad_batches"), trainer.get("val_check_interval")
        if accumulate is not None and accumulate < 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches must be >= 1 (batches per optimizer step), got {accumulate}"
            )
        clip = trainer.get("gradient_clip_val")
        if clip is not None and clip < 0:  # Lightning skips clipping for any value <= 0, without a word
            raise ConfigError(f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip}")
        if type(interval) is int and interval < 1:
            raise ConfigError(f"trainer.val_check_interval must be >= 1 (batches) or a share in (0, 1], got {interval}")

    def _check_ckpt_path(self) -> None:
        """Refuse a missing or corrupted ``--ckpt_path``, or a checkpoint of another stage, up front.

        LightningCLI re-reads the model's hyperparameters from the checkpoint; given a checkpoint of
        another stage it would silently switch the model class. Starting a new stage from earlier
        weights is what ``--model.init_from`` is for.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path in ("hpc", "registry") or (ckpt_path or "").startswith("registry:"):
            raise CheckpointError(
                f"--ckpt_path {ckpt_path}: not supported by minillm; give last, best or a checkpoint file"
            )
        if ckpt_path and ckpt_path not in ("last", "best"):
            if Path(ckpt_path).is_dir():
                example = Path(ckpt_path) / "last.ckpt"
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path} is a directory; pass a .ckpt file in it (e.g. {example})"
                )
            if not Path(ckpt_path).is_file():
                raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file")
            ckpt = load_checkpoint(ckpt_path, mmap=True)  # only its metadata; Lightning loads it next
            stage = ckpt.get(META_KEY, {}).get("stage")
            model_cfg = self.config[sub].get("model")
            wanted = getattr(model_cfg, "class_path", "") if model_cfg is not None else ""
            cls_path = ckpt.get("hyper_parameters", {}).get("_class_path", "")
            if wanted and cls_path and wanted != cls_path:
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path} is a {stage or cls_path} checkpoint but this config trains "
                    f"{wanted.rsplit('.', 1)[-1]}; --ckpt_path resumes the SAME stage. To start a new stage "
                    f"from its weights use --model.init_from {ckpt_path}"
                )

    def before_fit(self) -> None:
        self._resolve_named_checkpoint()
        self._quiet_own_checkpoint_dirs()

    def before_validate(self) -> None:
        self._resolve_named_checkpoint()

    def before_test(self) -> None:
        self._resolve_named_checkpoint()

    def before_predict(self) -> None:
        """Prediction writes a completion per prompt: it needs prompts (a PromptDataModule, as configs/predict.yaml
        sets) and a writer. A stage's training config failed after loading the weights with Lightning's
        "predict_dataloader must be implemented", or, with PPO's prompts, generated and dropped every completion."""
        from minillm_lightning.callbacks import CompletionWriter
        from minillm_lightning.data.prompts import PromptDataModule

        if not isinstance(self.datamodule, PromptDataModule):
            raise ConfigError(
                f"minillm predict writes a completion per prompt: it needs data from a PromptDataModule, not "
                f"{type(self.datamodule).__name__}; start from configs/predict.yaml (--model.init_args.init_from CKPT "
                f"--data.init_args.tokenizer CKPT --data.init_args.sources [prompts.jsonl])"
            )
        if not any(isinstance(cb, CompletionWriter) for cb in self.trainer.callbacks):
            raise ConfigError(
                "minillm predict without a CompletionWriter callback would generate and discard every completion; "
                "add minillm_lightning.callbacks.CompletionWriter to trainer.callbacks (see configs/predict.yaml)"
            )
        self._resolve_named_checkpoint()

    def _resolve_named_checkpoint(self) -> None:
        """``--ckpt_path last`` or ``best`` as a file: Lightning knows the best checkpoint only within the process
        that wrote it (``best`` in a new process was refused as "not configured to save the best model")."""
        cfg = self.config_init[self.subcommand]
        if getattr(self, "_ckpt_file", None):
            cfg["ckpt_path"] = self._ckpt_file
        self._resolve_last()
        if cfg.get("ckpt_path") != "best":
            return
        found = [
            Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
            for cb in self.trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) and cb.dirpath and cb.filename and "{" not in cb.filename
        ]
        found = [f for f in found if f.is_file()]
        if not found:
            raise CheckpointError(
                "--ckpt_path best: no best checkpoint found (a ModelCheckpoint with a monitor and a fixed filename, "
                "as in the shipped configs, writes <dirpath>/<filename>.ckpt); give the checkpoint file instead"
            )
        load_checkpoint(found[0], mmap=True)  # a damaged file: one line naming it
        cfg["ckpt_path"] = str(found[0])

    def _quiet_own_checkpoint_dirs(self) -> None:
        """Drop Lightning's "Checkpoint directory ... exists and is not empty" where nothing is at stake: a first
        run's directory holds only the logger's ``tb/`` (the recipes log beside their checkpoints), and a resumed
        run writes on purpose where it left off. It stays for a new run into a directory holding checkpoints,
        whose ``last.ckpt``/``best.ckpt`` that run will replace."""
        # without --ckpt_path under SLURM, Lightning itself resumes from a requeue checkpoint (hpc_ckpt_N.ckpt)
        resuming = bool(self.config_init[self.subcommand].get("ckpt_path"))
        resuming = resuming or (SLURMEnvironment.detect() and bool(self._hpc_checkpoints()))
        for cb in self.trainer.checkpoint_callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if dirpath and (resuming or not any(Path(dirpath).glob("*.ckpt"))):
                message = re.escape(f"Checkpoint directory {dirpath} exists and is not empty")
                warnings.filterwarnings("ignore", message=message)

    def _hpc_checkpoints(self) -> list[Path]:
        """The checkpoints Lightning's SLURM auto-requeue wrote (``<default_root_dir>/hpc_ckpt_N.ckpt``)."""
        return sorted(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: resume from the newest intact checkpoint, skipping damaged ones loudly."""
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") != "last":
            return
        dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        path, skipped = newest_intact_checkpoint(dirs, self._hpc_checkpoints())
        for bad in skipped:
            rank_zero_warn(f"!!! {bad} is truncated or corrupted; skipping it")
        if path is None:
            rank_zero_warn(f"--ckpt_path last: no checkpoint in {dirs}; starting from scratch")
            cfg["ckpt_path"] = None
        else:
            cfg["ckpt_path"] = str(path)
            if skipped:
                rank_zero_warn(f"--ckpt_path last: resuming from {path} instead")


class _Dropping(logging.Filter):
    """A log filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


# one instance each: addFilter skips a filter already attached, so calling quiet_lightning_notices again adds none
_ADVERT = _Dropping("💡 Tip")
_DROP_LAST_CAUTION = _Dropping("have disabled the `drop_last` option")
_WEIGHTS_ONLY_DEFAULT = _Dropping("`weights_only` was not set")


def quiet_lightning_notices() -> None:
    """Drop what Lightning prints on every run that says nothing about the run: its "💡 Tip" adverts for litlogger
    and litmodels, a deprecation warning raised inside its own use of torch's pytree (nothing a user can fix), and
    its caution that an ``IterableDataset`` with ``__len__`` may be miscounted by several DataLoader workers: the
    only iterable datasets here are LitData's streaming datasets, which split their chunks among workers and ranks
    themselves (the training summary counted it as a warning on every pretraining run); LitData's ``drop_last``
    caution on the evaluation sets, printed by every rank of a DDP pretraining run; and the note that a save
    without ``weights_only`` writes a full checkpoint."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_ADVERT)
    # LitData's caution, once per rank, that a distributed StreamingDataset without drop_last "may lead to training
    # interruptions": the pretraining validation and test sets keep every block on purpose (training drops the
    # rest); their metrics are reduced at the epoch's end (val/loss on 2 ranks is the 1-rank value)
    logging.getLogger("litdata.streaming.dataset").addFilter(_DROP_LAST_CAUTION)
    # a save that did not pass weights_only (SLURM's requeue save, a callback's) writes a full checkpoint, as ours do
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(_WEIGHTS_ONLY_DEFAULT)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def run_lightning(args: list[str] | None = None, **cli_kwargs) -> MiniLLMCLI:
    """The LightningCLI behind ``minillm fit|validate|test|predict`` (``cli_kwargs`` override its settings,
    e.g. ``run=False`` to instantiate without running; then ``args`` carry no subcommand)."""
    # attribute docstrings (the OptimConfig fields' help) cost ~1.5 s to parse; only help text shows them
    argv = sys.argv[1:] if args is None else args
    help_wanted = isinstance(argv, list) and wants_help(argv)
    set_parsing_settings(docstring_parse_attribute_docstrings=help_wanted)
    if help_wanted:  # --help lists them as the known subclasses of --model and --data (loaded lazily otherwise)
        for name in LISTED_IN_HELP:
            getattr(minillm_lightning, name)
    quiet_lightning_notices()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    settings = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        # allow_abbrev off: argparse took `--trainer.max_step 3` for `--trainer.max_steps 3` without a word
        parser_kwargs={
            "default_env": True,
            "env_prefix": "MINILLM",
            "allow_abbrev": False,
            **{verb: {"allow_abbrev": False} for verb in ("fit", "validate", "test", "predict")},
        },
        parser_class=MiniLLMArgumentParser,
        save_config_kwargs={"overwrite": True},
        # no --optimizer/--lr_scheduler: each stage builds its optimizer and schedule from its own options (warmup,
        # decay, Muon); Lightning's flags replaced them all, with only a warning to say so
        auto_configure_optimizers=False,
        # TestReport: `minillm test` writes <checkpoint stem>.test.json next to the checkpoint
        trainer_defaults={"callbacks": [InterruptCheckpoint(), TestReport()]},
    )
    PRE_FIT_WARNINGS.start()  # a TrainingSummary counts the warnings shown while the model and data are built
    try:
        return MiniLLMCLI(StageModule, LightningDataModule, **{**settings, **cli_kwargs})
    finally:
        PRE_FIT_WARNINGS.take()  # those of a run without a TrainingSummary (or with run=False) are dropped
