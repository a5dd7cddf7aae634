"""Pure-torch references: what every fast kernel must compute.

``bitmask_linear``: ``y = x W^T + b`` for ``W`` in the sparse-bitmask layout, accumulated in float32 and
returned in ``x``'s dtype. The reference decompresses ``W`` on every call (it is the definition, not
a fast path) and runs on any device and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.bitmask import BitmaskTensor
from kernels.registry import Kernel, register


def bitmask_linear_reference(x: Tensor, weight: BitmaskTensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K], weight [N, K] (bitmask), bias [N] -> y [M, N] in x's dtype (float32 accumulation)."""
    dense = weight.decompress().to(device=x.device, dtype=torch.float32)  # [N, K]
    y = x.float() @ dense.T  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


register(Kernel(
    op="bitmask_linear", name="reference", priority=0,
    devices=frozenset({"cpu", "cuda", "mps", "meta"}),
    dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
    pack=lambda weight: weight,
    apply=bitmask_linear_reference,
))
