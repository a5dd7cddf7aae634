"""Shared by the benchmark scripts: the facts every final JSON line records, and the sparse checkpoint they share.

Every script imports this module first: ``python benchmarks/X.py`` puts this folder at the head of
``sys.path``, where ``benchmarks/kernels.py`` would shadow the ``kernels`` package, so importing
``common`` takes the folder off the path (``common`` itself is already imported by then).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch
import transformers


def run_facts() -> dict:
    """What was run, where, and how busy the machine was."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": commit or None,
            "loadavg": os.getloadavg(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def sparse_checkpoint(path: Path | None) -> Path:
    """The Wanda 70% SmolLM2 checkpoint (pruned into the cache the first time, about 3 minutes)."""
    if path is not None:
        return path
    out = Path.home() / ".cache" / "sparse-serve" / "bench" / "smollm2-wanda-70"
    if not (out / "prune_report.json").exists():
        subprocess.run([sys.executable, "-m", "compress.cli", "prune", "smollm2-135m-instruct", "-o", str(out),
                        "--method", "wanda", "--sparsity", "0.7"] + (["--resume"] if out.with_suffix(".partial").exists() else []),
                       check=True)
    return out


def variant_checkpoints(variants: list[str], sparse: Path | None = None) -> dict[str, Path]:
    """The checkpoint of each named variant: ``dense`` (SmolLM2) and ``sparse`` (:func:`sparse_checkpoint`)."""
    from compress.models.registry import fetch_model

    resolve = {"dense": lambda: fetch_model("smollm2-135m-instruct"), "sparse": lambda: sparse_checkpoint(sparse)}
    unknown = set(variants) - set(resolve)
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}; choose from dense, sparse")
    return {v: resolve[v]() for v in variants}
