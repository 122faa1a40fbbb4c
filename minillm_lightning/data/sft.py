"""SFTDataModule: conversations (messages / ShareGPT / Alpaca) -> chat template -> labels on assistant tokens only.

Every record becomes a list of ``{"role", "content"}`` turns: an optional system prompt, then user and
assistant turns alternating and ending with an assistant reply. ``Tokenizer.encode_chat`` renders it
(the one chat template of the project) and marks the tokens an assistant turn produces; those are the
only tokens with a label. Labels are aligned with the inputs: ``labels[t]`` is the target for
``input_ids[t]`` (the next token) or ``IGNORE_INDEX``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from minillm_lightning.data.chat import ChatDataModule
from minillm_lightning.data.common import ReadStats, expand_paths, iter_records
from minillm_lightning.errors import DataError
from minillm_lightning.losses import IGNORE_INDEX

T = TypeVar("T")

Format = Literal["auto", "messages", "sharegpt", "alpaca"]
Overflow = Literal["truncate", "drop"]
Message = dict[str, str]

# speaker names of the supported schemas -> template role (ShareGPT says human/gpt)
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
PRETRAIN_COMMAND = "minillm fit --config configs/pretrain_tiny.yaml"


@dataclass
class SFTFields:
    """Field names of the conversation schemas; ``None`` means the schema's usual name."""

    messages: str | None = None
    """Key of the list of turns (default: "conversations", else "messages")."""
    role: str | None = None
    """Key of a turn's speaker (default: "role"; ShareGPT: "from")."""
    content: str | None = None
    """Key of a turn's text (default: "content"; ShareGPT: "value")."""
    system: str = "system"
    """Top-level key of an optional system prompt (any schema)."""
    instruction: str = "instruction"
    """Alpaca: the user request."""
    input: str = "input"
    """Alpaca: optional context appended to the instruction."""
    output: str = "output"
    """Alpaca: the assistant reply."""
    history: str = "history"
    """Alpaca: optional earlier ``[instruction, reply]`` pairs (LLaMA-Factory's multi-turn Alpaca)."""


class BadRecord(Exception):
    """A record that is not a usable conversation; ``reason`` is the category counted in the stats."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ---- records -> turns ----
def _turn_list(rec: dict[str, Any], fields: SFTFields) -> list | None:
    keys = [fields.messages] if fields.messages else ["conversations", "messages"]
    return next((rec[k] for k in keys if isinstance(rec.get(k), list)), None)


def detect_format(rec: dict[str, Any], fields: SFTFields) -> str | None:
    """The schema of one record, or ``None`` when it matches none."""
    turns = _turn_list(rec, fields)
    if turns and isinstance(turns[0], dict):
        schemas = {"messages": ("role", "content"), "sharegpt": ("from", "value")}
        for name, (role, content) in schemas.items():
            if (fields.role or role) in turns[0] and (fields.content or content) in turns[0]:
                return name
        for name, (role, _) in schemas.items():  # content missing: to_messages names the field
            if (fields.role or role) in turns[0]:
                return name
    if fields.instruction in rec and fields.output in rec:
        return "alpaca"
    return None


def _text(value: Any, what: str) -> str:
    if value is None:
        raise BadRecord("missing field", f"{what} is missing")
    if not isinstance(value, str):
        raise BadRecord("missing field", f"{what} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRecord("empty content", f"{what} is empty")
    return value


def to_messages(rec: dict[str, Any], fmt: str, fields: SFTFields) -> list[Message]:
    """Normalise one record of schema ``fmt`` to ``[{"role", "content"}, ...]`` and validate the turn order."""
    messages: list[Message] = []
    if fmt == "alpaca":
        history = rec.get(fields.history) or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise BadRecord("missing field", f"{fields.history!r} must be a list of [instruction, reply] pairs")
        for i, (q, a) in enumerate(history, start=1):
            messages += [
                {"role": "user", "content": _text(q, f"{fields.history}[{i}] instruction")},
                {"role": "assistant", "content": _text(a, f"{fields.history}[{i}] reply")},
            ]
        prompt = _text(rec.get(fields.instruction), f"field {fields.instruction!r}")
        extra = rec.get(fields.input)
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n{extra}"
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(rec.get(fields.output), f"field {fields.output!r}")},
        ]
    else:
        turns = _turn_list(rec, fields)
        if turns is None:
            key = fields.messages or "conversations/messages"
            raise BadRecord("missing field", f"no list of turns under {key!r} (keys here: {sorted(rec)[:8]})")
        role_key = fields.role or ("role" if fmt == "messages" else "from")
        content_key = fields.content or ("content" if fmt == "messages" else "value")
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict) or role_key not in turn:
                raise BadRecord("missing field", f"turn {i} has no {role_key!r} field")
            role = ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
            if role is None:
                raise BadRecord(
                    "unknown role",
                    f"turn {i} has role {turn[role_key]!r}; expected one of {', '.join(ROLE_ALIASES)}",
                )
            messages.append({"role": role, "content": _text(turn.get(content_key), f"turn {i} {content_key!r}")})
    system = rec.get(fields.system)
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    check_turns(messages)
    return messages


def check_turns(messages: list[Message]) -> None:
    """Require [system], user, assistant, user, assistant, ... ending with an assistant reply."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("no turns", "the conversation has no user/assistant turns")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadRecord(
                "turns not alternating",
                f"turn {i + offset + 1} is {m['role']!r} where {expected!r} was expected; turns must alternate "
                f"user/assistant, starting with user (after at most one system prompt at the start)",
            )
    if body[-1]["role"] != "assistant":
        raise BadRecord("no final assistant turn", "the conversation ends with a user turn (nothing to learn)")


def split_system(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(system prompt as a 0/1-item list, exchanges as [user, assistant] pairs)."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    return head, [body[i : i + 2] for i in range(0, len(body), 2)]


def _json_item_line(path: Path, item: int) -> int | None:
    """Line on which item ``item`` (1-based) of a JSON array file starts (for error messages only)."""
    text, dec = path.read_text("utf-8"), json.JSONDecoder()
    pos = text.find("[") + 1
    try:
        for i in range(1, item + 1):
            while text[pos] in " \t\r\n,":
                pos += 1
            if i == item:
                return text.count("\n", 0, pos) + 1
            _, pos = dec.raw_decode(text, pos)
    except (IndexError, ValueError):
        return None
    return None


def read_chat_files(
    sources: list[str],
    fmt: str | None,
    skip_bad: bool,
    detect: Callable[[dict[str, Any]], str | None],
    unknown_schema: Callable[[dict[str, Any]], str],
    convert: Callable[[dict[str, Any], str], T],
    what: str,
) -> Iterator[tuple[Path, str | None, ReadStats, list[T]]]:
    """Read the JSONL/JSON files of ``sources`` record by record, for the SFT, preference and prompt modules.

    ``fmt`` (None: ``detect`` it from the first usable record of each file) and ``convert(record, fmt)`` turn a
    record into an item; a :class:`BadRecord` is skipped and counted with ``skip_bad``, else a :class:`DataError`
    names the file and line. Yields per file ``(path, format, read stats, items)``, warning about skipped records
    and files that contribute nothing (``what`` names the items in the warnings).
    """
    for path in (p for s in sources for p in expand_paths(s, (".jsonl", ".json"))):
        rs, file_fmt, items = ReadStats(), fmt, []
        for lineno, rec in iter_records(path, rs, skip_bad):
            try:
                file_fmt = file_fmt or detect(rec)
                if file_fmt is None:
                    raise BadRecord("unknown schema", unknown_schema(rec))
                items.append(convert(rec, file_fmt))
            except BadRecord as e:
                if skip_bad:
                    rs.skip(e.reason)
                    continue
                line = _json_item_line(path, lineno) if path.suffix == ".json" else lineno
                where = f"{path}:{line}" if line else f"{path} item {lineno}"
                raise DataError(
                    f"{where}: {e} ({e.reason}); fix the record, or set skip_bad_records: true to skip "
                    f"and count such records in dataset_stats.json"
                ) from None
        if rs.skipped:
            rank_zero_warn(f"{path}: skipped {sum(rs.skipped.values())} unusable records: {rs.skipped}")
        if not items:
            rank_zero_warn(f"!!! {path} contributes NO {what} (records={rs.records}); check its schema")
        yield path, file_fmt, rs, items


def file_stats(fmt: str | None, rs: ReadStats, kept: int) -> dict[str, Any]:
    """The per-file entry of dataset_stats.json."""
    return {"format": fmt, "raw_records": rs.records, "kept": kept, "skipped": rs.skipped}


# ---- token sequences ----
@dataclass
class Example:
    """One training row: ``input_ids`` and aligned ``labels``; packed rows also carry segment/position ids."""

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray | None = None
    position_ids: np.ndarray | None = None


def to_example(ids: list[int], mask: list[bool]) -> Example:
    """Shift by one: input t predicts token t+1, which is labelled only when the template marks it trainable."""
    tokens = np.asarray(ids, dtype=np.int64)
    learn = np.asarray(mask[1:], dtype=bool)
    labels = np.where(learn, tokens[1:], IGNORE_INDEX)
    return Example(tokens[:-1], labels)


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate consecutive examples into rows of at most ``max_length`` tokens.

    Segment ids number the conversations of a row from 1 (the model attends only within a segment) and
    position ids restart at 0 for each, so a packed conversation is computed exactly as it would be alone.
    """
    rows: list[Example] = []
    group: list[Example] = []
    used = 0

    def flush() -> None:
        rows.append(
            Example(
                np.concatenate([e.input_ids for e in group]),
                np.concatenate([e.labels for e in group]),
                np.concatenate([np.full(len(e.input_ids), s, dtype=np.int64) for s, e in enumerate(group, 1)]),
                np.concatenate([np.arange(len(e.input_ids), dtype=np.int64) for e in group]),
            )
        )

    for ex in examples:
        if group and used + len(ex.input_ids) > max_length:
            flush()
            group, used = [], 0
        group.append(ex)
        used += len(ex.input_ids)
    if group:
        flush()
    return rows


class SFTDataset(Dataset):
    """A list of :class:`Example` rows as dicts of tensors (unpadded; :func:`collate` pads a batch)."""

    def __init__(self, rows: list[Example]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.rows[i]
        item = {"input_ids": row.input_ids, "labels": row.labels}
        if row.segment_ids is not None:
            item |= {"segment_ids": row.segment_ids, "position_ids": row.position_ids}
        return {k: torch.from_numpy(v) for k, v in item.items()}


PAD_VALUES = {"labels": IGNORE_INDEX, "segment_ids": 0, "position_ids": 0}


def collate(items: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row: padding gets no label and (packed) segment id 0.

    Right padding needs no attention mask: under causal attention real tokens never see later pads.
    """
    T = max(len(it["input_ids"]) for it in items)
    return {
        k: torch.stack([F.pad(it[k], (0, T - len(it[k])), value=PAD_VALUES.get(k, pad_id)) for it in items])
        for k in items[0]
    }


class SFTDataModule(ChatDataModule):
    """Supervised fine-tuning conversations with the loss on assistant tokens only.

    Args:
        sources: files or globs of .jsonl / .json (array) conversations.
        tokenizer: the tokenizer: the checkpoint given as ``model.init_from`` (it carries its tokenizer) or a
            .model file. Required: the model's vocabulary must match the pretrained one.
        format: record schema: messages (minimind/OpenAI ``{"conversations"|"messages": [{"role",
            "content"}]}``), sharegpt (``[{"from": "human|gpt", "value"}]``), alpaca (``{"instruction",
            "input", "output"}``) or auto (detected per file from its first record).
        fields: field names when they differ from the schema's usual ones.
        system_prompt: system prompt given to conversations that have none (``None``: leave them without).
        max_length: most input tokens per row (at most the model's ``block_size``).
        overflow: a conversation longer than ``max_length``: truncate (drop its oldest exchanges, keeping
            the system prompt; if the last exchange alone is too long, cut its end) or drop it.
        turn_truncation: probability that a multi-exchange training conversation is replaced by a random
            shorter prefix of its exchanges (the seed's turn-truncation augmentation; drawn once, seeded).
        packing: concatenate several conversations per row (no attention across them, positions restart).
        batch_size: rows per batch on each device.
        val_share: share of conversations held out for validation (ignored when ``val_sources`` is set).
        val_sources: validation files (same schemas) instead of a share of ``sources``.
        test_sources: held-out files scored by ``minillm test`` (assistant-token loss and perplexity).
        skip_bad_records: skip and count malformed records instead of stopping at the first one.
        num_workers: DataLoader worker processes.
        seed: seed of the split, the augmentation and the batch order.
    """

    kind, stats_key, row_name, item_name = "SFT", "sft", "rows", "conversations"
    prerequisite, example_checkpoint = PRETRAIN_COMMAND, "checkpoints/pretrain_tiny/last.ckpt"

    def __init__(
        self,
        sources: list[str],
        tokenizer: str | None = None,
        format: Format = "auto",
        fields: SFTFields | None = None,
        system_prompt: str | None = None,
        max_length: int = 512,
        overflow: Overflow = "truncate",
        turn_truncation: float = 0.0,
        packing: bool = False,
        batch_size: int = 16,
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
        if max_length < 2 or batch_size <= 0:
            raise ValueError("SFTDataModule: max_length must be >= 2 and batch_size positive")
        if not 0 <= turn_truncation <= 1 or not 0 <= val_share < 1:
            raise ValueError("SFTDataModule: turn_truncation must be in [0, 1] and val_share in [0, 1)")
        if format not in ("auto", "messages", "sharegpt", "alpaca") or overflow not in ("truncate", "drop"):
            raise ValueError(f"SFTDataModule: unknown format={format!r} or overflow={overflow!r}")
        self.format = format
        self.fields = fields if isinstance(fields, SFTFields) else SFTFields(**(fields or {}))
        self.system_prompt, self.overflow = system_prompt, overflow
        self.turn_truncation, self.packing = turn_truncation, packing

    # ---- reading ----
    def read(self, sources: list[str] | None = None) -> tuple[list[list[Message]], dict[str, Any]]:
        """All valid conversations of ``sources`` (default: ``self.sources``), and per-file statistics."""
        sources = self.sources if sources is None else sources
        conversations: list[list[Message]] = []
        stats: dict[str, Any] = {}
        files = read_chat_files(
            sources,
            None if self.format == "auto" else self.format,
            self.skip_bad,
            lambda rec: detect_format(rec, self.fields),
            lambda rec: (
                f"cannot tell the conversation schema from the keys {sorted(rec)[:8]}; set format "
                f"(messages, sharegpt or alpaca) and the field names under fields"
            ),
            lambda rec, fmt: to_messages(rec, fmt, self.fields),
            "conversations",
        )
        for path, fmt, rs, items in files:
            for messages in items:
                if self.system_prompt and messages[0]["role"] != "system":
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
            conversations.extend(items)
            stats[str(path)] = file_stats(fmt, rs, len(items))
        if not conversations:
            raise DataError(f"no usable conversations in {sources}; check the paths and the record schema")
        return conversations, stats

    def truncate_turns(self, conversations: list[list[Message]]) -> int:
        """Turn-truncation augmentation: replace some conversations by a shorter prefix of their exchanges.

        Drawn once per run from ``seed`` (so a resumed run sees the same rows); returns how many changed.
        """
        if self.turn_truncation <= 0:
            return 0
        rng, changed = random.Random(f"turn-truncation-{self.seed}"), 0
        for i, messages in enumerate(conversations):
            head, exchanges = split_system(messages)
            if len(exchanges) > 1 and rng.random() < self.turn_truncation:
                keep = rng.randint(1, len(exchanges) - 1)
                conversations[i] = head + [m for ex in exchanges[:keep] for m in ex]
                changed += 1
        return changed

    def encode(self, messages: list[Message], counts: dict[str, int]) -> Example | None:
        """Template + labels for one conversation fitted to ``max_length`` per the overflow policy (None: dropped)."""
        tok, limit = self.tokenizer, self.max_length + 1  # n tokens give n-1 (input, label) pairs
        ids, mask = tok.encode_chat(messages)
        if len(ids) > limit and self.overflow == "drop":
            counts["dropped_too_long"] += 1
            return None
        if len(ids) > limit:
            head, exchanges = split_system(messages)
            if len(exchanges) > 1:
                counts["truncated_turns"] += 1
            while len(ids) > limit and len(exchanges) > 1:
                exchanges = exchanges[1:]  # the oldest exchange goes first; the system prompt stays
                ids, mask = tok.encode_chat(head + [m for ex in exchanges for m in ex])
            if len(ids) > limit:
                ids, mask = ids[:limit], mask[:limit]
                counts["cut_to_max_length"] += 1
                if not any(mask[1:]):
                    counts["dropped_too_long"] += 1  # not one reply token fits after the prompt
                    return None
        return to_example(ids, mask)

    # ---- ChatDataModule hooks ----
    def new_counts(self) -> dict[str, int]:
        return {"turn_truncated": 0, "truncated_turns": 0, "cut_to_max_length": 0, "dropped_too_long": 0}

    def encode_items(self, items: list[list[Message]], counts: dict[str, int], split: str) -> list[Example]:
        if split == "train":
            counts["turn_truncated"] += self.truncate_turns(items)
        return [ex for m in items if (ex := self.encode(m, counts)) is not None]

    def make_dataset(self, rows: list[Example]) -> SFTDataset:
        return SFTDataset(pack(rows, self.max_length) if self.packing else rows)

    def collate_fn(self) -> Callable[[list[dict[str, Tensor]]], dict[str, Tensor]]:
        return partial(collate, pad_id=self.tokenizer.pad_id)

    def describe(
        self, n_items: tuple[int, int], train: SFTDataset, val: SFTDataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        tokens = sum(len(r.input_ids) for r in train.rows)
        trained = sum(int((r.labels != IGNORE_INDEX).sum()) for r in train.rows)
        stats = {
            "train_conversations": n_items[0],
            "val_conversations": n_items[1],
            **counts,
            "train_rows": len(train),
            "val_rows": len(val),
            "train_tokens": tokens,
            "train_assistant_tokens": trained,
            "assistant_token_share": round(trained / max(tokens, 1), 4),
            "row_fill": round(tokens / max(len(train) * self.max_length, 1), 4),
            "max_length": self.max_length,
            "packing": self.packing,
        }
        line = (
            f"SFT data: {n_items[0]} train / {n_items[1]} val conversations -> {len(train)} rows, "
            f"{tokens:,} tokens ({stats['assistant_token_share']:.0%} trained); {counts}"
        )
        return stats, line
