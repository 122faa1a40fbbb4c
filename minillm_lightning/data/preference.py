"""PreferenceDataModule: pairs of a preferred and a dispreferred reply to the same prompt (reward model, DPO).

Every record becomes a :class:`Pair`: the prompt turns (an optional system prompt, then user/assistant
turns ending with a user turn) and the two final assistant replies. Both sequences are rendered with the
project's one chat template (``Tokenizer.encode_chat``, as in SFT): ``prompt`` holds the prompt turns and
the open ``<|im_start|>assistant\\n`` header, a ``response`` the reply's tokens and its closing
``<|im_end|>``, which is therefore the last token of every sequence (the token a reward head reads).

A batch holds, for ``chosen`` and ``rejected`` alike, ``<side>_input_ids`` (B, T), ``<side>_labels``
(B, T) aligned with the inputs (``labels[t]`` is ``input_ids[t + 1]`` on response tokens and
``IGNORE_INDEX`` on the prompt, the last token and padding) and ``<side>_attention_mask`` (B, T; 1 on real
tokens), all padded to ONE length T so that a stage can run both halves as a single (2B, T) batch; plus
``index`` (B,), each pair's position in its split (the key of cached reference log-probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from minillm_lightning.data.chat import ChatDataModule
from minillm_lightning.data.sft import (
    BadRecord,
    Message,
    SFTFields,
    detect_format,
    file_stats,
    read_chat_files,
    to_messages,
)
from minillm_lightning.errors import DataError
from minillm_lightning.losses import IGNORE_INDEX
from minillm_lightning.tokenizer import Tokenizer

Format = Literal["auto", "minimind", "trl", "sharegpt"]
Overflow = Literal["truncate", "drop"]
PaddingSide = Literal["right", "left"]
SFT_COMMAND = "minillm fit --config configs/sft_tiny.yaml"
SIDES = ("chosen", "rejected")


@dataclass
class PreferenceFields:
    """Field names of the preference schemas (the turn keys inside lists follow :class:`SFTFields`)."""

    chosen: str = "chosen"
    """The preferred reply: a list of turns (minimind), a string or list (TRL) or one turn (ShareGPT)."""
    rejected: str = "rejected"
    """The dispreferred reply, shaped like ``chosen``."""
    prompt: str = "prompt"
    """TRL: the prompt, a string (one user turn) or a list of turns."""
    conversations: str = "conversations"
    """ShareGPT: the turns before the two replies (ending with a user turn)."""
    role: str | None = None
    """Key of a turn's speaker (default: "role", or "from" for ShareGPT-style turns)."""
    content: str | None = None
    """Key of a turn's text (default: "content", or "value")."""
    system: str = "system"
    """Top-level key of an optional system prompt."""


@dataclass
class Pair:
    """One preference pair: the shared prompt turns and the two final assistant turns."""

    prompt: list[Message]
    chosen: Message
    rejected: Message


# ---- records -> pairs ----
def detect_preference_format(rec: dict[str, Any], fields: PreferenceFields) -> str | None:
    """The schema of one record (minimind, trl or sharegpt), or ``None`` when it matches none."""
    if fields.chosen not in rec or fields.rejected not in rec:
        return None
    if fields.prompt in rec:
        return "trl"
    if isinstance(rec.get(fields.conversations), list):
        return "sharegpt"
    if isinstance(rec[fields.chosen], list):
        return "minimind"
    return None


def _conversation(turns: Any, system: Any, fields: PreferenceFields, what: str) -> list[Message]:
    """Normalise and validate one full conversation (prompt turns + reply) with the SFT schema rules."""
    if not isinstance(turns, list):
        raise BadRecord("missing field", f"{what} must be a list of turns, got {type(turns).__name__}")
    sft = SFTFields(messages="turns", role=fields.role, content=fields.content, system="system")
    rec = {"turns": turns, "system": system}
    try:
        return to_messages(rec, detect_format(rec, sft) or "messages", sft)
    except BadRecord as e:
        raise BadRecord(e.reason, f"{what}: {e}") from None


def _as_turns(value: Any, role: str, fields: PreferenceFields) -> list:
    """TRL allows plain strings for the prompt (a user turn) and the replies (an assistant turn)."""
    if isinstance(value, str):
        return [{fields.role or "role": role, fields.content or "content": value}]
    if isinstance(value, dict):
        return [value]
    return value


def to_pair(rec: dict[str, Any], fmt: str, fields: PreferenceFields) -> Pair:
    """Normalise one record of schema ``fmt`` to a :class:`Pair`; a record that is not a usable pair
    (malformed turns, prompts that differ, identical replies) raises :class:`BadRecord`."""
    chosen, rejected, system = rec.get(fields.chosen), rec.get(fields.rejected), rec.get(fields.system)
    if fmt == "minimind":  # the prompt is implied: both lists share every turn but the last
        full = [_conversation(reply, system, fields, side) for side, reply in zip(SIDES, (chosen, rejected))]
    elif fmt == "trl":
        prompt = _as_turns(rec.get(fields.prompt), "user", fields)
        if not isinstance(prompt, list) or not prompt:
            raise BadRecord("missing field", f"{fields.prompt!r} must be a string or a list of turns")
        full = [
            _conversation(prompt + _as_turns(reply, "assistant", fields), system, fields, side)
            for side, reply in zip(SIDES, (chosen, rejected))
        ]
    elif fmt == "sharegpt":
        turns = rec.get(fields.conversations)
        for side, reply in zip(SIDES, (chosen, rejected)):
            if not isinstance(reply, dict):
                raise BadRecord("missing field", f"{side} must be one turn object like {{'from': 'gpt', 'value'}}")
        full = [_conversation(turns + [reply], system, fields, side) for side, reply in zip(SIDES, (chosen, rejected))]
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    (*prompt_c, reply_c), (*prompt_r, reply_r) = full
    if prompt_c != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r), 1) if a != b), len(full[0]))
        raise BadRecord(
            "prompts differ",
            f"chosen and rejected must answer the same prompt, but they differ at turn {at} "
            f"(every turn but the final assistant reply must be identical)",
        )
    if reply_c["content"].strip() == reply_r["content"].strip():
        raise BadRecord("identical responses", "chosen and rejected replies are identical (nothing to prefer)")
    return Pair(prompt_c, reply_c, reply_r)


# ---- pairs -> tokens ----
def response_ids(tok: Tokenizer, reply: Message) -> list[int]:
    """The tokens the assistant turn produces under the chat template: its content and ``<|im_end|>``.

    ``encode_chat(prompt, add_generation_prompt=True) + response_ids(reply)`` equals
    ``encode_chat(prompt + [reply])`` without the template's trailing newline.
    """
    ids, mask = tok.encode_chat([reply])
    return [i for i, m in zip(ids, mask) if m]


def build_row(prompt: list[int], response: list[int], pad_id: int, length: int, left: bool) -> tuple[list, list, list]:
    """(input_ids, labels, attention_mask) of ``prompt + response`` padded to ``length``.

    ``labels[t]`` is the token after input ``t`` when that token belongs to the response, else IGNORE_INDEX.
    """
    ids = prompt + response
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]
    pad = length - len(ids)
    if left:
        return [pad_id] * pad + ids, [IGNORE_INDEX] * pad + labels, [0] * pad + [1] * len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, [1] * len(ids) + [0] * pad


def collate(items: list[dict[str, Any]], pad_id: int, padding_side: PaddingSide = "right") -> dict[str, Tensor]:
    """Pad the chosen and the rejected sequences of a batch to one common length (see the module docstring)."""
    T = max(len(it["prompt"]) + len(it[side]) for it in items for side in SIDES)
    batch: dict[str, Tensor] = {}
    for side in SIDES:
        rows = [build_row(it["prompt"], it[side], pad_id, T, padding_side == "left") for it in items]
        for k, name in enumerate(("input_ids", "labels", "attention_mask")):
            batch[f"{side}_{name}"] = torch.tensor([r[k] for r in rows], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch


Row = tuple[list[int], list[int], list[int]]
"""A tokenized pair: prompt (with the assistant header), chosen reply, rejected reply."""


class PreferenceDataset(Dataset):
    """Tokenized pairs: ``prompt`` (incl. the assistant header), ``chosen``/``rejected`` reply tokens, ``index``."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, chosen, rejected = self.rows[i]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "index": i}


class PreferenceDataModule(ChatDataModule):
    """Preference pairs for reward modelling and DPO.

    Args:
        sources: files or globs of .jsonl / .json (array) records.
        tokenizer: the checkpoint given as ``model.init_from`` (normally the SFT checkpoint; it carries its
            tokenizer) or a .model file. Required: the vocabulary must match the model's.
        format: record schema, or auto (detected per file from its first record):
            minimind ``{"chosen": [turns], "rejected": [turns]}`` (the shared prompt is every turn but the
            last), trl ``{"prompt": str | [turns], "chosen": str | [turns], "rejected": ...}``, sharegpt
            ``{"conversations": [turns], "chosen": {"from": "gpt", "value"}, "rejected": {...}}``.
        fields: field names when they differ from the schemas' usual ones.
        max_length: most tokens per sequence (prompt + reply; at most the model's ``block_size``).
        overflow: a pair whose prompt + longer reply exceeds ``max_length``: truncate (the prompt only, from
            the left: oldest exchanges first, keeping the system prompt, then tokens; replies are never
            cut, a pair whose replies alone do not fit is dropped) or drop it.
        padding_side: pad batches on the right (default; no attention mask needed under causal attention)
            or on the left (the stages then build a padding-aware mask and positions).
        batch_size: pairs per batch on each device (each pair is two sequences).
        val_share: share of pairs held out for validation (ignored when ``val_sources`` is set).
        val_sources: validation files (same schemas) instead of a share of ``sources``.
        test_sources: held-out files scored by ``minillm test`` (reward model: accuracy and margin; DPO:
            implicit-reward accuracy and margins, log-probabilities).
        skip_bad_records: skip and count unusable records (malformed, prompts differ, identical replies)
            in ``dataset_stats.json`` instead of stopping at the first one.
        num_workers: DataLoader worker processes.
        seed: seed of the split and the batch order.
    """

    kind, stats_key, row_name, item_name = "preference", "preference", "pairs", "pairs"
    prerequisite, example_checkpoint = SFT_COMMAND, "checkpoints/sft_tiny/last.ckpt"

    def __init__(
        self,
        sources: list[str],
        tokenizer: str | None = None,
        format: Format = "auto",
        fields: PreferenceFields | None = None,
        max_length: int = 512,
        overflow: Overflow = "truncate",
        padding_side: PaddingSide = "right",
        batch_size: int = 8,
        val_share: float = 0.05,
        val_sources: list[str] | None = None,
        test_sources: list[str] | None = None,
        skip_bad_records: bool = False,
        num_workers: int = 0,
        seed: int = 1337,
    ) -> None:
        super().__init__(
            sources,
            tokenizer,
            max_length,
            batch_size,
            val_share,
            val_sources,
            test_sources,
            skip_bad_records,
            num_workers,
            seed,
        )
        if max_length < 4 or batch_size <= 0 or not 0 <= val_share < 1:
            raise ValueError("PreferenceDataModule: max_length must be >= 4, batch_size > 0, val_share in [0, 1)")
        if format not in ("auto", "minimind", "trl", "sharegpt") or overflow not in ("truncate", "drop"):
            raise ValueError(f"PreferenceDataModule: unknown format={format!r} or overflow={overflow!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"PreferenceDataModule: padding_side must be right or left, got {padding_side!r}")
        self.format = format
        self.fields = fields if isinstance(fields, PreferenceFields) else PreferenceFields(**(fields or {}))
        self.overflow, self.padding_side = overflow, padding_side

    # ---- reading ----
    def read(self, sources: list[str] | None = None) -> tuple[list[Pair], dict[str, Any]]:
        """All usable pairs of ``sources`` (default: ``self.sources``), and per-file statistics."""
        sources = self.sources if sources is None else sources
        pairs: list[Pair] = []
        stats: dict[str, Any] = {}
        files = read_chat_files(
            sources,
            None if self.format == "auto" else self.format,
            self.skip_bad,
            lambda rec: detect_preference_format(rec, self.fields),
            lambda rec: (
                f"cannot tell the preference schema from the keys {sorted(rec)[:8]}; expected "
                f"chosen/rejected lists (minimind), prompt/chosen/rejected (trl) or conversations/"
                f"chosen/rejected (sharegpt); set format and the field names under fields"
            ),
            lambda rec, fmt: to_pair(rec, fmt, self.fields),
            "pairs",
        )
        for path, fmt, rs, items in files:
            pairs.extend(items)
            stats[str(path)] = file_stats(fmt, rs, len(items))
        if not pairs:
            raise DataError(f"no usable preference pairs in {sources}; check the paths and the record schema")
        return pairs, stats

    def fit_prompt(self, pair: Pair, longest: int, counts: dict[str, int]) -> list[int] | None:
        """Prompt tokens (with the assistant header) shortened so that prompt + longest reply fit ``max_length``.

        Oldest exchanges go first (the system prompt stays), then tokens from the left, keeping the system
        prompt's tokens when they leave room. ``None``: the pair is dropped.
        """
        tok = self.tokenizer
        ids = tok.encode_chat(pair.prompt, add_generation_prompt=True)[0]
        budget = self.max_length - longest
        if len(ids) <= budget:
            return ids
        if self.overflow == "drop" or budget <= len(tok.generation_prompt()):
            counts["dropped_too_long"] += 1  # not even the header and one prompt token fit next to the replies
            return None
        head = pair.prompt[:1] if pair.prompt[0]["role"] == "system" else []
        rest = pair.prompt[len(head) :]
        if len(rest) > 1:
            counts["prompt_truncated_turns"] += 1
        while len(ids) > budget and len(rest) > 1:
            rest = rest[2:]  # the oldest user/assistant exchange; the final user turn always stays
            ids = tok.encode_chat(head + rest, add_generation_prompt=True)[0]
        if len(ids) > budget:
            counts["prompt_cut_tokens"] += 1
            system = tok.encode_chat(head)[0] if head else []
            room = budget - len(system)
            ids = system + ids[-room:] if head and room > len(tok.generation_prompt()) else ids[-budget:]
        return ids

    def encode(self, pairs: list[Pair], counts: dict[str, int]) -> list[Row]:
        rows = []
        for pair in pairs:
            chosen, rejected = response_ids(self.tokenizer, pair.chosen), response_ids(self.tokenizer, pair.rejected)
            prompt = self.fit_prompt(pair, max(len(chosen), len(rejected)), counts)
            if prompt is not None:
                rows.append((prompt, chosen, rejected))
        return rows

    # ---- ChatDataModule hooks ----
    def new_counts(self) -> dict[str, int]:
        return {"prompt_truncated_turns": 0, "prompt_cut_tokens": 0, "dropped_too_long": 0}

    def encode_items(self, items: list[Pair], indices: Sequence[int], counts: dict[str, int], split: str) -> list[Row]:
        return self.encode([items[i] for i in indices], counts)

    def make_dataset(self, rows: list[Row]) -> PreferenceDataset:
        return PreferenceDataset(rows)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        return partial(collate, pad_id=self.tokenizer.pad_id, padding_side=self.padding_side)

    def describe(
        self, n_items: tuple[int, int], train: PreferenceDataset, val: PreferenceDataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        rows = train.rows
        stats = {
            "train_pairs": len(train),
            "val_pairs": len(val),
            **counts,
            "mean_prompt_tokens": round(sum(len(p) for p, _, _ in rows) / len(rows), 1),
            "mean_response_tokens": round(sum(len(c) + len(r) for _, c, r in rows) / (2 * len(rows)), 1),
            "max_sequence_tokens": max(len(p) + max(len(c), len(r)) for p, c, r in rows),
            "max_length": self.max_length,
        }
        return stats, f"preference data: {len(train)} train / {len(val)} val pairs; {counts}"
