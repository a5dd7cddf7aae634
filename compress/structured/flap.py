"""FLAP and Wanda-sp on a whole model: statistics, plans, physical pruning, report.

Contract: :func:`structured_prune` validates the recipe against the model
before any work, then either

* **one-shot** (FLAP): one sequential pass over the *dense* model collects the
  input statistics of every layer's o_proj and down_proj
  (:func:`dense_statistics`, cached in the state directory and reusable, e.g.
  by every Self-Pruner candidate), the structure's planner chooses what every
  layer keeps, and every layer is pruned in place; or
* **sequential** (Wanda-sp): each layer's statistics come from the outputs of
  the already-pruned layers before it; the layer is planned on its own and
  pruned before the next one is visited.

Both run on :class:`compress.sparsity.runner.SequentialRunner` (one layer and
the calibration hidden states in memory; with a state directory an
interrupted run resumes). The model ends with smaller layers and, with bias
compensation, o_proj / down_proj biases; :func:`compress.checkpoint.save_checkpoint`
records the per-layer structure. Returns a :class:`StructuredReport`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.adapter import LayerStructure, ModelAdapter, get_adapter
from compress.data.text import calibration_batch
from compress.sparsity.runner import LayerStore, SequentialRunner, Visit, fingerprint
from compress.structured.planning import PlanContext, plan_layers
from compress.structured.recipe import FlapRecipe, StructuredSettings
from compress.structured.scoring import LayerScores, get_metric, layer_scores
from compress.structured.stats import ChannelStats, LayerInputStats
from compress.structured.surgery import (
    LayerMeans, LayerPlan, install_pruned, install_structure, layer_geometry, roles_for,
)

STATS_FILE = "stats.safetensors"


@dataclass
class StructuredReport:
    """What a structured prune did, layer by layer."""

    recipe: dict[str, Any]
    target_ratio: float
    achieved_ratio: float  # of the decoder linears' parameters (weights and biases)
    params_before: int
    params_after: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- validation ------------------------------------------------------------------------------------
def validate(model: nn.Module, settings: StructuredSettings) -> ModelAdapter:
    """Every check on the model that can fail before work starts."""
    adapter = get_adapter(model)
    roles_for(adapter)
    m = settings.mlp_multiple
    for i in range(adapter.num_layers):
        s = adapter.layer_structure(i)
        if s.intermediate_size % m:
            divisors = [d for d in (128, 64, 32, 16, 8, 4, 2, 1) if s.intermediate_size % d == 0]
            raise ValueError(f"mlp_multiple {m} does not divide the MLP width {s.intermediate_size} of layer {i}; "
                             f"use a divisor of every layer's width, e.g. {divisors[0]}")
        if settings.min_blocks * m > s.intermediate_size:
            raise ValueError(f"min_mlp_width {settings.min_mlp_width} exceeds the MLP width "
                             f"{s.intermediate_size} of layer {i}")
        if settings.min_kv_groups > s.num_kv_heads:
            raise ValueError(f"min_kv_groups {settings.min_kv_groups} exceeds the {s.num_kv_heads} KV heads "
                             f"of layer {i}")
    return adapter


def linear_params(adapter: ModelAdapter, index: int) -> int:
    """Parameters (weights and biases) of layer ``index``'s linears."""
    return sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
               for lin in adapter.linears(adapter.layers()[index]).values())


# -- statistics ------------------------------------------------------------------------------------
def calibration_ids(tokenizer, settings: StructuredSettings) -> Tensor:
    cal = settings.calibration
    return calibration_batch(tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source)  # [N, T]


def hook_input_stats(adapter: ModelAdapter, layer: nn.Module) -> tuple[LayerInputStats, list]:
    """Statistics accumulating the inputs of ``layer``'s o_proj and down_proj while hooks are on."""
    roles = roles_for(adapter)
    o, down = layer.get_submodule(roles.o), layer.get_submodule(roles.mlp_out)
    stats = LayerInputStats(ChannelStats.empty(o.in_features), ChannelStats.empty(down.in_features))
    handles = [o.register_forward_pre_hook(lambda _m, args: stats.attn.update(args[0])),
               down.register_forward_pre_hook(lambda _m, args: stats.mlp.update(args[0]))]
    return stats, handles


def observe(runner: SequentialRunner, layer: nn.Module) -> tuple[LayerInputStats, Tensor]:
    """Run the calibration batch through ``layer``: its input statistics and its outputs [N, T, D]."""
    stats, handles = hook_input_stats(runner.adapter, layer)
    try:
        outputs = runner.forward(layer)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def dense_statistics(model: nn.Module, ids: Tensor, settings: StructuredSettings, state: Path | None = None,
                     job: str = "", progress: bool = True) -> list[LayerInputStats]:
    """Input statistics of every layer's o_proj and down_proj on the dense model (one pass).

    With ``state`` the finished statistics are cached in ``state/stats.safetensors`` (keyed by the
    model, calibration and ids, so a resumed or repeated job reuses them) and an interrupted pass
    resumes at the layer after its last checkpoint.
    """
    adapter = get_adapter(model)
    cal = settings.calibration
    job_id = fingerprint("flap-stats", job, cal.model_dump(), settings.dtype, ids)
    cached = _load_stats(state, job_id, adapter.num_layers)
    if cached is not None:
        return cached
    stats_dir = state / "stats" if state else None
    collected: dict[int, LayerInputStats] = {}

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        collected[i], outputs = observe(r, layer)
        if stats_dir is not None:
            save_file(collected[i].to_tensors(i), str(stats_dir / f"layer_{i:04d}.stats.safetensors"))
        return Visit(outputs=outputs)  # the layer is unchanged: no second forward

    if stats_dir is not None:
        stats_dir.mkdir(parents=True, exist_ok=True)
    runner = SequentialRunner(model, ids, cal.batch_size, state_dir=stats_dir, job_id=job_id, progress=progress,
                              store=_UnchangedStore())
    runner.run(visit, desc="FLAP statistics")
    if stats_dir is None:
        return [collected[i] for i in range(adapter.num_layers)]
    tensors: dict[str, Tensor] = {}
    for i in range(adapter.num_layers):  # layers before a resume point were collected by the earlier run
        tensors.update(load_file(str(stats_dir / f"layer_{i:04d}.stats.safetensors")))
    save_file(tensors, str(state / STATS_FILE), metadata={"job_id": job_id})
    return [LayerInputStats.from_tensors(tensors, i) for i in range(adapter.num_layers)]


def statistics(model: nn.Module, tokenizer, settings: StructuredSettings, state: Path | None, job: str,
               progress: bool) -> list[LayerInputStats]:
    """Dense statistics on the recipe's calibration text (cached in ``state`` when given)."""
    return dense_statistics(model, calibration_ids(tokenizer, settings), settings, state, job, progress)


class _UnchangedStore(LayerStore):
    """The statistics pass changes no layer, so a resumed pass has nothing to restore."""

    def restore(self, index: int, layer: nn.Module, saved: Path) -> None:
        pass


def _load_stats(state: Path | None, job_id: str, layers: int) -> list[LayerInputStats] | None:
    path = state / STATS_FILE if state else None
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        if (fh.metadata() or {}).get("job_id") != job_id:
            return None
    tensors = load_file(str(path))
    return [LayerInputStats.from_tensors(tensors, i) for i in range(layers)]


# -- planning -----------------------------------------------------------------------------------------
def scores_of(adapter: ModelAdapter, index: int, stats: LayerInputStats, metric: str,
              multiple: int) -> LayerScores:
    """The scored units of layer ``index`` from its input statistics."""
    roles = roles_for(adapter)
    layer = adapter.layers()[index]
    geo = layer_geometry(adapter, index)
    score = get_metric(metric)
    attn = score(layer.get_submodule(roles.o).weight.data, stats.attn)  # [H * hd]
    mlp = score(layer.get_submodule(roles.mlp_out).weight.data, stats.mlp)  # [W]
    return layer_scores(attn, mlp, geo.groups, multiple, geo.group_cost, geo.channel_cost)


def plan_context(adapter: ModelAdapter, stats: Sequence[LayerInputStats], settings: StructuredSettings,
                 indices: Sequence[int] | None = None) -> PlanContext:
    """The planning context of the given layers (default: all)."""
    indices = range(adapter.num_layers) if indices is None else indices
    return PlanContext(scores=[scores_of(adapter, i, stats[k], settings.metric, settings.mlp_multiple)
                               for k, i in enumerate(indices)],
                       geometry=[layer_geometry(adapter, i) for i in indices],
                       min_groups=settings.min_kv_groups, min_blocks=settings.min_blocks,
                       bias_compensation=bool(settings.bias_compensation))


def means_of(stats: LayerInputStats, bias_compensation: bool) -> LayerMeans | None:
    return LayerMeans(stats.attn.mean, stats.mlp.mean) if bias_compensation else None


# -- pruning -------------------------------------------------------------------------------------------
@torch.no_grad()
def apply_plans(model: nn.Module, plans: Sequence[LayerPlan], stats: Sequence[LayerInputStats],
                bias_compensation: bool) -> None:
    """Prune every layer of ``model`` in place by its plan."""
    adapter = get_adapter(model)
    for i, plan in enumerate(plans):
        install_pruned(adapter, i, plan, means_of(stats[i], bias_compensation))


def structured_prune(model: nn.Module, tokenizer, recipe: FlapRecipe, state_dir: str | Path | None = None,
                     job: str = "", progress: bool = True,
                     persist_every_s: float = 60.0) -> StructuredReport:
    """Prune ``model`` in place as ``recipe`` says (see the module docstring) and report."""
    adapter = validate(model, recipe)
    state = Path(state_dir) if state_dir else None
    before = [linear_params(adapter, i) for i in range(adapter.num_layers)]
    start = time.perf_counter()
    facts: dict[int, dict[str, Any]] = {}
    if recipe.sequential:
        _sequential(model, tokenizer, recipe, state, job, progress, persist_every_s, facts)
        seconds = {"prune": time.perf_counter() - start}
    else:
        stats = statistics(model, tokenizer, recipe, state, job, progress)
        counted = time.perf_counter()
        plans = plan_layers(plan_context(adapter, stats, recipe), recipe.structure, recipe.ratio, recipe.rates)
        apply_plans(model, plans, stats, bool(recipe.bias_compensation))
        facts = {i: {"kv_groups_kept": list(p.kv_groups)} for i, p in enumerate(plans)}
        seconds = {"statistics": counted - start, "prune": time.perf_counter() - counted}
    seconds["total"] = time.perf_counter() - start
    return build_report(adapter, recipe.model_dump(), recipe.ratio, before, seconds, facts)


def build_report(adapter: ModelAdapter, recipe: dict, ratio: float, before: list[int],
                 seconds: dict[str, float], facts: dict[int, dict[str, Any]] | None = None) -> StructuredReport:
    """The report of a pruned model (structures and parameters per layer)."""
    layers = []
    for i in range(adapter.num_layers):
        after = linear_params(adapter, i)
        layers.append({"index": i, **adapter.layer_structure(i).to_dict(), "params_before": before[i],
                       "params_after": after, "rate": 1.0 - after / before[i], **(facts or {}).get(i, {})})
    total_before, total_after = sum(before), sum(layer["params_after"] for layer in layers)
    return StructuredReport(recipe=recipe, target_ratio=ratio, achieved_ratio=1.0 - total_after / total_before,
                            params_before=total_before, params_after=total_after, layers=layers, seconds=seconds)


# -- sequential (Wanda-sp) ----------------------------------------------------------------------------
class _PrunedLayerStore(LayerStore):
    """Restores layers an interrupted sequential run already pruned: resize first, then load."""

    def __init__(self, adapter: ModelAdapter, done: dict[str, dict]):
        self.adapter, self.done = adapter, done

    def restore(self, index: int, layer: nn.Module, saved: Path) -> None:
        structure = LayerStructure(**self.done[str(index)]["structure"])
        install_structure(self.adapter, index, structure)
        self.adapter.layers()[index].load_state_dict(load_file(str(saved)), assign=True)


def _sequential(model: nn.Module, tokenizer, recipe: FlapRecipe, state: Path | None, job: str, progress: bool,
                persist_every_s: float, facts: dict[int, dict[str, Any]]) -> None:
    adapter = get_adapter(model)
    ids = calibration_ids(tokenizer, recipe)
    job_id = fingerprint("structured-sequential", recipe.model_dump(), job, ids)
    plans_file = state / "plans.json" if state else None
    done: dict[str, dict] = {}
    if plans_file is not None and plans_file.is_file():
        saved = json.loads(plans_file.read_text())
        done = saved["layers"] if saved.get("job_id") == job_id else {}

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        stats, dense_out = observe(r, layer)
        ctx = plan_context(adapter, [stats], recipe, indices=[i])
        plan = plan_layers(ctx, recipe.structure, recipe.ratio, [recipe.rates[i]] if recipe.rates else None)[0]
        install_pruned(adapter, i, plan, means_of(stats, bool(recipe.bias_compensation)))
        done[str(i)] = {"structure": adapter.layer_structure(i).to_dict()}
        if plans_file is not None:
            plans_file.parent.mkdir(parents=True, exist_ok=True)
            plans_file.write_text(json.dumps({"job_id": job_id, "layers": done}))
        return Visit(facts={"kv_groups_kept": list(plan.kv_groups)}, reference=dense_out)

    runner = SequentialRunner(model, ids, recipe.calibration.batch_size,
                              state_dir=state / "layers" if state else None, job_id=job_id, progress=progress,
                              persist_every_s=persist_every_s, store=_PrunedLayerStore(adapter, done))
    for outcome in runner.run(visit, desc=f"{recipe.method} prune"):
        facts[outcome.index] = outcome.facts

