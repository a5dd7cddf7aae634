"""The one place that knows a model's architecture.

Contract: algorithm, checkpoint and evaluation code never touch
``model.model.layers`` or assume a number of layers, heads or a head size; they
ask a :class:`ModelAdapter`. ``get_adapter(model)`` picks the adapter from the
model's ``config.model_type`` through a registry and raises
:class:`UnsupportedModelError` (naming the type and the supported ones) for
anything else.

An adapter answers: which are the decoder layers, which are the seven linears
of a layer and what each is called, the per-layer structure (query heads, KV
heads, head size, MLP width, which projections carry a bias), and how to
rebuild a layer with other sizes (used by structured pruning and its loader).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class LayerStructure:
    """Sizes of one decoder layer; different layers may differ after FLAP."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class ModelAdapter:
    """Architecture facts and surgery for one family of decoder-only models."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: relative names of the linears of a decoder layer, in forward order
    linear_names: ClassVar[tuple[str, ...]] = ()
    #: linears that read the same input tensor (their input statistics are shared)
    input_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- navigation ---------------------------------------------------------
    def decoder(self) -> nn.Module:
        raise NotImplementedError

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of layer ``index`` (e.g. ``model.layers.3``)."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's head on the last layer's outputs: hidden [B, T, D] -> logits [B, T, V]."""
        raise NotImplementedError

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The layer's linears by relative name, in forward order."""
        return {name: layer.get_submodule(name) for name in self.linear_names}

    def linear_weight_names(self) -> list[str]:
        """Full state-dict names of every decoder linear's weight."""
        return [f"{self.layer_prefix(i)}.{rel}.weight"
                for i in range(self.num_layers) for rel in self.linear_names]

    # -- structure ------------------------------------------------------------
    def layer_structure(self, index: int) -> LayerStructure:
        raise NotImplementedError

    def resize_layer(self, index: int, structure: LayerStructure) -> None:
        """Replace layer ``index``'s linears with fresh ones of the given sizes."""
        raise NotImplementedError


ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {sorted(ADAPTERS)}. "
            "Add a ModelAdapter subclass for it in compress/adapter.py.")
    return cls(model)


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias,
                     device=old.weight.device, dtype=old.weight.dtype)


@register_adapter
class LlamaAdapter(ModelAdapter):
    """LLaMA 1/2/3, SmolLM2, Mistral and Qwen2 (GQA included)."""

    model_types = ("llama", "mistral", "qwen2")
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    input_groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.decoder().norm(hidden))

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def layer_structure(self, index: int) -> LayerStructure:
        layer = self.layers()[index]
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.head_dim
        return LayerStructure(
            num_heads=attn.q_proj.out_features // head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            intermediate_size=mlp.gate_proj.out_features,
            o_proj_bias=attn.o_proj.bias is not None,
            down_proj_bias=mlp.down_proj.bias is not None,
        )

    def resize_layer(self, index: int, structure: LayerStructure) -> None:
        if structure.num_heads % structure.num_kv_heads:
            raise ValueError(f"layer {index}: {structure.num_heads} query heads cannot be grouped "
                             f"over {structure.num_kv_heads} KV heads")
        layer = self.layers()[index]
        attn, mlp = layer.self_attn, layer.mlp
        hidden = attn.q_proj.in_features
        qkv_bias = attn.q_proj.bias is not None
        q_out = structure.num_heads * structure.head_dim
        kv_out = structure.num_kv_heads * structure.head_dim
        attn.q_proj = _linear_like(attn.q_proj, hidden, q_out, qkv_bias)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_out, qkv_bias)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_out, qkv_bias)
        attn.o_proj = _linear_like(attn.o_proj, q_out, hidden, structure.o_proj_bias)
        attn.head_dim = structure.head_dim
        attn.num_key_value_groups = structure.num_heads // structure.num_kv_heads
        width = structure.intermediate_size
        mlp_bias = mlp.gate_proj.bias is not None
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width, mlp_bias)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, width, mlp_bias)
        mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, structure.down_proj_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


def map_linears(model: nn.Module, fn: Callable[[str, nn.Linear], None]) -> None:
    """Call ``fn(full_weight_name, linear)`` for every decoder linear."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers()):
        for rel, linear in adapter.linears(layer).items():
            fn(f"{adapter.layer_prefix(i)}.{rel}.weight", linear)


@torch.no_grad()
def linear_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in every decoder linear's weight."""
    out: dict[str, float] = {}
    map_linears(model, lambda name, lin: out.__setitem__(name, float((lin.weight == 0).float().mean())))
    return out
