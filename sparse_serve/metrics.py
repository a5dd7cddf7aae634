"""Prometheus exporter for the engine's statistics, under vLLM's metric names and buckets.

Contract: :class:`PrometheusStatLogger` only reads the :class:`~sparse_serve.stats.StepStats` the engine
core fills (counting happens in the core, exporting here). Every metric lives in the logger's own
``CollectorRegistry`` (never the process-global one), so several loggers - several tests, or a dense and
a sparse server in one process - never collide. All series carry the labels ``model_name`` and
``variant`` (e.g. ``dense`` / ``sparse``); names and histogram buckets are vLLM's (docs/serving.md), so
its Grafana dashboards work unchanged. ``kv_cache_usage_perc`` is a fraction in [0, 1], as in vLLM.
The model's compression facts are exposed as the info metric ``sparse_serve_model_info``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import disable_created_metrics, generate_latest

from sparse_serve.outputs import FINISH_REASONS
from sparse_serve.stats import RequestStats, StepStats

disable_created_metrics()  # no ``*_created`` series, as in vLLM (they double the text and confuse dashboards)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LABELS = ("model_name", "variant")
INFO_NAME = "sparse_serve_model"  # exposed as sparse_serve_model_info


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including the last value <= ``max_value`` (vLLM's series)."""
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def info_labels(info: Mapping[str, object]) -> dict[str, str]:
    """``info`` as Prometheus label pairs: keys made valid label names, values as strings, None as ""."""
    out: dict[str, str] = {}
    for key, value in info.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
        if not name or name[0].isdigit():
            name = "_" + name
        if name in LABELS:  # would clash with the metric's own labels
            name = "info_" + name
        out[name] = "" if value is None else str(value)
    return out


class PrometheusStatLogger:
    """vLLM-named Prometheus metrics for one served model, fed one :class:`StepStats` per engine step.

    ``max_model_len`` bounds the 1-2-5 buckets of the per-request token-count histograms.
    """

    def __init__(self, model_name: str, variant: str, info: Mapping[str, object],
                 registry: CollectorRegistry | None = None, max_model_len: int = 32768) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = {"model_name": model_name, "variant": variant}
        self._make_gauges()
        self._make_counters()
        self._make_histograms(max_model_len)
        model_info = Info(INFO_NAME, "The served model and how it was compressed.", list(LABELS),
                          registry=self.registry)
        model_info.labels(**self._labels).info(info_labels(info))

    # -- construction ----------------------------------------------------------------------------

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, list(LABELS), registry=self.registry).labels(**self._labels)

    def _counter(self, name: str, doc: str) -> Counter:
        # prometheus_client appends "_total" itself: "vllm:prompt_tokens" is exposed as vllm:prompt_tokens_total
        return Counter(name, doc, list(LABELS), registry=self.registry).labels(**self._labels)

    def _histogram(self, name: str, doc: str, buckets: Iterable[float]) -> Histogram:
        return Histogram(name, doc, list(LABELS), buckets=list(buckets),
                         registry=self.registry).labels(**self._labels)

    def _make_gauges(self) -> None:
        self.num_running = self._gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_waiting = self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = self._gauge("vllm:kv_cache_usage_perc",
                                          "KV-cache usage: used blocks / total blocks (1 = 100 percent).")

    def _make_counters(self) -> None:
        self.prompt_tokens = self._counter("vllm:prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = self._counter("vllm:generation_tokens", "Tokens generated.")
        self.num_preemptions = self._counter("vllm:num_preemptions", "Preemptions (requests recomputed).")
        success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                          [*LABELS, "finished_reason"], registry=self.registry)
        self.request_success = {reason: success.labels(**self._labels, finished_reason=reason)
                                for reason in FINISH_REASONS}
        self._success_family = success

    def _make_histograms(self, max_model_len: int) -> None:
        h = self._histogram
        token_buckets = buckets_1_2_5(max_model_len)
        self.ttft = h("vllm:time_to_first_token_seconds",
                      "Time to first token: API arrival -> first token.", TTFT_BUCKETS)
        self.itl = h("vllm:inter_token_latency_seconds", "Gap between consecutive tokens.", ITL_BUCKETS)
        self.tpot = h("vllm:time_per_output_token_seconds",
                      "Time per output token (older name of inter_token_latency).", ITL_BUCKETS)
        self.e2e = h("vllm:e2e_request_latency_seconds", "Request latency: arrival -> finished.",
                     REQUEST_LATENCY_BUCKETS)
        self.queue_time = h("vllm:request_queue_time_seconds", "Time waiting before first scheduled.",
                            REQUEST_LATENCY_BUCKETS)
        self.prefill_time = h("vllm:request_prefill_time_seconds",
                              "First scheduled -> first token.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = h("vllm:request_decode_time_seconds", "First token -> finished.",
                             REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = h("vllm:request_prompt_tokens", "Prompt length of finished requests.",
                                       token_buckets)
        self.request_generation_tokens = h("vllm:request_generation_tokens",
                                           "Generated tokens of finished requests.", token_buckets)
        self.request_max_tokens = h("vllm:request_params_max_tokens", "max_tokens of finished requests.",
                                    token_buckets)
        self.request_n = h("vllm:request_params_n", "n of finished requests.", PARAMS_N_BUCKETS)
        self.iteration_tokens = h("vllm:iteration_tokens_total", "Tokens computed per engine step.",
                                  ITERATION_TOKENS_BUCKETS)

    # -- recording -------------------------------------------------------------------------------

    def record(self, step: StepStats) -> None:
        """Set the gauges to the state after ``step`` and add its counts and latencies."""
        self.num_running.set(step.num_running)
        self.num_waiting.set(step.num_waiting)
        self.kv_cache_usage.set(step.kv_cache_usage)
        self.prompt_tokens.inc(step.prompt_tokens)
        self.generation_tokens.inc(step.generation_tokens)
        self.num_preemptions.inc(step.num_preemptions)
        if step.prompt_tokens + step.generation_tokens > 0:
            self.iteration_tokens.observe(step.prompt_tokens + step.generation_tokens)
        for seconds in step.time_to_first_token:
            self.ttft.observe(seconds)
        for seconds in step.inter_token_latency:
            self.itl.observe(seconds)
            self.tpot.observe(seconds)
        for request in step.finished:
            self._record_finished(request)

    def _record_finished(self, request: RequestStats) -> None:
        counter = self.request_success.get(request.finish_reason)
        if counter is None:  # a reason outside FINISH_REASONS still gets counted, under its own label
            counter = self._success_family.labels(**self._labels, finished_reason=request.finish_reason)
            self.request_success[request.finish_reason] = counter
        counter.inc()
        self.e2e.observe(request.e2e)
        self.queue_time.observe(request.queue_time)
        self.prefill_time.observe(request.prefill_time)
        self.decode_time.observe(request.decode_time)
        self.request_prompt_tokens.observe(request.prompt_tokens)
        self.request_generation_tokens.observe(request.generation_tokens)
        if request.max_tokens > 0:
            self.request_max_tokens.observe(request.max_tokens)
        self.request_n.observe(request.n)

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition of this logger's registry, its content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
