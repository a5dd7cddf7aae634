"""Perplexity on held-out text over non-overlapping windows.

Contract: the token stream is cut into ``N // seq_len`` windows of exactly
``seq_len`` tokens (the tail is dropped, as Wanda and SparseGPT do); every
window is scored independently (no context carried across windows); the
perplexity is ``exp(total NLL / predicted tokens)`` with ``seq_len - 1``
predicted tokens per window. Always report ``seq_len`` with the number:
128-token and 2048-token perplexities are not comparable.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one token stream at one window length."""

    ppl: float
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[1, N] token stream -> [W, seq_len] non-overlapping windows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    flat = token_ids.reshape(-1)
    count = flat.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {flat.numel()} tokens, fewer than one window of {seq_len}; "
                         "lower --seq-len or give more text")
    return flat[: count * seq_len].view(count, seq_len)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row: logits [B, T, V], ids [B, T] -> [B]."""
    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # [B, T-1]
    return nll.sum(dim=1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: torch.Tensor, seq_len: int = 1024,
               max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` [1, N] in windows of ``seq_len``."""
    start = time.perf_counter()
    wins = windows_of(token_ids, seq_len, max_windows)  # [W, T]
    device = next(model.parameters()).device
    total = 0.0
    bar = tqdm(range(0, len(wins), batch_size), desc=f"perplexity@{seq_len}", disable=not progress,
               unit="batch")
    for i in bar:
        batch = wins[i: i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += float(window_nll(logits, batch).sum())
        done = min(i + batch_size, len(wins))
        bar.set_postfix(ppl=f"{math.exp(total / (done * (seq_len - 1))):.3f}")
    tokens = len(wins) * (seq_len - 1)
    return PerplexityResult(ppl=math.exp(total / tokens), nll=total, tokens=tokens, windows=len(wins),
                            seq_len=seq_len, seconds=time.perf_counter() - start)
