"""Engine statistics: counted in the engine core, exported elsewhere (Prometheus, logs).

Contract: the engine fills one :class:`StepStats` per step and one :class:`RequestStats` per finished
request; exporters only read them. Times are seconds; ``arrival`` is the API layer's receive time
(``time.monotonic()``), so TTFT includes queueing and prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Timings of one finished request (all choices together)."""

    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    generation_tokens: int
    e2e: float  # arrival -> finished
    queue_time: float  # arrival -> first scheduled
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> finished
    max_tokens: int = 0
    n: int = 1


@dataclass
class StepStats:
    """What happened in one engine step, plus the gauges after it."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used blocks / total blocks, in [0, 1]
    prompt_tokens: int = 0  # prompt tokens computed this step (recomputation after preemption included)
    generation_tokens: int = 0  # tokens sampled this step
    num_preemptions: int = 0
    step_seconds: float = 0.0
    time_to_first_token: list[float] = field(default_factory=list)  # arrival -> first token, per request
    inter_token_latency: list[float] = field(default_factory=list)  # gap since the previous token, per seq
    finished: list[RequestStats] = field(default_factory=list)
