"""Layer-wise unstructured / N:M pruning of a whole model, as a recipe says.

Contract: :func:`prune_model` validates everything it can before work starts,
computes the per-layer sparsities (the allocation, from dense statistics
where the allocator needs them), then prunes sequentially: each layer's
statistics come from the outputs of the already-pruned layers before it, as
Wanda and SparseGPT do. It returns a :class:`PruneReport` (per-layer target
and achieved sparsity, per-linear sparsity, reconstruction error, timings,
the allocation and, for ATP, the beta search table).

ATP's beta search scores every beta with a one-shot prune from dense
statistics computed once (the statistics that do not depend on beta) and
perplexity on the held-out *selection* split, never the eval split; the
chosen beta is then applied by the full sequential prune.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compress.adapter import ModelAdapter, get_adapter
from compress.data.text import calibration_batch, eval_token_ids
from compress.eval.perplexity import perplexity
from compress.sparsity import allocation as alloc
from compress.sparsity.pruners import InputStats, Pruner, get_pruner, parse_pattern
from compress.sparsity.recipe import PruneRecipe, matches
from compress.sparsity.runner import SequentialRunner, Visit, fingerprint

LayerStats = dict[str, InputStats]  # relative linear name -> its input statistics


@dataclass
class PruneReport:
    """What a prune did, layer by layer."""

    recipe: dict[str, Any]
    target_sparsity: float
    achieved_sparsity: float  # parameter-weighted over the targeted linears
    layer_rates: list[float]
    layers: list[dict[str, Any]] = field(default_factory=list)  # index, rate, error, linears
    allocation: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- targets ----------------------------------------------------------------------
def targeted_linears(adapter: ModelAdapter, recipe: PruneRecipe) -> list[list[str]]:
    """Per layer, the relative names of the linears the recipe prunes."""
    out = []
    for i in range(adapter.num_layers):
        prefix = adapter.layer_prefix(i)
        out.append([rel for rel in adapter.linear_names
                    if matches(f"{prefix}.{rel}", recipe.targets) and not matches(f"{prefix}.{rel}", recipe.ignore)])
    if not any(out):
        raise ValueError(f"targets {recipe.targets} minus ignore {recipe.ignore} match no linear; names look "
                         f"like {adapter.layer_prefix(0)}.{adapter.linear_names[0]}")
    return out


def layer_params(adapter: ModelAdapter, targets: list[list[str]]) -> list[int]:
    """Targeted parameters per layer (weights of the allocation's weighted mean)."""
    layers = adapter.layers()
    return [sum(layers[i].get_submodule(rel).weight.numel() for rel in rels) for i, rels in enumerate(targets)]


# -- statistics ---------------------------------------------------------------------
def collect_stats(runner: SequentialRunner, layer: nn.Module, rels: list[str],
                  pruner: Pruner) -> tuple[LayerStats, Tensor]:
    """Input statistics of ``rels`` over the calibration batch, and the layer's outputs."""
    stats: LayerStats = {}
    handles = []
    needs = pruner.needs_hessian or pruner.needs_sq_sum
    for group in runner.adapter.input_groups:
        members = [rel for rel in group if rel in rels]
        if not members or not needs:
            continue
        first = layer.get_submodule(group[0])
        shared = InputStats.empty(first.in_features, with_hessian=pruner.needs_hessian)
        stats.update({rel: shared for rel in members})
        handles.append(first.register_forward_hook(lambda _m, args, _o, s=shared: s.update(args[0])))
    try:
        outputs = runner.forward(layer)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


@torch.no_grad()
def prune_layer(layer: nn.Module, rels: list[str], stats: LayerStats, pruner: Pruner, rate: float,
                pattern) -> dict[str, float]:
    """Prune ``rels`` of ``layer`` in place at ``rate``; return each linear's achieved sparsity."""
    achieved = {}
    for rel in rels:
        linear = layer.get_submodule(rel)
        linear.weight.data = pruner.prune(linear.weight.data, stats.get(rel), rate, pattern)
        achieved[rel] = float((linear.weight == 0).float().mean())
    return achieved


# -- dense statistics for the allocators ----------------------------------------------
@dataclass
class DenseStats:
    """Statistics of the dense model gathered in one sequential pass."""

    per_layer: list[LayerStats] = field(default_factory=list)
    grams: list[Tensor] = field(default_factory=list)  # [n, n] Gram of each layer's input


def dense_pass(runner: SequentialRunner, targets: list[list[str]], pruner: Pruner | None,
               gram_samples: int = 0) -> DenseStats:
    """One pass over the dense model: linear input statistics and/or layer-input Grams."""
    dense = DenseStats()

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        if gram_samples:
            dense.grams.append(alloc.centered_gram(r.hidden[:gram_samples]))  # [n, n]
        if pruner is not None:
            stats, _ = collect_stats(r, layer, targets[i], pruner)
            dense.per_layer.append(stats)
        return Visit()

    runner.run(visit, desc="dense statistics")
    return dense


@torch.no_grad()
def outlier_ratios(model: nn.Module, adapter: ModelAdapter, targets: list[list[str]],
                   dense: DenseStats, m: float) -> list[float]:
    """OWL's per-layer outlier ratio of the Wanda scores |W| * ||X||."""
    ratios = []
    for i, layer in enumerate(adapter.layers()):
        scores = [layer.get_submodule(rel).weight.float().abs() * dense.per_layer[i][rel].sq_sum.sqrt()
                  for rel in targets[i]]
        ratios.append(alloc.outlier_ratio(scores, m))
    return ratios


# -- ATP beta search ---------------------------------------------------------------------
@torch.no_grad()
def atp_search(model: nn.Module, adapter: ModelAdapter, tokenizer, recipe: PruneRecipe,
               targets: list[list[str]], params: list[int], dense: DenseStats, pruner: Pruner,
               progress: bool = True) -> dict[str, Any]:
    """Grid-search ATP's beta by selection-split perplexity of one-shot prunes."""
    layers = adapter.layers()
    original = {(i, rel): layers[i].get_submodule(rel).weight.data.clone()
                for i, rels in enumerate(targets) for rel in rels}
    ids = eval_token_ids(tokenizer, recipe.atp.selection_source)
    # a beta that prunes (almost) a whole layer is never the answer; do not spend a prune on it
    grid = [b for b in alloc.atp_beta_grid(len(layers), recipe.sparsity, recipe.atp.step)
            if max(alloc.atp(len(layers), recipe.sparsity, b, params)) < 0.99]
    table = []
    pattern = parse_pattern(recipe.pattern)
    for beta in tqdm(grid, desc="ATP beta search", disable=not progress):
        rates = alloc.atp(len(layers), recipe.sparsity, beta, params)
        for (i, rel), weight in original.items():
            stats = dense.per_layer[i].get(rel) if dense.per_layer else None
            layers[i].get_submodule(rel).weight.data = pruner.prune(weight, stats, rates[i], pattern)
        ppl = perplexity(model, ids, recipe.atp.selection_seq_len, recipe.atp.selection_windows,
                         progress=False).ppl
        table.append({"beta": beta, "selection_ppl": ppl})
    for (i, rel), weight in original.items():
        layers[i].get_submodule(rel).weight.data = weight
    best = min(table, key=lambda row: row["selection_ppl"] if math.isfinite(row["selection_ppl"]) else math.inf)
    return {"beta": best["beta"], "search": table, "selection_source": recipe.atp.selection_source,
            "selection_seq_len": recipe.atp.selection_seq_len}


# -- allocation ----------------------------------------------------------------------------
@dataclass
class AllocationJob:
    """Everything an allocator may need; each computes only what it uses."""

    model: nn.Module
    tokenizer: Any
    recipe: PruneRecipe
    targets: list[list[str]]
    runner: Callable[[], SequentialRunner]
    pruner: Pruner
    progress: bool

    @property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.model)

    @property
    def params(self) -> list[int]:
        return layer_params(self.adapter, self.targets)


Allocation = tuple[list[float], dict[str, Any]]  # per-layer rates, facts for the report


def _uniform(job: AllocationJob) -> Allocation:
    return alloc.uniform(job.adapter.num_layers, job.recipe.sparsity, job.params), {}


def _explicit(job: AllocationJob) -> Allocation:
    return alloc.explicit(job.recipe.rates, None, job.params), {}


def _owl(job: AllocationJob) -> Allocation:
    dense = dense_pass(job.runner(), job.targets, get_pruner("wanda"))
    ratios = outlier_ratios(job.model, job.adapter, job.targets, dense, job.recipe.owl.m)
    rates = alloc.owl(ratios, job.recipe.sparsity, job.recipe.owl.lam, job.params)
    return rates, {"outlier_ratios": ratios, "lam": job.recipe.owl.lam}


def _atp(job: AllocationJob) -> Allocation:
    L, S, beta = job.adapter.num_layers, job.recipe.sparsity, job.recipe.atp.beta
    facts: dict[str, Any] = {"beta": beta}
    if beta is None:
        dense = dense_pass(job.runner(), job.targets, job.pruner)
        facts = atp_search(job.model, job.adapter, job.tokenizer, job.recipe, job.targets, job.params, dense,
                           job.pruner, job.progress)
    return alloc.atp(L, S, facts["beta"], job.params), facts


def _rmi(job: AllocationJob) -> Allocation:
    r, S = job.recipe, job.recipe.sparsity
    dense = dense_pass(job.runner(), job.targets, None, gram_samples=r.rmi.samples)
    cka = alloc.cka_from_grams(dense.grams)
    importance = alloc.rmi_importance(cka, r.rmi_gamma())
    delta = r.rmi.delta or alloc.rmi_delta(S)
    rates = alloc.solve_allocation_lp(importance, S, delta, job.params)
    return rates, {"gamma": r.rmi_gamma(), "delta": delta, "importance": [float(v) for v in importance],
                   "cka": cka.tolist()}


ALLOCATORS: dict[str, Callable[[AllocationJob], Allocation]] = {
    "uniform": _uniform, "explicit": _explicit, "owl": _owl, "atp": _atp, "rmi": _rmi,
}


def allocate(job: AllocationJob) -> Allocation:
    """Per-layer sparsities as the recipe's allocation says, plus facts for the report."""
    rates, facts = ALLOCATORS[job.recipe.allocation](job)
    return rates, {"name": job.recipe.allocation, **facts}


# -- the whole job -------------------------------------------------------------------------
def validate(model: nn.Module, recipe: PruneRecipe) -> tuple[ModelAdapter, list[list[str]]]:
    """Every check that can fail before work starts."""
    adapter = get_adapter(model)
    targets = targeted_linears(adapter, recipe)
    L = adapter.num_layers
    if recipe.allocation == "explicit" and len(recipe.rates) != L:
        raise ValueError(f"rates has {len(recipe.rates)} entries but the model has {L} layers")
    if recipe.allocation == "atp" and recipe.atp.beta is not None:
        alloc.atp(L, recipe.sparsity, recipe.atp.beta)  # raises with the legal range
    if recipe.allocation == "atp" and recipe.atp.beta is None and not alloc.atp_beta_grid(L, recipe.sparsity,
                                                                                           recipe.atp.step):
        raise ValueError(f"no ATP beta of step {recipe.atp.step} is legal for {L} layers at sparsity "
                         f"{recipe.sparsity}; lower atp.step")
    return adapter, targets


def prune_model(model: nn.Module, tokenizer, recipe: PruneRecipe, state_dir: str | Path | None = None,
                job: str = "", progress: bool = True) -> PruneReport:
    """Prune ``model`` in place as ``recipe`` says and report what was done."""
    adapter, targets = validate(model, recipe)
    pruner = get_pruner(recipe.method, **({"blocksize": recipe.sparsegpt.blocksize,
                                            "percdamp": recipe.sparsegpt.percdamp}
                                           if recipe.method == "sparsegpt" else {}))
    cal = recipe.calibration
    ids = calibration_batch(tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source)  # [N, T]
    job_id = fingerprint(recipe.model_dump(), job, ids)
    state = Path(state_dir) if state_dir else None

    def runner(directory: Path | None = None) -> SequentialRunner:
        return SequentialRunner(model, ids, cal.batch_size, state_dir=directory, job_id=job_id, progress=progress)

    start = time.perf_counter()
    job_spec = AllocationJob(model, tokenizer, recipe, targets, runner, pruner, progress)
    rates, facts = _cached_allocation(state, job_id, lambda: allocate(job_spec))
    allocated = time.perf_counter()
    pattern = parse_pattern(recipe.pattern)

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        stats, dense_out = collect_stats(r, layer, targets[i], pruner)
        achieved = prune_layer(layer, targets[i], stats, pruner, rates[i], pattern)
        return Visit(facts={"rate": rates[i], "linears": achieved}, reference=dense_out)

    final = runner(state / "layers" if state else None)
    outcomes = final.run(visit, desc=f"{recipe.method} prune")
    done = time.perf_counter()
    return _report(model, adapter, recipe, targets, rates, facts, outcomes,
                   {"allocation": allocated - start, "prune": done - allocated, "total": done - start})


def _cached_allocation(state: Path | None, job_id: str, compute) -> tuple[list[float], dict[str, Any]]:
    """The allocation, persisted in the state directory so a resumed run does not redo it."""
    path = state / "allocation.json" if state else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached["job_id"] == job_id:
            return cached["rates"], cached["facts"]
    rates, facts = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"job_id": job_id, "rates": rates, "facts": facts}))
    return rates, facts


def _report(model, adapter, recipe, targets, rates, facts, outcomes, seconds) -> PruneReport:
    layers_out, zeros, total = [], 0.0, 0
    for outcome in outcomes:
        i = outcome.index
        for rel in targets[i]:
            w = adapter.layers()[i].get_submodule(rel).weight
            zeros += float((w == 0).sum())
            total += w.numel()
        layers_out.append({"index": i, "rate": rates[i], **outcome.facts})
    return PruneReport(recipe=recipe.model_dump(), target_sparsity=recipe.sparsity,
                       achieved_sparsity=zeros / max(total, 1), layer_rates=list(rates), layers=layers_out,
                       allocation=facts, seconds=seconds)
