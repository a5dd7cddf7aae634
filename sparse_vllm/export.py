"""``sparse-compress export --vllm``: a copy of a checkpoint whose ``config.json`` vLLM loads with the plugin.

Contract: :func:`export_vllm` writes a new directory and never touches its input. The weights are
the same files (hard-linked when the output is on the same file system, copied otherwise; nothing
rewrites a safetensors file in place, so sharing it is safe); every other file is copied, and
``config.json`` gets, from :func:`vllm_config`:

* ``architectures: ["SparseServeLlamaForCausalLM"]`` - the plugin's Llama, which reads the per-layer
  ``sparse_serve_layers`` (kept as written) and the o_proj / down_proj biases;
* ``quantization_config: {"quant_method": "sparse-serve-bitmask", ...}`` when some linear is stored
  in the sparse-bitmask layout (the original compressed-tensors ``sparsity_config`` is kept inside,
  for the record); no quantization block otherwise.

Only LLaMA checkpoints (``model_type: llama``, SmolLM2 included) are accepted; anything else, a
quantized checkpoint, or an output directory that is not empty fails with a
:class:`~compress.checkpoint.CheckpointError` naming the problem and the fix.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from compress.checkpoint import CheckpointError, weight_files
from sparse_vllm import ARCHITECTURE, QUANT_METHOD
from sparse_vllm.structure import layer_structures

CONFIG_NAME = "config.json"
COMPRESSION_KEYS = ("quantization_config", "compression_config")
SUPPORTED_MODEL_TYPES = ("llama",)
BITMASK_SUFFIX = ".bitmask"


def sparse_linears(path: Path) -> list[str]:
    """Prefixes (``model.layers.0.self_attn.q_proj``) of the linears stored as sparse-bitmask, read from
    the safetensors headers only."""
    names: list[str] = []
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names += [k.removesuffix(BITMASK_SUFFIX) for k in handle.keys() if k.endswith(BITMASK_SUFFIX)]
    return sorted(names)


def vllm_config(raw: dict[str, Any], has_sparse: bool, where: Path) -> dict[str, Any]:
    """``config.json`` for vLLM from the checkpoint's own (see the module docstring)."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported by the vLLM plugin "
                              f"(supported: {list(SUPPORTED_MODEL_TYPES)}); serve it with sparse-serve, or "
                              "export a dense copy with `sparse-compress export --dense` for stock vLLM.")
    block = _sparsity_block(raw, where)
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k not in COMPRESSION_KEYS}
    out["architectures"] = [ARCHITECTURE]
    if has_sparse:
        out["quantization_config"] = {"quant_method": QUANT_METHOD, "format": "sparse-bitmask",
                                      "sparsity_config": block}
    try:
        layer_structures(out)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    return out


def _sparsity_block(raw: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The compressed-tensors sparsity block (None without one); quantized checkpoints are refused."""
    for key in COMPRESSION_KEYS:
        block = raw.get(key)
        if not isinstance(block, dict):
            continue
        method = block.get("quant_method", "compressed-tensors")
        if method == QUANT_METHOD:
            return block.get("sparsity_config")
        if method != "compressed-tensors" or block.get("config_groups"):
            raise CheckpointError(f"{where / CONFIG_NAME}: {key} describes quantized weights "
                                  f"(quant_method={method!r}); the vLLM plugin serves dense and sparse-bitmask "
                                  "weights only. Serve this checkpoint with vLLM's own quantization support.")
        return block.get("sparsity_config")
    return None


def export_vllm(src: str | Path, out_dir: str | Path) -> Path:
    """Write the vLLM-ready copy of checkpoint ``src`` to ``out_dir`` (absent or empty) and return it."""
    src, out_dir = Path(src), Path(out_dir)
    if not (src / CONFIG_NAME).is_file():
        raise CheckpointError(f"{src}: no config.json; pass a checkpoint directory written by sparse-compress.")
    if out_dir.resolve() == src.resolve():
        raise CheckpointError(f"{out_dir}: the export cannot overwrite its input; choose another directory.")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: exists and is not an empty directory; remove it or choose another.")
    raw = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8"))
    config = vllm_config(raw, bool(sparse_linears(src)), src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _link_or_copy(source: str, target: str) -> str:
    """Hard-link weight files (same file system), copy everything else - so writing the new config.json
    can never reach the input's."""
    if source.endswith(".safetensors"):
        try:
            os.link(source, target)
            return target
        except OSError:
            pass
    return shutil.copy2(source, target)
