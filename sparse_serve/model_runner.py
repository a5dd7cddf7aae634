"""Turns a scheduled step into one forward pass: flat token batch, cache slots, attention metadata.

Contract: :class:`ModelRunner` owns the KV cache (one k/v tensor pair per layer, sized from the
model's per-layer KV heads) and ``execute(chunks) -> logits [S, V]`` (float32), one row per chunk that
completes its sequence's known tokens, in chunk order. It knows nothing of sampling or requests.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import Tensor, nn

from sparse_serve.attention import AttentionMetadata, PrefillChunk
from sparse_serve.config import CacheConfig
from sparse_serve.models import build_paged_model
from sparse_serve.scheduler import Chunk


def kv_bytes_per_block(shapes: Seq[tuple[int, int]], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * heads * dim * itemsize for heads, dim in shapes)


def num_kv_blocks(config: CacheConfig, shapes: Seq[tuple[int, int]], dtype: torch.dtype) -> int:
    """Blocks that fit ``kv_cache_gb`` (or the explicit ``num_blocks``)."""
    if config.num_blocks is not None:
        return config.num_blocks
    return max(1, int(config.kv_cache_gb * 2**30) // kv_bytes_per_block(shapes, config.block_size, dtype))


def padded_tables(tables: Seq[list[int]]) -> Tensor:
    """Block tables as one [B, max blocks] long tensor, each padded with block 0 ([0, 0] when B is 0)."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)


class ModelRunner:
    """The model, its paged KV cache and the per-step input preparation."""

    def __init__(self, model: nn.Module, config: CacheConfig, dtype: torch.dtype):
        self.net = build_paged_model(model)
        self.block_size, self.dtype = config.block_size, dtype
        shapes = self.net.kv_shapes()
        self.num_blocks = num_kv_blocks(config, shapes, dtype)
        self.caches = [(torch.zeros(self.num_blocks, self.block_size, h, d, dtype=dtype),
                        torch.zeros(self.num_blocks, self.block_size, h, d, dtype=dtype)) for h, d in shapes]

    @torch.inference_mode()
    def execute(self, chunks: Seq[Chunk], argmax: bool = False) -> Tensor:
        """Run one step; logits [S, V] of the chunks that complete their sequence, or with ``argmax`` (every
        such row greedy) possibly their token ids [S] (long) instead, where the model picks them itself."""
        if all(c.num_tokens == 1 and c.completes for c in chunks):
            return self._decode(chunks, argmax)
        ids, positions, slots = [], [], []
        for c in chunks:
            ids.extend(c.seq.token_ids(c.start, c.start + c.num_tokens))
            pos = torch.arange(c.start, c.start + c.num_tokens)
            table = torch.tensor(c.seq.block_table, dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        meta = self._metadata(chunks, torch.cat(slots))
        ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
        logits_rows = ends[torch.tensor([c.completes for c in chunks], dtype=torch.bool)]
        return self.net.forward(torch.tensor(ids, dtype=torch.long), torch.cat(positions), meta, self.caches,
                                logits_rows, argmax)

    def _decode(self, chunks: Seq[Chunk], argmax: bool) -> Tensor:
        """A step of single-token decodes: what ``execute`` builds for it, from plain lists in one pass (the
        general path's per-chunk tensors cost more than a small model's whole glue)."""
        bs = self.block_size
        ids, positions, slots, tables = [], [], [], []
        for c in chunks:
            pos, table = c.start, c.seq.block_table
            ids.append(c.seq.token_at(pos))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table[: pos // bs + 1])
        rows = torch.arange(len(chunks))
        lens = torch.tensor(positions) + 1
        meta = AttentionMetadata(slots=torch.tensor(slots), decode_rows=rows, decode_lens=lens, prefills=[],
                                 decode_tables=padded_tables(tables))
        return self.net.forward(torch.tensor(ids), lens - 1, meta, self.caches, rows, argmax)

    def _metadata(self, chunks: Seq[Chunk], slots: Tensor) -> AttentionMetadata:
        decode_rows, decode_ctx, decode_tables, prefills = [], [], [], []
        row = 0
        for c in chunks:
            ctx = c.start + c.num_tokens
            if c.num_tokens == 1:
                decode_rows.append(row)
                decode_ctx.append(ctx)
                decode_tables.append(c.seq.block_table[:-(-ctx // self.block_size)])
            else:
                table = torch.tensor(c.seq.block_table[:-(-ctx // self.block_size)], dtype=torch.long)
                prefills.append(PrefillChunk(row, c.num_tokens, ctx, table))
            row += c.num_tokens
        return AttentionMetadata(slots=slots, decode_rows=torch.tensor(decode_rows, dtype=torch.long),
                                 decode_tables=padded_tables(decode_tables),
                                 decode_lens=torch.tensor(decode_ctx, dtype=torch.long), prefills=prefills)
