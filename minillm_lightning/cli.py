"""The ``minillm`` command: LightningCLI for fit/validate/test/predict, plus the project's own verbs.

This module imports no Lightning and no torch: ``minillm --help`` and the verbs that need neither Lightning nor a
Trainer (generate, chat, eval, export, download, serve) start without them. The LightningCLI itself lives in
:mod:`minillm_lightning.trainer_cli`, imported only for the four Lightning verbs.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from pathlib import Path

from minillm_lightning.errors import MiniLLMError, worker_crash_report
from minillm_lightning.fileio import check_config_file

LIGHTNING_VERBS = {"fit", "validate", "test", "predict"}
# exit code of a run stopped by SIGTERM (the shell's convention, 128 + signal number), so `minillm fit ... && next`
# stops there; Ctrl+C exits 1 (Lightning's choice), a dead DataLoader worker 3, a user error 2
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# other verbs: name -> "module:function" taking argv (imported lazily so `minillm fit` starts fast)
EXTRA_VERBS: dict[str, str] = {
    "generate": "minillm_lightning.commands.generate:generate_main",
    "chat": "minillm_lightning.commands.generate:chat_main",
    "eval": "minillm_lightning.commands.eval:eval_main",
    "export": "minillm_lightning.commands.export:export_main",
    "download": "minillm_lightning.commands.download:download_main",
    "pipeline": "minillm_lightning.commands.pipeline:pipeline_main",
    "bench": "minillm_lightning.bench.args:bench_main",
    "prepare": "minillm_lightning.commands.prepare:prepare_main",
    "serve": "minillm_lightning.commands.serve:serve_main",
    "curves": "minillm_lightning.commands.curves:curves_main",
}
# one line each for `minillm --help`
VERB_HELP = {
    "generate": "continue prompts from a checkpoint:  minillm generate --checkpoint CKPT --prompt TEXT",
    "chat": "multi-turn chat in the terminal:     minillm chat --checkpoint checkpoints/sft_tiny/last.ckpt",
    "eval": "zero-shot tasks and perplexity:      minillm eval --checkpoint CKPT --tasks wikitext2",
    "export": "Hugging Face Llama/Mixtral folder:   minillm export --checkpoint CKPT --output DIR",
    "download": "fetch a public corpus into data/:    minillm download tinyshakespeare",
    "pipeline": "every stage in one command:          minillm pipeline --size tiny",
    "bench": "speed, MFU, memory, wall clock:      minillm bench --config configs/pretrain_tiny.yaml",
    "prepare": "tokenize a pretraining corpus once:  minillm prepare --config CONFIG",
    "serve": "OpenAI-compatible HTTP server:       minillm serve --checkpoint CKPT",
    "curves": "a run's curves as a table:           minillm curves checkpoints/sft_tiny --tags 'val/*'",
}


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


_ARGPARSE_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")  # the negative numbers argparse tells from options


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` becomes ``--lr=-1e-3``: argparse takes a negative number it does not recognise as one
    (exponent form, ``-1.``, ``-inf``) for an option, so ``--model.init_args.learning_rate -1e-3`` failed with
    "argument --model: expected one argument" instead of reaching the value check."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if prev.startswith("--") and "=" not in prev and token.startswith("-") and not _ARGPARSE_NEGATIVE.match(token):
            try:
                float(token)
            except ValueError:
                pass
            else:
                out[-1] = f"{prev}={token}"
                continue
        out.append(token)
    return out


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (or ``--config=``) in ``argv``."""
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return given + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


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
    argv = join_negative_numbers(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv else ""
    try:
        if verb in EXTRA_VERBS:
            module, func = EXTRA_VERBS[verb].split(":")
            getattr(__import__(module, fromlist=[func]), func)(argv[1:])
        elif verb in LIGHTNING_VERBS or verb.startswith("-") and verb not in ("-h", "--help"):
            with_env = join_negative_numbers(env_overrides(argv))
            for config in config_files(with_env):
                if Path(config).exists():  # a broken file: one line naming it (jsonargparse names no file)
                    check_config_file(config)
            if from_shell:  # keep sys.argv truthful: DDP's launcher re-runs it for the other ranks
                sys.argv = sys.argv[:1] + with_env
            from minillm_lightning.trainer_cli import run_lightning

            run_lightning(None if from_shell else with_env)
            if from_shell:
                exit_now(0)
        else:
            extra = "".join(f"  {name:<10} {VERB_HELP.get(name, '')}".rstrip() + "\n" for name in EXTRA_VERBS)
            usage = USAGE.format(extra=("\nOther commands (`minillm <command> --help` for options):\n" + extra))
            if verb in ("-h", "--help"):
                print(usage)
                sys.exit(0)
            if not verb:  # no command: the usage, and a failure for scripts that forgot one
                print(f"{usage}\nerror: no command given; choose one of the commands above", file=sys.stderr)
                sys.exit(2)
            print(f"{usage}\nerror: unknown command {verb!r}; choose one of the commands above", file=sys.stderr)
            sys.exit(2)
    except KeyboardInterrupt:  # a verb's own work (Lightning's loops handle Ctrl+C themselves and exit 1)
        if os.environ.get("MINILLM_TRACEBACK"):
            raise
        print("\ninterrupted (Ctrl+C)", file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:
        if _is_sigterm(e):  # Lightning's SIGTERMException is a SystemExit without a code: it would exit 0
            sys.exit(SIGTERM_EXIT_CODE)
        raise
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
        user_error = _find_user_error(e) or _invalid_option(e) or _misconfiguration(e) or _strategy_error(e)
        user_error = user_error or _peer_failed(e)
        if user_error is None or os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _misconfiguration(exc: BaseException) -> str | None:
    """Lightning's MisconfigurationException (Trainer flags that contradict each other or the config's callbacks,
    e.g. ``--trainer.logger false`` with the shipped LearningRateMonitor) as one line with where to fix it."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.MisconfigurationException):
        return None
    text = " ".join(str(exc).split())
    if "callback" in text.lower():
        text += (
            " (the config's trainer.callbacks includes it: remove it from that list, or drop the Trainer flag; "
            "`--print_config` shows the list)"
        )
    return text


CPU_STRATEGY_HINT = (
    "on a CPU use --trainer.strategy ddp (gloo), not FSDP or DeepSpeed (configs/strategies/*.yaml): they need CUDA GPUs"
)
_UNION_ERROR = "Does not validate against any of the Union subtypes"
_GIVEN_CLASS = re.compile(r"^Given value: Namespace\(class_path='([^']+)'", re.MULTILINE)


# what a rank's collective says when another rank's process ended (gloo; NCCL's DistBackendError)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "DistBackendError")


def _peer_failed(exc: BaseException) -> str | None:
    """A collective that broke because another rank stopped (say, rank 0 on a data error in ``prepare_data``, which
    only it runs): one line pointing at that rank's error instead of a 35-line traceback of the barrier after it.
    Only in a process that joined a process group (a broken HTTP download is not another rank's failure)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if not any(p in f"{type(exc).__name__}: {exc}" for p in _PEER_GONE):
        return None
    return f"rank {dist.get_rank()} stopped because another rank failed; that rank's error is printed above"


def _strategy_error(exc: BaseException) -> str | None:
    """A Trainer flag Lightning refuses while it builds the Trainer, as one line instead of a 35-60 line traceback:

    - a ValueError of Lightning's accelerator connector, e.g. FSDP on a CPU (``--config configs/strategies/fsdp.yaml``
      or ``--trainer.strategy fsdp`` without CUDA): its message, plus what works on a CPU;
    - a Lightning class of the config (``trainer.strategy: class_path: ...DeepSpeedStrategy`` without the
      ``deepspeed`` package) that failed to build: jsonargparse lists the class's own error among the union members
      it tried; that error, with the class's name.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, ValueError) and frames and frames[-1].filename.endswith("accelerator_connector.py"):
        text = " ".join(str(exc).split())
        return f"{text} ({CPU_STRATEGY_HINT})" if "gpu accelerator" in text.lower() else text
    message = str(exc)
    if not (isinstance(exc, ValueError) and message.startswith(_UNION_ERROR)):
        return None
    if not any(f.name == "instantiate_classes" and "jsonargparse" in f.filename for f in frames):
        return None
    given = _GIVEN_CLASS.search(message)
    if given is None or not given[1].startswith("lightning."):
        return None
    errors = message.split("\nErrors:\n", 1)[1].split("\nGiven value type:", 1)[0] if "\nErrors:\n" in message else ""
    reasons = [r.strip()[2:] for r in errors.splitlines() if r.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith("Expected a ")]
    if len(reasons) != 1:
        return None
    torch = sys.modules.get("torch")
    no_gpu = torch is not None and not torch.cuda.is_available()
    hint = f" ({CPU_STRATEGY_HINT})" if ".strategies." in given[1] and no_gpu else ""
    return f"{given[1]}: {reasons[0]}{hint}"


def _is_sigterm(exc: BaseException) -> bool:
    """Whether ``exc`` is Lightning's SIGTERMException (raised between batches after a SIGTERM; the checkpoint
    is saved by then). Looked up in ``sys.modules``: only a verb that already imported Lightning raises it."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.SIGTERMException)


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
