"""Paged forward passes per architecture, chosen by ``config.model_type`` through a registry.

Contract: a paged model wraps a loaded transformers model (its modules, weights and kernels are used
as they are - dense, sparse or structurally resized) and runs ``forward(ids [T], positions [T], meta,
caches, logits_rows [S], argmax=False) -> logits [S, V]`` over one step's flattened tokens (with ``argmax``
it may return the greedy token ids [S] instead, where its LM head can pick them without all the logits).
``kv_shapes()`` gives
each layer's ``(kv_heads, head_dim)``, which may differ per layer after structured pruning; ``FUSED``
names the groups of linears fused at load time (:mod:`sparse_serve.fusion`).
"""

from __future__ import annotations

from torch import nn

from compress.adapter import UnsupportedModelError

PAGED_MODELS: dict[str, type] = {}


def register_paged(cls: type) -> type:
    for model_type in cls.model_types:
        PAGED_MODELS[model_type] = cls
    return cls


def paged_class(model: nn.Module) -> type:
    """The paged model class for ``model``'s architecture; a clear error for an unsupported one."""
    from sparse_serve.models import llama  # noqa: F401  (registers the LLaMA family)

    model_type = getattr(model.config, "model_type", None)
    if model_type not in PAGED_MODELS:
        raise UnsupportedModelError(f"sparse-serve cannot serve model_type {model_type!r}; "
                                    f"supported: {sorted(PAGED_MODELS)}")
    return PAGED_MODELS[model_type]


def build_paged_model(model: nn.Module):
    """The paged wrapper for ``model``."""
    return paged_class(model)(model)
