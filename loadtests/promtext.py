"""Reading a server's Prometheus /metrics: snapshots, their difference, and the means of histograms.

Contract: :func:`scrape` returns a :class:`Snapshot` - every sample of the text exposition keyed by
(sample name, sorted label pairs); :meth:`Snapshot.total` sums the samples of one name whose labels
contain the given ones. :func:`server_deltas` turns the snapshots taken before and after one load level
into the numbers the report compares with the client's: requests finished, tokens generated and
prompted, and the mean TTFT / ITL / e2e latency of the requests of that level (histogram ``_sum`` and
``_count`` differences, so no bucket interpolation is involved).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]
HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "itl": "vllm:inter_token_latency_seconds",
              "e2e": "vllm:e2e_request_latency_seconds"}
COUNTERS = {"requests": "vllm:request_success_total", "generation_tokens": "vllm:generation_tokens_total",
            "prompt_tokens": "vllm:prompt_tokens_total", "preemptions": "vllm:num_preemptions_total"}


@dataclass
class Snapshot:
    """All samples of one scrape."""

    samples: dict[Key, float]

    def total(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        want = set((labels or {}).items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= set(lab))

    def names(self) -> set[str]:
        """Every sample name in the scrape (``_bucket``/``_sum``/``_count``/``_total`` suffixes included)."""
        return {name for name, _ in self.samples}


def parse(text: str) -> Snapshot:
    """The samples of a Prometheus text exposition."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Snapshot(samples)


def scrape(base_url: str, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> Snapshot:
    """GET ``base_url``/metrics and parse it."""
    import httpx

    response = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout, headers=dict(headers or {}))
    response.raise_for_status()
    return parse(response.text)


def metric_names(text: str) -> set[str]:
    """Metric family names and sample names exported in ``text`` (for checking dashboards against it)."""
    out: set[str] = set()
    for family in text_string_to_metric_families(text):
        out.add(family.name)
        out.update(s.name for s in family.samples)
    return out


def server_deltas(before: Snapshot, after: Snapshot,
                  labels: Mapping[str, str] | None = None) -> dict[str, float | None]:
    """What the server counted between two scrapes: counter deltas and histogram means (seconds)."""
    out: dict[str, float | None] = {}
    for key, name in COUNTERS.items():
        out[key] = after.total(name, labels) - before.total(name, labels)
    for key, name in HISTOGRAMS.items():
        count = after.total(f"{name}_count", labels) - before.total(f"{name}_count", labels)
        total = after.total(f"{name}_sum", labels) - before.total(f"{name}_sum", labels)
        out[f"{key}_count"] = count
        out[f"{key}_mean_s"] = total / count if count > 0 else None
    return out


def missing_names(used: Iterable[str], exported: set[str]) -> list[str]:
    """The names in ``used`` that the server does not export."""
    return sorted(set(used) - exported)
