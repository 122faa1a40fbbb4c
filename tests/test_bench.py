"""``minillm bench`` on a micro config: every section runs end to end and reports positive numbers, the plain
PyTorch loop reproduces the Lightning run's losses exactly, and the FLOPs formula matches a hand count.
No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLE

from minillm_lightning.bench.args import bench_main, parse_args
from minillm_lightning.bench.main import flops_per_token
from minillm_lightning.model import MiniGPTConfig

MICRO = dict(size="custom", n_layer=2, dim=64, n_head=4, n_kv_head=2, block_size=64)


def micro_config(tmp: Path, **trainer: object) -> Path:
    """configs/pretrain_tiny.yaml with a micro model, 32-token blocks and a small corpus cached under ``tmp``."""
    cfg = yaml.safe_load((ROOT / "configs" / "pretrain_tiny.yaml").read_text())
    cfg["model"]["init_args"]["arch"] = MICRO
    cfg["data"]["init_args"].update(
        sources=[{"path": str(SAMPLE / "pretrain.jsonl")}],
        seq_len=32,
        vocab_size=512,
        sample_ratio=0.3,
        cache_dir=str(tmp / "cache"),
    )
    cfg["trainer"].update(trainer)
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    config = str(micro_config(tmp))
    out = tmp / "bench.json"
    argv = ["--config", config, "--steps", "3", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
    argv += ["--sections", "train,loop,decode,data,dpo,eval", "--eval-vocab", "300"]
    argv += ["--peak-n", "128", "--decode-lengths", "4,8", "--beam-length", "4", "--output", str(out)]
    bench_main(argv)
    return json.loads(out.read_text()), config


def _positive(d: dict, keys: list[str]) -> None:
    for k in keys:
        assert isinstance(d[k], (int, float)) and d[k] > 0, (k, d[k])


def test_every_section_reports_positive_numbers(bench_run) -> None:
    results, config = bench_run
    assert results["machine"]["peak_tflops"]["cpu/float32"] > 0
    r = results["configs"][config]
    _positive(r["model"], ["params", "non_embedding_params", "flops_per_token", "tokens_per_step", "peak_tflops"])
    for name in ("train", "loop"):
        _positive(r[name], ["ms_per_step", "tokens_per_sec", "tflops", "mfu", "peak_rss_mb"])
        assert 0 <= r[name]["data_wait_share"] < 1
        assert r[name]["cuda_peak_mb"] is None
    assert r["loop"]["lightning_overhead"] > 0
    dec = r["decode"]
    assert set(dec["lengths"]) == {"4", "8"} and not dec["block_size_extended"]
    for row in dec["lengths"].values():
        _positive(row, ["cache_tokens_per_sec", "no_cache_tokens_per_sec", "cache_speedup"])
    _positive(dec["beam"], ["greedy_tokens_per_sec", "beam_tokens_per_sec", "beam_cost"])
    if dec["hf"] is not None:  # transformers installed: same weights, same greedy tokens
        for row in dec["hf"].values():
            _positive(row, ["tokens_per_sec", "ours_vs_hf"])
            assert row["same_tokens"]
    _positive(r["data"], ["tokenizer_train_s", "prepared_tokens", "prepare_tokens_per_sec", "prepare_mb_per_sec"])
    dpo = r["dpo"]
    assert dpo["pairs"] == r["model"]["batch_size"] // 2 and dpo["seq_len"] == 32
    _positive(dpo["ms_per_step"], ["sft", "dpo", "dpo_precomputed"])
    _positive(dpo, ["dpo_vs_sft", "dpo_precomputed_vs_sft"])
    ev = r["eval"]
    assert ev["strides"] == {"half": 32, "block": 64} and ev["train_shape"] == [r["model"]["batch_size"], 32]
    assert ev["scored_tokens"] == 6 * 4 * 64  # 24 windows' worth of random documents, every token scored once
    _positive(ev["tokens_per_sec"], ["train", "half", "block"])
    _positive(ev["vs_train"], ["half", "block"])
    # 6 documents of 4 windows: 4 windows each at stride = block, 7 at half a window (every token fed 7/4 times)
    assert ev["forward_tokens"] == {"half": 6 * 7 * 64, "block": 6 * 4 * 64}
    assert ev["flop_parity"]["half"] < ev["flop_parity"]["block"]


def test_scoring_flops_by_hand() -> None:
    """1 layer, width 8, 2 heads of 4, MLP 16, vocabulary 10, windows of 4: blocks 2 * (8*32 + 3*8*16) = 1280
    FLOPs per fed token plus attention 4 * 1 * 8 * 4 = 128; head 2 * 10 * 8 = 160 per scored token."""
    from minillm_lightning.bench.eval import scoring_flops_per_token

    arch = MiniGPTConfig(
        size="custom", vocab_size=10, block_size=4, n_layer=1, dim=8, n_head=2, n_kv_head=2, intermediate_size=16
    )
    assert scoring_flops_per_token(arch, 4, forward_tokens=8, scored_tokens=8) == 1280 + 128 + 160
    assert scoring_flops_per_token(arch, 4, forward_tokens=12, scored_tokens=8) == (12 * 1408 + 8 * 160) / 8


def test_dpo_bench_batch_and_losses_are_real() -> None:
    """The synthetic pairs: prompt shared, labels are the next reply tokens, pads unlabelled; the three timed
    losses are those of the stage modules (DPO = ln 2 at step 0, precomputed reference = recomputed)."""
    import math

    import torch

    from minillm_lightning.bench.dpo import preference_batch
    from minillm_lightning.losses import IGNORE_INDEX
    from minillm_lightning.stages.dpo import DPOModule

    arch = MiniGPTConfig(**{**MICRO, "vocab_size": 50})
    b = preference_batch(arch, pairs=3, seq_len=16, device=torch.device("cpu"))
    assert torch.equal(b["chosen_input_ids"][:, :4], b["rejected_input_ids"][:, :4])
    for side in ("chosen", "rejected"):
        ids, mask, labels = (b[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        assert (labels[:, :3] == IGNORE_INDEX).all()  # positions predicting prompt tokens
        real = labels != IGNORE_INDEX
        assert torch.equal(labels[:, :-1][real[:, :-1]], ids[:, 1:][real[:, :-1]])
        assert (mask[:, 1:][real[:, :-1]] == 1).all() and real.sum() > 0
    dpo = DPOModule(arch=arch)
    loss = dpo.pair_step(b, "train")[0]
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_plain_loop_reproduces_lightning_losses(bench_run) -> None:
    """Same initial weights, batches, optimizer, schedule and clipping: the two loops are comparable step for step."""
    results, config = bench_run
    r = results["configs"][config]
    assert len(r["train"]["losses"]) == 4  # warmup + measured steps
    assert r["loop"]["losses"] == r["train"]["losses"]
    assert r["loop"]["loss_max_abs_diff"] == 0.0


def test_flops_per_token_by_hand(bench_run) -> None:
    """2 layers, d=64, 4 heads of 16 (2 kv heads), SwiGLU width 192 (8/3*64 rounded up to 64), vocab 512, T=32.

    Per layer: q and o 2*64*64 = 8192, k and v 2*64*32 = 4096, MLP 3*64*192 = 36864 -> 49152; two layers 98304;
    output head 512*64 = 32768 (counted once although tied: the embedding lookup is no matmul) -> N = 131072.
    Training FLOPs per token: 6*N = 786432 plus attention 12*L*d_attn*T = 12*2*64*32 = 49152 -> 835584.
    """
    cfg = MiniGPTConfig(**MICRO, vocab_size=512)
    assert cfg.intermediate_size == 192
    assert flops_per_token(cfg, 32) == 835_584
    assert flops_per_token(cfg, 32, training=False) == 835_584 // 3
    results, config = bench_run
    assert results["configs"][config]["model"]["flops_per_token"] == flops_per_token(
        MiniGPTConfig(**MICRO, vocab_size=int(results["configs"][config]["model"]["arch"].split()[-1])), 32
    )


def test_fit_wall_reads_final_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = micro_config(tmp_path, max_steps=4, val_check_interval=4, limit_val_batches=2, log_every_n_steps=2)
    monkeypatch.chdir(tmp_path)
    results = bench_main(["--fit-wall", str(config)])
    wall = results["fit_wall"]
    assert results["configs"] == {}
    assert wall["wall_s"] > 0 and wall["final_step"] >= 3  # TensorBoard step of the last validation
    assert wall["val_loss"] > 0 and wall["val_nats_per_char"] > 0
    assert not (tmp_path / "checkpoints").exists()  # written into a temporary directory, not here


def test_a_failing_fit_wall_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe that stops (here: its data file is missing) ended `minillm bench` in a RuntimeError traceback with
    the run's last 3,000 characters; now it is the run's own error line."""
    from minillm_lightning.errors import MiniLLMError

    config = micro_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MiniLLMError) as caught:
        bench_main(["--fit-wall", str(config), "--override", "data.init_args.sources=[{path: nowhere.txt}]"])
    message = str(caught.value)
    assert message.startswith(f"minillm fit --config {config} failed (exit 2): error: data source 'nowhere.txt'")
    assert "\n" not in message


def test_nanogpt_recipe_trains_ours_on_the_same_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--nanogpt-text` went to nanoGPT only: ours still looked for data/tinyshakespeare/input.txt and failed after
    nanoGPT's whole run."""
    from minillm_lightning.bench import main

    text = tmp_path / "shakespeare.txt"
    calls = {}
    monkeypatch.setattr(main, "run_nanogpt", lambda path, text, iters: calls.setdefault("nano", text) and {})
    monkeypatch.setattr(main, "fit_wall", lambda config, keep, overrides: calls.setdefault("ours", (config, overrides)))
    monkeypatch.setattr(main, "format_table", lambda results: "")
    main.run_bench(parse_args(["--nanogpt", str(tmp_path), "--nanogpt-text", str(text)]))
    assert calls["nano"] == text
    assert calls["ours"] == (main.NANOGPT_RECIPE, [f"data.init_args.sources=[{{path: {text.resolve()}}}]"])


def test_plain_bench_on_cpu_measures_small_at_a_practical_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """`minillm bench` without --config on a CPU: tiny as configured, small at batch 4 / fp32 / 5 steps; an
    explicit --config is measured exactly as given."""
    import minillm_lightning.bench.main as bench

    seen: dict[str, tuple] = {}

    def fake_config(config, args, sections, peaks):
        seen[config] = (list(args.override), args.precision, args.steps, args.warmup)
        return {}

    monkeypatch.setattr(bench, "bench_config", fake_config)
    monkeypatch.setattr(bench, "format_table", lambda results: "")
    bench_main(["--device", "cpu", "--sections", "decode"])
    assert seen["configs/pretrain_tiny.yaml"] == ([], None, 20, 3)
    assert seen["configs/pretrain_small.yaml"] == (["data.init_args.batch_size=4"], "32-true", 5, 1)
    seen.clear()
    bench_main(["--device", "cpu", "--sections", "decode", "--config", "configs/pretrain_small.yaml"])
    assert seen["configs/pretrain_small.yaml"] == ([], None, 20, 3)


# ---- the CUDA-only paths, checked without a GPU by which branch is taken


def test_largest_fitting_batch_search() -> None:
    from minillm_lightning.bench.machine import largest_fitting

    for capacity in (1, 8, 37, 100, 4096):
        tried: list[int] = []

        def fits(n: int, cap: int = capacity, tried: list[int] = tried) -> bool:
            tried.append(n)
            return n <= cap

        assert largest_fitting(fits, start=1) == capacity
        assert len(tried) <= 2 * 13  # doubling then bisection: logarithmic, not one size at a time
    assert largest_fitting(lambda n: n <= 5000, start=8, limit=512) == 512
    assert largest_fitting(lambda n: False, start=8) is None


def test_cuda_branches_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasheet peak of the detected GPU (H200 from our table, others from Lightning's, unknown: None), no batch
    probe or datasheet on a CPU, and --device auto picking CUDA when it is available."""
    import torch

    import minillm_lightning.bench.machine as bench
    from minillm_lightning.callbacks.throughput import EXTRA_PEAK_FLOPS

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert bench.datasheet_tflops(cpu, torch.bfloat16) is None
    assert bench.cuda_max_batch(MiniGPTConfig(**MICRO, vocab_size=64), cpu, "bf16-mixed", 32, 4) is None
    names = {"h200": "NVIDIA H200", "h100": "NVIDIA H100 80GB HBM3", "unknown": "Some Future GPU"}
    for key, name in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        peak = bench.datasheet_tflops(gpu, torch.bfloat16)
        if key == "h200":
            assert peak == pytest.approx(EXTRA_PEAK_FLOPS["h200"][torch.bfloat16] / 1e12)
        elif key == "h100":
            assert 900 < peak < 1000  # Lightning's table: H100 SXM, dense bf16 989 TFLOP/s
        else:
            assert peak is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_args(["--sections", "decode"]).device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_args(["--sections", "decode"]).device == "cpu"


def test_cuda_table_lines() -> None:
    """What bench prints on a GPU: MFU against the measured and the datasheet peak, peak memory, largest batch."""
    from minillm_lightning.bench.main import format_table

    run = dict(ms_per_step=100.0, tokens_per_sec=1e5, tflops=300.0, mfu=0.5, mfu_datasheet=0.303)
    run |= dict(data_wait_share=0.01, peak_rss_mb=900.0, cuda_peak_mb=20480.0)
    model = dict(arch="8x512", params=26e6, seq_len=512, batch_size=32, precision="bf16-mixed", device="cuda:0")
    model |= dict(flops_per_token=1.6e8, peak_tflops=600.0, datasheet_tflops=989.4, max_batch=384)
    machine = dict(device_name="NVIDIA H200", torch="2.x", lightning="2.x", threads=16)
    text = format_table({"machine": machine, "configs": {"small.yaml": {"model": model, "train": run}}})
    assert "MFU 50.0% (datasheet 30.3%)" in text and "CUDA 20,480 MB" in text
    assert "datasheet peak 989 TFLOP/s" in text and "largest training batch that fits: 384 x 512" in text


def test_nanogpt_mode_runs_its_prepare_and_recipe(tmp_path: Path) -> None:
    """A stand-in checkout (nanoGPT itself is not vendored): prepare.py gets the local text, train.py gets the
    README's CPU recipe, and the last evaluation line is what is reported."""
    from minillm_lightning.bench.nanogpt import format_nanogpt, run_nanogpt
    from minillm_lightning.errors import MiniLLMError

    data = tmp_path / "nano" / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (data / "prepare.py").write_text("open('train.bin', 'w').write(str(len(open('input.txt').read())))\n")
    (tmp_path / "nano" / "train.py").write_text(
        "import sys\nprint(' '.join(sys.argv[1:]))\n"
        "print('step 0: train loss 4.2000, val loss 4.2100')\nprint('step 40: train loss 2.5000, val loss 2.6500')\n"
        # per-iteration times as nanoGPT prints them; iteration 0 (start-up) is left out of the median
        "for i, ms in enumerate([900.0, 80.0, 120.0, 96.0]):\n"
        "    print(f'iter {i}: loss 3.0000, time {ms:.2f}ms, mfu -100.00%')\n"
    )
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    out = run_nanogpt(tmp_path / "nano", text, iters=40)
    assert (data / "train.bin").read_text() == str(len(text.read_text()))
    assert out["final_step"] == 40 and out["val_loss"] == 2.65 and out["wall_s"] > 0
    for flag in ("--device=cpu", "--batch_size=12", "--n_embd=128", "--max_iters=40", "--eval_interval=40"):
        assert flag in out["command"]
    assert out["median_ms_per_iter"] == 96.0 and out["tokens_per_sec"] == pytest.approx(12 * 64 / 0.096)
    ours = {"config": "shakespeare_char.yaml", "wall_s": out["wall_s"] / 2, "final_step": 1, "tokens_per_sec": 4000.0}
    table = format_nanogpt(out, ours)
    # cost per token = nanoGPT's tokens/s over ours = 8000 / 4000
    assert "| nanoGPT CPU recipe | 40 |" in table and "| 8,000 |" in table and "| 4,000 |" in table
    assert "| ours / nanoGPT (wall; cost per token) | | **x0.50** | | **x2.00** |" in table
    with pytest.raises(MiniLLMError, match="not a nanoGPT checkout"):
        run_nanogpt(tmp_path, text)


STAND_IN_MODEL = """
import json, os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CALLS = os.path.join(os.path.dirname(__file__), "calls.json")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    bias: bool = True


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        shape = (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size)
        assert shape == (4, 4, 128, 64, 65) and config.dropout == 0.0 and not config.bias, config
        print("number of parameters: 0.80M")
        self.emb, self.head, self.calls = nn.Embedding(65, 128), nn.Linear(128, 65), 0

    def forward(self, idx, targets):
        assert idx.shape == (12, 64) and targets.shape == (12, 64)
        self.calls += 1
        with open(CALLS, "w") as f:
            json.dump(self.calls, f)
        logits = self.head(self.emb(idx))
        return logits, F.cross_entropy(logits.view(-1, 65), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        assert device_type == "cpu"
        print("using fused AdamW: False")
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
"""


def test_nanostep_times_both_steps_in_one_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A stand-in nanoGPT ``model.py`` (nanoGPT is not vendored) is built at nanoGPT's CPU shape and stepped as its
    train.py does; our variants run alternating with it; the ratios are per round against its time."""
    from minillm_lightning.bench import step
    from minillm_lightning.errors import MiniLLMError

    (tmp_path / "model.py").write_text(STAND_IN_MODEL)
    ablations = (("layernorm",), step.ABLATIONS[-1])
    res = step.nanostep_section(
        tmp_path, rounds=3, steps=2, variants=(("adamw", False), ("muon", False)), ablations=ablations
    )
    assert json.loads((tmp_path / "calls.json").read_text()) == 3 + 3 * 2  # first step + 2 warm-up, then 3 x 2
    assert "number of parameters" not in capsys.readouterr().out  # nanoGPT's own prints are kept out
    rows = res["rows"]
    assert list(rows) == [
        "nanoGPT",
        "adamw eager",
        "muon eager",
        "adamw eager, SwiGLU width 341 + LayerNorm",
        "adamw eager, LayerNorm + no RoPE + GELU 4x MLP",
    ]
    assert rows["nanoGPT"]["ratio"] == rows["nanoGPT"]["ratio_min"] == rows["nanoGPT"]["ratio_max"] == 1.0
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["first_step_s"] > 0
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    table = step.format_nanostep(res)
    assert "4x128, 4 heads, context 64, batch 12" in table and "| ours, muon eager |" in table
    assert f"**x{rows['adamw eager']['ratio']:.2f}**" in table
    with pytest.raises(MiniLLMError, match="no model.py"):
        step.nanostep_section(tmp_path / "missing")


def test_nanostep_needs_a_checkout_and_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sections nanostep`` without ``--nanogpt`` is refused before anything runs; with it, no config is measured
    and nanoGPT's full recipe is not run (that is ``--nanogpt`` without ``--sections``)."""
    from minillm_lightning.bench import main

    with pytest.raises(SystemExit):
        parse_args(["--sections", "nanostep"])
    seen = []
    monkeypatch.setattr(
        main, "nanostep_section", lambda path, **kw: seen.append((path, kw)) or {"shape": "s", "rows": {}}
    )
    monkeypatch.setattr(main, "run_nanogpt", lambda *a: pytest.fail("the full recipe ran"))
    monkeypatch.setattr(main, "bench_config", lambda *a: pytest.fail("a config was measured"))
    out = bench_main(["--nanogpt", str(tmp_path), "--sections", "nanostep", "--repeats", "4", "--steps", "7"])
    assert seen == [(tmp_path, {"rounds": 4, "steps": 7, "ablations": ()})]
    assert out["configs"] == {} and "fit_wall" not in out
    bench_main(["--nanogpt", str(tmp_path), "--sections", "nanostep", "--ablate", "--steps", "1"])
    assert seen[-1][1]["ablations"] == main.ABLATIONS
    with pytest.raises(SystemExit):
        parse_args(["--ablate"])  # the rows belong to the per-step comparison


def test_nanostep_ablation_swaps_the_named_parts_for_nanogpts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ablated steps build what their rows say: a SwiGLU holding nanoGPT's MLP parameter count, LayerNorm in
    place of every RMSNorm, a 4x GELU MLP in place of every SwiGLU; without RoPE the model computes what it computes
    with an identity rotation (cos 1, sin 0), and the rotation is back once the step is over."""
    from minillm_lightning.bench import step
    from minillm_lightning.model import gpt

    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    base = step._our_module("adamw", False, ())
    mlp = base.model.layers[0].mlp
    nano_mlp = 2 * 4 * 128 * 128  # c_fc and c_proj of nanoGPT's block
    assert abs(sum(p.numel() for p in mlp.parameters()) - nano_mlp) / nano_mlp < 0.002
    assert step._our_module("adamw", False).model.config.intermediate_size == 384  # the default, unablated
    ln = step._our_module("adamw", False, ("layernorm",))
    assert count(ln, gpt.RMSNorm) == 0 and count(ln, torch.nn.LayerNorm) == 2 * 4 + 1
    gelu = step._our_module("adamw", False, ("gelu",))
    assert count(gelu, gpt.SwiGLU) == 0 and count(gelu, step._GeluMLP) == 4
    assert gelu.model.layers[0].mlp(torch.ones(1, 128)).shape == (1, 128)

    torch.manual_seed(0)
    x = torch.randint(0, 65, (2, 64))
    no_rope = step._our_module("adamw", False, ())
    with torch.no_grad():
        rotated = no_rope.model(x).logits
        with mock.patch.object(gpt, "apply_rope", step._no_rotation):
            unrotated = no_rope.model(x).logits
        no_rope.model.rope[..., 0].fill_(1.0)  # cos 1, sin 0: no rotation
        no_rope.model.rope[..., 1].fill_(0.0)
        identity = no_rope.model(x).logits
    torch.testing.assert_close(unrotated, identity)
    assert not torch.allclose(rotated, identity)
    calls = []
    monkeypatch.setattr(step, "_no_rotation", lambda qk, rot: calls.append(qk.shape) or qk)
    step._our_step("adamw", False, ("no-rope",))(x, x)
    assert calls == [(2, 64, 4, 32)] * 8  # q and k of every block
    assert gpt.apply_rope.__name__ == "apply_rope"  # restored after the step


def test_cpu_name_states_the_host_class() -> None:
    """A published time needs its host: the CPU model, family/model and the vector units that set the matmul peak."""
    from minillm_lightning.bench.machine import cpu_name

    xeon = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel Xeon\n"
    xeon += "flags\t\t: fpu avx2 avx512f amx_tile\n"
    amd = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: avx avx2\n\n"
    amd += "processor\t: 1\nmodel name\t: another\n"
    cpus = os.cpu_count()
    assert cpu_name(xeon) == f"Intel Xeon (family 6 model 143), AVX-512/AMX, {cpus} CPUs"
    assert cpu_name(amd) == f"AMD EPYC 7B13 (family 25 model 1), AVX2, {cpus} CPUs"
    assert cpu_name("").endswith(f", {cpus} CPUs")
