"""OpenAI protocol: request validation and defaults, conversion to SamplingParams, limits, errors, and
response shapes that the official openai package parses."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from sparse_serve.outputs import TokenLogprob
from sparse_serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, Limits, TokenizeRequest,
    SSE_DONE, chat_choice, chat_chunk, chat_completion_id, chat_completion_response, chat_logprobs,
    chat_messages, chat_usage_chunk, check_context_length, check_limits, completion_choice,
    completion_chunk, completion_id, completion_logprobs, completion_response, completion_usage_chunk,
    model_list, requested_max_tokens, sse, to_sampling_params, token_strings, unknown_fields, usage,
    validation_error,
)
from sparse_serve.sampling_params import SamplingParams

MSGS = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, **kw})


def comp(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


# -- requests -----------------------------------------------------------------------------------------

def test_openai_defaults():
    req = chat()
    assert (req.temperature, req.top_p, req.n, req.max_tokens, req.stream) == (1.0, 1.0, 1, None, False)
    nulls = chat(temperature=None, top_p=None, n=None, logprobs=None, stream=None)
    got = (nulls.temperature, nulls.top_p, nulls.n, nulls.logprobs, nulls.stream)
    assert got == (1.0, 1.0, 1, False, False)
    params = to_sampling_params(req, default_max_tokens=100)
    assert params == SamplingParams(n=1, max_tokens=100, temperature=1.0, top_p=1.0)


def test_content_parts_and_template_messages():
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert chat_messages(req.messages) == [{"role": "system", "content": ""},
                                           {"role": "user", "content": "a\nb"}]
    with pytest.raises(ValidationError, match="image_url"):
        ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m"})


def test_unknown_fields_are_accepted_and_listed():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi", "name": "bob"}], "logit_bias": {"1": 2},
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "response_format": {"type": "text"}})
    assert unknown_fields(req) == ["logit_bias", "messages.0.name", "response_format",
                                   "stream_options.continuous_usage_stats"]
    assert unknown_fields(chat()) == []
    assert req.include_usage and not chat(stream=True).include_usage


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert comp(prompt=prompt).prompts == expected


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], None, {"x": 1}])
def test_bad_completion_prompts(prompt):
    with pytest.raises(ValidationError):
        comp(prompt=prompt)


def test_tokenize_and_detokenize_requests():
    assert TokenizeRequest.model_validate({"prompt": "hi"}).wants_special_tokens()
    chat_tok = TokenizeRequest.model_validate({"messages": MSGS})
    assert not chat_tok.wants_special_tokens() and chat_tok.add_generation_prompt
    no_special = TokenizeRequest.model_validate({"prompt": "x", "add_special_tokens": False})
    assert no_special.wants_special_tokens() is False
    for bad in ({}, {"prompt": "x", "messages": MSGS}):
        with pytest.raises(ValidationError, match="exactly one"):
            TokenizeRequest.model_validate(bad)
    assert DetokenizeRequest.model_validate({"model": "m", "tokens": [1, 2]}).tokens == [1, 2]
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": ["a"]})


# -- conversion ---------------------------------------------------------------------------------------

def test_sampling_fields_are_carried_over():
    params = to_sampling_params(chat(
        max_tokens=7, temperature=0, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop="\n", stop_token_ids=[9],
        n=2, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1, ignore_eos=True,
        min_tokens=2, include_stop_str_in_output=True), default_max_tokens=100)
    assert params == SamplingParams(n=2, max_tokens=7, min_tokens=2, temperature=0.0, top_p=0.9, top_k=5,
                                    min_p=0.1, seed=3, presence_penalty=0.5, frequency_penalty=-0.5,
                                    repetition_penalty=1.1, stop=["\n"], stop_token_ids=[9], ignore_eos=True,
                                    include_stop_str_in_output=True)
    assert params.greedy
    assert to_sampling_params(comp(stop=["a", "b"]), 5).stop == ["a", "b"]


def test_max_completion_tokens_takes_precedence():
    req = chat(max_tokens=10, max_completion_tokens=4)
    assert requested_max_tokens(req) == 4 and to_sampling_params(req, 100).max_tokens == 4
    assert to_sampling_params(chat(max_tokens=10), 100).max_tokens == 10
    assert requested_max_tokens(comp()) is None


def test_logprobs_conversion():
    assert to_sampling_params(chat(), 10).logprobs is None
    assert to_sampling_params(chat(logprobs=True), 10).logprobs == 0
    assert to_sampling_params(chat(logprobs=True, top_logprobs=5), 10).logprobs == 5
    assert to_sampling_params(chat(top_logprobs=0), 10).logprobs is None
    assert to_sampling_params(comp(logprobs=3), 10).logprobs == 3
    assert to_sampling_params(comp(logprobs=0), 10).logprobs == 0
    assert to_sampling_params(comp(), 10).logprobs is None


@pytest.mark.parametrize("make,match", [
    (lambda: chat(top_logprobs=3), "top_logprobs requires logprobs"),
    (lambda: chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (lambda: chat(stream_options={"include_usage": True}), "stream_options"),
    (lambda: chat(temperature=-1), "temperature"),
    (lambda: chat(top_p=0), "top_p"),
    (lambda: chat(n=0), "n=0"),
    (lambda: chat(max_tokens=0), "max_tokens"),
    (lambda: chat(max_tokens=3, min_tokens=5), "min_tokens"),
    (lambda: chat(stop=["ok", ""]), "stop"),
    (lambda: chat(presence_penalty=3), "presence_penalty"),
    (lambda: comp(echo=True), "echo"),
    (lambda: comp(suffix="x"), "suffix"),
    (lambda: comp(best_of=3), "best_of"),
    (lambda: comp(logprobs=-2), "logprobs"),
])
def test_bad_values_and_combinations(make, match):
    with pytest.raises(ValueError, match=match):
        to_sampling_params(make(), default_max_tokens=16)


def test_context_length_check_states_both_numbers():
    assert check_context_length(10, None, 64) == 54
    assert check_context_length(10, 54, 64) == 54
    with pytest.raises(ValueError, match=r"64 tokens.*70 tokens \(10 in the prompt, 60 for the completion\)"):
        check_context_length(10, 60, 64)
    with pytest.raises(ValueError, match=r"64 tokens.*prompt is 64 tokens"):
        check_context_length(64, None, 64)


@pytest.mark.parametrize("params,match", [
    (SamplingParams(n=17), "n: 17 exceeds this server's limit of 16"),
    (SamplingParams(stop=["x"] * 17), "stop: 17 exceeds .* 16"),
    (SamplingParams(stop=["x" * 257]), r"stop \(length of a stop string\): 257 exceeds .* 256"),
    (SamplingParams(stop_token_ids=list(range(65))), "stop_token_ids: 65 exceeds .* 64"),
    (SamplingParams(logprobs=21), "logprobs: 21 exceeds .* 20"),
])
def test_limits(params, match):
    with pytest.raises(ValueError, match=match):
        check_limits(params, Limits())


def test_limits_pass_and_max_tokens_cap():
    check_limits(SamplingParams(n=16, stop=["x" * 256] * 16, logprobs=20, max_tokens=10**6), Limits())
    with pytest.raises(ValueError, match="max_tokens: 101 exceeds this server's limit of 100"):
        check_limits(SamplingParams(max_tokens=101), Limits(max_tokens=100))


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
    (413, "request_too_large"), (429, "rate_limit_exceeded"), (500, "internal_error"),
    (503, "service_unavailable"),
])
def test_error_types(status, kind):
    err = APIError(status, "boom", param="x")
    assert err.to_dict() == {"error": {"message": "boom", "type": kind, "param": "x", "code": status}}


def test_error_helpers():
    assert APIError.overloaded("queue full", retry_after=2).headers == {"Retry-After": "2"}
    assert APIError.overloaded("queue full").status == 429
    assert APIError.not_found("no model 'x'").to_dict()["error"]["type"] == "not_found_error"
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": MSGS, "temperature": "hot"})
    err = validation_error(info.value.errors())
    assert err.status == 400 and err.param == "temperature" and "temperature" in err.message
    fastapi_style = [{"loc": ("body", "messages"), "msg": "Field required", "type": "missing"}]
    assert validation_error(fastapi_style).param == "messages"


# -- responses ----------------------------------------------------------------------------------------

def test_chat_completion_response_parses_with_openai(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hé", add_special_tokens=False)
    entries = [TokenLogprob(i, -0.5, [(i, -0.5), (70, -1.5), (71, float("-inf"))]) for i in ids]
    logprobs = chat_logprobs(entries, tiny_tokenizer, top_logprobs=2)
    body = chat_completion_response(chat_completion_id(), "m", [
        chat_choice(0, "hé", "stop", logprobs), chat_choice(1, "h", "length")], usage(5, 3), created=123)
    parsed = ChatCompletion.model_validate(json.loads(json.dumps(body)))
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "hé" and parsed.choices[0].message.role == "assistant"
    assert parsed.usage.total_tokens == 8 and parsed.created == 123
    content = parsed.choices[0].logprobs.content
    assert [c.token for c in content] == ["h", "\ufffd", "\ufffd"]  # é's two bytes decode alone to U+FFFD
    assert b"".join(bytes(c.bytes) for c in content) == "hé".encode()  # but the raw bytes are exact
    assert len(content[0].top_logprobs) == 2 and content[0].top_logprobs[1].logprob == -1.5


def test_chat_stream_chunks_parse_with_openai():
    rid = chat_completion_id()
    chunks = [chat_chunk(rid, "m", 1, role="assistant", content=""), chat_chunk(rid, "m", 1, content="Hi"),
              chat_chunk(rid, "m", 1, content="!", finish_reason="stop"),
              chat_usage_chunk(rid, "m", 1, usage(3, 2))]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert "".join(p.choices[0].delta.content for p in parsed[:3]) == "Hi!"
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[0].object == "chat.completion.chunk"
    assert parsed[3].choices == [] and parsed[3].usage.completion_tokens == 2
    event = sse(chunks[1])
    assert event.startswith("data: {") and event.endswith("\n\n") and json.loads(event[6:]) == chunks[1]
    assert SSE_DONE == "data: [DONE]\n\n"
    assert "é" in sse({"t": "é"})  # UTF-8, not \\u escapes


def test_sse_event_is_one_line_whatever_the_text():
    """Every character str.splitlines() breaks at (httpx's iter_lines does) stays inside one event line."""
    breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    data = {"choices": [{"text": f"a{breaks}b é"}]}
    event = sse(data)
    assert event[:-2].splitlines() == [event[:-2]] and event.endswith("\n\n")
    assert json.loads(event[len("data: "):]) == data


def test_completion_response_and_chunks_parse_with_openai(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a世", add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    entries = [TokenLogprob(i, -0.25, [(i, -0.25), (70, -2.0)]) for i in ids]
    logprobs = completion_logprobs(entries, tiny_tokenizer, top_logprobs=1, text_offset=10)
    body = completion_response(completion_id(), "m", [completion_choice(0, "a世", "length", logprobs)],
                               usage(2, 5))
    parsed = Completion.model_validate(body)
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    lp = parsed.choices[0].logprobs
    assert lp.tokens[0] == "a" and lp.tokens[-1] == "<|im_end|>" and lp.token_logprobs == [-0.25] * 5
    assert lp.text_offset == [10, 11, 11, 11, 12]  # the three bytes of 世 start at its offset
    assert lp.top_logprobs[0] == {"a": -0.25}
    last = Completion.model_validate(completion_chunk(completion_id(), "m", 1, 0, "x", "stop"))
    assert last.choices[0].text == "x" and last.choices[0].finish_reason == "stop"
    mid = completion_chunk("cmpl-1", "m", 1, 0, "x")
    assert mid["choices"][0]["finish_reason"] is None and mid["object"] == "text_completion"
    tail = Completion.model_validate(completion_usage_chunk("cmpl-1", "m", 1, usage(1, 1)))
    assert tail.choices == [] and tail.usage.total_tokens == 2


def test_legacy_top_logprobs_include_the_sampled_token(tiny_tokenizer):
    a, b, c = (tiny_tokenizer.encode(x, add_special_tokens=False)[0] for x in "abc")
    lp = completion_logprobs([TokenLogprob(c, -3.0, [(a, -0.1), (b, -0.2), (c, -3.0)])], tiny_tokenizer, 2)
    assert list(lp["top_logprobs"][0].items()) == [("a", -0.1), ("b", -0.2), ("c", -3.0)]
    assert token_strings(tiny_tokenizer) is token_strings(tiny_tokenizer)  # cached per tokenizer


def test_model_list_shape():
    body = model_list("tiny", 512, created=1, method="wanda", sparsity=0.5, structure="2:4")
    card = body["data"][0]
    assert body["object"] == "list" and card["object"] == "model" and card["id"] == "tiny"
    assert card["max_model_len"] == 512 and card["sparsity"] == 0.5 and card["owned_by"]
