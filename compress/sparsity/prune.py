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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compress.adapter import ModelAdapter, get_adapter
from compress.data.text import calibration_batch, eval_token_ids
from compress.eval.perplexity import window_nll, windows_of
from compress.sparsity import allocation as alloc
from compress.sparsity.pruners import InputStats, Pruner, get_pruner, parse_pattern
from compress.sparsity.recipe import PruneRecipe, matches
from compress.sparsity.runner import LayerStore, SequentialRunner, Visit, fingerprint

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
    outlier_ratios: list[float] = field(default_factory=list)  # OWL's D_i


def dense_pass(runner: SequentialRunner, targets: list[list[str]], pruner: Pruner | None,
               gram_samples: int = 0, owl_m: float | None = None) -> DenseStats:
    """One pass over the dense model: linear input statistics, layer-input Grams and/or OWL ratios."""
    dense = DenseStats()

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        if gram_samples:
            dense.grams.append(alloc.centered_gram(r.hidden[:gram_samples]))  # [n, n]
        if pruner is None:
            return Visit()
        stats, outputs = collect_stats(r, layer, targets[i], pruner)
        dense.per_layer.append(stats)
        if owl_m is not None:
            dense.outlier_ratios.append(outlier_ratio(layer, targets[i], stats, owl_m))
        return Visit(outputs=outputs)  # the layer is unchanged: no second forward

    runner.run(visit, desc="dense statistics")
    return dense


@torch.no_grad()
def outlier_ratio(layer: nn.Module, rels: list[str], stats: LayerStats, m: float) -> float:
    """OWL's outlier ratio of one layer's Wanda scores |W| * ||X||."""
    scores = [layer.get_submodule(rel).weight.float().abs() * stats[rel].sq_sum.sqrt() for rel in rels]
    return alloc.outlier_ratio(scores, m)


# -- perplexity one layer at a time -------------------------------------------------------
Edit = Callable[[int, nn.Module], dict[str, Tensor]]  # layer index, layer -> replacement weights by rel name


@contextmanager
def swapped_weights(layer: nn.Module, weights: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily replace the weights of ``layer``'s linears (relative names)."""
    originals = {rel: layer.get_submodule(rel).weight.data for rel in weights}
    try:
        for rel, weight in weights.items():
            layer.get_submodule(rel).weight.data = weight
        yield
    finally:
        for rel, weight in originals.items():
            layer.get_submodule(rel).weight.data = weight


@torch.no_grad()
def streamed_perplexity(runner: SequentialRunner, edit: Edit | None = None) -> float:
    """Perplexity of the runner's token windows [W, T] computed one decoder layer at a time.

    Each layer runs with its linears replaced by ``edit(i, layer)`` (the layer itself is left as it
    was), so a whole-model variant is scored without a second copy of the model, and with offloaded
    layers without ever holding more than one.
    """
    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        with swapped_weights(layer, edit(i, layer) if edit else {}):
            return Visit(outputs=r.forward(layer))

    runner.run(visit, desc="perplexity")
    ids = runner.token_ids  # [W, T]
    dtype = next(runner.model.parameters()).dtype
    total = sum(float(window_nll(runner.adapter.logits(runner.hidden[w:w + 1].to(dtype)), ids[w:w + 1]).sum())
                for w in range(len(ids)))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


# -- ATP beta search ---------------------------------------------------------------------
@torch.no_grad()
def atp_search(job: "AllocationJob", dense: DenseStats) -> dict[str, Any]:
    """Grid-search ATP's beta by selection-split perplexity of one-shot prunes from dense statistics."""
    recipe, L = job.recipe, job.adapter.num_layers
    atp = recipe.atp
    windows = windows_of(eval_token_ids(job.tokenizer, atp.selection_source), atp.selection_seq_len,
                         atp.selection_windows)  # [W, T]
    # a beta that prunes (almost) a whole layer is never the answer; do not spend a prune on it
    grid = [b for b in alloc.atp_beta_grid(L, recipe.sparsity, atp.step)
            if max(alloc.atp(L, recipe.sparsity, b, job.params)) < 0.99]
    pattern = parse_pattern(recipe.pattern)
    table = []
    for beta in tqdm(grid, desc="ATP beta search", disable=not job.progress):
        rates = alloc.atp(L, recipe.sparsity, beta, job.params)

        def one_shot(i: int, layer: nn.Module, rates=rates) -> dict[str, Tensor]:
            return {rel: job.pruner.prune(layer.get_submodule(rel).weight.data,
                                          dense.per_layer[i].get(rel) if dense.per_layer else None,
                                          rates[i], pattern) for rel in job.targets[i]}

        ppl = streamed_perplexity(job.runner(windows, progress=False), one_shot)
        table.append({"beta": beta, "selection_ppl": ppl})
    best = min(table, key=lambda row: row["selection_ppl"] if math.isfinite(row["selection_ppl"]) else math.inf)
    return {"beta": best["beta"], "search": table, "selection_source": atp.selection_source,
            "selection_seq_len": atp.selection_seq_len, "selection_windows": len(windows)}


# -- allocation ----------------------------------------------------------------------------
@dataclass
class AllocationJob:
    """Everything an allocator may need; each computes only what it uses."""

    model: nn.Module
    tokenizer: Any
    recipe: PruneRecipe
    targets: list[list[str]]
    runner: Callable[..., SequentialRunner]  # (token_ids=calibration, progress=...) -> a stateless runner
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
    ratios = dense_pass(job.runner(), job.targets, get_pruner("wanda"), owl_m=job.recipe.owl.m).outlier_ratios
    rates = alloc.owl(ratios, job.recipe.sparsity, job.recipe.owl.lam, job.params)
    return rates, {"outlier_ratios": ratios, "lam": job.recipe.owl.lam}


def _atp(job: AllocationJob) -> Allocation:
    L, S, beta = job.adapter.num_layers, job.recipe.sparsity, job.recipe.atp.beta
    facts: dict[str, Any] = {"beta": beta}
    if beta is None:
        dense = dense_pass(job.runner(), job.targets, job.pruner)
        facts = atp_search(job, dense)
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
                job: str = "", progress: bool = True, persist_every_s: float = 60.0,
                store: LayerStore | None = None) -> PruneReport:
    """Prune ``model`` in place as ``recipe`` says and report what was done.

    With ``state_dir`` progress is checkpointed every ``persist_every_s`` seconds (0: every layer).
    With an offloading ``store`` (layers on the meta device) the pruned layers end up only in
    ``state_dir``: ``store.layer_files()`` lists them for :func:`save_checkpoint`.
    """
    adapter, targets = validate(model, recipe)
    if store is not None and store.offloads and state_dir is None:
        raise ValueError("pruning with offloaded layers needs a state_dir: the pruned layers are kept there")
    pruner = get_pruner(recipe.method, **({"blocksize": recipe.sparsegpt.blocksize,
                                            "percdamp": recipe.sparsegpt.percdamp}
                                           if recipe.method == "sparsegpt" else {}))
    cal = recipe.calibration
    ids = calibration_batch(tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source)  # [N, T]
    job_id = fingerprint(recipe.model_dump(), job, ids)
    state = Path(state_dir) if state_dir else None

    def runner(token_ids: Tensor = ids, directory: Path | None = None, progress: bool = progress
               ) -> SequentialRunner:
        return SequentialRunner(model, token_ids, cal.batch_size, state_dir=directory, job_id=job_id,
                                progress=progress, persist_every_s=persist_every_s, store=store)

    start = time.perf_counter()
    job_spec = AllocationJob(model, tokenizer, recipe, targets, runner, pruner, progress)
    rates, facts = _cached_allocation(state, job_id, lambda: allocate(job_spec))
    allocated = time.perf_counter()
    pattern = parse_pattern(recipe.pattern)

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        stats, dense_out = collect_stats(r, layer, targets[i], pruner)
        achieved = prune_layer(layer, targets[i], stats, pruner, rates[i], pattern)
        return Visit(facts={"rate": rates[i], "linears": achieved}, reference=dense_out)

    final = runner(directory=state / "layers" if state else None)
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
    """The report, from the outcomes alone (the layers may be offloaded by now)."""
    layers_out, zeros, total = [], 0.0, 0
    for outcome in outcomes:
        i = outcome.index
        for rel, achieved in outcome.facts["linears"].items():
            numel = adapter.layers()[i].get_submodule(rel).weight.numel()  # meta tensors know their size
            zeros += achieved * numel
            total += numel
        layers_out.append({"index": i, "rate": rates[i], **outcome.facts})
    return PruneReport(recipe=recipe.model_dump(), target_sparsity=recipe.sparsity,
                       achieved_sparsity=zeros / max(total, 1), layer_rates=list(rates), layers=layers_out,
                       allocation=facts, seconds=seconds)
