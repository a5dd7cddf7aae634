"""Physical removal of KV groups and MLP channels from a decoder layer, with FLAP's bias compensation.

Contract: a :class:`LayerPlan` says which KV groups and which MLP channels of
one layer are kept. :func:`install_pruned` replaces the layer with a smaller
one (built through the model adapter's ``resize_layer``, so no architecture
constants here) whose linears hold the kept rows / columns of the original,
and, with bias compensation, an o_proj / down_proj bias equal to the removed
columns' mean contribution ``W[:, removed] @ mean(x_removed)``
(:func:`compensation_bias`). The original layer object is not modified, so a
caller can score a plan and put the original back (:func:`temporarily_pruned`).

The removable attention unit is a whole **KV group**: one key/value head
together with every query head that reads it. HF's ``repeat_kv`` gives query
head ``h`` the KV head ``h // (num_heads / num_kv_heads)``, so the group's
query heads are contiguous. Removing whole groups keeps every layer a valid
GQA layer (same number of query heads per KV head), which both transformers
and the serving engine require.

Which linear plays which role comes from :data:`ROLES`, a registry keyed by
the adapter class (the adapter knows the names; this module only knows the
roles).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from compress.adapter import LayerStructure, LlamaAdapter, ModelAdapter, UnsupportedModelError


@dataclass(frozen=True)
class Roles:
    """Relative names of the linears FLAP cuts: q/k/v rows and o columns per KV group,
    MLP input rows and output columns per MLP channel."""

    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str

    @property
    def all(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)


ROLES: dict[type[ModelAdapter], Roles] = {
    LlamaAdapter: Roles(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                        mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj"),
}


def roles_for(adapter: ModelAdapter) -> Roles:
    """The roles of ``adapter``'s linears, or an error naming the supported families."""
    for cls in type(adapter).__mro__:
        if cls in ROLES:
            return ROLES[cls]
    raise UnsupportedModelError(f"structured pruning has no linear roles for {type(adapter).__name__}; "
                                f"supported: {[c.__name__ for c in ROLES]} (add one to ROLES)")


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's sizes and the parameters each removable unit carries (weights and biases)."""

    structure: LayerStructure
    hidden: int
    group_cost: int  # parameters of one KV group: its q/k/v rows (+ biases) and o_proj columns
    channel_cost: int  # parameters of one MLP channel: its gate/up rows (+ biases) and down_proj column

    @property
    def groups(self) -> int:
        return self.structure.num_kv_heads

    @property
    def heads_per_group(self) -> int:
        return self.structure.num_heads // self.structure.num_kv_heads

    @property
    def width(self) -> int:
        return self.structure.intermediate_size

    def fixed(self, o_bias: bool, down_bias: bool) -> int:
        """Parameters no unit removes: the o_proj / down_proj biases when present."""
        return self.hidden * (int(o_bias) + int(down_bias))

    @property
    def params(self) -> int:
        """All parameters of the layer's linears now."""
        s = self.structure
        return self.groups * self.group_cost + self.width * self.channel_cost + self.fixed(s.o_proj_bias,
                                                                                             s.down_proj_bias)


def _numel(linear: nn.Linear, with_bias: bool = True) -> int:
    return linear.weight.numel() + (linear.bias.numel() if with_bias and linear.bias is not None else 0)


def layer_geometry(adapter: ModelAdapter, index: int) -> LayerGeometry:
    """Sizes and unit costs of layer ``index``, counted from its actual linears."""
    roles = roles_for(adapter)
    lin = adapter.linears(adapter.layers()[index])
    structure = adapter.layer_structure(index)
    attn = sum(_numel(lin[n]) for n in (roles.q, roles.k, roles.v)) + _numel(lin[roles.o], with_bias=False)
    mlp = sum(_numel(lin[n]) for n in roles.mlp_in) + _numel(lin[roles.mlp_out], with_bias=False)
    return LayerGeometry(structure, hidden=lin[roles.q].in_features,
                         group_cost=attn // structure.num_kv_heads, channel_cost=mlp // structure.intermediate_size)


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps: KV group indices and MLP channel indices, both ascending."""

    kv_groups: tuple[int, ...]
    mlp_channels: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"kv_groups": list(self.kv_groups), "mlp_channels": list(self.mlp_channels)}

    @classmethod
    def from_dict(cls, raw: dict) -> "LayerPlan":
        return cls(tuple(raw["kv_groups"]), tuple(raw["mlp_channels"]))

    @classmethod
    def full(cls, geometry: LayerGeometry) -> "LayerPlan":
        return cls(tuple(range(geometry.groups)), tuple(range(geometry.width)))


@dataclass(frozen=True)
class LayerMeans:
    """Mean input of o_proj [num_heads * head_dim] and of down_proj [intermediate_size] over calibration."""

    attn: Tensor
    mlp: Tensor


# -- pure tensor functions ----------------------------------------------------------------------
def group_channels(groups: Sequence[int], heads_per_group: int, head_dim: int) -> Tensor:
    """Channel indices of the query heads of ``groups`` (``heads_per_group=1``: of the KV heads)."""
    width = heads_per_group * head_dim
    idx = [torch.arange(g * width, (g + 1) * width) for g in groups]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)  # [len(groups) * width]


def complement(kept: Tensor, total: int) -> Tensor:
    """Indices in ``range(total)`` not in ``kept``."""
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def compensation_bias(weight: Tensor, removed: Tensor, mean: Tensor) -> Tensor:
    """FLAP's bias: the removed columns' mean contribution W[:, removed] @ mean[removed] -> [out] float64."""
    return weight[:, removed].double() @ mean[removed].double()  # [out, |P|] @ [|P|]


def pruned_tensors(layer: nn.Module, roles: Roles, geometry: LayerGeometry, plan: LayerPlan,
                   means: LayerMeans | None) -> dict[str, Tensor]:
    """The kept rows / columns (and compensated biases when ``means``) of every cut linear of ``layer``."""
    lin = {name: layer.get_submodule(name) for name in roles.all}
    s = geometry.structure
    q_idx = group_channels(plan.kv_groups, geometry.heads_per_group, s.head_dim)  # [kept q channels]
    kv_idx = group_channels(plan.kv_groups, 1, s.head_dim)  # [kept kv channels]
    ch_idx = torch.tensor(plan.mlp_channels, dtype=torch.long)  # [kept width]
    out: dict[str, Tensor] = {}
    for name, rows in ((roles.q, q_idx), (roles.k, kv_idx), (roles.v, kv_idx),
                       *((n, ch_idx) for n in roles.mlp_in)):
        out[f"{name}.weight"] = lin[name].weight.data[rows]
        if lin[name].bias is not None:
            out[f"{name}.bias"] = lin[name].bias.data[rows]
    for name, cols, mean in ((roles.o, q_idx, means.attn if means else None),
                             (roles.mlp_out, ch_idx, means.mlp if means else None)):
        weight = lin[name].weight.data  # [D, C]
        out[f"{name}.weight"] = weight[:, cols]
        bias = lin[name].bias.data.double() if lin[name].bias is not None else None  # [D]
        if mean is not None:
            extra = compensation_bias(weight, complement(cols, weight.shape[1]), mean)
            bias = extra if bias is None else bias + extra
        if bias is not None:
            out[f"{name}.bias"] = bias.to(weight.dtype)
    return out


def planned_structure(geometry: LayerGeometry, plan: LayerPlan, bias_compensation: bool) -> LayerStructure:
    """The layer's structure after ``plan``."""
    s = geometry.structure
    return LayerStructure(num_heads=len(plan.kv_groups) * geometry.heads_per_group,
                          num_kv_heads=len(plan.kv_groups), head_dim=s.head_dim,
                          intermediate_size=len(plan.mlp_channels),
                          o_proj_bias=s.o_proj_bias or bias_compensation,
                          down_proj_bias=s.down_proj_bias or bias_compensation)


# -- module surgery --------------------------------------------------------------------------------
def meta_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are on the meta device (no weight is copied);
    buffers and config objects are shared with the original."""
    memo: dict[int, object] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                               for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None:
            memo[id(config)] = config
    return copy.deepcopy(module, memo)


def install_structure(adapter: ModelAdapter, index: int, structure: LayerStructure) -> nn.Module:
    """Replace layer ``index`` by a meta-device clone resized to ``structure``; return the original.
    The caller then assigns the clone's weights (``load_state_dict(..., assign=True)``)."""
    layers = adapter.layers()
    original = layers[index]
    layers[index] = meta_clone(original)
    adapter.resize_layer(index, structure)
    return original


@torch.no_grad()
def install_pruned(adapter: ModelAdapter, index: int, plan: LayerPlan, means: LayerMeans | None) -> nn.Module:
    """Replace layer ``index`` by its pruned version (see the module docstring); return the original."""
    roles = roles_for(adapter)
    geometry = layer_geometry(adapter, index)
    original = adapter.layers()[index]
    new = pruned_tensors(original, roles, geometry, plan, means)
    cut = tuple(f"{name}." for name in roles.all)
    state = {k: v for k, v in original.state_dict().items() if not k.startswith(cut)}
    install_structure(adapter, index, planned_structure(geometry, plan, means is not None))
    adapter.layers()[index].load_state_dict({**state, **new}, assign=True)
    return original


@contextmanager
def temporarily_pruned(adapter: ModelAdapter, index: int, plan: LayerPlan,
                       means: LayerMeans | None) -> Iterator[nn.Module]:
    """Layer ``index`` pruned by ``plan`` inside the block, the original afterwards."""
    original = install_pruned(adapter, index, plan, means)
    try:
        yield adapter.layers()[index]
    finally:
        adapter.layers()[index] = original
