"""The `minillm` command as users run it: real subprocesses on the shipped config and sample data."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from minillm_lightning.cli import env_overrides, main, wants_help

CONFIG = "configs/pretrain_tiny.yaml"
# a fast variant of the tiny recipe: micro model, short blocks
FAST = [
    "--model.init_args.arch.n_layer=2",
    "--model.init_args.arch.dim=64",
    "--data.init_args.seq_len=64",
    "--data.init_args.vocab_size=1024",
    "--trainer.log_every_n_steps=2",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A working directory that sees the project's configs/ and data/ but writes its own checkpoints/."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(ROOT / "data" / "sample")
    return tmp_path


def minillm(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "minillm_lightning.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def training_process(args: list[str], cwd: Path) -> Iterator[subprocess.Popen]:
    """``minillm <args>`` as a child process that is killed when the block ends, also when a check failed (a
    runaway ``max_steps=100000`` run would slow every later test).

    The child starts with Python's default SIGINT handling even when pytest itself was started in the
    background by a non-interactive shell, which sets SIGINT to "ignore" for its children (Python then leaves it
    ignored, and a test of Ctrl+C would wait for nothing).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "minillm_lightning.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for_training(run_dir: Path, timeout: float = 240) -> None:
    """Block until the run has logged a training scalar (so optimizer steps have happened)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    deadline = time.time() + timeout
    while time.time() < deadline:
        for version in run_dir.glob("tb/version_*"):
            acc = EventAccumulator(str(version))
            acc.Reload()
            if any(t.startswith(("train/", "env/")) for t in acc.Tags().get("scalars", [])):
                return
        time.sleep(0.5)
    raise AssertionError(f"no training step logged in {run_dir} within {timeout}s")


def test_wants_help_spots_every_help_flag() -> None:
    assert wants_help(["fit", "--help"]) and wants_help(["-h"])
    assert wants_help(["fit", "--config", "c.yaml", "--model.help", "minillm_lightning.PretrainModule"])
    assert wants_help(["fit", "--data.help=minillm_lightning.PretrainDataModule"])
    assert not wants_help(["fit", "--config", "help.yaml", "--print_config"])
    assert not wants_help(["fit", "--model.init_args.helper", "1"])


EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from minillm_lightning.cli import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
if sys.argv[2] == "thread":  # a non-daemon thread still working: exit_now must let it finish
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
sys.stdout.write("unflushed output")
exit_now(0)
(out / "after").write_text("exit_now returned")
"""


@pytest.mark.parametrize("mode", ["plain", "thread"])
def test_exit_now_runs_atexit_handlers_flushes_and_waits_for_threads(tmp_path, mode) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "unflushed output"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()
    assert (tmp_path / "thread").exists() == (mode == "thread")


def test_help_and_print_config(workdir: Path) -> None:
    top = minillm(["--help"], workdir)
    assert top.returncode == 0 and "fit" in top.stdout
    from minillm_lightning.cli import EXTRA_VERBS, VERB_HELP

    for verb in EXTRA_VERBS:  # every command is listed with what it does and an example
        assert f"  {verb:<10} {VERB_HELP[verb]}" in top.stdout
    typo = minillm(["fitt"], workdir)
    assert typo.returncode == 2 and typo.stderr.strip().endswith(
        "error: unknown command 'fitt'; choose one of the commands above"
    )
    helped = minillm(["fit", "--config", CONFIG, "--model.help", "minillm_lightning.PretrainModule"], workdir)
    assert helped.returncode == 0
    assert "peak adamw learning rate" in helped.stdout.lower() and "init_from" in helped.stdout
    printed = minillm(["fit", "--config", CONFIG, "--print_config"], workdir)
    assert printed.returncode == 0
    assert "class_path: minillm_lightning.PretrainModule" in printed.stdout
    assert "max_steps: 600" in printed.stdout
    assert "n_kv_head:" in printed.stdout and "sample_ratio:" in printed.stdout  # every knob is listed


def test_env_overrides_beat_config_but_not_flags(workdir: Path) -> None:
    env = {"MINILLM_FIT__TRAINER__MAX_STEPS": "77", "MINILLM_FIT__DATA__INIT_ARGS__VAL_SHARE": "0.2"}
    printed = minillm(["fit", "--config", CONFIG, "--print_config"], workdir, env)
    assert "max_steps: 77" in printed.stdout and "val_share: 0.2" in printed.stdout
    flag = minillm(["fit", "--config", CONFIG, "--trainer.max_steps", "5", "--print_config"], workdir, env)
    assert "max_steps: 5" in flag.stdout
    assert env_overrides(["fit", "--trainer.max_steps", "3"], env) == ["fit", "--trainer.max_steps", "3"]


def test_fit_writes_checkpoints_logs_config_and_stats(workdir: Path) -> None:
    r = minillm(["fit", "--config", CONFIG, *FAST, "--trainer.max_steps=12", "--trainer.val_check_interval=6"], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    run = workdir / "checkpoints" / "pretrain_tiny"
    assert (run / "last.ckpt").is_file() and (run / "best.ckpt").is_file()
    assert list((run / "tb").glob("version_*/events.out.tfevents.*")), "TensorBoard events missing"
    assert list((run / "tb").glob("version_*/config.yaml")), "resolved config missing"
    stats = list((run / "tb").glob("version_*/dataset_stats.json"))
    assert stats and "pretrain.jsonl" in stats[0].read_text()
    assert "MiniGPT[tiny] pretrain:" in r.stdout + r.stderr  # parameter count at start-up
    # Lightning's adverts, its internal pytree deprecation and its IterableDataset caution are filtered out
    # (quiet_lightning_notices); our checkpoint saves say they keep the full state (no `weights_only` notice)
    out = r.stdout + r.stderr
    assert "Tip:" not in out and "LeafSpec" not in out and "IterableDataset" not in out and "weights_only" not in out
    assert "warnings: 0" in out  # the training summary saw none
    assert "exists and is not empty" not in out  # the run's directory held only its own logs
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12 and "tokenizer" in ckpt
    # a NEW run into the same directory will replace last.ckpt/best.ckpt: Lightning's caution stays
    again = minillm(
        ["fit", "--config", CONFIG, *FAST, "--trainer.max_steps=2", "--trainer.val_check_interval=2"], workdir
    )
    assert again.returncode == 0 and "exists and is not empty" in again.stdout + again.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_continues(workdir: Path, sig: signal.Signals) -> None:
    args = ["fit", "--config", CONFIG, *FAST, "--trainer.max_steps=100000", "--trainer.val_check_interval=50"]
    with training_process(args, workdir) as proc:
        wait_for_training(workdir / "checkpoints" / "pretrain_tiny")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)  # saving and exiting can take minutes on a loaded 2-core machine
    last = workdir / "checkpoints" / "pretrain_tiny" / "last.ckpt"
    assert last.is_file(), out[-3000:]
    assert "Resume with:" in out and "--ckpt_path last" in out
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 1}[sig]  # a stopped run is no success
    step = torch.load(last, weights_only=True)["global_step"]
    assert step > 0
    r = minillm(["fit", "--config", CONFIG, *FAST, f"--trainer.max_steps={step + 4}", "--ckpt_path", "last"], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"continuing at step {step}" in r.stdout + r.stderr
    assert "exists and is not empty" not in r.stdout + r.stderr  # resuming writes there on purpose
    assert torch.load(last, weights_only=True)["global_step"] == step + 4


def test_ctrl_c_while_litdata_tokenizes_exits_1_and_cleans_up(workdir: Path) -> None:
    """LitData's own Ctrl+C handler could hang `minillm prepare` (workers defunct, the main process in a futex)
    or end `minillm fit` with exit status 0 and a half-written `.tmp-` folder. Ctrl+C now interrupts like anywhere
    else: exit 1, one line, the workers killed and the temporary folder removed."""
    import json
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to its home in snow rain sun tree".split()
    with (workdir / "big.jsonl").open("w") as f:  # ~45 MB: several seconds of tokenizing on two workers
        for _ in range(180_000):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n")
    args = ["prepare", "--config", CONFIG, "--data.init_args.sources", "[{path: big.jsonl}]"]
    args += ["--data.init_args.cache_dir", "cache"]
    with training_process(args, workdir) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Starting data processing" in line:  # LitData's workers run
                break
        else:
            pytest.fail("".join(lines[-30:]))
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "\ninterrupted (Ctrl+C)\n" in out, out[-3000:]  # (LitData's bar may follow)
    assert not [p for p in (workdir / "cache" / "tokens").iterdir() if ".tmp-" in p.name]
    assert not list((workdir / "cache" / "tokens").glob("*/meta.json"))  # nothing claims to be prepared


def test_ddp_two_cpu_processes(workdir: Path) -> None:
    r = minillm(
        [
            "fit",
            "--config",
            CONFIG,
            *FAST,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.accelerator=cpu",
        ],
        workdir,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ckpt = torch.load(workdir / "checkpoints" / "pretrain_tiny" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2


def test_clear_errors_without_traceback(workdir: Path, tiny_pretrain_ckpt: Path) -> None:
    bad_heads = minillm(["fit", "--config", CONFIG, "--model.init_args.arch.n_head=3"], workdir)
    assert bad_heads.returncode != 0
    assert "n_head=3 does not divide dim=128" in bad_heads.stderr
    missing = minillm(["fit", "--config", CONFIG, "--data.init_args.sources=[{path: nope/*.jsonl}]"], workdir)
    assert missing.returncode == 2 and "matches no file" in missing.stderr and "Traceback" not in missing.stderr
    wrong = minillm(["fit", "--config", CONFIG, *FAST, "--ckpt_path", "nope.ckpt"], workdir)
    assert wrong.returncode == 2 and "no such file" in wrong.stderr


def test_light_verbs_start_without_lightning() -> None:
    """`minillm --help` and `minillm bench`'s option parsing load neither torch nor Lightning; generate, chat, eval
    and export load torch but not Lightning (the package's names are resolved on first use), and every public name
    still imports from the package."""
    probe = (
        "import sys, importlib\n"
        "from minillm_lightning.cli import main\n"
        "from minillm_lightning.bench.args import parse_args\n"
        "top = {m for m in ('torch', 'lightning') if m in sys.modules}\n"
        "for name in ('generate', 'eval', 'export'):  # chat lives in generate\n"
        "    importlib.import_module('minillm_lightning.commands.' + name)\n"
        "light = {m for m in ('torch', 'lightning', 'torchmetrics') if m in sys.modules}\n"
        "import minillm_lightning\n"
        "names = [getattr(minillm_lightning, n).__name__ for n in minillm_lightning.__all__ if n != 'TASKS']\n"
        "print(sorted(top), sorted(light), len(names), 'lightning' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import minillm_lightning

    assert run.stdout.split() == ["[]", "['torch']", str(len(minillm_lightning.__all__) - 1), "True"], run.stdout

    with pytest.raises(AttributeError, match="no attribute 'NoSuchModule'"):
        minillm_lightning.NoSuchModule  # noqa: B018
    assert {"PretrainModule", "RegressionSuite", "MemoryGuard", "GradientHealthMonitor"} <= set(dir(minillm_lightning))


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--model.init_args.learnig_rate", "0.001"],
            "error: --model.init_args.learnig_rate: not an option of PretrainModule "
            "(its options: minillm fit --model.help minillm_lightning.PretrainModule)",
        ),
        (
            ["--model.init_args.arch.dimm", "3"],
            "error: --model.init_args.arch.dimm: not an option of MiniGPTConfig "
            "(its options: minillm fit --model.help minillm_lightning.PretrainModule)",
        ),
        (
            ["--model.init_args.arch.n_layer", "x"],
            "error: --model.init_args.arch.n_layer: expected int; got x (all options: minillm fit --help)",
        ),
        (
            ["--data.init_args.tokenizer_type", "wordpiece"],
            "error: --data.init_args.tokenizer_type: Expected a typing.Literal['bpe', 'unigram', 'char']. "
            "Got value: wordpiece (all options: minillm fit --help)",
        ),
        (
            ["--trainer.max_stepz", "3"],
            "error: unrecognized arguments: --trainer.max_stepz 3 (all options: minillm fit --help)",
        ),
        (  # argparse took a prefix of an option for the option, without a word
            ["--trainer.max_step", "3"],
            "error: unrecognized arguments: --trainer.max_step 3 (all options: minillm fit --help)",
        ),
    ],
)
def test_config_errors_are_one_line(
    args: list[str], line: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt or mistyped option used to print fit's ~50-line usage, then every union member jsonargparse tried
    (the stage class and None) with the raw value; now one line names the flag as typed and where its options are."""
    from minillm_lightning.trainer_cli import run_lightning

    monkeypatch.setattr(sys, "argv", ["minillm"])  # the parser's prog, as the console script has it
    with pytest.raises(SystemExit) as exc:
        run_lightning(["fit", "--config", str(ROOT / CONFIG), *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.splitlines() == [line], err


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (b"trainer:\n  max_steps: 3\n  bad: [1,\n", "not valid YAML at line 4, column 1: expected the node content"),
        (b"trainer: {max_steps: 3}\n\xff\n", "not UTF-8 text (byte 24); save it as UTF-8"),
        (b"- fit\n- 3\n", "holds a list, not a mapping of settings"),
        (b"", "holds no settings (empty or only comments); fill or drop it"),  # jsonargparse: "Unexpected config: "
        (b"# my changes, to do\n", "holds no settings (empty or only comments); fill or drop it"),
    ],
)
def test_broken_config_file_is_named(text: bytes, line: str, tmp_path: Path, capsys) -> None:
    """jsonargparse said `in "<unicode string>", line 4` for a YAML error (which of two --config files?), and a
    file that is not UTF-8 or not a mapping ended in a traceback."""
    bad = tmp_path / "mine.yaml"
    bad.write_bytes(text)
    # `minillm bench` said jsonargparse's "Unexpected config: - fit ..." or "Problems parsing config" for these
    for args in (["fit", "--config", str(ROOT / CONFIG), "--config", str(bad)], ["bench", "--config", str(bad)]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith(f"error: --config {bad}") and line in err, err


def test_fit_help_lists_the_stages_and_explains_ckpt_path(capsys, monkeypatch) -> None:
    """--model listed only StageModule (the stages load lazily), --ckpt_path carried Lightning's text (with `hpc`
    and `registry`, which minillm refuses), and --optimizer/--lr_scheduler silently replaced a stage's optimizer."""
    from minillm_lightning.trainer_cli import run_lightning

    monkeypatch.setattr(sys, "argv", ["minillm"])
    with pytest.raises(SystemExit) as exc:
        run_lightning(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for name in ("PretrainModule", "SFTModule", "RewardModule", "DPOModule", "PPOModule", "PromptDataModule"):
        assert f"minillm_lightning.{name}" in out
    assert "To start a NEW stage from an earlier stage's weights use --model.init_args.init_from" in out
    # `hpc` only as the SLURM requeue files that `last` considers, not as a value of its own
    assert '"hpc"' not in out and '"registry"' not in out and "requeue checkpoint (hpc_ckpt_N.ckpt)" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


def test_no_command_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "error: no command given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "usage: minillm <command>" in capsys.readouterr().out


def test_verb_options_answer_to_both_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    """`minillm generate --max-new-tokens` and `minillm eval --batch_size` were refused: the verbs spell their
    options one way or the other. Both spellings now reach the same option, in argument groups too."""
    from minillm_lightning.commands import CommandParser, generate
    from minillm_lightning.commands import eval as eval_cmd

    p = CommandParser(prog="x")
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument_group("g").add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=20, help="steps")
    p.add_argument("--stride", type=int, default=None, help="stride (default: half a window)")
    p.add_argument("--no_chat", dest="chat", action="store_false", help="plain text")
    shown = " ".join(p.format_help().split())  # defaults appear in --help, once, where there is one
    assert "steps (default: 20)" in shown and "(default: half a window)" in shown and "(default: None)" not in shown
    assert "plain text (default" not in shown  # a store_false's True is not the default of what it means
    args = p.parse_args(["--max-new-tokens", "5", "--batch_size=3"])
    assert (args.max_new_tokens, args.batch_size) == (5, 3)
    with pytest.raises(SystemExit):
        p.parse_args(["--max-new-tokenz", "5"])
    assert "unrecognized arguments: --max-new-tokenz" in capsys.readouterr().err
    gen = generate._parser("minillm generate", "").parse_args(
        ["--checkpoint", "c", "--max-new-tokens", "7", "--top-k=3"]
    )
    assert (gen.max_new_tokens, gen.top_k) == (7, 3)
    ev = eval_cmd._parser().parse_args(["--checkpoint", "c", "--batch_size", "4", "--no_download", "--data_dir", "d"])
    assert (ev.batch_size, ev.no_download, str(ev.data_dir)) == (4, True, "d")
