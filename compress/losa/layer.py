"""Mask-aware LoRA on top of peft's LoRA linear: the update that keeps a sparse weight sparse.

Contract: :class:`MaskedLoraLinear` is peft's ``lora.Linear`` (composition: it
wraps the base ``nn.Linear``; peft owns ``lora_A``/``lora_B``, dropout,
scaling, ``merge(safe_merge=...)`` and ``unmerge``) with one change of
meaning, made in :meth:`MaskedLoraLinear.get_delta_weight`, the single source
of the update::

    delta = ((B[:, :r] @ A[:r]) * M) * scaling          # [out, in]

``M`` is the linear's current keep-mask (a bool buffer ``lora_mask``, True =
kept) and ``r`` its active rank. Adapters are created at ``r_max`` and sliced
to ``r <= r_max``, so a reallocated rank is never silently capped. The
forward adds exactly that delta (``x @ delta^T``); merging adds it to the
weight, so the merged weight is zero exactly where ``M`` is False. A kept
weight whose merged value rounds to exactly 0 is set to the smallest normal
number of its dtype (:func:`exact_pattern`), so the merged zero pattern *is*
``~M``, never a superset. ``unmerge`` subtracts the same delta.

Model-level helpers wrap, merge, unmerge and unwrap every decoder linear the
model adapter names (:func:`wrap_linears`, :func:`unwrap_linears`); the
unmasked baseline uses peft's plain ``lora.Linear`` through the same
functions (``LAYER_KINDS``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.adapter import get_adapter

try:  # peft is an optional dependency (extras `train` and `dev`)
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear
except ImportError as _err:  # pragma: no cover - exercised only without peft
    LoraConfig = None
    PeftLoraLinear = nn.Module
    _PEFT_ERROR: ImportError | None = _err
else:
    _PEFT_ERROR = None

ADAPTER = "default"


def require_peft() -> None:
    """Raise a clear ImportError when peft is not installed."""
    if _PEFT_ERROR is not None:
        raise ImportError("LoSA needs peft: pip install 'sparse-serve[train]' (or peft>=0.21)") from _PEFT_ERROR


# -- pure tensor functions --------------------------------------------------------------


def masked_delta(a: Tensor, b: Tensor, dropped: Tensor | None, scaling: float, rank: int) -> Tensor:
    """((b[:, :rank] @ a[:rank]) * M) * scaling -> [out, in]; a: [r_max, in], b: [out, r_max], dropped = ~M.

    In-place scaling and masking of the fresh product (autograd-safe: mm's backward needs only its
    inputs), so a training step makes two passes over [out, in] here, not four.
    """
    delta = (b[:, :rank] @ a[:rank]).mul_(scaling)  # [out, in]
    return delta if dropped is None else delta.masked_fill_(dropped, 0.0)


def exact_pattern(w: Tensor, keep: Tensor) -> Tensor:
    """``w`` with zeros exactly where ``keep`` is False: dropped entries -> 0, kept entries that are
    exactly 0 -> the smallest normal number of w's dtype (a change far below any rounding error)."""
    tiny = torch.tensor(torch.finfo(w.dtype).tiny, dtype=w.dtype, device=w.device)
    kept = torch.where(w == 0, tiny, w)
    return torch.where(keep, kept, torch.zeros((), dtype=w.dtype, device=w.device))


def pattern_matches(w: Tensor, keep: Tensor) -> bool:
    """True when ``w`` is nonzero exactly where ``keep`` is True."""
    return bool(torch.equal(w != 0, keep))


# -- the peft layer -----------------------------------------------------------------------


class MaskedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear with the update (B A) * M: merges into a sparse weight without densifying it.

    ``lora_mask`` [out, in] starts as ``base.weight != 0``; :meth:`set_mask` and :meth:`set_rank`
    change it and the active rank (only while merged or before training, see the schedule). The base
    weight is zero wherever the mask is False (``set_mask`` enforces it). Without dropout (or in eval)
    the forward is one matmul, x (W + delta)^T; with dropout, W x + delta dropout(x).
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: Any, r: int, lora_alpha: float,
                 rank: int | None = None, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.register_buffer("lora_mask", base_layer.weight.detach() != 0, persistent=True)
        self.register_buffer("lora_dropped", ~self.lora_mask, persistent=False)  # ~M, for in-place masking
        self.register_load_state_dict_post_hook(lambda module, _keys: module.set_mask(module.lora_mask.clone()))
        self.active_rank = r if rank is None else self._checked_rank(rank)

    def _checked_rank(self, rank: int) -> int:
        r_max = self.r[ADAPTER]
        if not 1 <= rank <= r_max:
            raise ValueError(f"rank {rank} is outside [1, r_max = {r_max}]; create the adapters with a larger r_max")
        return int(rank)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """((B A) * M) * scaling [out, in] in the adapter's dtype: the only definition of the update."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return masked_delta(a, b, self.lora_dropped, self.scaling[adapter], self.active_rank)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        active = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)  # the base layer alone (peft unmerges if disabled)
        if args or kwargs:
            raise NotImplementedError(f"MaskedLoraLinear takes only the input, got extra {args} {sorted(kwargs)}")
        base = self.get_base_layer()
        delta = sum(self.get_delta_weight(name) for name in active)  # [out, in]
        dropout = self.lora_dropout[active[0]]
        if isinstance(dropout, nn.Identity) or not self.training:
            return F.linear(x, base.weight + delta, base.bias)  # x (W + delta)^T: one matmul over x
        return base(x) + F.linear(dropout(x), delta.to(x.dtype))

    def merge(self, safe_merge: bool = True, adapter_names: list[str] | None = None) -> None:
        """peft's merge (``safe_merge`` checks the result is finite first), then the exact zero pattern."""
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        weight = self.get_base_layer().weight
        weight.data = exact_pattern(weight.data, self.lora_mask)

    @torch.no_grad()
    def set_mask(self, keep: Tensor) -> None:
        """Replace the keep-mask [out, in] (the schedule only ever removes entries) and zero the base
        weight where it drops: the base weight is zero wherever the mask is False, always."""
        self.lora_mask.copy_(keep)
        torch.logical_not(keep, out=self.lora_dropped)
        self.get_base_layer().weight.data.masked_fill_(self.lora_dropped, 0.0)

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        """Use the first ``rank`` components. Components dropped now are zeroed in B, so the adapter
        function loses them; call while merged, so the unmerge leaves them in the base weight."""
        rank = self._checked_rank(rank)
        if rank < self.active_rank:
            self.lora_B[ADAPTER].weight[:, rank:self.active_rank] = 0
        self.active_rank = rank

    def __repr__(self) -> str:
        return f"masked-{super().__repr__()}[rank={self.active_rank}]"


# -- the model level ----------------------------------------------------------------------

LoraLayer = Any  # MaskedLoraLinear or peft's lora.Linear
LayerFactory = Callable[[nn.Linear, Any, int, float, int], LoraLayer]  # base, config, r_max, alpha/r, rank


def _masked(base: nn.Linear, config: Any, r_max: int, alpha_ratio: float, rank: int) -> LoraLayer:
    return MaskedLoraLinear(base, ADAPTER, config=config, r=r_max, lora_alpha=alpha_ratio * r_max, rank=rank)


def _plain(base: nn.Linear, config: Any, r_max: int, alpha_ratio: float, rank: int) -> LoraLayer:
    return PeftLoraLinear(base, ADAPTER, config=config, r=rank, lora_alpha=alpha_ratio * rank)


#: "masked": LoSA's (B A) * M; "plain": peft's unmasked LoRA (the baseline whose merge densifies)
LAYER_KINDS: dict[str, LayerFactory] = {"masked": _masked, "plain": _plain}


def wrap_linears(model: nn.Module, kind: str, r_max: int, alpha_ratio: float, dropout: float,
                 ranks: list[int]) -> dict[str, LoraLayer]:
    """Replace every decoder linear (as the model adapter names them) by a LoRA layer of ``kind``.

    ``ranks[i]`` is layer i's rank (shared by its linears); scaling = alpha / r = ``alpha_ratio``.
    Returns the LoRA layers by full module name; only their A and B require grad.
    """
    require_peft()
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown LoRA layer kind {kind!r}; known: {', '.join(LAYER_KINDS)}")
    adapter = get_adapter(model)
    if len(ranks) != adapter.num_layers:
        raise ValueError(f"ranks has {len(ranks)} entries for {adapter.num_layers} layers")
    config = LoraConfig(r=r_max, lora_alpha=alpha_ratio * r_max, lora_dropout=dropout)
    model.requires_grad_(False)
    wrapped: dict[str, LoraLayer] = {}
    for i, layer in enumerate(adapter.layers()):
        for rel, linear in adapter.linears(layer).items():
            lora = LAYER_KINDS[kind](linear, config, r_max, alpha_ratio, ranks[i])
            parent, _, leaf = rel.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, lora)
            wrapped[f"{adapter.layer_prefix(i)}.{rel}"] = lora
    for lora in wrapped.values():
        for p in (*lora.lora_A.parameters(), *lora.lora_B.parameters()):
            p.requires_grad_(True)
    return wrapped


def unwrap_linears(model: nn.Module) -> None:
    """Put every decoder linear's base layer back in place of its LoRA layer (merge first)."""
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for rel in adapter.linear_names:
            module = layer.get_submodule(rel)
            if hasattr(module, "base_layer"):
                parent, _, leaf = rel.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, leaf, module.get_base_layer())


def lora_parameters(wrapped: dict[str, LoraLayer]) -> list[nn.Parameter]:
    """The trainable A and B parameters of every LoRA layer."""
    return [p for lora in wrapped.values() for p in (*lora.lora_A.parameters(), *lora.lora_B.parameters())]


@torch.no_grad()
def merge_all(wrapped: dict[str, LoraLayer]) -> None:
    """Safe-merge every adapter into its base weight (ValueError when a result is not finite)."""
    for lora in wrapped.values():
        if not lora.merged:
            lora.merge(safe_merge=True)


@torch.no_grad()
def unmerge_all(wrapped: dict[str, LoraLayer]) -> None:
    """Subtract every merged adapter's (current) delta from its base weight."""
    for lora in wrapped.values():
        if lora.merged:
            lora.unmerge()
