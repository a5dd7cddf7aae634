"""``sparse-compress flap`` and ``sparse-compress self-prune`` end to end: load, prune, save, report, plot.

Contract: the output directory is checked before any work; progress (the
statistics pass, a sequential prune's layers, the search log) lives in
``<out>.partial/`` so an interrupted run continues with ``resume=True`` (and
an existing state is refused without it). The result is a sparse-serve
checkpoint whose ``config.json`` lists every layer's structure
(``sparse_serve_layers``) and whose manifest carries the recipe and the
report; beside it ``structured_report.json`` / ``.png`` (per-layer heads, MLP
width and removed fraction) and, for Self-Pruner, the search log
``self_prune_log.jsonl`` and ``self_prune_search.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from compress.checkpoint import load_checkpoint, load_manifest, save_checkpoint, save_manifest
from compress.sparsity.job import check_output, state_dir_for
from compress.structured.flap import StructuredReport, structured_prune
from compress.structured.recipe import FlapRecipe, SelfPruneRecipe, StructuredSettings
from compress.structured.search import plot_search
from compress.structured.selfprune import LOG_NAME, self_prune

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REPORT_JSON = "structured_report.json"
REPORT_PNG = "structured_report.png"
SEARCH_PNG = "self_prune_search.png"


def _run(model_path: Path, recipe: StructuredSettings, out: Path, resume: bool, progress: bool,
         prune: Callable[..., StructuredReport], method: str | None) -> StructuredReport:
    state = state_dir_for(out)
    check_output(out, state, resume)
    loaded = load_checkpoint(model_path, dtype=DTYPES[recipe.dtype])
    report = prune(loaded.model, loaded.tokenizer, recipe, state_dir=state, job=str(model_path), progress=progress)
    saved_recipe = {**({"method": method} if method else {}), **recipe.model_dump()}
    save_checkpoint(loaded.model, loaded.tokenizer, out, recipe=saved_recipe, base_model=str(model_path))
    manifest = load_manifest(out)
    manifest.extra["structured_report"] = report.to_dict()
    save_manifest(out, manifest)
    (out / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2))
    plot_report(report, out / REPORT_PNG)
    if (state / LOG_NAME).is_file():
        shutil.copyfile(state / LOG_NAME, out / LOG_NAME)
        plot_search(out / LOG_NAME, out / SEARCH_PNG)
    shutil.rmtree(state, ignore_errors=True)
    return report


def run_flap_job(model_path: Path, recipe: FlapRecipe, out: Path, resume: bool = False,
                 progress: bool = True) -> StructuredReport:
    """FLAP / Wanda-sp: prune the checkpoint at ``model_path`` into ``out``."""
    return _run(model_path, recipe, out, resume, progress, structured_prune, None)


def run_self_prune_job(model_path: Path, recipe: SelfPruneRecipe, out: Path, resume: bool = False,
                       progress: bool = True) -> StructuredReport:
    """Self-Pruner: search per-layer rates, prune ``model_path`` with the best into ``out``."""
    return _run(model_path, recipe, out, resume, progress, self_prune, "self-prune")


def plot_report(report: StructuredReport, path: Path) -> Path:
    """Two panels: per-layer removed fraction, and kept query heads / MLP width relative to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    idx = [layer["index"] for layer in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.bar(idx, [layer["rate"] for layer in layers], color="tab:blue")
    top.axhline(report.target_ratio, color="gray", ls="--", lw=0.8, label=f"target {report.target_ratio:g}")
    top.set_ylabel("parameters removed")
    top.legend(fontsize=8)
    r = report.recipe
    top.set_title(f"{r.get('method', 'self-prune')} {r.get('structure', 'searched rates')} {r['metric']}, "
                  f"bias compensation {r['bias_compensation']}: {report.achieved_ratio:.3f} removed")
    heads0 = max(layer["num_heads"] for layer in layers) or 1
    width0 = max(layer["intermediate_size"] for layer in layers) or 1
    bottom.plot(idx, [layer["num_heads"] / heads0 for layer in layers], "o-", label="query heads / max")
    bottom.plot(idx, [layer["intermediate_size"] / width0 for layer in layers], "s-", label="MLP width / max")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("decoder layer")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
