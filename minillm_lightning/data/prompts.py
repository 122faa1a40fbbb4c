"""PromptDataModule: prompts for the RL stage, rendered with the shared chat template up to the open assistant header.

A record is a plain ``{"prompt": "..."}`` (one user turn, optional top-level ``system``) or a conversation in
one of the SFT schemas (messages / ShareGPT / Alpaca without ``output``) whose last turn is the user's: the
policy writes the next assistant reply. ``Tokenizer.encode_chat(..., add_generation_prompt=True)`` renders
it, the same template SFT trained on.

Batches are dicts of lists (prompts have different lengths; the RL stage left-pads them itself):
``prompt_ids`` (token ids), ``messages`` (the conversation, for re-rendering with a reward model's
template), ``prompt`` (the last user message, what a reward function reads) and ``index`` (dataset rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from minillm_lightning.data.chat import ChatDataModule
from minillm_lightning.data.sft import (
    ROLE_ALIASES,
    BadRecord,
    SFTFields,
    detect_format,
    file_stats,
    optional_text,
    read_chat_files,
    to_messages,
)
from minillm_lightning.errors import DataError, field_state

PromptFormat = Literal["auto", "prompt", "messages", "sharegpt", "alpaca"]
Message = dict[str, str]
SFT_COMMAND = "minillm fit --config configs/sft_tiny.yaml"
_PLACEHOLDER = "<reply>"  # stands in for the missing reply so the SFT schema parser validates the turns


@dataclass
class PromptFields(SFTFields):
    """Field names of the prompt schemas; the conversation fields are those of SFT."""

    prompt: str = "prompt"
    """Plain schema: the key holding the user prompt."""


@dataclass
class PromptExample:
    """One prompt: its template token ids, its conversation and its last user message."""

    ids: list[int]
    messages: list[Message]
    text: str


def detect_prompt_format(rec: dict[str, Any], fields: PromptFields) -> str | None:
    """The schema of one prompt record, or ``None`` when it matches none."""
    if isinstance(rec.get(fields.prompt), str):
        return "prompt"
    fmt = detect_format(rec, fields)
    if fmt is None and fields.instruction in rec:  # an Alpaca record without output is a prompt
        return "alpaca"
    if fmt is None and fields.prompt in rec:  # a prompt that is not a string: to_prompt_messages names the fault
        return "prompt"
    return fmt


def to_prompt_messages(
    rec: dict[str, Any], fmt: str, fields: PromptFields, final_reply: str = "error"
) -> tuple[list[Message], bool]:
    """Normalise one record to ``[{"role", "content"}, ...]`` ending with a user turn.

    Returns (messages, whether a final assistant reply was dropped). A conversation that ends with an
    assistant reply is an error, or with ``final_reply="drop"`` becomes the conversation before that reply.
    """
    if fmt == "prompt":
        value = rec.get(fields.prompt)
        if not isinstance(value, str):
            what = field_state(rec, fields.prompt) + ("" if value is None else ", not a string")
            raise BadRecord("missing field", f"field {fields.prompt!r} is {what} (keys here: {sorted(rec)[:8]})")
        if not value.strip():
            raise BadRecord("empty content", f"field {fields.prompt!r} is empty")
        messages = [{"role": "user", "content": value}]
        system = optional_text(rec, fields.system)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return messages, False
    if fmt == "alpaca":
        output = rec.get(fields.output)
        has_reply = isinstance(output, str) and bool(output.strip())
        if has_reply and final_reply == "error":
            raise _final_reply_error(f"field {fields.output!r} holds a reply")
        return to_messages({**rec, fields.output: _PLACEHOLDER}, fmt, fields)[:-1], has_reply
    role_key = fields.role or ("role" if fmt == "messages" else "from")
    content_key = fields.content or ("content" if fmt == "messages" else "value")
    key = fields.messages or next((k for k in ("conversations", "messages") if isinstance(rec.get(k), list)), None)
    turns = rec.get(key) if key else None
    last = turns[-1] if isinstance(turns, list) and turns else None
    if isinstance(last, dict) and ROLE_ALIASES.get(last.get(role_key)) == "user":
        placeholder = {role_key: "assistant", content_key: _PLACEHOLDER}
        return to_messages({**rec, key: [*turns, placeholder]}, fmt, fields)[:-1], False
    messages = to_messages(rec, fmt, fields)  # validates; a valid conversation here ends with a reply
    if final_reply == "error":
        raise _final_reply_error("the conversation ends with an assistant reply")
    return messages[:-1], True


def _final_reply_error(what: str) -> BadRecord:
    return BadRecord(
        "ends with a reply",
        f"{what}, but a prompt must end with the user's turn; set final_reply: drop to use the conversation "
        f"before its last reply as the prompt (e.g. to reuse SFT data)",
    )


class PromptDataset(Dataset):
    def __init__(self, rows: list[PromptExample]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {"prompt_ids": row.ids, "messages": row.messages, "prompt": row.text, "index": i}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists per field (no padding: prompt lengths differ and the RL stage left-pads); ``index`` as a tensor."""
    batch: dict[str, Any] = {k: [it[k] for it in items] for k in ("prompt_ids", "messages", "prompt")}
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch


class PromptDataModule(ChatDataModule):
    """Prompts for PPO / GRPO, rendered with the chat template and ending with the open assistant header.

    Args:
        sources: files or globs of .jsonl / .json (array) prompt records.
        tokenizer: the tokenizer: the checkpoint given as ``model.init_from`` (the SFT policy; it carries its
            tokenizer) or a .model file. Required: the policy's vocabulary must match.
        format: record schema: prompt (``{"prompt": "...", "system": "..."}``), messages, sharegpt, alpaca
            (``{"instruction", "input"}``) or auto (detected per file from its first record).
        fields: field names when they differ from the schema's usual ones.
        final_reply: a conversation that ends with an assistant reply: ``error`` (default), or ``drop`` the
            reply and use the conversation before it (lets SFT data serve as prompts).
        system_prompt: system prompt given to prompts that have none (``None``: leave them without).
        max_length: most prompt tokens (template included). The RL stage also needs room for the response:
            ``max_length + max_new_tokens`` must fit the model's ``block_size``.
        overflow: a longer prompt: ``truncate`` (drop its oldest exchanges, keeping the system prompt and the
            last user turn; dropped if that alone is still too long) or ``drop`` it.
        batch_size: prompts per rollout on each device (GRPO samples ``group_size`` responses for each).
    """

    kind, stats_key, row_name, item_name = "prompt", "prompts", "prompts", "prompts"
    prerequisite, example_checkpoint = SFT_COMMAND, "checkpoints/sft_tiny/last.ckpt"
    pin_memory = False  # batches are lists of token ids
    split_encoded = True  # val_share counts usable prompts

    def __init__(
        self,
        sources: str | list[str],
        tokenizer: str | None = None,
        format: PromptFormat = "auto",
        fields: PromptFields | None = None,
        final_reply: Literal["error", "drop"] = "error",
        system_prompt: str | None = None,
        max_length: int = 128,
        overflow: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(sources=sources, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, **kwargs)
        if max_length < 2:
            raise ValueError(f"PromptDataModule: max_length must be >= 2, got {max_length}")
        if format not in ("auto", "prompt", "messages", "sharegpt", "alpaca"):
            raise ValueError(f"PromptDataModule: unknown format={format!r}")
        if overflow not in ("truncate", "drop") or final_reply not in ("error", "drop"):
            raise ValueError(f"PromptDataModule: unknown overflow={overflow!r} or final_reply={final_reply!r}")
        self.format = format
        self.fields = fields if isinstance(fields, PromptFields) else PromptFields(**(fields or {}))
        self.final_reply, self.system_prompt, self.overflow = final_reply, system_prompt, overflow

    # ---- reading ----
    def read(self, sources: list[str] | None = None) -> tuple[list[list[Message]], dict[str, Any]]:
        """The prompt conversations of ``sources`` (default: ``self.sources``; each ending with a user turn)
        and per-file statistics."""
        sources = self.sources if sources is None else sources
        prompts: list[list[Message]] = []
        stats: dict[str, Any] = {}
        files = read_chat_files(
            sources,
            None if self.format == "auto" else self.format,
            self.skip_bad,
            lambda rec: detect_prompt_format(rec, self.fields),
            lambda rec: (
                f"cannot tell the prompt schema from the keys {sorted(rec)[:8]}; expected "
                f"{{{self.fields.prompt!r}: ...}} or a conversation, or set format and fields"
            ),
            lambda rec, fmt: to_prompt_messages(rec, fmt, self.fields, self.final_reply),
            "prompts",
        )
        for path, fmt, rs, items in files:
            for messages, _ in items:
                if self.system_prompt and messages[0]["role"] != "system":
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
            prompts.extend(messages for messages, _ in items)
            stats[str(path)] = {**file_stats(fmt, rs, len(items)), "final_replies_dropped": sum(d for _, d in items)}
        if not prompts:
            raise DataError(f"no usable prompts in {sources}; check the paths and the record schema")
        return prompts, stats

    def encode(self, messages: list[Message], counts: dict[str, int]) -> PromptExample | None:
        """Template ids of one prompt fitted to ``max_length`` per the overflow policy (None: dropped)."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
        if len(ids) > self.max_length and self.overflow == "truncate":
            head = messages[:1] if messages[0]["role"] == "system" else []
            body = messages[len(head) :]
            if len(body) > 1:
                counts["truncated_turns"] += 1
            while len(ids) > self.max_length and len(body) > 1:
                body = body[2:]  # the oldest user/assistant exchange goes first; the last user turn stays
                ids = self.tokenizer.encode_chat(head + body, add_generation_prompt=True)[0]
            messages = head + body
        if len(ids) > self.max_length:
            counts["dropped_too_long"] += 1
            return None
        return PromptExample(ids, messages, messages[-1]["content"])

    # ---- ChatDataModule hooks ----
    def new_counts(self) -> dict[str, int]:
        return {"truncated_turns": 0, "dropped_too_long": 0}

    def encode_items(
        self, items: list[list[Message]], indices: Sequence[int], counts: dict[str, int], split: str
    ) -> list[PromptExample]:
        return [ex for i in indices if (ex := self.encode(items[i], counts)) is not None]

    def make_dataset(self, rows: list[PromptExample]) -> PromptDataset:
        return PromptDataset(rows)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_prompts

    def describe(
        self, n_items: tuple[int, int], train: PromptDataset, val: PromptDataset, counts: dict[str, int]
    ) -> tuple[dict[str, Any], str]:
        lengths = [len(r.ids) for r in train.rows + val.rows]
        stats = {
            "train_prompts": n_items[0],
            "val_prompts": n_items[1],
            **counts,
            "prompt_tokens_mean": round(sum(lengths) / len(lengths), 2),
            "prompt_tokens_max": max(lengths),
            "max_length": self.max_length,
        }
        line = (
            f"prompt data: {n_items[0]} train / {n_items[1]} val prompts, {stats['prompt_tokens_mean']:.1f} tokens "
            f"on average (longest {stats['prompt_tokens_max']}); {counts}"
        )
        return stats, line

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # every prompt, in file order (`minillm predict` writes one completion each)
            prompts, _ = self.read()
            rows = self.encode_items(prompts, range(len(prompts)), self.new_counts(), "test")
            self.predict_set = self.make_dataset(rows)
            return
        super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.batch_size, collate_fn=collate_prompts)
