"""Every stage under `--trainer.devices 2 --trainer.strategy ddp` on CPU (gloo), and metrics reduced across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import user_error
from test_cli import minillm, workdir  # noqa: F401  (fixture re-used)

from minillm_lightning.commands.pipeline import final_scalars

DDP = [
    "--trainer.devices=2",
    "--trainer.strategy=ddp",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


def _stage_args(stage: str, ckpt: Path) -> list[str]:
    return [
        "--config",
        f"configs/{stage}_tiny.yaml",
        f"--model.init_args.init_from={ckpt}",
        f"--data.init_args.tokenizer={ckpt}",
        "--data.init_args.max_length=128",  # the micro checkpoint's context
    ]


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_stage_runs_under_ddp(stage: str, workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    extra = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2"]
    if stage == "ppo":  # the reward model of the recipe does not exist here: use a programmatic reward
        extra = [
            "--trainer.max_steps=2",
            "--model.init_args.reward_model=null",
            "--model.init_args.reward_fn=minillm_lightning.rewards.ArithmeticReward",
            "--data.init_args.max_length=96",  # + 32 new tokens = the micro model's context
        ]
    r = minillm(["fit", *_stage_args(stage, tiny_pretrain_ckpt), *DDP, *extra], workdir, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ckpt = torch.load(workdir / "checkpoints" / f"{stage}_tiny" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] >= 2
    loader_states = ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader")
    if loader_states:
        assert loader_states[0]["world_size"] == 2


def test_reward_accuracy_is_reduced_across_ranks(workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    """val/accuracy of a reward model on the recipe's 15 held-out pairs: 2 ranks (8 + 7 pairs) == 1 rank x 15 pairs.
    An odd count: Lightning's DistributedSampler padded it to 16 by scoring one pair twice (9/16 vs 8/15)."""
    args = [*_stage_args("reward", tiny_pretrain_ckpt), "--data.init_args.val_share=0.05", "--seed_everything=3"]
    values = {}
    for devices in (1, 2):
        out = workdir / f"v{devices}"
        cmd = [
            "validate",
            *args,
            f"--trainer.devices={devices}",
            "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={out}",
        ]
        if devices == 2:
            cmd.append("--trainer.strategy=ddp")
        r = minillm(cmd, workdir, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        values[devices] = final_scalars(out)
    assert values[1]["val/accuracy"] == pytest.approx(values[2]["val/accuracy"], abs=1e-6)
    assert values[1]["val/loss"] == pytest.approx(values[2]["val/loss"], rel=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_resume_is_exact_with_the_same_world_size(workdir: Path, optimizer: str) -> None:  # noqa: F811
    """8 DDP steps straight == 4 DDP steps + `--ckpt_path last` + 4 more: identical weights (constant LR so the
    schedule does not depend on max_steps). Muon orthogonalises the all-reduced gradients on every rank."""
    from test_cli import CONFIG, FAST

    base = ["fit", "--config", CONFIG, *FAST, *DDP, "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0"]
    base += ["--model.init_args.warmup=0", "--model.init_args.min_lr_ratio=1.0"]
    base += [f"--model.init_args.optimizer={optimizer}"]
    run = workdir / "checkpoints" / "pretrain_tiny"

    def fit(*extra: str) -> dict:
        r = minillm([*base, *extra], workdir, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        # LitData's per-rank caution about the evaluation sets' drop_last=False is filtered (quiet_lightning_notices)
        assert "`drop_last`" not in r.stdout + r.stderr
        return torch.load(run / "last.ckpt", weights_only=True)

    straight = fit("--trainer.max_steps=8")["state_dict"]
    (run / "last.ckpt").unlink()
    assert fit("--trainer.max_steps=4")["global_step"] == 4
    resumed = fit("--trainer.max_steps=8", "--ckpt_path", "last")
    assert resumed["global_step"] == 8
    for name, value in straight.items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("n", "world"), [(15, 2), (16, 2), (7, 3), (1, 2), (2, 4)])
def test_eval_sampler_shards_each_item_once(n: int, world: int) -> None:
    """Held-out items are split over the ranks without the repeats of Lightning's DistributedSampler; with fewer
    items than ranks every rank still gets one (a rank without a batch would leave the others waiting)."""
    from torch.utils.data import DistributedSampler

    from minillm_lightning.data.common import EvalSampler

    shards = [list(EvalSampler(n, world, rank)) for rank in range(world)]
    assert all(len(EvalSampler(n, world, r)) == len(s) >= 1 for r, s in enumerate(shards))
    assert isinstance(EvalSampler(n, world, 0), DistributedSampler)  # Lightning keeps it instead of padding
    if n >= world:
        assert sorted(i for s in shards for i in s) == list(range(n))
    else:
        assert {i for s in shards for i in s} == set(range(n))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config", "configs/strategies/fsdp.yaml"],
            "error: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`.",
        ),
        (["--trainer.strategy=fsdp"], "error: The strategy `fsdp` requires a GPU accelerator"),
        pytest.param(
            ["--config", "configs/strategies/deepspeed.yaml"],
            "error: lightning.pytorch.strategies.DeepSpeedStrategy: To use the `DeepSpeedStrategy`, you must have "
            "DeepSpeed installed. Install it by running `pip install -U deepspeed`.",
            marks=pytest.mark.skipif(
                __import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed is installed"
            ),
        ),
    ],
    ids=["fsdp-config", "fsdp-flag", "deepspeed-config"],
)
def test_gpu_only_strategies_on_a_cpu_are_one_line(flags, message, workdir, capfd, monkeypatch) -> None:  # noqa: F811
    """FSDP on a CPU, and the DeepSpeed config without the package, ended in a 35-63 line traceback (exit 1)."""
    monkeypatch.chdir(workdir)
    args = ["fit", "--config", "configs/pretrain_tiny.yaml", *flags, "--trainer.accelerator=cpu", "--trainer.devices=2"]
    line = user_error([*args, "--trainer.max_steps=1"], capfd)
    assert line.startswith(message), line
    assert line.endswith(
        "(on a CPU use --trainer.strategy ddp (gloo), not FSDP or DeepSpeed (configs/strategies/"
        "*.yaml): they need CUDA GPUs)"
    ), line


def test_test_report_counts_every_rank(workdir: Path) -> None:  # noqa: F811
    """`minillm test` on 2 ranks: test.json's examples and batches_scored describe the whole test set, as on one
    rank. They counted rank 0's share only (LitData's length is per rank): 24 of 48 windows, 2 of 4 batches."""
    from test_cli import CONFIG, FAST

    common = ["--config", CONFIG, *FAST, "--data.init_args.batch_size=4"]
    r = minillm(["fit", *common, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"], workdir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ckpt = workdir / "checkpoints" / "pretrain_tiny" / "last.ckpt"
    reports = {}
    for devices in (1, 2):
        cmd = ["test", *common, f"--ckpt_path={ckpt}", f"--trainer.devices={devices}", "--trainer.accelerator=cpu"]
        r = minillm([*cmd, *(["--trainer.strategy=ddp"] if devices == 2 else [])], workdir, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        reports[devices] = json.loads(ckpt.with_name("last.test.json").read_text())
    one, two = reports[1], reports[2]
    assert one["examples"] == two["examples"] > 8  # more than one batch on each rank
    windows = one["examples"]
    assert one["batches_scored"] == -(-windows // 4)
    assert two["batches_scored"] == -(-(windows // 2) // 4) + -(-(windows - windows // 2) // 4)
    assert two["metrics"]["test/loss"] == pytest.approx(one["metrics"]["test/loss"], rel=1e-4)


def test_a_data_error_under_ddp_is_one_line_per_rank(workdir: Path, tiny_pretrain_ckpt: Path) -> None:  # noqa: F811
    """Rank 0 stops on a missing data file in prepare_data (which only it runs); rank 1, waiting at the barrier
    after it, printed a 36-line traceback of gloo's "Connection closed by peer" under the one-line error."""
    args = ["fit", *_stage_args("sft", tiny_pretrain_ckpt), *DDP, "--data.init_args.sources=[nowhere.jsonl]"]
    r = minillm(args, workdir, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert len(errors) == 2 and errors[0].startswith("error: data source 'nowhere.jsonl' matches no file"), errors
    assert errors[1] == "error: rank 1 stopped because another rank failed; that rank's error is printed above"


def test_a_connection_error_outside_a_process_group_is_not_blamed_on_a_rank() -> None:
    from minillm_lightning.cli import _peer_failed

    assert _peer_failed(ConnectionResetError("[Errno 104] Connection reset by peer")) is None  # e.g. a download
