"""The Prometheus exporter exposes vLLM's metric names, labels and buckets (docs/serving.md)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparse_serve.metrics import PrometheusStatLogger, buckets_1_2_5
from sparse_serve.stats import RequestStats, StepStats

LABELS = {"model_name": "tiny", "variant": "sparse"}
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80,
        160, 640, 2560]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
LATENCY = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
INFO = {"method": "wanda", "sparsity": "0.5", "structure": "2:4", "kernel": "avx512"}


def request(reason: str, prompt: int, generated: int, e2e: float) -> RequestStats:
    return RequestStats(finish_reason=reason, prompt_tokens=prompt, generation_tokens=generated, e2e=e2e,
                        queue_time=0.05, prefill_time=0.2, decode_time=e2e - 0.25, max_tokens=64, n=1)


def steps() -> list[StepStats]:
    return [
        StepStats(num_running=2, num_waiting=3, kv_cache_usage=0.5, prompt_tokens=40, generation_tokens=0,
                  time_to_first_token=[0.03, 0.07]),
        StepStats(num_running=2, num_waiting=1, kv_cache_usage=0.6, prompt_tokens=0, generation_tokens=2,
                  num_preemptions=1, inter_token_latency=[0.02, 0.12]),
        StepStats(num_running=1, num_waiting=0, kv_cache_usage=0.25, prompt_tokens=5, generation_tokens=1,
                  inter_token_latency=[0.02],
                  finished=[request("stop", 30, 7, 1.2), request("length", 10, 64, 3.0)]),
    ]


@pytest.fixture()
def families() -> dict:
    logger = PrometheusStatLogger("tiny", "sparse", INFO)
    for step in steps():
        logger.record(step)
    body, content_type = logger.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(family, suffix: str = "", **labels) -> list:
    return [s for s in family.samples if s.name == family.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, suffix: str = "", **labels) -> float:
    (sample,) = samples(family, suffix, **labels)
    return sample.value


def bucket_bounds(family) -> list[float]:
    return [float(s.labels["le"]) for s in samples(family, "_bucket") if s.labels["le"] != "+Inf"]


def test_gauges_hold_the_last_step(families):
    assert value(families["vllm:num_requests_running"]) == 1
    assert value(families["vllm:num_requests_waiting"]) == 0
    assert value(families["vllm:kv_cache_usage_perc"]) == 0.25


def test_counters_have_vllm_names_and_sums(families):
    text_names = {s.name for f in families.values() for s in f.samples}
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:request_success_total"):
        assert name in text_names
    assert value(families["vllm:prompt_tokens"], "_total") == 45
    assert value(families["vllm:generation_tokens"], "_total") == 3
    assert value(families["vllm:num_preemptions"], "_total") == 1
    success = families["vllm:request_success"]
    assert value(success, "_total", finished_reason="stop") == 1
    assert value(success, "_total", finished_reason="length") == 1
    assert value(success, "_total", finished_reason="abort") == 0  # pre-created, so dashboards see 0


def test_every_sample_carries_model_and_variant(families):
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["model_name"] == "tiny" and sample.labels["variant"] == "sparse", sample


@pytest.mark.parametrize("name,bounds", [
    ("vllm:time_to_first_token_seconds", TTFT),
    ("vllm:inter_token_latency_seconds", ITL),
    ("vllm:time_per_output_token_seconds", ITL),
    ("vllm:e2e_request_latency_seconds", LATENCY),
    ("vllm:request_queue_time_seconds", LATENCY),
    ("vllm:request_prefill_time_seconds", LATENCY),
    ("vllm:request_decode_time_seconds", LATENCY),
])
def test_histogram_buckets_are_the_documented_ones(families, name, bounds):
    family = families[name]
    assert family.type == "histogram"
    assert bucket_bounds(family) == [float(b) for b in bounds]


def test_histogram_counts_and_sums(families):
    ttft = families["vllm:time_to_first_token_seconds"]
    assert value(ttft, "_count") == 2 and math.isclose(value(ttft, "_sum"), 0.10)
    assert value(ttft, "_bucket", le="0.04") == 1 and value(ttft, "_bucket", le="0.08") == 2
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        itl = families[name]
        assert value(itl, "_count") == 3 and math.isclose(value(itl, "_sum"), 0.16)
        assert value(itl, "_bucket", le="0.025") == 2
    e2e = families["vllm:e2e_request_latency_seconds"]
    assert value(e2e, "_count") == 2 and math.isclose(value(e2e, "_sum"), 4.2)
    assert value(e2e, "_bucket", le="1.5") == 1 and value(e2e, "_bucket", le="5.0") == 2
    assert math.isclose(value(families["vllm:request_queue_time_seconds"], "_sum"), 0.1)
    assert math.isclose(value(families["vllm:request_prefill_time_seconds"], "_sum"), 0.4)
    assert math.isclose(value(families["vllm:request_decode_time_seconds"], "_sum"), 3.7)
    assert value(families["vllm:request_prompt_tokens"], "_sum") == 40
    assert value(families["vllm:request_generation_tokens"], "_sum") == 71
    assert value(families["vllm:request_generation_tokens"], "_bucket", le="50.0") == 1


def test_token_histograms_use_1_2_5_buckets(families):
    bounds = bucket_bounds(families["vllm:request_prompt_tokens"])
    assert bounds[:7] == [1, 2, 5, 10, 20, 50, 100]
    assert bucket_bounds(families["vllm:request_generation_tokens"]) == bounds
    assert buckets_1_2_5(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert buckets_1_2_5(4) == (1, 2)


def test_info_metric_has_the_compression_facts(families):
    info = families["sparse_serve_model_info"]  # the text format types Info as a gauge
    (sample,) = info.samples
    assert sample.name == "sparse_serve_model_info" and sample.value == 1
    assert sample.labels == {**LABELS, **INFO}


def test_loggers_do_not_share_registries():
    a = PrometheusStatLogger("m", "dense", {"method": "none"})
    b = PrometheusStatLogger("m", "sparse", {"method": "wanda", "sparsity": 0.5, "bad-key": None})
    a.record(StepStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, generation_tokens=7))
    text_b = b.render()[0].decode()
    assert 'vllm:generation_tokens_total{model_name="m",variant="sparse"} 0.0' in text_b
    assert 'bad_key=""' in text_b and 'sparsity="0.5"' in text_b
