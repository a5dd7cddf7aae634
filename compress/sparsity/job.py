"""``sparse-compress prune`` end to end: load, prune, save, report, plot.

Contract: :func:`run_prune_job` checks the recipe, the model and the output
directory before any work; keeps per-layer progress in ``<out>.partial/`` so
an interrupted run continues with ``resume=True`` (and refuses to start over
silently when such a state exists); writes a sparse-serve checkpoint whose
manifest carries the recipe and the prune report, plus ``prune_report.json``
and ``prune_report.png`` (per-layer sparsity and reconstruction error).

With ``offload=True`` the model's decoder layers stay on disk (meta device)
and are loaded one at a time (:mod:`compress.checkpoint.layerwise`): memory
holds the embeddings and head, one layer and the calibration hidden states,
so a model larger than RAM can be pruned; the result is bit-identical to an
in-memory run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from compress.checkpoint import load_checkpoint, load_manifest, save_checkpoint, save_manifest
from compress.checkpoint.layerwise import open_layerwise
from compress.sparsity.prune import PruneReport, prune_model
from compress.sparsity.recipe import PruneRecipe

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REPORT_JSON = "prune_report.json"
REPORT_PNG = "prune_report.png"


def state_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, state: Path, resume: bool) -> None:
    """Refuse to clobber unrelated files or to ignore an interrupted run."""
    if out.exists() and any(out.iterdir()) and not (out / "sparse_serve_manifest.json").is_file():
        raise ValueError(f"{out} exists and is not a sparse-serve checkpoint; choose another -o")
    if state.exists() and not resume:
        raise ValueError(f"{state} holds an interrupted run; pass --resume to continue it, "
                         "or delete it to start over")


def run_prune_job(model_path: Path, recipe: PruneRecipe, out: Path, resume: bool = False,
                  state_dir: Path | None = None, progress: bool = True, offload: bool = False,
                  persist_every_s: float = 60.0) -> PruneReport:
    """Prune the checkpoint at ``model_path`` into ``out`` (``offload``: one decoder layer in memory)."""
    state = state_dir or state_dir_for(out)
    check_output(out, state, resume)
    dtype = DTYPES[recipe.dtype]
    if offload:
        loaded, store = open_layerwise(model_path, dtype=dtype)
    else:
        loaded, store = load_checkpoint(model_path, dtype=dtype), None
    report = prune_model(loaded.model, loaded.tokenizer, recipe, state_dir=state, job=str(model_path),
                         progress=progress, store=store, persist_every_s=persist_every_s)
    save_checkpoint(loaded.model, loaded.tokenizer, out, recipe=recipe.model_dump(), base_model=str(model_path),
                    layer_files=store.layer_files() if store else None)
    manifest = load_manifest(out)
    manifest.extra["prune_report"] = report.to_dict()
    save_manifest(out, manifest)
    (out / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2))
    plot_report(report, out / REPORT_PNG)
    shutil.rmtree(state, ignore_errors=True)
    return report


def plot_report(report: PruneReport, path: Path) -> Path:
    """Two panels: per-layer sparsity (target and achieved) and reconstruction error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [layer["index"] for layer in report.layers]
    achieved = [sum(layer["linears"].values()) / max(len(layer["linears"]), 1) for layer in report.layers]
    errors = [layer.get("reconstruction_error", float("nan")) for layer in report.layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(idx, report.layer_rates, "o-", label="allocated")
    top.plot(idx, achieved, "x", label="achieved (mean over linears)")
    top.axhline(report.target_sparsity, color="gray", lw=0.8, ls="--", label=f"target {report.target_sparsity:g}")
    values = list(report.layer_rates) + achieved
    top.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
    top.set_ylabel("sparsity")
    top.legend(fontsize=8)
    r = report.recipe
    top.set_title(f"{r['method']} + {r['allocation']} ({r['pattern']})")
    bottom.semilogy(idx, errors, "o-", color="tab:red")
    bottom.set_ylabel("relative reconstruction error")
    bottom.set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
