"""SFTDataModule: conversations (messages / ShareGPT / Alpaca) -> chat template -> labels on assistant tokens only.

Every record becomes a list of ``{"role", "content"}`` turns: an optional system prompt, then user and
assistant turns alternating and ending with an assistant reply. ``Tokenizer.encode_chat`` renders it
(the one chat template of the project) and marks the tokens an assistant turn produces; those are the
only tokens with a label. Labels are aligned with the inputs: ``labels[t]`` is the target for
``input_ids[t]`` (the next token) or ``IGNORE_INDEX``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from minillm_lightning.data.chat import ChatDataModule
from minillm_lightning.data.chat_cache import BadRecord, ChatCodec, TokenCache, bad_record_error, load_files, ragged
from minillm_lightning.data.common import ReadStats, expand_paths, iter_records
from minillm_lightning.errors import DataError, type_name
from minillm_lightning.losses import IGNORE_INDEX
from minillm_lightning.tokenizer import Tokenizer

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


_MISSING = object()  # ``rec.get(key, _MISSING)``: a key that is absent, told apart from a JSON null


def _text(value: Any, what: str) -> str:
    if value is _MISSING or value is None:
        raise BadRecord("missing field", f"{what} is {'missing' if value is _MISSING else 'null'}")
    if not isinstance(value, str):
        raise BadRecord("missing field", f"{what} is {type_name(value)}, not a string")
    if not value.strip():
        raise BadRecord("empty content", f"{what} is empty")
    return value


def optional_text(rec: dict[str, Any], key: str) -> str | None:
    """The optional string field ``key`` (system prompt, Alpaca input): its text, or None when it is absent, null or
    blank; any other type is a :class:`BadRecord` (never silently dropped)."""
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRecord("missing field", f"field {key!r} is {type_name(value)}, not a string")
    return value if value.strip() else None


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
        prompt = _text(rec.get(fields.instruction, _MISSING), f"field {fields.instruction!r}")
        extra = optional_text(rec, fields.input)
        if extra is not None:
            prompt = f"{prompt}\n{extra}"
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(rec.get(fields.output, _MISSING), f"field {fields.output!r}")},
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
            content = _text(turn.get(content_key, _MISSING), f"turn {i} {content_key!r}")
            messages.append({"role": role, "content": content})
    system = optional_text(rec, fields.system)
    if system is not None and not (messages and messages[0]["role"] == "system"):
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
                raise bad_record_error(path, lineno, e, rec, detect, file_fmt, fmt is None) from None
        if rs.skipped:
            rank_zero_warn(f"{path}: skipped {sum(rs.skipped.values())} unusable records: {rs.skipped}")
        if not items:
            rank_zero_warn(f"!!! {path} contributes NO {what} (records={rs.records}); check its schema")
        yield path, file_fmt, rs, items


def file_stats(fmt: str | None, rs: ReadStats, kept: int) -> dict[str, Any]:
    """The per-file entry of dataset_stats.json."""
    return {"format": fmt, "raw_records": rs.records, "kept": kept, "skipped": rs.skipped}


# ---- the token cache of conversations ----
@dataclass
class SFTCodec:
    """How the token cache reads and encodes conversations (picklable: it goes to the tokenizing processes).

    A conversation is cached whole, message by message: ``ids`` and ``mask`` (the template's tokens and which of
    them an assistant turn produces), ``ends`` (the token offset where each message ends), ``learn`` (trained
    tokens per message) and ``system`` (whether it opens with a system prompt). The chat template encodes every
    message on its own, so any run of messages is a slice of these tokens: truncation and turn truncation never
    tokenize again.
    """

    names: SFTFields
    system_prompt: str | None
    what: ClassVar[str] = "conversations"
    fields: ClassVar[dict[str, str]] = {
        "ids": "token",
        "mask": "uint8",
        "ends": "int32",
        "learn": "int32",
        "system": "uint8",
    }

    def settings(self) -> dict[str, Any]:
        return {"fields": asdict(self.names), "system_prompt": self.system_prompt}

    def detect(self, rec: dict[str, Any]) -> str | None:
        return detect_format(rec, self.names)

    def unknown_schema(self, rec: dict[str, Any]) -> str:
        return (
            f"cannot tell the conversation schema from the keys {sorted(rec)[:8]}; set format "
            f"(messages, sharegpt or alpaca) and the field names under fields"
        )

    def convert(self, rec: dict[str, Any], fmt: str) -> list[Message]:
        messages = to_messages(rec, fmt, self.names)
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def encode(self, messages: list[Message], tok: Tokenizer) -> dict[str, list[int]]:
        ids: list[int] = []
        mask: list[bool] = []
        ends, learn = [], []
        for m in messages:
            m_ids, m_mask = tok.encode_chat([m])
            ids += m_ids
            mask += m_mask
            ends.append(len(ids))
            learn.append(sum(m_mask))
        return {"ids": ids, "mask": mask, "ends": ends, "learn": learn, "system": [messages[0]["role"] == "system"]}


class Conversations:
    """The cached conversations of some files, numbered in file order: what :meth:`SFTDataModule.load` returns.

    Only per-conversation and per-message numbers live in memory (a few dozen bytes per conversation); tokens
    stay on disk.
    """

    def __init__(self, caches: list[TokenCache]) -> None:
        self.caches = caches
        self.file = np.concatenate([np.full(len(c), k, dtype=np.int32) for k, c in enumerate(caches)])
        self.start = np.concatenate([c.offsets["ids"][:-1] for c in caches]).astype(np.int64)
        self.system = np.concatenate([c.load("system") for c in caches]).astype(np.int64)
        self.ends, self.msg_offsets = ragged(caches, "ends")
        learn, _ = ragged(caches, "learn")
        self.learn_cum = np.concatenate([[0], np.cumsum(learn, dtype=np.int64)])
        self.n_messages = np.diff(self.msg_offsets)

    def __len__(self) -> int:
        return len(self.start)


@dataclass
class Examples:
    """Encoded conversations (rows before packing), each a slice of a cached conversation: its first ``head``
    tokens (the system prompt) then tokens from ``body`` on, ``length`` tokens in all (positions in the file's
    cache); ``trained`` counts its labelled tokens."""

    caches: list[TokenCache]
    file: np.ndarray
    start: np.ndarray
    head: np.ndarray
    body: np.ndarray
    length: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def tokens(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, template mask) of example ``e``."""
        cache = self.caches[self.file[e]]
        return read_slice(cache, int(self.start[e]), int(self.head[e]), int(self.body[e]), int(self.length[e]))


def read_slice(cache: TokenCache, start: int, head: int, body: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of ``length`` tokens: the ``head`` tokens from ``start`` on, then those from ``body`` on."""
    first = min(head, length)
    if body == start + first or first == length:  # nothing cut out of the middle: one read
        spans = [(start, start + length)]
    else:
        spans = [(start, start + first), (body, body + length - first)]
    ids = np.concatenate([cache.read("ids", a, b) for a, b in spans])
    mask = np.concatenate([cache.read("mask", a, b) for a, b in spans])
    return ids, mask


def to_example(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels): input t predicts token t+1, which is labelled only when the template marks it trainable."""
    tokens = ids.astype(np.int64)
    return tokens[:-1], np.where(mask[1:].astype(bool), tokens[1:], IGNORE_INDEX)


def pack_bounds(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Row boundaries of greedily concatenating consecutive examples into rows of at most ``max_length`` tokens:
    row r holds examples ``bounds[r]:bounds[r + 1]``."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if i > bounds[-1] and used + n > max_length:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class SFTDataset(Dataset):
    """Rows of :class:`Examples` as dicts of tensors (unpadded; :func:`collate` pads a batch), read from the cache.

    Packed rows concatenate consecutive examples: segment ids number the conversations of a row from 1 (the
    model attends only within a segment) and position ids restart at 0 for each, so a packed conversation is
    computed exactly as it would be alone.
    """

    def __init__(self, examples: Examples, bounds: np.ndarray | None) -> None:
        self.examples, self.bounds = examples, bounds

    def __len__(self) -> int:
        return len(self.examples) if self.bounds is None else len(self.bounds) - 1

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if self.bounds is None:
            inputs, labels = to_example(*self.examples.tokens(i))
            return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
        parts = [to_example(*self.examples.tokens(e)) for e in range(self.bounds[i], self.bounds[i + 1])]
        item = {
            "input_ids": np.concatenate([x for x, _ in parts]),
            "labels": np.concatenate([y for _, y in parts]),
            "segment_ids": np.concatenate([np.full(len(x), s, dtype=np.int64) for s, (x, _) in enumerate(parts, 1)]),
            "position_ids": np.concatenate([np.arange(len(x), dtype=np.int64) for x, _ in parts]),
        }
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


class CachedChatDataModule(ChatDataModule):
    """A chat data module whose records go through a :class:`ChatCodec` and the token caches of
    :mod:`minillm_lightning.data.chat_cache` (SFT and preference data); subclasses set ``format`` and
    :meth:`codec`, and name their cache table (``table``) and what they read (``usable``, for errors)."""

    cached = True
    table: ClassVar[Callable[[list[TokenCache]], Sequence[Any]]]
    """Builds the indexable items from the per-file caches."""
    usable: ClassVar[str]
    """What the files hold, in the "no usable ..." error."""
    format: str

    def codec(self) -> ChatCodec:
        raise NotImplementedError

    def read(self, sources: list[str] | None = None) -> tuple[list[Any], dict[str, Any]]:
        """All usable items of ``sources`` (default: ``self.sources``) in memory, and per-file statistics
        (training reads them through :meth:`load` instead)."""
        sources = self.sources if sources is None else sources
        out: list[Any] = []
        stats: dict[str, Any] = {}
        codec = self.codec()
        fmt = None if self.format == "auto" else self.format
        files = read_chat_files(
            sources, fmt, self.skip_bad, codec.detect, codec.unknown_schema, codec.convert, self.item_name
        )
        for path, file_fmt, rs, items in files:
            out.extend(items)
            stats[str(path)] = file_stats(file_fmt, rs, len(items))
        if not out:
            raise DataError(f"no usable {self.usable} in {sources}; check the paths and the record schema")
        return out, stats

    def load(self, sources: list[str]) -> tuple[Sequence[Any], dict[str, Any]]:
        """The items of ``sources`` from their token caches (tokenizing a file only when its cache is missing),
        and per-file statistics: the same items, counts and errors as :meth:`read`."""
        fmt = None if self.format == "auto" else self.format
        caches, stats = load_files(
            sources, self.codec(), self.tokenizer, self.skip_bad, fmt, self.cache_dir, self.prepare_workers
        )
        if not sum(len(c) for c in caches):
            raise DataError(f"no usable {self.usable} in {sources}; check the paths and the record schema")
        return self.table(caches), stats


class SFTDataModule(CachedChatDataModule):
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
    """

    kind, stats_key, row_name, item_name = "SFT", "sft", "rows", "conversations"
    prerequisite, example_checkpoint = PRETRAIN_COMMAND, "checkpoints/pretrain_tiny/last.ckpt"
    table, usable = Conversations, "conversations"

    def __init__(
        self,
        sources: str | list[str],
        tokenizer: str | None = None,
        format: Format = "auto",
        fields: SFTFields | None = None,
        system_prompt: str | None = None,
        max_length: int = 512,
        overflow: Overflow = "truncate",
        turn_truncation: float = 0.0,
        packing: bool = False,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(sources=sources, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, **kwargs)
        if max_length < 2:
            raise ValueError(f"SFTDataModule: max_length must be >= 2, got {max_length}")
        if not 0 <= turn_truncation <= 1:
            raise ValueError(f"SFTDataModule: turn_truncation must be in [0, 1], got {turn_truncation}")
        if format not in ("auto", "messages", "sharegpt", "alpaca") or overflow not in ("truncate", "drop"):
            raise ValueError(f"SFTDataModule: unknown format={format!r} or overflow={overflow!r}")
        self.format = format
        self.fields = fields if isinstance(fields, SFTFields) else SFTFields(**(fields or {}))
        self.system_prompt, self.overflow = system_prompt, overflow
        self.turn_truncation, self.packing = turn_truncation, packing

    # ---- reading ----
    def codec(self) -> SFTCodec:
        return SFTCodec(self.fields, self.system_prompt)

    def _turn_truncation(self, kept: np.ndarray, n_ex: np.ndarray, head: np.ndarray) -> int:
        """Turn-truncation augmentation: some conversations keep only a shorter prefix of their exchanges.

        Drawn once per run from ``seed``, in training order (so a resumed run sees the same rows); updates the
        kept message counts ``kept`` and exchange counts ``n_ex`` in place and returns how many changed.
        """
        rng, changed = random.Random(f"turn-truncation-{self.seed}"), 0
        for j in np.flatnonzero(n_ex > 1).tolist():
            if rng.random() < self.turn_truncation:
                keep = rng.randint(1, int(n_ex[j]) - 1)
                kept[j], n_ex[j] = head[j] + 2 * keep, keep
                changed += 1
        return changed

    # ---- ChatDataModule hooks ----
    def new_counts(self) -> dict[str, int]:
        return {"turn_truncated": 0, "truncated_turns": 0, "cut_to_max_length": 0, "dropped_too_long": 0}

    def encode_items(
        self, items: Conversations, indices: Sequence[int], counts: dict[str, int], split: str
    ) -> Examples:
        """Fit the conversations ``indices`` (in that order) to ``max_length`` per the overflow policy.

        A conversation of n tokens gives n-1 (input, label) pairs, so up to ``max_length + 1`` tokens fit. One
        that is too long loses its oldest exchanges first (the system prompt stays); if its last exchange alone is
        too long, its end is cut, and if then not one reply token is left it is dropped.
        """
        c, limit = items, self.max_length + 1
        idx = np.asarray(indices, dtype=np.int64)
        off = c.msg_offsets[idx]
        head = c.system[idx]
        kept = c.n_messages[idx].copy()  # messages kept, from the first
        n_ex = (kept - head) // 2
        if split == "train" and self.turn_truncation > 0:
            counts["turn_truncated"] += self._turn_truncation(kept, n_ex, head)
        head_tokens = np.where(head == 1, c.ends[off], 0)
        total = c.ends[off + kept - 1]
        trained = c.learn_cum[off + kept] - c.learn_cum[off]
        body = head_tokens.copy()  # where the kept exchanges start, relative to the conversation
        length = total.copy()
        keep = np.ones(len(idx), dtype=bool)
        for j in np.flatnonzero(total > limit).tolist():
            if self.overflow == "drop":
                counts["dropped_too_long"] += 1
                keep[j] = False
                continue
            h, o, first = int(head_tokens[j]), int(off[j]), int(head[j])
            bounds = np.concatenate([[0], c.ends[o : o + kept[j]]])  # token offsets of the message boundaries
            if n_ex[j] > 1:
                counts["truncated_turns"] += 1
            k = 0
            while h + total[j] - bounds[first + 2 * k] > limit and n_ex[j] - k > 1:
                k += 1  # the oldest exchange goes first; the system prompt stays
            body[j] = bounds[first + 2 * k]
            length[j] = h + total[j] - body[j]
            learn = c.learn_cum
            trained[j] = learn[o + kept[j]] - learn[o + first + 2 * k] + learn[o + first] - learn[o]
            if length[j] > limit:
                length[j] = limit
                counts["cut_to_max_length"] += 1
                start = int(c.start[idx[j]])
                mask = read_slice(c.caches[c.file[idx[j]]], start, h, start + int(body[j]), limit)[1]
                trained[j] = int(mask[1:].sum())
                if trained[j] == 0:
                    counts["dropped_too_long"] += 1  # not one reply token fits after the prompt
                    keep[j] = False
        idx = idx[keep]
        start = c.start[idx]
        return Examples(
            c.caches, c.file[idx], start, head_tokens[keep], start + body[keep], length[keep], trained[keep]
        )

    def make_dataset(self, rows: Examples) -> SFTDataset:
        return SFTDataset(rows, pack_bounds(rows.length - 1, self.max_length) if self.packing else None)

    def collate_fn(self) -> Callable[[list[dict[str, Tensor]]], dict[str, Tensor]]:
        return partial(collate, pad_id=self.tokenizer.pad_id)

    def describe(
        self, n_items: tuple[int, int], train: SFTDataset, val: SFTDataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        tokens = int((train.examples.length - 1).sum())  # packing lays the same examples end to end
        trained = int(train.examples.trained.sum())
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
