"""Screened argmax: the greedy token of an LM head without reading all of it.

A greedy decode step needs only the index of the largest logit, and a vocabulary-sized LM head is the largest
weight a small model streams each step (SmolLM2: 49152 x 576, about a fifth of a 70%-sparse decode step). The
screen keeps the head once more in int8, ``W[n] = s[n] q[n] + R[n]`` (one scale per row), with norms of the
residual ``R``; a step quantizes the activation row the same way, ``x = sx xq + e``, reads only the int8 rows
(``vpdpbusd``: 0.67x the bytes of the exponent-coded head, 0.5x a bf16 one) and bounds every logit:

    a[n] = s[n] (sx (q[n] . xq) + q[n, O] . x[O])                         (exact integer sums; O: the outliers)
    |W[n] . x - a[n]| <= min(|R[n]|_2 |r|_2, |R[n]|_1 |r|_inf)            (the weight's rounding; r: x off O)
                       + s[n] / 2 |x[O]|_1                                (the same at the outliers)
                       + min(s[n] |q[n]|_2 |e|_2, s[n] |q[n]|_1 |e|_inf)  (the activation's rounding)
                       + |W[n]|_1 |x|_inf 2 (K + 64) 2^-24                (float32 sums of the exact kernel)

Rows whose upper bound falls below the best lower bound cannot win. The few left (a median of 5 of 49152 on
SmolLM2's greedy answers, a few hundred at most) go through the head's exact decode GEMV with the pass size the
full call would take, so their logits are bit for bit the full head's; rounded to bf16 as the head rounds them,
the first largest wins, as ``argmax`` picks it. Rows whose logit could round to the winner's bf16 stay
candidates (a margin of 2^-6 of the bound, twice bf16's spacing), so ties break as in the full head.

An activation row's ``OUTLIERS`` largest entries are not quantized but multiplied exactly (a final norm's output
can hold one entry 5x the next; quantized with the rest it would coarsen every other entry's step, and with it
the bounds: on the 70%-sparse SmolLM2 every row of the head stayed a candidate), and the weight's residual at
those entries is bounded by half a quantization step, ``s[n] / 2 |x[outliers]|_1``.

Measured on SmolLM2 (``benchmarks/argmax_screen.py``, two runs): the head 1.39-1.90x faster than the coded
decode GEMV plus argmax at 1-4 rows, a decode step 1.01-1.08x (dense) and 1.09-1.11x (70% sparse) faster,
every token the same.

Contract: :func:`build_argmax_screen` makes the screen from a bf16 ``[V, K]`` weight (or says why not: a
non-finite weight); :func:`screened_argmax` returns the token ids ``[M]`` for up to 8 rows, or None where the
screen cannot decide (a non-finite activation, or more candidates than ``max_candidates``) and the caller must
compute the head. :func:`screen_bounds` is the bound in plain torch, for tests and for reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCREEN_COLS = 64  # int8 columns of one vpdpbusd: q is padded to a multiple
MAX_ROWS = 8  # activation rows one call takes (one pass of the exact decode GEMV)
OUTLIERS = 8  # an activation row's largest entries, multiplied exactly rather than quantized
#: the columns of ``ArgmaxScreen.stats``, in the order the kernel reads them
STATS = ("scale", "residual_l2", "residual_l1", "quant_l2", "quant_l1", "abs_l1")
BUILD_ROWS = 4096  # rows quantized at a time (float64 temporaries: 4096 x K x 8 bytes each)
ROUND_UP = 1 + 2**-20  # float64 norms stored as float32 only after this factor, so they stay upper bounds


TILE_ROWS = 16  # rows of one tile: the int32 lanes of one vpdpbusd


@dataclass(frozen=True)
class ArgmaxScreen:
    """The int8 copy of a ``[V, K]`` head and the facts its bounds need; V is padded to ``Vp`` (whole tiles)."""

    q: Tensor  # int8 [Vp / 16, Kp / 4, 16, 4]: tiles of 16 rows, four columns at a time (Kp: K padded to 64)
    qsum: Tensor  # int32 [Vp]: the row sums of q (the kernel feeds xq + 128 as unsigned bytes)
    stats: Tensor  # float32 [len(STATS), Vp], one row per fact (padding rows: scale 1, norms 0)
    vocab: int  # V

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.qsum, self.stats))

    def rows(self) -> Tensor:
        """q as plain rows, int8 [V, Kp]."""
        tiles, quads = self.q.shape[:2]
        return self.q.permute(0, 2, 1, 3).reshape(tiles * TILE_ROWS, quads * 4)[: self.vocab]


def build_argmax_screen(weight: Tensor) -> ArgmaxScreen | str:
    """The int8 screen of a ``[V, K]`` weight, or why it cannot have one."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16:
        return f"the screen takes a 2-D bfloat16 weight, got {weight.dtype} {tuple(weight.shape)}"
    if not bool(torch.isfinite(weight).all()):
        return "the weight holds non-finite values"
    rows, cols = weight.shape
    padded_rows = -(-rows // TILE_ROWS) * TILE_ROWS
    padded = -(-cols // SCREEN_COLS) * SCREEN_COLS
    q = torch.zeros(padded_rows, padded, dtype=torch.int8)
    stats = torch.zeros(len(STATS), padded_rows, dtype=torch.float32)
    stats[0] = 1.0
    for r0 in range(0, rows, BUILD_ROWS):
        w = weight[r0:r0 + BUILD_ROWS].to(torch.float64)  # [B, K], exact
        r1 = r0 + w.shape[0]
        scale = (w.abs().amax(dim=1) / 127).to(torch.float32)  # [B]: the float32 the kernel multiplies by
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        s = scale.to(torch.float64)[:, None]
        qb = torch.round(w / s).clamp_(-127, 127)  # [B, K]
        resid = w - s * qb  # [B, K], exact in float64
        norms = torch.stack([resid.norm(dim=1), resid.abs().sum(dim=1), s[:, 0] * qb.norm(dim=1),
                             s[:, 0] * qb.abs().sum(dim=1), w.abs().sum(dim=1)])  # [5, B]
        stats[0, r0:r1] = scale
        stats[1:, r0:r1] = (norms * ROUND_UP).to(torch.float32)
        q[r0:r1, :cols] = qb.to(torch.int8)
    qsum = q.sum(dim=1, dtype=torch.int32)
    tiles = q.view(padded_rows // TILE_ROWS, TILE_ROWS, padded // 4, 4).permute(0, 2, 1, 3).contiguous()
    return ArgmaxScreen(tiles, qsum, stats, rows)


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> (xq [M, K] float64 integers in [-127, 127], sx [M], outliers [M, J] long): x = sx xq + e away
    from each row's J = min(OUTLIERS, K) largest entries (there xq = 0; the screen multiplies them exactly)."""
    xd = x.to(torch.float64)
    outliers = xd.abs().topk(min(OUTLIERS, x.shape[1]), dim=1).indices  # [M, J]
    rest = xd.scatter(1, outliers, 0.0)
    xinf = rest.abs().amax(dim=1)  # [M]
    sx = torch.where(xinf > 0, xinf / 127, torch.ones_like(xinf)).to(torch.float32).to(torch.float64)
    return torch.round(rest / sx[:, None]).clamp_(-127, 127), sx, outliers


def screen_bounds(x: Tensor, screen: ArgmaxScreen) -> tuple[Tensor, Tensor]:
    """The screen's estimate ``a`` and bound ``b`` of every logit, float64 [M, V] each: |W x - a| <= b."""
    cols = x.shape[1]
    xd = x.to(torch.float64)  # [M, K]
    xq, sx, outliers = quantize_activation(x)
    rest, xo = xd.scatter(1, outliers, 0.0), xd.gather(1, outliers)  # [M, K], [M, J]
    e = rest - sx[:, None] * xq  # [M, K]
    st = screen.stats[:, : screen.vocab].to(torch.float64)  # [6, V]
    q = screen.rows()[:, :cols].to(torch.float64)  # [V, K]
    exact = torch.stack([q[:, o] @ v for o, v in zip(outliers, xo)])  # [M, V]: the outliers' products
    a = st[0] * (sx[:, None] * (xq @ q.T) + exact)  # [M, V]
    r2, rinf = rest.norm(dim=1)[:, None], rest.abs().amax(dim=1)[:, None]  # [M, 1]
    e2, einf = e.norm(dim=1)[:, None], e.abs().amax(dim=1)[:, None]
    acc_error = 2 * (cols + 64) * 2.0**-24
    b = (torch.minimum(st[1] * r2, st[2] * rinf) + st[0] / 2 * xo.abs().sum(dim=1)[:, None]
         + torch.minimum(st[3] * e2, st[4] * einf) + st[5] * xd.abs().amax(dim=1)[:, None] * acc_error)
    return a, b


def max_candidates(vocab: int) -> int:
    """Rows the exact pass may take before the full head is the cheaper call (an eighth of the head: the screen
    itself reads 0.5-0.67x of its bytes)."""
    return max(64, vocab // 8)


def screened_argmax(x: Tensor, screen: ArgmaxScreen, exact: list[Tensor], ext) -> Tensor | None:
    """Token ids [M] (the first largest bf16 logit of each row of ``x W^T``) through the compiled kernel
    ``ext.screened_argmax``; ``exact`` is the head's decode weight (``[rows]`` or ``[low, codes, table]``).
    None where the screen cannot decide: compute the head."""
    ids = ext.screened_argmax(x, screen.q, screen.qsum, screen.stats, exact, screen.vocab,
                              max_candidates(screen.vocab))
    return None if bool((ids < 0).any()) else ids
