"""Write and read sparse-serve checkpoints: the contract between ``compress`` and ``sparse_serve``.

Contract: a checkpoint is a directory that stays a valid Hugging Face
checkpoint - ``config.json``, tokenizer files, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``),
``generation_config.json`` when the model has one - plus
``sparse_serve_manifest.json`` (see :mod:`compress.checkpoint.manifest`).

* Decoder linears whose weight is at least ``compress_threshold`` zeros are
  stored in the sparse-bitmask layout of :mod:`kernels.bitmask` (four tensors,
  no ``<prefix>.weight``); everything else is stored as is. ``config.json``
  then carries a compressed-tensors style ``quantization_config`` block, so
  llm-compressor-era tools recognise the weights.
* Layers whose structure differs from what ``config.json`` builds (after
  structured pruning) are listed in ``config.json`` as ``sparse_serve_layers``
  (one :class:`LayerStructure` dict per layer); the loader resizes those layers.
* ``load_checkpoint`` reads sparse-serve checkpoints, llm-compressor
  ``sparse-bitmask`` checkpoints (no manifest) and plain dense Hugging Face
  checkpoints; it builds the model with parameters on the meta device and
  assigns the memory-mapped safetensors tensors, so weights are never
  allocated twice. Every defect is a :class:`CheckpointError` that names the
  path, what is wrong and what to do.
* ``export_dense`` writes a plain checkpoint for tools that know nothing of
  this format. Writes are atomic: a temp directory next to the target is
  renamed into place.

Architecture facts come from :func:`compress.adapter.get_adapter` only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from compress.adapter import LayerStructure, ModelAdapter, UnsupportedModelError, get_adapter
from compress.checkpoint.manifest import (
    MANIFEST_NAME, CheckpointError, LayerInfo, LinearInfo, Manifest, describe_linear, load_manifest,
    save_manifest,
)
from kernels.bitmask import SUFFIXES, BitmaskTensor, compress

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LAYERS_KEY = "sparse_serve_layers"
#: config.json keys under which compressed-tensors puts its sparsity block
COMPRESSION_KEYS = ("quantization_config", "compression_config")
#: sparsity formats we can read, by their compressed-tensors name
READABLE_SPARSITY_FORMATS = ("sparse-bitmask", "dense")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
#: config sparsity_structure for a pattern shared by every compressed linear
SPARSITY_STRUCTURE: dict[str, str] = {"2:4": "2:4"}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16,
                                              "F32": torch.float32}


@dataclass
class LoadedCheckpoint:
    """A loaded model and what the loader learned about its weights.

    ``manifest`` is None for checkpoints sparse-serve did not write.
    ``sparse_weights`` holds the bitmask-stored linears the loader did not
    decompress (``decompress=False``; their ``weight`` stays on the meta
    device). ``detected_sparsity`` is the fraction of zeros of every decoder
    linear, measured on load, so a dense checkpoint that merely contains zeros
    can still be compressed (see :func:`compress_model_linears`).
    """

    model: nn.Module
    tokenizer: Any | None
    manifest: Manifest | None
    sparse_weights: dict[str, BitmaskTensor] = field(default_factory=dict)
    detected_sparsity: dict[str, float] = field(default_factory=dict)
    source: str = "sparse-serve"  # "sparse-serve" | "compressed-tensors" | "huggingface"


# =============================================================================
# saving
# =============================================================================

def save_checkpoint(model: nn.Module, tokenizer: Any | None, out_dir: str | Path, *,
                    recipe: dict | None = None, base_model: str | None = None,
                    evaluation: dict | None = None, compress_threshold: float = 0.3,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    layer_files: Sequence[Path] | None = None) -> Manifest:
    """Write ``model`` (+ tokenizer, generation config, manifest) to ``out_dir`` atomically.

    Linears with sparsity >= ``compress_threshold`` are stored as sparse-bitmask.
    ``out_dir`` may exist only if it is empty or already a sparse-serve checkpoint.
    Tensors are compressed and written one decoder layer at a time; with
    ``layer_files`` (offloaded compression) layer ``i``'s weights are read from
    ``layer_files[i]`` (the layer's state dict as safetensors) instead of the
    model, whose decoder layers may then sit on the meta device.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, _is_sparse_serve_or_empty)
    adapter = _adapter_or_error(model, where="save_checkpoint")
    if layer_files is not None and len(layer_files) != adapter.num_layers:
        raise ValueError(f"layer_files has {len(layer_files)} entries for {adapter.num_layers} layers")
    linear_names = set(adapter.linear_weight_names())
    structures = [adapter.layer_structure(i) for i in range(adapter.num_layers)]
    linears: dict[str, LinearInfo] = {}
    dtypes: list[torch.dtype] = []
    with _atomic_dir(out_dir, _is_sparse_serve_or_empty) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for group in _tensor_groups(model, adapter, layer_files):
            dtypes += [t.dtype for t in group.values() if t.is_floating_point()]
            infos, sparse = _compress_linears(group, [n for n in group if n in linear_names], compress_threshold)
            linears.update(infos)
            for name, bitmask in sparse.items():
                del group[name]
                group.update(bitmask.to_state_dict(_prefix(name)))
            writer.add(group)
        writer.finish()
        linears = {name: linears[name] for name in adapter.linear_weight_names()}  # forward order
        config = _config_for_save(model, structures, linears, max(set(dtypes), key=dtypes.count))
        manifest = Manifest.new(linears=linears, recipe=recipe, base_model=base_model, evaluation=evaluation,
                                layers=[LayerInfo.from_structure(i, s) for i, s in enumerate(structures)])
        _write_json(tmp / CONFIG_NAME, config)
        _save_side_files(model, tokenizer, tmp)
        save_manifest(tmp, manifest)
    return manifest


def compress_model_linears(model: nn.Module, threshold: float) -> dict[str, BitmaskTensor]:
    """Bitmask-compress every decoder linear with sparsity >= ``threshold`` (model is not changed)."""
    adapter = _adapter_or_error(model, where="compress_model_linears")
    out: dict[str, BitmaskTensor] = {}
    for name in adapter.linear_weight_names():
        weight = model.get_parameter(name).detach()
        if weight.device.type != "meta" and _zero_fraction(weight) >= threshold:
            out[name] = compress(weight)
    return out


def _tensor_groups(model: nn.Module, adapter: ModelAdapter,
                   layer_files: Sequence[Path] | None) -> Iterator[dict[str, Tensor]]:
    """The tensors to write, one group at a time: everything outside the decoder layers, then each layer.

    Tied copies are dropped; tensors come back on the CPU, contiguous, with no shared storage.
    """
    state = model.state_dict()
    for target in _tied_targets(model):
        state.pop(target, None)
    prefixes = [adapter.layer_prefix(i) + "." for i in range(adapter.num_layers)]
    seen: set[tuple[int, int]] = set()
    yield _for_save({n: t for n, t in state.items() if not n.startswith(tuple(prefixes))}, seen)
    for i, prefix in enumerate(prefixes):
        if layer_files is None:
            group = {n: t for n, t in state.items() if n.startswith(prefix)}
        else:
            group = {prefix + n: t for n, t in load_file(str(layer_files[i])).items()}
        yield _for_save(group, seen)


def _for_save(tensors: dict[str, Tensor], seen: set[tuple[int, int]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise CheckpointError(f"cannot save: {name} is on the meta device (was the model loaded with "
                                  "decompress=False?). Load it with decompress=True before saving.")
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def _compress_linears(tensors: dict[str, Tensor], names: list[str],
                      threshold: float) -> tuple[dict[str, LinearInfo], dict[str, BitmaskTensor]]:
    """Manifest entries for every decoder linear, and the bitmask form of those to store sparse."""
    infos: dict[str, LinearInfo] = {}
    sparse: dict[str, BitmaskTensor] = {}
    for name in names:
        weight = tensors[name]
        store_sparse = _zero_fraction(weight) >= threshold
        infos[name] = describe_linear(weight, "sparse-bitmask" if store_sparse else "dense")
        if store_sparse:
            sparse[name] = compress(weight)
    return infos, sparse


def _config_for_save(model: nn.Module, structures: list[LayerStructure],
                     linears: dict[str, LinearInfo], dtype: torch.dtype) -> dict[str, Any]:
    config = copy.deepcopy(model.config)
    for key in (*COMPRESSION_KEYS, LAYERS_KEY):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    if structures != _config_structures(config):
        setattr(config, LAYERS_KEY, [s.to_dict() for s in structures])
    out = config.to_diff_dict()
    block = _sparsity_block(linears)
    if block is not None:
        out["quantization_config"] = block
    return out


def _sparsity_block(linears: dict[str, LinearInfo]) -> dict[str, Any] | None:
    """The compressed-tensors ``quantization_config`` announcing sparse-bitmask weights."""
    stored = [info for info in linears.values() if info.storage == "sparse-bitmask"]
    if not stored:
        return None
    numel = sum(i.shape[0] * i.shape[1] for i in linears.values())
    zeros = sum(i.sparsity * i.shape[0] * i.shape[1] for i in linears.values())
    patterns = {info.pattern for info in stored}
    structure = SPARSITY_STRUCTURE.get(patterns.pop(), "unstructured") if len(patterns) == 1 else "unstructured"
    return {"quant_method": "compressed-tensors", "format": "dense",
            "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": zeros / numel,
                                "sparsity_structure": structure, "targets": ["Linear"],
                                "ignore": ["lm_head"]}}


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a larger single tensor gets its
    own), holding one shard in memory at a time; ``finish`` names them as Hugging Face does."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._flush()
            self.pending[name] = tensor
            self.pending_bytes += nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.directory / WEIGHTS_NAME)
            return
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.written, start=1):
            filename = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.directory / filename)
            weight_map.update(dict.fromkeys(names, filename))
        _write_json(self.directory / INDEX_NAME,
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})


def _save_side_files(model: nn.Module, tokenizer: Any | None, directory: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


# =============================================================================
# loading
# =============================================================================

def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16,
                    device: str | torch.device = "cpu", decompress: bool = True,
                    compress_threshold: float | None = None) -> LoadedCheckpoint:
    """Load a sparse-serve, llm-compressor sparse-bitmask or plain HF checkpoint.

    ``dtype=None`` keeps the dtype recorded in config.json. With
    ``decompress=False`` bitmask-stored linears stay in ``sparse_weights`` and
    their ``weight`` stays on the meta device; ``compress_threshold`` then also
    compresses on load every dense-stored linear with at least that fraction of
    zeros (a dense checkpoint that merely contains zeros), freeing its dense copy.
    """
    path = _checked_dir(path)
    raw_config = _read_json(path / CONFIG_NAME, what="config.json")
    files = weight_files(path)
    manifest = load_manifest(path) if (path / MANIFEST_NAME).exists() else None
    sparsity_config = _sparsity_config(raw_config, path)
    source = "sparse-serve" if manifest else ("compressed-tensors" if sparsity_config else "huggingface")
    dtype = dtype or _config_dtype(raw_config)
    config = _build_config(raw_config, path)
    model, adapter = _empty_model(config, dtype, path)
    _apply_layer_structures(adapter, raw_config.get(LAYERS_KEY), manifest, path)
    dense, sparse = _split_sparse(_read_tensors(files), path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = _tied_targets(model)
    _check_manifest_tensors(manifest, dense, sparse, expected, path)
    _check_tensors(dense, sparse, expected, tied, path)
    kept = _assign_weights(model, dense, sparse, dtype, torch.device(device), decompress)
    if not decompress and compress_threshold is not None:
        kept.update(_compress_on_load(model, adapter, kept, compress_threshold))
    if tied:
        model.tie_weights()
    _check_materialised(model, set(kept), path)
    _load_generation_config(model, path)
    model.eval()
    return LoadedCheckpoint(model=model, tokenizer=_load_tokenizer(path), manifest=manifest,
                            sparse_weights=kept, detected_sparsity=_detect_sparsity(adapter, model, kept),
                            source=source)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, or a :class:`CheckpointError`."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index, what="the safetensors index").get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing or not files:
            raise CheckpointError(f"{index}: lists weight files that do not exist ({missing[:3]}); "
                                  "the checkpoint is incomplete - copy it again or re-create it.")
        return files
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    files = sorted(path.glob("model*.safetensors"))
    if files:
        return files
    legacy = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" It has {legacy[:2]}: convert them to safetensors (load and save_pretrained with "
            "transformers)." if legacy else " Copy the weights into it or re-create the checkpoint.")
    raise CheckpointError(f"{path}: no weights files ({WEIGHTS_NAME}, {INDEX_NAME} or model*.safetensors)."
                          + hint)


def checkpoint_nbytes(path: str | Path) -> int:
    """Total bytes of a checkpoint's weight files."""
    return sum(f.stat().st_size for f in weight_files(_checked_dir(path)))


def _checked_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory; check the path.")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a checkpoint directory; pass the directory that "
                              "holds config.json and the .safetensors files.")
    if not (path / CONFIG_NAME).exists():
        raise CheckpointError(f"{path}: no config.json, so this is not a Hugging Face checkpoint; pass the "
                              "directory written by save_pretrained / sparse-compress.")
    return path


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read {what} ({err}).") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err.msg} at line {err.lineno}); "
                              "the file is damaged - restore or re-create it.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(data).__name__}.")
    return data


def _sparsity_config(raw_config: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The compressed-tensors sparsity block, validated; None when there is none."""
    for key in COMPRESSION_KEYS:
        block = raw_config.get(key)
        if not isinstance(block, dict):
            continue
        method = block.get("quant_method", "compressed-tensors")
        if method != "compressed-tensors" or block.get("config_groups"):
            raise CheckpointError(f"{path / CONFIG_NAME}: {key} describes quantized weights "
                                  f"(quant_method={method!r}); sparse-serve reads only dense and "
                                  "sparse-bitmask weights. Dequantize the model first.")
        sparsity = block.get("sparsity_config")
        if isinstance(sparsity, dict):
            fmt = sparsity.get("format")
            if fmt not in READABLE_SPARSITY_FORMATS:
                raise CheckpointError(f"{path / CONFIG_NAME}: {key}.sparsity_config.format is {fmt!r}; "
                                      f"sparse-serve reads {list(READABLE_SPARSITY_FORMATS)}. Re-save the "
                                      "model dense (or as sparse-bitmask) with llm-compressor.")
            return sparsity
    return None


def _config_dtype(raw_config: dict[str, Any]) -> torch.dtype:
    name = raw_config.get("dtype") or raw_config.get("torch_dtype") or "bfloat16"
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) else torch.bfloat16


def _build_config(raw_config: dict[str, Any], path: Path) -> PretrainedConfig:
    """A transformers config without the compression blocks (so no quantizer is engaged)."""
    fields = {k: v for k, v in raw_config.items() if k not in COMPRESSION_KEYS}
    model_type = fields.get("model_type")
    try:
        return AutoConfig.for_model(**fields)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: model_type {model_type!r} cannot be built by "
                              f"transformers ({err}); sparse-serve supports LLaMA-family decoders.") from None


def _empty_model(config: PretrainedConfig, dtype: torch.dtype, path: Path) -> tuple[nn.Module, ModelAdapter]:
    """The model with every parameter on the meta device; buffers (rotary tables) are real."""
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise CheckpointError(f"{path}: transformers cannot build a causal LM from this config "
                              f"(model_type {config.model_type!r}): {err}") from None
    return model, _adapter_or_error(model, where=str(path))


def _apply_layer_structures(adapter: ModelAdapter, raw: Any, manifest: Manifest | None, path: Path) -> None:
    if raw is not None:
        for i, structure in enumerate(_parse_structures(raw, adapter.num_layers, path)):
            if adapter.layer_structure(i) != structure:
                adapter.resize_layer(i, structure)
    if manifest is not None and manifest.layers:
        built = [adapter.layer_structure(i) for i in range(adapter.num_layers)]
        if manifest.layer_structures() != built:
            raise CheckpointError(f"{path}: {MANIFEST_NAME} 'layers' disagree with the structure config.json "
                                  f"builds ({LAYERS_KEY}); the checkpoint was edited by hand - re-create it.")


def _parse_structures(raw: Any, num_layers: int, path: Path) -> list[LayerStructure]:
    where = f"{path / CONFIG_NAME}: {LAYERS_KEY}"
    if not isinstance(raw, list) or len(raw) != num_layers:
        raise CheckpointError(f"{where} must be a list of {num_layers} layer dicts (one per layer); "
                              "re-create the checkpoint.")
    try:
        return [LayerStructure(**item) for item in raw]
    except TypeError as err:
        raise CheckpointError(f"{where} has a malformed entry ({err}); expected the keys "
                              f"{list(LayerStructure.__dataclass_fields__)}.") from None


def _read_tensors(files: list[Path]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: cannot read the safetensors file ({err}); it is damaged or "
                                  "truncated - copy it again or re-create the checkpoint.") from None
    return tensors


def _split_sparse(tensors: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, BitmaskTensor]]:
    """Separate plain tensors from bitmask groups (keyed by the ``.weight`` name they replace)."""
    dense = dict(tensors)
    sparse: dict[str, BitmaskTensor] = {}
    for key in [k for k in tensors if k.endswith("." + SUFFIXES["bitmask"])]:
        prefix = key[: -len(SUFFIXES["bitmask"]) - 1]
        names = [f"{prefix}.{suffix}" for suffix in SUFFIXES.values()]
        absent = [n for n in names if n not in tensors]
        if absent:
            raise CheckpointError(f"{path}: sparse weight {prefix} is incomplete, missing {absent}; the "
                                  "weights are damaged - re-create the checkpoint.")
        try:
            sparse[f"{prefix}.weight"] = BitmaskTensor.from_state_dict(tensors, prefix)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}; the weights are damaged - re-create the checkpoint.") from None
        for name in names:
            dense.pop(name)
    return dense, sparse


def _check_manifest_tensors(manifest: Manifest | None, dense: dict[str, Tensor],
                            sparse: dict[str, BitmaskTensor], expected: dict[str, tuple[int, ...]],
                            path: Path) -> None:
    if manifest is None:
        return
    for name, info in manifest.linears.items():
        stored = sparse.get(name) if info.storage == "sparse-bitmask" else dense.get(name)
        if stored is None:
            layout = (f"{_prefix(name)}.{{shape,compressed,bitmask,row_offsets}}"
                      if info.storage == "sparse-bitmask" else name)
            raise CheckpointError(f"{path}: {MANIFEST_NAME} lists {name} (storage {info.storage!r}) but the "
                                  f"weights files have no {layout}; the checkpoint is incomplete - "
                                  "re-create it.")
        shape = tuple(stored.shape)
        if shape != tuple(info.shape) or expected.get(name, shape) != shape:
            raise CheckpointError(f"{path}: {name} is {list(shape)} in the weights, {list(info.shape)} in "
                                  f"{MANIFEST_NAME} and {list(expected.get(name, ()))} per config.json; "
                                  "re-create the checkpoint.")


def _check_tensors(dense: dict[str, Tensor], sparse: dict[str, BitmaskTensor],
                   expected: dict[str, tuple[int, ...]], tied: set[str], path: Path) -> None:
    present = {**{n: tuple(t.shape) for n, t in dense.items()}, **{n: s.shape for n, s in sparse.items()}}
    missing = sorted(set(expected) - set(present) - tied)
    if missing:
        raise CheckpointError(f"{path}: the weights files lack {len(missing)} tensor(s) the model needs, "
                              f"e.g. {missing[:3]}; the checkpoint is incomplete or for another config - "
                              "re-create it.")
    wrong = [(n, s, expected[n]) for n, s in present.items() if n in expected and tuple(s) != expected[n]]
    if wrong:
        name, got, want = wrong[0]
        raise CheckpointError(f"{path}: {name} has shape {list(got)} in the weights but config.json builds "
                              f"{list(want)} ({len(wrong)} mismatch(es)); config and weights do not belong "
                              f"together (a structurally pruned model needs '{LAYERS_KEY}' in config.json).")
    unexpected = sorted(set(present) - set(expected))
    if unexpected:
        log.warning("%s: ignoring %d tensor(s) the model does not use, e.g. %s", path, len(unexpected),
                    unexpected[:3])


def _assign_weights(model: nn.Module, dense: dict[str, Tensor], sparse: dict[str, BitmaskTensor],
                    dtype: torch.dtype, device: torch.device, decompress: bool) -> dict[str, BitmaskTensor]:
    """Assign tensors into the meta model; return the bitmask weights left compressed."""
    expected = set(model.state_dict())
    state = {n: _cast(t, dtype, device) for n, t in dense.items() if n in expected}
    kept: dict[str, BitmaskTensor] = {}
    for name, bitmask in sparse.items():
        if name not in expected:
            continue
        bitmask = bitmask.to(device, dtype)
        if decompress:
            state[name] = bitmask.decompress()
        else:
            kept[name] = bitmask
    model.load_state_dict(state, strict=False, assign=True)
    _move_buffers(model, device)
    return kept


def _compress_on_load(model: nn.Module, adapter: ModelAdapter, kept: dict[str, BitmaskTensor],
                      threshold: float) -> dict[str, BitmaskTensor]:
    """Bitmask-compress dense linears with >= ``threshold`` zeros; their weight goes to meta."""
    out: dict[str, BitmaskTensor] = {}
    for name in adapter.linear_weight_names():
        weight = model.get_parameter(name)
        if name in kept or weight.device.type == "meta" or _zero_fraction(weight) < threshold:
            continue
        out[name] = compress(weight.detach())
        module_name, _, attr = name.rpartition(".")
        meta = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(meta, requires_grad=False))
    return out


def _cast(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def _check_materialised(model: nn.Module, allowed_meta: set[str], path: Path) -> None:
    left = [n for n, p in model.named_parameters(remove_duplicate=False)
            if p.device.type == "meta" and n not in allowed_meta]
    if left:
        raise CheckpointError(f"{path}: parameters {left[:3]} were not found in the weights; re-create the "
                              "checkpoint.")


def _detect_sparsity(adapter: ModelAdapter, model: nn.Module, kept: dict[str, BitmaskTensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in adapter.linear_weight_names():
        out[name] = 1.0 - kept[name].density if name in kept else _zero_fraction(model.get_parameter(name))
    return out


def _load_generation_config(model: nn.Module, path: Path) -> None:
    if (path / GENERATION_CONFIG_NAME).exists() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(path)


def _load_tokenizer(path: Path) -> Any | None:
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: the tokenizer files cannot be loaded ({err}); copy them from the "
                              "base model.") from None


# =============================================================================
# plain export
# =============================================================================

#: model_type -> writes a uniform LayerStructure into that family's config fields
UNIFORM_CONFIG_WRITERS: dict[str, Callable[[PretrainedConfig, LayerStructure], None]] = {}


def _llama_like_fields(config: PretrainedConfig, structure: LayerStructure) -> None:
    config.num_attention_heads = structure.num_heads
    config.num_key_value_heads = structure.num_kv_heads
    config.head_dim = structure.head_dim
    config.intermediate_size = structure.intermediate_size


for _model_type in ("llama", "mistral", "qwen2"):
    UNIFORM_CONFIG_WRITERS[_model_type] = _llama_like_fields


def export_dense(src: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``src`` as a plain dense Hugging Face checkpoint (zeros kept, no manifest).

    ``dtype=None`` keeps the stored dtype. Models whose layers differ from one
    another are refused; uniformly resized layers are written into the config.
    """
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.resolve() == src.resolve():
        raise CheckpointError(f"{out_dir}: export_dense cannot overwrite its source; choose another directory.")
    loaded = load_checkpoint(src, dtype=dtype, decompress=True)
    model = loaded.model
    config = _plain_config(model, src)
    model.config = config
    may_replace = _any_dir if overwrite else _is_empty
    with _atomic_dir(out_dir, may_replace) as tmp:
        model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return out_dir


def _plain_config(model: nn.Module, src: Path) -> PretrainedConfig:
    """A config that builds exactly ``model``'s shapes, or a :class:`CheckpointError`."""
    config = copy.deepcopy(model.config)
    for key in (*COMPRESSION_KEYS, LAYERS_KEY):
        if hasattr(config, key):
            delattr(config, key)
    adapter = get_adapter(model)
    structures = [adapter.layer_structure(i) for i in range(adapter.num_layers)]
    if structures == _config_structures(config):
        return config
    writer = UNIFORM_CONFIG_WRITERS.get(config.model_type)
    if len(set(structures)) != 1 or writer is None:
        raise CheckpointError(f"{src}: its layers have different sizes (structured pruning), which a plain "
                              "Hugging Face config cannot describe; serve it with sparse-serve, or prune "
                              "every layer to the same structure before exporting.")
    writer(config, structures[0])
    if _meta_shapes(config) != {n: tuple(t.shape) for n, t in model.state_dict().items()}:
        raise CheckpointError(f"{src}: the layer structure {structures[0]} (e.g. a bias only on o_proj) "
                              f"cannot be expressed in a plain {config.model_type} config; serve it with "
                              "sparse-serve instead.")
    return config


# =============================================================================
# helpers
# =============================================================================

def _adapter_or_error(model: nn.Module, *, where: str) -> ModelAdapter:
    try:
        return get_adapter(model)
    except UnsupportedModelError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _tied_targets(model: nn.Module) -> set[str]:
    """Names of parameters that are tied copies of another (e.g. ``lm_head.weight``)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return set(expand(all_submodels=True)) if callable(expand) else set()


def _meta_model(config: PretrainedConfig) -> nn.Module:
    """``config``'s model with everything on the meta device (shapes only)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _meta_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _meta_model(config).state_dict().items()}


def _config_structures(config: PretrainedConfig) -> list[LayerStructure]:
    """The layer structures ``config`` builds when nothing is resized."""
    adapter = get_adapter(_meta_model(config))
    return [adapter.layer_structure(i) for i in range(adapter.num_layers)]


def _zero_fraction(weight: Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def _prefix(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _is_empty(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _is_sparse_serve_or_empty(path: Path) -> bool:
    return _is_empty(path) or (path / MANIFEST_NAME).is_file()


def _any_dir(path: Path) -> bool:
    return path.is_dir()


def _check_replaceable(out_dir: Path, may_replace: Callable[[Path], bool]) -> None:
    if out_dir.exists() and not may_replace(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not an empty directory or a sparse-serve checkpoint; "
                              "refusing to overwrite it - choose another directory or remove it first.")


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, may_replace: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temp directory next to ``out_dir``; on success it replaces ``out_dir``."""
    _check_replaceable(out_dir, may_replace)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        _check_replaceable(out_dir, may_replace)
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
