"""Tensor-parallel shards of a linear's weight, dense or in the sparse-bitmask layout (pure torch).

Contract: vLLM splits a column-parallel linear (q/k/v, gate/up) by output rows and a row-parallel
one (o_proj, down_proj) by input columns. :func:`shard_for_rank` says which rows or columns rank
``r`` of ``tp`` owns, exactly as vLLM's own weight loaders do (KV heads replicated when there are
fewer than ranks), and :func:`take` cuts that range out of a dense weight ``[N, K]`` or out of a
:class:`~kernels.bitmask.BitmaskTensor` without ever making it dense: rows are a slice of the
bitmask and of the values; columns re-pack the bitmask and keep the values whose column is in
range. ``decompress(take(w, s)) == take(decompress(w), s)`` for every shard (tested). So every
tensor-parallel shard of the compressed layout is expressible; nothing falls back to dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
from torch import Tensor

from kernels.bitmask import BitmaskTensor, compress, pack_bitmask, row_offsets_of

Weight = TypeVar("Weight", Tensor, BitmaskTensor)

#: vLLM's shard ids of the fused q/k/v projection
QKV_SHARDS = ("q", "k", "v")


@dataclass(frozen=True)
class Shard:
    """The part of a weight ``[N, K]`` one rank owns: ``size`` rows (dim 0) or columns (dim 1) from ``start``."""

    dim: int
    start: int
    size: int


# -- slicing the layouts ----------------------------------------------------------------------------
def slice_rows(weight: BitmaskTensor, start: int, size: int) -> BitmaskTensor:
    """Rows ``[start, start + size)`` of a bitmask weight ``[N, K]`` -> ``[size, K]``."""
    _check_range(start, size, weight.rows, "rows")
    offsets = weight.row_offsets.to(torch.int64)  # [N]
    begin = int(offsets[start])
    end = int(offsets[start + size]) if start + size < weight.rows else weight.nnz
    return BitmaskTensor((size, weight.cols), weight.values[begin:end],
                         weight.bitmask[start:start + size], offsets[start:start + size] - begin)


def slice_cols(weight: BitmaskTensor, start: int, size: int) -> BitmaskTensor:
    """Columns ``[start, start + size)`` of a bitmask weight ``[N, K]`` -> ``[N, size]`` (re-packed)."""
    _check_range(start, size, weight.cols, "columns")
    mask = weight.mask()  # [N, K] bool, True at stored values (row-major, like the values)
    cols = mask.nonzero()[:, 1]  # [nnz]: column of every stored value
    keep = (cols >= start) & (cols < start + size)  # [nnz]
    part = mask[:, start:start + size]  # [N, size]
    return BitmaskTensor((weight.rows, size), weight.values[keep.to(weight.values.device)],
                         pack_bitmask(part), row_offsets_of(part))


def concat_rows(parts: Sequence[BitmaskTensor]) -> BitmaskTensor:
    """Stack bitmask weights ``[N_i, K]`` along rows -> ``[sum N_i, K]`` (the fused q/k/v or gate/up)."""
    if not parts:
        raise ValueError("concat_rows needs at least one weight")
    cols = {p.cols for p in parts}
    if len(cols) != 1:
        raise ValueError(f"cannot stack weights with different column counts {sorted(cols)}")
    starts = torch.tensor([0] + [p.nnz for p in parts[:-1]], dtype=torch.int64).cumsum(0)  # [parts]
    offsets = torch.cat([p.row_offsets.to(torch.int64) + int(s) for p, s in zip(parts, starts)])
    return BitmaskTensor((sum(p.rows for p in parts), cols.pop()), torch.cat([p.values for p in parts]),
                         torch.cat([p.bitmask for p in parts]), offsets)


def take(weight: Weight, shard: Shard | None) -> Weight:
    """The part of ``weight`` (dense ``[N, K]`` or bitmask) that ``shard`` names; all of it for None."""
    if shard is None:
        return weight
    if isinstance(weight, BitmaskTensor):
        cut = slice_rows if shard.dim == 0 else slice_cols
        return cut(weight, shard.start, shard.size)
    return weight.narrow(shard.dim, shard.start, shard.size)


def fuse(parts: Sequence[Tensor | BitmaskTensor], dtype: torch.dtype) -> Tensor | BitmaskTensor:
    """Stack per-shard weights along rows in ``dtype``: dense if every part is dense, else all bitmask
    (dense parts of a partly sparse fused linear are compressed, which keeps their zeros exact)."""
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat([p.to(dtype) for p in parts])  # [sum N_i, K]
    as_bitmask = [p if isinstance(p, BitmaskTensor) else compress(p) for p in parts]
    return concat_rows([p.to(dtype=dtype) for p in as_bitmask])


# -- which part each rank owns ------------------------------------------------------------------------
def column_shard(rows: int, tp_rank: int, tp_size: int) -> Shard:
    """Rows of a column-parallel weight (or of one logical part of gate/up) on ``tp_rank``."""
    size = _divide(rows, tp_size, "output rows")
    return Shard(0, tp_rank * size, size)


def row_shard(cols: int, tp_rank: int, tp_size: int) -> Shard:
    """Columns of a row-parallel weight (o_proj, down_proj) on ``tp_rank``."""
    size = _divide(cols, tp_size, "input columns")
    return Shard(1, tp_rank * size, size)


def qkv_shard(part: str, num_heads: int, num_kv_heads: int, head_dim: int, tp_rank: int, tp_size: int) -> Shard:
    """Rows of ``q_proj`` / ``k_proj`` / ``v_proj`` on ``tp_rank``, as vLLM's QKVParallelLinear loads them:
    query heads split evenly; KV heads split evenly, or each replicated over ``tp / kv_heads`` ranks."""
    if part == "q":
        heads = _divide(num_heads, tp_size, "query heads")
        return Shard(0, tp_rank * heads * head_dim, heads * head_dim)
    if part not in QKV_SHARDS:
        raise ValueError(f"unknown q/k/v shard {part!r}; expected one of {QKV_SHARDS}")
    if tp_size >= num_kv_heads:
        replicas = _divide(tp_size, num_kv_heads, "ranks per KV head")
        return Shard(0, (tp_rank // replicas) * head_dim, head_dim)
    heads = _divide(num_kv_heads, tp_size, "KV heads")
    return Shard(0, tp_rank * heads * head_dim, heads * head_dim)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{total} {what} cannot be split evenly over {parts} tensor-parallel ranks")
    return total // parts


def _check_range(start: int, size: int, total: int, what: str) -> None:
    if start < 0 or size < 1 or start + size > total:
        raise ValueError(f"{what} [{start}, {start + size}) are empty or outside a weight with {total} {what}")
