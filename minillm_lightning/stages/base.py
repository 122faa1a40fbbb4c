"""What every stage shares: the MiniGPT backbone, ``init_from``, the tokenizer carried in checkpoints, and the
optimizer settings (:class:`OptimConfig`: AdamW or Muon, warmup + cosine learning-rate schedule).

A stage module declares its own arguments and only the optimizer defaults it changes; everything else reaches
:class:`StageModule` through ``**kwargs`` (LightningCLI follows ``**kwargs`` into the base class, so ``--help``
and ``--print_config`` list every argument, flat: ``model.init_args.learning_rate``, ``...optimizer``, ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.checkpoint import (
    META_KEY,
    CheckpointError,
    checkpoint_meta,
    load_backbone_weights,
    load_checkpoint,
)
from minillm_lightning.errors import ConfigError
from minillm_lightning.model import PRESETS, GPTOutput, MiniGPT, MiniGPTConfig
from minillm_lightning.optim import NS_DTYPES, MuonAdamW, NSDtype, grad_norms, muon_param_groups
from minillm_lightning.tokenizer import Tokenizer


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay: str = "cosine") -> float:
    """LR multiplier: 1) linear warmup from ~0 to 1 over ``warmup_steps``; 2) cosine (or, with
    ``decay="linear"``, straight-line) decay to ``min_ratio`` at ``total_steps``; 3) ``min_ratio`` afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    remaining = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * remaining


def weights_digest(module: torch.nn.Module) -> str:
    """A short SHA-256 of ``module``'s state (names, shapes, dtypes and bytes): which weights a frozen model holds."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def expect_frozen_models() -> None:
    """Silence Lightning's warning, at fit start, that some modules are in eval mode: a stage with frozen models
    (DPO's reference, PPO's reference and reward model) keeps them in eval mode on purpose."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def why_not_compile(device: torch.device, strategy: Strategy) -> str | None:
    """``compile="auto"``: None where ``torch.compile`` is expected to repay its one-off cost within a run, else
    the reason it is left off.

    On by default only for CUDA under one device or DDP. On the CPUs measured (docs/performance.md) the compile did
    not repay itself: the Muon Shakespeare recipe's 750 steps do not win back a cold compile's ~25 s, and
    pretrain_small's step is matmul-bound (2.6 s eager, 2.7 s compiled at batch 4). On a GPU the eager step of a
    model this small is bound by kernel launches and memory passes that the compile fuses. FSDP and DeepSpeed wrap
    the blocks themselves and are not tried with a compiled backbone; Triton, which compiles the GPU kernels, needs
    a GPU of compute capability 7.0 or newer."""
    if device.type != "cuda":
        return f"on {device.type} the compile did not repay its one-off cost in the recipes measured"
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return f"not tried with {type(strategy).__name__}"
    if importlib.util.find_spec("triton") is None:
        return "Triton, which torch.compile needs on GPUs, is not installed"
    if torch.cuda.get_device_capability(device) < (7, 0):
        return "this GPU is older than Triton supports (compute capability 7.0)"
    return None


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer settings every stage accepts (as flat ``model.init_args.*`` arguments); a stage changes
    only the defaults it needs."""

    optimizer: Literal["adamw", "muon"] = "adamw"
    """``adamw``, or ``muon``: Muon (orthogonalised momentum) on the transformer blocks' weight matrices and AdamW
    at ``learning_rate`` on embeddings, heads and norms; trains a small model from scratch in fewer steps
    (configs/shakespeare_char.yaml). Not with FSDP or DeepSpeed (sharded matrices)."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate."""
    muon_learning_rate: float = 0.02
    """Peak Muon learning rate (follows the same warmup/cosine schedule)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon update: 3 costs ~40% less optimizer time on a small model for a slightly
    less orthogonal update (docs/performance.md)."""
    muon_ns_dtype: NSDtype = "auto"
    """dtype of the Newton-Schulz iterations. ``auto``: bfloat16 on CUDA and on CPUs that multiply bfloat16 in
    hardware (AMX / AVX-512 BF16 Xeons: ~2x faster there), float32 elsewhere (AVX2 CPUs such as AMD EPYC)."""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices and embeddings; 1-D parameters (norm weights) get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup: float = 0.02
    """Warmup length: a share of the total optimizer steps when < 1, else a number of optimizer steps."""
    min_lr_ratio: float = 0.1
    """The decay ends at ``learning_rate * min_lr_ratio`` (1: constant after warmup)."""
    decay: Literal["cosine", "linear"] = "cosine"
    """Shape of the decay after warmup: ``cosine``, or ``linear`` (a straight line to the final learning rate)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.muon_learning_rate <= 0:
            raise ValueError(f"muon_learning_rate must be positive, got {self.muon_learning_rate}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"muon_ns_steps must be >= 1, got {self.muon_ns_steps}")
        if self.muon_ns_dtype != "auto" and self.muon_ns_dtype not in NS_DTYPES:
            raise ValueError(f"muon_ns_dtype must be 'auto', 'float32' or 'bfloat16', got {self.muon_ns_dtype!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be >= 0 and min_lr_ratio in [0, 1]")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}")
        object.__setattr__(self, "betas", tuple(self.betas))  # YAML gives a list

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup in optimizer steps: 1) a share of ``total_steps`` or a count; 2) at least 1 unless it is 0."""
        steps = int(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)
        return max(1, steps) if self.warmup > 0 else 0

    def schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warmup then cosine or linear decay over ``total_steps`` optimizer steps (:func:`warmup_cosine`)."""
        warmup = self.warmup_steps(total_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total_steps, self.min_lr_ratio, self.decay)
        )


def use_fused_adamw(device_types: set[str], precision: str, clips: bool) -> bool:
    """Whether a stage gets the fused AdamW (one kernel per parameter group, on a GPU and on a CPU): the fastest,
    but it unscales AMP gradients inside ``step()``, and Lightning's mixed-precision plugin then refuses to clip
    them. So not when gradients are clipped under a mixed precision: Trainer-level ``gradient_clip_val``, or manual
    optimization, which clips by itself. ``device_types``: where the parameters live (PyTorch fuses on cpu and
    cuda only)."""
    return bool(device_types) and device_types <= {"cpu", "cuda"} and not ("mixed" in precision and clips)


def rng_states() -> dict[str, Any]:
    """Random number generator states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def training_only_arch(given: MiniGPTConfig | None) -> dict[str, Any]:
    """The fields of ``arch`` that shape no weight and so apply on top of an ``init_from`` architecture:
    ``gradient_checkpointing`` always, ``dropout`` where it is set away from its preset's default (e.g. dropout
    for fine-tuning a model pretrained without it)."""
    if given is None:
        return {"gradient_checkpointing": False}
    kept: dict[str, Any] = {"gradient_checkpointing": given.gradient_checkpointing}
    if given.dropout != MiniGPTConfig(size=given.size).dropout:
        kept["dropout"] = given.dropout
    return kept


def ignored_arch_fields(given: MiniGPTConfig, used: MiniGPTConfig) -> list[str]:
    """The fields of ``given`` set away from their defaults (those of its size preset) that differ in ``used``.

    ``size`` counts when its preset differs from ``used``; ``intermediate_size`` not when ``dim`` already does
    (it is derived from ``dim``); the fields of :func:`training_only_arch` never (they apply with ``init_from``)."""
    default = MiniGPTConfig(size=given.size)
    names: list[str] = []
    if given.size != "custom" and any(getattr(used, k) != v for k, v in PRESETS[given.size].items()):
        names.append("size")
    for f in fields(MiniGPTConfig):
        name = f.name
        if name in ("size", "gradient_checkpointing", "dropout") or (name == "intermediate_size" and "dim" in names):
            continue
        value = getattr(given, name)
        if value != getattr(default, name) and value != getattr(used, name):
            names.append(name)
    return names


class StageModule(L.LightningModule):
    """Base class of the stage modules; not used directly.

    Args:
        arch: backbone architecture. With ``init_from`` the checkpoint's architecture is used (a warning names the
            fields set here that it overrides), except ``dropout`` and ``gradient_checkpointing``, which shape no
            weight and apply from here.
        vocab_size: tokenizer vocabulary size; linked from the data module, do not set by hand.
        init_from: start a NEW stage from this checkpoint's weights (optimizer and counters start fresh).
            To continue the SAME run use ``--ckpt_path`` instead.
        compile: run the backbone through ``torch.compile`` in training steps (faster steps after a one-off
            compile cost; validation, test and predict stay eager, see :attr:`_forward`). ``auto``: only where it
            is expected to pay back, on CUDA with one device or DDP (:func:`why_not_compile`); decided at fit start.
        **optim: the fields of :class:`OptimConfig` (``optimizer``, ``learning_rate``, ``muon_learning_rate``,
            ``muon_ns_steps``, ``muon_ns_dtype``, ``weight_decay``, ``betas``, ``warmup``, ``min_lr_ratio``,
            ``decay``), given flat.
    """

    stage_name = "base"
    prerequisite: ClassVar[str | None] = None
    """The command that writes the checkpoint this stage starts from; named when ``init_from`` is missing."""
    starts_from: ClassVar[str] = "a checkpoint"
    """What ``init_from`` normally is, in words, for the messages."""
    requires_init_from: ClassVar[bool] = False
    """Refuse to start without ``init_from`` (instead of warning that the stage starts from random weights)."""
    # digests of the frozen models a stage rebuilds from files on resume (DPO's reference, PPO's reference and reward
    # model), by what they are: saved with each checkpoint, compared when one is loaded
    frozen_digests: dict[str, str] = {}
    data_modules: ClassVar[tuple[str, ...]] = ()
    """The minillm data modules (class names) whose batches this stage trains, validates and tests on; another
    minillm data module is refused at setup (a user's own data module is not checked). Empty: no check."""

    def __init__(
        self,
        arch: MiniGPTConfig | None = None,
        vocab_size: int | None = None,
        init_from: str | None = None,
        compile: bool | Literal["auto"] = False,
        **optim: Any,
    ) -> None:
        super().__init__()
        if compile not in (True, False, "auto"):
            raise ConfigError(f"model.compile={compile!r}: use true, false or auto")
        self.optim = OptimConfig(**optim)
        if isinstance(arch, dict):
            arch = MiniGPTConfig.from_dict(arch)
        given = arch
        arch = arch if arch is not None else MiniGPTConfig(size="tiny")
        self.tokenizer: Tokenizer | None = None
        ckpt = None
        if self.requires_init_from and not init_from:
            raise CheckpointError(
                f"{self.stage_name} needs model.init_args.init_from: {self.starts_from} (run `{self.prerequisite}` "
                f"first)"
            )
        if init_from:
            if self.prerequisite and not Path(init_from).is_file():
                raise CheckpointError(
                    f"model.init_from={init_from} does not exist. {self.stage_name} starts from {self.starts_from}: "
                    f"run `{self.prerequisite}` first, or point model.init_args.init_from and "
                    f"data.init_args.tokenizer at an existing checkpoint"
                )
            ckpt = load_checkpoint(init_from)
            meta = checkpoint_meta(ckpt, init_from)
            arch = MiniGPTConfig.from_dict({**meta["arch"], **training_only_arch(given)})
            if given is not None:
                self._warn_ignored_arch(given, arch, init_from)
            self.tokenizer = Tokenizer.from_checkpoint(ckpt, init_from)
            if meta.get("stage") == "reward" and self.stage_name != "reward":
                self.warn_once(
                    f"init_from={init_from} is a reward model: its backbone was trained to score answers, not to "
                    f"write them. {self.stage_name} normally starts from {self.starts_from}"
                )
            if vocab_size is not None and vocab_size != arch.vocab_size:
                raise CheckpointError(
                    f"init_from={init_from} has vocabulary {arch.vocab_size} but the data module's tokenizer has "
                    f"{vocab_size}; set data.tokenizer to the same checkpoint so both use its tokenizer"
                )
        elif vocab_size is not None:
            arch = MiniGPTConfig.from_dict({**arch.to_dict(), "vocab_size": vocab_size})
        if self.prerequisite and not init_from:
            self.warn_once(
                f"{self.stage_name} from random weights: set model.init_from to {self.starts_from} "
                f"({self.prerequisite})"
            )
        self.arch = arch
        self.save_hyperparameters(ignore=["arch"])
        # plain dicts only: LightningCLI reads hparams back with torch.load(weights_only=True); every optimizer
        # setting is recorded, also those left at the stage's default
        self.hparams["arch"] = arch.to_dict()
        self.hparams.update(asdict(self.optim))
        self.model = MiniGPT(arch)
        if ckpt is not None:
            load_backbone_weights(self.model, ckpt["state_dict"], f"init_from={init_from}")
        self.init_from = init_from
        # not a registered submodule (plain __dict__ entry): the weights are stored once, under `model.`
        self.__dict__["_compiled"] = torch.compile(self.model) if compile is True else None
        self.compile_setting = compile

    def _warn_ignored_arch(self, given: MiniGPTConfig, used: MiniGPTConfig, init_from: str) -> None:
        """Warn once when ``arch`` sets fields (away from their defaults) that the ``init_from`` architecture
        overrides; an ``arch`` left at its defaults says nothing."""
        ignored = ignored_arch_fields(given, used)
        if ignored:
            mine = ", ".join(f"arch.{name}={getattr(given, name)}" for name in ignored)
            theirs = ", ".join(f"{name}={getattr(used, name)}" for name in ignored)
            self.warn_once(
                f"{mine} ignored: the architecture comes from init_from {init_from} ({theirs}); "
                f"drop --model.init_args.arch or init_from"
            )

    @property
    def _forward(self) -> Callable[..., GPTOutput]:
        """The backbone to call: compiled (``compile=True``) in training mode, eager otherwise. An evaluation pass
        would need graphs of its own (no autograd, and again for a shorter last batch): on the Shakespeare recipe
        those took 33 s of the 72 s a fit spent compiling, for a few validation batches."""
        compiled = self.__dict__["_compiled"]
        return compiled if compiled is not None and self.training else self.model

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.compile_setting == "auto" and self.__dict__["_compiled"] is None:
            why_not = why_not_compile(self.trainer.strategy.root_device, self.trainer.strategy)
            if why_not is None:
                self.__dict__["_compiled"] = torch.compile(self.model)
            rank_zero_info(f"compile=auto: {'training steps compiled' if why_not is None else f'eager ({why_not})'}")
        self._check_data_module(stage)
        self._setup_tokenizer()

    def _check_data_module(self, stage: str) -> None:
        """Refuse a minillm data module whose batches this stage cannot read (a raw ``KeyError`` in the first step
        otherwise); ``predict`` takes a :class:`PromptDataModule` with any stage."""
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "predict" or dm is None or not self.data_modules:
            return
        ours = [c.__name__ for c in type(dm).__mro__ if c.__module__.startswith("minillm_lightning.data")]
        if ours and not set(ours) & set(self.data_modules):
            raise ConfigError(
                f"{type(self).__name__} reads the batches of {' or '.join(self.data_modules)}, not those of "
                f"{type(dm).__name__}; pair the stage with its data module"
            )

    # ---- tokenizer bookkeeping ----
    def _setup_tokenizer(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        dm_tok: Tokenizer | None = getattr(dm, "tokenizer", None) if dm is not None else None
        if dm_tok is not None:
            if self.tokenizer is not None and dm_tok.sha256 != self.tokenizer.sha256:
                raise CheckpointError(
                    f"the data module's tokenizer ({dm_tok.sha256[:12]}) is not the tokenizer of init_from="
                    f"{self.init_from} ({self.tokenizer.sha256[:12]}); set data.tokenizer to that checkpoint"
                )
            if dm_tok.vocab_size != self.arch.vocab_size:
                raise CheckpointError(
                    f"tokenizer vocabulary {dm_tok.vocab_size} != model vocab_size {self.arch.vocab_size}"
                )
            self.tokenizer = dm_tok
        if dm is not None:
            self.arch.check_fits(dm)

    def on_fit_start(self) -> None:
        self._training_started = False
        n, n_emb = self.model.num_parameters(), self.model.embed_tokens.weight.numel()
        a = self.arch
        rank_zero_info(
            f"MiniGPT[{a.size}] {self.stage_name}: {n / 1e6:.2f}M parameters ({(n - n_emb) / 1e6:.2f}M without "
            f"embeddings), {a.n_layer} layers x {a.dim} wide, {a.n_head} heads / {a.n_kv_head} kv heads"
            + (f", MoE {a.n_experts} experts top-{a.top_k}" if a.is_moe else "")
        )

    def on_train_start(self) -> None:
        self._training_started = True
        if self.trainer.ckpt_path:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            rank_zero_info(
                f"resumed from {self.trainer.ckpt_path}: continuing at step {self.global_step}, "
                f"epoch {self.current_epoch}, learning rate {lr:.3g}"
            )

    def on_fit_end(self) -> None:
        """A resumed run that had already reached its end: Lightning skips the training loop (no on_train_start,
        so no "continuing at step" line) and said only "`Trainer.fit` stopped: `max_steps=N` reached."."""
        trainer = self.trainer
        if not trainer.ckpt_path or getattr(self, "_training_started", True):
            return
        step, max_steps, max_epochs = trainer.global_step, trainer.max_steps, trainer.max_epochs
        if max_steps is not None and max_steps >= 0 and step >= max_steps:
            why = f"max_steps={max_steps} already reached, nothing to train; raise --trainer.max_steps to continue"
        elif max_epochs is not None and max_epochs >= 0 and self.current_epoch >= max_epochs:
            why = f"max_epochs={max_epochs} already reached, nothing to train; raise --trainer.max_epochs to continue"
        else:
            why = "no training step ran"
        rank_zero_info(f"resumed from {trainer.ckpt_path} at step {step}: {why}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {"stage": self.stage_name, "arch": self.arch.to_dict(), "format": 1}
        if self.frozen_digests:
            checkpoint[META_KEY]["frozen"] = dict(self.frozen_digests)
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state()
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY, {})
        if meta.get("stage") not in (None, self.stage_name):
            raise CheckpointError(
                f"this is a {meta['stage']} checkpoint but the run is a {self.stage_name} stage; to start "
                f"{self.stage_name} from it use --model.init_from, --ckpt_path only resumes the same stage"
            )
        self._check_backbone_fits(checkpoint, meta.get("arch"))
        for what, digest in (meta.get("frozen") or {}).items():
            if what in self.frozen_digests and self.frozen_digests[what] != digest:
                raise CheckpointError(
                    f"the frozen {what} of this run was rebuilt from a file whose weights differ from those the run "
                    f"started with (replaced or retrained since): resuming would optimise against another model. "
                    f"Restore that file, or start a new run"
                )
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def _check_backbone_fits(self, checkpoint: dict[str, Any], saved_arch: dict[str, Any] | None) -> None:
        """Refuse, in one line naming the settings that differ, a checkpoint whose backbone weights do not fit this
        run's (resumed with another ``arch`` or tokenizer vocabulary); torch's own message lists every tensor."""
        theirs = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
        ours = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        misfit = sorted(set(theirs) ^ set(ours)) + [k for k in theirs if k in ours and theirs[k].shape != ours[k].shape]
        if not misfit:
            return
        saved = saved_arch or {}
        changed = [
            f"{k}: {saved[k]!r} there, {v!r} here"
            for k, v in self.model.config.to_dict().items()
            if k in saved and saved[k] != v
        ]
        source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        raise CheckpointError(
            f"{source}: its weights do not fit this run's model ({'; '.join(changed) or f'e.g. {misfit[0]}'}). "
            f"--ckpt_path resumes a run with the same model settings and tokenizer; to start a new run from these "
            f"weights use --model.init_from"
        )

    # ---- prediction (`minillm predict`): completions of a PromptDataModule's prompts ----
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate a completion per prompt with ``self.generation_config`` (set by CompletionWriter; greedy
        128 tokens by default) and return ``{"index", "prompt", "completion"}`` records."""
        from minillm_lightning.generation import GenerationConfig, TextGenerator

        if self.tokenizer is None:
            raise CheckpointError("prediction needs a tokenizer: set model.init_from and data.tokenizer")
        cfg = getattr(self, "generation_config", None) or GenerationConfig(max_new_tokens=128, temperature=0.0)
        gen = TextGenerator(self.model, self.tokenizer)
        outputs = gen.generate(batch["prompt_ids"], cfg)
        stops = set(gen.stop_tokens)
        return [
            {"index": int(i), "prompt": p, "completion": self.tokenizer.decode([t for t in toks if t not in stops])}
            for i, p, toks in zip(batch["index"], batch["prompt"], outputs)
        ]

    # ---- optimisation ----
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self._muon_optimizer() if self.optim.optimizer == "muon" else self._adamw_optimizer()
        sched = self.optim.schedule(opt, self.schedule_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def schedule_steps(self) -> int:
        """Optimizer steps the learning-rate schedule spans: ``trainer.max_steps``, else Lightning's estimate."""
        total = self.trainer.max_steps
        if total is None or total < 0:
            # only when no max_steps is set: estimating touches the train loader, see Lightning's caveat
            total = int(self.trainer.estimated_stepping_batches)
        return total

    def _adamw_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.optim
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # manual optimization (PPO) clips inside its steps with self.clip_gradients
        clips = not self.automatic_optimization or bool(self.trainer.gradient_clip_val)
        device_types = {p.device.type for p in self.parameters()}
        fused = use_fused_adamw(device_types, str(self.trainer.precision), clips)
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=fused or None)

    def _muon_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.optim
        strategy = type(getattr(self.trainer, "strategy", None)).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ConfigError(
                f"model.optimizer=muon needs whole weight matrices but {strategy} shards them; "
                f"use model.optimizer=adamw with this strategy, or DDP"
            )
        lrs = dict(lr=cfg.learning_rate, muon_lr=cfg.muon_learning_rate)
        groups = muon_param_groups(self, **lrs, weight_decay=cfg.weight_decay)
        return MuonAdamW(
            groups, lr=cfg.learning_rate, betas=cfg.betas, ns_steps=cfg.muon_ns_steps, ns_dtype=cfg.muon_ns_dtype
        )

    def logs_this_step(self) -> bool:
        """Whether the logger writes this training step (Lightning's rule: every ``log_every_n_steps`` steps): metrics
        only the logger shows are computed then, not on every step."""
        if self._trainer is None:  # a step called by hand (tests, notebooks): log everything
            return True
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.logs_this_step():
            params = [p for p in self.parameters() if p.grad is not None]
            if params:
                self.log("train/grad_norm", grad_norms(params)[1])

    def warn_once(self, msg: str) -> None:
        rank_zero_warn(msg)
