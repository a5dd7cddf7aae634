"""End to end: the real OpenAI-compatible server (uvicorn on 127.0.0.1) serving the tiny model, spoken to
with the official ``openai`` client and raw HTTP (httpx), checked against ``shared/docs/serving.md``:
response and SSE shapes, streamed == non-streamed text, n / several prompts / token-id prompts, seeds,
logprobs, stop strings, every error status with the OpenAI error body, abort on client disconnect, the
Prometheus metrics, the info routes, and graceful shutdown of the CLI server on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from sparse_serve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from sparse_serve.server import DrainingServer, ServerState, build_app, load_state

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 30.0
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
MAX_LEN = 4096  # RoPE is computed on the fly, so the tiny model serves past its 512 positions
API_KEY = "sekret-key"
ERROR_KEYS = {"message", "type", "param", "code"}


# -- running servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, alive=lambda: True, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), "the server stopped before it became healthy"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{base}/health never answered 200")


@dataclass
class Running:
    state: ServerState
    base: str

    @property
    def name(self) -> str:
        return self.state.model_name

    @property
    def core(self):
        """The engine core (LLMEngine) behind the async engine."""
        return self.state.engine.engine

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(f"{self.base}{path}", json=body, timeout=kw.pop("timeout", TIMEOUT), **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", timeout=TIMEOUT, **kw)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Whether, within ``timeout``, no request is left in the engine and every KV block is free."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.core.num_unfinished == 0 and self.core.blocks.num_free == self.core.blocks.num_blocks:
                return True
            time.sleep(0.02)
        return False


@contextmanager
def running_server(model_dir, scheduler: SchedulerConfig | None = None, **server_fields) -> Iterator[Running]:
    port = free_port()
    engine_cfg = EngineConfig(cache=CacheConfig(num_blocks=1024), scheduler=scheduler or SchedulerConfig())
    state = load_state(ModelConfig(model=str(model_dir), dtype="float32", max_model_len=MAX_LEN), engine_cfg,
                       ServerConfig(port=port, log_level="warning", **server_fields))
    state.engine.start()  # sparse-serve runs the engine loop in its main thread; here a background thread
    server = DrainingServer(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"),
                            state)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", thread.is_alive)
        yield Running(state, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(15)
        asyncio.run(state.engine.shutdown(0))  # stop the engine thread too
        assert not state.engine.alive


@pytest.fixture(scope="module")
def srv(tiny_model_dir) -> Iterator[Running]:
    """The shared server: default limits, a 4096-token context."""
    with running_server(tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def secured(tiny_model_dir) -> Iterator[Running]:
    with running_server(tiny_model_dir, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def tight(tiny_model_dir) -> Iterator[Running]:
    """One running sequence, no waiting room, a 2 KiB request limit."""
    with running_server(tiny_model_dir, SchedulerConfig(max_num_seqs=1, max_waiting=0),
                        max_request_bytes=2048) as running:
        yield running


# -- helpers --------------------------------------------------------------------------------------
def sse_events(raw: bytes) -> list[str]:
    """The data payloads of a complete SSE body, checking the framing of every event."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payloads.append(event[len("data: "):])
    assert payloads.count("[DONE]") == 1
    return payloads


def stream_raw(run: Running, path: str, body: dict) -> list[dict]:
    """POST with stream=true; the JSON chunks (the trailing [DONE] checked and dropped)."""
    with httpx.stream("POST", f"{run.base}{path}", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(r.read())
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert ERROR_KEYS <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    return err


def chat_body(run: Running, **fields) -> dict:
    return {"model": run.name, "messages": MESSAGES, "temperature": 0, "max_tokens": 12, "ignore_eos": True,
            **fields}


def metric_samples(run: Running) -> dict[str, list]:
    r = run.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def metric_value(run: Running, name: str, **labels) -> float:
    return sum(s.value for s in metric_samples(run).get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


# -- 1. chat completions --------------------------------------------------------------------------
def test_chat_completion_shape_usage_and_length(srv, tiny_tokenizer):
    client = srv.client()
    resp = client.chat.completions.create(model=srv.name, messages=MESSAGES, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True, "unknown_vllm_field": 1})
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == srv.name and resp.created > 0
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content

    tok = srv.post("/tokenize", {"model": srv.name, "messages": MESSAGES}).json()
    templated = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tok["count"] == len(tok["tokens"]) == len(tiny_tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert tok["max_model_len"] == MAX_LEN
    assert resp.usage.prompt_tokens == tok["count"]
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == tok["count"] + 8

    # max_completion_tokens takes precedence over max_tokens
    r = srv.post("/v1/chat/completions", chat_body(srv, max_tokens=50, max_completion_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# -- 2. streaming ---------------------------------------------------------------------------------
def test_chat_stream_raw_sse_matches_non_streamed(srv):
    body = chat_body(srv, max_tokens=24, stream_options={"include_usage": True})
    chunks = stream_raw(srv, "/v1/chat/completions", body)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == srv.name for c in chunks)

    first, *content, usage_chunk = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert content, "no content chunks"
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert usage_chunk["choices"] == []
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)

    r = srv.post("/v1/chat/completions", {k: v for k, v in body.items() if k != "stream_options"})
    assert r.status_code == 200
    plain = r.json()
    assert streamed == plain["choices"][0]["message"]["content"]
    assert usage_chunk["usage"] == plain["usage"]
    assert usage_chunk["usage"]["completion_tokens"] == 24

    # without include_usage there is no usage chunk, but still [DONE]
    chunks = stream_raw(srv, "/v1/chat/completions", chat_body(srv, max_tokens=4))
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_stream_raw_sse_matches_non_streamed(srv):
    body = {"model": srv.name, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    chunks = stream_raw(srv, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "text_completion" for c in chunks)
    *content, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 20
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in content)

    plain = srv.post("/v1/completions", body).json()
    assert plain["object"] == "text_completion" and plain["id"].startswith("cmpl-")
    assert streamed == plain["choices"][0]["text"]
    assert plain["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["usage"] == plain["usage"]


def test_openai_client_stream(srv):
    client = srv.client()
    kwargs = dict(model=srv.name, messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    plain = client.chat.completions.create(**kwargs)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


# -- 3. completions: several prompts, n, token ids, seeds -----------------------------------------
def test_completions_prompts_times_n(srv):
    prompts = ["Once upon a time", "The capital of France is"]
    body = {"model": srv.name, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    singles = [srv.post("/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    assert singles[0] != singles[1], "pick prompts with different greedy continuations"

    resp = srv.client().completions.create(prompt=prompts, n=2, model=srv.name, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert all(c.finish_reason == "length" for c in resp.choices)
    counts = [srv.post("/tokenize", {"model": srv.name, "prompt": p}).json()["count"] for p in prompts]
    assert resp.usage.prompt_tokens == sum(counts)
    assert resp.usage.completion_tokens == 4 * 6


def test_completions_token_id_prompt(srv):
    body = {"model": srv.name, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    ids = srv.post("/tokenize", {"model": srv.name, "prompt": "Once upon a time"}).json()["tokens"]
    by_text = srv.post("/v1/completions", {**body, "prompt": "Once upon a time"}).json()
    by_ids = srv.client().completions.create(prompt=ids, model=srv.name, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text["choices"][0]["text"]
    assert by_ids.usage.prompt_tokens == len(ids) == by_text["usage"]["prompt_tokens"]

    # a list of token-id prompts
    two = srv.post("/v1/completions", {**body, "prompt": [ids, ids[:-1]]}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_seeded_sampling_is_reproducible(srv):
    def sample(seed: int) -> str:
        r = srv.post("/v1/completions", {"model": srv.name, "prompt": "Once upon a time", "max_tokens": 16,
                                         "temperature": 1.0, "seed": seed, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert sample(1234) == sample(1234)
    chat = [srv.client().chat.completions.create(model=srv.name, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                 seed=7, extra_body={"ignore_eos": True}).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1]
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1, "the seed does not change the sample"


# -- 4. logprobs ----------------------------------------------------------------------------------
def test_chat_logprobs(srv):
    resp = srv.client().chat.completions.create(model=srv.name, messages=MESSAGES, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-5)  # greedy picks the best
        assert isinstance(entry.bytes, list)
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined == resp.choices[0].message.content

    # without logprobs: none
    plain = srv.post("/v1/chat/completions", chat_body(srv, max_tokens=2)).json()
    assert plain["choices"][0]["logprobs"] is None


def test_completion_logprobs(srv):
    resp = srv.client().completions.create(model=srv.name, prompt="Once upon a time", max_tokens=8, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3  # the 2 best plus the sampled token (here one of them)
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)


# -- 5. stop strings ------------------------------------------------------------------------------
def _pick_stop(text: str) -> str:
    middle = len(text) // 3
    for size in (3, 2):
        for i in range(middle, len(text) - size):
            window = text[i:i + size]
            if window.isascii() and window.isprintable() and not window.isspace():
                return window
    for i in range(middle, len(text) - 2):
        if "\ufffd" not in text[i:i + 2]:
            return text[i:i + 2]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string(srv):
    body = {"model": srv.name, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = srv.post("/v1/completions", body).json()["choices"][0]
    assert full["finish_reason"] == "length"
    stop = _pick_stop(full["text"])
    expected = full["text"][:full["text"].index(stop)]

    cut = srv.post("/v1/completions", {**body, "stop": stop}).json()["choices"][0]
    assert cut["text"] == expected
    assert cut["finish_reason"] == "stop"

    chunks = stream_raw(srv, "/v1/completions", {**body, "stop": [stop, "\x00never"]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    with_stop = srv.post("/v1/completions", {**body, "stop": stop, "include_stop_str_in_output": True}).json()
    assert with_stop["choices"][0]["text"] == expected + stop
    assert srv.wait_idle(), "a request cut by a stop string was not released"


# -- 6. errors ------------------------------------------------------------------------------------
def test_validation_errors_are_400(srv):
    err = assert_error(srv.post("/v1/chat/completions", chat_body(srv, temperature=-1)), 400, "temperature")
    assert err["type"] == "BadRequestError" or "invalid" in err["type"].lower()
    assert_error(srv.post("/v1/chat/completions", {"model": srv.name, "max_tokens": 3}), 400, "messages")
    assert_error(srv.post("/v1/chat/completions", chat_body(srv, messages=[])), 400)
    assert_error(srv.post("/v1/completions", {"model": srv.name, "prompt": "x", "n": "lots"}), 400)
    r = httpx.post(f"{srv.base}/v1/chat/completions", content=b"{not json", timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    assert_error(r, 400)
    with pytest.raises(openai.BadRequestError):
        srv.client().chat.completions.create(model=srv.name, messages=MESSAGES, max_tokens=2, top_p=5.0)


def test_unknown_model_is_404(srv):
    assert_error(srv.post("/v1/chat/completions", chat_body(srv, model="no-such-model")), 404, "no-such-model")
    assert_error(srv.post("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 1}), 404)
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_context_overflow_is_400_naming_both_numbers(srv):
    prompt_len = srv.post("/tokenize", {"model": srv.name, "messages": MESSAGES}).json()["count"]
    asked = MAX_LEN - prompt_len + 5
    err = assert_error(srv.post("/v1/chat/completions", chat_body(srv, max_tokens=asked)), 400,
                       str(MAX_LEN), str(asked))
    assert err["code"] == 400 or err["code"] is None or isinstance(err["code"], (int, str))

    long_prompt = "a" * (MAX_LEN + 10)
    count = srv.post("/tokenize", {"model": srv.name, "prompt": long_prompt}).json()["count"]
    assert count > MAX_LEN
    assert_error(srv.post("/v1/completions", {"model": srv.name, "prompt": long_prompt, "max_tokens": 1}), 400,
                 str(MAX_LEN), str(count))
    assert srv.wait_idle()


def test_request_too_large_is_413(tight):
    small = {"model": tight.name, "prompt": "hi", "max_tokens": 1}
    assert tight.post("/v1/completions", small).status_code == 200
    big = {**small, "prompt": "x" * 3000}
    assert_error(tight.post("/v1/completions", big), 413, "2048")
    assert_error(tight.post("/v1/chat/completions", {"model": tight.name, "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "y" * 3000}]}), 413)
    # no content-length (chunked upload): counted while reading
    r = httpx.post(f"{tight.base}/v1/completions", content=iter([b'{"prompt": "', b"z" * 3000, b'"}']),
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert "content-length" not in r.request.headers
    assert_error(r, 413)
    r = httpx.post(f"{tight.base}/v1/completions", content=iter([b'{"prompt": "hi", ', b'"max_tokens": 1}']),
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert tight.get("/health").status_code == 200


def test_api_key(secured):
    assert secured.get("/health").status_code == 200
    assert secured.get("/metrics").status_code == 200
    assert_error(secured.get("/v1/models"), 401)
    assert_error(secured.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(secured.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}), 401)
    assert_error(secured.post("/v1/chat/completions", chat_body(secured), headers={"Authorization": "Bearer wrong"}),
                 401)
    assert_error(secured.post("/tokenize", {"prompt": "hi"}), 401)
    with pytest.raises(openai.AuthenticationError):
        secured.client("wrong").models.list()
    ok = secured.client(API_KEY)
    assert [m.id for m in ok.models.list().data] == [secured.name]
    resp = ok.chat.completions.create(model=secured.name, messages=MESSAGES, max_tokens=2)
    assert resp.usage.completion_tokens <= 2


def test_queue_full_is_429_with_retry_after(tight):
    body = {"model": tight.name, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tight.base}/v1/completions", json=body, timeout=TIMEOUT) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert tight.core.num_unfinished == 1

        r = tight.post("/v1/completions", {**body, "stream": False, "max_tokens": 2})
        assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        r = tight.post("/v1/chat/completions", chat_body(tight, stream=True))
        assert_error(r, 429)
        assert "retry-after" in r.headers
    assert tight.wait_idle(), "closing the stream did not free the engine"
    r = tight.post("/v1/completions", {**body, "stream": False, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.fixture()
def failing_forward(srv, monkeypatch):
    """Make the next ``times`` forward passes raise; the count of failures raised so far."""
    runner = srv.core.runner
    original = runner.execute
    state = {"left": 0, "raised": 0}

    def execute(chunks, argmax=False):
        if state["left"] > 0:
            state["left"] -= 1
            state["raised"] += 1
            raise RuntimeError("injected forward failure")
        return original(chunks, argmax)

    monkeypatch.setattr(runner, "execute", execute)
    return state


def test_forward_failure_is_500_and_server_keeps_serving(srv, failing_forward):
    failing_forward["left"] = 1
    err = assert_error(srv.post("/v1/chat/completions", chat_body(srv, max_tokens=4)), 500)
    assert failing_forward["raised"] == 1
    assert "injected forward failure" in err["message"] or err["type"]
    assert srv.wait_idle()
    assert srv.get("/health").status_code == 200
    ok = srv.post("/v1/chat/completions", chat_body(srv, max_tokens=4))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4

    # after the 200 of a stream, the error goes into the stream, then [DONE]
    failing_forward["left"] = 1
    with httpx.stream("POST", f"{srv.base}/v1/chat/completions", json=chat_body(srv, max_tokens=4, stream=True),
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200
        payloads = sse_events(r.read())
    assert failing_forward["raised"] == 2
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert set(error) == {"error"} and ERROR_KEYS <= set(error["error"])
    assert srv.wait_idle()
    assert srv.get("/health").status_code == 200
    assert srv.post("/v1/completions", {"model": srv.name, "prompt": "hi", "max_tokens": 2}).status_code == 200


# -- 7. client disconnect -------------------------------------------------------------------------
def test_stream_disconnect_frees_blocks(srv):
    assert srv.wait_idle()
    body = chat_body(srv, max_tokens=4000, stream=True)
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", f"{srv.base}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 3:
                        break
            assert srv.core.num_unfinished == 1
            assert srv.core.blocks.num_free < srv.core.blocks.num_blocks
    # the client is gone: 4000 tokens would take far longer than this
    assert srv.wait_idle(5.0), (srv.core.num_unfinished, srv.core.blocks.num_free)


def test_non_streamed_disconnect_frees_blocks(srv):
    assert srv.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        srv.post("/v1/completions", {"model": srv.name, "prompt": "Once upon a time", "max_tokens": 4000,
                                     "ignore_eos": True}, timeout=httpx.Timeout(TIMEOUT, read=0.7))
    assert srv.wait_idle(5.0), (srv.core.num_unfinished, srv.core.blocks.num_free)
    assert srv.get("/health").status_code == 200


# -- 8. metrics -----------------------------------------------------------------------------------
def test_metrics(srv):
    assert srv.wait_idle(), "an earlier request is still generating"
    labels = {"model_name": srv.name}
    before = metric_value(srv, "vllm:generation_tokens_total", **labels)
    prompt_before = metric_value(srv, "vllm:prompt_tokens_total", **labels)
    length_before = metric_value(srv, "vllm:request_success_total", finished_reason="length", **labels)
    r = srv.post("/v1/completions", {"model": srv.name, "prompt": "Once upon a time", "max_tokens": 7,
                                     "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 7

    deadline = time.monotonic() + 5
    while (metric_value(srv, "vllm:request_success_total", finished_reason="length", **labels) < length_before + 1
           and time.monotonic() < deadline):
        time.sleep(0.02)
    samples = metric_samples(srv)
    assert metric_value(srv, "vllm:generation_tokens_total", **labels) == before + 7
    assert metric_value(srv, "vllm:prompt_tokens_total", **labels) == prompt_before + r.json()["usage"]["prompt_tokens"]
    assert metric_value(srv, "vllm:request_success_total", finished_reason="length", **labels) == length_before + 1

    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds"):
        counts = samples.get(f"{name}_count")
        assert counts, f"{name} missing"
        assert sum(s.value for s in counts) > 0, name
        assert all(s.labels["model_name"] == srv.name and s.labels.get("variant") for s in counts)
        assert any(s.labels.get("le") == "+Inf" for s in samples[f"{name}_bucket"])
    ttft_buckets = {float(s.labels["le"]) for s in samples["vllm:time_to_first_token_seconds_bucket"]}
    assert {0.001, 0.04, 2560.0} <= ttft_buckets
    e2e_buckets = {float(s.labels["le"]) for s in samples["vllm:e2e_request_latency_seconds_bucket"]}
    assert {0.3, 0.8, 7680.0} <= e2e_buckets
    success = samples["vllm:request_success_total"]
    assert all("finished_reason" in s.labels and s.labels["variant"] for s in success)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert gauge in samples and all(s.labels["model_name"] == srv.name for s in samples[gauge])


# -- 9. info routes -------------------------------------------------------------------------------
def test_info_routes(srv):
    assert srv.get("/health").status_code == 200
    version = srv.get("/version").json()
    assert isinstance(version["version"], str) and version["version"]

    models = srv.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card["id"] == srv.name and card["object"] == "model" and card["owned_by"]
    assert isinstance(card["created"], int)
    assert card["max_model_len"] == MAX_LEN
    assert isinstance(card["compression"], dict)
    assert [m.id for m in srv.client().models.list().data] == [srv.name]

    text = "Hello, world! Grüße, ünïcödé 🙂"
    tok = srv.post("/tokenize", {"model": srv.name, "prompt": text}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    back = srv.post("/detokenize", {"model": srv.name, "tokens": tok["tokens"]}).json()
    assert back == {"prompt": text}
    assert_error(srv.post("/detokenize", {"model": srv.name, "tokens": [10**9]}), 400)
    assert_error(srv.post("/tokenize", {"model": "nope", "prompt": "x"}), 404)


# -- 10. graceful shutdown ------------------------------------------------------------------------
def test_sigterm_drains_then_aborts_and_exits_zero(tiny_model_dir, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "sparse_serve.cli", str(tiny_model_dir), "--port", str(port), "--dtype", "float32",
           "--drain-timeout-s", "1", "--log-level", "warning", "--max-model-len", str(MAX_LEN),
           "--num-blocks", "512"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_healthy(base, lambda: proc.poll() is None, timeout=90)
        payloads: list[str] = []
        started = threading.Event()
        failure: list[BaseException] = []

        def stream() -> None:
            try:
                body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            payloads.append(line[len("data: "):])
                            if len(payloads) >= 3:
                                started.set()
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                failure.append(err)
            finally:
                started.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(30) and not failure, failure
        proc.send_signal(signal.SIGTERM)

        # while draining: /health 503, new requests 503
        deadline = time.monotonic() + 5
        while httpx.get(f"{base}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503 on SIGTERM"
            time.sleep(0.01)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert_error(r, 503)

        reader.join(20)
        assert not reader.is_alive(), "the stream did not end after the drain timeout"
        assert not failure, failure
        assert payloads[-1] == "[DONE]"
        last = json.loads(payloads[-2])
        assert last["choices"][0]["finish_reason"] == "abort", last
        assert all(json.loads(p)["choices"][0]["finish_reason"] is None for p in payloads[:-2])
        assert proc.wait(timeout=20) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
