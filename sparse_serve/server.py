"""The OpenAI-compatible HTTP server (FastAPI): chat, completions, models, tokenize, health, metrics.

Contract: :func:`build_app` wires a loaded :class:`ServerState` into routes that follow
``shared/docs/serving.md``: OpenAI request/response shapes and error objects (400 for validation, not
422; 401, 404, 413, 429 with Retry-After, 500 without taking the server down, 503 while draining or
after the engine died), SSE streaming that ends with ``data: [DONE]``, Prometheus text on /metrics.
The engine runs in its own thread; handlers only tokenize, wait on outputs and format them.
:func:`serve` loads a checkpoint and runs uvicorn; SIGTERM drains running requests up to
``drain_timeout_s``, then aborts the rest (finish_reason "abort") and exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparse_serve import protocol as P
from sparse_serve.async_engine import AsyncEngine, EngineUnavailable, QueueFullError
from sparse_serve.config import EngineConfig, ModelConfig, ServerConfig
from sparse_serve.generation import ChoiceEvent, Generation, choice_events
from sparse_serve.metrics import PrometheusStatLogger

log = logging.getLogger("sparse_serve.server")


@dataclass
class ServerState:
    """What the routes need: the engine, the tokenizer, the model's name and facts, limits, metrics."""

    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    config: ServerConfig
    metrics: PrometheusStatLogger
    facts: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False

    @property
    def limits(self) -> P.Limits:
        c = self.config
        return P.Limits(max_n=c.max_n, max_stop=c.max_stop, max_top_logprobs=c.max_top_logprobs,
                        max_tokens=c.max_tokens_limit)

    @property
    def healthy(self) -> bool:
        return self.engine.alive and not self.draining


# -- errors ---------------------------------------------------------------------------------------
def _error_response(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers or None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.APIError)
    async def api_error(_: Request, err: P.APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(P.validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(P.APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error_response(P.APIError.internal(f"Internal server error: {type(err).__name__}: {err}"))


def _engine_error(err: Exception, retry_after: int) -> P.APIError:
    """The API error for an exception raised while admitting or running a request."""
    if isinstance(err, QueueFullError):
        return P.APIError.overloaded(str(err), retry_after=retry_after)
    if isinstance(err, EngineUnavailable):
        return P.APIError.unavailable(str(err), retry_after=retry_after)
    if isinstance(err, ValueError):
        return P.APIError.bad_request(str(err))
    log.error("request failed: %s", err)
    return P.APIError.internal(f"Internal server error: {err}")


# -- middleware: body size and API key ------------------------------------------------------------
class _Guard:
    """API key, then body size, as a pure ASGI middleware.

    Not ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware): once that has read the body, the
    handlers' ``request.is_disconnected()`` never sees the client leave, so a non-streamed request whose
    client hung up would keep generating. Here the body is read (bounded by ``max_request_bytes``) and
    replayed to the app, and every later ``receive`` - the disconnect - goes straight to the server.
    """

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self.protected: tuple[str, ...] = ("/v1/", "/tokenize", "/detokenize")
        if state.config.protect_metrics:
            self.protected += ("/metrics", "/health")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.key_digest is not None and scope["path"].startswith(self.protected):
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.key_digest):
                await _error_response(P.APIError.unauthorized())(scope, receive, send)
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.state.config.max_request_bytes
        size = headers.get("content-length", "")
        too_large = size.isdigit() and int(size) > limit
        chunks: list[bytes] = []
        total = 0
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            too_large = total > limit
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if too_large:
            await _error_response(P.APIError.too_large(
                f"request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"))(
                scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _install_middleware(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(_Guard, state=state)


# -- request preparation --------------------------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> None:
    if model and model != state.model_name:
        raise P.APIError.not_found(f"The model '{model}' does not exist; this server serves '{state.model_name}'.")


def _log_unknown(req: Any) -> None:
    unknown = P.unknown_fields(req)
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown))


def _chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _generation(state: ServerState, req: P.ChatCompletionRequest | P.CompletionRequest, prompt_ids: list[int],
                arrival: float) -> Generation:
    """Validated sampling parameters for one prompt; APIError 400 naming the problem."""
    try:
        max_tokens = P.check_context_length(len(prompt_ids), P.requested_max_tokens(req), state.engine.max_model_len)
        if state.config.max_tokens_limit is not None and P.requested_max_tokens(req) is None:
            max_tokens = min(max_tokens, state.config.max_tokens_limit)
        params = P.to_sampling_params(req, max_tokens)
        P.check_limits(params, state.limits)
    except ValueError as err:
        raise P.APIError.bad_request(str(err)) from err
    return Generation(f"{uuid.uuid4().hex}", prompt_ids, params, arrival)


def _tokenize_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return state.tokenizer(prompt)["input_ids"]
    vocab = len(state.tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise P.APIError.bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


# -- streaming and collection ---------------------------------------------------------------------
class Merged:
    """Several prompts' generations admitted together; iterating yields (prompt index, event) as they come.

    Admission happens in the constructor, so queue-full and shutdown errors surface before any response
    is sent. :meth:`close` aborts whatever is still generating (client gone, error, stop string).
    """

    def __init__(self, state: ServerState, gens: list[Generation], skip_special: bool):
        self.state, self.gens, self.skip_special = state, gens, skip_special
        self.streams = []
        self._tasks: list[asyncio.Task] = []
        try:
            for g in gens:
                self.streams.append(state.engine.add(g.request_id, g.prompt_ids, g.params, g.arrival))
        except Exception as err:
            self.close()
            raise _engine_error(err, state.config.retry_after_s) from err

    async def __aiter__(self) -> AsyncIterator[tuple[int, ChoiceEvent]]:
        if len(self.streams) == 1:  # one prompt (most requests): no task and queue per event in between
            try:
                async for event in self._events(0):
                    yield 0, event
            finally:
                self.close()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for event in self._events(i):
                    await queue.put((i, event))
            except Exception as err:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, err))
            finally:
                await queue.put((i, None))

        self._tasks = [asyncio.create_task(pump(i)) for i in range(len(self.streams))]
        try:
            remaining = len(self._tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            self.close()

    def _events(self, i: int) -> AsyncIterator[ChoiceEvent]:
        return choice_events(self.streams[i], self.state.tokenizer, self.gens[i], self.skip_special)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.close()


async def _collect(request: Request, merged: Merged, retry_after: int) -> list[tuple[int, ChoiceEvent]]:
    """All events, aborting the generation if the client goes away before it is done."""
    async def drain() -> list:
        return [item async for item in merged]

    task = asyncio.create_task(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise P.APIError(499, "client disconnected")
    except P.APIError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _engine_error(err, retry_after) from err
    finally:
        task.cancel()
        merged.close()


def _sse_stream(merged: Merged, render, final_chunks, retry_after: int) -> StreamingResponse:
    """SSE: ``render(item)`` chunks per event, then ``final_chunks()``, then [DONE]; errors go in-stream."""
    async def body() -> AsyncIterator[str]:
        try:
            async for item in merged:
                for chunk in render(item):
                    yield P.sse(chunk)
            for chunk in final_chunks():
                yield P.sse(chunk)
        except Exception as err:  # noqa: BLE001 - after the 200, errors go into the stream
            yield P.sse(_engine_error(err, retry_after).to_dict())
        finally:
            merged.close()
        yield P.SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- routes ---------------------------------------------------------------------------------------
def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state`` (see the module docstring)."""
    app = FastAPI(title="sparse-serve", version=state.facts.get("version", "0"))
    app.state.serve = state
    _install_error_handlers(app)
    _install_middleware(app, state)
    _add_info_routes(app, state)
    _add_chat_route(app, state)
    _add_completion_route(app, state)
    return app


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.healthy:
            return Response(status_code=200)
        reason = "draining" if state.draining else f"engine stopped: {state.engine.error}"
        return _error_response(P.APIError.unavailable(reason))

    @app.get("/version")
    async def version() -> dict:
        from compress.checkpoint.manifest import package_version

        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return P.model_list(state.model_name, state.engine.max_model_len, created=state.created,
                            compression=state.facts)

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest) -> dict:
        _check_model(state, req.model)
        if req.messages is not None:
            ids = _chat_prompt_ids(state.tokenizer, P.chat_messages(req.messages), req.add_generation_prompt)
        else:
            ids = state.tokenizer(req.prompt, add_special_tokens=req.wants_special_tokens())["input_ids"]
        return P.tokenize_response(ids, state.engine.max_model_len)

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest) -> dict:
        _check_model(state, req.model)
        _tokenize_prompt(state, req.tokens)  # range check
        return P.detokenize_response(state.tokenizer.decode(req.tokens))


def _add_chat_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_model(state, req.model)
        _log_unknown(req)
        prompt_ids = _chat_prompt_ids(state.tokenizer, P.chat_messages(req.messages), req.add_generation_prompt)
        gen = _generation(state, req, prompt_ids, arrival)
        rid, model, created = P.chat_completion_id(), state.model_name, int(time.time())
        top = gen.params.logprobs or 0
        merged = Merged(state, [gen], req.skip_special_tokens)

        def logprobs(event: ChoiceEvent) -> dict | None:
            return P.chat_logprobs(event.logprobs, state.tokenizer, top) if req.logprobs else None

        if req.stream:
            started: set[int] = set()

            def render(item: tuple[int, ChoiceEvent]) -> list[dict]:
                _, event = item
                chunks = []
                if event.index not in started:
                    started.add(event.index)
                    chunks.append(P.chat_chunk(rid, model, created, event.index, role="assistant", content=""))
                if event.text or event.finish_reason or (req.logprobs and event.logprobs):
                    chunks.append(P.chat_chunk(rid, model, created, event.index, content=event.text,
                                               finish_reason=event.finish_reason, logprobs=logprobs(event)))
                return chunks

            def final() -> list[dict]:
                usage = P.usage(len(prompt_ids), gen.completion_tokens)
                return [P.chat_usage_chunk(rid, model, created, usage)] if req.include_usage else []

            return _sse_stream(merged, render, final, state.config.retry_after_s)
        items = await _collect(request, merged, state.config.retry_after_s)
        texts, reasons, lps = _gather_choices([e for _, e in items], gen.params.n)
        choices = [P.chat_choice(i, texts[i], reasons[i],
                                 P.chat_logprobs(lps[i], state.tokenizer, top) if req.logprobs else None)
                   for i in range(gen.params.n)]
        return JSONResponse(P.chat_completion_response(rid, model, choices, P.usage(len(prompt_ids),
                                                       gen.completion_tokens), created))


def _add_completion_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_model(state, req.model)
        _log_unknown(req)
        gens = [_generation(state, req, _tokenize_prompt(state, p), arrival) for p in req.prompts]
        n, rid, model, created = gens[0].params.n, P.completion_id(), state.model_name, int(time.time())
        top = gens[0].params.logprobs
        merged = Merged(state, gens, req.skip_special_tokens)
        offsets: dict[int, int] = {}

        def logprobs(index: int, event: ChoiceEvent) -> dict | None:
            if top is None:
                return None
            out = P.completion_logprobs(event.logprobs, state.tokenizer, top, offsets.get(index, 0))
            return out

        def usage() -> dict:
            return P.usage(sum(len(g.prompt_ids) for g in gens), sum(g.completion_tokens for g in gens))

        if req.stream:
            def render(item: tuple[int, ChoiceEvent]) -> list[dict]:
                p, event = item
                index = p * n + event.index
                chunk = P.completion_chunk(rid, model, created, index, event.text, event.finish_reason,
                                           logprobs(index, event))
                offsets[index] = offsets.get(index, 0) + len(event.text)
                return [chunk] if event.text or event.finish_reason else []

            def final() -> list[dict]:
                return [P.completion_usage_chunk(rid, model, created, usage())] if req.include_usage else []

            return _sse_stream(merged, render, final, state.config.retry_after_s)
        items = await _collect(request, merged, state.config.retry_after_s)
        choices = []
        for p in range(len(gens)):
            texts, reasons, lps = _gather_choices([e for i, e in items if i == p], n)
            for c in range(n):
                lp = P.completion_logprobs(lps[c], state.tokenizer, top) if top is not None else None
                choices.append(P.completion_choice(p * n + c, texts[c], reasons[c], lp))
        return JSONResponse(P.completion_response(rid, model, choices, usage(), created))


def _gather_choices(events: list[ChoiceEvent], n: int) -> tuple[list[str], list[str | None], list[list]]:
    texts, reasons, lps = [""] * n, [None] * n, [[] for _ in range(n)]
    for e in events:
        texts[e.index] += e.text
        reasons[e.index] = e.finish_reason or reasons[e.index]
        lps[e.index].extend(e.logprobs)
    return texts, reasons, lps

# -- lifecycle ------------------------------------------------------------------------------------
def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a turn: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids


def load_state(model_cfg: ModelConfig, engine_cfg: EngineConfig, server_cfg: ServerConfig) -> ServerState:
    """Load the checkpoint and build the engine and the metrics exporter (the engine loop is not running yet:
    :func:`serve` runs it, or call ``state.engine.start()`` for a background thread)."""
    import torch

    from compress.models.registry import resolve_model
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving

    path = resolve_model(model_cfg.model)
    dtype = getattr(torch, model_cfg.dtype)
    loaded = load_for_serving(path, dtype=dtype, dense=model_cfg.dense, kernel=model_cfg.kernel,
                              dense_gemv=model_cfg.dense_gemv, huge_pages=model_cfg.huge_pages,
                              argmax_screen=model_cfg.argmax_screen)
    config = loaded.model.config
    max_len = model_cfg.max_model_len or min(getattr(config, "max_position_embeddings", 2048), 8192)
    engine = LLMEngine(loaded.model, eos_token_ids(loaded.model, loaded.tokenizer), max_len, engine_cfg, dtype)
    name = model_cfg.served_model_name or Path(str(model_cfg.model)).name
    variant = model_cfg.variant or loaded.variant
    facts = {**loaded.facts, "variant": variant, "dtype": model_cfg.dtype}
    metrics = PrometheusStatLogger(name, variant, info=facts, max_model_len=engine.max_model_len)
    async_engine = AsyncEngine(engine, engine_cfg.scheduler.max_waiting, on_step=metrics.record)
    log.info("serving %s (%s) from %s: %d KV blocks of %d tokens, max_model_len %d; LM head argmax screen: %s",
             name, variant, path, engine.blocks.num_blocks, engine.blocks.block_size, engine.max_model_len,
             loaded.argmax_screen)
    return ServerState(async_engine, loaded.tokenizer, name, server_cfg, metrics, facts)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the engine on SIGTERM/SIGINT before exiting (a second signal forces exit)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Signal handler (any thread): drain first, exit when done; a second signal exits at once."""
        if self.state.draining or self.loop is None:
            self.force_exit = self.should_exit = True
            return
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: setattr(self, "_draining_task", self.loop.create_task(self._drain())))

    async def _drain(self) -> None:
        timeout = self.state.config.drain_timeout_s
        log.info("shutting down: draining running requests for up to %.0f s", timeout)
        await self.state.engine.shutdown(timeout)
        await asyncio.sleep(0.2)  # let the last chunks (finish_reason "abort") reach their clients
        self.should_exit = True


def serve(state: ServerState) -> None:
    """Run the server on ``state`` until SIGTERM/SIGINT, then drain and return.

    The engine loop runs in this (the main) thread and uvicorn in a second one: forward passes from a
    secondary thread ran at 0.6x the speed here. Signals arrive in the main thread and start the drain.
    """
    cfg = state.config
    config = uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_keep_alive=5, access_log=cfg.log_level == "debug")
    server = DrainingServer(config, state)
    http = threading.Thread(target=server.run, name="sparse-serve-http", daemon=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    http.start()
    state.engine.run(until=lambda: not http.is_alive())
    http.join(30)
