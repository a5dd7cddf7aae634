"""The engine core: requests in, one batched forward per step, token ids out.

Contract: :class:`LLMEngine` works on token ids only (tokenization, chat templates and stop strings
belong to the API layer). ``add_request`` validates and queues a request (``ValueError`` for a prompt
that does not fit the context); ``step`` schedules (continuous batching, chunked prefill, preemption),
runs the model once, samples, applies the stop rules and returns a :class:`RequestOutput` for every
request that advanced plus the step's :class:`StepStats`. ``abort`` frees a request's blocks at once.
A forward pass that raises fails only the requests in that step (``RequestOutput.error``); the
engine stays usable. Not thread-safe: :mod:`sparse_serve.async_engine` drives it from one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

import torch
from torch import nn

from sparse_serve.block_manager import BlockManager
from sparse_serve.config import EngineConfig
from sparse_serve.model_runner import ModelRunner
from sparse_serve.outputs import CompletionOutput, RequestOutput
from sparse_serve.sampling import SampleOutput, SamplingRow, make_generator, plain_greedy, sample
from sparse_serve.sampling_params import SamplingParams
from sparse_serve.scheduler import Chunk, Scheduler
from sparse_serve.sequence import Request, Sequence, Status
from sparse_serve.stats import RequestStats, StepStats

log = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching generation over a paged KV cache (see the module docstring)."""

    def __init__(self, model: nn.Module, eos_token_ids: Collection[int], max_model_len: int,
                 config: EngineConfig | None = None, dtype: torch.dtype = torch.bfloat16):
        self.config = config or EngineConfig()
        self.runner = ModelRunner(model, self.config.cache, dtype)
        self.blocks = BlockManager(self.runner.num_blocks, self.config.cache.block_size)
        capacity = self.runner.num_blocks * self.config.cache.block_size
        self.max_model_len = min(max_model_len, capacity)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(self.config.scheduler, self.blocks)
        self.requests: dict[str, Request] = {}
        self._aborted: list[RequestStats] = []  # reported with the next step's stats

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival: float | None = None) -> Request:
        """Queue a request; ``ValueError`` naming both numbers when it cannot fit the context."""
        params.validate()
        self.check_length(len(prompt_ids), params.max_tokens)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        request = Request(request_id, list(prompt_ids), params, time.monotonic() if arrival is None else arrival)
        request.sequences = [Sequence(request, i, make_generator(params.seed, i)) for i in range(params.n)]
        for seq in request.sequences:
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def check_length(self, prompt_tokens: int, max_tokens: int = 1) -> None:
        """``ValueError`` unless a prompt of ``prompt_tokens`` plus ``max_tokens`` fits the context."""
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty; send at least one token")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens and {max_tokens} more were requested ({prompt_tokens + max_tokens} in "
                f"total). Shorten the prompt or lower max_tokens.")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now with reason "abort", freeing its KV blocks; its last output."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._aborted.append(self._request_stats(request))
        return self._output(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        start = time.monotonic()
        plan = self.scheduler.schedule()
        stats = StepStats(0, 0, 0.0, num_preemptions=len(plan.preempted))
        touched: dict[str, Request] = {}
        if plan.chunks:
            for c in plan.chunks:
                touched[c.seq.request.request_id] = c.seq.request
                if c.seq.request.first_scheduled is None:
                    c.seq.request.first_scheduled = start
            rows = [SamplingRow(c.seq.params, c.seq.prompt_ids, c.seq.output_ids, c.seq.generator)
                    for c in plan.chunks if c.completes]
            try:
                result = self.runner.execute(plan.chunks, argmax=plain_greedy(rows, self.eos_token_ids))
            except Exception as err:  # noqa: BLE001 - one bad step must not kill the engine
                log.exception("forward pass failed; failing the %d requests in it", len(touched))
                return self._fail(touched.values(), f"internal error in the forward pass: {err}"), self._gauges(stats)
            stats.prompt_tokens = sum(min(c.num_tokens, max(len(c.seq.prompt_ids) - c.start, 0)) for c in plan.chunks)
            self._advance(plan.chunks, rows, result, stats)
        outputs = [self._output(r) for r in touched.values()]
        stats.finished = self._aborted + [self._request_stats(r) for r in touched.values() if r.finished]
        self._aborted = []
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        stats.step_seconds = time.monotonic() - start
        return outputs, self._gauges(stats)

    def idle_stats(self) -> StepStats | None:
        """The gauges and the requests aborted since the last step, when no step will run (else None)."""
        if not self._aborted:
            return None
        stats = StepStats(0, 0, 0.0, finished=self._aborted)
        self._aborted = []
        return self._gauges(stats)

    def _advance(self, chunks: list[Chunk], rows: list[SamplingRow], result: torch.Tensor, stats: StepStats) -> None:
        """Take the step's tokens: ``result`` is the completing rows' logits [S, V], or their token ids [S]
        where the model picked them (plain greedy rows, see ``ModelRunner.execute``)."""
        done = [c for c in chunks if c.completes]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        if not done:
            return
        if result.dim() == 1:
            sampled = SampleOutput(token_ids=result.tolist(), logprobs=[None] * len(done))
        else:
            sampled = sample(result, rows, self.eos_token_ids)
        now = time.monotonic()
        for c, token, logprob in zip(done, sampled.token_ids, sampled.logprobs):
            self._append(c.seq, token, logprob, now, stats)

    def _append(self, seq: Sequence, token: int, logprob, now: float, stats: StepStats) -> None:
        seq.output_ids.append(token)
        seq.new_ids.append(token)
        if logprob is not None:
            seq.new_logprobs.append(logprob)
        request = seq.request
        if request.first_token is None:
            request.first_token = now
            stats.time_to_first_token.append(now - request.arrival)
        elif seq.last_token_time is not None:
            stats.inter_token_latency.append(now - seq.last_token_time)
        seq.last_token_time = now
        stats.generation_tokens += 1
        reason = self._stop_reason(seq, token)
        if reason is not None:
            seq.finish_reason = reason
            seq.stop_reason = token if reason == "stop" and token not in self.eos_token_ids else None
            self.scheduler.finish(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params, produced = seq.params, len(seq.output_ids)
        if produced >= params.min_tokens:
            if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
                return "stop"
        if produced >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- outputs and stats ------------------------------------------------------------------------
    def _output(self, request: Request, error: str | None = None) -> RequestOutput:
        choices = []
        for seq in request.sequences:
            choices.append(CompletionOutput(seq.index, list(seq.output_ids), seq.new_ids,
                                            seq.new_logprobs if seq.params.logprobs is not None else None,
                                            seq.finish_reason, seq.stop_reason))
            seq.new_ids, seq.new_logprobs = [], []
        return RequestOutput(request.request_id, request.prompt_ids, choices, request.finished, error=error)

    def _fail(self, requests, message: str) -> list[RequestOutput]:
        outputs = []
        for request in list(requests):
            for seq in request.sequences:
                if seq.status is not Status.FINISHED:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
            outputs.append(self._output(request, error=message))
            self._aborted.append(self._request_stats(request))
            self.requests.pop(request.request_id, None)
        return outputs

    def _gauges(self, stats: StepStats) -> StepStats:
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.blocks.usage
        return stats

    def _request_stats(self, request: Request) -> RequestStats:
        now = time.monotonic()
        scheduled = request.first_scheduled or now
        first = request.first_token or now
        reasons = [s.finish_reason for s in request.sequences]
        return RequestStats(
            finish_reason="abort" if "abort" in reasons else ("length" if "length" in reasons else "stop"),
            prompt_tokens=len(request.prompt_ids), generation_tokens=sum(len(s.output_ids) for s in request.sequences),
            e2e=now - request.arrival, queue_time=scheduled - request.arrival, prefill_time=first - scheduled,
            decode_time=now - first, max_tokens=request.params.max_tokens, n=request.params.n)
