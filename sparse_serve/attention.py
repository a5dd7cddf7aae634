"""Paged attention on CPU tensors over block tables (a layer's ``rotary_cache_`` op, :mod:`kernels.fused`,
has already stored this step's keys and values in their cache slots).

Contract: the cache of one layer is ``k, v: [num_blocks, block_size, kv_heads, head_dim]``. A step's
tokens are flattened to ``T`` rows; :class:`AttentionMetadata` says which rows are single-token
decodes (attended in one batched call over padded block tables by the ``paged_decode`` op of
:mod:`kernels.fused`) and which are prefill chunks (attended one chunk at a time by its ``paged_prefill``
op: each row over the cache up to its own position, so a chunk sees the tokens cached before it). Both
read the cache in place. Query heads share KV heads in groups (GQA). Pure functions; the runner builds
the metadata once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.fused import TORCH_OPS, LayerOps


@dataclass
class PrefillChunk:
    """Rows [q_start, q_start + q_len) are positions [ctx_len - q_len, ctx_len) of one sequence."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: Tensor  # [blocks] long


@dataclass
class AttentionMetadata:
    """Where each row's keys live and what it may attend to."""

    slots: Tensor  # [T] long: block * block_size + offset of each row's new key/value
    decode_rows: Tensor  # [B] long: rows that are single-token decodes
    decode_tables: Tensor  # [B, max_blocks] long, padded with block 0
    decode_lens: Tensor  # [B] long: context length of each decode row (its new key included)
    prefills: list[PrefillChunk]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
                    ops: LayerOps = TORCH_OPS) -> Tensor:
    """q [T, Hq, d] over the cache, where this step's keys and values already are -> out [T, Hq, d]."""
    if not meta.prefills:  # a pure decode step: every row is a decode row, in order
        return ops.paged_decode(q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        out[meta.decode_rows] = ops.paged_decode(q[meta.decode_rows], k_cache, v_cache, meta.decode_tables,
                                                 meta.decode_lens, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[rows] = ops.paged_prefill(q[rows], k_cache, v_cache, chunk.block_table, chunk.ctx_len - chunk.q_len,
                                      scale)
    return out
