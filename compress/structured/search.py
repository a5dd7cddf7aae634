"""Self-Pruner's evolutionary search over per-layer pruning rates.

Contract: :class:`RateSpace` holds per-layer bounds and the target; its
:meth:`RateSpace.repair` maps any vector to the nearest-shaped member: rates
clipped to their bounds, then shifted by one common constant (found by
bisection, bounds respected) so that their mean (weighted by layer size)
equals the target exactly (to float rounding).

:class:`EvolutionarySearch` runs (mu + lambda) evolution: an initial
population of ``population`` candidates (opened by the given seeds, by default
the uniform rates; the operator proposes the rest), then each generation ``crossovers``
+ ``mutations`` offspring, survivors = the best ``population`` of parents and
offspring (lower fitness is better). Each operator call goes to the LLM
operator when one is configured (:mod:`compress.structured.llm`) and falls
back to the classical one (tournament selection of size 3, uniform
crossover, Gaussian mutation of a few layers) for every candidate the LLM did
not deliver. Classical draws are seeded per (seed, generation, phase, slot),
so a resumed search makes the same choices as an uninterrupted one.

Every candidate is appended to a JSONL log as soon as its fitness is known
(``kind: candidate``: id, generation, origin, operator, parents, rates,
fitness), with a header naming the job, ``note`` records for every fallback
and a ``generation`` record per finished generation. Started again with the
same log, the search rebuilds its population from the log, evaluates only
what is missing and goes on; a log written for another job is refused.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from compress.structured.llm import LLMOperators, Offspring, OperatorError
from compress.structured.planning import InfeasibleTarget

PHASES = ("init", "crossover", "mutation")
log = logging.getLogger(__name__)


# -- the search space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateSpace:
    """Per-layer bounds [lower_i, upper_i] and the target weighted mean of the rates."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    target: float
    weights: tuple[float, ...]  # layer sizes, normalised to sum 1

    @classmethod
    def build(cls, lower: Sequence[float], upper: Sequence[float], target: float,
              sizes: Sequence[float] | None = None) -> "RateSpace":
        sizes = list(sizes) if sizes is not None else [1.0] * len(lower)
        total = float(sum(sizes))
        space = cls(tuple(lower), tuple(upper), target, tuple(s / total for s in sizes))
        low, high = space.mean(space.lower), space.mean(space.upper)
        if any(lo > hi for lo, hi in zip(lower, upper)) or not low - 1e-12 <= target <= high + 1e-12:
            raise InfeasibleTarget(f"target {target} is outside what the per-layer bounds allow "
                                   f"(mean {low:.4f} .. {high:.4f}); widen min_rate / max_rate or the minimums")
        return space

    @property
    def layers(self) -> int:
        return len(self.lower)

    def mean(self, rates: Sequence[float]) -> float:
        return sum(w * r for w, r in zip(self.weights, rates))

    def _shifted(self, rates: Sequence[float], shift: float) -> list[float]:
        return [min(max(r + shift, lo), hi) for r, lo, hi in zip(rates, self.lower, self.upper)]

    def repair(self, rates: Sequence[float]) -> list[float]:
        """Clip to the bounds, then shift so the weighted mean is the target exactly."""
        rates = self._shifted(rates, 0.0)
        lo, hi = -1.0, 1.0
        for _ in range(200):  # mean(_shifted(rates, c)) is non-decreasing in c
            mid = (lo + hi) / 2
            if self.mean(self._shifted(rates, mid)) < self.target:
                lo = mid
            else:
                hi = mid
        out = self._shifted(rates, (lo + hi) / 2)
        free = [i for i, (r, a, b) in enumerate(zip(out, self.lower, self.upper)) if a < r < b]
        residual = self.target - self.mean(out)
        if free and residual:  # the last rounding error, spread over the unclipped layers
            weight = sum(self.weights[i] for i in free)
            for i in free:
                out[i] = min(max(out[i] + residual / weight, self.lower[i]), self.upper[i])
        return out

    def uniform(self) -> list[float]:
        return self.repair([self.target] * self.layers)


# -- candidates ----------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One evaluated member of the search."""

    id: int
    generation: int
    origin: str  # init | crossover | mutation
    operator: str  # llm | classical
    parents: list[int]
    rates: list[float]
    fitness: float
    seconds: float = 0.0
    cached: bool = False

    @property
    def score(self) -> float:
        return self.fitness if math.isfinite(self.fitness) else math.inf


def survivors(pool: Sequence[Candidate], size: int) -> list[Candidate]:
    """(mu + lambda) selection: the ``size`` best distinct candidates (ties: the older first)."""
    seen: set[tuple[float, ...]] = set()
    distinct = []
    for cand in sorted(pool, key=lambda c: (c.score, c.id)):
        key = tuple(round(r, 9) for r in cand.rates)
        if key not in seen:
            seen.add(key)
            distinct.append(cand)
    return distinct[:size]


# -- classical operators -------------------------------------------------------------------------
class ClassicalOperators:
    """Seeded genetic operators: Gaussian initial spread, tournament selection, uniform crossover,
    Gaussian mutation of a few layers; every result repaired into the space."""

    def __init__(self, space: RateSpace, init_spread: float, mutation_sigma: float):
        self.space, self.init_spread, self.sigma = space, init_spread, mutation_sigma

    @staticmethod
    def tournament(population: Sequence[Candidate], rng: random.Random, size: int = 3) -> Candidate:
        return min(rng.sample(list(population), min(size, len(population))), key=lambda c: (c.score, c.id))

    def propose(self, phase: str, population: Sequence[Candidate], rng: random.Random, slot: int) -> Offspring:
        space = self.space
        if phase == "init":
            return Offspring(space.repair([space.target + rng.gauss(0, self.init_spread)
                                           for _ in range(space.layers)]), [])
        if phase == "crossover":
            a, b = self.tournament(population, rng), self.tournament(population, rng)
            child = [x if rng.random() < 0.5 else y for x, y in zip(a.rates, b.rates)]
            return Offspring(space.repair(child), [a.id, b.id])
        parent = self.tournament(population, rng)
        child = list(parent.rates)
        for i in rng.sample(range(space.layers), max(1, space.layers // 5)):
            child[i] += rng.gauss(0, self.sigma)
        return Offspring(space.repair(child), [parent.id])


# -- the search -----------------------------------------------------------------------------------
@dataclass
class SearchSettings:
    """Sizes and seeds of the evolution (the recipe's search fields)."""

    population: int = 30
    crossovers: int = 10
    mutations: int = 10
    generations: int = 20
    seed: int = 0
    init_spread: float = 0.1
    mutation_sigma: float = 0.05


@dataclass
class SearchResult:
    """The best candidate and how the search went."""

    best: dict[str, Any]
    evaluations: int  # fitness evaluations run by this process (not reused from the log)
    candidates: int  # candidates in the log
    history: list[dict[str, Any]] = field(default_factory=list)  # per generation: best and mean fitness
    notes: list[str] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)  # candidates per operator kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvolutionarySearch:
    """(mu + lambda) evolution of per-layer rates with LLM or classical operators, logged and resumable."""

    def __init__(self, space: RateSpace, fitness: Callable[[list[float]], float], settings: SearchSettings,
                 log_path: Path | None = None, job_id: str = "", llm: LLMOperators | None = None,
                 progress: bool = True, seeds: Sequence[Sequence[float]] | None = None):
        self.space, self.fitness, self.settings = space, fitness, settings
        seeds = [space.uniform()] if seeds is None else seeds
        self.seeds = [space.repair(seed) for seed in seeds][:settings.population]
        self.log_path, self.job_id, self.llm, self.progress = log_path, job_id, llm, progress
        self.classical = ClassicalOperators(space, settings.init_spread, settings.mutation_sigma)
        self.candidates: list[Candidate] = []
        self.notes: list[str] = []
        self.evaluations = 0
        self._cache: dict[tuple[float, ...], float] = {}
        self._logged_generations: set[int] = set()
        self._bar = None

    # -- log ---------------------------------------------------------------------------------------
    def _write(self, record: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _load(self) -> None:
        if self.log_path is None or not self.log_path.is_file():
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._write({"kind": "header", "job_id": self.job_id, "layers": self.space.layers,
                             "target": self.space.target, "lower": self.space.lower, "upper": self.space.upper,
                             "settings": asdict(self.settings)})
            return
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        records = []
        for n, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines) - 1:
                    raise ValueError(f"{self.log_path}: line {n + 1} is not JSON; the log is damaged") from None
        header = records[0] if records else {}
        if header.get("kind") != "header" or header.get("job_id") != self.job_id:
            raise ValueError(f"{self.log_path} is the log of another search (model, recipe or statistics "
                             "differ); delete it or choose another output to start over")
        if len(records) < len(lines):  # the last line was cut by an interruption: that candidate is redone
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        for r in records:
            if r.get("kind") == "candidate":
                cand = Candidate(**{k: r[k] for k in Candidate.__dataclass_fields__ if k in r})
                self.candidates.append(cand)
                self._cache[self._key(cand.rates)] = cand.fitness
            elif r.get("kind") == "generation":
                self._logged_generations.add(int(r["generation"]))
            elif r.get("kind") == "note":
                self.notes.append(r["message"])

    @staticmethod
    def _key(rates: Sequence[float]) -> tuple[float, ...]:
        return tuple(round(r, 9) for r in rates)

    # -- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, offspring: Offspring, generation: int, origin: str, operator: str) -> Candidate:
        key = self._key(offspring.rates)
        start = time.perf_counter()
        cached = key in self._cache
        if not cached:
            self._cache[key] = float(self.fitness(offspring.rates))
            self.evaluations += 1
        cand = Candidate(id=len(self.candidates), generation=generation, origin=origin, operator=operator,
                         parents=offspring.parents, rates=offspring.rates, fitness=self._cache[key],
                         seconds=time.perf_counter() - start, cached=cached)
        self.candidates.append(cand)
        self._write({"kind": "candidate", **asdict(cand)})
        if self._bar is not None:
            self._bar.update(1)
            best = min((c.score for c in self.candidates), default=math.inf)
            self._bar.set_postfix(gen=generation, best=f"{best:.3f}")
        return cand

    def _note(self, generation: int, phase: str, message: str) -> None:
        text = f"generation {generation} {phase}: {message}"
        log.warning("Self-Pruner %s", text)
        self.notes.append(text)
        self._write({"kind": "note", "generation": generation, "phase": phase, "message": message})

    def _breed(self, phase: str, count: int, population: list[Candidate], generation: int) -> list[Candidate]:
        """``count`` evaluated offspring of ``phase`` for ``generation`` (those already logged included)."""
        done = [c for c in self.candidates if c.generation == generation and c.origin == phase]
        missing = count - len(done)
        if missing <= 0:
            return done[:count]
        proposals: list[tuple[Offspring, str]] = []
        if phase == "init":  # the seeds open the initial population, whatever the operator
            proposals = [(Offspring(seed, []), "seed") for seed in self.seeds[len(done):]]
            missing -= len(proposals)
        if self.llm is not None and self.llm.active and missing > 0:
            members = [(c.id, c.score, c.rates) for c in population]
            try:
                found, problems = self.llm.propose(phase, missing, members)
                proposals += [(o, "llm") for o in found]
                if problems or len(found) < missing:
                    self._note(generation, phase, f"the LLM gave {len(found)} valid of {missing} wanted"
                               + (f" ({'; '.join(problems[:3])})" if problems else "")
                               + "; classical operators fill the rest")
            except OperatorError as err:
                self._note(generation, phase, f"{err}; using the classical operator")
        for slot in range(len(done) + len(proposals), count):
            rng = random.Random(f"{self.settings.seed}:{generation}:{phase}:{slot}")
            proposals.append((self.classical.propose(phase, population, rng, slot), "classical"))
        return done + [self._evaluate(o, generation, phase, op) for o, op in proposals]

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        s = self.settings
        self._load()
        total = s.population + s.generations * (s.crossovers + s.mutations)
        self._bar = tqdm(total=total, initial=min(len(self.candidates), total), desc="Self-Pruner search",
                         disable=not self.progress, unit="cand")
        try:
            population = survivors(self._breed("init", s.population, [], 0), s.population)
            history = [self._generation_done(0, population)]
            for g in range(1, s.generations + 1):
                offspring = (self._breed("crossover", s.crossovers, population, g)
                             + self._breed("mutation", s.mutations, population, g))
                population = survivors(population + offspring, s.population)
                history.append(self._generation_done(g, population))
        finally:
            self._bar.close()
            self._bar = None
        best = population[0]
        operators: dict[str, int] = {}
        for c in self.candidates:
            operators[c.operator] = operators.get(c.operator, 0) + 1
        return SearchResult(best=asdict(best), evaluations=self.evaluations, candidates=len(self.candidates),
                            history=history, notes=self.notes, operators=operators)

    def _generation_done(self, generation: int, population: list[Candidate]) -> dict[str, Any]:
        finite = [c.score for c in population if math.isfinite(c.score)]
        row = {"generation": generation, "best_fitness": population[0].fitness, "best_id": population[0].id,
               "mean_fitness": sum(finite) / len(finite) if finite else math.inf,
               "population": [c.id for c in population]}
        if generation not in self._logged_generations:
            self._logged_generations.add(generation)
            self._write({"kind": "generation", **row})
        return row


def plot_search(log_path: Path, out: Path) -> Path:
    """Best (and population mean) fitness per generation, with every candidate as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    cands = [r for r in records if r.get("kind") == "candidate" and math.isfinite(r["fitness"])]
    gens = [r for r in records if r.get("kind") == "generation"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for op, color in (("seed", "tab:green"), ("classical", "tab:gray"), ("llm", "tab:purple")):
        pts = [(c["generation"], c["fitness"]) for c in cands if c["operator"] == op]
        if pts:
            ax.scatter(*zip(*pts), s=10, alpha=0.5, color=color, label=f"candidates ({op})")
    if gens:
        ax.plot([g["generation"] for g in gens], [g["best_fitness"] for g in gens], "o-", color="tab:blue",
                label="best")
        ax.plot([g["generation"] for g in gens], [g["mean_fitness"] for g in gens], "--", color="tab:orange",
                label="population mean")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("selection perplexity (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
