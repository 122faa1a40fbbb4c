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

Training reads the pairs from the token cache of :mod:`minillm_lightning.data.chat_cache` (each file tokenized
once, in parallel, message by message): preparation holds only per-pair and per-message index arrays, the
prompt truncation is computed from the cached message boundaries, and the tokens are read from disk per batch.
:meth:`PreferenceDataModule.read` keeps the in-memory view of the pairs (parsing checks, tools).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from minillm_lightning.data.chat_cache import TokenCache, ragged
from minillm_lightning.data.sft import (
    BadRecord,
    CachedChatDataModule,
    Message,
    SFTFields,
    detect_format,
    optional_text,
    to_messages,
)
from minillm_lightning.errors import field_state
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


def _as_turns(rec: dict[str, Any], key: str, role: str, fields: PreferenceFields) -> list:
    """Field ``key`` as a list of turns: TRL allows plain strings for the prompt (a user turn) and the replies (an
    assistant turn); anything but a string, a turn or a list of turns is a :class:`BadRecord`."""
    value = rec.get(key)
    if isinstance(value, str):
        return [{fields.role or "role": role, fields.content or "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise BadRecord("missing field", f"{key!r} must be a string or a list of turns, got {field_state(rec, key)}")


def to_pair(rec: dict[str, Any], fmt: str, fields: PreferenceFields) -> Pair:
    """Normalise one record of schema ``fmt`` to a :class:`Pair`; a record that is not a usable pair
    (malformed turns, prompts that differ, identical replies) raises :class:`BadRecord`."""
    chosen, rejected, system = rec.get(fields.chosen), rec.get(fields.rejected), optional_text(rec, fields.system)
    if fmt == "minimind":  # the prompt is implied: both lists share every turn but the last
        full = [_conversation(reply, system, fields, side) for side, reply in zip(SIDES, (chosen, rejected))]
    elif fmt == "trl":
        prompt = _as_turns(rec, fields.prompt, "user", fields)
        if not prompt:
            raise BadRecord("missing field", f"{fields.prompt!r} must be a string or a list of turns, got []")
        replies = [_as_turns(rec, key, "assistant", fields) for key in (fields.chosen, fields.rejected)]
        full = [_conversation(prompt + reply, system, fields, side) for side, reply in zip(SIDES, replies)]
    elif fmt == "sharegpt":
        turns = rec.get(fields.conversations)
        if not isinstance(turns, list):
            raise BadRecord("missing field", f"{fields.conversations!r} must be a list of turns")
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


# ---- the token cache of pairs ----
@dataclass
class PreferenceCodec:
    """How the token cache reads and encodes pairs (picklable: it goes to the tokenizing processes).

    A pair is cached as ``prompt`` (the prompt turns' tokens, message by message, without the assistant
    header), ``ends`` (the token offset where each prompt message ends), ``system`` (whether the prompt opens
    with a system prompt) and the ``chosen`` / ``rejected`` reply tokens (:func:`response_ids`). The template
    encodes every message on its own, so every truncation :meth:`PreferenceDataModule.encode_items` makes is
    made of slices of these tokens plus the header: nothing is tokenized again.
    """

    names: PreferenceFields
    what: ClassVar[str] = "pairs"
    fields: ClassVar[dict[str, str]] = {
        "prompt": "token",
        "ends": "int32",
        "system": "uint8",
        "chosen": "token",
        "rejected": "token",
    }

    def settings(self) -> dict[str, Any]:
        return {"fields": asdict(self.names)}

    def detect(self, rec: dict[str, Any]) -> str | None:
        return detect_preference_format(rec, self.names)

    def unknown_schema(self, rec: dict[str, Any]) -> str:
        return (
            f"cannot tell the preference schema from the keys {sorted(rec)[:8]}; expected "
            f"chosen/rejected lists (minimind), prompt/chosen/rejected (trl) or conversations/"
            f"chosen/rejected (sharegpt); set format and the field names under fields"
        )

    def convert(self, rec: dict[str, Any], fmt: str) -> Pair:
        return to_pair(rec, fmt, self.names)

    def encode(self, pair: Pair, tok: Tokenizer) -> dict[str, list[int]]:
        ids: list[int] = []
        ends = []
        for m in pair.prompt:
            ids += tok.encode_chat([m])[0]
            ends.append(len(ids))
        return {
            "prompt": ids,
            "ends": ends,
            "system": [pair.prompt[0]["role"] == "system"],
            "chosen": response_ids(tok, pair.chosen),
            "rejected": response_ids(tok, pair.rejected),
        }


class Pairs:
    """The cached pairs of some files, numbered in file order: what :meth:`PreferenceDataModule.load` returns.

    Only per-pair and per-message numbers live in memory; tokens stay on disk.
    """

    def __init__(self, caches: list[TokenCache]) -> None:
        self.caches = caches
        self.file = np.concatenate([np.full(len(c), k, dtype=np.int32) for k, c in enumerate(caches)])
        self.start = np.concatenate([c.offsets["prompt"][:-1] for c in caches]).astype(np.int64)
        self.system = np.concatenate([c.load("system") for c in caches]).astype(np.int64)
        self.ends, self.msg_offsets = ragged(caches, "ends")
        self.n_messages = np.diff(self.msg_offsets)
        # per side: where each reply starts in its file's cache, and its length
        self.reply_start = {s: np.concatenate([c.offsets[s][:-1] for c in caches]).astype(np.int64) for s in SIDES}
        self.reply_length = {s: np.concatenate([c.lengths(s) for c in caches]).astype(np.int64) for s in SIDES}

    def __len__(self) -> int:
        return len(self.start)


@dataclass
class PairRows:
    """Encoded pairs, in split order: pair ``pair[r]`` of ``pairs`` with the prompt made of two slices of its
    file's prompt tokens (``[head_start, head_start + head_length)`` then ``[body_start, body_start +
    body_length)``) and the assistant header ``header``."""

    pairs: Pairs
    pair: np.ndarray
    head_start: np.ndarray
    head_length: np.ndarray
    body_start: np.ndarray
    body_length: np.ndarray
    header: list[int]

    def __len__(self) -> int:
        return len(self.pair)

    def prompt_lengths(self) -> np.ndarray:
        return self.head_length + self.body_length + len(self.header)

    def reply_lengths(self, side: str) -> np.ndarray:
        return self.pairs.reply_length[side][self.pair]

    def __getitem__(self, r: int) -> Row:
        """(prompt, chosen, rejected) token lists of row ``r``."""
        if not 0 <= r < len(self):
            raise IndexError(r)
        p, i = self.pairs, int(self.pair[r])
        cache = p.caches[p.file[i]]
        h, b = int(self.head_start[r]), int(self.body_start[r])
        prompt = [
            *cache.read("prompt", h, h + int(self.head_length[r])).tolist(),
            *cache.read("prompt", b, b + int(self.body_length[r])).tolist(),
            *self.header,
        ]
        replies = {}
        for side in SIDES:
            at = int(p.reply_start[side][i])
            replies[side] = cache.read(side, at, at + int(p.reply_length[side][i])).tolist()
        return prompt, replies["chosen"], replies["rejected"]


class PreferenceDataset(Dataset):
    """Tokenized pairs: ``prompt`` (incl. the assistant header), ``chosen``/``rejected`` reply tokens, ``index``
    (read from the token cache on demand)."""

    def __init__(self, rows: PairRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, chosen, rejected = self.rows[i]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "index": i}


class PreferenceDataModule(CachedChatDataModule):
    """Preference pairs for reward modelling and DPO.

    Args:
        sources: files or globs of .jsonl / .json (array) records (a list, or one path).
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
    """

    kind, stats_key, row_name, item_name = "preference", "preference", "pairs", "pairs"
    prerequisite, example_checkpoint = SFT_COMMAND, "checkpoints/sft_tiny/last.ckpt"
    table, usable = Pairs, "preference pairs"

    def __init__(
        self,
        sources: str | list[str],
        tokenizer: str | None = None,
        format: Format = "auto",
        fields: PreferenceFields | None = None,
        max_length: int = 512,
        overflow: Overflow = "truncate",
        padding_side: PaddingSide = "right",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(sources=sources, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, **kwargs)
        if max_length < 4:
            raise ValueError(f"PreferenceDataModule: max_length must be >= 4, got {max_length}")
        if format not in ("auto", "minimind", "trl", "sharegpt") or overflow not in ("truncate", "drop"):
            raise ValueError(f"PreferenceDataModule: unknown format={format!r} or overflow={overflow!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"PreferenceDataModule: padding_side must be right or left, got {padding_side!r}")
        self.format = format
        self.fields = fields if isinstance(fields, PreferenceFields) else PreferenceFields(**(fields or {}))
        self.overflow, self.padding_side = overflow, padding_side

    # ---- reading ----
    def codec(self) -> PreferenceCodec:
        return PreferenceCodec(self.fields)

    # ---- ChatDataModule hooks ----
    def new_counts(self) -> dict[str, int]:
        return {"prompt_truncated_turns": 0, "prompt_cut_tokens": 0, "dropped_too_long": 0}

    def encode_items(self, items: Pairs, indices: Sequence[int], counts: dict[str, int], split: str) -> PairRows:
        """Fit the prompts of the pairs ``indices`` (in that order) so that prompt + longer reply fit ``max_length``.

        Replies are never cut. A prompt that is too long loses its oldest exchanges first (the system prompt
        stays, the final user turn always stays), then tokens from the left, keeping the system prompt's tokens
        when they leave room for the assistant header and one more token; a pair where not even the header and
        one prompt token fit next to the longer reply is dropped (as is any too-long pair under
        ``overflow: drop``). Computed from the cached message boundaries, without tokenizing.
        """
        p = items
        header = self.tokenizer.generation_prompt()
        n_header = len(header)
        idx = np.asarray(indices, dtype=np.int64)
        off, n_msg, first = p.msg_offsets[idx], p.n_messages[idx], p.system[idx]
        total = p.ends[off + n_msg - 1]  # prompt tokens without the header
        head = np.where(first == 1, p.ends[off], 0)  # tokens of the system prompt
        budget = self.max_length - np.maximum(p.reply_length["chosen"][idx], p.reply_length["rejected"][idx])
        start = p.start[idx]
        head_start, head_length = start.copy(), np.zeros(len(idx), dtype=np.int64)
        body_start, body_length = start.copy(), total.astype(np.int64)
        keep = np.ones(len(idx), dtype=bool)
        for j in np.flatnonzero(total + n_header > budget).tolist():
            room_all, o, s, h, t = int(budget[j]), int(off[j]), int(start[j]), int(head[j]), int(total[j])
            if self.overflow == "drop" or room_all <= n_header:
                counts["dropped_too_long"] += 1
                keep[j] = False
                continue
            f, rest = int(first[j]), int(n_msg[j] - first[j])  # rest: messages after the system prompt
            if rest > 1:
                counts["prompt_truncated_turns"] += 1
            bounds = np.concatenate([[0], p.ends[o : o + int(n_msg[j])]]).tolist()
            k = 0
            while h + t - bounds[f + 2 * k] + n_header > room_all and rest - 2 * k > 1:
                k += 1  # the oldest user/assistant exchange goes
            body = bounds[f + 2 * k]
            head_length[j], body_start[j], body_length[j] = h, s + body, t - body
            if h + t - body + n_header <= room_all:
                continue
            counts["prompt_cut_tokens"] += 1
            if f and room_all - h > n_header:  # the system prompt, then the prompt's last tokens
                body_length[j] = room_all - h - n_header
                body_start[j] = s + t - body_length[j]
                continue
            need = room_all - n_header  # the last tokens of system prompt + kept turns
            head_length[j] = max(need - (t - body), 0)
            head_start[j] = s + h - head_length[j]
            body_length[j] = min(need, t - body)
            body_start[j] = s + t - body_length[j]
        keep_idx = idx[keep]
        return PairRows(
            p,
            keep_idx,
            head_start[keep],
            head_length[keep],
            body_start[keep],
            body_length[keep],
            header,
        )

    def make_dataset(self, rows: PairRows) -> PreferenceDataset:
        return PreferenceDataset(rows)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        return partial(collate, pad_id=self.tokenizer.pad_id, padding_side=self.padding_side)

    def describe(
        self, n_items: tuple[int, int], train: PreferenceDataset, val: PreferenceDataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        rows = train.rows
        prompt, chosen, rejected = rows.prompt_lengths(), rows.reply_lengths("chosen"), rows.reply_lengths("rejected")
        stats = {
            "train_pairs": len(train),
            "val_pairs": len(val),
            **counts,
            "mean_prompt_tokens": round(int(prompt.sum()) / len(rows), 1),
            "mean_response_tokens": round(int(chosen.sum() + rejected.sum()) / (2 * len(rows)), 1),
            "max_sequence_tokens": int((prompt + np.maximum(chosen, rejected)).max()),
            "max_length": self.max_length,
        }
        return stats, f"preference data: {len(train)} train / {len(val)} val pairs; {counts}"
