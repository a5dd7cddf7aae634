"""Runs :class:`LLMEngine` in a loop of its own so the HTTP event loop never waits on a forward pass.

Contract: ``add(...)`` admits a request at once - raising :class:`QueueFullError` when the waiting
queue is full, :class:`EngineUnavailable` while draining or after the engine died, ``ValueError`` for
a prompt that does not fit - and returns a :class:`RequestStream` of its :class:`RequestOutput`s.
Closing the stream early (client disconnect, stop string, cancellation) aborts the request, which
frees its KV blocks at the next step boundary; ``generate`` wraps both in one async generator. ``shutdown(drain_timeout)`` stops admitting, lets running requests finish up to
the timeout, then aborts the rest (finish_reason "abort"). Every step's stats go to ``on_step``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sparse_serve.engine import LLMEngine
from sparse_serve.outputs import RequestOutput
from sparse_serve.sampling_params import SamplingParams
from sparse_serve.stats import StepStats

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or has died."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    sink: Callable[[RequestOutput | BaseException], None]


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """Async iterator over one request's outputs; :meth:`close` aborts the request unless it finished."""

    def __init__(self, engine: "AsyncEngine", request_id: str, outputs: asyncio.Queue):
        self.engine, self.request_id, self._outputs = engine, request_id, outputs
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """The engine thread, its command queue and per-request output queues."""

    def __init__(self, engine: LLMEngine, max_waiting: int, on_step: Callable[[StepStats], None] | None = None):
        self.engine, self.max_waiting, self.on_step = engine, max_waiting, on_step
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable] = {}
        self._pending = 0  # admitted, not yet running (waiting in the engine or in the command queue)
        self._lock = threading.Lock()
        self._draining = False
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._running = False
        self.error: BaseException | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def alive(self) -> bool:
        return self._running and self.error is None

    def start(self) -> "AsyncEngine":
        """Run the engine loop in a background thread (tests, embedding); see :meth:`run`."""
        self._running = True
        threading.Thread(target=self.run, name="sparse-serve-engine", daemon=True).start()
        return self

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The engine loop, in the calling thread, until shutdown or ``until()`` is true.

        ``sparse-serve`` runs it in the main thread and the HTTP server in another: forward passes
        issued from a secondary thread ran at 0.6x the speed on this machine (measured, 2 threads).
        """
        self._running = True
        try:
            while not self._stop.is_set() and not until():
                self._step_once()
        except BaseException as err:  # noqa: BLE001 - record why, fail everyone, let /health say 503
            log.exception("the engine loop died")
            self.error = err
            for sink in self._sinks.values():
                sink(EngineUnavailable(f"the engine stopped: {err}"))
            self._sinks.clear()
        finally:
            self._abort_all()
            self._refuse_queued()
            self._running = False
            self._stopped.set()

    # -- the API side ---------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            arrival: float | None = None) -> "RequestStream":
        """Admit a request now (errors raise here) and return the stream of its outputs."""
        self._admit(len(prompt_ids), params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._commands.put(_Add(request_id, list(prompt_ids), params, arrival or time.monotonic(), sink))
        return RequestStream(self, request_id, outputs)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       arrival: float | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs, step by step, until it finishes; leaving early aborts it."""
        stream = self.add(request_id, prompt_ids, params, arrival)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _admit(self, prompt_tokens: int, params: SamplingParams) -> None:
        if self._draining or not self.alive:
            raise EngineUnavailable("the server is shutting down" if self._draining else "the engine has stopped")
        params.validate()
        self.engine.check_length(prompt_tokens, params.max_tokens)
        scheduler = self.engine.scheduler
        with self._lock:
            waiting = self._pending + len(scheduler.waiting)
            if waiting >= self.max_waiting and waiting + len(scheduler.running) >= scheduler.config.max_num_seqs:
                raise QueueFullError(f"{waiting} requests are already waiting (limit {self.max_waiting}); retry later")
            self._pending += 1

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe; takes effect before the next step)."""
        self._commands.put(_Abort(request_id))

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop admitting, drain up to ``drain_timeout`` seconds, abort the rest, stop the thread."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while self.engine.num_unfinished and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        for request_id in list(self._sinks):
            self.abort(request_id)
        await asyncio.sleep(0)
        self._stop.set()
        self._commands.put(None)
        await asyncio.to_thread(self._stopped.wait, 10)

    def shutdown_now(self) -> None:
        """Stop at once: abort whatever runs (finish_reason "abort") and wait for the loop to end."""
        self._draining = True
        self._stop.set()
        self._commands.put(None)
        if self._running:
            self._stopped.wait(10)

    # -- the engine loop ------------------------------------------------------------------------
    def _step_once(self) -> None:
        self._take_commands(block=not self.engine.has_work())
        if self.engine.has_work():
            outputs, stats = self.engine.step()
            self._deliver(outputs)
        else:
            stats = self.engine.idle_stats()  # aborts while idle still reach the metrics
        if self.on_step is not None and stats is not None:
            self.on_step(stats)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Add):
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add_request(command.request_id, command.prompt_ids, command.params, command.arrival)
                self._sinks[command.request_id] = command.sink
            except Exception as err:  # noqa: BLE001 - the request fails, the engine lives
                command.sink(err)
        else:
            out = self.engine.abort(command.request_id)
            if out is not None:
                self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            sink(RuntimeError(out.error) if out.error else out)
            if out.finished or out.error:
                del self._sinks[out.request_id]

    def _refuse_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.sink(EngineUnavailable("the server is shutting down"))

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver([out])
