"""Per-layer structure of a checkpoint, and the tensor-parallel sizes it allows (pure, no vLLM).

Contract: :func:`layer_structures` reads the structure of every decoder layer from a config
(a transformers config object or the ``config.json`` dict): ``sparse_serve_layers`` when present
(what FLAP / Self-Pruner write, one :class:`~compress.adapter.LayerStructure` per layer), otherwise
the uniform structure the config's own fields describe. :func:`check_tensor_parallel` raises a
:class:`TensorParallelError` naming the first layer whose heads, KV heads or MLP width a
tensor-parallel size cannot split, the sizes that would work, and what to change;
:func:`valid_tp_sizes` lists the sizes that work.
"""

from __future__ import annotations

from typing import Any, Sequence

from compress.adapter import LayerStructure

LAYERS_KEY = "sparse_serve_layers"  # the config.json key compress.checkpoint.io writes


class TensorParallelError(ValueError):
    """A tensor-parallel size does not split a layer of a (structurally pruned) model."""


def _field(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def uniform_structure(config: Any) -> LayerStructure:
    """The structure every layer has when ``config`` carries no per-layer list (LLaMA field names)."""
    heads = _field(config, "num_attention_heads")
    return LayerStructure(
        num_heads=heads,
        num_kv_heads=_field(config, "num_key_value_heads") or heads,
        head_dim=_field(config, "head_dim") or _field(config, "hidden_size") // heads,
        intermediate_size=_field(config, "intermediate_size"),
        o_proj_bias=bool(_field(config, "attention_bias", False)),
        down_proj_bias=bool(_field(config, "mlp_bias", False)),
    )


def layer_structures(config: Any) -> list[LayerStructure]:
    """One structure per decoder layer, from ``sparse_serve_layers`` or the uniform fields."""
    layers = _field(config, "num_hidden_layers")
    raw = _field(config, LAYERS_KEY)
    if raw is None:
        return [uniform_structure(config)] * layers
    if not isinstance(raw, list) or len(raw) != layers:
        raise ValueError(f"config.json: {LAYERS_KEY} must list {layers} layers (num_hidden_layers), "
                         f"got {len(raw) if isinstance(raw, list) else type(raw).__name__}; re-export the checkpoint")
    try:
        return [LayerStructure(**item) for item in raw]
    except TypeError as err:
        raise ValueError(f"config.json: {LAYERS_KEY} has a malformed entry ({err}); expected the keys "
                         f"{list(LayerStructure.__dataclass_fields__)}") from None


def tp_problem(structure: LayerStructure, tp_size: int) -> str | None:
    """Why ``tp_size`` cannot split this layer as vLLM shards it, or None when it can."""
    if structure.num_heads % tp_size:
        return f"{structure.num_heads} query heads are not a multiple of {tp_size}"
    kv = structure.num_kv_heads
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        return f"{kv} KV heads neither divide nor are divided by {tp_size}"
    if structure.intermediate_size % tp_size:
        return f"MLP width {structure.intermediate_size} is not a multiple of {tp_size}"
    return None


def valid_tp_sizes(structures: Sequence[LayerStructure], limit: int = 64) -> list[int]:
    """Every tensor-parallel size up to ``limit`` that splits every layer."""
    return [tp for tp in range(1, limit + 1) if all(tp_problem(s, tp) is None for s in structures)]


def check_tensor_parallel(structures: Sequence[LayerStructure], tp_size: int) -> None:
    """Raise :class:`TensorParallelError` unless ``tp_size`` splits every layer."""
    for index, structure in enumerate(structures):
        problem = tp_problem(structure, tp_size)
        if problem is not None:
            raise TensorParallelError(
                f"tensor_parallel_size={tp_size} cannot shard layer {index} of this pruned model: {problem}. "
                f"Sizes that split every layer: {valid_tp_sizes(structures)}. Use one of them (and "
                "--pipeline-parallel-size, which has no such constraint, for more GPUs), or re-prune so every "
                f"layer keeps a multiple of {tp_size} KV groups and MLP channels "
                f"(sparse-compress flap --mlp-multiple {32 * tp_size} --min-kv-groups {tp_size}, "
                "with --structure ul-um for the same number of KV groups in every layer).")
