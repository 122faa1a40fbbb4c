"""``minillm generate`` and ``minillm chat`` as a user runs them: real subprocesses on a real (tiny) checkpoint,
piped stdin for the chat, and the error paths a user hits (missing or corrupted checkpoint, too long a request)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm_lightning.cli import main

# one thread per process: the test machine may run several suites at once, and tiny matmuls only lose by sharing
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def minillm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm_lightning.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_generate_streams_each_prompt(tiny_pretrain_ckpt: Path) -> None:
    r = minillm(
        "generate",
        "--checkpoint",
        str(tiny_pretrain_ckpt),
        "--prompt",
        "The cat",
        "--prompt",
        "Once upon a time",
        "--max_new_tokens",
        "12",
        "--seed",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The cat") and "\n\nOnce upon a time" in r.stdout
    assert len(r.stdout) > len("The cat\n\nOnce upon a time\n\n")  # something was generated
    assert "tokens/s" in r.stderr
    assert "user:" not in r.stdout  # a pretrain checkpoint continues plain text by default


def test_generate_chat_batch_beam(tiny_pretrain_ckpt: Path) -> None:
    r = minillm(
        "generate",
        "--checkpoint",
        str(tiny_pretrain_ckpt),
        "--prompt",
        "hello",
        "--prompt",
        "what is a cat?",
        "--chat",
        "--no_stream",
        "--num_beams",
        "2",
        "--max_new_tokens",
        "6",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant: ") == 2 and "user: what is a cat?" in r.stdout


def test_chat_reads_turns_from_stdin(tiny_pretrain_ckpt: Path) -> None:
    turns = "hello\n\nhow are you?\n/reset\nagain\n/exit\nthis line is never read\n"
    r = minillm(
        "chat", "--checkpoint", str(tiny_pretrain_ckpt), "--system", "Be brief.", "--max_new_tokens", "8", stdin=turns
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant: ") == 3  # two turns, then one after /reset; /exit stops before the last line
    assert "(conversation reset)" in r.stdout
    assert "not tuned for chat" in r.stderr  # pretrain checkpoint: the user is warned


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    r = minillm("generate", "--checkpoint", str(tmp_path / "nope.ckpt"), "--prompt", "hi")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_corrupted_checkpoint_and_context_errors(tmp_path: Path, tiny_pretrain_ckpt: Path, capsys) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(tiny_pretrain_ckpt.read_bytes()[:5000])
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--checkpoint", str(bad)])
    assert exc.value.code == 2 and "corrupted or truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(tiny_pretrain_ckpt), "--prompt", "hi", "--max_new_tokens", "100000"])
    assert exc.value.code == 2 and "exceeds the model context block_size=" in capsys.readouterr().err


def test_chat_history_drops_oldest_turns(tiny_pretrain_ckpt: Path) -> None:
    from minillm_lightning.checkpoint import load_backbone
    from minillm_lightning.commands.generate import _fit_history
    from minillm_lightning.generation import TextGenerator
    from minillm_lightning.tokenizer import Tokenizer

    model, ckpt = load_backbone(tiny_pretrain_ckpt)
    gen = TextGenerator(model, Tokenizer.from_checkpoint(ckpt))
    block = model.config.block_size
    turns = [{"role": r, "content": "the cat sat on the mat " * 3} for r in ("user", "assistant") * 4]
    turns.append({"role": "user", "content": "and then?"})
    kept, ids = _fit_history(gen, [], turns, budget=block - 40)
    assert kept == turns[-len(kept) :] and len(kept) % 2 == 1 and len(kept) < len(turns)
    assert kept[0]["role"] == "user" and len(ids) <= 40
    assert _fit_history(gen, [], [{"role": "user", "content": "word " * block}], budget=8) is None


BAD_OPTIONS = [
    (["--top_p", "2"], "top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--temperature", "inf"], "temperature must be a number >= 0"),
    (["--num_beams", "2", "--length_penalty", "nan"], "length_penalty must be a finite number"),
    (["--repetition_penalty", "inf"], "repetition_penalty must be a number > 0"),
    (["--top_k", "-3"], "top_k must be >= 0"),
    (["--num_beams", "0"], "num_beams must be >= 1"),
    (["--repetition_penalty", "0"], "repetition_penalty must be a number > 0"),
    (["--seed", str(2**64)], "seed must be in -2**63..2**63-1, got 18446744073709551616"),  # was a traceback
    (["--max_new_tokens", "100000"], "exceeds the model context block_size="),
    # a third prompt too long for the context: the two before it, which fit, are not printed either
    (["--max_new_tokens", "8", "--prompt", "hello world " * 60], "exceeds the model context block_size="),
]


def test_bad_decoding_option_is_the_only_output(tiny_pretrain_ckpt: Path, capsys) -> None:
    """The options are checked before a prompt is printed: the error is not glued onto it (`hello worlderror:`)."""
    r = minillm("generate", "--checkpoint", str(tiny_pretrain_ckpt), "--prompt", "hello world", "--top_p", "2")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.strip() == "error: GenerationConfig: top_p must be in (0, 1]"
    for option, message in BAD_OPTIONS:  # in-process: the same path, without a Python start per option
        argv = ["generate", "--checkpoint", str(tiny_pretrain_ckpt), "--prompt", "hi", "--prompt", "hello world"]
        with pytest.raises(SystemExit) as exc:
            main([*argv, *option])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and out == "", (option, out)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (option, err)


def test_chat_refuses_zero_new_tokens(tiny_pretrain_ckpt: Path, capsys) -> None:
    """`minillm chat --max_new_tokens 0` used to mean "the default"; it is the same error as for generate."""
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--checkpoint", str(tiny_pretrain_ckpt), "--max_new_tokens", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "max_new_tokens must be >= 1" in err.splitlines()[-1]


def test_decoding_options_are_checked_before_the_checkpoint_loads(tmp_path: Path, capsys) -> None:
    """A bad option fails at once, without waiting for a checkpoint to load (here: none exists)."""
    for verb in ("generate", "chat"):
        argv = [verb, "--checkpoint", str(tmp_path / "nope.ckpt"), "--top_p", "2"]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--prompt", "hi"] if verb == "generate" else argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.strip() == "error: GenerationConfig: top_p must be in (0, 1]", err
