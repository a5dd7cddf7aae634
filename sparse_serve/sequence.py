"""The engine's per-sequence state: token ids, progress through them, KV blocks and timestamps.

Contract: a request with ``n`` choices becomes ``n`` :class:`Sequence` objects sharing one
:class:`Request`. A sequence's known tokens are ``prompt_ids + output_ids``; ``num_computed`` of them
have their keys and values in the KV cache. Preemption resets ``num_computed`` to 0 and frees the
blocks; the tokens stay, so recomputation continues exactly where generation stopped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from sparse_serve.outputs import TokenLogprob
from sparse_serve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One API request: its prompt, parameters and timing (shared by its ``n`` sequences)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() at the API layer
    sequences: list["Sequence"] = field(default_factory=list)
    first_scheduled: float | None = None
    first_token: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    """One choice being generated."""

    request: Request
    index: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | None = None
    last_token_time: float | None = None
    new_ids: list[int] = field(default_factory=list)  # added since the last output was sent
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end) of prompt + output."""
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_ids)[start:end]

    def token_at(self, position: int) -> int:
        """The known token at ``position`` of prompt + output (no copy of either)."""
        prompt = self.request.prompt_ids
        return prompt[position] if position < len(prompt) else self.output_ids[position - len(prompt)]

    @property
    def num_pending(self) -> int:
        """Known tokens whose KV is not computed yet (1 while decoding, more while (re)prefilling)."""
        return self.num_tokens - self.num_computed
