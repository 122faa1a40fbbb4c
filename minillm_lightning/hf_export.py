"""Export a checkpoint as a Hugging Face model directory that ``transformers`` loads without custom code.

The directory holds ``config.json`` (``LlamaForCausalLM``, or ``MixtralForCausalLM`` for MoE models),
``generation_config.json``, ``model.safetensors`` and the tokenizer: our SentencePiece ``tokenizer.model``, its
``tokenizer.json`` conversion, ``tokenizer_config.json`` (with the ChatML chat template) and
``special_tokens_map.json``.

Tokenizer choices, so that the Hugging Face tokenizer yields exactly our token ids:

* ``add_prefix_space: false`` and ``legacy: false``: our SentencePiece model adds no dummy ``▁`` prefix.
* ``bos_token`` is ``</s>`` with ``add_bos_token: true``: the pretraining stream puts ``</s>`` before every
  document and never uses ``<s>``, so ``tokenizer(text)`` gives ``[</s>] + ids`` like ``minillm generate``'s plain
  prompts. The chat template adds no BOS (``apply_chat_template`` encodes without special tokens).
* ``eos_token`` is ``</s>`` for pretraining checkpoints and ``<|im_end|>`` for chat stages; the generation config
  stops on both, as ``minillm generate`` does.

``transformers``, ``safetensors`` and ``protobuf`` come with ``pip install 'minillm-lightning[hf]'`` and are
imported only here.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from minillm_lightning.checkpoint import checkpoint_meta, load_backbone
from minillm_lightning.errors import CheckpointError, MiniLLMError
from minillm_lightning.fileio import check_writable_dir
from minillm_lightning.model.gpt import MiniGPT
from minillm_lightning.model.hf_convert import to_hf_config, to_hf_state_dict
from minillm_lightning.tokenizer import EOS, IM_END, IM_START, PAD, UNK, Tokenizer

HF_EXTRA = "pip install 'minillm-lightning[hf]'"
# Tokenizer.render_chat as Jinja
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _require_hf() -> None:
    missing = []
    for module in ("transformers", "safetensors", "google.protobuf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[-1])
    if missing:
        raise MiniLLMError(f"export needs {', '.join(missing)}: {HF_EXTRA}")


def tokenizer_config(tokenizer: Tokenizer, stage: str, block_size: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for a ``LlamaTokenizer`` that reproduces our encoding (see the module doc)."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": EOS,
        "eos_token": EOS if stage == "pretrain" else IM_END,
        "unk_token": UNK,
        "pad_token": PAD,
        "extra_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def export_hf(
    model: MiniGPT,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    stage: str = "pretrain",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory; returns its path.

    Args:
        model: the backbone (``gen.model`` of :meth:`TextGenerator.from_checkpoint`, or a stage module's ``.model``).
        tokenizer: its tokenizer.
        out_dir: the directory to write (created; files in it are replaced).
        stage: the stage that trained ``model``: it sets the exported ``eos_token``, ``</s>`` for ``"pretrain"`` and
            ``<|im_end|>`` for any other (chat) stage. Pass ``gen.meta["stage"]`` for a checkpoint; a chat model
            exported with the default gets ``</s>``. :func:`export_checkpoint` reads it from the checkpoint.
        dtype: dtype of the exported weights.

    Raises:
        MiniLLMError: the hf extra is missing, or the architecture has no Hugging Face equivalent (shared experts).
    """
    _require_hf()
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    try:
        hf_config = to_hf_config(cfg)
    except ValueError as e:
        raise MiniLLMError(str(e)) from None
    eos = tokenizer.eos_id if stage == "pretrain" else tokenizer.im_end_id
    hf_config.architectures = ["MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM"]
    hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id = tokenizer.eos_id, eos, tokenizer.pad_id
    hf_config.dtype = str(dtype).removeprefix("torch.")
    hf_config.save_pretrained(out)
    # older readers (transformers 4.x, llama.cpp's converter) look for rope_theta at the top level
    config_json = json.loads((out / "config.json").read_text())
    config_json.setdefault("rope_theta", float(cfg.rope_theta))
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=tokenizer.eos_id,
        eos_token_id=[tokenizer.im_end_id, tokenizer.eos_id],  # TextGenerator's default stop tokens
        pad_token_id=tokenizer.pad_id,
        do_sample=True,  # minillm generate's defaults
        temperature=0.8,
        top_p=0.95,
    ).save_pretrained(out)
    state = {k: v.to(dtype).contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    write_tokenizer(tokenizer, out, stage, cfg.block_size)
    return out


def write_tokenizer(tokenizer: Tokenizer, out: Path, stage: str, block_size: int) -> None:
    """``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    BPE models (the default) go through transformers' own SentencePiece conversion as a ``LlamaTokenizer``, which
    reproduces our ids exactly. Llama tokenizers are BPE, so unigram and char models get a ``tokenizer.json`` with a
    Unigram model built from the piece scores instead (generic ``PreTrainedTokenizerFast``): the same Viterbi
    segmentation, though tie-breaking can differ on rare inputs (about 1% of documents measured for unigram).
    """
    from transformers import AutoTokenizer

    (out / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    tok_cfg = tokenizer_config(tokenizer, stage, block_size)
    bpe = _sentencepiece_proto(tokenizer).trainer_spec.model_type == 2
    if not bpe:
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        _unigram_tokenizer_json(tokenizer).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    special["additional_special_tokens"] = [IM_START, IM_END]
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if bpe:  # the fast-tokenizer file: loads without sentencepiece/protobuf (vLLM, tokenizers, transformers.js)
        AutoTokenizer.from_pretrained(out).backend_tokenizer.save(str(out / "tokenizer.json"))


def _sentencepiece_proto(tokenizer: Tokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    return proto


def _unigram_tokenizer_json(tokenizer: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to a unigram or char SentencePiece model (identity normalization,
    no dummy prefix, user-defined symbols as added tokens, ``</s>`` prepended like the BPE export)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    proto = _sentencepiece_proto(tokenizer)
    kind = type(proto.pieces[0]).Type
    scored = (kind.NORMAL, kind.BYTE)
    vocab = [(p.piece, p.score if p.type in scored else 0.0) for p in proto.pieces]
    hf = HFTokenizer(models.Unigram(vocab, unk_id=tokenizer.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (kind.CONTROL, kind.UNKNOWN)
        ]
        + [AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)]
    )
    hf.add_tokens(
        [
            AddedToken(p.piece, normalized=False)
            for p in proto.pieces
            if p.type == kind.USER_DEFINED and not p.piece.startswith("<|")
        ]
    )
    hf.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, tokenizer.eos_id)]
    )
    return hf


def load_for_export(checkpoint: str | os.PathLike) -> tuple[MiniGPT, Tokenizer, str]:
    """The backbone, tokenizer and stage name of a minillm checkpoint."""
    model, ckpt = load_backbone(checkpoint)
    try:
        tokenizer = Tokenizer.from_checkpoint(ckpt, str(checkpoint))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model, tokenizer, checkpoint_meta(ckpt, str(checkpoint)).get("stage", "pretrain")


def _refuse_to_replace(out: Path, checkpoint: Path) -> None:
    """Refuse to delete ``out`` when it holds what must survive: the checkpoint being exported, the current
    directory, or any other checkpoint (a run directory, not an earlier export)."""
    here, inside = out.resolve(), checkpoint.resolve()
    if here in inside.parents or here == Path.cwd().resolve() or here in Path.cwd().resolve().parents:
        what = f"the checkpoint {checkpoint}" if here in inside.parents else "the current directory"
        raise MiniLLMError(f"--output {out} holds {what}; --overwrite would delete it. Choose another --output")
    ckpts = sorted(str(c.relative_to(out)) for c in out.rglob("*.ckpt"))
    if ckpts:
        raise MiniLLMError(
            f"--output {out} holds checkpoints ({', '.join(ckpts[:3])}{', ...' if len(ckpts) > 3 else ''}), "
            f"not an earlier export; --overwrite only replaces export directories. Choose another --output"
        )


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Export a minillm checkpoint of any stage (see :func:`export_hf`); refuses a non-empty ``out_dir`` unless
    ``overwrite``. The export is written beside ``out_dir`` and swapped in when complete, so a bad checkpoint or
    a failure half-way leaves an earlier export where it was."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MiniLLMError(f"--output {out} is a file, not a directory")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not overwrite:
        raise MiniLLMError(f"--output {out} is not empty; pass --overwrite to replace its contents")
    model, tokenizer, stage = load_for_export(checkpoint)
    if replace:
        _refuse_to_replace(out, Path(checkpoint))
    target = out.resolve()
    check_writable_dir(target, "--output")
    if stage == "reward":
        warnings.warn(
            f"{checkpoint} is a reward model: its scalar head (head.weight, head.bias) has no place in a "
            f"LlamaForCausalLM and is not exported; the directory holds its backbone and language-model head only",
            stacklevel=2,
        )
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        export_hf(model, tokenizer, staging, stage, getattr(torch, dtype))
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)  # an empty directory, or the export being replaced
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@torch.inference_mode()
def verify_export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, text: str) -> dict[str, Any]:
    """Load the exported directory with ``transformers`` (no custom code) and compare it with the checkpoint.

    Returns the max absolute fp32 logit difference on ``text`` and whether the tokenizer's ids equal ours.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _ = load_for_export(checkpoint)
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    block = model.config.block_size
    ours = [tokenizer.eos_id, *tokenizer.encode(text)][:block]
    theirs = hf_tok(text).input_ids[:block]
    idx = torch.tensor([ours])
    diff = (model(idx).logits - hf(idx).logits).abs().max()
    return {"max_abs_logit_diff": float(diff), "tokenizer_ids_equal": ours == theirs}
