"""The pipeline's comparison table: every stage's model on the same prompts and the same held-out replies."""

from __future__ import annotations

import math
from typing import Any

import torch

from minillm_lightning.callbacks.regression_suite import load_prompts
from minillm_lightning.checkpoint import load_backbone
from minillm_lightning.data.sft import SFTDataModule
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.losses import lm_loss
from minillm_lightning.model import segment_causal_mask
from minillm_lightning.tokenizer import Tokenizer

HELD_OUT = "data/sample/sft.jsonl"
PROMPT_FILES = ["data/regression/instruction_en.jsonl", "data/regression/instruction_zh.jsonl"]


@torch.inference_mode()
def held_out_ppl(model, ckpt_path: str) -> float:
    """Perplexity of the assistant replies of the SFT sample's validation split (same split as sft_tiny)."""
    dm = SFTDataModule(sources=[HELD_OUT], tokenizer=ckpt_path, max_length=model.config.block_size)
    dm.setup("validate")
    total, count = 0.0, 0
    for batch in dm.val_dataloader():
        seg = batch.get("segment_ids")
        out = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attn_mask=segment_causal_mask(seg) if seg is not None else None,
        )
        loss, n = lm_loss(out.logits, batch["labels"])
        total += float(loss) * int(n)
        count += int(n)
    return math.exp(total / max(count, 1))


@torch.inference_mode()
def answers(model, tok: Tokenizer, prompts) -> list[tuple[str, str, bool]]:
    """(prompt, greedy answer through the chat template, all checks passed) for each regression prompt."""
    gen = TextGenerator(model, tok)
    out = []
    for p in prompts:
        ids = tok.encode_chat(p.as_messages(), add_generation_prompt=True)[0]
        new = gen.generate([ids], GenerationConfig(max_new_tokens=p.max_new_tokens or 32, temperature=0.0))[0]
        new = [t for t in new if t not in gen.stop_tokens]
        text = tok.decode(new)
        out.append((p.shown(), text, all(c(text, new) for c in p.checks)))
    return out


def report(results: dict[str, dict[str, Any]], stages: dict[str, Any], n_prompts: int = 4) -> str:
    """A markdown table (one row per stage) plus each stage's answers to the first ``n_prompts`` prompts."""
    prompts = load_prompts(PROMPT_FILES)
    rows = [
        "| stage | wall (s) | checkpoint step | stage metric | held-out reply ppl | regression pass | answer 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    samples: list[str] = []
    for name, info in results.items():
        scalars = info.get("scalars", {})
        metric = stages[name].metric
        value = scalars.get(metric)
        metric_cell = f"{metric} = {value:.3f}" if value is not None else f"{metric} = -"
        model, ckpt = load_backbone(info["checkpoint"])
        steps = ckpt.get("global_step", "-")
        if name == "reward":  # its backbone was trained to score, not to write: no generation/ppl row
            rows.append(f"| {name} | {info['wall_s']:.0f} | {steps} | {metric_cell} | - | - | (scores answers) |")
            continue
        tok = Tokenizer.from_checkpoint(ckpt, info["checkpoint"])
        ppl = held_out_ppl(model, info["checkpoint"])
        got = answers(model, tok, prompts)
        rate = sum(ok for _, _, ok in got) / len(got)
        first = got[0][1].replace("\n", " ").replace("|", "/")[:60]
        rows.append(f"| {name} | {info['wall_s']:.0f} | {steps} | {metric_cell} | {ppl:.2f} | {rate:.0%} | {first} |")
        samples.append(f"\n**{name}**\n" + "\n".join(f"- {q} -> {a!r}" for q, a, _ in got[:n_prompts]))
    return "\n".join(rows) + "\n\nSample answers (greedy, chat template):\n" + "\n".join(samples) + "\n"
