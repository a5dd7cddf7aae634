"""Open a checkpoint with its decoder layers left on disk, to compress models larger than RAM.

Contract: :func:`open_layerwise` validates the whole checkpoint before any
work starts (shapes come from the safetensors headers; only the tiny
``<w>.shape`` tensors of bitmask weights are read), materialises everything
outside the decoder layers (embeddings, final norm, head) and returns the
model with every decoder layer on the meta device, plus an
:class:`OffloadedLayers` store for :class:`compress.sparsity.runner.SequentialRunner`.

The store materialises a layer when the runner opens it - from the file the
run wrote for it if the layer was already visited, else from the source
checkpoint (bitmask weights decompressed) - and drops it back to the meta
device when the runner closes it. Memory therefore holds the non-layer
weights, one decoder layer and the calibration hidden states; the visited
layers live in the runner's state directory until
:func:`compress.checkpoint.save_checkpoint` (``layer_files=``) streams them
into the output checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from compress.adapter import ModelAdapter
from compress.checkpoint.io import (
    CONFIG_NAME, LAYERS_KEY, LoadedCheckpoint, _apply_layer_structures, _assign_weights, _build_config,
    _cast, _check_manifest_tensors, _check_tensors, _checked_dir, _config_dtype, _empty_model,
    _load_generation_config, _load_tokenizer, _read_json, _sparsity_config, _split_sparse, _tied_targets,
    weight_files,
)
from compress.checkpoint.manifest import MANIFEST_NAME, CheckpointError, load_manifest
from compress.sparsity.runner import LayerStore
from kernels.bitmask import SUFFIXES


@dataclass(frozen=True)
class _Shape:
    """Stands in for a tensor where only its shape is checked."""

    shape: tuple[int, ...]


class TensorFiles:
    """Lazy, by-name access to the tensors of a checkpoint's safetensors files."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with _opened(file) as handle:
                for name in handle.keys():
                    self.where[name] = file
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def read(self, names: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for file, members in by_file.items():
            with _opened(file) as handle:
                out.update({name: handle.get_tensor(name) for name in members})
        return out

    def names_under(self, prefix: str) -> list[str]:
        return [name for name in self.where if name.startswith(prefix)]


def _opened(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: cannot read the safetensors file ({err}); it is damaged or "
                              "truncated - copy it again or re-create the checkpoint.") from None


class OffloadedLayers(LayerStore):
    """Decoder layers kept on the meta device, materialised one at a time (see the module docstring)."""

    offloads = True

    def __init__(self, files: TensorFiles, adapter: ModelAdapter, dtype: torch.dtype, path: Path):
        self.files, self.adapter, self.dtype, self.path = files, adapter, dtype, path
        self.saved: dict[int, Path] = {}

    def open(self, index: int, layer: nn.Module) -> None:
        state = load_file(str(self.saved[index])) if index in self.saved else self._source_state(index)
        layer.load_state_dict(state, strict=True, assign=True)

    def close(self, index: int, layer: nn.Module, saved: Path | None) -> None:
        if saved is not None:
            self.saved[index] = saved
        layer.to("meta")

    def restore(self, index: int, layer: nn.Module, saved: Path) -> None:
        self.saved[index] = saved

    def layer_files(self) -> list[Path]:
        """Every layer's visited weights, in order (after a complete run)."""
        missing = [i for i in range(self.adapter.num_layers) if i not in self.saved]
        if missing:
            raise RuntimeError(f"layers {missing[:5]} were never visited with a state directory")
        return [self.saved[i] for i in range(self.adapter.num_layers)]

    def _source_state(self, index: int) -> dict[str, Tensor]:
        prefix = self.adapter.layer_prefix(index) + "."
        dense, sparse = _split_sparse(self.files.read(self.files.names_under(prefix)), self.path)
        state = {name: _cast(t, self.dtype, torch.device("cpu")) for name, t in dense.items()}
        state.update({name: b.to("cpu", self.dtype).decompress() for name, b in sparse.items()})
        return {name.removeprefix(prefix): t for name, t in state.items()}


def open_layerwise(path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16
                   ) -> tuple[LoadedCheckpoint, OffloadedLayers]:
    """The checkpoint at ``path`` with its decoder layers on the meta device, and their store."""
    path = _checked_dir(path)
    raw_config = _read_json(path / CONFIG_NAME, what="config.json")
    files = TensorFiles(weight_files(path))
    manifest = load_manifest(path) if (path / MANIFEST_NAME).exists() else None
    sparsity_config = _sparsity_config(raw_config, path)
    dtype = dtype or _config_dtype(raw_config)
    model, adapter = _empty_model(_build_config(raw_config, path), dtype, path)
    _apply_layer_structures(adapter, raw_config.get(LAYERS_KEY), manifest, path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    dense_shapes, sparse_shapes = _shapes(files)
    tied = _tied_targets(model)
    _check_manifest_tensors(manifest, dense_shapes, sparse_shapes, expected, path)
    _check_tensors(dense_shapes, sparse_shapes, expected, tied, path)
    prefixes = tuple(adapter.layer_prefix(i) + "." for i in range(adapter.num_layers))
    outside = [name for name in files.where if not name.startswith(prefixes)]
    dense, sparse = _split_sparse(files.read(outside), path)
    _assign_weights(model, dense, sparse, dtype, torch.device("cpu"), decompress=True)
    if tied:
        model.tie_weights()
    _load_generation_config(model, path)
    model.eval()
    source = "sparse-serve" if manifest else ("compressed-tensors" if sparsity_config else "huggingface")
    loaded = LoadedCheckpoint(model=model, tokenizer=_load_tokenizer(path), manifest=manifest, source=source)
    return loaded, OffloadedLayers(files, adapter, dtype, path)


def _shapes(files: TensorFiles) -> tuple[dict[str, _Shape], dict[str, _Shape]]:
    """Shapes of the plain tensors and of the bitmask-stored weights (by their ``.weight`` name)."""
    suffix = "." + SUFFIXES["bitmask"]
    prefixes = [name[: -len(suffix)] for name in files.where if name.endswith(suffix)]
    parts = {f"{p}.{s}" for p in prefixes for s in SUFFIXES.values()}
    absent = sorted(parts - set(files.where))
    if absent:
        raise CheckpointError(f"sparse weight tensors are missing, e.g. {absent[:3]}; the weights are "
                              "damaged - re-create the checkpoint.")
    shape_tensors = files.read([f"{p}.{SUFFIXES['shape']}" for p in prefixes])
    sparse = {f"{p}.weight": _Shape(tuple(int(v) for v in shape_tensors[f"{p}.{SUFFIXES['shape']}"]))
              for p in prefixes}
    dense = {name: _Shape(shape) for name, shape in files.shapes.items() if name not in parts}
    return dense, sparse
