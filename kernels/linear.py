"""``SparseLinear``: a drop-in ``nn.Linear`` replacement whose weight stays in the bitmask layout.

Contract: ``SparseLinear.from_bitmask(weight, bias)`` packs the weight once for the implementation
the kernel registry selects for the weight's device and the compute dtype (or the one forced), and
``forward(x [..., K]) -> [..., N]`` calls it; no dense copy is kept unless the selected
implementation is the dense fallback. :func:`sparsify_linears` is the runtime swap: it replaces the
linears of a model loaded with ``load_checkpoint(..., decompress=False)`` (whose sparse weights sit
in ``LoadedCheckpoint.sparse_weights``) by ``SparseLinear`` modules.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from kernels.argmax_screen import MAX_ROWS as SCREEN_MAX_ROWS, ArgmaxScreen, build_argmax_screen, screened_argmax
from kernels.bitmask import BitmaskTensor
from kernels.cpu import TUNING, bind_dense, dense_linear, extension, native_dense, prepack_dense
from kernels.exponent_coding import decode_exponents
from kernels.registry import Kernel, select

OP = "bitmask_linear"


class SparseLinear(nn.Module):
    """y = x W^T + b with W [N, K] in the sparse-bitmask layout, computed by a registered kernel."""

    def __init__(self, weight: BitmaskTensor, bias: Tensor | None, kernel: Kernel, packed: Any,
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel, self.packed, self.dtype = kernel, packed, dtype
        self.density = weight.density
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_bitmask(cls, weight: BitmaskTensor, bias: Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                     force: str | None = None) -> "SparseLinear":
        kernel = select(OP, weight.values.device, dtype, force=force)
        packed = kernel.pack(weight.to(dtype=dtype))
        return cls(weight, bias, kernel, packed, dtype)

    def forward(self, x: Tensor) -> Tensor:  # x [..., K] -> [..., N]
        if x.dim() == 2 and x.dtype == self.dtype:  # the engine's flat token batch: no reshapes
            return self.kernel.apply(x.contiguous(), self.packed, self.bias)
        lead = x.shape[:-1]
        y = self.kernel.apply(x.reshape(-1, self.in_features).to(self.dtype).contiguous(), self.packed, self.bias)
        return y.reshape(*lead, self.out_features)

    def bound(self) -> Callable[[Tensor], Tensor]:
        """``forward`` for flat [M, K] batches in this layer's dtype, its lookups done once (the engine's
        hot path; it reads the bias as it is now, so bind again after moving the module)."""
        return self.kernel.bound(self.packed, self.bias)

    def native(self) -> Any | None:
        """This layer as a linear of the compiled decoder (``kernels/cpu/decoder.cpp``), or None where its
        kernel has no such form (see :meth:`kernels.registry.Kernel.compiled`)."""
        return self.kernel.compiled(self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density:.3f}, kernel={self.kernel.name}")


def sparsify_linears(model: nn.Module, sparse_weights: dict[str, BitmaskTensor],
                     dtype: torch.dtype = torch.bfloat16, force: str | None = None) -> list[str]:
    """Replace every linear whose ``<name>.weight`` is in ``sparse_weights`` by a ``SparseLinear``."""
    replaced = []
    for weight_name, weight in sparse_weights.items():
        module_name = weight_name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != weight.shape:
            raise ValueError(f"{module_name} is {old!r}; it cannot take a sparse weight of shape {weight.shape}")
        bias = old.bias if old.bias is not None and old.bias.device.type != "meta" else None
        setattr(parent, child, SparseLinear.from_bitmask(weight, bias, dtype=dtype, force=force))
        replaced.append(module_name)
    return replaced


class PrepackedLinear(nn.Module):
    """A dense linear whose weight is prepacked once for oneDNN, and (``decode_rows``) kept row-major for
    the AVX-512 decode GEMV, which decode steps of a few rows use; a few dozen rows take the blocked GEMM on
    the prepacked weight itself (see :func:`kernels.cpu.dense_linear`).

    ``F.linear`` re-lays-out the weight and adds ~40 us per call; SmolLM2 runs 210 linears per token.
    """

    def __init__(self, linear: nn.Linear, decode_rows: bool = True):
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.packed = prepack_dense(linear.weight.detach(), decode_rows)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.screen: ArgmaxScreen | None = None  # see enable_argmax_screen
        self._screen_exact: list[Tensor] = []  # the exact pass's weight (gemv_weight), kept with the screen
        self._screen_rows = 0  # the most activation rows argmax takes (one pass of the decode GEMV)

    def forward(self, x: Tensor) -> Tensor:  # x [..., K] -> [..., N]
        if x.dim() == 2:
            return dense_linear(x.contiguous(), self.packed, self.bias)
        lead = x.shape[:-1]
        y = dense_linear(x.reshape(-1, self.in_features).contiguous(), self.packed, self.bias)
        return y.reshape(*lead, self.out_features)

    def bound(self) -> Callable[[Tensor], Tensor]:
        """``forward`` for flat [M, K] batches, its lookups done once (see :meth:`SparseLinear.bound`)."""
        return bind_dense(self.packed, self.bias)

    def native(self) -> Any | None:
        """This layer as a linear of the compiled decoder, or None (see :meth:`SparseLinear.native`)."""
        return native_dense(self.packed, self.bias)

    def enable_argmax_screen(self) -> str | None:
        """Keep an int8 screen of the weight (:mod:`kernels.argmax_screen`, half the bytes of a bf16 copy) so
        :meth:`argmax` can serve greedy steps of an LM head; None when kept, else why it cannot."""
        exact = self.gemv_weight()
        if exact is None:
            return "no decode GEMV weight (a bf16 weight on an AVX-512 CPU, kept with decode_rows)"
        if self.bias is not None:
            return "the layer has a bias"
        coded = self.packed.coded
        screen = build_argmax_screen(decode_exponents(coded) if coded is not None else exact[0])
        if isinstance(screen, str):
            return screen
        self.screen, self._screen_exact = screen, exact
        self._screen_rows = min(SCREEN_MAX_ROWS, TUNING.dense_decode_rows(self.out_features, self.in_features))
        return None

    def argmax(self, x: Tensor) -> Tensor | None:
        """``forward(x).float().argmax(-1)`` for x [M, K]: [M] long, the first of equal largest logits, bit for
        bit the forward's, through the screen; None where the screen does not serve these rows (none kept,
        more rows than one pass of the decode GEMV, a non-finite activation): call ``forward`` then."""
        if self.screen is None or x.dim() != 2 or x.dtype != torch.bfloat16 \
                or not 1 <= x.shape[0] <= self._screen_rows:
            return None
        return screened_argmax(x.contiguous(), self.screen, self._screen_exact, extension())

    def gemv_weight(self) -> list[Tensor] | None:
        """The decode GEMV's weight as the screen's exact pass takes it: [low, codes, table] or [rows]."""
        coded, rows = self.packed.coded, self.packed.rows
        if coded is not None:
            return [coded.low, coded.codes, coded.table]
        return None if rows is None else [rows]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, prepacked={self.packed.prepacked}, "
                f"gemv={'coded' if self.packed.coded is not None else self.packed.rows is not None}")


def prepack_linears(model: nn.Module, decode_rows: bool = True) -> list[str]:
    """Replace every plain CPU ``nn.Linear`` of ``model`` by a :class:`PrepackedLinear`; their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PrepackedLinear(module, decode_rows))
            replaced.append(name)
    return replaced


def decode_weights(model: nn.Module) -> list[Tensor]:
    """The CPU tensors a decode step streams: each sparse linear's packed tensors and each prepacked
    linear's row-major or exponent-coded weight (the GEMV's; oneDNN's prepacked copy is opaque) and its argmax
    screen where it keeps one, with every
    parameter that views the same memory (an embedding tied to the LM head), for :func:`kernels.hugepages.place_in_huge_pages`."""
    streamed: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, SparseLinear):
            streamed += [t for t in packed_tensors(module.packed)
                         if t.device.type == "cpu" and t.layout == torch.strided]
        elif isinstance(module, PrepackedLinear):
            gemv = module.gemv_weight() or []
            streamed += [t for t in gemv if t.dim() == 2]  # not the coded table
            if module.screen is not None:
                streamed += [module.screen.q, module.screen.qsum, module.screen.stats]
    spans = {_span(t) for t in streamed}
    return streamed + [p for p in model.parameters() if p.device.type == "cpu" and _span(p) in spans]


def packed_tensors(packed: Any) -> list[Tensor]:
    """The tensors a kernel's packed weight holds (its attributes), in their declared order."""
    return [t for t in vars(packed).values() if isinstance(t, Tensor)] if hasattr(packed, "__dict__") else []


def _span(t: Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.numel() * t.element_size()
