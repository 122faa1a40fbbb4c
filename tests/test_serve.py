"""``minillm serve``: the request checks, stop strings and batch planning on their own, then a real server (a
``minillm serve`` subprocess on a free port) driven by the official ``openai`` client, compared token for token
with ``TextGenerator`` and ``minillm generate`` on the same tiny checkpoint."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("litserve")
openai = pytest.importorskip("openai")

import lightning as L  # noqa: E402
from conftest import SAMPLE, micro_trainer  # noqa: E402

from minillm_lightning import SFTDataModule, SFTModule  # noqa: E402
from minillm_lightning.bench.serve import running_server  # noqa: E402
from minillm_lightning.cli import main  # noqa: E402
from minillm_lightning.commands.generate import _load  # noqa: E402
from minillm_lightning.commands.serve import ChatRequest  # noqa: E402
from minillm_lightning.commands.serve_engine import (  # noqa: E402
    ChatEngine,
    Job,
    RequestError,
    StopStrings,
    _Row,
    pack,
    prepare,
    sampling_key,
)
from minillm_lightning.generation import GenerationConfig, TextGenerator  # noqa: E402

SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def sft_ckpt(tiny_pretrain_ckpt: Path, tmp_path_factory) -> Path:
    """40 SFT steps on the shipped sample: enough for answers that end with <|im_end|> (a pretrain checkpoint
    closes every chat turn at once with </s>, so its greedy answers are empty)."""
    root = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    pre = str(tiny_pretrain_ckpt)
    dm = SFTDataModule([str(SAMPLE / "sft.jsonl")], tokenizer=pre, max_length=96, batch_size=8, val_share=0.0)
    model = SFTModule(init_from=pre, vocab_size=dm.vocab_size, learning_rate=3e-3, warmup=5)
    trainer = micro_trainer(root, max_steps=40, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(root / "sft.ckpt")
    return root / "sft.ckpt"


@pytest.fixture(scope="module")
def gen(sft_ckpt: Path) -> TextGenerator:
    return _load(SimpleNamespace(checkpoint=sft_ckpt, device="cpu", dtype="float32"))[0]


def solo(gen: TextGenerator, messages: list[dict], max_tokens: int, **kw) -> tuple[str, list[int]]:
    """What TextGenerator produces for this conversation alone: (text without stop tokens, tokens)."""
    ids = gen.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    out = gen.generate([ids], GenerationConfig(max_new_tokens=max_tokens, **kw))[0]
    return gen.tokenizer.decode([t for t in out if t not in gen.stop_tokens]), out


def user(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


# ---- without a server ----


def test_stop_strings_hold_back_a_possible_start() -> None:
    s = StopStrings(["END", "\n\n"])
    assert s.push("abcE") == ("abc", False)  # "E" may start "END"
    assert s.push("x") == ("Ex", False)  # it did not
    assert s.push("one\n") == ("one", False)
    assert s.push("\nrest") == ("", True)  # "\n\n" found: nothing after it is emitted
    t = StopStrings(["END"])
    assert t.push("aEN") == ("a", False) and t.flush() == "EN"
    assert StopStrings([]).push("anything") == ("anything", False)


def test_prepare_checks_requests(gen: TextGenerator) -> None:
    def job(**kw) -> Job:
        return prepare(ChatRequest(**{"messages": user("hi"), **kw}), gen.tokenizer, 128, 64)

    prompt_len = len(gen.tokenizer.encode_chat(user("hi"), add_generation_prompt=True)[0])
    j = job(temperature=0, stop="x", seed=3)
    assert (j.max_tokens, j.temperature, j.stop, j.seed) == (64, 0, ("x",), 3)
    assert job(max_tokens=128 - prompt_len).max_tokens == 128 - prompt_len
    assert job(logprobs=False).max_tokens == job(logprobs=None).max_tokens == 64  # not asking for them is fine
    parts = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    )
    assert (
        prepare(parts, gen.tokenizer, 128, 8).prompt
        == gen.tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    )
    bad = [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (dict(messages=[]), "messages"),
        (dict(max_tokens=128 - prompt_len + 1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(messages=user("word " * 200)), "messages"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=2), "n"),
        (dict(logprobs=True), "logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for kw, param in bad:
        with pytest.raises(RequestError) as e:
            job(**kw)
        assert e.value.param == param, kw


def test_pack_groups_rows_that_can_share_a_sampling_loop(gen: TextGenerator) -> None:
    def row(uid: int, prompt_len: int, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> _Row:
        job = Job([1] * prompt_len, max_tokens, temperature, 1.0, seed, ())
        return _Row(uid, job, gen.tokenizer, gen.stop_tokens, sampling_key(job, uid))

    rows = [row(0, 10, 20), row(1, 5, 30), row(2, 10, 10, 0.8), row(3, 10, 10, 0.8), row(4, 10, 10, 0.8, 1)]
    rows.append(row(5, 100, 20))  # with row 1's 30 new tokens: 100 + 30 > 128
    assert [[r.uid for r in g] for g in pack(rows, block_size=128)] == [[0, 1], [2, 3], [4], [5]]


def test_engine_outputs_equal_each_request_generated_alone(gen: TextGenerator) -> None:
    """Requests join while others decode, batches merge every 2 steps: every answer is still the solo one."""
    asks = {
        "a": (user("The cat"), dict(max_tokens=12, temperature=0.0, seed=None)),
        "b": (user("Once upon a time"), dict(max_tokens=5, temperature=0.0, seed=None)),
        "c": (user("hi"), dict(max_tokens=10, temperature=0.9, seed=3)),
        "d": (user("What is 3 plus 4?"), dict(max_tokens=9, temperature=0.7, seed=None)),  # unseeded: length only
        "e": (user("Once upon a time"), dict(max_tokens=20, temperature=0.0, seed=None)),
    }

    def job(uid: str) -> Job:
        messages, s = asks[uid]
        prompt = gen.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
        return Job(prompt, s["max_tokens"], s["temperature"], 1.0, s["seed"], (), stream=uid in "ace")

    engine = ChatEngine(gen, merge_every=2)
    engine.add([(u, job(u)) for u in "abc"])
    texts, counts, finals, greedy_batches = dict.fromkeys(asks, ""), dict.fromkeys(asks, 0), {}, []
    while engine.runs:
        if engine.steps_done == 2:
            engine.add([(u, job(u)) for u in "de"])  # arrive while a, b, c decode
        for uid, event in engine.step():
            assert uid not in finals  # nothing after a request's final event
            texts[uid] += event.get("content", "")
            counts[uid] += 1
            if event.get("finish_reason"):
                finals[uid] = event
        greedy_batches.append(sum(run.rows[0].key == ("greedy",) for run in engine.runs))
    assert greedy_batches[2] == 2 and greedy_batches[3] == 1  # e decodes alone at step 3, merged at step 4
    assert counts["b"] == counts["d"] == 1 and counts["a"] + counts["e"] > 4  # b, d not streamed: one event
    for uid in "abce":
        messages, s = asks[uid]
        text, tokens = solo(gen, messages, s["max_tokens"], temperature=s["temperature"], seed=s["seed"])
        assert texts[uid] == text, uid
        prompt_len = len(job(uid).prompt)
        assert finals[uid]["usage"] == {
            "prompt_tokens": prompt_len,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_len + len(tokens),
        }
        assert finals[uid]["finish_reason"] == ("stop" if tokens[-1] in gen.stop_tokens else "length")
    assert 1 <= finals["d"]["usage"]["completion_tokens"] <= 9
    assert {finals["a"]["finish_reason"], finals["b"]["finish_reason"]} == {"stop", "length"}  # both endings


def test_the_spec_queues_the_job_it_prepared_and_the_worker_takes_it_as_is(gen: TextGenerator, monkeypatch) -> None:
    """A request is templated and tokenized once, in the API process: the worker got the raw request and
    prepared it a second time (seconds for a prompt of megabytes)."""
    import asyncio

    from minillm_lightning.commands import serve

    spec = serve.ChatSpec("m", gen.tokenizer.model_bytes, block_size=128, default_max_tokens=8)
    queued: list[tuple] = []
    spec.request_queue = SimpleNamespace(put=queued.append)
    spec.response_buffer, spec.response_queue_id = {}, 0

    class Body:
        async def json(self) -> dict:
            return {"messages": user("The cat"), "max_tokens": 5, "stream": True}

    asyncio.run(spec.chat_completion(Body(), background_tasks=None))
    (job,) = [item[-1] for item in queued]
    assert isinstance(job, Job)
    assert job.prompt == gen.tokenizer.encode_chat(user("The cat"), add_generation_prompt=True)[0]
    assert (job.max_tokens, job.stream) == (5, True)

    api = serve.ChatAPI("unused.ckpt", "float32", spec, max_batch_size=2, batch_timeout=0.0)
    api.engine = SimpleNamespace(gen=gen)
    calls = []
    monkeypatch.setattr(serve, "prepare", lambda *a: calls.append(a))
    assert api.decode_request(job) is job and not calls  # not prepared again
    api.decode_request(ChatRequest.model_validate({"messages": user("hi")}))  # a raw request still is
    assert len(calls) == 1


def test_not_a_minillm_checkpoint_fails_in_one_line(tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    for path in (text, foreign):  # the wording belongs to checkpoint.py; here: one line naming the file, exit 2
        with pytest.raises(SystemExit) as e:
            main(["serve", "--checkpoint", str(path), "--port", "8123"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and str(path) in err, err
        assert len(err.splitlines()) == 1 and "minillm" in err, err


def test_a_port_in_use_fails_in_one_line_before_serving(sft_ckpt: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["serve", "--checkpoint", str(sft_ckpt), "--port", str(port)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "serving" not in out, out
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"port {port}" in err and "--port <other>" in err, err


# ---- a real server ----


@pytest.fixture(scope="module")
def server(sft_ckpt: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with running_server(sft_ckpt, "--max_batch_size", "8", "--batch_timeout", "0.05", env=env) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c  # closed before the server stops: no idle keep-alive connection delays its shutdown


def test_models_and_web_page(server: str, client) -> None:
    assert [m.id for m in client.models.list().data] == ["minillm-sft"]
    with urllib.request.urlopen(f"{server}/") as r:
        page = r.read().decode()
    assert r.headers["content-type"].startswith("text/html")
    for needle in ('id="system"', 'id="temperature"', 'id="max_tokens"', 'id="reset"', "/v1/chat/completions"):
        assert needle in page


def test_plain_and_streamed_greedy_equal_generate(client, gen: TextGenerator, sft_ckpt: Path, capsys) -> None:
    messages = user("Once upon a time")
    text, tokens = solo(gen, messages, 20, temperature=0.0)
    resp = client.chat.completions.create(model="x", messages=messages, max_tokens=20, temperature=0)
    assert resp.choices[0].message.content == text and resp.choices[0].message.role == "assistant"
    prompt_len = len(gen.tokenizer.encode_chat(messages, add_generation_prompt=True)[0])
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len, len(tokens))
    assert resp.choices[0].finish_reason == ("stop" if tokens[-1] in gen.stop_tokens else "length")
    assert resp.model == "x" and resp.object == "chat.completion"

    chunks = list(
        client.chat.completions.create(model="x", messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # really streamed, piece by piece
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)

    # `minillm generate` on the same checkpoint prints the same answer
    argv = ["generate", "--checkpoint", str(sft_ckpt), "--prompt", "Once upon a time", "--chat", "--system"]
    main([*argv, SYSTEM["content"], "--temperature", "0", "--max_new_tokens", "20", "--no_stream"])
    out = capsys.readouterr().out
    head = "user: Once upon a time\nassistant: "
    assert out.startswith(head) and out[len(head) : -2] == text


def test_concurrent_requests_each_equal_their_solo_output(client, gen: TextGenerator) -> None:
    asks = [("The cat", 16), ("Once upon a time", 6), ("What is 3 plus 4?", 24), ("hi", 10)]

    def ask(item: tuple[str, int]) -> str:
        q, n = item
        resp = client.chat.completions.create(model="x", messages=user(q), max_tokens=n, temperature=0)
        return resp.choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == [solo(gen, user(q), n, temperature=0.0)[0] for q, n in asks]


def test_seed_and_stop(client, gen: TextGenerator) -> None:
    messages = user("Once upon a time")
    kw = dict(model="x", messages=messages, max_tokens=16, temperature=0.9, top_p=0.9)
    a = client.chat.completions.create(**kw, seed=11).choices[0].message.content
    assert a == client.chat.completions.create(**kw, seed=11).choices[0].message.content
    assert a == solo(gen, messages, 16, temperature=0.9, top_p=0.9, seed=11)[0]

    text, _ = solo(gen, messages, 20, temperature=0.0)
    stop = text[4:7]
    assert stop.strip(), f"greedy text too short for the test: {text!r}"
    resp = client.chat.completions.create(model="x", messages=messages, max_tokens=20, temperature=0, stop=[stop])
    assert resp.choices[0].message.content == text[: text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def _post(server: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{server}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_400_and_the_server_keeps_serving(server: str, client) -> None:
    for body in ({"messages": "hello"}, {"messages": [{"text": "no role"}]}, {"max_tokens": 5}):
        status, err = _post(server, body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (body, err)
        assert "messages" in err["error"]["message"]
    long_prompt = user("word " * 200)
    cases = [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "robot"),
        (dict(messages=user("hi"), max_tokens=1000), "max_tokens=1000"),
        (dict(messages=user("hi"), max_tokens=1000, stream=True), "max_tokens=1000"),  # before the stream starts
        (dict(messages=long_prompt), "model context"),
        (dict(messages=long_prompt, stream=True), "model context"),
    ]
    for kw, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", **kw)
        assert e.value.status_code == 400 and words in e.value.message, kw
    resp = client.chat.completions.create(model="x", messages=user("hi"), max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens >= 1


def test_wrong_types_and_unsupported_fields_get_400(server: str) -> None:
    status, err = _post(server, [1, 2])
    assert status == 400 and err["error"]["message"] == "the request body must be a JSON object", err
    hint = "expected messages="
    fields = ("max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p")
    strings = [("temperature", "0.5"), ("max_tokens", "8"), ("max_tokens", "abc")]
    for field, value in [*((f, True) for f in fields), ("temperature", False), *strings]:
        status, err = _post(server, {"messages": user("hi"), field: value})
        assert status == 400 and err["error"]["param"] == field, (field, value, err)
        message = err["error"]["message"]
        assert message.startswith(f"{field}: ") and hint not in message, message  # no hint about messages
        assert ("string" if isinstance(value, str) else "boolean") in message, message
    status, err = _post(server, {"messages": "hello"})
    assert status == 400 and hint in err["error"]["message"], err  # the hint stays for errors in messages
    for stream in (False, True):
        status, err = _post(server, {"messages": user("hi"), "logprobs": True, "stream": stream})
        assert status == 400 and err["error"]["param"] == "logprobs", err
        assert "not supported" in err["error"]["message"], err
    for logprobs in (False, None):
        status, resp = _post(server, {"messages": user("hi"), "logprobs": logprobs, "max_tokens": 2, "temperature": 0})
        assert status == 200 and resp["usage"]["completion_tokens"] >= 1, resp


def test_a_slow_reader_does_not_stall_others(client) -> None:
    stream = client.chat.completions.create(
        model="x", messages=user("Once upon a time"), max_tokens=40, temperature=0, stream=True
    )
    first = next(iter(stream))  # then stop reading for a while
    assert first.choices[0].delta.role == "assistant"
    other = client.chat.completions.create(model="x", messages=user("hi"), max_tokens=30, temperature=0)
    assert other.choices[0].finish_reason in ("stop", "length")
    rest = list(stream)  # the paused stream still delivers its whole answer
    assert rest[-1].choices[0].finish_reason in ("stop", "length") and rest[-1].usage.completion_tokens >= 1


def test_a_body_over_the_limit_gets_413_and_the_server_keeps_serving(client) -> None:
    """The served app (not only the one built in-process) refuses a body over --max_body_mb (default 4 MB)."""
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="x", messages=user("x" * (4 * 2**20)), max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["type"] == "invalid_request_error", e.value.body
    assert "limit of 4 MB" in e.value.message and "--max_body_mb" in e.value.message, e.value.message
    resp = client.chat.completions.create(model="x", messages=user("hi"), max_tokens=2, temperature=0)
    assert resp.usage.completion_tokens >= 1


def test_a_refused_body_does_not_reset_a_urllib_client(server: str) -> None:
    """A client that writes its whole body before it reads the answer (urllib, http.client) got ECONNRESET instead
    of the 413: the server closed the connection on the unread body. The rest of the body is read now."""
    body = json.dumps({"messages": user("x" * (12 * 2**20)), "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{server}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and "limit of 4 MB" in json.loads(e.value.read())["error"]["message"]
