"""Kernel registry: each operation has a pure-torch reference and faster implementations that declare
where they run.

Contract: an implementation registers under an operation name (``"bitmask_linear"``) with the device
types and dtypes it supports, a priority and an ``available()`` check (the CPU extension compiled and
the CPU has AVX-512 BF16; Triton importable and a GPU present). :func:`select` returns the
highest-priority implementation that supports the device and dtype and is available; the reference
(priority 0) supports everything, so selection never fails. A name can be forced - ``force=`` or the
environment variable ``SPARSE_SERVE_KERNEL`` - which is how tests pin each implementation and how
users turn a fast path off; forcing one that cannot run here is an error that says why.

An implementation of ``bitmask_linear`` has two halves, so repacking happens once, after load:
``pack(weight: BitmaskTensor) -> packed`` (any object; done on the weight's device) and
``apply(x: [M, K], packed, bias: [N] | None) -> y: [M, N]`` in ``x``'s dtype. It may add a third,
``bind(packed, bias) -> forward``: ``forward(x)`` computes what ``apply(x, packed, bias)`` does with
the per-call lookups done once (a serving engine calls ~120 linears a decode step, each a few
microseconds of work); :meth:`Kernel.bound` falls back to ``apply`` without one. And it may add
``native(packed, bias) -> linear | None``: the same forward as an object of the compiled decoder
(``kernels/cpu/decoder.cpp``), which runs a whole decode step's layers without returning to Python;
None where this weight has no such form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from kernels.bitmask import BitmaskTensor

ENV_FORCE = "SPARSE_SERVE_KERNEL"

Pack = Callable[[BitmaskTensor], Any]
Apply = Callable[[Tensor, Any, "Tensor | None"], Tensor]
Forward = Callable[[Tensor], Tensor]
Bind = Callable[[Any, "Tensor | None"], Forward]
Native = Callable[[Any, "Tensor | None"], Any]


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One implementation of one operation."""

    op: str
    name: str
    devices: frozenset[str]  # device types: "cpu", "cuda"
    dtypes: frozenset[torch.dtype]
    priority: int  # higher wins
    pack: Pack
    apply: Apply
    available: Callable[[], bool] = field(default=_always)
    why_unavailable: Callable[[], str] = field(default=lambda: "")
    bind: Bind | None = None
    native: Native | None = None

    def supports(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        return torch.device(device).type in self.devices and dtype in self.dtypes

    def bound(self, packed: Any, bias: Tensor | None) -> Forward:
        """``x [M, K] -> apply(x, packed, bias)``, through ``bind`` where the implementation has one."""
        if self.bind is not None:
            return self.bind(packed, bias)
        apply = self.apply
        return lambda x: apply(x, packed, bias)

    def compiled(self, packed: Any, bias: Tensor | None) -> Any | None:
        """The compiled decoder's form of this layer's forward (``native``), or None without one."""
        return None if self.native is None else self.native(packed, bias)


KERNELS: dict[str, dict[str, Kernel]] = {}


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` (replacing one of the same op and name)."""
    KERNELS.setdefault(kernel.op, {})[kernel.name] = kernel
    return kernel


def kernels_for(op: str) -> list[Kernel]:
    """Every registered implementation of ``op``, best first."""
    _load_builtin()
    if op not in KERNELS:
        raise KeyError(f"no kernels for operation {op!r}; known: {sorted(KERNELS)}")
    return sorted(KERNELS[op].values(), key=lambda k: -k.priority)


def select(op: str, device: torch.device | str, dtype: torch.dtype, force: str | None = None) -> Kernel:
    """The implementation to use for ``op`` on ``device`` / ``dtype`` (see the module docstring)."""
    candidates = kernels_for(op)
    forced = force or os.environ.get(ENV_FORCE) or None
    if forced is not None:
        by_name = {k.name: k for k in candidates}
        if forced not in by_name:
            raise ValueError(f"kernel {forced!r} is not an implementation of {op}; choose one of {sorted(by_name)}")
        kernel = by_name[forced]
        if not kernel.supports(device, dtype):
            raise ValueError(f"kernel {forced!r} runs on {sorted(kernel.devices)} with "
                             f"{sorted(str(d) for d in kernel.dtypes)}, not {torch.device(device).type} {dtype}")
        if not kernel.available():
            raise ValueError(f"kernel {forced!r} is not available here: {kernel.why_unavailable()}")
        return kernel
    for kernel in candidates:
        if kernel.supports(device, dtype) and kernel.available():
            return kernel
    raise RuntimeError(f"no implementation of {op} supports {device} {dtype}")  # the reference always does


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Import the modules that register the built-in implementations (once)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import kernels.reference  # noqa: F401
    for module in ("kernels.cpu", "kernels.triton_bitmask"):
        try:
            __import__(module)
        except ImportError:
            pass  # optional implementation not shipped in this build
