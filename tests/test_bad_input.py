"""Bad input a new user gives the ``minillm`` command: each case ends in one ``error:`` line and exit code 2,
never a traceback. Files that Windows tools write (UTF-8 byte-order mark, CRLF) are read like any other.

Most cases call ``main()`` in this process (a traceback would be an exception escaping it); the architecture
and not-a-checkpoint cases also run the real command in a subprocess."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, MICRO_ARCH, ROOT, SAMPLE, user_error

from minillm_lightning import PreferenceDataModule, PretrainDataModule, PromptDataModule, SFTDataModule
from minillm_lightning.checkpoint import load_checkpoint
from minillm_lightning.cli import main
from minillm_lightning.errors import CheckpointError

# main() is called with args here, which LightningCLI warns about when pytest's own argv is set
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# one quiet training step
ONE_STEP = [
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
# a fast variant of configs/pretrain_tiny.yaml
FAST = [
    *(f"--model.init_args.arch.{k}={v}" for k, v in MICRO_ARCH.items() if k in ("n_layer", "dim", "n_head")),
    "--data.init_args.seq_len=64",
    "--data.init_args.vocab_size=1024",
    *ONE_STEP,
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory that sees the project's configs/ and sample data; module-wide, so the tokenizer the
    pretraining config trains is cached once."""
    root = tmp_path_factory.mktemp("work")
    (root / "configs").symlink_to(ROOT / "configs")
    (root / "data").mkdir()
    (root / "data" / "sample").symlink_to(SAMPLE)
    return root


def run_minillm(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MINILLM_TRACEBACK", None)
    cmd = [sys.executable, "-m", "minillm_lightning.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- files that are not (intact) checkpoints


def bad_checkpoint(kind: str, root: Path, good: Path) -> tuple[Path, str]:
    """A file of ``kind`` and the phrase its error must contain."""
    path = root / f"{kind}.ckpt"
    if kind == "text":
        path = root / "notes.txt"
        path.write_text("These are my notes, not a model.\n")
        return path, "notes.txt is not a minillm checkpoint: it holds text"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "empty.ckpt is not a minillm checkpoint: it is empty (0 bytes)"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return path, "truncated.ckpt is corrupted or truncated"
    if kind == "bitflip":  # torch.load itself would read these weights without complaint
        data = bytearray(good.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return path, "bitflip.ckpt is corrupted or truncated"
    if kind == "directory":
        path = root / "run"
        path.mkdir()
        return path, "run is a directory; pass a .ckpt file in it"
    raise AssertionError(kind)


KINDS = ["text", "empty", "truncated", "bitflip", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_names_the_file_and_the_fault(kind: str, tmp_path: Path, tiny_pretrain_ckpt: Path) -> None:
    path, phrase = bad_checkpoint(kind, tmp_path, tiny_pretrain_ckpt)
    with pytest.raises(CheckpointError, match=re.escape(phrase)):
        load_checkpoint(path)


def test_zip_and_pytorch_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    import zipfile

    import torch

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"data\.zip is not a minillm checkpoint: a zip archive torch\.load"):
        load_checkpoint(archive)
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, weights)
    with pytest.raises(CheckpointError, match=r"weights\.pt is not a minillm checkpoint: .* without a Lightning"):
        load_checkpoint(weights)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_refuses_every_kind_of_bad_checkpoint(kind, tmp_path, tiny_pretrain_ckpt, capfd) -> None:
    path, phrase = bad_checkpoint(kind, tmp_path, tiny_pretrain_ckpt)
    assert phrase in user_error(["generate", "--checkpoint", str(path), "--prompt", "hi"], capfd)


def verb_args(verb: str, path: Path, tmp_path: Path, good: Path) -> list[str]:
    text = FIXTURES / "eval" / "lambada" / "lambada_test.jsonl"
    runs = ["--trainer.default_root_dir", str(tmp_path / "runs")]
    fast = [*FAST, *runs]
    sft = ["fit", "--config", "configs/sft_tiny.yaml", *ONE_STEP, *runs, "--model.init_args.init_from"]
    return {
        "chat": ["chat", "--checkpoint", str(path)],
        "eval": ["eval", "--checkpoint", str(path), "--tasks", "", "--text", str(text)],
        "export": ["export", "--checkpoint", str(path), "--output", str(tmp_path / "hf")],
        "fit --ckpt_path": ["fit", "--config", "configs/pretrain_tiny.yaml", *fast, "--ckpt_path", str(path)],
        "validate --ckpt_path": ["validate", "--config", "configs/pretrain_tiny.yaml", *fast, "--ckpt_path", str(path)],
        "init_from": [*sft, str(path), "--data.init_args.tokenizer", str(good)],
        "data.tokenizer": [*sft, str(good), "--data.init_args.tokenizer", str(path)],
    }[verb]


@pytest.mark.parametrize(
    "verb", ["chat", "eval", "export", "fit --ckpt_path", "validate --ckpt_path", "init_from", "data.tokenizer"]
)
def test_a_text_file_as_checkpoint_in_every_verb(verb, workdir, tmp_path, tiny_pretrain_ckpt, capfd, monkeypatch):
    monkeypatch.chdir(workdir)
    path, phrase = bad_checkpoint("text", tmp_path, tiny_pretrain_ckpt)
    line = user_error(verb_args(verb, path, tmp_path, tiny_pretrain_ckpt), capfd)
    assert phrase in line and str(path) in line


@pytest.mark.parametrize("verb", ["fit --ckpt_path", "init_from"])
def test_a_truncated_checkpoint_when_training(verb, workdir, tmp_path, tiny_pretrain_ckpt, capfd, monkeypatch):
    monkeypatch.chdir(workdir)
    path, phrase = bad_checkpoint("truncated", tmp_path, tiny_pretrain_ckpt)
    assert phrase in user_error(verb_args(verb, path, tmp_path, tiny_pretrain_ckpt), capfd)


def test_text_checkpoint_through_the_real_command(tmp_path: Path, tiny_pretrain_ckpt: Path) -> None:
    path, phrase = bad_checkpoint("text", tmp_path, tiny_pretrain_ckpt)
    proc = run_minillm(["generate", "--checkpoint", str(path), "--prompt", "hi"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} is not a minillm checkpoint: it holds text")


# ---------------------------------------------------------------- invalid values on the command line


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.init_args.arch.n_layer=0", "error: MiniGPTConfig.n_layer must be a positive integer, got 0"),
        ("--model.init_args.arch.n_head=3", "error: MiniGPTConfig: n_head=3 does not divide dim=128; choose n_head"),
        ("--model.init_args.learning_rate=-1", "error: learning_rate must be positive, got -1.0"),
        ("--model.init_args.weight_decay=-1", "error: weight_decay must be >= 0, got -1.0"),
        ("--model.init_args.betas=[0.9,1.0]", "error: betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("--data.init_args.batch_size=0", "error: PretrainDataModule.batch_size must be positive, got 0"),
    ],
)
def test_invalid_values_are_one_line(option, message, workdir, capfd, monkeypatch) -> None:
    """jsonargparse wraps a constructor's ValueError in its own multi-line error; the user sees the inner line."""
    monkeypatch.chdir(workdir)
    assert user_error(["fit", "--config", "configs/pretrain_tiny.yaml", option], capfd).startswith(message)


@pytest.mark.parametrize(
    "option, message",
    [  # ZeroDivisionError tracebacks in the first step, silent runs (a negative clip value: no clipping at all),
        # numpy's "not in bounds" traceback
        ("--trainer.val_check_interval=0", "error: trainer.val_check_interval must be >= 1 (batches) or a share in"),
        ("--trainer.accumulate_grad_batches=0", "error: trainer.accumulate_grad_batches must be >= 1 (batches per"),
        ("--trainer.accumulate_grad_batches=-2", "error: trainer.accumulate_grad_batches must be >= 1 (batches per"),
        ("--seed_everything=-1", "error: seed_everything must be in 0..2**32-1 (numpy's range), got -1"),
        ("--trainer.gradient_clip_val=-1", "error: trainer.gradient_clip_val must be >= 0 (0 or null: no clipping)"),
    ],
)
def test_trainer_numbers_lightning_fails_on_later_are_one_line(option, message, workdir, capfd, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    assert user_error(["fit", "--config", "configs/pretrain_tiny.yaml", *FAST, option], capfd).startswith(message)


def test_negative_numbers_in_exponent_form_reach_the_value_check(workdir, capfd, monkeypatch) -> None:
    """argparse took ``-1e-3`` for an option: "argument --model: expected one argument" named the wrong flag."""
    from minillm_lightning.cli import join_negative_numbers

    monkeypatch.chdir(workdir)
    args = ["fit", "--config", "configs/pretrain_tiny.yaml", "--model.init_args.learning_rate", "-1e-3"]
    line = user_error(args, capfd)
    assert line == "error: learning_rate must be positive, got -0.001"
    assert join_negative_numbers(["--a", "-1e-3", "--b", "-2", "--c=-1e3", "-v", "--d", "--e"]) == [
        "--a=-1e-3",
        "--b",
        "-2",
        "--c=-1e3",
        "-v",
        "--d",
        "--e",
    ]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--trainer.enable_checkpointing=false", "error: Trainer was configured with `enable_checkpointing=False`"),
        ("--trainer.logger=false", "error: Cannot use `LearningRateMonitor` callback with `Trainer` that has no"),
    ],
)
def test_trainer_flags_against_the_configs_callbacks_are_one_line(flag, message, workdir, capfd, monkeypatch) -> None:
    """Lightning's MisconfigurationException was a 33-59 line traceback; now one line pointing at the callbacks."""
    monkeypatch.chdir(workdir)
    line = user_error(["fit", "--config", "configs/pretrain_tiny.yaml", "--trainer.max_steps=1", flag], capfd)
    assert line.startswith(message) and "trainer.callbacks includes it" in line


@pytest.mark.parametrize("name", ["RegressionSuite", "TrainingSummary"])
def test_a_second_callback_of_a_kind_the_config_has_is_one_line(name, workdir, capfd, monkeypatch) -> None:
    """``--trainer.callbacks+=RegressionSuite`` on a config with one ended in Lightning's traceback "state_key must
    be unique", after the data module was built; now one line up front, with ways to change the config's one."""
    monkeypatch.chdir(workdir)
    args = ["fit", "--config", "configs/pretrain_tiny.yaml", f"--trainer.callbacks+=minillm_lightning.callbacks.{name}"]
    line = user_error([*args, "--trainer.max_steps=1"], capfd)
    assert line.startswith(f"error: trainer.callbacks lists {name} twice (the config's and one added by"), line
    assert "--print_config > my.yaml, then --config my.yaml" in line and "--trainer.callbacks '[" in line
    # TrainingSummary is the config's last callback: --trainer.callbacks.init_args.OPTION sets it, as said
    assert ("--trainer.callbacks.init_args.OPTION VALUE works too" in line) == (name == "TrainingSummary")
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", "configs/pretrain_tiny.yaml", "--trainer.callbacks.init_args.monitor=val/ppl",
              "--print_config"])  # fmt: skip
    assert printed.value.code in (0, None)
    last = yaml.safe_load(capfd.readouterr().out)["trainer"]["callbacks"][-1]
    assert last["class_path"].endswith("TrainingSummary") and last["init_args"]["monitor"] == "val/ppl"


def test_repeated_stateful_callbacks_follow_lightnings_state_key() -> None:
    """Callbacks whose checkpoint key depends on their settings (ModelCheckpoint) may be listed twice with other
    settings, and a callback without state (Throughput) any number of times, as Lightning's Trainer allows."""
    from jsonargparse import Namespace

    from minillm_lightning.trainer_cli import repeated_stateful_callbacks

    def entry(name: str, **init_args) -> Namespace:
        return Namespace(class_path=name, init_args=Namespace(**init_args))

    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    entries = [
        entry(checkpoint, monitor="val/loss"),
        entry(checkpoint, monitor="train/loss"),
        entry("minillm_lightning.callbacks.Throughput"),
        entry("minillm_lightning.callbacks.Throughput"),
        entry("minillm_lightning.callbacks.MemoryGuard"),
    ]
    assert repeated_stateful_callbacks(entries) is None
    assert repeated_stateful_callbacks([*entries, entry(checkpoint, monitor="val/loss")]) == (0, 5)
    assert repeated_stateful_callbacks([*entries, entry("minillm_lightning.callbacks.MemoryGuard")]) == (4, 5)


def test_prepare_names_a_bad_data_option_in_one_line(workdir, capfd, monkeypatch) -> None:
    """`minillm prepare` printed jsonargparse's chained tracebacks (135 lines) for a misspelt --data option."""
    monkeypatch.chdir(workdir)
    line = user_error(["prepare", "--config", "configs/pretrain_tiny.yaml", "--data.init_args.vocab_sise", "9"], capfd)
    assert line.startswith("error: --data.init_args.vocab_sise: not an option of PretrainDataModule")


def test_invalid_architecture_through_the_real_command(workdir: Path) -> None:
    proc = run_minillm(["fit", "--config", "configs/pretrain_tiny.yaml", "--model.init_args.arch.n_head", "3"], workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MiniGPTConfig: n_head=3 does not divide dim=128")


# ---------------------------------------------------------------- UTF-8 byte-order mark and CRLF line ends


def windows_copy(src: Path, dst: Path) -> Path:
    """``src`` as Notepad saves it: a UTF-8 byte-order mark and CRLF line ends."""
    dst.write_bytes(b"\xef\xbb\xbf" + src.read_bytes().replace(b"\n", b"\r\n"))
    return dst


@pytest.mark.parametrize("module", [SFTDataModule, PreferenceDataModule, PromptDataModule])
def test_bom_and_crlf_chat_files_read_like_plain_ones(module, tmp_path: Path, tiny_pretrain_ckpt: Path) -> None:
    name = {SFTDataModule: "sft", PreferenceDataModule: "preference", PromptDataModule: "prompts"}[module]
    plain = SAMPLE / f"{name}.jsonl"
    windows = windows_copy(plain, tmp_path / f"{name}.jsonl")
    records = [json.loads(line) for line in plain.read_text(encoding="utf-8").splitlines()]
    array = tmp_path / f"{name}_array.json"  # a JSON array file with the same records, BOM and CRLF
    text = json.dumps(records, ensure_ascii=False, indent=1).replace("\n", "\r\n")
    array.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    def read(path: Path) -> list:
        return module([str(path)], tokenizer=str(tiny_pretrain_ckpt)).read()[0]

    expected = read(plain)
    assert len(expected) > 100
    assert read(windows) == expected and read(array) == expected


def test_bom_and_crlf_pretraining_file_reads_like_a_plain_one(tmp_path: Path) -> None:
    plain = SAMPLE / "pretrain.jsonl"
    windows = windows_copy(plain, tmp_path / "pretrain.jsonl")

    def texts(path: Path) -> list[str]:
        dm = PretrainDataModule(sources=[{"path": str(path)}], vocab_size=1024, cache_dir=str(tmp_path / "cache"))
        return [text for _, text in dm.iter_documents("train")]

    expected = texts(plain)
    assert len(expected) > 1000 and not expected[0].startswith("\ufeff")
    assert texts(windows) == expected


def test_bom_and_crlf_corpus_trains_through_the_command(tmp_path: Path, monkeypatch) -> None:
    """The tiny recipe, one step, on a Notepad copy of the sample corpus (its own folder: checkpoints/ are new)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    corpus = windows_copy(SAMPLE / "pretrain.jsonl", tmp_path / "notepad.jsonl")
    arch = FAST[:5]  # the micro architecture, short sequences, small vocabulary
    steps = ["--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1"]
    source = f"--data.init_args.sources=[{{path: {corpus}}}]"
    main(["fit", "--config", "configs/pretrain_tiny.yaml", *arch, *steps, source])
    stats = json.loads(next((tmp_path / "checkpoints").rglob("dataset_stats.json")).read_text())
    assert stats["pretrain"]["train_tokens"] > 0 and "malformed" not in json.dumps(stats)
    assert (tmp_path / "checkpoints" / "pretrain_tiny" / "last.ckpt").is_file()


# ---------------------------------------------------------------- neighbouring commands: wrong kinds of file


def test_eval_text_and_data_dir_faults(tmp_path: Path, tiny_pretrain_ckpt: Path, capfd) -> None:
    ck = ["eval", "--checkpoint", str(tiny_pretrain_ckpt)]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "gbk.txt").write_bytes("机器学习".encode("gbk"))
    (tmp_path / "folder").mkdir()
    for name, phrase in [
        ("folder", "is a directory; give a text file"),
        ("empty.txt", "is empty; there is no text to score"),
        ("gbk.txt", "not valid UTF-8"),
        ("missing.txt", "no such file"),
    ]:
        assert phrase in user_error([*ck, "--tasks", "", "--text", str(tmp_path / name)], capfd)
    line = user_error([*ck, "--tasks", "lambada", "--data-dir", str(tmp_path / "empty.txt")], capfd)
    assert "--data-dir" in line and "is a file" in line
    # an --output that cannot be written is refused before the scoring, not after it (the results were lost)
    bad_out = tmp_path / "empty.txt" / "results.json"
    (tmp_path / "good.txt").write_text("The cat sat on the mat.\n")
    text = ["--tasks", "", "--text", str(tmp_path / "good.txt")]
    line = user_error([*ck, *text, "--output", str(bad_out)], capfd)
    assert line.startswith(f"error: --output: cannot write in {bad_out.parent}")
    assert "is a directory" in user_error([*ck, *text, "--output", str(tmp_path / "folder")], capfd)


@pytest.mark.parametrize(
    "content, phrase",
    [
        (b"", "holds no documents"),
        (b'{"txt": "a b"}\n', "is not in the expected format (KeyError: 'text')"),
        ('{"text": "café au lait"}\n'.encode("latin-1"), "is not in the expected format (UnicodeDecodeError"),
    ],
)
def test_eval_task_file_faults(content, phrase, tmp_path, tiny_pretrain_ckpt, capfd) -> None:
    task_file = tmp_path / "lambada" / "lambada_test.jsonl"
    task_file.parent.mkdir()
    task_file.write_bytes(content)
    args = ["eval", "--checkpoint", str(tiny_pretrain_ckpt), "--tasks", "lambada", "--data-dir", str(tmp_path)]
    line = user_error([*args, "--no-download"], capfd)
    assert line.startswith(f"error: task lambada: {task_file}") and phrase in line


def test_download_faults(tmp_path: Path, capfd) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not json\n")
    (tmp_path / "latin.jsonl").write_bytes('{"chosen": "café"}\n'.encode("latin-1"))
    (tmp_path / "fake.jsonl.gz").write_text("not gzip")
    out = ["--output", str(tmp_path / "out.jsonl")]
    for args, phrase in [
        (["tinyshakespeare", "--from", str(tmp_path / "folder"), *out], "is a directory"),
        (["tinyshakespeare", "--from", str(tmp_path / "empty.jsonl"), *out], "is empty (0 bytes)"),
        (["tinyshakespeare", "--from", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "folder")], "is a dir"),
        (["hh-rlhf", "--from", str(tmp_path / "notes.txt"), *out], "notes.txt:1: not a JSON line"),
        (["hh-rlhf", "--from", str(tmp_path / "latin.jsonl"), *out], "latin.jsonl: not valid UTF-8"),
        (["hh-rlhf", "--from", str(tmp_path / "fake.jsonl.gz"), *out], "not a complete gzip file"),
    ]:
        assert phrase in user_error(["download", *args], capfd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["folder", "empty.jsonl", "notes.txt", "latin.jsonl", "fake.jsonl.gz"]
    )  # nothing half-written left behind


def test_download_accepts_a_bom_and_crlf_hh_file(tmp_path: Path) -> None:
    from minillm_lightning.commands.download import fetch

    pair = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"\xef\xbb\xbf" + (json.dumps(pair) + "\r\n").encode() * 2)
    out = fetch("hh-rlhf", tmp_path / "hh.jsonl", src, log=lambda *_: None)
    assert len(out.read_text().splitlines()) == 2


def test_non_utf8_chat_file_is_one_plain_message(tmp_path: Path, tiny_pretrain_ckpt: Path) -> None:
    from minillm_lightning.errors import DataError

    bad = tmp_path / "gbk.jsonl"
    bad.write_bytes(json.dumps({"prompt": "机器学习"}, ensure_ascii=False).encode("gbk") + b"\n")
    with pytest.raises(DataError) as exc:
        PromptDataModule([str(bad)], tokenizer=str(tiny_pretrain_ckpt)).read()
    assert str(exc.value).startswith(f"{bad}:1: not valid UTF-8") and "malformed JSON" not in str(exc.value)


def test_completion_writer_refuses_an_output_it_cannot_write(tmp_path: Path) -> None:
    """`minillm predict` with CompletionWriter.output a folder (or under a file) loaded the model, then ended in
    IsADirectoryError/FileExistsError tracebacks."""
    from minillm_lightning.callbacks import CompletionWriter
    from minillm_lightning.errors import MiniLLMError

    with pytest.raises(MiniLLMError, match=f"CompletionWriter.output {tmp_path} is a directory; give the JSONL file"):
        CompletionWriter(output=str(tmp_path))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(MiniLLMError, match=f"CompletionWriter.output: cannot write in {a_file} "):
        CompletionWriter(output=str(a_file / "completions.jsonl"))


def test_pipeline_and_bench_refuse_wrong_output_kinds(tmp_path: Path, capfd) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert "--output" in user_error(["pipeline", "--output", str(a_file)], capfd)
    assert "is a directory" in user_error(["bench", "--output", str(tmp_path)], capfd)
