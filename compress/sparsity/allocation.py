"""Per-layer sparsity allocation: one sparsity per decoder layer, as pure functions.

Contract: every allocator returns ``list[float]`` of length L (one rate per
decoder layer, shared by that layer's targeted linears) whose
parameter-weighted mean equals the target ``S`` to float precision::

    sum(s_i * p_i) / sum(p_i) == S        (p_i = prunable parameters of layer i)

``layer_params`` defaults to equal weights. Every rate lies in ``[0, 1)``
(the ceiling is :data:`MAX_SPARSITY`, the largest float below 1). Illegal
inputs raise ``ValueError`` naming the bad value and the legal range.

Allocators (see ``docs/algorithms.md`` section 2):

- ``uniform``: s_i = S.
- ``explicit``: the user's list (checked; snapped to the target when one is given).
- ``owl``: more Wanda-score outliers -> less sparsity, spread 2 * lam, then shifted
  so the weighted mean is S.
- ``atp``: arithmetic progression rising with depth, common difference beta.
- ``rmi``: redundancy from linear CKA of layer inputs -> importance -> the exact
  solution of a box-constrained linear program.

Nothing here knows about models or devices; the statistics (outlier ratios,
layer-input representations or their Gram matrices) are computed by the caller.
:data:`ALLOCATIONS` says, by user-facing name, which inputs each one needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MAX_SPARSITY = math.nextafter(1.0, 0.0)  # largest legal rate: every rate lies in [0, 1)
_TARGET_MISMATCH_TOL = 1e-6  # explicit rates may miss the target by this much (then snapped)
_GRAM_CHUNK = 1 << 16  # feature columns per float64 chunk when forming a Gram matrix


# -- validation ------------------------------------------------------------------------


def _check_target(target: float) -> float:
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0.0 <= target < 1.0):
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
    return float(target)


def _check_num_layers(num_layers: int) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    return num_layers


def _check_rates(rates: Sequence[float], what: str = "rates") -> list[float]:
    rates = [float(r) for r in rates]
    if not rates:
        raise ValueError(f"{what} must hold one sparsity per layer (at least 1), got an empty list")
    for i, r in enumerate(rates):
        if not (math.isfinite(r) and 0.0 <= r < 1.0):
            raise ValueError(f"{what}[{i}] = {r!r} is outside the legal range [0, 1)")
    return rates


def _check_finite(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what} must hold one value per layer (at least 1), got an empty list")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{what}[{i}] = {v!r} must be a finite number")
    return values


def _check_nonnegative(value: float, what: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _weights(layer_params: Sequence[float] | None, num_layers: int) -> list[float]:
    """Per-layer weights of the mean: ``layer_params`` (all > 0) or equal weights."""
    if layer_params is None:
        return [1.0] * num_layers
    weights = [float(p) for p in layer_params]
    if len(weights) != num_layers:
        raise ValueError(f"layer_params has {len(weights)} entries but there are {num_layers} layers")
    for i, p in enumerate(weights):
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"layer_params[{i}] = {p!r} must be a positive number of parameters")
    return weights


def _check_length(values: Sequence[Any], num_layers: int, what: str) -> None:
    if len(values) != num_layers:
        raise ValueError(f"{what} has {len(values)} entries but there are {num_layers} layers")


# -- the weighted mean and the exact shift ---------------------------------------------


def weighted_mean(rates: Sequence[float], layer_params: Sequence[float] | None = None) -> float:
    """``sum(s_i * p_i) / sum(p_i)``; equal weights when ``layer_params`` is None."""
    rates = [float(r) for r in rates]
    if not rates:
        raise ValueError("rates must hold at least one value")
    weights = _weights(layer_params, len(rates))
    return math.fsum(r * w for r, w in zip(rates, weights)) / math.fsum(weights)


def _clip(values: Sequence[float], shift: float, lo: float, hi: float) -> list[float]:
    return [min(hi, max(lo, v + shift)) for v in values]


def _fit_mean(values: Sequence[float], target: float, weights: Sequence[float],
              lo: float = 0.0, hi: float = MAX_SPARSITY) -> list[float]:
    """``clip(v_i + c, lo, hi)`` with the one shift ``c`` whose weighted mean is ``target``.

    Without clipping this is the plain shift; layers that hit a bound stay there
    and the others share the rest of the shift (water filling), so the order of
    the values is preserved. Solved exactly on the piecewise-linear mean.
    """
    if not lo <= target <= hi:
        raise ValueError(f"no rates in [{lo}, {hi}] can have weighted mean {target}")
    total = math.fsum(weights)

    def excess(c: float) -> float:  # weighted mean at shift c, minus the target, times total
        return math.fsum(w * x for w, x in zip(weights, _clip(values, c, lo, hi))) - target * total

    breaks = sorted({lo - v for v in values} | {hi - v for v in values})  # where a layer hits a bound
    k = next((k for k, b in enumerate(breaks) if excess(b) >= 0), len(breaks) - 1)
    if k == 0:  # target == lo: every layer at the lower bound
        return _clip(values, breaks[0], lo, hi)
    inside = _clip(values, 0.5 * (breaks[k - 1] + breaks[k]), lo, hi)  # which layers are free here
    free = [lo < x < hi for x in inside]
    w_free = math.fsum(w for w, f in zip(weights, free) if f)
    if w_free == 0:  # an interval narrower than float resolution: already exact to rounding
        return inside
    fixed = math.fsum(w * x for w, x, f in zip(weights, inside, free) if not f)
    shift = (target * total - fixed - math.fsum(w * v for w, v, f in zip(weights, values, free) if f)) / w_free
    return [min(hi, max(lo, v + shift)) if f else x for v, x, f in zip(values, inside, free)]


# -- uniform and explicit -------------------------------------------------------------------


def uniform(num_layers: int, target: float, layer_params: Sequence[float] | None = None) -> list[float]:
    """s_i = S for every layer (the weighted mean is S for any weights)."""
    num_layers, target = _check_num_layers(num_layers), _check_target(target)
    _weights(layer_params, num_layers)
    return [target] * num_layers


def explicit(rates: Sequence[float], target: float | None = None,
             layer_params: Sequence[float] | None = None) -> list[float]:
    """The user's per-layer rates, each in [0, 1).

    With a ``target``, the weighted mean must be within 1e-6 of it (else
    ValueError stating both numbers) and the rates are shifted by that tiny
    remainder so the mean is exact. Without one, the rates come back unchanged.
    """
    rates = _check_rates(rates)
    weights = _weights(layer_params, len(rates))
    if target is None:
        return rates
    target = _check_target(target)
    mean = weighted_mean(rates, weights)
    if abs(mean - target) > _TARGET_MISMATCH_TOL:
        raise ValueError(f"explicit rates have weighted mean {mean!r} but the target sparsity is {target!r} "
                         f"(they must agree within {_TARGET_MISMATCH_TOL})")
    return _fit_mean(rates, target, weights)


# -- OWL --------------------------------------------------------------------------------------


def outlier_ratio(scores: Tensor | Sequence[Tensor], m: float = 5.0) -> float:
    """Fraction of a layer's Wanda scores greater than ``m`` times their mean.

    ``scores`` is one tensor or the list of the layer's linears' score tensors
    (any shapes), pooled: one mean over all their entries, one count.
    """
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    count = sum(t.numel() for t in tensors)
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"outlier multiplier m must be a finite number > 0, got {m!r}")
    mean = math.fsum(float(t.sum(dtype=torch.float64)) for t in tensors) / count
    outliers = sum(int((t > m * mean).sum()) for t in tensors)
    return outliers / count


def owl(outlier_ratios: Sequence[float], target: float, lam: float = 0.08,
        layer_params: Sequence[float] | None = None) -> list[float]:
    """OWL: s_i = S + lam - 2 lam * minmax(D)_i, then shifted to weighted mean S.

    The layer with the highest outlier ratio D gets the lowest rate; the spread
    max(s) - min(s) is 2 lam (as in the reference code: after the shift the
    rates lie within S +- 2 lam, not necessarily S +- lam). Equal ratios give
    uniform. Rates leaving [0, 1) are clipped and the rest re-shifted.
    """
    ratios = _check_finite(outlier_ratios, "outlier_ratios")
    target, lam = _check_target(target), _check_nonnegative(lam, "OWL lam")
    weights = _weights(layer_params, len(ratios))
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [target] * len(ratios)
    raw = [target + lam - 2.0 * lam * (d - lo) / (hi - lo) for d in ratios]  # in [S - lam, S + lam]
    return _fit_mean(raw, target, weights)


# -- ATP -------------------------------------------------------------------------------------


def atp_beta_limit(num_layers: int, target: float) -> float:
    """Largest legal ATP beta: min(2S, 2(1 - S)) / (L - 1); 0.0 for one layer (only beta 0)."""
    num_layers, target = _check_num_layers(num_layers), _check_target(target)
    if num_layers == 1:
        return 0.0
    return min(2.0 * target, 2.0 * (1.0 - target)) / (num_layers - 1)


def _atp_range(num_layers: int, target: float, limit: float) -> str:
    if num_layers == 1:
        return "only beta = 0 is legal for a single layer"
    return (f"the legal range for L={num_layers}, S={target} is 0 < beta <= {limit!r} "
            f"(= min(2S, 2(1-S)) / (L-1)), or beta = 0 for uniform")


def atp(num_layers: int, target: float, beta: float,
        layer_params: Sequence[float] | None = None) -> list[float]:
    """ATP: s_i = S - beta (L - 1) / 2 + i beta, non-decreasing with depth.

    ``0 < beta <= atp_beta_limit(L, S)`` or ``beta == 0`` (uniform); anything
    else raises ValueError stating the legal range. With unequal layer_params
    all rates are shifted by one constant so the weighted mean is exact
    (clipped into [0, 1) with the rest re-shifted, which keeps the order).
    At beta == limit an end layer reaches 0 or (for S >= 0.5) MAX_SPARSITY.
    """
    num_layers, target = _check_num_layers(num_layers), _check_target(target)
    weights = _weights(layer_params, num_layers)
    limit = atp_beta_limit(num_layers, target)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and 0.0 <= beta <= limit):
        raise ValueError(f"ATP beta = {beta!r} is illegal: {_atp_range(num_layers, target, limit)}")
    start = target - beta * (num_layers - 1) / 2.0
    return _fit_mean([start + i * beta for i in range(num_layers)], target, weights)


def atp_beta_grid(num_layers: int, target: float, step: float = 0.002) -> list[float]:
    """The ATP search grid step, 2 step, ... up to the limit (never above it).

    A multiple of ``step`` that overshoots the limit by float rounding only is
    replaced by the limit itself. Empty when no positive beta is legal (L == 1).
    """
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise ValueError(f"ATP grid step must be a finite number > 0, got {step!r}")
    limit = atp_beta_limit(num_layers, target)
    count = math.floor(limit / step + 1e-9)
    return [min(round(k * step, 12), limit) for k in range(1, count + 1)]


# -- RMI: linear CKA, importance, the exact LP ------------------------------------------------


def centered_gram(x: Tensor) -> Tensor:
    """H X X^T H for ``x: [n, ...]`` (one row per sample, flattened) -> [n, n] float64.

    Computed as (HX)(HX)^T - features centered over the samples first, which is
    the same matrix with less cancellation - in float64 chunks of columns, so a
    bfloat16 ``[n, T*D]`` input is never copied to float64 whole.
    """
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"need a [n, ...] tensor with n >= 2 samples, got shape {tuple(x.shape)}")
    flat = x.detach().reshape(x.shape[0], -1)  # [n, d]
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)  # [n, n]
    for start in range(0, flat.shape[1], _GRAM_CHUNK):
        cols = flat[:, start:start + _GRAM_CHUNK].to(torch.float64)  # [n, chunk]
        cols = cols - cols.mean(dim=0, keepdim=True)
        gram += cols @ cols.T
    return gram


def _cka_from_centered(grams: Tensor) -> Tensor:
    """grams: [L, n, n] centered Grams -> [L, L] linear CKA (symmetric, unit diagonal)."""
    flat = grams.reshape(grams.shape[0], -1)  # [L, n*n]
    hsic = flat @ flat.T  # [L, L]: trace(Kc Mc) = <Kc, Mc>_F
    self_hsic = hsic.diagonal()
    dead = (self_hsic <= 0).nonzero().flatten().tolist()
    if dead:
        raise ValueError(f"representation(s) {dead} do not vary across samples; CKA is undefined for them")
    norms = self_hsic.sqrt()
    cka = (hsic / norms[:, None] / norms[None, :]).clamp(0.0, 1.0)
    cka = 0.5 * (cka + cka.T)
    cka.fill_diagonal_(1.0)
    return cka


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of ``x: [n, d1]`` and ``y: [n, d2]`` (rows = the same n samples), in [0, 1].

    HSIC(K, M) = trace(K H M H) with K = X X^T, M = Y Y^T, H = I - 11^T / n;
    CKA = HSIC(K, M) / sqrt(HSIC(K, K) HSIC(M, M)), in float64.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    return float(_cka_from_centered(torch.stack([centered_gram(x), centered_gram(y)]))[0, 1])


def cka_from_grams(grams: Sequence[Tensor]) -> Tensor:
    """[L, L] linear CKA from each layer's (uncentered or centered) Gram ``[n, n]`` of its input."""
    if not grams:
        raise ValueError("cka_from_grams needs at least one Gram matrix")
    n = grams[0].shape[0]
    for i, g in enumerate(grams):
        if g.shape != (n, n):
            raise ValueError(f"grams[{i}] has shape {tuple(g.shape)}, expected ({n}, {n})")
    k = torch.stack([g.detach().to(torch.float64) for g in grams])  # [L, n, n]
    k = k - k.mean(dim=1, keepdim=True) - k.mean(dim=2, keepdim=True) + k.mean(dim=(1, 2), keepdim=True)  # H K H
    return _cka_from_centered(k)


def cka_matrix(reps: Sequence[Tensor]) -> Tensor:
    """[L, L] linear CKA between layers; ``reps[i]: [n, T*D]`` (or [n, T, D]) is the input
    hidden state of layer i, one row per calibration sample (the same samples for every layer).
    Symmetric, unit diagonal, float64."""
    if len(reps) == 0:
        raise ValueError("cka_matrix needs at least one layer's representations")
    n = reps[0].shape[0]
    for i, r in enumerate(reps):
        if r.shape[0] != n:
            raise ValueError(f"reps[{i}] has {r.shape[0]} samples, reps[0] has {n}; use the same samples")
    return _cka_from_centered(torch.stack([centered_gram(r) for r in reps]))  # [L, n, n] -> [L, L]


def rmi_importance(cka: Tensor, gamma: float) -> Tensor:
    """cka: [L, L] -> importance [L] float64: exp(-gamma * redundancy_i), where
    redundancy_i = sum_{j != i} CKA(i, j), normalised to sum to 1 (uniform when all are 0)."""
    if cka.dim() != 2 or cka.shape[0] != cka.shape[1] or cka.shape[0] < 1:
        raise ValueError(f"cka must be a square [L, L] matrix, got shape {tuple(cka.shape)}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
        raise ValueError(f"RMI gamma must be a finite number, got {gamma!r}")
    c = cka.detach().to(torch.float64).cpu()
    redundancy = c.sum(dim=1) - c.diagonal()  # [L]
    total = float(redundancy.sum())
    if total > 0:
        redundancy = redundancy / total
    else:
        redundancy = torch.full_like(redundancy, 1.0 / c.shape[0])
    return torch.exp(-gamma * redundancy)


def rmi_delta(target: float) -> float:
    """LoSA's bound on |s_i - S|: 0.01 (S <= 0.5), 0.02 (S <= 0.6), 0.03 (above)."""
    target = _check_target(target)
    return 0.01 if target <= 0.5 else 0.02 if target <= 0.6 else 0.03


def solve_allocation_lp(importance: Tensor | Sequence[float], target: float, delta: float,
                        layer_params: Sequence[float] | None = None) -> list[float]:
    """Exact argmin of sum_i p_i s_i importance_i s.t. weighted mean(s) = S and
    max(0, S - delta) <= s_i <= min(S + delta, MAX_SPARSITY).

    Fractional knapsack: everyone starts at the lower bound; layers are raised to
    the upper bound in order of increasing importance (ties: lower layer index
    first) until the budget is spent; at most one layer ends in between.
    """
    imp = _check_finite(importance.tolist() if isinstance(importance, Tensor) else importance, "importance")
    target, delta = _check_target(target), _check_nonnegative(delta, "RMI delta")
    weights = _weights(layer_params, len(imp))
    lo, hi = max(0.0, target - delta), min(MAX_SPARSITY, target + delta)
    rates = [lo] * len(imp)
    budget = (target - lo) * math.fsum(weights)  # sum_i p_i (s_i - lo) still to place
    for i in sorted(range(len(imp)), key=lambda j: (imp[j], j)):
        room = weights[i] * (hi - lo)
        if budget >= room:
            rates[i], budget = hi, budget - room
        else:
            rates[i], budget = lo + budget / weights[i], 0.0
            break
    return rates


def rmi(similarity: Tensor | Sequence[Tensor], target: float, gamma: float = 1.0,
        delta: float | None = None, layer_params: Sequence[float] | None = None) -> list[float]:
    """RMI end to end. ``similarity`` is either the [L, L] CKA matrix (a 2-D tensor) or the
    per-layer representations (a sequence of [n, ...] tensors, or one [L, n, ...] tensor).
    ``delta`` defaults to :func:`rmi_delta`."""
    is_cka = isinstance(similarity, Tensor) and similarity.dim() == 2
    cka = similarity if is_cka else cka_matrix(list(similarity))
    delta = rmi_delta(target) if delta is None else delta
    return solve_allocation_lp(rmi_importance(cka, gamma), target, delta, layer_params)


# -- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocationSpec:
    """An allocation by its recipe name, and the inputs the caller must compute for it.

    ``fn(num_layers, target, layer_params, **{need: value for need in needs}, **options)``
    returns the rates; options are the method's keyword hyper-parameters
    (owl: ``lam``; rmi: ``gamma``, ``delta``).
    """

    name: str
    needs: tuple[str, ...]
    fn: Callable[..., list[float]]


def _uniform_step(num_layers: int, target: float, layer_params: Sequence[float] | None = None) -> list[float]:
    return uniform(num_layers, target, layer_params)


def _owl_step(num_layers: int, target: float, layer_params: Sequence[float] | None = None, *,
              outlier_ratios: Sequence[float], lam: float = 0.08) -> list[float]:
    _check_length(outlier_ratios, num_layers, "outlier_ratios")
    return owl(outlier_ratios, target, lam, layer_params)


def _atp_step(num_layers: int, target: float, layer_params: Sequence[float] | None = None, *,
              beta: float) -> list[float]:
    return atp(num_layers, target, beta, layer_params)


def _rmi_step(num_layers: int, target: float, layer_params: Sequence[float] | None = None, *,
              representations: Tensor | Sequence[Tensor], gamma: float = 1.0,
              delta: float | None = None) -> list[float]:
    _check_length(representations, num_layers, "representations")
    return rmi(representations, target, gamma, delta, layer_params)


def _explicit_step(num_layers: int, target: float, layer_params: Sequence[float] | None = None, *,
                   rates: Sequence[float]) -> list[float]:
    _check_length(rates, num_layers, "rates")
    return explicit(rates, target, layer_params)


ALLOCATIONS: dict[str, AllocationSpec] = {
    spec.name: spec for spec in (
        AllocationSpec("uniform", (), _uniform_step),
        AllocationSpec("owl", ("outlier_ratios",), _owl_step),
        AllocationSpec("atp", ("beta",), _atp_step),
        AllocationSpec("rmi", ("representations",), _rmi_step),  # reps, or the [L, L] CKA matrix
        AllocationSpec("explicit", ("rates",), _explicit_step),
    )
}


def get_allocation(name: str) -> AllocationSpec:
    """The registered allocation ``name``; ValueError listing the known names otherwise."""
    if name not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {name!r}; known: {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[name]


def allocate(name: str, num_layers: int, target: float, layer_params: Sequence[float] | None = None,
             **inputs: Any) -> list[float]:
    """Run allocation ``name``; ``inputs`` are its needs plus optional hyper-parameters."""
    spec = get_allocation(name)
    missing = [need for need in spec.needs if inputs.get(need) is None]
    if missing:
        raise ValueError(f"allocation {name!r} needs {', '.join(missing)}")
    return spec.fn(num_layers, target, layer_params, **inputs)
