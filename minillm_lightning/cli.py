"""The ``minillm`` command: LightningCLI for fit/validate/test/predict, plus the project's own verbs."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from minillm_lightning.callbacks import InterruptCheckpoint
from minillm_lightning.callbacks.interrupt import worker_crash_report
from minillm_lightning.callbacks.test_report import TestReport
from minillm_lightning.checkpoint import META_KEY, load_checkpoint, newest_intact_checkpoint
from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.stages.base import StageModule

LIGHTNING_VERBS = {"fit", "validate", "test", "predict"}
# other verbs: name -> "module:function" taking argv (imported lazily so `minillm fit` starts fast)
EXTRA_VERBS: dict[str, str] = {
    "generate": "minillm_lightning.commands.generate:generate_main",
    "chat": "minillm_lightning.commands.generate:chat_main",
    "eval": "minillm_lightning.commands.eval:eval_main",
    "export": "minillm_lightning.commands.export:export_main",
    "download": "minillm_lightning.commands.download:download_main",
    "pipeline": "minillm_lightning.commands.pipeline:pipeline_main",
    "bench": "minillm_lightning.bench.main:bench_main",
    "prepare": "minillm_lightning.commands.prepare:prepare_main",
    "serve": "minillm_lightning.commands.serve:serve_main",
}


class MiniLLMCLI(LightningCLI):
    """LightningCLI with the links every stage needs and checks on ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's vocabulary is whatever tokenizer the data module trained or loaded
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads hyperparameters from it.

        Done here (a public hook that runs right before LightningCLI's private ``_parse_ckpt_path``) rather
        than by overriding that private method.
        """
        super().parse_arguments(parser, args)
        self._check_ckpt_path()

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
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file")
        if ckpt_path and Path(ckpt_path).is_file():
            ckpt = load_checkpoint(ckpt_path)
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
        """``--ckpt_path last``: resume from the newest intact checkpoint, skipping damaged ones loudly."""
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") != "last":
            return
        dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        path, skipped = newest_intact_checkpoint(dirs)
        for bad in skipped:
            rank_zero_warn(f"!!! {bad} is truncated or corrupted; skipping it")
        if path is None:
            rank_zero_warn(f"--ckpt_path last: no checkpoint in {dirs}; starting from scratch")
            cfg["ckpt_path"] = None
        else:
            cfg["ckpt_path"] = str(path)
            if skipped:
                rank_zero_warn(f"--ckpt_path last: resuming from {path} instead")


def env_overrides(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """Make ``MINILLM_<VERB>__A__B=value`` variables beat values from ``--config`` files.

    jsonargparse reads environment variables as defaults, so a config file would override them. The
    seed's users expect the opposite (an environment variable patches a recipe without editing it), so
    the variables are turned into ``--a.b value`` arguments placed right after the last ``--config``;
    flags written on the command line after that still win.
    """
    environ = dict(os.environ if environ is None else environ)
    if not argv or argv[0] not in LIGHTNING_VERBS:
        return argv
    prefix = f"MINILLM_{argv[0].upper()}__"
    extra: list[str] = []
    for key, value in sorted(environ.items()):
        if key.startswith(prefix) and key != prefix + "CONFIG":
            extra += ["--" + key[len(prefix) :].lower().replace("__", "."), value]
    config_ends = [i + 2 for i, a in enumerate(argv) if a in ("--config", "-c")]
    config_ends += [i + 1 for i, a in enumerate(argv) if a.startswith("--config=")]
    if not extra or not config_ends:
        return argv
    at = max(config_ends)
    return argv[:at] + extra + argv[at:]


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_lightning_notices() -> None:
    """Drop what Lightning prints on every run that says nothing about the run: its "💡 Tip" adverts for litlogger
    and litmodels, and a deprecation warning raised inside its own use of torch's pytree (nothing a user can fix)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_lightning(args: list[str] | None = None, **cli_kwargs) -> MiniLLMCLI:
    """The LightningCLI behind ``minillm fit|validate|test|predict`` (``cli_kwargs`` override its settings,
    e.g. ``run=False`` to instantiate without running; then ``args`` carry no subcommand)."""
    # attribute docstrings (the OptimConfig fields' help) cost ~1.5 s to parse; only help text shows them
    argv = sys.argv[1:] if args is None else args
    set_parsing_settings(docstring_parse_attribute_docstrings=isinstance(argv, list) and wants_help(argv))
    quiet_lightning_notices()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    settings = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={"default_env": True, "env_prefix": "MINILLM"},
        save_config_kwargs={"overwrite": True},
        # TestReport: `minillm test` writes <checkpoint stem>.test.json next to the checkpoint
        trainer_defaults={"callbacks": [InterruptCheckpoint(), TestReport()]},
    )
    return MiniLLMCLI(StageModule, LightningDataModule, **{**settings, **cli_kwargs})


def wants_help(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help text: ``-h``, ``--help`` or jsonargparse's ``--<group>.help CLASS``."""
    return any(a in ("-h", "--help") or a.split("=", 1)[0].endswith(".help") for a in argv)


def exit_now(code: int) -> None:
    """End the process at once after a finished command: run the atexit handlers (logging, multiprocessing
    children) and flush the standard streams, then skip the interpreter's teardown of every imported module,
    which takes ~2.5 s after torch, Lightning and torchmetrics are loaded. Falls back to a normal exit while
    another non-daemon thread still runs (its work must not be cut off)."""
    import atexit
    import threading

    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


USAGE = """usage: minillm <command> [options]

Training (LightningCLI; `minillm <command> --help` lists every option):
  fit        train a stage:           minillm fit --config configs/pretrain_tiny.yaml
  validate   validation loop on a checkpoint
  test       test loop
  predict    prediction loop
{extra}
Every option can also come from an environment variable: MINILLM_FIT__TRAINER__MAX_STEPS=100 etc.
"""


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv else ""
    try:
        if verb in EXTRA_VERBS:
            module, func = EXTRA_VERBS[verb].split(":")
            getattr(__import__(module, fromlist=[func]), func)(argv[1:])
        elif verb in LIGHTNING_VERBS or verb.startswith("-") and verb not in ("-h", "--help"):
            with_env = env_overrides(argv)
            if from_shell:  # keep sys.argv truthful: DDP's launcher re-runs it for the other ranks
                sys.argv = sys.argv[:1] + with_env
            run_lightning(None if from_shell else with_env)
            if from_shell:
                exit_now(0)
        else:
            extra = "".join(f"  {name}\n" for name in EXTRA_VERBS)
            print(USAGE.format(extra=("\nOther commands:\n" + extra) if extra else ""))
            sys.exit(0 if verb in ("", "-h", "--help") else 2)
    except Exception as e:
        report = worker_crash_report(e)
        if report is not None and not os.environ.get("MINILLM_TRACEBACK"):
            what = str(report).splitlines()[0].strip().rstrip(".")  # PyTorch's text may end in ". "
            print(
                f"error: {what}. A data loading process died (often: out of memory, or a crash "
                f"in data code). Rerun with --data.init_args.num_workers 0 to see the underlying error in the main "
                f"process; the run's last.ckpt was saved, resume with --ckpt_path last",
                file=sys.stderr,
            )
            sys.exit(3)
        user_error = _find_user_error(e) or _invalid_option(e)
        if user_error is None or os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _find_user_error(exc: BaseException | None) -> MiniLLMError | None:
    """The MiniLLMError behind an exception, also when jsonargparse wrapped it while instantiating a class."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MiniLLMError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


PACKAGE_DIR = Path(__file__).resolve().parent


def _raised_in(exc: BaseException, directory: Path) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is a file under ``directory``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(directory)


def _invalid_option(exc: BaseException) -> ValueError | None:
    """The ValueError a minillm class raised on a bad option value while jsonargparse instantiated it.

    jsonargparse re-raises such an error inside its own multi-line "Does not validate against any of the Union
    subtypes" ValueError (exit code 1, traceback). The constructors' checks (``MiniGPTConfig.validate``,
    ``learning_rate must be positive``, ...) already name the field and the fix, so that innermost message is
    the one line the user needs.
    """
    if "jsonargparse" not in "".join(f.filename for f in traceback.extract_tb(exc.__traceback__)):
        return None
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    root = chain[-1]
    return root if isinstance(root, ValueError) and _raised_in(root, PACKAGE_DIR) else None


if __name__ == "__main__":
    main()
