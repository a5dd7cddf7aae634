"""Unstructured and N:M pruning of one linear layer.

Contract: everything here works on one linear's weight ``w: [out, in]`` and on
:class:`InputStats` of that linear's input collected over calibration tokens;
nothing knows about models, layers or devices. Functions are pure: they never
modify their arguments and return new tensors. Scores and updates are computed
in float32; the pruned weight comes back in ``w``'s dtype and device.

Sparsity is counted per output row: unstructured pruning removes exactly
``prune_counts(in, s) == int(in * s)`` weights from every row; an N:M pattern
keeps exactly ``n`` of every ``m`` consecutive inputs of every row (and then
decides the sparsity alone: ``sparsity`` must equal ``pattern_sparsity``).
Pruned entries are exactly 0 in the result.

Pruners are found by the names users type (``PRUNERS``, ``get_pruner``):
"magnitude" (no statistics), "wanda" (needs ``sq_sum``) and "sparsegpt"
(needs ``hessian``; returns updated weights, not only a mask).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

Pattern = tuple[int, int] | None  # None = unstructured; (n, m) = keep n of every m consecutive inputs


class NotPositiveDefiniteError(RuntimeError):
    """SparseGPT's damped Hessian stayed non positive definite after every retry."""


# -- statistics -----------------------------------------------------------------


@dataclass
class InputStats:
    """Running statistics of a linear's input over calibration tokens (accumulated in float32).

    ``sq_sum[j]`` is the sum over tokens of ``x_j ** 2`` (Wanda's ``||X_j||_2^2``);
    ``hessian`` is the sum over tokens of ``x x^T`` (SparseGPT), or None when not
    requested. Both are sums, not means: :func:`sparsegpt_prune` divides by ``tokens``.
    """

    tokens: int
    sq_sum: Tensor  # [in]
    hessian: Tensor | None  # [in, in]

    @classmethod
    def empty(cls, in_features: int, with_hessian: bool, device: torch.device | str | None = None) -> InputStats:
        sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if with_hessian else None
        return cls(tokens=0, sq_sum=sq_sum, hessian=hessian)

    @property
    def in_features(self) -> int:
        return self.sq_sum.shape[0]

    def update(self, x: Tensor) -> None:
        """Add a batch ``x: [..., in]`` (any dtype/device; moved to the stats' device)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, statistics expect {self.in_features}")
        # our own float32 copy [tokens, in], so squaring it in place never touches the caller's activations
        x = x.detach().reshape(-1, self.in_features).to(self.sq_sum.device, torch.float32, copy=True)
        self.tokens += x.shape[0]
        if self.hessian is not None:
            self.hessian += x.T @ x
        self.sq_sum += x.square_().sum(dim=0)


# -- validation -----------------------------------------------------------------


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_pattern(pattern: Pattern) -> Pattern:
    if pattern is None:
        return None
    n, m = pattern
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"an N:M pattern needs integers 0 < n < m, got {pattern}")
    return (n, m)


def check_request(sparsity: float, pattern: Pattern) -> None:
    """Validate a (sparsity, pattern) pair; with a pattern the two must agree."""
    check_sparsity(sparsity)
    if check_pattern(pattern) is not None and not math.isclose(sparsity, pattern_sparsity(pattern), abs_tol=1e-6):
        n, m = pattern
        raise ValueError(f"pattern {n}:{m} means sparsity {pattern_sparsity(pattern)}, got sparsity {sparsity}")


def _check_divisible(in_features: int, m: int, shape: tuple[int, ...]) -> None:
    if in_features % m != 0:
        raise ValueError(f"N:M pruning needs in_features divisible by m: weight shape {tuple(shape)}, m={m}")


# -- patterns -------------------------------------------------------------------

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PATTERN_FORMS = "None, 'unstructured', or 'n:m' with integers 0 < n < m (e.g. '2:4', '4:8')"


def parse_pattern(text: str | None) -> Pattern:
    """None/'unstructured' -> None; 'n:m' -> (n, m) with 0 < n < m; anything else -> ValueError."""
    if text is None or text.strip().lower() == "unstructured":
        return None
    match = _PATTERN_RE.match(text)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"bad sparsity pattern {text!r}; accepted: {_PATTERN_FORMS}")
    return int(match[1]), int(match[2])


def pattern_sparsity(pattern: tuple[int, int]) -> float:
    """Fraction of weights an N:M pattern removes: (m - n) / m."""
    if check_pattern(pattern) is None:
        raise ValueError("an unstructured pattern has no fixed sparsity")
    n, m = pattern
    return (m - n) / m


# -- masks ----------------------------------------------------------------------


def prune_counts(in_features: int, sparsity: float) -> int:
    """Weights removed from each row of a linear with ``in_features`` inputs."""
    return int(in_features * check_sparsity(sparsity))


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool [..., c] marking the ``k`` lowest scores of every row (ties: lower index first)."""
    order = torch.argsort(scores, dim=-1, stable=True)  # [..., c]
    lowest = torch.zeros_like(scores, dtype=torch.bool)
    return lowest.scatter_(-1, order[..., :k], True)


def row_mask_from_scores(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask [out, in]: every row drops exactly ``int(in * sparsity)`` lowest scores."""
    return ~lowest_k_mask(scores, prune_counts(scores.shape[-1], sparsity))


def nm_mask_from_scores(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask [out, in]: the top ``n`` scores of every ``m`` consecutive inputs of every row."""
    check_pattern((n, m))
    out_features, in_features = scores.shape
    _check_divisible(in_features, m, scores.shape)
    groups = scores.reshape(out_features, in_features // m, m)  # [out, in/m, m]
    return ~lowest_k_mask(groups, m - n).reshape(out_features, in_features)


def mask_from_scores(scores: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """Keep-mask for a (sparsity, pattern) request; see :func:`check_request`."""
    check_request(sparsity, pattern)
    if pattern is None:
        return row_mask_from_scores(scores, sparsity)
    return nm_mask_from_scores(scores, *pattern)


# -- scores ---------------------------------------------------------------------


def magnitude_scores(w: Tensor) -> Tensor:
    """|w| in float32; w: [out, in]."""
    return w.float().abs()


def wanda_scores(w: Tensor, stats: InputStats) -> Tensor:
    """|w_ij| * ||X_j||_2 in float32; w: [out, in], stats.sq_sum: [in]."""
    if stats.in_features != w.shape[-1]:
        raise ValueError(f"statistics have {stats.in_features} features, weight shape is {tuple(w.shape)}")
    norms = stats.sq_sum.to(w.device, torch.float32).sqrt()  # [in]
    return w.float().abs() * norms[None, :]


def apply_mask(w: Tensor, keep: Tensor) -> Tensor:
    """New tensor: ``w`` where ``keep``, exactly 0 elsewhere (same dtype)."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


# -- SparseGPT ------------------------------------------------------------------


def sparsegpt_hessian(stats: InputStats, device: torch.device) -> tuple[Tensor, Tensor]:
    """(H = 2 X X^T / n with dead diagonal entries set to 1, dead: [in] bool)."""
    if stats.hessian is None or stats.tokens == 0:
        raise ValueError("sparsegpt needs InputStats with a hessian and at least one token")
    h = stats.hessian.to(device, torch.float32) * (2.0 / stats.tokens)  # [in, in]
    dead = torch.diagonal(h) == 0  # [in]
    h[dead, dead] = 1.0
    return h, dead


def _try_upper_inverse_cholesky(h: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of (h + damp I)^-1, or None if not positive definite."""
    damped = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if info.item() == 0 and bool(torch.isfinite(upper).all()) else None


def inverse_hessian_factor(h: Tensor, percdamp: float, retries: int = 3) -> Tensor:
    """Hinv [in, in]: upper Cholesky of (H + damp I)^-1, damp = percdamp * mean(diag H).

    A failed factorisation is retried with 10x the damping, ``retries`` times
    (from at least 1e-3 * mean(diag H) when ``percdamp`` is 0).
    """
    mean_diag = float(torch.diagonal(h).mean())
    fractions = [percdamp] + [max(percdamp, 1e-3) * 10**k for k in range(1, retries + 1)]
    for fraction in fractions:
        factor = _try_upper_inverse_cholesky(h, fraction * mean_diag)
        if factor is not None:
            return factor
    raise NotPositiveDefiniteError(
        f"Hessian [{h.shape[0]}x{h.shape[0]}] is not positive definite even with damping "
        f"{fractions[-1]} * mean(diag H); check the calibration inputs for NaN/inf"
    )


def _obs_scores(w1: Tensor, hinv_diag: Tensor) -> Tensor:
    """SparseGPT saliency w^2 / [H^-1]_jj^2; w1: [out, c], hinv_diag: [c]."""
    return w1.square() / hinv_diag.square()[None, :]


def _sparsegpt_block(w1: Tensor, hinv1: Tensor, prune_per_row: int, pattern: Pattern) -> tuple[Tensor, Tensor]:
    """Prune one column block with OBS updates inside it.

    w1: [out, c] current weights, hinv1: [c, c] block of the upper factor.
    Returns (q1 [out, c] pruned weights, err1 [out, c] scaled errors to spread right).
    """
    w1 = w1.clone()
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    hinv_diag = torch.diagonal(hinv1)  # [c]
    if pattern is None:
        prune1 = lowest_k_mask(_obs_scores(w1, hinv_diag), prune_per_row)  # [out, c]
    else:
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
    for i in range(w1.shape[1]):
        if pattern is not None and i % pattern[1] == 0:
            n, m = pattern
            window = _obs_scores(w1[:, i : i + m], hinv_diag[i : i + m])  # [out, m], from updated weights
            prune1[:, i : i + m] = lowest_k_mask(window, m - n)
        w = w1[:, i]  # [out]
        q = w.masked_fill(prune1[:, i], 0.0)
        err = (w - q) / hinv1[i, i]  # [out]
        w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
        q1[:, i], err1[:, i] = q, err
    return q1, err1


def _block_prune_count(start: int, end: int, sparsity: float) -> int:
    """Per-row prunes in columns [start, end): telescopes to int(in * s) over all blocks."""
    return prune_counts(end, sparsity) - prune_counts(start, sparsity)


def sparsegpt_prune(
    w: Tensor,
    stats: InputStats,
    sparsity: float,
    pattern: Pattern = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """SparseGPT (OBS with lazy block updates) of ``w: [out, in]``; returns new weights in w's dtype.

    Unstructured: block [a, b) prunes ``int(b*s) - int(a*s)`` weights of every
    row, so each row loses exactly ``int(in*s)``. N:M: the mask of columns
    [i, i+m) is chosen at column i from the updated weights (needs
    ``in % m == 0`` and ``blocksize % m == 0``). Dead inputs (zero Hessian
    diagonal) get zero weights.
    """
    check_request(sparsity, pattern)
    out_features, in_features = w.shape
    if stats.in_features != in_features:
        raise ValueError(f"statistics have {stats.in_features} features, weight shape is {tuple(w.shape)}")
    if pattern is not None:
        _check_divisible(in_features, pattern[1], w.shape)
        if blocksize % pattern[1] != 0:
            raise ValueError(f"blocksize {blocksize} must be a multiple of m={pattern[1]}")
    h, dead = sparsegpt_hessian(stats, w.device)
    hinv = inverse_hessian_factor(h, percdamp)  # [in, in], upper triangular
    weights = w.float().masked_fill(dead[None, :], 0.0)  # [out, in]
    for start in range(0, in_features, blocksize):
        end = min(start + blocksize, in_features)
        count = _block_prune_count(start, end, sparsity)
        q1, err1 = _sparsegpt_block(weights[:, start:end], hinv[start:end, start:end], count, pattern)
        weights[:, start:end] = q1
        weights[:, end:] -= err1 @ hinv[start:end, end:]
    return weights.to(w.dtype)


# -- evaluation -----------------------------------------------------------------


def layer_reconstruction_error(w_dense: Tensor, w_pruned: Tensor, x: Tensor) -> float:
    """||x W_dense^T - x W_pruned^T||_F^2 / ||x W_dense^T||_F^2 for x: [..., in] (float32)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    dense = x @ w_dense.float().T  # [tokens, out]
    pruned = x @ w_pruned.float().T
    return float((dense - pruned).square().sum() / dense.square().sum())


# -- registry -------------------------------------------------------------------


class Pruner:
    """One pruning criterion: ``prune(w, stats, sparsity, pattern)`` returns a new pruned weight.

    ``needs_sq_sum`` / ``needs_hessian`` tell the calibration loop which
    :class:`InputStats` to collect; a pruner needing neither accepts ``stats=None``.
    Subclasses are dataclasses whose fields are the recipe options.
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    needs_sq_sum: ClassVar[bool] = False

    def prune(self, w: Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern = None) -> Tensor:
        raise NotImplementedError


PRUNERS: dict[str, type[Pruner]] = {}


def register(cls: type[Pruner]) -> type[Pruner]:
    PRUNERS[cls.name] = cls
    return cls


class MaskPruner(Pruner):
    """A pruner that only masks: scores from ``scores``, mask by row or N:M, weights kept as they are."""

    def scores(self, w: Tensor, stats: InputStats | None) -> Tensor:
        raise NotImplementedError

    def prune(self, w: Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern = None) -> Tensor:
        keep = mask_from_scores(self.scores(w, stats), sparsity, pattern)  # [out, in]
        return apply_mask(w, keep)


def _require_stats(stats: InputStats | None, name: str) -> InputStats:
    if stats is None:
        raise ValueError(f"pruner {name!r} needs input statistics, got None")
    return stats


@register
@dataclass
class MagnitudePruner(MaskPruner):
    """Prune the smallest |w| of every row (or of every N:M group)."""

    name: ClassVar[str] = "magnitude"

    def scores(self, w: Tensor, stats: InputStats | None) -> Tensor:
        return magnitude_scores(w)


@register
@dataclass
class WandaPruner(MaskPruner):
    """Wanda: prune the smallest |w_ij| * ||X_j||_2 of every row (or N:M group)."""

    name: ClassVar[str] = "wanda"
    needs_sq_sum: ClassVar[bool] = True

    def scores(self, w: Tensor, stats: InputStats | None) -> Tensor:
        return wanda_scores(w, _require_stats(stats, self.name))


@register
@dataclass
class SparseGPTPruner(Pruner):
    """SparseGPT: OBS-style pruning with weight updates; see :func:`sparsegpt_prune`."""

    name: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.blocksize < 1 or self.percdamp < 0:
            raise ValueError(f"sparsegpt needs blocksize >= 1 and percdamp >= 0, got {self}")

    def prune(self, w: Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern = None) -> Tensor:
        stats = _require_stats(stats, self.name)
        return sparsegpt_prune(w, stats, sparsity, pattern, self.blocksize, self.percdamp)


def get_pruner(name: str, **options) -> Pruner:
    """Build the pruner registered as ``name`` with recipe ``options`` (unknown keys rejected)."""
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; available: {sorted(PRUNERS)}")
    cls = PRUNERS[name]
    allowed = {f.name for f in fields(cls)}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"pruner {name!r} has no options {sorted(unknown)}; accepted: {sorted(allowed)}")
    return cls(**options)
