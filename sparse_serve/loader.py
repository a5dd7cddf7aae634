"""Load a checkpoint for serving: sparse linears stay compressed and run on the sparse kernels.

Contract: :func:`load_for_serving` reads any checkpoint ``load_checkpoint`` reads; every decoder
linear stored as sparse-bitmask - or stored dense with at least ``compress_threshold`` zeros - is
kept compressed and replaced by a :class:`kernels.linear.SparseLinear` running the kernel the
registry selects for the device and dtype (``kernel`` forces one). ``dense=True`` decompresses
everything instead (the baseline the speedups are measured against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from kernels.linear import sparsify_linears


@dataclass
class ServingModel:
    """A model ready to answer, and which of its linears run sparse."""

    model: nn.Module
    tokenizer: object
    sparse_linears: list[str] = field(default_factory=list)


def load_for_serving(path: str | Path, dtype: torch.dtype = torch.bfloat16, dense: bool = False,
                     compress_threshold: float = 0.3, kernel: str | None = None) -> ServingModel:
    """The model at ``path`` with its sparse linears on the sparse kernels (see the module docstring)."""
    if dense:
        loaded = load_checkpoint(path, dtype=dtype)
        return ServingModel(loaded.model.eval(), loaded.tokenizer)
    loaded = load_checkpoint(path, dtype=dtype, decompress=False, compress_threshold=compress_threshold)
    replaced = sparsify_linears(loaded.model, loaded.sparse_weights, dtype=dtype, force=kernel)
    return ServingModel(loaded.model.eval(), loaded.tokenizer, replaced)
