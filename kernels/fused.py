"""Fused elementwise ops of a LLaMA decoder layer: RMSNorm (with the residual add), rotary embedding
and SiLU-gate, as one call each.

Contract: :class:`LayerOps` is four pure functions with the arithmetic - and the rounding - of the
transformers modules they replace (``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``act_fn(gate) * up``):

* ``rms_norm(x [T, D], weight [D], eps) -> [T, D]``
* ``add_rms_norm_(h [T, D], delta [T, D], weight [D], eps) -> [T, D]``: ``h += delta`` in place, then
  the norm of the new ``h`` (the residual stream and the next sublayer's input in one pass)
* ``rotary_(q [T, Hq, d], k [T, Hk, d], cos [T, d], sin [T, d])``: in place, rotate-half convention
* ``rotary_cache_(q, k, v [T, Hk, d], cos, sin, k_cache, v_cache [NB, bs, Hk, d], slots [T])``:
  ``rotary_``, then this step's keys and values stored at their flat cache slots (block * bs + offset)
* ``silu_mul(gate_up [T, 2I]) -> [T, I]``: ``silu(gate_up[:, :I]) * gate_up[:, I:]``
* ``paged_decode(q [B, Hq, d], k_cache, v_cache [NB, bs, Hk, d], tables [B, nb], lens [B], scale)
  -> [B, Hq, d]``: one query per sequence over its first ``lens[b]`` cached positions (GQA), what
  ``scaled_dot_product_attention`` computes on the gathered blocks
* ``paged_prefill(q [n, Hq, d], k_cache, v_cache, table [nb], past, scale) -> [n, Hq, d]``: causal
  attention of a prefill chunk, rows at positions ``past .. past + n - 1`` of one sequence whose keys and
  values (this chunk's included) are already in the cache at ``table``

:data:`TORCH_OPS` is the reference, written with torch ops exactly as transformers computes. The
``cpu_fused`` implementation (``cpu/fused_ops.cpp``, compiled on first use and cached next to the
bitmask kernel) does each in one pass over the rows, which at batch 1 removes most of a decode
step's per-op dispatch cost. :func:`layer_ops` picks the best one for a device and dtype;
``SPARSE_SERVE_FUSED_OPS=torch`` forces the reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ENV_FORCE = "SPARSE_SERVE_FUSED_OPS"
SOURCE = Path(__file__).parent / "cpu" / "fused_ops.cpp"


@dataclass(frozen=True)
class LayerOps:
    """One implementation of the fused layer ops (see the module docstring)."""

    name: str
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm_: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    rotary_: Callable[[Tensor, Tensor, Tensor, Tensor], None]
    rotary_cache_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], None]
    silu_mul: Callable[[Tensor], Tensor]
    paged_decode: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]
    paged_prefill: Callable[[Tensor, Tensor, Tensor, Tensor, int, float], Tensor]


# -- reference: transformers' arithmetic, op by op -----------------------------------------------------
def torch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def torch_add_rms_norm_(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    h.add_(delta)
    return torch_rms_norm(h, weight, eps)


def torch_rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, d]
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * c + rotated * s)


def torch_write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Store keys/values at flat slots. k, v: [T, Hk, d]; caches [NB, bs, Hk, d]; slots [T] long."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def torch_rotary_cache_(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                        v_cache: Tensor, slots: Tensor) -> None:
    torch_rotary_(q, k, cos, sin)
    torch_write_kv(k_cache, v_cache, k, v, slots)


def torch_silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gather_blocks(cache: Tensor, tables: Tensor) -> Tensor:
    """cache [NB, bs, H, d], tables [B, nb] -> [B, H, nb * bs, d]."""
    b, nb = tables.shape
    _, bs, h, d = cache.shape
    blocks = cache.index_select(0, tables.reshape(-1))  # [B * nb, bs, H, d]; cheaper than cache[tables]
    return blocks.view(b, nb * bs, h, d).transpose(1, 2)


def torch_paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, lens: Tensor,
                       scale: float) -> Tensor:
    keys, values = gather_blocks(k_cache, tables), gather_blocks(v_cache, tables)  # [B, Hk, L, d]
    mask = torch.arange(keys.shape[2])[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, Hq, d]


def torch_paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, past: int,
                        scale: float) -> Tensor:
    n = q.shape[0]
    ctx = past + n
    keys = gather_blocks(k_cache, table[None])[0, :, :ctx]  # [Hk, ctx, d]
    values = gather_blocks(v_cache, table[None])[0, :, :ctx]
    # row i (position past + i) sees positions <= past + i; with nothing cached before, plain causal
    mask = None if past == 0 else torch.arange(ctx)[None, :] <= (past + torch.arange(n))[:, None]  # [n, ctx]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=past == 0,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [n, Hq, d]


TORCH_OPS = LayerOps("torch", torch_rms_norm, torch_add_rms_norm_, torch_rotary_, torch_rotary_cache_,
                     torch_silu_mul, torch_paged_decode, torch_paged_prefill)


# -- the compiled CPU implementation -------------------------------------------------------------------
@functools.cache
def extension() -> ModuleType | str:
    """The compiled extension, or why it cannot be had (built once, then cached on disk)."""
    from kernels.cpu import build_extension

    return build_extension("sparse_serve_fused_cpu", SOURCE, compile_flags())


def compile_flags() -> list[str]:
    """The compiler flags for this CPU: AVX-512 (with BF16 where it has it), else AVX2, else plain C++."""
    from kernels.cpu import cpu_flags

    flags = cpu_flags()
    wide = ["-mavx512f", "-mavx512bw", "-mavx512vl"] if {"avx512f", "avx512bw", "avx512vl"} <= flags else \
        ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []  # plain C++ loops, vectorized by the compiler
    if wide[:1] == ["-mavx512f"] and "avx512_bf16" in flags:
        wide.append("-mavx512bf16")  # bf16 attention scores by vdpbf16ps
    return ["-O3", "-fopenmp", *wide]


def ops_of(name: str, ext: ModuleType) -> LayerOps:
    """The layer ops of a compiled extension (this one, or an earlier build to compare with), named ``name``.
    A build from before ``paged_prefill`` attends prompts as the engine then did: by the reference."""
    return LayerOps(name, ext.rms_norm, ext.add_rms_norm_, ext.rotary_, ext.rotary_cache_, ext.silu_mul,
                    ext.paged_decode, getattr(ext, "paged_prefill", torch_paged_prefill))


@functools.cache
def cpu_fused_ops() -> LayerOps | None:
    ext = extension()
    if isinstance(ext, str):
        return None
    return ops_of("cpu_fused", ext)


def layer_ops(device: torch.device | str, dtype: torch.dtype) -> LayerOps:
    """The fastest implementation for ``device`` / ``dtype`` (the reference unless forced otherwise)."""
    forced = os.environ.get(ENV_FORCE)
    if forced not in (None, "", "torch", "cpu_fused"):
        raise ValueError(f"{ENV_FORCE}={forced!r}: choose 'torch' or 'cpu_fused'")
    if forced == "torch":
        return TORCH_OPS
    fused = cpu_fused_ops() if torch.device(device).type == "cpu" and dtype in (torch.float32,
                                                                                  torch.bfloat16) else None
    if forced == "cpu_fused" and fused is None:
        raise ValueError(f"{ENV_FORCE}=cpu_fused cannot run on {device} {dtype}: "
                         f"{extension() if isinstance(extension(), str) else 'CPU float32/bfloat16 only'}")
    return fused or TORCH_OPS
