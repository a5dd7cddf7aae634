"""sparse-serve checkpoints on vLLM: a ``vllm.general_plugins`` plugin.

Contract: :func:`register` (the entry point; idempotent, called by vLLM in every process it starts)
registers with vLLM

* the model architecture :data:`ARCHITECTURE` (:mod:`sparse_vllm.model`): vLLM's Llama with the
  per-layer query heads, KV heads, head size and MLP width of ``config.json``'s
  ``sparse_serve_layers`` and the o_proj / down_proj-only biases that FLAP adds;
* the quantization method :data:`QUANT_METHOD` (:mod:`sparse_vllm.linear_method`): linears whose
  weights are stored in the sparse-bitmask layout (``kernels/bitmask.py``) stay compressed, are
  sharded for tensor parallelism in that layout, and run on the project's kernels (the AVX-512
  kernel on CPU, Triton on CUDA, through ``kernels.registry``).

``sparse-compress export --vllm`` (:mod:`sparse_vllm.export`) writes a checkpoint whose
``config.json`` names both. Importing this package does not import vLLM: the pure parts
(:mod:`sparse_vllm.sharding`, :mod:`sparse_vllm.structure`, :mod:`sparse_vllm.export`) work without it.
"""

from __future__ import annotations

#: the architecture name ``config.json`` carries for vLLM (``architectures``)
ARCHITECTURE = "SparseServeLlamaForCausalLM"
#: the ``quantization_config.quant_method`` of sparse-bitmask checkpoints exported for vLLM
QUANT_METHOD = "sparse-serve-bitmask"

_REGISTERED = False


def register() -> None:
    """Register the architecture and the linear method with vLLM (a no-op after the first call)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry

    from sparse_vllm.linear_method import register_quantization

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "sparse_vllm.model:SparseServeLlamaForCausalLM")
    register_quantization()
    _REGISTERED = True
