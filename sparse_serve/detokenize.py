"""Incremental detokenization with stop strings: token ids in, text deltas that are safe to send out.

Contract: one :class:`IncrementalDetokenizer` per choice. :meth:`IncrementalDetokenizer.add` returns the
text that may be emitted now; the concatenation of everything it returns equals the non-streamed text,
i.e. ``tokenizer.decode(generated_ids, skip_special_tokens=...)`` cut at the first stop string (before it,
or after it with ``include_stop_str_in_output``). So streamed and non-streamed answers agree exactly.
Two kinds of text are held back until they are settled or ``final=True``:

- an incomplete UTF-8 character (a decoded window that ends in U+FFFD), and
- a suffix that could be the beginning of a stop string (not needed with ``include_stop_str_in_output``).

"First stop string" means the one completed first when reading left to right (earliest end; on a tie
the longer one, which starts earlier) - so the cut does not depend on how the text was split in tokens.

Decoding works on a bounded window like vLLM/TGI: ``decode(ids[prefix:read])`` is text already produced,
``decode(ids[prefix:])`` adds the new text, so each step costs O(window + new tokens), not O(sequence).
The window starts in the prompt's last few tokens, so a tokenizer that drops a leading space at the start
of a decode (SentencePiece) still yields the first generated token's space, as vLLM does; for byte-level
BPE tokenizers (GPT-2, LLaMA-3, SmolLM, Qwen) the text equals ``decode(generated_ids)`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as decode context (vLLM's initial detokenization offset)


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, int] | None:
    """(begin, end) of the first stop string completed in ``text[start:]`` reading left to right, or None.

    Only matches that end after ``start`` are looked for, by begin >= ``start - len(s) + 1``; the
    caller passes the length of the text it had already searched.
    """
    best: tuple[int, int] | None = None
    for s in stop:
        begin = text.find(s, max(0, start - len(s) + 1))
        if begin < 0:
            continue
        end = begin + len(s)
        if best is None or end < best[1] or (end == best[1] and begin < best[0]):
            best = (begin, end)
    return best


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class IncrementalDetokenizer:
    """Turns one choice's generated token ids into emit-safe text deltas, honouring stop strings."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str],
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = self._context(list(prompt_ids))
        self._prefix_offset = 0  # window start: decode(ids[prefix:read]) is text already in self._text
        self._read_offset = len(self._ids)
        self._text = ""  # decoded so far (emitted + held back), cut at a stop string once one is hit
        self._emitted = 0  # how much of self._text has been returned
        self._stopped = False

    # -- public ------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All text returned by :meth:`add` so far (after ``final=True``: the choice's whole text)."""
        return self._text[:self._emitted]

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self._stopped

    def add(self, new_ids: Sequence[int], final: bool) -> tuple[str, bool]:
        """Append ``new_ids``; return (the text safe to emit now, whether a stop string was hit).

        With ``final=True`` nothing is held back. After a stop string was hit every call returns ("", True).
        """
        if self._stopped:
            return "", True
        searched = len(self._text)
        self._ids.extend(new_ids)
        self._text += self._decode_new(final)
        hit = find_stop(self._text, self.stop, searched)
        if hit is not None:
            self._stopped = True
            self._text = self._text[:hit[1] if self.include_stop_str_in_output else hit[0]]
            return self._emit(len(self._text)), True
        hold = 0 if final or self.include_stop_str_in_output else partial_stop_len(self._text, self.stop)
        return self._emit(len(self._text) - hold), False

    # -- internals ---------------------------------------------------------------------------------

    def _context(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's last tokens as decode context, or none if they end inside a UTF-8 character."""
        context = prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(REPLACEMENT):
            return []  # the generated bytes must decode on their own, as in decode(generated_ids)
        return context

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text added by the ids past the read offset; "" while it ends in an incomplete character."""
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # only special tokens (skipped) so far: wait, offsets stay
        if new_text.endswith(REPLACEMENT) and not final:
            return ""  # an incomplete UTF-8 character: wait for its remaining bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self._text[self._emitted:upto]
        self._emitted = upto
        return delta
