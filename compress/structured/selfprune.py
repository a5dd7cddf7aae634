"""Self-Pruner on a whole model: search per-layer rates, then prune with the best ones.

Contract: :func:`self_prune` computes FLAP's dense statistics once
(:func:`compress.structured.flap.dense_statistics`, cached in the state
directory), defines the search space (per layer ``[min_rate, min(max_rate,
what the layer can lose with its minimums)]``, mean = ``ratio``), scores a
candidate by the perplexity on ``selection_windows`` windows of the held-out
``selection`` split of the model pruned with those rates (layer-rates plans
from the cached statistics, evaluated without changing the model:
:class:`compress.structured.fitness.PlanPerplexity`), runs the evolutionary
search (:mod:`compress.structured.search`, LLM operators when an endpoint is
configured) and finally prunes the model in place with the best rates. The
initial population opens with two seeds: the uniform rates and the rates
FLAP's global ranking (al-am) chooses, so the search starts from FLAP and
keeps it unless it finds better.
The eval split is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from compress.data.text import eval_token_ids
from compress.eval.perplexity import windows_of
from compress.sparsity.runner import fingerprint
from compress.structured.fitness import PlanPerplexity
from compress.structured.flap import (
    StructuredReport, apply_plans, build_report, linear_params, plan_context, statistics, validate,
)
from compress.structured.llm import LLMOperators, llm_from_settings
from compress.structured.planning import PlanContext, plan_layers, plan_params
from compress.structured.recipe import SelfPruneRecipe
from compress.structured.search import EvolutionarySearch, RateSpace, SearchSettings

LOG_NAME = "self_prune_log.jsonl"


def rate_space(ctx: PlanContext, recipe: SelfPruneRecipe) -> RateSpace:
    """Per-layer bounds and the target of the search."""
    upper = [min(recipe.max_rate, ctx.max_rate(i)) for i in range(ctx.num_layers)]
    sizes = [ctx.params_before(i) for i in range(ctx.num_layers)]
    return RateSpace.build([recipe.min_rate] * ctx.num_layers, upper, recipe.ratio, sizes)


def global_rates(ctx: PlanContext, ratio: float) -> list[float]:
    """The per-layer rates FLAP's global ranking (al-am) would choose at ``ratio``."""
    after = plan_params(ctx, plan_layers(ctx, "al-am", ratio))
    return [1.0 - a / ctx.params_before(i) for i, a in enumerate(after)]


def search_settings(recipe: SelfPruneRecipe) -> SearchSettings:
    return SearchSettings(population=recipe.population, crossovers=recipe.crossovers,
                          mutations=recipe.mutations, generations=recipe.generations, seed=recipe.seed,
                          init_spread=recipe.init_spread, mutation_sigma=recipe.mutation_sigma)


def llm_operators(recipe: SelfPruneRecipe, space: RateSpace) -> LLMOperators | None:
    client = llm_from_settings(recipe.llm_base_url, recipe.llm_model, recipe.llm_api_key_env,
                               recipe.llm_timeout_s, recipe.llm_temperature, recipe.llm_max_tokens)
    if client is None:
        return None
    return LLMOperators(client, space.layers, min(space.lower), max(space.upper), space.target, space.repair)


def self_prune(model: nn.Module, tokenizer, recipe: SelfPruneRecipe, state_dir: str | Path | None = None,
               job: str = "", progress: bool = True) -> StructuredReport:
    """Search the rates, prune ``model`` in place with the best, and report (``report.search``)."""
    adapter = validate(model, recipe)
    state = Path(state_dir) if state_dir else None
    before = [linear_params(adapter, i) for i in range(adapter.num_layers)]
    start = time.perf_counter()
    stats = statistics(model, tokenizer, recipe, state, job, progress)
    counted = time.perf_counter()
    ctx = plan_context(adapter, stats, recipe)
    space = rate_space(ctx, recipe)
    windows = windows_of(eval_token_ids(tokenizer, recipe.selection_source), recipe.selection_seq_len,
                         recipe.selection_windows)  # [W, T]
    evaluate = PlanPerplexity(model, windows, stats, bool(recipe.bias_compensation))

    def fitness(rates: list[float]) -> float:
        return evaluate(plan_layers(ctx, "layer-rates", recipe.ratio, rates))

    search_fields = recipe.model_dump(exclude={"generations", "llm_base_url", "llm_model", "llm_api_key_env",
                                               "llm_timeout_s", "llm_temperature", "llm_max_tokens"})
    seeds = [space.uniform(), space.repair(global_rates(ctx, recipe.ratio))]
    job_id = fingerprint("self-prune", job, search_fields, windows, seeds)
    search = EvolutionarySearch(space, fitness, search_settings(recipe),
                                log_path=state / LOG_NAME if state else None, job_id=job_id,
                                llm=llm_operators(recipe, space), progress=progress, seeds=seeds)
    result = search.run()
    searched = time.perf_counter()
    best = result.best["rates"]
    apply_plans(model, plan_layers(ctx, "layer-rates", recipe.ratio, best), stats, bool(recipe.bias_compensation))
    seconds = {"statistics": counted - start, "search": searched - counted,
               "prune": time.perf_counter() - searched, "total": time.perf_counter() - start}
    report = build_report(adapter, recipe.model_dump(), recipe.ratio, before, seconds,
                          {i: {"searched_rate": r} for i, r in enumerate(best)})
    search_facts: dict[str, Any] = result.to_dict()
    search_facts.update(selection_source=recipe.selection_source, selection_seq_len=recipe.selection_seq_len,
                        selection_windows=len(windows), lower=list(space.lower), upper=list(space.upper))
    report.search = search_facts
    return report
