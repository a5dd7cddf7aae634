"""Reading and amending what a checkpoint's manifest says.

Contract: ``store_evaluation`` merges an evaluation report into the
checkpoint's manifest (creating a manifest that describes the weights as they
are when a plain Hugging Face checkpoint has none), keyed so that runs with
other settings accumulate instead of overwriting each other:
``perplexity/<split>@<seq_len>`` and ``zeroshot/<task>``, each with the dtype
and sizes it was measured with. ``describe_checkpoint`` summarises a
checkpoint for humans (``sparse-compress info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from compress.adapter import get_adapter
from compress.checkpoint.io import checkpoint_nbytes
from compress.checkpoint.manifest import (
    MANIFEST_NAME, LayerInfo, Manifest, describe_linear, load_manifest, save_manifest,
)


def evaluation_entries(report: dict[str, Any]) -> dict[str, Any]:
    """Flatten an ``EvalReport`` dict into manifest ``evaluation`` entries."""
    common = {"dtype": report["dtype"], "threads": report["threads"]}
    entries: dict[str, Any] = {}
    if report.get("perplexity"):
        p = report["perplexity"]
        entries[f"perplexity/{p['split']}@{p['seq_len']}"] = {**p, **common}
    for task, result in report.get("tasks", {}).items():
        entries[f"zeroshot/{task}"] = {**result, **common}
    if report.get("seven_task_average") is not None:
        entries["zeroshot/seven_task_average"] = {"acc": report["seven_task_average"], **common}
    return entries


def manifest_for_model(model: nn.Module, base_model: str | None = None) -> Manifest:
    """A manifest describing ``model``'s weights as they are (all stored dense)."""
    adapter = get_adapter(model)
    linears = {name: describe_linear(model.get_parameter(name).detach(), "dense")
               for name in adapter.linear_weight_names()}
    layers = [LayerInfo.from_structure(i, adapter.layer_structure(i)) for i in range(adapter.num_layers)]
    return Manifest.new(linears=linears, layers=layers, base_model=base_model)


def store_evaluation(path: str | Path, report: dict[str, Any], model: nn.Module | None = None) -> Path:
    """Merge ``report`` into the manifest of checkpoint ``path``; returns the manifest's path.

    A checkpoint without a manifest gets one built from ``model`` (required then).
    """
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        manifest = load_manifest(path)
    elif model is not None:
        manifest = manifest_for_model(model, base_model=str(path))
    else:
        raise ValueError(f"{path} has no {MANIFEST_NAME}; pass the loaded model to describe it")
    manifest.evaluation.update(evaluation_entries(report))
    return save_manifest(path, manifest)


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """A short summary of a checkpoint: sizes, sparsity, structure, evaluation."""
    path = Path(path)
    summary: dict[str, Any] = {"path": str(path), "weight_bytes": checkpoint_nbytes(path)}
    if not (path / MANIFEST_NAME).is_file():
        summary["manifest"] = None
        return summary
    m = load_manifest(path)
    params = {n: info.shape[0] * info.shape[1] for n, info in m.linears.items()}
    total = sum(params.values()) or 1
    summary.update({
        "format_version": m.format_version, "created_by": m.created_by, "base_model": m.base_model,
        "recipe": m.recipe,
        "linear_sparsity": sum(m.linears[n].sparsity * p for n, p in params.items()) / total,
        "patterns": sorted({info.pattern for info in m.linears.values()}),
        "storage": sorted({info.storage for info in m.linears.values()}),
        "layers": len(m.layers),
        "heads_per_layer": [info.num_heads for info in m.layers],
        "mlp_width_per_layer": [info.intermediate_size for info in m.layers],
        "evaluation": m.evaluation,
    })
    return summary
