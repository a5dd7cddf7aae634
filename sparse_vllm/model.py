"""``SparseServeLlamaForCausalLM``: vLLM's Llama with the per-layer structure of a pruned checkpoint.

Contract: the same module tree, weight names, forward and tensor / pipeline parallelism as vLLM's
``LlamaForCausalLM`` (which it subclasses; only the decoder layer differs), except that layer ``i``
is built with the query heads, KV heads, head size and MLP width of
``layer_structures(config)[i]`` (``sparse_serve_layers`` in config.json, or the uniform config
fields) and carries a bias on ``o_proj`` / ``down_proj`` exactly when that structure says so
(FLAP's bias compensation), independently of ``attention_bias`` / ``mlp_bias``, which keep meaning
the q/k/v and gate/up biases. Each layer's attention declares its own KV heads, so vLLM sizes the
paged KV cache per layer. A tensor-parallel size that does not split every layer is refused before
anything is allocated, with a :class:`~sparse_vllm.structure.TensorParallelError` that names the
layer, the sizes that work and the fix.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from compress.adapter import LayerStructure
from sparse_vllm.structure import check_tensor_parallel, layer_structures


def layer_config(config: Any, structure: LayerStructure) -> Any:
    """A shallow copy of the model config with one layer's sizes (what vLLM's Llama modules read)."""
    out = copy.copy(config)
    out.num_attention_heads = structure.num_heads
    out.num_key_value_heads = structure.num_kv_heads
    out.head_dim = structure.head_dim
    out.intermediate_size = structure.intermediate_size
    return out


class PrunedLlamaMLP(LlamaMLP):
    """``LlamaMLP`` (its forward) with its own width and a down_proj bias independent of gate/up's."""

    def __init__(self, hidden_size: int, width: int, gate_up_bias: bool, down_bias: bool,
                 quant_config: QuantizationConfig | None, prefix: str):
        nn.Module.__init__(self)
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size, output_sizes=[width] * 2, bias=gate_up_bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")  # [2 * width / tp, hidden]
        self.down_proj = RowParallelLinear(
            input_size=width, output_size=hidden_size, bias=down_bias or gate_up_bias,
            quant_config=quant_config, prefix=f"{prefix}.down_proj")  # [hidden, width / tp]
        self.act_fn = SiluAndMul()


class PrunedLlamaDecoderLayer(LlamaDecoderLayer):
    """``LlamaDecoderLayer`` (its forward) sized by this layer's :class:`LayerStructure`."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        nn.Module.__init__(self)
        model_config = vllm_config.model_config.hf_config
        structure = layer_structures(model_config)[extract_layer_index(prefix)]
        config = layer_config(model_config, structure)
        quant_config = self.get_quant_config(vllm_config)
        qkv_bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(
            config=config, hidden_size=config.hidden_size, num_heads=structure.num_heads,
            num_kv_heads=structure.num_kv_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            quant_config=quant_config, bias=qkv_bias, bias_o_proj=structure.o_proj_bias or qkv_bias,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn", attn_type=AttentionType.DECODER)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; vLLM's Llama runs silu only")
        self.mlp = PrunedLlamaMLP(config.hidden_size, structure.intermediate_size,
                                  bool(getattr(config, "mlp_bias", False)), structure.down_proj_bias,
                                  quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SparseServeLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` over :class:`PrunedLlamaDecoderLayer` (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        check_tensor_parallel(layer_structures(vllm_config.model_config.hf_config),
                              get_tensor_model_parallel_world_size())
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PrunedLlamaDecoderLayer)
