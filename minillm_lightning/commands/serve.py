"""``minillm serve``: an OpenAI-compatible chat server on LitServe, with a small web chat page at ``/``.

minillm serve --checkpoint checkpoints/sft_tiny/last.ckpt --port 8000
curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 32}'

This module is the HTTP side; the batching and decoding live in :mod:`.serve_engine`. LitServe owns the HTTP
server, the request queue and the inference worker process:

- :class:`ChatSpec`, an ``OpenAISpec`` living in the API server process, checks every request against the
  tokenizer and the model context *before* queueing it, so bad input gets an OpenAI-style 400 also when the
  client asked for a stream (a stream's 200 header goes out before the worker sees the request). It ends each
  response as soon as that request is finished.
- :class:`ChatAPI` loads the model in the inference worker, where :class:`~.serve_engine.ChatLoop` decodes.
- A slow reader never blocks the worker: the worker pushes tokens into per-request buffers of the API server,
  and each HTTP response drains its own buffer at its client's pace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import litserve as ls
import torch
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
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
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minillm_lightning.commands import CommandParser
from minillm_lightning.commands.generate import DEFAULT_MAX_NEW, _load
from minillm_lightning.commands.serve_engine import NUMBER_FIELDS, ChatEngine, ChatLoop, Job, RequestError, prepare
from minillm_lightning.errors import MiniLLMError
from minillm_lightning.tokenizer import Tokenizer

DEFAULT_MAX_BODY_MB = 4.0
DRAIN_BYTES = 256 * 2**20  # a refused body up to this size is read to its end before the 413 (see BodyLimit)
_MAIN_PID = os.getpid()


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


class ChatAPI(ls.LitAPI):
    """The model side: loads the checkpoint in the inference worker; :class:`ChatLoop` drives its engine."""

    def __init__(self, checkpoint: str, dtype: str, spec: ChatSpec, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=ChatLoop())
        self.checkpoint, self.dtype = checkpoint, dtype

    def setup(self, device: str) -> None:
        generator, _ = _load(SimpleNamespace(checkpoint=self.checkpoint, device=device, dtype=self.dtype))
        self.engine = ChatEngine(generator)

    def decode_request(self, request: ChatRequest | Job, **kwargs: Any) -> Job:
        """The :class:`Job` of a request: :class:`ChatSpec` queues the one it prepared while checking the request
        (no second templating and tokenizing here); a raw :class:`ChatRequest` is prepared now."""
        if isinstance(request, Job):
            return request
        spec: ChatSpec = self.spec
        return prepare(request, self.engine.gen.tokenizer, spec.block_size, spec.default_max_tokens)


# ---- the HTTP side (API server process) ----


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class _BodyTooLarge(Exception):
    """Raised from :class:`BodyLimit`'s ``receive`` once a body without ``Content-Length`` passes the limit; its
    argument says whether more of the body is still to come."""


class BodyLimit:
    """ASGI middleware answering a request whose body is over ``max_mb`` megabytes (2**20 bytes) with HTTP 413 and
    OpenAI's error object, before the endpoint parses and tokenizes it. A declared ``Content-Length`` is checked
    up front, without reading the body; a body sent without one (chunked) is counted as it is read, and refused
    as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, max_mb: float) -> None:
        self.app, self.max_mb = app, max_mb
        self.max_bytes = int(max_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, declared=int(declared))
            return
        size, started = 0, False

        async def counting_receive() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    raise _BodyTooLarge(message.get("more_body", False))
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge as e:
            if started:  # an endpoint that answers while still reading: too late for a 413
                raise
            await self._refuse(scope, receive, send, read=size, more=e.args[0])

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        declared: int | None = None,
        read: int = 0,
        more: bool = True,
    ) -> None:
        """Answer 413 once the rest of the body is read and dropped, up to :data:`DRAIN_BYTES`: a client that
        sends its whole body before reading the answer (Python's urllib, http.client) got "connection reset"
        instead of the 413 when the server closed the connection on an unread body."""
        more = more and (declared is None or declared <= DRAIN_BYTES)  # a declared length over it: not read
        while more and read <= DRAIN_BYTES:
            part = await receive()
            read += len(part.get("body", b""))
            more = part["type"] == "http.request" and part.get("more_body", False)
        message = (
            f"the request body is over this server's limit of {self.max_mb:g} MB; send a smaller one, or start "
            f"minillm serve with a larger --max_body_mb"
        )
        await JSONResponse(error_body(message), status_code=413)(scope, receive, send)


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
            # templating and tokenizing a prompt of megabytes takes a second or more: off the event loop, so that
            # the other responses keep streaming meanwhile
            job = await asyncio.to_thread(prepare, req, self.tokenizer, self.block_size, self.default_max_tokens)
        except ValidationError as e:
            message, param = _validation_message(e)
            return JSONResponse(error_body(message, param=param), status_code=400)
        except RequestError as e:
            return JSONResponse(error_body(str(e), param=e.param), status_code=400)
        uid = uuid.uuid4()
        buffer, ready = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=buffer, event=ready)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))  # the worker decodes it as is
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
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
) -> tuple[ls.LitServer, str]:
    """The LitServer for ``checkpoint`` and the checkpoint's stage; request bodies over ``max_body_mb`` megabytes
    get HTTP 413 (:class:`BodyLimit`).

    The checkpoint is read here, in the calling process, so a file that is not a minillm checkpoint fails at once
    with a :class:`~minillm_lightning.errors.CheckpointError` instead of inside the inference worker.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA device is available; use --device cpu")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    if max_batch_size < 1 or not (math.isfinite(batch_timeout) and batch_timeout >= 0):
        raise MiniLLMError("--max_batch_size must be >= 1 and --batch_timeout a number >= 0")
    if not (math.isfinite(max_body_mb) and max_body_mb > 0):
        raise MiniLLMError(f"--max_body_mb must be a number > 0, got {max_body_mb:g}")
    gen, stage = _load(SimpleNamespace(checkpoint=checkpoint, device="cpu", dtype="float32"))
    block_size = gen.model.config.block_size
    name = model_name or f"minillm-{stage}"
    spec = ChatSpec(name, gen.tokenizer.model_bytes, block_size, default_max_tokens)
    del gen  # the inference worker loads its own copy on its device
    api = ChatAPI(str(checkpoint), dtype, spec, max_batch_size, batch_timeout)
    # timeout=False: a request queued behind a long batch waits for it instead of failing with 504
    server = ls.LitServer(
        api,
        accelerator="cuda" if on_gpu else "cpu",
        devices=1,
        timeout=False,
        middlewares=[(BodyLimit, {"max_mb": max_body_mb})],
    )
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
    p.add_argument(
        "--max_body_mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help="largest request body in MB (2**20 bytes); a larger one gets HTTP 413 before it is parsed",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights dtype")
    p.add_argument(
        "--log_level",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
        default="warning",
        help="uvicorn/LitServe log level",
    )
    args = p.parse_args(argv)
    if not 1024 <= args.port <= 65535:
        p.error(f"--port must be in 1024-65535, got {args.port}")
    if args.max_tokens < 1:
        p.error(f"--max_tokens must be >= 1 (the default max_tokens of requests that set none), got {args.max_tokens}")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        p.error(f"--max_body_mb must be a number > 0 (the largest request body in MB), got {args.max_body_mb:g}")
    server, stage = build_server(
        args.checkpoint,
        args.device,
        args.dtype,
        args.model_name,
        args.max_batch_size,
        args.batch_timeout,
        args.max_tokens,
        args.max_body_mb,
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
