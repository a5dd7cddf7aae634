"""Load a checkpoint for serving: sparse linears stay compressed, dense ones are prepacked.

Contract: :func:`load_for_serving` reads any checkpoint ``load_checkpoint`` reads (dense, sparse,
structurally pruned; built on the meta device, weights assigned without a dense copy of sparse
layers). Every decoder linear stored as sparse-bitmask - or stored dense with at least
``compress_threshold`` zeros - is kept compressed and replaced by a :class:`kernels.linear.SparseLinear`
running the kernel the registry selects for the device and dtype (``kernel`` forces one). With
``prepack`` every remaining dense CPU linear (lm_head included) is prepacked for oneDNN and, with
``dense_gemv``, also kept row-major for the AVX-512 GEMV that decode steps of a few rows use (an
LM head tied to the embedding shares its storage; other dense weights are held twice). With ``fuse``
q/k/v and gate/up become one linear each (:mod:`sparse_serve.fusion`; the originals are views of it).
``dense=True`` decompresses everything instead (the baseline the speedups are measured against). With
``huge_pages`` the tensors a decode step streams (:func:`kernels.linear.decode_weights`) move into one
transparent-huge-page mapping (:mod:`kernels.hugepages`; ``ServingModel.huge_pages`` is it, or why not).
With ``argmax_screen`` the LM head keeps an int8 screen (:mod:`kernels.argmax_screen`) through which greedy
steps pick their token without reading all of the head (``ServingModel.argmax_screen``: "kept", or why not).
``ServingModel.facts`` describes the compression for ``/v1/models`` and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.adapter import get_adapter
from compress.checkpoint import load_checkpoint
from kernels.hugepages import HugePageArena, place_in_huge_pages
from kernels.linear import PrepackedLinear, SparseLinear, decode_weights, prepack_linears, sparsify_linears
from sparse_serve.fusion import fuse_linears
from sparse_serve.models import paged_class


@dataclass
class ServingModel:
    """A model ready to answer, which of its linears run sparse, and what was done to it."""

    model: nn.Module
    tokenizer: object
    sparse_linears: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)
    huge_pages: HugePageArena | str = "not requested"  # where the streamed weights live, or why not there
    argmax_screen: str = "not requested"  # "kept" when greedy steps use the LM head's screen, else why not

    @property
    def variant(self) -> str:
        return "sparse" if self.sparse_linears else ("pruned" if self.facts.get("structured") else "dense")


def load_for_serving(path: str | Path, dtype: torch.dtype = torch.bfloat16, dense: bool = False,
                     compress_threshold: float = 0.3, kernel: str | None = None,
                     prepack: bool = True, fuse: bool = True, dense_gemv: bool = True,
                     huge_pages: bool = True, argmax_screen: bool = True) -> ServingModel:
    """The model at ``path`` with its sparse linears on the sparse kernels (see the module docstring)."""
    loaded = load_checkpoint(path, dtype=dtype, decompress=dense,
                             compress_threshold=None if dense else compress_threshold)
    fused = fuse_linears(loaded.model, paged_class(loaded.model).FUSED, loaded.sparse_weights, dtype, kernel,
                         prepack, dense_gemv) if fuse else []
    replaced = [] if dense else sparsify_linears(loaded.model, loaded.sparse_weights, dtype=dtype, force=kernel)
    replaced += [name for name in fused if isinstance(loaded.model.get_submodule(name), SparseLinear)]
    if prepack:
        prepack_linears(loaded.model, decode_rows=dense_gemv)
    facts = compression_facts(loaded, replaced)
    screen = screen_lm_head(loaded.model) if argmax_screen else "not requested"
    arena = place_in_huge_pages(decode_weights(loaded.model)) if huge_pages else "not requested"
    return ServingModel(loaded.model.eval(), loaded.tokenizer, replaced, facts, arena, screen)


def screen_lm_head(model: nn.Module) -> str:
    """Give the LM head its argmax screen (:mod:`kernels.argmax_screen`): "kept", or why it has none."""
    head = model.get_output_embeddings()
    if not isinstance(head, PrepackedLinear):
        return f"the LM head is {type(head).__name__}, not a prepacked dense linear"
    reason = head.enable_argmax_screen()
    return "kept" if reason is None else reason


def compression_facts(loaded, sparse_linears: list[str]) -> dict[str, object]:
    """Method, sparsity and structure of a loaded checkpoint (what /v1/models reports)."""
    manifest = loaded.manifest
    recipe = manifest.recipe if manifest else {}
    adapter = get_adapter(loaded.model)
    structures = [adapter.layer_structure(i) for i in range(adapter.num_layers)]
    cfg = loaded.model.config
    structured = any(s.num_heads != cfg.num_attention_heads or s.intermediate_size != cfg.intermediate_size
                     for s in structures)
    densities = [m.density for m in loaded.model.modules() if isinstance(m, SparseLinear)]
    sparsity = (1.0 - sum(densities) / len(densities)) if densities else _mean(loaded.detected_sparsity)
    return {"method": recipe.get("method", "none"), "sparsity": round(sparsity, 4),
            "allocation": recipe.get("allocation", {}).get("name") if isinstance(recipe.get("allocation"), dict)
            else recipe.get("allocation"),
            "structured": structured, "sparse_linears": len(sparse_linears), "source": loaded.source,
            "heads_per_layer": [s.num_heads for s in structures] if structured else None,
            "mlp_width_per_layer": [s.intermediate_size for s in structures] if structured else None,
            "kernel": next((m.kernel.name for m in loaded.model.modules() if isinstance(m, SparseLinear)), None)}


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0
