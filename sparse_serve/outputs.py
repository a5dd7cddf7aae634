"""What the engine hands back after each step: token ids, logprobs and finish reasons, never text.

Contract: every :class:`RequestOutput` describes one request after one engine step; ``outputs`` has one
:class:`CompletionOutput` per choice (``n`` of them) holding *all* token ids generated so far plus the
ones added this step (``new_token_ids``). ``finished`` is true once every choice has a finish reason;
after that the request never appears again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: why a choice stopped: a stop/EOS token ("stop"), max_tokens or the context ("length"), or an abort
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top-k alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # [(token_id, logprob)] best first


@dataclass
class CompletionOutput:
    """One choice of a request."""

    index: int
    token_ids: list[int]
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None  # the stop token id that ended it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's state after an engine step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # set when the engine failed this request (it is finished, the engine lives on)
