"""Client-side timing of one streamed OpenAI response, measured the way ``vllm bench serve`` measures it.

Contract: feed :class:`StreamTimer` the raw SSE lines of one response as they arrive (``feed``), then
``finish()``; the :class:`RequestTiming` it returns has

- ``ttft_s``: request start -> the first chunk that carries content (chat ``delta.content`` or
  completions ``text``; the role-only first chat chunk does not count);
- ``itl_s``: the gaps between consecutive content chunks (one per chunk after the first);
- ``e2e_s``: request start -> the end of the stream;
- ``tpot_s``: ``(e2e - ttft) / (output_tokens - 1)``, None for a one-token answer;
- ``output_tokens`` / ``prompt_tokens``: from the usage chunk (``stream_options.include_usage``),
  else the number of content chunks and None.

An ``{"error": ...}`` event or a stream without ``[DONE]`` makes ``error`` non-empty. The clock is
injectable (``time.perf_counter`` by default) so the arithmetic is testable without a server.
Nothing here imports locust.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The columns of the per-request CSV the locustfile writes (``--request-log``) and the report reads.
LOG_COLUMNS = ("index", "endpoint", "max_tokens", "start_unix", "ok", "error", "ttft_ms", "e2e_ms", "tpot_ms",
               "itl_mean_ms", "prompt_tokens", "output_tokens", "chunks", "itl_ms")


@dataclass
class RequestTiming:
    """The client-side timings of one streamed request (seconds), as defined in the module docstring."""

    ttft_s: float
    e2e_s: float
    itl_s: list[float]
    output_tokens: int
    prompt_tokens: int | None
    chunks: int
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def ok(self) -> bool:
        return not self.error

    def row(self) -> dict[str, object]:
        """The CSV row of this request (milliseconds; ITL gaps joined with spaces)."""
        ms = lambda s: None if s is None else round(1000 * s, 3)  # noqa: E731
        itl_mean = sum(self.itl_s) / len(self.itl_s) if self.itl_s else None
        return {"ok": int(self.ok), "error": self.error, "ttft_ms": ms(self.ttft_s), "e2e_ms": ms(self.e2e_s),
                "tpot_ms": ms(self.tpot_s), "itl_mean_ms": ms(itl_mean), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "chunks": self.chunks,
                "itl_ms": " ".join(f"{1000 * g:.3f}" for g in self.itl_s)}


@dataclass
class StreamTimer:
    """Accumulates the arrival times of one SSE response; see the module docstring."""

    clock: Callable[[], float] = time.perf_counter
    start: float = field(default=0.0)
    content_times: list[float] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    error: str = ""
    done: bool = False

    def __post_init__(self) -> None:
        if not self.start:
            self.start = self.clock()

    def feed(self, line: bytes | str) -> None:
        """One line of the response body (blank lines and non-``data:`` lines are ignored)."""
        now = self.clock()
        text = line.decode() if isinstance(line, bytes) else line
        if not text.startswith("data:"):
            return
        payload = text[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            self.error = self.error or f"unparsable event: {payload[:80]}"
            return
        if "error" in chunk:
            self.error = self.error or str(chunk["error"].get("message", chunk["error"]))[:200]
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if any(_content(choice) for choice in chunk.get("choices") or []):
            self.content_times.append(now)

    def finish(self) -> RequestTiming:
        """The timings, with the end of the stream taken now."""
        end = self.clock()
        error = self.error or ("" if self.done else "stream ended without [DONE]")
        if not self.content_times and not error:
            error = "no content in the stream"
        first = self.content_times[0] if self.content_times else end
        gaps = [b - a for a, b in zip(self.content_times, self.content_times[1:])]
        tokens = self.usage.get("completion_tokens", len(self.content_times))
        return RequestTiming(first - self.start, end - self.start, gaps, int(tokens),
                             self.usage.get("prompt_tokens"), len(self.content_times), error)


def _content(choice: dict) -> bool:
    """Whether a streamed choice carries generated text (chat delta or completions text)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content"))
    return bool(choice.get("text"))
