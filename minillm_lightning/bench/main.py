"""``minillm bench``: training speed through Lightning and a plain PyTorch loop, decoding speed, data preparation
speed, and the wall clock of a complete ``minillm fit``. What every number means: docs/performance.md.

minillm bench                                                   # pretrain_tiny + pretrain_small, all sections
minillm bench --config configs/pretrain_tiny.yaml --steps 50 --warmup 5 --sections train,loop
minillm bench --fit-wall configs/shakespeare_char.yaml          # wall clock and final val/nats_per_char
minillm bench --config configs/pretrain_tiny.yaml --sections dpo   # a DPO step against an SFT step
minillm bench --config configs/pretrain_tiny.yaml --sections serve # minillm serve tokens/s at 1, 4, 16 clients

Training runs are built from the YAML exactly as ``minillm fit`` builds them (LightningCLI with ``run=False``),
with the logger, checkpointing, progress bar, validation and the config's callbacks switched off. The plain loop
trains a copy of the same initial model on the same data module's loader with the same optimizer, schedule,
precision and clipping, alternating with the Lightning runs; both record their losses, and the table reports
how far apart they are (0 on a CPU: the comparison is like for like).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from minillm_lightning.bench.args import DEFAULT_CONFIGS, DEFAULT_SECTIONS
from minillm_lightning.bench.decode import decode_section
from minillm_lightning.bench.dpo import dpo_section, format_dpo
from minillm_lightning.bench.eval import eval_section, format_eval
from minillm_lightning.bench.fitwall import fit_wall
from minillm_lightning.bench.machine import (
    cpu_name,
    cuda_max_batch,
    datasheet_tflops,
    measure_peak_flops,
    rss,
    sync,
    timed,
)
from minillm_lightning.bench.nanogpt import format_nanogpt, run_nanogpt
from minillm_lightning.bench.profile import format_profile, profile_section
from minillm_lightning.bench.serve import format_serve, serve_section
from minillm_lightning.bench.step import ABLATIONS, format_nanostep, nanostep_section
from minillm_lightning.callbacks.throughput import compute_dtype, flops_per_token
from minillm_lightning.losses import lm_loss
from minillm_lightning.model import MiniGPTConfig

NANOGPT_RECIPE = "configs/shakespeare_char.yaml"  # the recipe --nanogpt times against nanoGPT's

# plain `minillm bench` on a CPU: pretrain_small as configured (batch 32 x 512, bf16-mixed) takes tens of seconds
# per step there, so the default run measures it at batch 4 in fp32 with few steps (minutes instead of an hour)
CPU_SMALL_DEFAULTS = dict(batch_size=4, precision="32-true", steps=5, warmup=1)
MB = 1024 * 1024

__all__ = ["StepClock", "flops_per_token", "measure_peak_flops", "plain_loop_run", "run_bench"]


# ---- timing shared by the Lightning run and the plain loop ----


@dataclass
class StepClock:
    """Wall time of optimizer steps ``warmup+1 .. warmup+steps`` and how much of it passed between batches.

    Both loops call :meth:`batch_start` when a batch is on the device and compute is about to start, and
    :meth:`batch_end` after the batch (and the optimizer step it completed, if any). The measured window runs
    from the end of warmup step ``warmup`` to the end of step ``warmup + steps``, so it holds exactly ``steps``
    steps, each with the gap before it: the time spent fetching the next batch, moving it to the device and, for
    Lightning, the loop's own bookkeeping between the hooks. The gaps are host time (no device synchronisation per
    step), so on a GPU they count what the host waited for, not what the device idled.
    """

    warmup: int
    steps: int
    device: torch.device
    losses: list[torch.Tensor] = field(default_factory=list)
    t0: float | None = None
    t1: float | None = None
    wait: float = 0.0
    tokens: int = 0
    peak_rss: int = 0
    _last_end: float | None = None

    @property
    def measuring(self) -> bool:
        return self.t0 is not None and self.t1 is None

    def batch_start(self) -> None:
        now = time.perf_counter()
        if self.measuring and self._last_end is not None:
            self.wait += now - self._last_end

    def batch_end(self, optimizer_steps: int, tokens: int, loss: torch.Tensor) -> None:
        """Record a finished batch; ``optimizer_steps`` is the number of optimizer steps taken so far."""
        self.losses.append(loss.detach().float())
        if self.measuring:
            self.tokens += tokens
            self.peak_rss = max(self.peak_rss, rss())
            if optimizer_steps >= self.warmup + self.steps:
                sync(self.device)
                self.t1 = time.perf_counter()
        elif self.t0 is None and optimizer_steps >= self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        self._last_end = time.perf_counter()

    def result(self, flops_per_tok: int, peak_flops: float | None) -> dict[str, Any]:
        """ms per optimizer step, tokens/s, achieved TFLOP/s, MFU, data-wait share, peak memory, the losses."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the run ended before the measured steps did (fewer batches than warmup + steps?)")
        seconds = self.t1 - self.t0
        flops = flops_per_tok * self.tokens / seconds
        return {
            "ms_per_step": 1000 * seconds / self.steps,
            "tokens_per_sec": self.tokens / seconds,
            "tflops": flops / 1e12,
            "mfu": flops / peak_flops if peak_flops else None,
            "data_wait_share": self.wait / seconds,
            "peak_rss_mb": self.peak_rss / MB,
            "cuda_peak_mb": torch.cuda.max_memory_allocated(self.device) / MB if self.device.type == "cuda" else None,
            "losses": [float(x) for x in self.losses],
        }


class _ClockCallback(Callback):
    """Feeds a :class:`StepClock` from Lightning's batch hooks."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.clock.batch_start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.clock.batch_end(trainer.global_step, batch["input_ids"].numel(), outputs["loss"])


# ---- building a run from a config, as `minillm fit` does ----


def instantiate(config: str, overrides: list[str]) -> Any:
    """The LightningCLI of ``minillm fit --config config overrides...``, instantiated but not run.

    Mirrors :func:`minillm_lightning.trainer_cli.run_lightning` with ``run=False`` (no subcommand then) and without the
    SaveConfigCallback (a benchmark must not write config.yaml next to real runs).
    """
    from minillm_lightning.trainer_cli import run_lightning

    with warnings.catch_warnings():  # our own argv (`bench ...`) is not meant for the CLI: say nothing about it
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return run_lightning(["--config", config, *overrides], run=False, save_config_callback=None)


def bench_overrides(args: argparse.Namespace, root: str) -> list[str]:
    """Arguments that turn a config's run into a measured run: ``warmup + steps`` steps, nothing else."""
    out = [
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.max_steps={args.warmup + args.steps}",
        "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={root}",
        "--trainer.devices=1",
        f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
    ]
    if args.precision:
        out.append(f"--trainer.precision={args.precision}")
    return out + [o if o.startswith("--") else "--" + o for o in args.override]


# ---- training: Lightning vs a plain PyTorch loop ----


def lightning_run(cli: Any, init_state: dict[str, torch.Tensor], warmup: int, steps: int) -> StepClock:
    """One measured ``Trainer.fit`` of the CLI's model and data module, from ``init_state``, on a fresh Trainer."""
    module = cli.model
    module.model.load_state_dict(init_state)
    module._t_last, module._tokens_since = None, 0  # the module's own tokens/s window starts afresh
    clock = StepClock(warmup, steps, cli.trainer.strategy.root_device)
    trainer = cli.instantiate_trainer(callbacks=[_ClockCallback(clock)])
    trainer.fit(module, datamodule=cli.datamodule)
    return clock


def _optimizer(
    module: L.LightningModule, max_steps: int, precision: str, clip_val: float | None = None
) -> tuple[Any, Any]:
    """The module's own ``configure_optimizers`` (param groups, AdamW, warmup-cosine), outside any Trainer.

    It reads only ``trainer.max_steps``, ``trainer.precision`` and ``trainer.gradient_clip_val`` (which picks
    the AdamW implementation); a stand-in provides them, so the plain loop optimises with exactly the code the
    Lightning run uses.
    """
    module.trainer = SimpleNamespace(max_steps=max_steps, precision=precision, gradient_clip_val=clip_val)
    try:
        conf = module.configure_optimizers()
    finally:
        module.trainer = None
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _batches(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Endless epochs over ``loader``, setting the sampler's epoch as Lightning's fit loop does."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def plain_loop_run(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    init_state: dict[str, torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
    precision: str,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
    accumulate: int = 1,
) -> StepClock:
    """Train ``module``'s backbone for ``warmup + steps`` optimizer steps in plain PyTorch (no Trainer).

    What ``PretrainModule.training_step`` computes (backbone + ``lm_loss`` + MoE auxiliary loss), on
    ``datamodule.train_dataloader()``, with the module's optimizer and schedule, autocast for ``bf16-mixed``,
    loss / ``accumulate`` per batch and gradient clipping before each optimizer step, as Lightning does.
    """
    precision = str(precision)
    if precision in ("32-true", "32", "bf16-mixed"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    else:
        raise ValueError(f"the plain loop supports precision 32-true and bf16-mixed, not {precision}")
    module.model.load_state_dict(init_state)
    module.to(device).train()
    opt, sched = _optimizer(module, warmup + steps, precision, clip_val)
    params = [p for g in opt.param_groups for p in g["params"]]
    clock = StepClock(warmup, steps, device)
    n_batches = n_steps = 0
    data = _batches(datamodule.train_dataloader())
    while n_steps < warmup + steps:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
        clock.batch_start()
        with autocast:
            out = module._forward(batch["input_ids"])
            loss = (lm_loss(out.logits, batch["labels"])[0] + out.aux_loss) / accumulate
        loss.backward()
        n_batches += 1
        if n_batches % accumulate == 0:
            if clip_val:
                if clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(params, clip_val)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip_val)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            n_steps += 1
        clock.batch_end(n_steps, batch["input_ids"].numel(), loss)
    return clock


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians over repetitions (peak memory: the maximum); losses of the first repetition."""
    row: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if key == "losses":
            row[key] = runs[0][key]
        elif not values:
            row[key] = None
        else:
            row[key] = max(values) if key.endswith("_mb") else statistics.median(values)
    row["ms_per_step_all"] = [r["ms_per_step"] for r in runs]
    return row


def train_sections(cli: Any, args: argparse.Namespace, sections: set[str], peak: float | None) -> dict[str, Any]:
    """The ``train`` (Lightning) and ``loop`` (plain PyTorch) sections, alternating repetitions."""
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    init_state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    plain = copy.deepcopy(module) if "loop" in sections else None  # before any Trainer touches the module
    fpt = flops_per_token(module.arch, dm.seq_len)
    device = trainer.strategy.root_device
    runs: dict[str, list[dict[str, Any]]] = {"train": [], "loop": []}
    for rep in range(args.repeats):
        order = ["train", "loop"] if rep % 2 == 0 else ["loop", "train"]  # alternate: drift hits both alike
        for name in [s for s in order if s in sections]:
            if name == "train":
                clock = lightning_run(cli, init_state, args.warmup, args.steps)
            else:
                clock = plain_loop_run(
                    plain,
                    dm,
                    init_state,
                    args.warmup,
                    args.steps,
                    device,
                    trainer.precision,
                    trainer.gradient_clip_val,
                    trainer.gradient_clip_algorithm or "norm",
                    trainer.accumulate_grad_batches,
                )
            runs[name].append(clock.result(fpt, peak))
    out = {name: _median_row(r) for name, r in runs.items() if r}
    if "train" in out and "loop" in out:
        ratios = [a["ms_per_step"] / b["ms_per_step"] for a, b in zip(runs["train"], runs["loop"])]
        out["loop"]["lightning_overhead"] = statistics.median(ratios)
        la, lb = out["train"]["losses"], out["loop"]["losses"]
        out["loop"]["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(la, lb))
    return out


# ---- data preparation ----


def data_section(cli: Any) -> dict[str, Any]:
    """Tokenizer training and corpus preparation (LitData token shards) of the config's corpus, in a temporary
    cache: what a first ``minillm fit`` / ``minillm prepare`` pays before its first step."""
    from minillm_lightning.data.pretrain import PretrainDataModule

    dm = cli.datamodule
    if not isinstance(dm, PretrainDataModule):
        return {"skipped": f"{type(dm).__name__}: the data section measures PretrainDataModule corpora"}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-") as tmp:
        init = {**cli.config.data.init_args.as_dict(), "cache_dir": tmp, "dataset_dir": None}
        fresh = type(dm)(**init)
        t_tok, tok = timed(lambda: fresh.tokenizer)  # trained here unless the config names a tokenizer file
        t_prep, _ = timed(fresh.prepare_data)
        meta = json.loads((Path(fresh.dataset_path) / "meta.json").read_text())
    splits = meta["splits"].values()
    tokens, chars = sum(s["tokens"] for s in splits), sum(s["chars"] for s in splits)
    return {
        "tokenizer": f"{fresh.tok_settings.model_type} {tok.vocab_size}",
        "tokenizer_train_s": t_tok,
        "prepare_s": t_prep,
        "prepared_tokens": tokens,
        "prepare_tokens_per_sec": tokens / t_prep,
        "prepare_mb_per_sec": sum(s["bytes"] for s in splits) / 1e6 / t_prep,
        "chars_per_token": chars / max(tokens, 1),
    }


# ---- one config ----


def bench_config(config: str, args: argparse.Namespace, sections: set[str], peaks: dict[str, float]) -> dict:
    """All requested sections for one config."""
    with tempfile.TemporaryDirectory(prefix="minillm-bench-") as root:
        cli = instantiate(config, bench_overrides(args, root))
        module, dm, trainer = cli.model, cli.datamodule, cli.trainer
        arch: MiniGPTConfig = module.arch
        device = trainer.strategy.root_device
        dtype = compute_dtype(trainer.precision)
        key = f"{device.type}/{str(dtype).removeprefix('torch.')}"
        if key not in peaks and sections & {"train", "loop"}:
            n = args.peak_n or (8192 if device.type == "cuda" else 2048)
            peaks[key] = measure_peak_flops(device, dtype, n)
        seq_len = getattr(dm, "seq_len", None) or getattr(dm, "max_length", None)
        result: dict[str, Any] = {
            "model": {
                "arch": f"{arch.n_layer}x{arch.dim}, {arch.n_head}/{arch.n_kv_head} heads, vocab {arch.vocab_size}",
                "params": module.model.num_parameters(),
                "non_embedding_params": module.model.num_parameters(exclude_embeddings=True),
                "flops_per_token": flops_per_token(arch, seq_len),
                "seq_len": seq_len,
                "batch_size": dm.batch_size,
                "tokens_per_step": dm.batch_size * seq_len * trainer.accumulate_grad_batches,
                "precision": str(trainer.precision),
                "device": str(device),
                "peak_tflops": peaks[key] / 1e12 if key in peaks else None,
                "datasheet_tflops": datasheet_tflops(device, dtype),
            }
        }
        if sections & {"train", "loop"}:
            if type(module).__name__ != "PretrainModule":
                raise ValueError(f"{config}: bench trains PretrainModule configs only, not {type(module).__name__}")
            result.update(train_sections(cli, args, sections, peaks.get(key)))
            sheet = result["model"]["datasheet_tflops"]
            for name in ("train", "loop"):  # on a GPU: MFU against the datasheet too (the usual convention)
                if name in result:
                    result[name]["mfu_datasheet"] = result[name]["tflops"] / sheet if sheet else None
            if device.type == "cuda":
                result["model"]["max_batch"] = cuda_max_batch(arch, device, trainer.precision, seq_len, dm.batch_size)
        if "decode" in sections:
            dec_dtype = torch.bfloat16 if device.type == "cuda" and dtype == torch.bfloat16 else torch.float32
            result["decode"] = decode_section(arch, device, dec_dtype, args.decode_lengths, args.beam_length)
        if "data" in sections:
            result["data"] = data_section(cli)
        if "dpo" in sections:
            pairs = max(1, dm.batch_size // 2)  # 2 x pairs sequences: the config's own batch size
            result["dpo"] = dpo_section(arch, device, dtype, pairs, seq_len, args.steps, args.warmup, args.repeats)
        if "serve" in sections:
            result["serve"] = serve_section(arch, dm.tokenizer, device)
        if "profile" in sections:
            result["profile"] = profile_section(cli, args.warmup, args.steps)
        if "eval" in sections:
            dec_dtype = torch.bfloat16 if device.type == "cuda" and dtype == torch.bfloat16 else torch.float32
            eval_arch = replace(arch, vocab_size=args.eval_vocab or arch.vocab_size)
            train_shape = (dm.batch_size, seq_len)
            result["eval"] = eval_section(eval_arch, device, dec_dtype, *train_shape, args.steps, args.repeats)
    return result


def _fmt(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"
    return f"{x:,}{unit}"


def format_table(results: dict[str, Any]) -> str:
    """The human-readable summary of :func:`run_bench`'s results."""
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m['device_name']}, torch {m['torch']}, lightning {m['lightning']}, {m['threads']} threads")
    for config, r in results["configs"].items():
        mi = r["model"]
        lines.append(
            f"\n{config}: {mi['arch']}, {mi['params'] / 1e6:.2f}M params, seq {mi['seq_len']} x batch "
            f"{mi['batch_size']}, {mi['precision']} on {mi['device']}, {mi['flops_per_token'] / 1e6:.2f} MFLOP/token, "
            f"peak {_fmt(mi['peak_tflops'], ' TFLOP/s')}"
        )
        for name, label in (("train", "Lightning "), ("loop", "plain loop")):
            if name in r:
                t = r[name]
                mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "-"
                if t.get("mfu_datasheet") is not None:
                    mfu += f" (datasheet {100 * t['mfu_datasheet']:.1f}%)"
                extra = f"  Lightning/plain x{t['lightning_overhead']:.3f}" if "lightning_overhead" in t else ""
                lines.append(
                    f"  {label}  {_fmt(t['ms_per_step'], ' ms/step')}  {_fmt(t['tokens_per_sec'], ' tok/s')}  MFU {mfu}"
                    f"  data wait {100 * t['data_wait_share']:.1f}%  RSS {_fmt(t['peak_rss_mb'], ' MB')}"
                    f"  CUDA {_fmt(t['cuda_peak_mb'], ' MB')}{extra}"
                )
        if mi.get("datasheet_tflops") or mi.get("max_batch"):
            lines.append(
                f"  GPU: datasheet peak {_fmt(mi.get('datasheet_tflops'), ' TFLOP/s')}, largest training batch that "
                f"fits: {_fmt(mi.get('max_batch'))} x {mi['seq_len']}"
            )
        if "loop" in r and "loss_max_abs_diff" in r["loop"]:
            lines.append(f"  losses Lightning vs plain: max |diff| {r['loop']['loss_max_abs_diff']:.3g}")
        if "decode" in r:
            d = r["decode"]
            ext = ", block_size extended" if d["block_size_extended"] else ""
            lines.append(f"  decode ({d['dtype']}, batch 1, greedy, prompt {d['prompt_tokens']}{ext}):")
            for n, v in d["lengths"].items():
                hf = (d["hf"] or {}).get(n)
                hf_txt = f"  HF {_fmt(hf['tokens_per_sec'], ' tok/s')} (ours x{hf['ours_vs_hf']:.2f})" if hf else ""
                lines.append(
                    f"    {n:>5} new: cache {_fmt(v['cache_tokens_per_sec'], ' tok/s')}  no cache "
                    f"{_fmt(v['no_cache_tokens_per_sec'], ' tok/s')} (cache x{v['cache_speedup']:.2f}){hf_txt}"
                )
            b = d["beam"]
            lines.append(
                f"    beam {b['num_beams']} @ {b['new_tokens']}: {_fmt(b['beam_tokens_per_sec'], ' tok/s')} vs greedy "
                f"{_fmt(b['greedy_tokens_per_sec'], ' tok/s')} (x{b['beam_cost']:.2f} time)"
            )
        if "dpo" in r:
            lines.append(format_dpo(r["dpo"]))
        if "serve" in r:
            lines.append(format_serve(r["serve"]))
        if "eval" in r:
            lines.append(format_eval(r["eval"]))
        if "profile" in r:
            lines.append(format_profile(r["profile"]))
        if "data" in r:
            d = r["data"]
            if "skipped" in d:
                lines.append(f"  data: skipped ({d['skipped']})")
            else:
                lines.append(
                    f"  data: tokenizer ({d['tokenizer']}) trained in {_fmt(d['tokenizer_train_s'], ' s')}, "
                    f"{_fmt(d['prepared_tokens'])} tokens prepared in {_fmt(d['prepare_s'], ' s')} "
                    f"({_fmt(d['prepare_tokens_per_sec'], ' tok/s')}, {_fmt(d['prepare_mb_per_sec'], ' MB/s')})"
                )
    if results.get("nanostep"):
        lines.append(format_nanostep(results["nanostep"]))
    if results.get("nanogpt"):
        lines.append(f"\nnanoGPT: python {results['nanogpt']['command']}")
        lines.append(format_nanogpt(results["nanogpt"], results["fit_wall"]))
    if results.get("fit_wall"):
        f = results["fit_wall"]
        lines.append(
            f"\nminillm fit --config {f['config']}: {_fmt(f['wall_s'], ' s')} wall (tokenizer {f['tokenizer']}, "
            f"token cache {f['token_cache']}), "
            f"val/loss {_fmt(f.get('val_loss'), digits=4)}, "
            f"val/nats_per_char {_fmt(f.get('val_nats_per_char'), digits=4)} "
            f"at step {f.get('final_step', '-')}"
        )
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements ``args`` (from :func:`parse_args`) ask for, print them and return them (and write them
    with ``--output``)."""
    if args.output and Path(args.output).is_dir():  # checked now, not after minutes of measuring
        from minillm_lightning.errors import MiniLLMError

        raise MiniLLMError(f"--output {args.output} is a directory; give a JSON file path such as {args.output}/b.json")
    nano_wall = args.nanogpt is not None and (args.sections is None or args.fit_wall is not None)
    if nano_wall and args.fit_wall is None:
        args.fit_wall = NANOGPT_RECIPE
        # our recipe trains on the text nanoGPT gets (the config's own path unless --nanogpt-text says otherwise)
        args.override = [*args.override, f"data.init_args.sources=[{{path: {Path(args.nanogpt_text).resolve()}}}]"]
    sections = set((args.sections or ",".join(DEFAULT_SECTIONS)).split(","))
    # a complete fit, or the step against nanoGPT, alone: no config's sections unless --config names one
    only_wall = args.fit_wall is not None and args.sections is None
    configs = (
        [] if args.config is None and (only_wall or sections == {"nanostep"}) else (args.config or DEFAULT_CONFIGS)
    )
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "machine": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "threads": torch.get_num_threads(),
        },
        "args": {k: v for k, v in vars(args).items()},
        "configs": {},
    }
    peaks: dict[str, float] = {}
    for config in configs:
        run_args = args
        if args.config is None and device.type == "cpu" and config.endswith("pretrain_small.yaml"):
            d = CPU_SMALL_DEFAULTS
            run_args = argparse.Namespace(**vars(args))
            run_args.override = [*args.override, f"data.init_args.batch_size={d['batch_size']}"]
            run_args.precision = args.precision or d["precision"]
            run_args.steps, run_args.warmup = min(args.steps, d["steps"]), min(args.warmup, d["warmup"])
            print(
                f"{config}: default CPU run at batch {d['batch_size']}, {run_args.precision}, {run_args.steps} steps "
                f"(pass --config {config} to measure it as configured)"
            )
        results["configs"][config] = bench_config(config, run_args, sections, peaks)
    results["machine"]["peak_tflops"] = {k: v / 1e12 for k, v in peaks.items()}
    if "nanostep" in sections:
        ablations = ABLATIONS if args.ablate else ()
        results["nanostep"] = nanostep_section(args.nanogpt, rounds=args.repeats, steps=args.steps, ablations=ablations)
    if nano_wall:  # nanoGPT right before ours: both see the same machine state
        results["nanogpt"] = run_nanogpt(args.nanogpt, args.nanogpt_text, args.nanogpt_iters)
    if args.fit_wall:
        results["fit_wall"] = fit_wall(args.fit_wall, args.keep, args.override)
    results["machine"]["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.output}")
    return results
