"""LoSA's schedule as pure functions: sparsity per round, nested masks, layer error, ranks.

Contract (``../shared/docs/algorithms.md`` section 3): nothing here knows
about models; every function takes tensors or lists and returns new ones.

- :func:`cubic_schedule`: s_t = S - S (1 - t/T)^3, t = 1..T; the last round is S exactly.
- :func:`mean_ranks`: the mean rank of each round, growing by ``step`` (6 -> 10 for T = 5).
- :func:`nested_rates`: RMI's exact LP, with each layer's rate floored at its previous
  rate so masks can be nested (a weight pruned once stays pruned) and the
  weighted mean still equals the round's target.
- :func:`nested_prune`: a new keep-mask that is a subset of the old one.
- :func:`reconstruction_error`: l = sum(((Y_dense - Y_sparse) / sigma_c)^2) / D.
- :func:`allocate_ranks`: r_i = clip(round(l_i / sum(l) * r_bar * L), 1, r_max),
  repaired so sum(r_i) == r_bar * L exactly; a budget outside [L, r_max L] is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from compress.sparsity import allocation as alloc
from compress.sparsity.pruners import InputStats, MaskPruner, Pruner, apply_mask, row_mask_from_scores


def cubic_schedule(target: float, rounds: int) -> list[float]:
    """[s_1, ..., s_T] with s_t = S - S (1 - t / T)^3 (for S = 0.7, T = 5: 0.34, 0.55, 0.66, 0.69, 0.70)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    return [target - target * (1.0 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def mean_ranks(start: int, step: int, rounds: int) -> list[int]:
    """Mean adapter rank of each round: start, start + step, ..."""
    if start < 1 or step < 0:
        raise ValueError(f"the mean rank must start >= 1 and grow by a step >= 0, got {start}, {step}")
    return [start + t * step for t in range(rounds)]


def _box_lp(importance: Sequence[float], target: float, lo: Sequence[float], hi: Sequence[float],
            weights: Sequence[float]) -> list[float]:
    """argmin sum p_i s_i imp_i s.t. sum p_i s_i = S sum p_i, lo_i <= s_i <= hi_i (fractional knapsack)."""
    rates = list(lo)
    budget = target * math.fsum(weights) - math.fsum(p * s for p, s in zip(weights, rates))
    if budget < -1e-12:
        raise ValueError(f"the floors alone exceed the target {target}")
    for i in sorted(range(len(rates)), key=lambda j: (importance[j], j)):
        room = weights[i] * (hi[i] - lo[i])
        if budget >= room:
            rates[i], budget = hi[i], budget - room
        else:
            rates[i], budget = lo[i] + budget / weights[i], 0.0
            break
    return rates


def nested_rates(importance: Sequence[float], target: float, delta: float, floors: Sequence[float] | None,
                 layer_params: Sequence[float] | None = None) -> list[float]:
    """RMI rates for ``target`` (weighted mean exact), none below ``floors`` (the previous round's rates).

    Without binding floors this is :func:`compress.sparsity.allocation.solve_allocation_lp`. Otherwise
    the same LP with bounds max(S - delta, floor_i) <= s_i <= max(S + delta, floor_i), and if even
    those lower bounds overshoot the target, floor_i <= s_i (always feasible while mean(floors) <= S).
    """
    rates = alloc.solve_allocation_lp(list(importance), target, delta, layer_params)
    if floors is None or all(r >= f for r, f in zip(rates, floors)):
        return rates
    weights = [1.0] * len(rates) if layer_params is None else [float(p) for p in layer_params]
    if alloc.weighted_mean(floors, weights) > target + 1e-12:
        raise ValueError(f"the previous rates (mean {alloc.weighted_mean(floors, weights)}) exceed the target "
                         f"{target}; the schedule must not decrease")
    lo = [max(target - delta, f) for f in floors]
    hi = [min(alloc.MAX_SPARSITY, max(target + delta, f)) for f in floors]
    if alloc.weighted_mean(lo, weights) > target:
        lo = list(floors)
    return _box_lp(list(importance), target, lo, hi, weights)


@torch.no_grad()
def nested_prune(w: Tensor, keep: Tensor, stats: InputStats | None, rate: float,
                 pruner: Pruner) -> tuple[Tensor, Tensor]:
    """Prune ``w: [out, in]`` to ``rate`` per row without reviving anything: (new weight, new keep-mask).

    Mask pruners (Wanda, magnitude) rank the already-pruned entries first, so with ``rate`` at least
    the old rate every row drops exactly ``int(in * rate)`` entries, all old ones included. SparseGPT
    prunes and updates ``w`` as usual and its mask is then intersected with ``keep`` (its updates to
    already-pruned entries are discarded, so a row may end a little sparser than ``rate``).
    """
    if isinstance(pruner, MaskPruner):
        scores = pruner.scores(w, stats).masked_fill(~keep, -math.inf)  # [out, in]
        new_keep = row_mask_from_scores(scores, rate) & keep
        return apply_mask(w, new_keep), new_keep
    pruned = pruner.prune(w, stats, rate)
    new_keep = (pruned != 0) & keep
    return apply_mask(pruned, new_keep), new_keep


def reconstruction_error(y_dense: Tensor, y_sparse: Tensor) -> float:
    """l = sum(((Y_dense - Y_sparse) / sigma_c)^2) / D; Y: [..., D], sigma_c = ||Y_dense[..., c]||_2 over tokens."""
    if y_dense.shape != y_sparse.shape:
        raise ValueError(f"outputs differ in shape: {tuple(y_dense.shape)} vs {tuple(y_sparse.shape)}")
    dense = y_dense.reshape(-1, y_dense.shape[-1]).double()  # [tokens, D]
    sparse = y_sparse.reshape(-1, y_sparse.shape[-1]).double()
    sigma = dense.square().sum(dim=0).sqrt().clamp_min(1e-30)  # [D]
    return float(((dense - sparse) / sigma).square().sum() / dense.shape[-1])


def allocate_ranks(errors: Sequence[float], mean_rank: int, r_max: int) -> list[int]:
    """Ranks proportional to the layers' errors with sum exactly ``mean_rank * L``, each in [1, r_max].

    r_i = clip(round(l_i / sum(l) * budget), 1, r_max); then, while the sum is off, the layer furthest
    below (above) its ideal share that can still move gains (loses) one. Equal shares when all
    errors are 0. A budget that [1, r_max] cannot hold raises ValueError instead of capping.
    """
    num_layers = len(errors)
    if num_layers == 0:
        raise ValueError("allocate_ranks needs at least one layer error")
    if any(not math.isfinite(e) or e < 0 for e in errors):
        raise ValueError(f"layer errors must be finite and >= 0, got {list(errors)}")
    budget = mean_rank * num_layers
    if not num_layers <= budget <= r_max * num_layers:
        raise ValueError(f"mean rank {mean_rank} cannot be met with ranks in [1, r_max = {r_max}]; "
                         f"raise r_max to at least {mean_rank}")
    total = math.fsum(errors)
    ideal = [e / total * budget if total > 0 else budget / num_layers for e in errors]
    ranks = [min(r_max, max(1, round(x))) for x in ideal]
    while sum(ranks) < budget:
        i = max((j for j in range(num_layers) if ranks[j] < r_max), key=lambda j: (ideal[j] - ranks[j], -j))
        ranks[i] += 1
    while sum(ranks) > budget:
        i = min((j for j in range(num_layers) if ranks[j] > 1), key=lambda j: (ideal[j] - ranks[j], j))
        ranks[i] -= 1
    return ranks
