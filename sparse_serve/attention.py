"""Paged attention on CPU tensors over block tables (a layer's ``rotary_cache_`` op, :mod:`kernels.fused`,
has already stored this step's keys and values in their cache slots).

Contract: the cache of one layer is ``k, v: [num_blocks, block_size, kv_heads, head_dim]``. A step's
tokens are flattened to ``T`` rows; :class:`AttentionMetadata` says which rows are single-token
decodes (attended in one batched call over padded block tables, by the ``paged_decode`` op of
:mod:`kernels.fused`, which reads the cache in place) and which are prefill chunks (attended one
sequence at a time with a causal mask offset by the tokens already cached). Query heads share KV heads
in groups (GQA). Pure functions; the runner builds the metadata once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.fused import gather_blocks, torch_paged_decode

PagedDecode = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]  # kernels.fused.LayerOps


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


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    meta: AttentionMetadata, scale: float, decode: PagedDecode = torch_paged_decode) -> Tensor:
    """q [T, Hq, d], this step's k, v [T, Hkv, d] (already written to the cache) -> out [T, Hq, d]."""
    if not meta.prefills:  # a pure decode step: every row is a decode row, in order
        return decode(q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        out[meta.decode_rows] = decode(q[meta.decode_rows], k_cache, v_cache, meta.decode_tables,
                                       meta.decode_lens, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[rows] = _prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out


def _prefill(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, chunk: PrefillChunk,
             scale: float) -> Tensor:
    # q: [n, Hq, d]; the chunk's own k, v: [n, Hkv, d]
    past = chunk.ctx_len - chunk.q_len
    if past == 0:  # the whole context is in this step: no cache read, plain causal attention
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
    else:
        table = chunk.block_table.unsqueeze(0)
        keys = gather_blocks(k_cache, table)[0, :, :chunk.ctx_len]  # [Hkv, ctx, d]
        values = gather_blocks(v_cache, table)[0, :, :chunk.ctx_len]
        pos = torch.arange(chunk.ctx_len)
        mask, causal = pos[None, :] <= (past + torch.arange(chunk.q_len))[:, None], False  # [n, ctx]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [n, Hq, d]
