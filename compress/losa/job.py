"""LoSA end to end: progressive rounds (or a baseline), resume, a sparse checkpoint with adapters merged.

Contract: :func:`recover_model` changes a model in place as the recipe's
``mode`` says (registry ``MODES``) and returns a :class:`LosaReport`:

- ``losa``: T rounds; round t merges the adapters, allocates per-layer
  sparsities for s_t (RMI on the merged model, nested: no layer below its
  previous rate; weighted mean exactly s_t), prunes the merged weights
  sequentially (masks nested), measures each layer's reconstruction error
  against the dense outputs cached before round 1, re-allocates the ranks
  (mean r_bar_t, sum exact), unmerges (the base keeps the pruned weights, the
  adapters their learned delta) and fine-tunes. At the end the adapters are
  merged and removed; every linear's zero pattern equals its final mask
  (checked, else an error).
- ``lora``: one-shot prune to S, plain (unmasked) LoRA at the final mean rank
  for as many steps as LoSA takes in all, merge: the baseline whose merge
  densifies the weights (the report says how much sparsity it lost).
- ``none``: one-shot prune to S, no recovery.

With a ``state_dir`` LoSA writes the weights, masks, adapters and history
after every round; an interrupted run resumes after the last finished round
and gives the same weights as an uninterrupted one (same seeds per round).
A state written for another job is refused.

:func:`run_losa_job` is ``sparse-compress losa``: load, recover, save a
sparse-serve checkpoint (its manifest carries the recipe, the report under
``extra.losa_report`` and the evaluation), ``losa_report.json`` and
``losa_loss.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.adapter import ModelAdapter, get_adapter
from compress.data.text import calibration_batch
from compress.losa import layer as lora_layer
from compress.losa.data import TrainingData, open_training_data
from compress.losa.recipe import LosaRecipe
from compress.losa.schedule import (
    allocate_ranks, cubic_schedule, mean_ranks, nested_prune, nested_rates, reconstruction_error,
)
from compress.losa.train import autocast, fine_tune, mean_loss
from compress.sparsity import allocation as alloc
from compress.sparsity.prune import collect_stats, dense_pass, layer_params, prune_model
from compress.sparsity.pruners import Pruner, get_pruner
from compress.sparsity.recipe import PruneRecipe
from compress.sparsity.runner import SequentialRunner, Visit, fingerprint

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REPORT_JSON = "losa_report.json"
LOSS_PNG = "losa_loss.png"


@dataclass
class LosaReport:
    """What a LoSA (or baseline) run did: per round and in the end."""

    mode: str
    recipe: dict[str, Any]
    target_sparsity: float
    schedule: list[float] = field(default_factory=list)  # s_t per round
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # sparsity before / after merge, ranks, ...
    evaluation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def losses(self) -> list[float]:
        return [loss for r in self.rounds for loss in r.get("losses", [])]


@dataclass
class Job:
    """Everything a mode needs."""

    model: nn.Module
    tokenizer: Any
    recipe: LosaRecipe
    ids: Tensor  # [N, T] calibration windows
    pruner: Pruner
    data: TrainingData
    state: Path | None
    job_id: str
    progress: bool
    out_dtype: torch.dtype

    @property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.model)

    @property
    def targets(self) -> list[list[str]]:
        return [list(self.adapter.linear_names)] * self.adapter.num_layers

    def runner(self, ids: Tensor) -> SequentialRunner:
        return SequentialRunner(self.model, ids, self.recipe.calibration.batch_size, progress=self.progress)

    def batches(self, round_index: int, steps: int):
        t = self.recipe.train
        return self.data.batches(round_index, steps * t.grad_accum, t.batch_size)


# -- measurements ---------------------------------------------------------------------------


@torch.no_grad()
def model_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all decoder linears' weights (parameter-weighted)."""
    adapter = get_adapter(model)
    zeros = total = 0
    for layer in adapter.layers():
        for linear in adapter.linears(layer).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    return zeros / max(total, 1)


def mask_sparsity(wrapped: dict[str, Any]) -> float:
    """Fraction of dropped entries over every LoRA layer's mask."""
    dropped = sum(int((~lora.lora_mask).sum()) for lora in wrapped.values())
    return dropped / max(sum(lora.lora_mask.numel() for lora in wrapped.values()), 1)


@torch.no_grad()
def dense_outputs(job: Job) -> list[Tensor]:
    """Every layer's outputs [n, T, D] (bf16) on the first ``error_samples`` sequences."""
    cache: list[Tensor] = []

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        out = r.forward(layer)
        cache.append(out.to(torch.bfloat16))
        return Visit(outputs=out)

    with autocast(job.model, job.recipe.train.autocast):
        job.runner(job.ids[:job.recipe.error_samples]).run(visit, desc="dense outputs")
    return cache


# -- one round ------------------------------------------------------------------------------


def round_rates(job: Job, target: float, floors: list[float] | None) -> tuple[list[float], dict[str, Any]]:
    """Per-layer sparsities for ``target``: RMI on the current (merged) model, or uniform."""
    r, L = job.recipe, job.adapter.num_layers
    params = layer_params(job.adapter, job.targets)
    if r.allocation == "uniform":
        return alloc.uniform(L, target, params), {"name": "uniform"}
    with autocast(job.model, r.train.autocast):
        dense = dense_pass(job.runner(job.ids[:r.rmi.samples]), job.targets, None, gram_samples=r.rmi.samples)
    importance = alloc.rmi_importance(alloc.cka_from_grams(dense.grams), r.rmi_gamma())
    delta = r.rmi.delta or alloc.rmi_delta(target)
    rates = nested_rates(importance.tolist(), target, delta, floors, params)
    return rates, {"name": "rmi", "gamma": r.rmi_gamma(), "delta": delta,
                   "importance": [float(v) for v in importance]}


def prune_pass(job: Job, rates: list[float], cache: list[Tensor]) -> list[dict[str, Any]]:
    """Prune the merged model sequentially with nested masks; per layer: achieved sparsity and error."""
    n_err = job.recipe.error_samples

    def visit(i: int, layer: nn.Module, r: SequentialRunner) -> Visit:
        stats, _ = collect_stats(r, layer, job.targets[i], job.pruner)
        linears = {}
        for rel, lora in job.adapter.linears(layer).items():
            base = lora.get_base_layer()
            weight, keep = nested_prune(base.weight.data, lora.lora_mask, stats.get(rel), rates[i], job.pruner)
            base.weight.data = weight.to(base.weight.dtype)
            lora.set_mask(keep)
            linears[rel] = 1.0 - float(keep.float().mean())
        out = r.forward(layer)  # [N, T, D]: the pruned layer fed by the pruned upstream
        error = reconstruction_error(cache[i].float(), out[:n_err].float())
        return Visit(facts={"rate": rates[i], "linears": linears, "error": error}, outputs=out)

    with autocast(job.model, job.recipe.train.autocast):
        outcomes = job.runner(job.ids).run(visit, desc=f"{job.recipe.method} prune")
    return [o.facts for o in outcomes]


def set_ranks(job: Job, wrapped: dict[str, Any], ranks: list[int]) -> None:
    """Layer i's linears all take rank ranks[i]."""
    for i, layer in enumerate(job.adapter.layers()):
        for lora in job.adapter.linears(layer).values():
            lora.set_rank(ranks[i])


def train_round(job: Job, wrapped: dict[str, Any], round_index: int, steps: int,
                desc: str) -> dict[str, Any]:
    """Fine-tune for ``steps``; the loss of a fixed batch before and after, and every step's loss."""
    t = job.recipe.train
    torch.manual_seed(t.seed + round_index)  # dropout: the same in a resumed run
    batches = job.batches(round_index, steps) or job.batches(round_index, 1)
    probe = batches[:t.grad_accum]
    start = time.perf_counter()
    before = mean_loss(job.model, probe, t.autocast)
    losses = fine_tune(job.model, lora_layer.lora_parameters(wrapped), batches if steps else [], job.recipe.lr,
                       t, job.progress, desc)
    after = mean_loss(job.model, probe, t.autocast)
    return {"loss_before": before, "loss_after": after, "losses": losses, "steps": len(losses),
            "train_seconds": time.perf_counter() - start}


def losa_round(job: Job, wrapped: dict[str, Any], t: int, target: float, mean_rank: int,
               cache: list[Tensor], floors: list[float] | None) -> dict[str, Any]:
    """One progressive round (merge, allocate, prune, error, ranks, unmerge, fine-tune)."""
    start = time.perf_counter()
    lora_layer.merge_all(wrapped)
    rates, facts = round_rates(job, target, floors)
    allocated = time.perf_counter()
    layers = prune_pass(job, rates, cache)
    errors = [layer["error"] for layer in layers]
    ranks = allocate_ranks(errors, mean_rank, job.recipe.r_max)
    set_ranks(job, wrapped, ranks)
    lora_layer.unmerge_all(wrapped)
    pruned = time.perf_counter()
    trained = train_round(job, wrapped, t, job.recipe.steps_per_round, f"round {t + 1} fine-tune")
    return {"round": t + 1, "target": target, "mean_rank": mean_rank, "layer_rates": rates,
            "achieved_sparsity": mask_sparsity(wrapped), "layer_errors": errors, "ranks": ranks,
            "layers": layers, "allocation": facts, **trained,
            "seconds": {"allocation": allocated - start, "prune": pruned - allocated,
                        "train": trained.pop("train_seconds")}}


# -- state ------------------------------------------------------------------------------------


def save_state(state: Path, job_id: str, wrapped: dict[str, Any], rounds: list[dict[str, Any]],
               cache: list[Tensor]) -> None:
    """Weights, masks, adapters and ranks after a finished round (atomic replace), plus the history."""
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "dense_outputs.safetensors").is_file():
        save_file({f"layer_{i}": t.contiguous() for i, t in enumerate(cache)}, str(state / "dense_outputs.safetensors"))
    tensors: dict[str, Tensor] = {}
    for name, lora in wrapped.items():
        tensors[f"{name}.weight"] = lora.get_base_layer().weight.detach().contiguous()
        tensors[f"{name}.mask"] = lora.lora_mask.to(torch.uint8).contiguous()
        tensors[f"{name}.lora_A"] = lora.lora_A[lora_layer.ADAPTER].weight.detach().contiguous()
        tensors[f"{name}.lora_B"] = lora.lora_B[lora_layer.ADAPTER].weight.detach().contiguous()
    save_file(tensors, str(state / "round.safetensors.part"))
    (state / "round.safetensors.part").replace(state / "round.safetensors")
    ranks = {name: lora.active_rank for name, lora in wrapped.items()}
    part = state / "progress.json.part"
    part.write_text(json.dumps({"job_id": job_id, "rounds": rounds, "ranks": ranks}, default=float))
    part.replace(state / "progress.json")


@torch.no_grad()
def load_state(state: Path | None, job_id: str, wrapped: dict[str, Any]
               ) -> tuple[list[dict[str, Any]], list[Tensor]] | None:
    """(finished rounds, dense output cache) restored into ``wrapped``, or None without a state."""
    if state is None or not (state / "progress.json").is_file():
        return None
    record = json.loads((state / "progress.json").read_text())
    if record.get("job_id") != job_id:
        raise ValueError(f"{state} holds the state of another job (recipe, model or calibration differ); "
                         "delete it to start over")
    tensors = load_file(str(state / "round.safetensors"))
    for name, lora in wrapped.items():
        lora.get_base_layer().weight.copy_(tensors[f"{name}.weight"])
        lora.set_mask(tensors[f"{name}.mask"].bool())
        lora.lora_A[lora_layer.ADAPTER].weight.copy_(tensors[f"{name}.lora_A"])
        lora.lora_B[lora_layer.ADAPTER].weight.copy_(tensors[f"{name}.lora_B"])
        lora.active_rank = int(record["ranks"][name])
    dense = load_file(str(state / "dense_outputs.safetensors"))
    return record["rounds"], [dense[f"layer_{i}"] for i in range(len(dense))]


# -- the modes ----------------------------------------------------------------------------------


@torch.no_grad()
def finish_masked(job: Job, wrapped: dict[str, Any]) -> dict[str, Any]:
    """Merge, unwrap, cast to the output dtype with the zero pattern pinned to the masks; check it."""
    before = mask_sparsity(wrapped)
    lora_layer.merge_all(wrapped)
    masks = {name: lora.lora_mask.clone() for name, lora in wrapped.items()}
    ranks = {name: lora.active_rank for name, lora in wrapped.items()}
    lora_layer.unwrap_linears(job.model)
    job.model.to(job.out_dtype)
    for name, keep in masks.items():
        linear = job.model.get_submodule(name)
        linear.weight.data = lora_layer.exact_pattern(linear.weight.data, keep)
        if not lora_layer.pattern_matches(linear.weight, keep):  # pragma: no cover - exact_pattern guarantees it
            raise RuntimeError(f"{name}: merged zero pattern differs from its mask")
    after = model_sparsity(job.model)
    per_layer = [ranks[f"{job.adapter.layer_prefix(i)}.{job.adapter.linear_names[0]}"]
                 for i in range(job.adapter.num_layers)]
    return {"sparsity_before_merge": before, "sparsity_after_merge": after, "pattern_preserved": True,
            "ranks": per_layer}


def _losa(job: Job, report: LosaReport) -> None:
    r = job.recipe
    schedule = cubic_schedule(r.sparsity, r.rounds)
    ranks = mean_ranks(r.rank_start, r.rank_step, r.rounds)
    report.schedule = schedule
    torch.manual_seed(r.train.seed)  # the adapters' initial A
    wrapped = lora_layer.wrap_linears(job.model, "masked", r.r_max, r.alpha_ratio, r.dropout,
                                      [ranks[0]] * job.adapter.num_layers)
    restored = load_state(job.state, job.job_id, wrapped)
    rounds, cache = restored if restored else ([], dense_outputs(job))
    for t in range(len(rounds), r.rounds):
        floors = rounds[-1]["layer_rates"] if rounds else None
        rounds.append(losa_round(job, wrapped, t, schedule[t], ranks[t], cache, floors))
        if job.state is not None:
            save_state(job.state, job.job_id, wrapped, rounds, cache)
    report.rounds = rounds
    report.final = finish_masked(job, wrapped)


def one_shot_recipe(r: LosaRecipe) -> PruneRecipe:
    """The prune recipe of the baselines: the same method, allocation and calibration, straight to S."""
    return PruneRecipe(method=r.method, sparsity=r.sparsity, allocation=r.allocation,
                       calibration=r.calibration, rmi=r.rmi, sparsegpt=r.sparsegpt)


def _one_shot(job: Job, report: LosaReport) -> dict[str, Any]:
    start = time.perf_counter()
    with autocast(job.model, job.recipe.train.autocast):
        pruned = prune_model(job.model, job.tokenizer, one_shot_recipe(job.recipe), progress=job.progress)
    report.schedule = [job.recipe.sparsity]
    return {"round": 1, "target": job.recipe.sparsity, "layer_rates": pruned.layer_rates,
            "achieved_sparsity": pruned.achieved_sparsity, "allocation": pruned.allocation,
            "seconds": {"prune": time.perf_counter() - start}}


def _none(job: Job, report: LosaReport) -> None:
    report.rounds = [_one_shot(job, report)]
    job.model.to(job.out_dtype)
    sparsity = model_sparsity(job.model)
    report.final = {"sparsity_before_merge": sparsity, "sparsity_after_merge": sparsity, "pattern_preserved": True}


def _lora(job: Job, report: LosaReport) -> None:
    r = job.recipe
    first = _one_shot(job, report)
    before = model_sparsity(job.model)
    rank = r.final_rank()
    torch.manual_seed(r.train.seed)
    wrapped = lora_layer.wrap_linears(job.model, "plain", r.r_max, r.alpha_ratio, r.dropout,
                                      [rank] * job.adapter.num_layers)
    trained = train_round(job, wrapped, 0, r.rounds * r.steps_per_round, "plain LoRA fine-tune")
    first["seconds"]["train"] = trained.pop("train_seconds")
    report.rounds = [{**first, "mean_rank": rank, **trained}]
    lora_layer.merge_all(wrapped)
    lora_layer.unwrap_linears(job.model)
    job.model.to(job.out_dtype)
    after = model_sparsity(job.model)
    report.final = {"sparsity_before_merge": before, "sparsity_after_merge": after,
                    "pattern_preserved": after == before, "sparsity_lost": before - after,
                    "ranks": [rank] * job.adapter.num_layers}


MODES: dict[str, Callable[[Job, LosaReport], None]] = {"losa": _losa, "lora": _lora, "none": _none}


def recover_model(model: nn.Module, tokenizer: Any, recipe: LosaRecipe, state_dir: str | Path | None = None,
                  job: str = "", progress: bool = True) -> LosaReport:
    """Prune and recover ``model`` in place as ``recipe.mode`` says; the model ends in ``save_dtype``."""
    if recipe.mode != "none":
        lora_layer.require_peft()
    get_adapter(model)  # unsupported architectures fail before any work
    cal = recipe.calibration
    ids = calibration_batch(tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source)  # [N, T]
    pruner = get_pruner(recipe.method, **({"blocksize": recipe.sparsegpt.blocksize,
                                           "percdamp": recipe.sparsegpt.percdamp}
                                          if recipe.method == "sparsegpt" else {}))
    data = open_training_data(recipe.data, tokenizer, recipe.train.seq_len, recipe.train.seed,
                              recipe.train.train_on_prompt)
    ctx = Job(model, tokenizer, recipe, ids, pruner, data, Path(state_dir) if state_dir else None,
              fingerprint(recipe.model_dump(exclude={"eval"}), job, ids), progress, DTYPES[recipe.save_dtype])
    report = LosaReport(mode=recipe.mode, recipe=recipe.model_dump(), target_sparsity=recipe.sparsity)
    start = time.perf_counter()
    model.eval()
    MODES[recipe.mode](ctx, report)
    report.seconds = {"total": time.perf_counter() - start,
                      "fine_tune": sum(r.get("seconds", {}).get("train", 0.0) for r in report.rounds),
                      "prune": sum(r.get("seconds", {}).get("prune", 0.0) for r in report.rounds)}
    return report


# -- the command ------------------------------------------------------------------------------


def run_losa_job(model_path: Path, recipe: LosaRecipe, out: Path, resume: bool = False,
                 progress: bool = True) -> LosaReport:
    """``sparse-compress losa``: recover the checkpoint at ``model_path`` into the sparse checkpoint ``out``."""
    from compress.checkpoint import load_checkpoint, load_manifest, save_checkpoint, save_manifest
    from compress.checkpoint.summary import evaluation_entries
    from compress.eval import DTYPES as EVAL_DTYPES, run_evaluation
    from compress.sparsity.job import check_output, state_dir_for

    state = state_dir_for(out)
    check_output(out, state, resume)
    loaded = load_checkpoint(model_path, dtype=DTYPES[recipe.dtype])
    report = recover_model(loaded.model, loaded.tokenizer, recipe, state_dir=state, job=str(model_path),
                           progress=progress)
    save_checkpoint(loaded.model, loaded.tokenizer, out, recipe=recipe.model_dump(), base_model=str(model_path))
    if recipe.eval is not None:
        model = loaded.model.to(EVAL_DTYPES[recipe.eval.dtype]).eval()
        report.evaluation = run_evaluation(model, loaded.tokenizer, recipe.eval, name=str(out),
                                           progress=progress).model_dump()
    manifest = load_manifest(out)
    manifest.extra["losa_report"] = report.to_dict()
    if report.evaluation:
        manifest.evaluation.update(evaluation_entries(report.evaluation))
    save_manifest(out, manifest)
    (out / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2, default=float))
    if report.losses:
        plot_losses(report, out / LOSS_PNG)
    shutil.rmtree(state, ignore_errors=True)
    return report


def plot_losses(report: LosaReport, path: Path) -> Path:
    """Training loss per optimizer step across rounds (round boundaries marked with s_t) and, for
    LoSA, every round's ranks per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_ranks = report.mode == "losa"
    fig, axes = plt.subplots(2 if with_ranks else 1, 1, figsize=(8, 6 if with_ranks else 3.5), squeeze=False)
    top = axes[0][0]
    step = 0
    for r in report.rounds:
        losses = r.get("losses", [])
        top.plot(range(step, step + len(losses)), losses, color="tab:blue", lw=1)
        top.axvline(step, color="gray", lw=0.6, ls="--")
        top.text(step, top.get_ylim()[1] if step else max(losses or [0]), f" s={r['target']:.2f}",
                 fontsize=7, va="top")
        step += len(losses)
    top.set_xlabel("optimizer step")
    top.set_ylabel("training loss")
    top.set_title(f"{report.mode}: {report.recipe['method']} to {report.target_sparsity:g}")
    if with_ranks:
        bottom = axes[1][0]
        for r in report.rounds:
            bottom.plot(range(len(r["ranks"])), r["ranks"], "o-", ms=3, label=f"round {r['round']}")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        bottom.set_xlabel("decoder layer")
        bottom.set_ylabel("adapter rank")
        bottom.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
