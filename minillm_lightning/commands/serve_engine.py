"""The batching/generation engine of ``minillm serve`` (the HTTP side is :mod:`.serve`).

- :func:`prepare` checks a request against the tokenizer and the model context and turns it into a :class:`Job`
  (the API server calls it before queueing, the inference worker again on its own tokenizer).
- :class:`ChatLoop`, a LitServe loop in the inference worker, takes queued requests whenever there is room (up
  to ``max_batch_size``), also while others are decoding, and steps a :class:`ChatEngine`: continuous batching
  on :meth:`TextGenerator.stream_batch` (left padding + KV cache). Newcomers start at once in a batch of their
  own; every few steps batches that can share a sampling loop are merged into one (a re-prefill of each row's
  prompt + tokens so far), so concurrent requests end up decoded by one forward per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from queue import Empty
from typing import TYPE_CHECKING, Any

import torch
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from minillm_lightning.errors import MiniLLMError
from minillm_lightning.generation import GenerationConfig, IncrementalDecoder, TextGenerator
from minillm_lightning.tokenizer import ROLES, Tokenizer

if TYPE_CHECKING:
    from minillm_lightning.commands.serve import ChatAPI, ChatRequest

MAX_STOP_STRINGS = 4  # as OpenAI
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, what torch.Generator.manual_seed takes
logger = logging.getLogger(__name__)


NUMBER_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "n",
    "seed",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
)


class RequestError(MiniLLMError):
    """A request the server refuses with HTTP 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One validated chat request, ready for the generator."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool = False
    """Send text as it comes; otherwise the worker sends one event at the end (one message instead of one per
    token between the worker and the API server)."""


def _content_text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(getattr(p, "type", None) == "text" for p in content):
        return "".join(p.text for p in content)
    raise RequestError(f"messages[{i}].content must be a string (text only)", f"messages[{i}].content")


def prepare(req: ChatRequest, tokenizer: Tokenizer, block_size: int, default_max_tokens: int) -> Job:
    """Check a request against the model and turn it into a :class:`Job`; raises :class:`RequestError`."""
    if not req.messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise RequestError(
                f"messages[{i}].role is {m.role!r}; this model knows the roles {', '.join(ROLES)}",
                f"messages[{i}].role",
            )
        messages.append({"role": m.role, "content": _content_text(m.content, i)})
    for name in NUMBER_FIELDS:  # Python's json reads NaN, Infinity and -Infinity, which pass the checks below
        value = getattr(req, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {json.dumps(value)}", name)
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise RequestError(f"seed must be a 64-bit signed integer (-2**63 to 2**63-1), got {req.seed}", "seed")
    if req.n is not None and req.n < 1:
        raise RequestError(f"n must be >= 1, got {req.n}", "n")
    if req.n not in (None, 1):
        raise RequestError("n must be 1 (one choice per request)", "n")
    if req.logprobs:
        raise RequestError("logprobs is not supported by this server; leave it out or set it to false", "logprobs")
    if req.top_logprobs:
        raise RequestError("top_logprobs is not supported by this server (no logprobs); leave it out", "top_logprobs")
    prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    room = block_size - len(prompt)
    if room < 1:
        raise RequestError(
            f"the prompt is {len(prompt)} tokens but the model context is {block_size} tokens; shorten the messages "
            f"or drop the oldest ones",
            "messages",
        )
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is None:  # as much as the context leaves, up to the default
        max_tokens = min(default_max_tokens, room)
    elif asked < 1:
        raise RequestError(f"max_tokens must be >= 1, got {asked}", "max_tokens")
    elif asked > room:
        raise RequestError(
            f"max_tokens={asked} and the {len(prompt)}-token prompt exceed the model context of {block_size} tokens; "
            f"ask for at most {room} tokens or shorten the messages",
            "max_tokens",
        )
    else:
        max_tokens = asked
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    return Job(prompt, max_tokens, temperature, top_p, req.seed, tuple(s for s in stop if s), bool(req.stream))


# ---- decoding (inference worker) ----


class StopStrings:
    """Cut a text stream at the first of some stop strings, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit; the text before it is returned)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Row:
    """One request while it is decoded: its tokens so far, its text and its usage."""

    def __init__(self, uid: Any, job: Job, tokenizer: Tokenizer, stop_ids: Sequence[int], key: tuple) -> None:
        self.uid, self.job, self.key = uid, job, key
        self.stop_ids = set(stop_ids)
        self.decoder = IncrementalDecoder(tokenizer, skip_ids=stop_ids)
        self.stops = StopStrings(job.stop)
        self.tokens: list[int] = []
        self.held = ""  # text not sent yet (a request that is not streamed gets it all at the end)
        self.finished = False

    @property
    def context(self) -> list[int]:
        """Prompt + tokens generated so far: what a rebuilt batch prefills to continue this row."""
        return self.job.prompt + self.tokens

    @property
    def left(self) -> int:
        return self.job.max_tokens - len(self.tokens)

    def push(self, token: int) -> dict[str, Any]:
        """Take the next token; return the event to send ({} when there is nothing new)."""
        self.tokens.append(token)
        if token in self.stop_ids:
            return self.end("stop", self.decoder.flush())
        piece = self.decoder.push(token)
        if self.left <= 0:
            return self.end("length", piece + self.decoder.flush())
        text, hit = self.stops.push(piece)
        if hit:
            return self._final(text, "stop")
        if not self.job.stream:
            self.held += text
            return {}
        return {"content": text} if text else {}

    def end(self, reason: str, raw: str = "") -> dict[str, Any]:
        """Finish with ``raw`` (not yet checked for stop strings) as the last text."""
        text, hit = self.stops.push(raw)
        return self._final(text if hit else text + self.stops.flush(), "stop" if hit else reason)

    def _final(self, text: str, reason: str) -> dict[str, Any]:
        self.finished = True
        n = len(self.tokens)
        usage = {
            "prompt_tokens": len(self.job.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.job.prompt) + n,
        }
        return {"content": self.held + text, "finish_reason": reason, "usage": usage}


def sampling_key(job: Job, uid: Any) -> tuple:
    """Requests with equal keys can share one sampling loop. Greedy ones always can; sampling ones with the same
    temperature and top_p can; a seeded request never shares, so its output depends on its seed alone."""
    if job.temperature == 0:
        return ("greedy",)
    if job.seed is not None:
        return ("seed", uid)
    return ("sample", job.temperature, job.top_p)


def pack(rows: Sequence[_Row], block_size: int) -> list[list[_Row]]:
    """Group rows into batches of one key whose longest context plus largest remaining budget fits the context
    (the generator's check for a batch); first fit, in order."""
    groups: list[list[_Row]] = []
    for row in rows:
        for group in groups:
            members = [*group, row]
            fits = max(len(r.context) for r in members) + max(r.left for r in members) <= block_size
            if group[0].key == row.key and fits:
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def job_config(job: Job, max_new_tokens: int) -> GenerationConfig:
    """The generator's settings for ``job`` (and the jobs sharing its sampling key); greedy ignores top_p and seed."""
    greedy = job.temperature == 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=job.temperature,
        top_p=1.0 if greedy else job.top_p,
        seed=None if greedy else job.seed,
    )


class _Run:
    """A batch decoding in lockstep: its rows and the generator's step iterator over their contexts."""

    def __init__(self, gen: TextGenerator, rows: list[_Row]) -> None:
        self.rows = rows
        cfg = job_config(rows[0].job, max(r.left for r in rows))
        self.steps = gen.stream_batch([r.context for r in rows], cfg)

    def live(self) -> list[_Row]:
        return [r for r in self.rows if not r.finished]


class ChatEngine:
    """Continuous batching on top of :meth:`TextGenerator.stream_batch`.

    New requests start decoding at once, as a batch of their own (prefill of their prompts only). Every
    ``merge_every`` steps, batches of the same sampling key are merged into one and finished rows are dropped:
    the merged batch prefills each row's prompt + tokens so far (left-padded, KV cache from there), which costs
    one prefill and then decodes all rows with one forward per step instead of one per batch.

    Args:
        gen: the generator (model + tokenizer).
        merge_every: steps between merges; each merge re-prefills the merged rows.
    """

    def __init__(self, gen: TextGenerator, merge_every: int = 8) -> None:
        self.gen, self.merge_every = gen, merge_every
        self.block_size = gen.model.config.block_size
        self.runs: list[_Run] = []
        self.steps_done = 0

    @property
    def active(self) -> int:
        return sum(len(run.live()) for run in self.runs)

    def check(self, job: Job) -> None:
        """Raise if ``job`` cannot be decoded (its sampling settings, its seed, its length), so that it fails alone
        when admitted instead of in a batch it shares with other requests (whose failure fails them all)."""
        cfg = job_config(job, job.max_tokens)
        if cfg.seed is not None:
            torch.Generator().manual_seed(cfg.seed)
        self.gen.check_prompts([job.prompt], cfg)

    def add(self, requests: Sequence[tuple[Any, Job]]) -> None:
        """Start decoding ``(uid, job)`` requests; requests arriving together share batches where they can."""
        rows = [
            _Row(uid, job, self.gen.tokenizer, self.gen.stop_tokens, sampling_key(job, uid)) for uid, job in requests
        ]
        self.runs += [_Run(self.gen, group) for group in pack(rows, self.block_size)]

    def step(self) -> list[tuple[Any, dict[str, Any]]]:
        """One token for every active request; the (uid, event) pairs with something to send. A request's last
        event carries ``finish_reason`` ("stop": stop token or string, "length": ``max_tokens``) and ``usage``."""
        self.steps_done += 1
        if self.steps_done % self.merge_every == 0:
            self._merge()
        events, runs = [], []
        for run in self.runs:
            tokens = next(run.steps, None)
            for pos, row in enumerate(run.rows):
                if not row.finished:
                    event = row.end("length") if tokens is None else row.push(tokens[pos])
                    if event:
                        events.append((row.uid, event))
            if run.live():
                runs.append(run)
            else:
                run.steps.close()
        self.runs = runs
        return events

    def _merge(self) -> None:
        """Rebuild the batches of every key that has several of them, or whose finished rows are half or more."""
        by_key: dict[tuple, list[_Run]] = {}
        for run in self.runs:
            by_key.setdefault(run.rows[0].key, []).append(run)
        runs = []
        for group in by_key.values():
            live = [r for run in group for r in run.live()]
            total = sum(len(run.rows) for run in group)
            if len(group) == 1 and 2 * len(live) > total:
                runs += group
                continue
            for run in group:
                run.steps.close()
            runs += [_Run(self.gen, rows) for rows in pack(live, self.block_size)]
        self.runs = runs

    def reset(self) -> None:
        for run in self.runs:
            run.steps.close()
        self.runs = []


class ChatLoop(LitLoop):
    """The inference worker's loop: takes requests from LitServe's queue whenever there is room (also while others
    are decoding), steps the :class:`ChatEngine` and sends each request's events to its response queue."""

    def __call__(
        self,
        lit_api: ChatAPI,
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: dict,
        callback_runner: Any,
    ) -> None:
        engine = lit_api.engine
        active: dict[Any, int] = {}  # uid -> the API server's response queue id
        while True:
            new = []
            for item in self._take(request_queue, lit_api, room=lit_api.max_batch_size - len(active), wait=not active):
                if item == _SENTINEL_VALUE:
                    return
                queue_id, uid, _, request = item
                try:  # validated by ChatSpec already; a failure here fails this request only
                    job = lit_api.decode_request(request)
                    engine.check(job)
                    new.append((uid, job))
                    active[uid] = queue_id
                except Exception as e:
                    self.put_error_response(transport, queue_id, uid, e, LoopResponseType.STREAMING)
            try:
                engine.add(new)
                events = engine.step() if engine.runs else []
            except Exception as e:
                logger.exception("generation failed; failing the %d active requests", len(active))
                for uid, queue_id in active.items():
                    self.put_error_response(transport, queue_id, uid, e, LoopResponseType.STREAMING)
                active.clear()
                engine.reset()
                continue
            for uid, event in events:
                queue_id = active[uid]
                self.put_response(
                    transport, queue_id, uid, json.dumps(event), LitAPIStatus.OK, LoopResponseType.STREAMING
                )
                if event.get("finish_reason"):
                    del active[uid]
                    self.put_response(
                        transport, queue_id, uid, "", LitAPIStatus.FINISH_STREAMING, LoopResponseType.STREAMING
                    )

    @staticmethod
    def _take(request_queue: Any, lit_api: ChatAPI, room: int, wait: bool) -> list[tuple]:
        """Up to ``room`` queued requests. Idle (``wait``): block for the first one, then gather those arriving
        within ``batch_timeout``. Busy: only what is already queued, so decoding never waits for arrivals."""
        items: list[tuple] = []
        try:
            if wait:
                items.append(request_queue.get(timeout=1.0))
                deadline = time.monotonic() + lit_api.batch_timeout
                while len(items) < room and (left := deadline - time.monotonic()) > 0:
                    items.append(request_queue.get(timeout=left))
            while len(items) < room:
                items.append(request_queue.get_nowait())
        except Empty:
            pass
        return items
