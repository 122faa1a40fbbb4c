"""Bad input to ``serve``, ``eval``, ``bench``, ``generate`` and ``pipeline``, and help texts that say what the verb
does. A request the server cannot take gets HTTP 400 with OpenAI's error object naming ``param`` (checked in this
process on the server's app: those answers come before anything is queued), and a request that fails in the shared
decoding loop fails alone. A bad option is one ``error:`` line with exit code 2, before anything is loaded or run."""

from __future__ import annotations

import asyncio
import json
import pickle
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import MICRO_ARCH, SAMPLE, user_error

from minillm_lightning.bench.serve import write_checkpoint
from minillm_lightning.cli import main
from minillm_lightning.commands.download import CORPORA
from minillm_lightning.model import MiniGPT, MiniGPTConfig
from minillm_lightning.tokenizer import Tokenizer, TokenizerSettings, train_sentencepiece

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[MiniGPT, Tokenizer]:
    """A random micro model and a small tokenizer trained on the shipped sample (about a second)."""
    texts = [json.loads(line)["text"] for line in (SAMPLE / "pretrain.jsonl").open(encoding="utf-8")]
    tok = Tokenizer(train_sentencepiece(texts, TokenizerSettings(vocab_size=512)))
    return MiniGPT(MiniGPTConfig(**MICRO_ARCH, vocab_size=tok.vocab_size)).eval(), tok


@pytest.fixture(scope="module")
def ckpt(model_and_tokenizer, tmp_path_factory) -> Path:
    return write_checkpoint(*model_and_tokenizer, tmp_path_factory.mktemp("ckpt") / "sft.ckpt")


# ---------------------------------------------------------------- serve: requests


@pytest.fixture(scope="module")
def client(ckpt: Path):
    """The server's HTTP app without its workers: enough for the answers given before a request is queued."""
    pytest.importorskip("litserve")
    from fastapi.testclient import TestClient

    from minillm_lightning.commands.serve import build_server

    server, _ = build_server(str(ckpt), device="cpu")
    c = TestClient(server.app)  # not as a context manager: LitServer's startup would want its workers
    yield c
    c.close()


def _post(client, raw: str) -> tuple[int, dict[str, Any]]:
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


@pytest.mark.parametrize(
    ("field", "raw", "words"),
    [
        ("temperature", "NaN", "temperature must be a finite number, got NaN"),
        ("temperature", "Infinity", "temperature must be a finite number, got Infinity"),
        ("top_p", "NaN", "top_p must be a finite number, got NaN"),
        ("presence_penalty", "-Infinity", "presence_penalty must be a finite number, got -Infinity"),
        ("seed", "99999999999999999999999", "seed must be a 64-bit signed integer"),
        ("seed", str(2**63), "seed must be a 64-bit signed integer"),
        ("seed", str(-(2**63) - 1), "seed must be a 64-bit signed integer"),
        ("n", "0", "n must be >= 1, got 0"),
        ("n", "-3", "n must be >= 1, got -3"),
        ("n", "2", "n must be 1 (one choice per request)"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_serve_refuses_non_finite_numbers_big_seeds_and_n_below_1(
    client, field: str, raw: str, words: str, stream: bool
) -> None:
    """Python's json reads NaN and Infinity; NaN passed `temperature < 0`, and a seed beyond int64 overflowed
    torch.Generator.manual_seed inside the worker, failing every request in flight with 500. n=0 was taken as 1."""
    body = f'{{"messages": {json.dumps(USER)}, "stream": {json.dumps(stream)}, "{field}": {raw}}}'
    status, err = _post(client, body)
    assert status == 400 and err["error"]["param"] == field, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"].startswith(words), err


def test_serve_takes_the_int64_seed_range_and_null_n(model_and_tokenizer) -> None:
    pytest.importorskip("litserve")
    from minillm_lightning.commands.serve import ChatRequest
    from minillm_lightning.commands.serve_engine import prepare

    tok = model_and_tokenizer[1]
    for seed in (2**63 - 1, -(2**63), 0):
        assert prepare(ChatRequest(messages=USER, seed=seed), tok, 128, 8).seed == seed
    assert prepare(ChatRequest(messages=USER, n=None), tok, 128, 8).max_tokens == 8


def test_serve_answers_unknown_v1_routes_with_openai_errors(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "hi"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["type"] == "invalid_request_error", r.text
    assert err["message"] == (
        "POST /v1/completions is not supported; this server answers POST /v1/chat/completions and GET /v1/models"
    )
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("GET /v1/chat/completions is not"), r.text
    assert client.get("/elsewhere").json() == {"detail": "Not Found"}  # outside /v1/: FastAPI's own answer
    assert client.get("/v1/models").status_code == 200


@pytest.fixture(scope="module")
def small_body_client(ckpt: Path):
    """The server's HTTP app with --max_body_mb 0.01 (10485 bytes)."""
    pytest.importorskip("litserve")
    from fastapi.testclient import TestClient

    from minillm_lightning.commands.serve import build_server

    server, _ = build_server(str(ckpt), device="cpu", max_body_mb=0.01)
    c = TestClient(server.app)
    yield c
    c.close()


def _body_of(size: int) -> bytes:
    """A chat request of exactly ``size`` bytes, its prompt far longer than the micro model's context."""
    empty = json.dumps({"messages": [{"role": "user", "content": ""}]}).encode()
    return json.dumps({"messages": [{"role": "user", "content": "w" * (size - len(empty))}]}).encode()


@pytest.mark.parametrize("chunked", [False, True])
def test_serve_answers_a_body_over_max_body_mb_with_413(small_body_client, chunked: bool) -> None:
    """A huge body used to be read, parsed and tokenized in full. Over the limit: 413 and OpenAI's error object,
    whether the body declares its Content-Length or comes chunked without one; at the limit: the usual checks."""
    limit = int(0.01 * 2**20)

    def post(body: bytes):
        content = (body[i : i + 4096] for i in range(0, len(body), 4096)) if chunked else body
        r = small_body_client.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        assert ("content-length" in r.request.headers) != chunked, r.request.headers
        return r

    r = post(_body_of(limit + 1))
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": {
            "message": "the request body is over this server's limit of 0.01 MB; send a smaller one, or start "
            "minillm serve with a larger --max_body_mb",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    r = post(_body_of(limit))  # read and checked as before: its prompt is longer than the context
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "model context is 128 tokens" in r.json()["error"]["message"], r.text


def test_serve_body_limit_counts_the_chunks_of_a_body_without_content_length() -> None:
    """Chunks under the limit each, over it together: refused once the count passes it, before the app sees it all."""
    pytest.importorskip("litserve")
    from minillm_lightning.commands.serve import DRAIN_BYTES, BodyLimit

    async def app(scope, receive, send) -> None:  # reads the whole body, then answers 200 with its length
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    def call(chunks: list[bytes], declared: int | None = None) -> tuple[int, bytes, int]:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []
        received = 0

        async def receive() -> dict:
            nonlocal received
            received += 1
            return messages[received - 1]

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [] if declared is None else [(b"content-length", str(declared).encode())]
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
        asyncio.run(BodyLimit(app, max_mb=0.01)(scope, receive, send))  # a receive past the last chunk: IndexError
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), received

    assert call([b"x" * 5000] * 2) == (200, b"10000", 2)
    status, body, received = call([b"x" * 5000] * 4)
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error", body
    # the rest of a refused body is read and dropped before the 413: Python's urllib, which sends the whole body
    # before it reads the answer, got "connection reset" when the server closed the connection on unread data
    assert received == 4
    assert call([b"x" * 5000] * 3)[::2] == (413, 3)  # over the limit at its last chunk: nothing more to read
    assert call([b"x" * 5000] * 4, declared=20000)[::2] == (413, 4)  # a declared length: refused unread, then read
    assert call([b"x" * 5000] * 4, declared=DRAIN_BYTES + 1)[::2] == (413, 0)  # too large to read: closed unread


def test_serve_tokenizes_requests_off_the_event_loop(client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templating and tokenizing ran inside the async handler, so a prompt of megabytes stalled every other stream
    for seconds; it runs in a worker thread now, and its RequestError still becomes a 400 naming the field."""
    seen: list[tuple[threading.Thread, bool]] = []
    encode_chat = Tokenizer.encode_chat

    def recording(self, *args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread(), on_loop))
        return encode_chat(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_chat", recording)
    status, err = _post(client, json.dumps({"messages": [{"role": "user", "content": "word " * 20_000}]}))
    assert status == 400 and err["error"]["param"] == "messages" and "model context" in err["error"]["message"], err
    assert len(seen) == 1, seen
    thread, on_loop = seen[0]
    assert not on_loop, f"the prompt was tokenized on the event loop's thread {thread.name}"


class _Transport:
    """Collects what the loop sends per request; once every request has ended (finished or failed), queues the
    sentinel that stops the loop."""

    def __init__(self, requests: queue.Queue, uids: list[str]) -> None:
        self.requests, self.pending = requests, set(uids)
        self.events: dict[str, list[dict]] = {u: [] for u in uids}
        self.errors: dict[str, Exception] = {}

    def send(self, item: tuple, consumer_id: int) -> None:
        from litserve.utils import LitAPIStatus

        uid, (data, status, _, _) = item
        if status == LitAPIStatus.ERROR:
            self.errors[uid] = pickle.loads(data)
        elif status == LitAPIStatus.OK:
            self.events[uid].append(json.loads(data))
        if status in (LitAPIStatus.ERROR, LitAPIStatus.FINISH_STREAMING):
            self.pending.discard(uid)
            if not self.pending:
                from litserve.loops.base import _SENTINEL_VALUE

                self.requests.put(_SENTINEL_VALUE)


def test_a_request_the_engine_cannot_decode_fails_alone(model_and_tokenizer) -> None:
    """Jobs that got past the request checks but that the generator refuses (NaN temperature, a seed beyond int64)
    used to fail inside the batch shared with others, and the loop then failed every active request."""
    pytest.importorskip("litserve")
    from minillm_lightning.commands.serve_engine import ChatEngine, ChatLoop, Job
    from minillm_lightning.generation import TextGenerator

    model, tok = model_and_tokenizer
    prompt = tok.encode_chat(USER, add_generation_prompt=True)[0]
    jobs = {
        "good": Job(prompt, 4, 0.0, 1.0, None, ()),
        "nan": Job(prompt, 4, float("nan"), 1.0, None, ()),
        "seed": Job(prompt, 4, 0.8, 1.0, 10**30, ()),
        "sampled": Job(prompt, 4, 0.8, 1.0, 7, ()),
    }
    requests: queue.Queue = queue.Queue()
    for i, (uid, job) in enumerate(jobs.items()):
        requests.put((0, uid, float(i), job))
    transport = _Transport(requests, list(jobs))
    api = SimpleNamespace(
        engine=ChatEngine(TextGenerator(model, tok)), max_batch_size=8, batch_timeout=0.0, decode_request=lambda j: j
    )
    ChatLoop()(api, "cpu", 0, requests, transport, {}, None)
    assert set(transport.errors) == {"nan", "seed"}, transport.errors
    assert "temperature" in str(transport.errors["nan"]) and "seed must be in" in str(transport.errors["seed"])
    for uid in ("good", "sampled"):
        final = transport.events[uid][-1]
        assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] >= 1, final


# ---------------------------------------------------------------- serve, eval, bench, pipeline, generate: options


@pytest.mark.parametrize("value", ["0", "-5"])
def test_serve_max_tokens_below_1_is_refused_at_start(
    ckpt: Path, value: str, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """It used to start, then fail every request without max_tokens with 500."""
    pytest.importorskip("litserve")
    from minillm_lightning.commands import serve

    def started(*args: Any) -> None:
        raise AssertionError("the server was built: --max_tokens was not checked")

    monkeypatch.setattr(serve, "build_server", started)
    line = user_error(["serve", "--checkpoint", str(ckpt), "--max_tokens", value], capfd)
    assert line == (
        "minillm serve: error: --max_tokens must be >= 1 (the default max_tokens of requests that set none), "
        f"got {value}"
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_serve_max_body_mb_not_above_0_is_refused_at_start(
    ckpt: Path, value: str, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    pytest.importorskip("litserve")
    from minillm_lightning.commands import serve

    def started(*args: Any) -> None:
        raise AssertionError("the server was built: --max_body_mb was not checked")

    monkeypatch.setattr(serve, "build_server", started)
    line = user_error(["serve", "--checkpoint", str(ckpt), "--max_body_mb", value], capfd)
    assert (
        line
        == f"minillm serve: error: --max_body_mb must be a number > 0 (the largest request body in MB), got {value}"
    )


@pytest.mark.parametrize(
    "option, message",
    [
        # LitServe's getattr(logging, "LOUD") was an AttributeError traceback
        (["--log_level", "loud"], "minillm serve: error: argument --log_level: invalid choice: 'loud'"),
        # NaN passed `batch_timeout < 0` and the server started
        (["--batch_timeout", "nan"], "error: --max_batch_size must be >= 1 and --batch_timeout a number >= 0"),
    ],
)
def test_serve_refuses_a_bad_log_level_and_batch_timeout(
    ckpt: Path, option: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    pytest.importorskip("litserve")
    from minillm_lightning.commands import serve

    def started(*args: Any) -> None:
        raise AssertionError(f"the server was built and about to start: {option} was not checked")

    monkeypatch.setattr(serve, "check_port", started)
    assert user_error(["serve", "--checkpoint", str(ckpt), *option], capfd).startswith(message)


def test_eval_without_tasks_is_an_error(ckpt: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "r.json"
    line = user_error(["eval", "--checkpoint", str(ckpt), "--tasks", "", "--output", str(out)], capfd)
    assert line.startswith("error: no tasks to evaluate: give --tasks (among ") and "--text FILE" in line, line
    assert not out.exists()


def test_eval_harness_include_must_be_a_folder_used_with_harness(ckpt: Path, tmp_path: Path, capfd) -> None:
    args = ["eval", "--checkpoint", str(ckpt), "--tasks", "x"]
    line = user_error([*args, "--harness", "--harness-include", str(tmp_path / "nonexist_dir")], capfd)
    assert line == (
        f"error: --harness-include {tmp_path / 'nonexist_dir'} does not exist; give the folder of your lm-eval task "
        f"YAMLs"
    )
    (tmp_path / "task.yaml").write_text("task: x\n")
    line = user_error([*args, "--harness", "--harness-include", str(tmp_path / "task.yaml")], capfd)
    assert line.endswith("task.yaml is a file; give the folder of your lm-eval task YAMLs"), line
    line = user_error([*args, "--harness-include", str(tmp_path)], capfd)
    assert line == "error: --harness-include names task YAMLs for --harness; add --harness or drop it"


LOCAL_TASK = """task: local_task
dataset_path: json
dataset_kwargs: {data_files: {test: data.jsonl}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{text}}"
doc_to_target: " x"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""


@pytest.fixture
def harness_dir(tmp_path: Path) -> Path:
    pytest.importorskip("lm_eval", reason="the --harness task checks need lm_eval (pip install -e '.[eval]')")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_task.yaml").write_text(LOCAL_TASK)
    return tmp_path / "tasks"


def test_eval_harness_names_an_unknown_task(ckpt: Path, harness_dir: Path, capfd) -> None:
    """lm-eval's TaskManager raised a KeyError (traceback, exit 1)."""
    args = ["eval", "--checkpoint", str(ckpt), "--harness", "--harness-include", str(harness_dir)]
    line = user_error([*args, "--tasks", "nosuchtask"], capfd)
    assert line.startswith(
        f"error: --tasks: unknown lm-eval task 'nosuchtask', not among the task YAMLs of --harness-include "
        f"{harness_dir}; "
    ), line
    assert user_error([*args, "--tasks", "hellaswag"], capfd).endswith("; it has local_task")
    assert user_error([*args, "--tasks", "local_tsk"], capfd).endswith("; did you mean local_task?")


def test_eval_harness_without_network_says_how_to_run_offline(
    ckpt: Path, harness_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """What lm-eval raises when the Hub cannot be reached (datasets' ConnectionError) was a traceback."""
    import lm_eval

    def offline(**kw: Any) -> None:
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    args = ["eval", "--checkpoint", str(ckpt), "--harness", "--harness-include", str(harness_dir)]
    line = user_error([*args, "--tasks", "local_task"], capfd)
    assert line.startswith(
        "error: --harness: the data of task 'local_task' could not be fetched or read (Couldn't reach 'baber/piqa' "
        "on the Hub (LocalEntryNotFoundError)); without network, write task YAMLs that read local copies"
    ), line
    assert "--harness-include DIR" in line and "docs/inference.md" in line


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--decode-lengths", "0", "--decode-lengths must be new-token counts >= 1, e.g. 128,256; got [0]"),
        ("--decode-lengths", "128,-1", "--decode-lengths must be new-token counts >= 1"),
        ("--decode-lengths", ",", "--decode-lengths must be new-token counts >= 1, e.g. 128,256; got []"),
        ("--beam-length", "0", "--beam-length must be >= 1 (new tokens of the beam search run), got 0"),
    ],
)
def test_bench_refuses_decode_lengths_below_1(option: str, value: str, words: str, capfd) -> None:
    """They used to end in GenerationConfig's ValueError (traceback, exit 1) after the training sections."""
    line = user_error(["bench", "--sections", "decode", option, value], capfd)
    assert line.startswith(f"minillm bench: error: {words}"), line


@pytest.mark.parametrize("value", ["0", "-1"])
def test_pipeline_prompts_below_1_is_refused(value: str, capfd) -> None:
    """-1 silently dropped the last answer from the report (got[:-1])."""
    line = user_error(["pipeline", "--prompts", value], capfd)
    assert (
        line == f"minillm pipeline: error: --prompts must be >= 1 (answers per stage shown in the report), got {value}"
    )


def test_generate_system_needs_a_chat_prompt(model_and_tokenizer, tmp_path: Path, capfd) -> None:
    """--system was ignored without a word for plain-text prompts."""
    args = ["generate", "--prompt", "hi", "--system", "Be brief.", "--max_new_tokens", "2"]
    line = user_error([*args, "--checkpoint", str(tmp_path / "none.ckpt"), "--no_chat"], capfd)  # before loading
    assert line == "minillm generate: error: --system applies to chat prompts only; drop --no_chat or --system"
    pretrain = write_checkpoint(*model_and_tokenizer, tmp_path / "pretrain.ckpt", stage="pretrain")
    line = user_error([*args, "--checkpoint", str(pretrain)], capfd)  # a pretrain checkpoint: plain text by default
    assert line == (
        "error: --system applies to chat prompts only, and a pretrain checkpoint continues plain text by default; "
        "add --chat or drop --system"
    )


# ---------------------------------------------------------------- help texts


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where the terminal width says


def test_help_texts_say_what_the_verbs_do(capsys) -> None:
    shown = _help(["download"], capsys)
    for corpus in CORPORA.values():  # --output's default "the path listed above" is listed
        assert f"-> {corpus.output}" in shown, corpus.output
    assert "(default: the corpus's path after -> in the list above)" in shown
    chat = _help(["chat"], capsys)
    assert "new tokens per reply (default: 256 or half the model context, whichever is less;" in chat
    assert "whatever the model context leaves" not in chat
    assert "(default: 256 or whatever the model context leaves)" in _help(["generate"], capsys)
    serve = _help(["serve"], capsys)
    assert (
        "largest request body in MB (2**20 bytes); a larger one gets HTTP 413 before it is parsed (default: 4.0)"
        in serve
    )
    pipeline = _help(["pipeline"], capsys)
    assert "answers per stage shown in the report (every regression prompt is answered and scored)" in pipeline
