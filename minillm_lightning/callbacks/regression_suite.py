"""RegressionSuite: fixed prompts with checks, decoded greedily every N validation rounds, pass rate tracked.

A prompt file is JSONL, one prompt per line::

    {"id": "add-3-4", "prompt": "What is 3 plus 4?", "checks": [{"type": "contains", "value": "equals 7."}],
     "max_new_tokens": 24}

``prompt`` is one user turn (``system`` may add a system turn); ``messages`` is a whole conversation ending in
a user turn. Chat prompts go through the shared chat template (``Tokenizer.encode_chat`` with the generation
prompt); ``"chat": false`` continues plain text instead, as a pretrained model does. By default every prompt
is a chat prompt except in the pretrain stage. A prompt passes when all of its checks pass; the pass rate is
passed prompts / prompts. Check types (``ignore_case`` applies to the four text checks):

- ``contains`` / ``not_contains``: ``value`` is (not) a substring of the output;
- ``regex``: ``re.search(value, output)`` finds a match;
- ``exact``: the output, stripped, equals ``value``, stripped;
- ``max_length``: at most ``value`` generated tokens (``"unit": "tokens"``, the default; the stop token is not
  counted) or characters (``"unit": "chars"``);
- ``no_repetition``: no n-gram of ``n`` generated tokens (default 3, at least 1) occurs more than
  ``max_repeats`` times (default 2, at least 1). Tokens, not words, so it works for Chinese as well.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minillm_lightning.callbacks.common import StatefulCallback
from minillm_lightning.data.common import ReadStats, iter_records
from minillm_lightning.errors import DataError, MiniLLMError
from minillm_lightning.fileio import write_json
from minillm_lightning.generation import GenerationConfig, TextGenerator
from minillm_lightning.tokenizer import ROLES, Tokenizer

INTERVAL_ENV = ("MINILLM_REGRESSION_INTERVAL", "MINIGPT_REGRESSION_INTERVAL")  # ours first, then the seed project's
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILES = {
    "pretrain": ["data/regression/pretrain_en.jsonl"],
    "chat": ["data/regression/instruction_en.jsonl", "data/regression/instruction_zh.jsonl"],
}
# keys each check type accepts besides "type"
CHECK_KEYS: dict[str, set[str]] = {
    "contains": {"value", "ignore_case"},
    "not_contains": {"value", "ignore_case"},
    "regex": {"value", "ignore_case"},
    "exact": {"value", "ignore_case"},
    "max_length": {"value", "unit"},
    "no_repetition": {"n", "max_repeats"},
}
PROMPT_KEYS = {"id", "prompt", "messages", "system", "checks", "max_new_tokens", "chat", "note"}


@dataclass
class Check:
    """One check on a generated output (see the module docstring for the types)."""

    type: str
    value: str | int | None = None
    ignore_case: bool = False
    unit: str = "tokens"
    n: int = 3
    max_repeats: int = 2

    def __call__(self, text: str, tokens: Sequence[int]) -> bool:
        """Whether ``text`` (the decoded output) and ``tokens`` (its ids, without the stop token) pass."""
        if self.type == "max_length":
            return (len(tokens) if self.unit == "tokens" else len(text)) <= int(self.value)
        if self.type == "no_repetition":
            grams = Counter(tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1))
            return max(grams.values(), default=0) <= self.max_repeats
        value = str(self.value)
        if self.type == "regex":
            return re.search(value, text, re.IGNORECASE if self.ignore_case else 0) is not None
        if self.ignore_case:
            text, value = text.lower(), value.lower()
        if self.type == "contains":
            return value in text
        if self.type == "not_contains":
            return value not in text
        return text.strip() == value.strip()  # exact

    def describe(self) -> str:
        if self.type == "max_length":
            return f"max_length {self.value} {self.unit}"
        if self.type == "no_repetition":
            return f"no {self.n}-gram more than {self.max_repeats}x"
        return f"{self.type} {self.value!r}" + (" (ignore case)" if self.ignore_case else "")


@dataclass
class RegressionPrompt:
    """A prompt of the suite: what to send, how to judge the output, and where it was defined."""

    id: str
    checks: list[Check]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    max_new_tokens: int | None = None
    chat: bool | None = None
    source: str = ""
    """``file:line`` of the record, for messages."""

    def as_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return self.messages
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": self.prompt}
        ]

    def shown(self) -> str:
        """The prompt as a line of text for reports: the last user turn."""
        return self.prompt if self.prompt is not None else self.as_messages()[-1]["content"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_check(raw: Any, where: str) -> Check:
    """Validate one check object; errors name ``where`` (``file:line``)."""
    if not isinstance(raw, dict) or raw.get("type") not in CHECK_KEYS:
        got = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{where}: check type {got!r} is not one of {', '.join(CHECK_KEYS)}")
    kind = raw["type"]
    unknown = set(raw) - CHECK_KEYS[kind] - {"type"}
    if unknown:
        allowed = sorted(CHECK_KEYS[kind])
        raise DataError(f"{where}: {kind} check has unknown keys {sorted(unknown)}; allowed: {allowed}")
    check = Check(**raw)
    if kind in ("contains", "not_contains", "regex", "exact"):
        if not isinstance(check.value, str) or (kind != "exact" and not check.value):
            raise DataError(f"{where}: {kind} check needs a non-empty string 'value'")
        if not isinstance(check.ignore_case, bool):
            raise DataError(f"{where}: {kind} check 'ignore_case' must be true or false, got {check.ignore_case!r}")
        if kind == "regex":
            try:
                re.compile(check.value)
            except re.error as e:
                raise DataError(f"{where}: invalid regex {check.value!r}: {e}") from None
    elif kind == "max_length":
        if not _is_int(check.value) or check.value < 0:
            raise DataError(f"{where}: max_length check needs an integer 'value' >= 0")
        if check.unit not in ("tokens", "chars"):
            raise DataError(f"{where}: max_length 'unit' must be tokens or chars, got {check.unit!r}")
    else:
        if not _is_int(check.n) or check.n < 1:
            raise DataError(f"{where}: no_repetition check needs an integer 'n' >= 1, got {check.n!r}")
        if not _is_int(check.max_repeats) or check.max_repeats < 1:
            raise DataError(
                f"{where}: no_repetition check needs an integer 'max_repeats' >= 1 (1: no n-gram repeated), "
                f"got {check.max_repeats!r}"
            )
    return check


def parse_prompt(rec: dict[str, Any], where: str) -> RegressionPrompt:
    """Validate one prompt record; errors name ``where`` (``file:line``)."""
    unknown = set(rec) - PROMPT_KEYS
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)}; a prompt has {sorted(PROMPT_KEYS)}")
    if ("prompt" in rec) == ("messages" in rec):
        raise DataError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a conversation)")
    if "prompt" in rec and not (isinstance(rec["prompt"], str) and rec["prompt"]):
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    messages = rec.get("messages")
    if messages is not None:
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
            )
        )
        if not ok or messages[-1]["role"] != "user":
            raise DataError(
                f"{where}: 'messages' must be a list of {{'role': system|user|assistant, 'content': str}} "
                "ending with a user turn"
            )
        if rec.get("chat") is False or "system" in rec:
            raise DataError(f"{where}: 'messages' is always a chat prompt; drop 'chat': false / 'system'")
    if "chat" in rec and not isinstance(rec["chat"], bool):
        raise DataError(f"{where}: 'chat' must be true or false")
    if rec.get("chat") is False and "system" in rec:
        raise DataError(f"{where}: 'system' needs a chat prompt")
    max_new = rec.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise DataError(f"{where}: 'max_new_tokens' must be a positive integer, got {max_new!r}")
    checks = rec.get("checks")
    if not isinstance(checks, list) or not checks:
        example = '[{"type": "contains", "value": "7"}]'
        raise DataError(f"{where}: 'checks' must be a non-empty list of checks, e.g. {example}")
    pid = rec.get("id", where)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise DataError(f"{where}: 'id' must be a string")
    return RegressionPrompt(
        id=str(pid),
        checks=[parse_check(c, where) for c in checks],
        prompt=rec.get("prompt"),
        messages=messages,
        system=rec.get("system"),
        max_new_tokens=max_new,
        chat=rec.get("chat"),
        source=where,
    )


def resolve_prompt_file(path: str | os.PathLike) -> Path:
    """A prompt file relative to the working directory, else to the project root (where ``data/`` ships)."""
    p = Path(path).expanduser()
    for candidate in (p, PROJECT_ROOT / p):
        if candidate.is_file():
            return candidate
    raise DataError(f"regression prompt file {path} not found (looked in {os.getcwd()} and {PROJECT_ROOT})")


def load_prompts(files: Sequence[str | os.PathLike]) -> list[RegressionPrompt]:
    """Read and validate prompt files (JSONL, or a JSON array); every error names ``file:line``."""
    prompts: list[RegressionPrompt] = []
    seen: dict[str, str] = {}
    for f in files:
        path = resolve_prompt_file(f)
        for lineno, rec in iter_records(path, ReadStats(), fix="fix or delete the line"):
            p = parse_prompt(rec, f"{path}:{lineno}")
            if p.id in seen:
                raise DataError(f"{p.source}: duplicate prompt id {p.id!r} (first at {seen[p.id]})")
            seen[p.id] = p.source
            prompts.append(p)
    if not prompts:
        raise DataError(f"regression prompt files {list(map(str, files))} hold no prompts")
    return prompts


def _default_interval(interval: int) -> int:
    for name in INTERVAL_ENV:
        if (value := os.environ.get(name)) not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer (0 runs the suite every validation)") from None
    return interval


def _cell(text: str, limit: int = 120) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "⏎")


class RegressionSuite(StatefulCallback):
    """Greedy-decode fixed prompts every ``interval`` validation rounds and check the outputs.

    Each evaluation logs ``regression/pass_rate``, adds a text table to TensorBoard (``regression/results``),
    and writes ``<run dir>/regression/step_XXXXXX.json`` (every prompt's output and checks) and
    ``<run dir>/regression/summary.json`` (the trend of pass rates), where the run dir is ``trainer.log_dir``.
    A pass rate more than ``drop_threshold`` below the best so far is warned about, naming the failing prompts,
    and stops training with ``stop_on_drop``. Under DDP rank zero decodes and broadcasts the results, so every
    rank keeps the same history and takes the same stop decision (sharded FSDP weights are not supported).

    Args:
        prompt_files: JSONL prompt files (relative to the working directory or the project root). Default:
            ``data/regression/pretrain_en.jsonl`` for the pretrain stage, else ``instruction_en.jsonl`` and
            ``instruction_zh.jsonl``.
        interval: run every ``interval``-th validation round of fit (rounds interval, 2*interval, ...); 0 or 1:
            every round. The environment variable ``MINILLM_REGRESSION_INTERVAL`` (or the seed project's
            ``MINIGPT_REGRESSION_INTERVAL``) overrides it when set.
        drop_threshold: a pass rate this far (absolute, in [0, 1]) below the best so far is a drop.
        stop_on_drop: stop training (``trainer.should_stop``) on a drop.
        max_new_tokens: new tokens per prompt unless the prompt sets its own (capped by the model context).
        batch_size: prompts decoded together.
        chat: use the chat template for prompts that do not say; default: chat except in the pretrain stage.
    """

    def __init__(
        self,
        prompt_files: list[str] | str | None = None,
        interval: int = 1,
        drop_threshold: float = 0.2,
        stop_on_drop: bool = False,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        chat: bool | None = None,
    ) -> None:
        interval = _default_interval(interval)
        if interval < 0 or not 0 <= drop_threshold <= 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError(
                "RegressionSuite: need interval >= 0, drop_threshold in [0, 1], max_new_tokens >= 1, batch_size >= 1"
            )
        self.prompt_files = [prompt_files] if isinstance(prompt_files, str) else prompt_files
        self.interval, self.drop_threshold, self.stop_on_drop = interval, drop_threshold, stop_on_drop
        self.max_new_tokens, self.batch_size, self.chat = max_new_tokens, batch_size, chat
        self.prompts: list[RegressionPrompt] | None = load_prompts(self.prompt_files) if self.prompt_files else None
        self._encoded: dict[str, tuple[list[int], int, bool]] = {}
        self._run_dir: Path | None = None
        self._stage = "?"
        # state kept in checkpoints
        self.rounds = 0
        self.history: list[dict[str, Any]] = []
        self.best_pass_rate: float | None = None
        self.best_step = -1
        self.best_passed: list[str] = []

    # ---- setup ----
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = str(getattr(pl_module, "stage_name", "?"))
        if self.prompts is None:
            self.prompt_files = DEFAULT_FILES["pretrain" if self._stage == "pretrain" else "chat"]
            self.prompts = load_prompts(self.prompt_files)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer, model = getattr(pl_module, "tokenizer", None), getattr(pl_module, "model", None)
        if not isinstance(tokenizer, Tokenizer) or model is None:
            raise MiniLLMError("RegressionSuite needs a stage module with a backbone (.model) and a tokenizer")
        self._encoded = {p.id: self._encode(p, tokenizer, model.config.block_size) for p in self.prompts}
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: all ranks

    def _encode(self, p: RegressionPrompt, tok: Tokenizer, block_size: int) -> tuple[list[int], int, bool]:
        """(prompt ids, new-token budget, chat?) of a prompt; the budget is capped by the model context."""
        chat = p.chat if p.chat is not None else self.chat if self.chat is not None else self._stage != "pretrain"
        if chat:
            ids = tok.encode_chat(p.as_messages(), add_generation_prompt=True)[0]
        else:
            ids = [tok.eos_id, *tok.encode(p.prompt)]  # a new document, as TextGenerator.encode_prompt does
        budget = min(p.max_new_tokens or self.max_new_tokens, block_size - len(ids))
        if budget < 1:
            raise DataError(f"{p.source}: prompt {p.id!r} is {len(ids)} tokens; the model context is {block_size}")
        return ids, budget, chat

    # ---- evaluation ----
    def evaluate(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Decode every prompt greedily and judge it; one result dict per prompt, in file order."""
        gen = TextGenerator(pl_module.model, pl_module.tokenizer)
        stops = set(gen.stop_tokens)
        outputs: dict[str, list[int]] = {}
        by_budget: dict[int, list[str]] = {}
        for p in self.prompts:
            by_budget.setdefault(self._encoded[p.id][1], []).append(p.id)
        for budget, ids in by_budget.items():
            cfg = GenerationConfig(max_new_tokens=budget, temperature=0.0)
            for i in range(0, len(ids), self.batch_size):
                chunk = ids[i : i + self.batch_size]
                for pid, toks in zip(chunk, gen.generate([self._encoded[pid][0] for pid in chunk], cfg)):
                    outputs[pid] = [t for t in toks if t not in stops]
        results = []
        for p in self.prompts:
            tokens = outputs[p.id]
            text = pl_module.tokenizer.decode(tokens)
            checks = [{"check": c.describe(), "passed": c(text, tokens)} for c in p.checks]
            results.append(
                {
                    "id": p.id,
                    "passed": all(c["passed"] for c in checks),
                    "prompt": p.shown(),
                    "chat": self._encoded[p.id][2],
                    "output": text,
                    "output_tokens": len(tokens),
                    "checks": checks,
                    "source": p.source,
                }
            )
        return results

    def _due(self) -> bool:
        return self.interval <= 1 or self.rounds % self.interval == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.rounds += 1
        if not self._due():
            return
        results = self.evaluate(pl_module) if trainer.is_global_zero else None
        results = trainer.strategy.broadcast(results, src=0)  # every rank records the same history
        step = trainer.global_step
        passed = [r["id"] for r in results if r["passed"]]
        failed = [r["id"] for r in results if not r["passed"]]
        rate = len(passed) / len(results)
        entry = {"round": self.rounds, "step": step, "pass_rate": rate, "passed": len(passed), "total": len(results)}
        self.history.append({**entry, "failed": failed})
        pl_module.log("regression/pass_rate", rate, on_epoch=True, sync_dist=True)
        previous_best, previous_step, previous_passed = self.best_pass_rate, self.best_step, set(self.best_passed)
        if self.best_pass_rate is None or rate > self.best_pass_rate:
            self.best_pass_rate, self.best_step, self.best_passed = rate, step, passed
        if trainer.is_global_zero:
            self._report(trainer, entry, results)
        if previous_best is not None and previous_best - rate > self.drop_threshold:
            newly = [i for i in failed if i in previous_passed]
            rank_zero_warn(
                f"RegressionSuite: pass rate fell from {previous_best:.2f} (step {previous_step}) to {rate:.2f} at "
                f"step {step}, more than drop_threshold={self.drop_threshold}. Failing now: {', '.join(failed)}"
                + (f" (passed at step {previous_step}: {', '.join(newly)})" if newly else "")
                + (". Stopping training (stop_on_drop)" if self.stop_on_drop else "")
            )
            if self.stop_on_drop:
                trainer.should_stop = True

    def _report(self, trainer: L.Trainer, entry: dict[str, Any], results: list[dict[str, Any]]) -> None:
        """Rank zero: the JSON files and the TensorBoard text table."""
        out = (self._run_dir or Path(trainer.default_root_dir)) / "regression"
        write_json(out / f"step_{entry['step']:06d}.json", {**entry, "stage": self._stage, "results": results})
        write_json(out / "summary.json", self._summary_dict())
        lines = [
            f"**pass rate {entry['pass_rate']:.2f}** ({entry['passed']}/{entry['total']}) at step {entry['step']}",
            "",
            "| id | result | prompt | output | failed checks |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in results:
            bad = "; ".join(c["check"] for c in r["checks"] if not c["passed"])
            verdict = "PASS" if r["passed"] else "FAIL"
            lines.append(f"| {r['id']} | {verdict} | {_cell(r['prompt'])} | {_cell(r['output'])} | {_cell(bad)} |")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_text", None)):
                experiment.add_text("regression/results", "\n".join(lines), global_step=entry["step"])

    def _summary_dict(self) -> dict[str, Any]:
        return {
            "stage": self._stage,
            "prompt_files": [str(f) for f in self.prompt_files or []],
            "interval": self.interval,
            "drop_threshold": self.drop_threshold,
            "rounds": self.rounds,
            "best_pass_rate": self.best_pass_rate,
            "best_step": self.best_step,
            "history": self.history,
        }

    # ---- summary and state ----
    def summary(self) -> str:
        """One line on the suite's results so far."""
        if not self.history:
            return f"regression suite: not run ({self.rounds} validation rounds, interval {self.interval})"
        last = self.history[-1]
        failing = f"; failing: {', '.join(last['failed'][:10])}" if last["failed"] else ""
        return (
            f"regression suite: {len(self.history)} evaluations; pass rate {last['pass_rate']:.2f} "
            f"({last['passed']}/{last['total']}) at step {last['step']}, best {self.best_pass_rate:.2f} at step "
            f"{self.best_step}{failing}"
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(self.summary())

    state_attrs = ("rounds", "history", "best_pass_rate", "best_step", "best_passed")


__all__ = ["Check", "RegressionPrompt", "RegressionSuite", "load_prompts", "parse_check", "parse_prompt"]
