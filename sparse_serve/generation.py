"""From engine outputs to text: per-choice detokenization, stop strings and usage.

Contract: :func:`choice_events` reads one admitted engine request and yields a :class:`ChoiceEvent` per choice
per step with the text safe to send now. A choice ends with its engine finish reason, or "stop" when a
stop string appears (the text is cut before it). When every choice has ended the engine request is
closed, which aborts it if the engine was still generating (stop strings, client disconnect).
Streamed and non-streamed responses are both built from these events, so their text is identical.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sparse_serve.async_engine import RequestStream
from sparse_serve.detokenize import IncrementalDetokenizer
from sparse_serve.outputs import TokenLogprob
from sparse_serve.sampling_params import SamplingParams


@dataclass
class ChoiceEvent:
    """New text of one choice; ``finish_reason`` is set on the choice's last event."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0  # tokens this event accounts for


@dataclass
class Generation:
    """One engine request as the API layer sees it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0


async def choice_events(stream: RequestStream, tokenizer: Any, gen: Generation,
                        skip_special_tokens: bool = True) -> AsyncIterator[ChoiceEvent]:
    """Events of every choice of ``gen`` (admitted as ``stream``) until all have finished."""
    params = gen.params
    detoks = [IncrementalDetokenizer(tokenizer, gen.prompt_ids, params.stop, params.include_stop_str_in_output,
                                     skip_special_tokens) for _ in range(params.n)]
    done = [False] * params.n
    try:
        async for out in stream:
            for choice in out.outputs:
                if done[choice.index] or not (choice.new_token_ids or choice.finished):
                    continue
                text, stop_hit = detoks[choice.index].add(choice.new_token_ids, final=choice.finished)
                reason = "stop" if stop_hit else choice.finish_reason
                done[choice.index] = reason is not None
                gen.completion_tokens += len(choice.new_token_ids)
                yield ChoiceEvent(choice.index, text, reason, choice.new_logprobs or [], len(choice.new_token_ids))
            if all(done):
                break
    finally:
        stream.close()
