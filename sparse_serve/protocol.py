"""The OpenAI API as vLLM serves it: request models, their conversion to SamplingParams, errors, responses.

Contract:

- Request models are pydantic v2 with ``extra="allow"``: unknown fields are accepted and ignored, and
  :func:`unknown_fields` lists them (dotted paths) so the server can log them. Defaults are OpenAI's
  (``temperature=1``, ``top_p=1``, ``n=1``); an explicit ``null`` means the default; ``max_tokens=None``
  means "up to the context" (the server passes that number as ``default_max_tokens``).
- :func:`to_sampling_params` turns a chat or completions request into a validated
  :class:`~sparse_serve.sampling_params.SamplingParams`; every bad value or combination raises
  ``ValueError`` with a message naming the field (the server answers 400). :func:`check_limits` and
  :func:`check_context_length` apply the server's bounds the same way.
- :class:`APIError` is what handlers raise; ``to_dict()`` is the OpenAI error body.
- Response builders return plain JSON-ready dicts in OpenAI's exact shapes (ids ``chatcmpl-<hex>`` /
  ``cmpl-<hex>``); logprobs are converted from :class:`~sparse_serve.outputs.TokenLogprob` with the
  tokenizer, in the chat format or the legacy completions format. Logprobs are clamped to -9999.0
  (JSON has no -inf), as vLLM does.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparse_serve.outputs import TokenLogprob
from sparse_serve.sampling_params import SamplingParams

# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


class _Open(BaseModel):
    """Base of every request model: unknown fields are kept (in ``model_extra``) and ignored."""

    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported; only 'text' is")
        return self


class ChatMessage(_Open):
    """A chat message; ``content`` is a string, a list of text parts, or null (treated as "")."""

    role: str
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Open):
    include_usage: bool = False


# fields whose explicit null means "the OpenAI default"
_NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "min_p", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "ignore_eos", "min_tokens", "stream",
                       "include_stop_str_in_output", "skip_special_tokens")


class _SamplingRequest(_Open):
    """The sampling and stopping fields the chat and completions endpoints share (OpenAI + vLLM extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # vLLM extra; None, 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None

    @field_validator(*_NULL_MEANS_DEFAULT, mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # takes precedence over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extra

    @field_validator("logprobs", "add_generation_prompt", mode="before")
    @classmethod
    def _null_is_default_chat(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions (the legacy API): ``logprobs`` is the number of alternatives, not a flag."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # not supported: rejected by to_sampling_params when true
    suffix: str | None = None  # not supported: rejected when set
    best_of: int | None = None  # only best_of == n (no extra candidates) is supported

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be empty")
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(_Open):
    """POST /tokenize: exactly one of ``prompt`` and ``messages`` (then the chat template is applied)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (vLLM's defaults)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self

    def wants_special_tokens(self) -> bool:
        """Whether the tokenizer should add its special tokens (BOS...)."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.prompt is not None


class DetokenizeRequest(_Open):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The messages as ``[{"role", "content"}]`` for ``tokenizer.apply_chat_template``."""
    return [{"role": m.role, "content": m.text} for m in messages]


def unknown_fields(req: BaseModel) -> list[str]:
    """Dotted paths of the fields a request carried that no model declares (e.g. ``messages.0.name``)."""
    return sorted(_unknown(req, ""))


def _unknown(value: Any, path: str) -> list[str]:
    if isinstance(value, list):
        return [u for i, item in enumerate(value) for u in _unknown(item, f"{path}{i}.")]
    if not isinstance(value, BaseModel):
        return []
    found = [path + name for name in (value.model_extra or {})]
    for name in type(value).model_fields:
        found += _unknown(getattr(value, name), f"{path}{name}.")
    return found


# ---------------------------------------------------------------------------------------------------
# Conversion and limits
# ---------------------------------------------------------------------------------------------------


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The client's output-length cap (chat: ``max_completion_tokens`` over ``max_tokens``), or None."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def check_context_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The max_tokens to use: ``max_tokens``, or all the room left when None; ValueError if it does not fit.

    The messages state both numbers, as the spec asks (and vLLM / OpenAI word them).
    """
    if prompt_tokens >= max_model_len:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, your "
                         f"prompt is {prompt_tokens} tokens long, which leaves no room for the completion.")
    room = max_model_len - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                         f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                         f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")
    return max_tokens


def to_sampling_params(req: ChatCompletionRequest | CompletionRequest,
                       default_max_tokens: int) -> SamplingParams:
    """The request's SamplingParams, validated; ``default_max_tokens`` applies when the client gave none.

    Raises ``ValueError`` naming the field for out-of-range values and unsupported combinations.
    """
    if req.stream_options is not None and not req.stream:
        raise ValueError("stream_options can only be set when stream=true")
    if isinstance(req, ChatCompletionRequest):
        logprobs = _chat_logprobs_param(req)
    else:
        logprobs = _completion_logprobs_param(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise ValueError("stop: stop strings must not be empty")
    max_tokens = requested_max_tokens(req)
    return SamplingParams(
        n=req.n, max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        min_tokens=req.min_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k if req.top_k is not None else 0, min_p=req.min_p, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, logprobs=logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
    ).validate()


def _chat_logprobs_param(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise ValueError(f"top_logprobs={req.top_logprobs} must be >= 0")
    if req.top_logprobs and not req.logprobs:
        raise ValueError("top_logprobs requires logprobs=true")
    return (req.top_logprobs or 0) if req.logprobs else None


def _completion_logprobs_param(req: CompletionRequest) -> int | None:
    if req.echo:
        raise ValueError("echo=true is not supported")
    if req.suffix is not None:
        raise ValueError("suffix is not supported")
    if req.best_of is not None and req.best_of != req.n:
        raise ValueError(f"best_of={req.best_of} is not supported; only best_of == n ({req.n})")
    if req.logprobs is not None and req.logprobs < 0:
        raise ValueError(f"logprobs={req.logprobs} must be >= 0")
    return req.logprobs


@dataclass
class Limits:
    """The server's bounds on what one request may ask for (each breach is a 400 naming the field)."""

    max_n: int = 16
    max_stop: int = 16  # stop strings per request
    max_stop_len: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_top_logprobs: int = 20
    max_tokens: int | None = None  # None: only the context bounds it


def check_limits(params: SamplingParams, limits: Limits) -> None:
    """Raise ``ValueError`` naming the field and the limit for the first bound ``params`` exceeds."""
    longest_stop = max((len(s) for s in params.stop), default=0)
    checks = [
        ("n", params.n, limits.max_n),
        ("stop", len(params.stop), limits.max_stop),
        ("stop (length of a stop string)", longest_stop, limits.max_stop_len),
        ("stop_token_ids", len(params.stop_token_ids), limits.max_stop_token_ids),
        ("top_logprobs / logprobs", params.logprobs or 0, limits.max_top_logprobs),
        ("max_tokens", params.max_tokens, limits.max_tokens),
    ]
    for field, value, limit in checks:
        if limit is not None and value > limit:
            raise ValueError(f"{field}: {value} exceeds this server's limit of {limit}")


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and optional headers, e.g. Retry-After).

    ``type`` defaults from the status (:data:`ERROR_TYPES`); ``code`` defaults to the status, as in vLLM.
    """

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        fallback = "internal_error" if status >= 500 else "invalid_request_error"
        self.type = type or ERROR_TYPES.get(status, fallback)
        self.param = param
        self.code = status if code is None else code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> "APIError":
        return cls(400, message, param=param)

    @classmethod
    def not_found(cls, message: str) -> "APIError":
        return cls(404, message)

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key.") -> "APIError":
        return cls(401, message)

    @classmethod
    def too_large(cls, message: str) -> "APIError":
        return cls(413, message)

    @classmethod
    def overloaded(cls, message: str, retry_after: int = 1, status: int = 429) -> "APIError":
        return cls(status, message, headers={"Retry-After": str(retry_after)})

    @classmethod
    def internal(cls, message: str = "Internal server error.") -> "APIError":
        return cls(500, message)

    @classmethod
    def unavailable(cls, message: str, retry_after: int | None = None) -> "APIError":
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return cls(503, message, headers=headers)


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """A 400 from pydantic's (or FastAPI's) ``exc.errors()``: the first error's field and message."""
    if not errors:
        return APIError.bad_request("invalid request")
    loc = [str(part) for part in errors[0].get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    msg = str(errors[0].get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError.bad_request(f"{param}: {msg}{more}" if param else msg + more, param=param)


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------

SSE_DONE = "data: [DONE]\n\n"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


# Characters JSON leaves raw but str.splitlines() breaks lines at, as SSE clients built on it do (httpx's
# iter_lines): a token that decodes to one of them would cut its event in two.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any]) -> str:
    """One server-sent event: ``data: <json>\\n\\n``, UTF-8, with the line separators JSON would keep raw
    (NEL, U+2028, U+2029) escaped, so the event is one line for every client."""
    text = json.dumps(data, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS_JSON_KEEPS)
    return f"data: {text}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_choice(index: int, text: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a non-streamed chat completion."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_completion_response(request_id: str, model: str, choices: list[dict[str, Any]],
                             usage: dict[str, int], created: int | None = None) -> dict[str, Any]:
    """``{"object": "chat.completion", ...}``; ``choices`` from :func:`chat_choice`."""
    return {"id": request_id, "object": "chat.completion", "created": _now(created), "model": model,
            "choices": choices, "usage": usage}


def chat_chunk(request_id: str, model: str, created: int, index: int = 0, *, role: str | None = None,
               content: str | None = None, finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed chat chunk with one choice whose delta carries ``role`` and/or ``content`` when given.

    The first chunk of a choice is ``chat_chunk(..., role="assistant", content="")``.
    """
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def chat_usage_chunk(request_id: str, model: str, created: int, usage: dict[str, int]) -> dict[str, Any]:
    """The last chat chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a completions response (streamed chunks carry the same shape, with the delta text)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(request_id: str, model: str, choices: list[dict[str, Any]],
                        usage: dict[str, int], created: int | None = None) -> dict[str, Any]:
    """``{"object": "text_completion", ...}``; ``choices`` from :func:`completion_choice`."""
    return {"id": request_id, "object": "text_completion", "created": _now(created), "model": model,
            "choices": choices, "usage": usage}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed completions chunk (OpenAI uses ``object: "text_completion"`` for chunks too)."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(index, text, finish_reason, logprobs)]}


def completion_usage_chunk(request_id: str, model: str, created: int, usage: dict[str, int]) -> dict[str, Any]:
    """The last completions chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": usage}


def model_list(model_id: str, max_model_len: int, created: int | None = None, owned_by: str = "sparse-serve",
               **extra: Any) -> dict[str, Any]:
    """GET /v1/models with one model; ``extra`` adds fields (method, sparsity, structure...)."""
    card = {"id": model_id, "object": "model", "created": _now(created), "owned_by": owned_by,
            "root": model_id, "parent": None, "max_model_len": max_model_len, **extra}
    return {"object": "list", "data": [card]}


def tokenize_response(tokens: list[int], max_model_len: int) -> dict[str, Any]:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}


def detokenize_response(prompt: str) -> dict[str, str]:
    return {"prompt": prompt}


def _now(created: int | None) -> int:
    return int(time.time()) if created is None else created


# ---------------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------------

MIN_LOGPROB = -9999.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """Cached text and raw bytes of single tokens (special tokens as their text)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        """The token decoded alone (a piece of a multi-byte character decodes to U+FFFD, as in vLLM)."""
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._text[token_id]

    def bytes(self, token_id: int) -> bytes:
        """The token's raw UTF-8 bytes, exact also for byte-level and byte-fallback pieces of a character."""
        if token_id not in self._bytes:
            self._bytes[token_id] = self._raw_bytes(token_id)
        return self._bytes[token_id]

    def _raw_bytes(self, token_id: int) -> bytes:
        text = self.text(token_id)
        if "\ufffd" not in text:
            return text.encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if (m := _BYTE_FALLBACK.fullmatch(piece)) is not None:  # SentencePiece byte fallback
                return bytes([int(m.group(1), 16)])
            if piece and all(c in _BYTE_OF_CHAR for c in piece):  # byte-level BPE
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return text.encode()


_STRINGS: "weakref.WeakKeyDictionary[Any, TokenStrings]" = weakref.WeakKeyDictionary()


def token_strings(tokenizer: Any) -> TokenStrings:
    """The (cached, per tokenizer) :class:`TokenStrings`."""
    try:
        strings = _STRINGS.get(tokenizer)
        if strings is None:
            strings = _STRINGS[tokenizer] = TokenStrings(tokenizer)
        return strings
    except TypeError:  # not weak-referenceable
        return TokenStrings(tokenizer)


def _clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) else max(float(logprob), MIN_LOGPROB)


def chat_logprobs(entries: Sequence[TokenLogprob], tokenizer: Any, top_logprobs: int) -> dict[str, Any]:
    """OpenAI chat logprobs: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    strings = token_strings(tokenizer)

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": strings.text(token_id), "logprob": _clamp(logprob),
                "bytes": list(strings.bytes(token_id))}

    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top_logprobs]]}
               for e in entries]
    return {"content": content}


def completion_logprobs(entries: Sequence[TokenLogprob], tokenizer: Any, top_logprobs: int,
                        text_offset: int = 0, skip_special_tokens: bool = True) -> dict[str, Any]:
    """Legacy completions logprobs: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

    ``top_logprobs[i]`` maps token text to logprob for the best ``top_logprobs`` alternatives plus the
    sampled token. ``text_offset[i]`` is the character offset of token i in the choice's text, starting at
    ``text_offset`` (pass the length of the text already streamed); a token that continues a multi-byte
    character gets that character's offset; skipped special tokens take no room.
    """
    strings = token_strings(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) if skip_special_tokens else set()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for e in entries:
        out["tokens"].append(strings.text(e.token_id))
        out["token_logprobs"].append(_clamp(e.logprob))
        top: dict[str, float] = {}
        for token_id, logprob in [*e.top[:top_logprobs], (e.token_id, e.logprob)]:
            top.setdefault(strings.text(token_id), _clamp(logprob))  # best first; the best wins a clash
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        if e.token_id not in special:
            offset += len(utf8.decode(strings.bytes(e.token_id)))
    return out
