"""``minillm serve``: an OpenAI-compatible chat server on LitServe, with a small web chat page at ``/``.

minillm serve --checkpoint checkpoints/sft_tiny/last.ckpt --port 8000
curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 32}'

How the pieces fit (LitServe owns the HTTP server, the request queue and the inference worker process):

- :class:`ChatSpec`, an ``OpenAISpec`` living in the API server process, checks every request against the
  tokenizer and the model context *before* queueing it, so bad input gets an OpenAI-style 400 also when the
  client asked for a stream (a stream's 200 header goes out before the worker sees the request). It ends each
  response as soon as that request is finished.
- :class:`ChatLoop`, a LitServe loop in the inference worker, takes queued requests whenever there is room (up
  to ``max_batch_size``), also while others are decoding, and steps a :class:`ChatEngine`: continuous batching
  on :meth:`TextGenerator.stream_batch` (left padding + KV cache). Newcomers start at once in a batch of their
  own; every few steps batches that can share a sampling loop are merged into one (a re-prefill of each row's
  prompt + tokens so far), so concurrent requests end up decoded by one forward per step.
- A slow reader never blocks the worker: the worker pushes tokens into per-request buffers of the API server,
  and each HTTP response drains its own buffer at its client's pace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from queue import Empty
from types import SimpleNamespace
from typing import Any

import litserve as ls
import torch
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.specs.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChoiceDelta,
    OpenAISpec,
    UsageInfo,
)
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem
from pydantic import ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillm_lightning.commands import CommandParser
from minillm_lightning.commands.generate import DEFAULT_MAX_NEW, _load
from minillm_lightning.errors import MiniLLMError
from minillm_lightning.generation import GenerationConfig, IncrementalDecoder, TextGenerator
from minillm_lightning.tokenizer import ROLES, Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, what torch.Generator.manual_seed takes
_MAIN_PID = os.getpid()
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


class ChatRequest(ChatCompletionRequest):
    """LitServe's OpenAI chat request plus ``seed`` and ``logprobs``/``top_logprobs`` (declared so that asking for
    them is refused, see :func:`prepare`), with OpenAI's default temperature (1)."""

    temperature: float | None = 1.0
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        """pydantic takes ``true`` for 1 and ``"0.5"`` for 0.5 in int and float fields; as in OpenAI's API, JSON
        booleans and strings are not numbers here."""
        for kind, name in ((bool, "a boolean"), (str, "a string")):
            if isinstance(value, kind):
                raise PydanticCustomError("number_type", f"Input should be a number, not {name}")
        return value


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


class ChatAPI(ls.LitAPI):
    """The model side: loads the checkpoint in the inference worker; :class:`ChatLoop` drives its engine."""

    def __init__(self, checkpoint: str, dtype: str, spec: ChatSpec, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=ChatLoop())
        self.checkpoint, self.dtype = checkpoint, dtype

    def setup(self, device: str) -> None:
        generator, _ = _load(SimpleNamespace(checkpoint=self.checkpoint, device=device, dtype=self.dtype))
        self.engine = ChatEngine(generator)

    def decode_request(self, request: ChatRequest, **kwargs: Any) -> Job:
        spec: ChatSpec = self.spec
        return prepare(request, self.engine.gen.tokenizer, spec.block_size, spec.default_max_tokens)


# ---- the HTTP side (API server process) ----


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first problem of a request that does not parse, and the field it is in. The reminder of the
    ``messages`` shape is added only when that field is ``messages``."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or None
    n = len(e.errors())
    more = f" (and {n - 1} more problems)" if n > 1 else ""
    message = f"{where}: {err['msg']}{more}" if where else f"{err['msg']}{more}"
    if err["loc"] and err["loc"][0] == "messages":
        message += "; expected messages=[{'role': ..., 'content': '...'}, ...]"
    return message, where


class ChatSpec(OpenAISpec):
    """OpenAI's chat completions API for :class:`ChatAPI`, plus ``GET /v1/models``.

    Args:
        model_name: the id ``/v1/models`` lists and responses carry.
        tokenizer_bytes: the checkpoint's SentencePiece model, to count prompt tokens before queueing.
        block_size: the model context.
        default_max_tokens: ``max_tokens`` when a request sets none (capped by what the context leaves).
    """

    def __init__(self, model_name: str, tokenizer_bytes: bytes, block_size: int, default_max_tokens: int) -> None:
        super().__init__()
        self.model_name, self.tokenizer_bytes = model_name, tokenizer_bytes
        self.block_size, self.default_max_tokens = block_size, default_max_tokens
        self.created = int(time.time())
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_tokenizer"] = None  # rebuilt from the bytes on use; SentencePiece objects do not pickle
        return state

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_bytes)
        return self._tokenizer

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        # not OpenAISpec.pre_setup: its checks are for a LitAPI whose predict yields text, and ChatAPI decodes
        # in ChatLoop instead
        self.add_endpoint(self.api_path, self.chat_completion, ["POST"])
        self.add_endpoint(self.api_path, self.options_chat_completions, ["OPTIONS"])
        self.add_endpoint("/v1/models", self.list_models, ["GET"])

    async def list_models(self) -> dict[str, Any]:
        entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minillm"}
        return {"object": "list", "data": [entry]}

    async def chat_completion(self, request: Request, background_tasks: BackgroundTasks) -> Any:
        """Validate, queue for the worker, answer as a stream or as one JSON response."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):  # not JSON, or JSON that is not an object (an array, a string, null, ...)
            return JSONResponse(error_body("the request body must be a JSON object"), status_code=400)
        try:
            req = ChatRequest.model_validate(body)
            prepare(req, self.tokenizer, self.block_size, self.default_max_tokens)
        except ValidationError as e:
            message, param = _validation_message(e)
            return JSONResponse(error_body(message, param=param), status_code=400)
        except RequestError as e:
            return JSONResponse(error_body(str(e), param=e.param), status_code=400)
        uid = uuid.uuid4()
        buffer, ready = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=buffer, event=ready)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), req))
        events = self._events(uid, buffer, ready)
        model = req.model or self.model_name
        if req.stream:
            return StreamingResponse(
                self._sse(model, events), media_type="text/event-stream", background=background_tasks
            )
        return await self._complete(model, events)

    async def _events(self, uid: uuid.UUID, buffer: deque, ready: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        """This request's events from the worker, up to and including its final one."""
        try:
            async for data, status in self.data_streamer(buffer, ready, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise data if isinstance(data, HTTPException) else HTTPException(500, "generation failed")
                event = json.loads(data)
                if event:
                    yield event
                if event.get("finish_reason"):
                    return
        finally:
            self.response_buffer.pop(uid, None)  # later steps of the batch for this request are dropped

    async def _complete(self, model: str, events: AsyncIterator[dict[str, Any]]) -> Any:
        text, finish, usage = [], "stop", UsageInfo()
        try:
            async for event in events:
                text.append(event.get("content") or "")
                if event.get("finish_reason"):
                    finish, usage = event["finish_reason"], UsageInfo(**event["usage"])
        except HTTPException as e:
            return JSONResponse(error_body(str(e.detail), "server_error"), status_code=e.status_code)
        message = ChatMessage(role="assistant", content="".join(text))
        choice = ChatCompletionResponseChoice(index=0, message=message, finish_reason=finish)
        return ChatCompletionResponse(model=model, choices=[choice], usage=usage)

    async def _sse(self, model: str, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; usage rides on the chunk with ``finish_reason``."""
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        def chunk(delta: ChoiceDelta, finish: str | None = None, usage: UsageInfo | None = None) -> str:
            choice = ChatCompletionStreamingChoice(index=0, delta=delta, finish_reason=finish)
            c = ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[choice], usage=usage)
            return f"data: {c.model_dump_json()}\n\n"

        yield chunk(ChoiceDelta(role="assistant", content=""))
        try:
            async for event in events:
                if event.get("content"):
                    yield chunk(ChoiceDelta(content=event["content"]))
                if event.get("finish_reason"):
                    yield chunk(ChoiceDelta(), event["finish_reason"], UsageInfo(**event["usage"]))
        except HTTPException as e:
            yield f"data: {json.dumps(error_body(str(e.detail), 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"


async def unknown_route(request: Request, exc: StarletteHTTPException) -> Response:
    """OpenAI's error object for a path (or method) under ``/v1/`` that this server does not answer; FastAPI's own
    answer elsewhere."""
    if request.url.path.startswith("/v1/") and exc.status_code in (404, 405):
        message = (
            f"{request.method} {request.url.path} is not supported; this server answers POST /v1/chat/completions "
            f"and GET /v1/models"
        )
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)
    return await http_exception_handler(request, exc)


def chat_page() -> str:
    """The web chat page (plain HTML + JS, shipped inside the package)."""
    return resources.files("minillm_lightning").joinpath("static/chat.html").read_text(encoding="utf-8")


def build_server(
    checkpoint: str,
    device: str = "auto",
    dtype: str = "auto",
    model_name: str | None = None,
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    default_max_tokens: int = DEFAULT_MAX_NEW,
) -> tuple[ls.LitServer, str]:
    """The LitServer for ``checkpoint`` and the checkpoint's stage.

    The checkpoint is read here, in the calling process, so a file that is not a minillm checkpoint fails at once
    with a :class:`~minillm_lightning.errors.CheckpointError` instead of inside the inference worker.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA device is available; use --device cpu")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    if max_batch_size < 1 or batch_timeout < 0:
        raise MiniLLMError("--max_batch_size must be >= 1 and --batch_timeout >= 0")
    gen, stage = _load(SimpleNamespace(checkpoint=checkpoint, device="cpu", dtype="float32"))
    block_size = gen.model.config.block_size
    name = model_name or f"minillm-{stage}"
    spec = ChatSpec(name, gen.tokenizer.model_bytes, block_size, default_max_tokens)
    del gen  # the inference worker loads its own copy on its device
    api = ChatAPI(str(checkpoint), dtype, spec, max_batch_size, batch_timeout)
    # timeout=False: a request queued behind a long batch waits for it instead of failing with 504
    server = ls.LitServer(api, accelerator="cuda" if on_gpu else "cpu", devices=1, timeout=False)
    # LitServe answers "/" with "litserve running"; the chat page takes its place
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", chat_page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    server.app.add_exception_handler(StarletteHTTPException, unknown_route)
    return server, stage


def serve_main(argv: list[str]) -> None:
    """``minillm serve``: serve a checkpoint over OpenAI's chat completions API until Ctrl+C."""
    p = CommandParser(
        prog="minillm serve",
        description="OpenAI-compatible chat server (LitServe) for a checkpoint of any stage; web chat page at /.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (.ckpt) of any stage; it carries its tokenizer")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (1024-65535)")
    p.add_argument(
        "--host", choices=["127.0.0.1", "0.0.0.0", "::"], default="127.0.0.1", help="0.0.0.0: reachable from others"
    )
    p.add_argument("--model_name", default=None, help="model id shown by /v1/models (default: minillm-<stage>)")
    p.add_argument("--max_batch_size", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait for a batch to fill up")
    p.add_argument(
        "--max_tokens", type=int, default=DEFAULT_MAX_NEW, help="default max_tokens of requests that set none"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights dtype")
    p.add_argument("--log_level", default="warning", help="uvicorn/LitServe log level")
    args = p.parse_args(argv)
    if not 1024 <= args.port <= 65535:
        p.error(f"--port must be in 1024-65535, got {args.port}")
    if args.max_tokens < 1:
        p.error(f"--max_tokens must be >= 1 (the default max_tokens of requests that set none), got {args.max_tokens}")
    server, stage = build_server(
        args.checkpoint,
        args.device,
        args.dtype,
        args.model_name,
        args.max_batch_size,
        args.batch_timeout,
        args.max_tokens,
    )
    check_port(args.host, args.port)
    if stage == "pretrain":
        print("note: this is a pretrain checkpoint, not tuned for chat; replies may ramble", flush=True)
    host = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    print(
        f"serving {Path(args.checkpoint)} ({stage}) at http://{host}:{args.port}/ (web chat), "
        f"OpenAI API at http://{host}:{args.port}/v1",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`/docker stop shut down as cleanly as Ctrl+C
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False, log_level=args.log_level)


def check_port(host: str, port: int) -> None:
    """Fail with a :class:`MiniLLMError` when ``(host, port)`` cannot be bound, before anything is started. The
    socket is opened as uvicorn opens its own (``SO_REUSEADDR``), so this fails exactly when uvicorn would."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family=family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
            raise MiniLLMError(
                f"port {port} on {host} {why}; stop what is listening there or pick another one with --port <other>"
            ) from None


def _interrupt(signum: int, frame: Any) -> None:
    """LitServer.run shuts its workers down on KeyboardInterrupt only (in the main process; the forked API
    server inherits this handler and simply returns from it once uvicorn has stopped)."""
    if os.getpid() == _MAIN_PID:
        raise KeyboardInterrupt
