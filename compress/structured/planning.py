"""Which units every layer keeps: FLAP's structures as a registry of planners.

Contract: a planner (registry :data:`STRUCTURES`, keyed by the names recipes
use) turns the scored units of every layer (:class:`PlanContext`) and a
target into one :class:`LayerPlan` per layer. The target ``ratio`` is the
fraction of the parameters of the decoder layers' linears (weights and
biases, o_proj / down_proj compensation biases included) to remove;
embeddings, norms and the LM head are never pruned.

    al-am        one global ranking of all units of all layers by standardized
                 score (FLAP's adaptive structure); keep the best until the kept
                 parameters are nearest (1 - ratio) of the total
    ul-um        every layer the same structure: round((1 - ratio) G) KV groups,
                 and the MLP width that brings the layer nearest (1 - ratio) of
                 its parameters
    layer-rates  one rate per layer (Self-Pruner, or explicit ``rates``): each
                 layer ranks its own units and keeps nearest (1 - rate_i) of its
                 parameters

Every layer keeps at least ``min_groups`` KV groups and ``min_blocks`` MLP
blocks; a target that cannot be met with those minimums is refused with the
largest legal value named (:class:`InfeasibleTarget`), never silently
clipped. With al-am the achieved parameter count is within half of the
largest unit's cost of the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from compress.structured.scoring import LayerScores, UnitSet
from compress.structured.surgery import LayerGeometry, LayerPlan


class InfeasibleTarget(ValueError):
    """A ratio or rate that the per-layer minimums make impossible."""


@dataclass
class PlanContext:
    """Everything a planner needs about every layer."""

    scores: list[LayerScores]
    geometry: list[LayerGeometry]
    min_groups: int
    min_blocks: int
    bias_compensation: bool

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def fixed_after(self, i: int) -> int:
        """Parameters of layer i that no unit carries, after pruning (the o/down biases)."""
        s = self.geometry[i].structure
        return self.geometry[i].fixed(s.o_proj_bias or self.bias_compensation,
                                      s.down_proj_bias or self.bias_compensation)

    def forced_cost(self, i: int) -> int:
        """Parameters layer i keeps whatever the target: its minimum units and fixed biases."""
        sc = self.scores[i]
        return self.min_groups * sc.groups.cost + self.min_blocks * sc.blocks.cost + self.fixed_after(i)

    def params_before(self, i: int) -> int:
        return self.geometry[i].params

    def total_before(self) -> int:
        return sum(self.params_before(i) for i in range(self.num_layers))

    def max_rate(self, i: int) -> float:
        """The largest fraction of layer i's parameters that can be removed."""
        return 1.0 - self.forced_cost(i) / self.params_before(i)


def keep_counts(sets: Sequence[UnitSet], forced: Sequence[int], budget: float) -> list[int]:
    """How many of each set's best units to keep so the kept cost is nearest ``budget``.

    The first ``forced[k]`` units of set k are always kept; the others enter in order of score
    (one ranking over all sets), and the prefix of that ranking whose cumulative cost is nearest
    the budget is kept.
    """
    counts = list(forced)
    kept = float(sum(f * s.cost for f, s in zip(forced, sets)))
    scores = [s.scores[f:] for f, s in zip(forced, sets)]
    if not any(len(x) for x in scores):
        return counts
    score = torch.cat(scores)  # [n]
    cost = torch.cat([torch.full((len(x),), float(s.cost), dtype=torch.float64) for x, s in zip(scores, sets)])
    owner = torch.cat([torch.full((len(x),), k, dtype=torch.long) for k, x in enumerate(scores)])
    order = torch.sort(score, descending=True, stable=True).indices
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), cost[order].cumsum(0)]) + kept  # [n + 1]
    n = int(torch.argmin((cumulative - budget).abs()))
    for k, extra in enumerate(torch.bincount(owner[order[:n]], minlength=len(sets)).tolist()):
        counts[k] += extra
    return counts


def plan_from_counts(scores: LayerScores, groups: int, blocks: int) -> LayerPlan:
    """Keep the ``groups`` best KV groups and the channels of the ``blocks`` best MLP blocks."""
    kept_groups = sorted(scores.groups.order[:groups].tolist())
    kept_channels = sorted(scores.channel_order[:blocks * scores.multiple].tolist())
    return LayerPlan(tuple(kept_groups), tuple(kept_channels))


def _al_am(ctx: PlanContext, ratio: float, rates: Sequence[float] | None = None) -> list[LayerPlan]:
    sets, forced = [], []
    for sc in ctx.scores:
        sets += [sc.groups, sc.blocks]
        forced += [ctx.min_groups, ctx.min_blocks]
    fixed = sum(ctx.fixed_after(i) for i in range(ctx.num_layers))
    target = (1.0 - ratio) * ctx.total_before()
    floor = sum(ctx.forced_cost(i) for i in range(ctx.num_layers))
    if floor > target:
        raise InfeasibleTarget(
            f"ratio {ratio} cannot be reached: keeping {ctx.min_groups} KV group(s) and {ctx.min_blocks} MLP "
            f"block(s) per layer already keeps {floor / ctx.total_before():.1%} of the parameters; use a ratio "
            f"of at most {1 - floor / ctx.total_before():.3f} or lower the minimums")
    counts = keep_counts(sets, forced, target - fixed)
    return [plan_from_counts(sc, counts[2 * i], counts[2 * i + 1]) for i, sc in enumerate(ctx.scores)]


def _ul_um(ctx: PlanContext, ratio: float, rates: Sequence[float] | None = None) -> list[LayerPlan]:
    plans = []
    for i, (sc, geo) in enumerate(zip(ctx.scores, ctx.geometry)):
        groups = round((1.0 - ratio) * geo.groups)
        if groups < ctx.min_groups:
            legal = 1.0 - (ctx.min_groups - 0.5) / geo.groups
            raise InfeasibleTarget(
                f"ratio {ratio} with structure ul-um would keep {groups} of the {geo.groups} KV groups of layer "
                f"{i} (at least {ctx.min_groups} must stay); use a ratio below {legal:.3f} or structure al-am")
        budget = (1.0 - ratio) * geo.params - ctx.fixed_after(i) - groups * sc.groups.cost
        blocks = min(round(budget / sc.blocks.cost), len(sc.blocks.scores))
        if blocks < ctx.min_blocks:
            raise InfeasibleTarget(
                f"ratio {ratio} with structure ul-um leaves layer {i} an MLP of {max(blocks, 0)} block(s) of "
                f"{sc.multiple} channels (at least {ctx.min_blocks} must stay); use a lower ratio or al-am")
        plans.append(plan_from_counts(sc, groups, blocks))
    return plans


def _layer_rates(ctx: PlanContext, ratio: float, rates: Sequence[float] | None = None) -> list[LayerPlan]:
    if rates is None or len(rates) != ctx.num_layers:
        raise ValueError(f"structure layer-rates needs one rate per layer ({ctx.num_layers}), "
                         f"got {None if rates is None else len(rates)}")
    plans = []
    for i, (sc, rate) in enumerate(zip(ctx.scores, rates)):
        if rate > ctx.max_rate(i) + 1e-9:
            raise InfeasibleTarget(f"rate {rate:.4f} of layer {i} exceeds the most it can lose with the "
                                   f"minimums kept ({ctx.max_rate(i):.4f})")
        budget = (1.0 - rate) * ctx.params_before(i) - ctx.fixed_after(i)
        groups, blocks = keep_counts([sc.groups, sc.blocks], [ctx.min_groups, ctx.min_blocks], budget)
        plans.append(plan_from_counts(sc, groups, blocks))
    return plans


Planner = Callable[[PlanContext, float, Sequence[float] | None], list[LayerPlan]]
STRUCTURES: dict[str, Planner] = {"al-am": _al_am, "ul-um": _ul_um, "layer-rates": _layer_rates}


def plan_layers(ctx: PlanContext, structure: str, ratio: float,
                rates: Sequence[float] | None = None) -> list[LayerPlan]:
    """One plan per layer as ``structure`` says."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose from {sorted(STRUCTURES)}")
    return STRUCTURES[structure](ctx, ratio, rates)


def plan_params(ctx: PlanContext, plans: Sequence[LayerPlan]) -> list[int]:
    """Parameters of every layer's linears after its plan."""
    out = []
    for i, plan in enumerate(plans):
        geo = ctx.geometry[i]
        out.append(len(plan.kv_groups) * geo.group_cost + len(plan.mlp_channels) * geo.channel_cost
                   + ctx.fixed_after(i))
    return out
