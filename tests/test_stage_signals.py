"""SIGTERM during fit saves a resumable checkpoint in every stage (PPO mid-rollout included); predict writes JSONL."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_cli import minillm, training_process, wait_for_training, workdir  # noqa: F401  (fixture re-used)


def _args(stage: str, ckpt: Path) -> list[str]:
    args = [
        "fit",
        "--config",
        f"configs/{stage}_tiny.yaml",
        f"--model.init_args.init_from={ckpt}",
        f"--data.init_args.tokenizer={ckpt}",
        "--trainer.max_steps=100000",
        "--trainer.enable_progress_bar=false",
    ]
    if stage == "ppo":
        args += [
            "--model.init_args.reward_model=null",
            "--model.init_args.reward_fn=minillm_lightning.rewards.ArithmeticReward",
            "--data.init_args.max_length=96",
        ]
    else:
        args += ["--data.init_args.max_length=128"]
    return args


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_sigterm_checkpoints_every_stage(stage: str, workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    run = workdir / "checkpoints" / f"{stage}_tiny"
    with training_process(_args(stage, tiny_pretrain_ckpt), workdir) as proc:
        wait_for_training(run)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # 143: `minillm fit ... && next` stops here
    last = run / "last.ckpt"
    assert last.is_file(), out[-3000:]
    assert "Resume with:" in out and "--ckpt_path last" in out
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert step > 0


def test_predict_writes_one_completion_per_prompt(workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?"}) + "\n" for i in range(5)))
    out = workdir / "out.jsonl"
    r = minillm(
        [
            "predict",
            "--config",
            "configs/predict.yaml",
            f"--model.init_args.init_from={tiny_pretrain_ckpt}",
            f"--data.init_args.tokenizer={tiny_pretrain_ckpt}",
            f"--data.init_args.sources=[{prompts}]",
            f"--trainer.callbacks.init_args.output={out}",
            "--trainer.callbacks.init_args.max_new_tokens=8",
        ],
        workdir,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[2]["prompt"] == "What is 2 plus 1?" and isinstance(rows[2]["completion"], str)
    assert (workdir / "checkpoints" / "predict" / "config.yaml").is_file()  # not into the working directory
    assert not (workdir / "config.yaml").exists()


def test_predict_with_a_training_config_is_refused_up_front(workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    """A stage's training config failed after loading the weights ("predict_dataloader must be implemented")."""
    ckpt = str(tiny_pretrain_ckpt)
    args = [
        "--config",
        "configs/sft_tiny.yaml",
        f"--model.init_args.init_from={ckpt}",
        f"--data.init_args.tokenizer={ckpt}",
    ]
    r = minillm(["predict", *args], workdir)
    assert r.returncode == 2 and "it needs data from a PromptDataModule, not SFTDataModule" in r.stderr
    assert "Traceback" not in r.stderr
