"""FLAP's importance metrics and the per-layer unit scores built from them.

Contract: a metric (registry :data:`METRICS`, keyed by the names recipes use)
maps the output linear's weight ``W [D, C]`` and its input statistics to one
score per input channel ``[C]`` (higher = more important):

    ifv    Var(X_j)                                  input fluctuation
    wifv   Var(X_j) * ||W[:, j]||^2                  weighted input fluctuation (FLAP's default)
    wifn   mean_i |W_ij| * sqrt(E[X_j^2])            weighted input feature norm
    wanda  mean_i |W_ij| * ||X_j||_2                 Wanda-sp's structured Wanda score

:func:`layer_scores` turns a layer's channel scores into scores of its
removable units: standardized within the layer (z = (S - mean) / std,
separately for attention and MLP, as FLAP does before its global ranking), a
KV group scores the mean z of its query heads' channels, and the MLP is cut
in blocks of ``multiple`` channels - the channels sorted best first, a block
scoring the mean z of its channels - so every kept width is a multiple.
Within a layer, standardizing is an affine map, so it never changes a
layer-local choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from compress.structured.stats import ChannelStats

Metric = Callable[[Tensor, ChannelStats], Tensor]  # W [D, C], stats of its input -> score [C]
METRICS: dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[Metric], Metric]:
    def add(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn
    return add


@register_metric("ifv")
def ifv(weight: Tensor, stats: ChannelStats) -> Tensor:
    return stats.variance.clone()  # [C]


@register_metric("wifv")
def wifv(weight: Tensor, stats: ChannelStats) -> Tensor:
    return stats.variance * weight.double().pow(2).sum(dim=0)  # [C]


@register_metric("wifn")
def wifn(weight: Tensor, stats: ChannelStats) -> Tensor:
    return weight.double().abs().mean(dim=0) * stats.mean_square.sqrt()  # [C]


@register_metric("wanda")
def wanda(weight: Tensor, stats: ChannelStats) -> Tensor:
    return weight.double().abs().mean(dim=0) * stats.sq_norm.sqrt()  # [C]


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    return METRICS[name]


def standardize(scores: Tensor) -> Tensor:
    """(S - mean) / std over the last dimension (std floored so constant scores give zeros)."""
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, keepdim=True) if scores.shape[-1] > 1 else torch.ones_like(mean)
    return (scores - mean) / std.clamp_min(1e-12)


@dataclass(frozen=True)
class UnitSet:
    """Removable units of one kind in one layer, best first: ``scores`` [n] non-increasing,
    ``order`` [n] the unit ids in that order, each unit removing ``cost`` parameters."""

    scores: Tensor
    order: Tensor
    cost: int


@dataclass(frozen=True)
class LayerScores:
    """The scored units of one layer: KV groups and MLP blocks (plus the channel order of the blocks)."""

    groups: UnitSet  # unit id = KV group index
    blocks: UnitSet  # unit id = block index along ``channel_order``
    channel_order: Tensor  # [W] MLP channels, best first
    multiple: int  # channels per block


def layer_scores(attn_scores: Tensor, mlp_scores: Tensor, num_groups: int, multiple: int,
                 group_cost: int, channel_cost: int) -> LayerScores:
    """Unit scores of a layer from its o_proj channel scores [H * hd] and down_proj ones [W]."""
    z_attn = standardize(attn_scores.double())  # [H * hd]
    z_mlp = standardize(mlp_scores.double())  # [W]
    per_group = z_attn.view(num_groups, -1).mean(dim=1)  # [G]
    g_scores, g_order = torch.sort(per_group, descending=True, stable=True)
    c_scores, c_order = torch.sort(z_mlp, descending=True, stable=True)
    b_scores = c_scores.view(-1, multiple).mean(dim=1)  # [W / m], non-increasing
    return LayerScores(groups=UnitSet(g_scores, g_order, group_cost),
                       blocks=UnitSet(b_scores, torch.arange(len(b_scores)), channel_cost * multiple),
                       channel_order=c_order, multiple=multiple)
