"""Triton GPU kernels for ``bitmask_linear``: ``y = x W^T + b`` with ``W`` in the sparse-bitmask layout.

Contract: ``pack_triton(weight)`` repacks a :class:`~kernels.bitmask.BitmaskTensor` once (on the
weight's device) and ``bitmask_linear_triton(x, packed, bias)`` computes what
:func:`kernels.reference.bitmask_linear_reference` computes - products and sums in float32, the
result returned in ``x``'s dtype - without ever materialising the dense ``W`` in memory: every
kernel decompresses its tile of ``W`` in registers as part of the load. Registered as
``bitmask_linear`` / ``"triton"`` for CUDA (bf16, fp16, fp32); the kernels also run on CPU tensors
under ``TRITON_INTERPRET=1`` (that is how the unit tests check them on machines without a GPU).
This module imports cleanly without Triton: it then registers an entry that is never available.

Packed layouts (``N`` = output features = rows of ``W``, ``K`` = input features,
``KW = ceil(K / 32)``; column ``k`` lives in word ``k // 32``, bit ``k % 32``, LITTLE bit order, the
same bits as the on-disk uint8 bitmask read four bytes at a time):

:class:`PackedBitmask` (any sparsity pattern)
    ``words``   int32 ``[N, KW]``  the bitmask, 32 columns per word, padding bits zero
    ``offsets`` int32 ``[N, KW]``  (int64 when nnz >= 2**31) index into ``values`` of the first
                nonzero of each 32-column chunk: exclusive cumsum of the per-word popcounts in
                row-major order, so a program starting at any multiple of 32 columns finds its
                values without a serial scan; within a tile the index of each nonzero is this base
                plus the exclusive prefix sum of the tile's bits (a popcount prefix)
    ``values``  ``[nnz + 1]`` the on-disk nonzeros, row-major, plus one zero so the buffer is never
                empty

:class:`Packed24` (chosen at pack time when every group of 4 consecutive columns, ``K`` zero-padded
to a multiple of 32, has at most 2 nonzeros)
    ``values``  ``[N, KW * 16]`` 2 values per group of 4 columns (a zero where a group has fewer
                than 2 nonzeros)
    ``meta``    int32 ``[N, KW]`` one nibble per group, 8 groups per word (group ``g`` in nibble
                ``g % 8`` of word ``g // 8``): bits 0-1 = column in the group of the first value,
                bits 2-3 = of the second, first < second (NVIDIA's 2-bit indices, but in plain
                group order, not the interleaved order ``mma.sp`` wants)

Kernels (one per packed form, each specialised at compile time by ``USE_DOT``):

- decode, ``M <= DECODE_MAX_M`` (16): one program per block of output features with all of ``x``'s
  rows in registers; it loops over ``K`` in ``BLOCK_K`` chunks, expands the tile of ``W`` from the
  packed form and accumulates ``x[:, None, :] * w[None, :, :]`` reduced over ``K`` in float32
  (no tensor cores: a skinny GEMV is bound by reading ``W``);
- prefill, larger ``M``: a 2-D grid of ``[BLOCK_M, BLOCK_N]`` output tiles; each program expands
  its ``[BLOCK_N, BLOCK_K]`` tiles of ``W`` in registers and feeds them to ``tl.dot`` (tensor
  cores, float32 accumulation, IEEE precision for float32 inputs);
- 2:4: the same two loops reading :class:`Packed24` (no offsets, no prefix scan). Triton has no
  public semi-structured sparse ``mma`` (``mma.sp``), so this is a plain Triton kernel: the 2:4
  form is expanded in registers and goes through the same FMA loop / dense ``tl.dot``; the gain
  over the general form is fewer bytes and no scan, not sparse tensor-core math.

Under the interpreter (CPU tensors) bf16 ``tl.dot`` operands are cast to float32 first, because the
interpreter multiplies the raw bits of bf16 (triton-lang/triton#11584); products of bf16 values are
exact in float32, so this changes nothing but the summation order.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.bitmask import (
    BitmaskTensor, as_int32_bits, bitmask_words, unpack_bitmask, word_popcounts, words_per_row,
)
from kernels.registry import Kernel, register

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the module stays importable: the registry entry says Triton is missing
    HAVE_TRITON = False

    class _Placeholder:
        """Stands in for ``triton`` and ``triton.language``: ``jit`` leaves the function alone."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Placeholder()  # type: ignore[assignment]

#: largest number of rows of ``x`` that takes the decode (GEMV) kernel
DECODE_MAX_M = 16
SUPPORTED_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32})


# ----------------------------------------------------------------------------------------- packing

@dataclass(frozen=True)
class PackedBitmask:
    """The bitmask weight repacked for the Triton kernels (layout in the module docstring)."""

    shape: tuple[int, int]  # (N, K)
    words: Tensor           # int32 [N, KW]
    offsets: Tensor         # int32 or int64 [N, KW]
    values: Tensor          # [nnz + 1]

    @property
    def device(self) -> torch.device:
        return self.values.device


@dataclass(frozen=True)
class Packed24:
    """A weight with at most 2 nonzeros per 4 columns in the compact 2:4 form (module docstring)."""

    shape: tuple[int, int]  # (N, K)
    values: Tensor          # [N, KW * 16]
    meta: Tensor            # int32 [N, KW]

    @property
    def device(self) -> torch.device:
        return self.values.device


def chunk_offsets(bitmask: Tensor, cols: int) -> Tensor:
    """Index of the first nonzero of every 32-column chunk: [R, KW], int32 unless nnz needs int64."""
    counts = word_popcounts(bitmask, cols).flatten()  # [R*KW] popcount per word
    offsets = (torch.cumsum(counts, 0) - counts).view(bitmask.shape[0], words_per_row(cols))  # [R, KW]
    total = int(counts.sum()) if counts.numel() else 0
    return offsets.to(torch.int32) if total < 2**31 else offsets


def pack_general(weight: BitmaskTensor) -> PackedBitmask:
    """The general form: int32 words, per-chunk offsets, values with one trailing zero."""
    values = torch.cat([weight.values, weight.values.new_zeros(1)])  # [nnz + 1]
    bitmask = weight.bitmask.to(values.device)
    return PackedBitmask(weight.shape, bitmask_words(bitmask, weight.cols),
                         chunk_offsets(bitmask, weight.cols), values)


def _mask_groups(weight: BitmaskTensor) -> Tensor:
    """bool [N, KW*8, 4]: the nonzero mask, K zero-padded to whole words, in groups of 4 columns."""
    mask = unpack_bitmask(weight.bitmask.to(weight.values.device), weight.cols)  # [N, K]
    mask = torch.nn.functional.pad(mask, (0, 32 * words_per_row(weight.cols) - weight.cols))  # [N, KW*32]
    return mask.view(weight.rows, -1, 4)


def is_24(weight: BitmaskTensor) -> bool:
    """True iff every group of 4 consecutive columns has at most 2 nonzeros."""
    return bool((_mask_groups(weight).sum(-1) <= 2).all())


def pack_24(weight: BitmaskTensor) -> Packed24:
    """The 2:4 form of a weight for which :func:`is_24` holds (``ValueError`` otherwise)."""
    if not is_24(weight):
        raise ValueError(f"weight {weight.shape} has a group of 4 columns with more than 2 nonzeros")
    return _pack_24_checked(weight)


def _pack_24_checked(weight: BitmaskTensor) -> Packed24:
    groups = _mask_groups(weight)  # [N, G, 4]
    rows, ngroups, _ = groups.shape
    position = torch.arange(4, device=groups.device)  # [4]
    key = groups.to(torch.int64) * 8 + (3 - position)  # nonzeros first, then leftmost
    idx = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [N, G, 2] distinct columns, ascending
    dense = torch.nn.functional.pad(weight.decompress(), (0, 4 * ngroups - weight.cols))  # [N, G*4]
    values = dense.view(rows, ngroups, 4).gather(-1, idx).reshape(rows, 2 * ngroups)  # [N, G*2]
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).view(rows, -1, 8)  # [N, KW, 8]
    shifts = 4 * torch.arange(8, device=groups.device)  # [8]
    return Packed24(weight.shape, values, as_int32_bits((nibbles << shifts).sum(-1)))


def pack_triton(weight: BitmaskTensor, allow_24: bool = True) -> PackedBitmask | Packed24:
    """Repack once after load: the 2:4 form when the pattern allows it, else the general form."""
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton bitmask_linear supports {sorted(map(str, SUPPORTED_DTYPES))}, not {weight.dtype}")
    if allow_24 and is_24(weight):
        return _pack_24_checked(weight)
    return pack_general(weight)


# ----------------------------------------------------------------------------------------- kernels

@triton.jit
def _bitmask_tile(words_ptr, offsets_ptr, values_ptr, rn, k0, N, KW,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0+BLOCK_K of rows rn [BLOCK_N] of W -> [BLOCK_N, BLOCK_K] (values' dtype)."""
    WPB: tl.constexpr = BLOCK_K // 32
    rw = k0 // 32 + tl.arange(0, WPB)  # [WPB] word index
    n_ok = rn < N  # [BN]
    w_ok = n_ok[:, None] & (rw < KW)[None, :]  # [BN, WPB]
    words = tl.load(words_ptr + rn[:, None] * KW + rw[None, :], mask=w_ok, other=0)  # [BN, WPB]
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # [BN, WPB, 32]
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))  # [BN, BK], column order
    base = tl.load(offsets_ptr + rn * KW + k0 // 32, mask=n_ok, other=0)  # [BN] first value of the tile
    idx = base[:, None] + tl.cumsum(bits, axis=1) - bits  # [BN, BK] exclusive popcount prefix
    return tl.load(values_ptr + idx, mask=bits != 0, other=0.0)  # [BN, BK]


@triton.jit
def _sparse24_tile(meta_ptr, values_ptr, rn, k0, N, KW,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0+BLOCK_K of rows rn [BLOCK_N] of a 2:4 W -> [BLOCK_N, BLOCK_K]."""
    WPB: tl.constexpr = BLOCK_K // 32
    GPB: tl.constexpr = BLOCK_K // 4
    rw = k0 // 32 + tl.arange(0, WPB)  # [WPB]
    n_ok = rn < N  # [BN]
    w_ok = n_ok[:, None] & (rw < KW)[None, :]  # [BN, WPB]
    meta = tl.load(meta_ptr + rn[:, None] * KW + rw[None, :], mask=w_ok, other=0)  # [BN, WPB]
    nib = (meta[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF  # [BN, WPB, 8]
    nib = tl.reshape(nib, (BLOCK_N, GPB))  # [BN, GPB], group order
    rv = k0 // 2 + tl.arange(0, 2 * GPB)  # [2*GPB] value index within the row
    v_ok = n_ok[:, None] & (rv < KW * 16)[None, :]
    vals = tl.load(values_ptr + rn[:, None] * (KW * 16) + rv[None, :], mask=v_ok, other=0.0)  # [BN, 2*GPB]
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, GPB, 2)))  # [BN, GPB] each
    col = tl.arange(0, 4)[None, None, :]  # [1, 1, 4] column within the group
    zero = tl.zeros((BLOCK_N, GPB, 4), dtype=vals.dtype)
    w = tl.where(col == (nib & 3)[:, :, None], v0[:, :, None], zero)  # [BN, GPB, 4]
    w = tl.where(col == (nib >> 2)[:, :, None], v1[:, :, None], w)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))  # [BN, BK]


@triton.jit
def _load_x(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """x[rm, k0:k0+BLOCK_K] -> [BLOCK_M, BLOCK_K], zero outside x."""
    rk = k0 + tl.arange(0, BLOCK_K)  # [BK]
    ok = (rm < M)[:, None] & (rk < K)[None, :]
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)


@triton.jit
def _mac(acc, x, w, USE_DOT: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BM, BN] += x [BM, BK] @ w [BN, BK]^T in float32."""
    if USE_DOT:
        if CAST_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    else:
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
        acc += tl.sum(prod, axis=2)
    return acc


@triton.jit
def _store_y(acc, y_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc (+ bias[rn]) in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bitmask_linear_kernel(x_ptr, words_ptr, offsets_ptr, values_ptr, bias_ptr, y_ptr,
                           M, N, K, KW, stride_xm, stride_xk, stride_ym, stride_yn,
                           HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, CAST_F32: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """y[BM, BN] tile of x [M, K] @ W^T, W [N, K] in :class:`PackedBitmask` form; grid (M/BM, N/BN)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _bitmask_tile(words_ptr, offsets_ptr, values_ptr, rn, k0, N, KW, BLOCK_N, BLOCK_K)  # [BN, BK]
        x = _load_x(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BLOCK_K)  # [BM, BK]
        acc = _mac(acc, x, w, USE_DOT, CAST_F32, PRECISION)
    _store_y(acc, y_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _sparse24_linear_kernel(x_ptr, meta_ptr, values_ptr, bias_ptr, y_ptr,
                            M, N, K, KW, stride_xm, stride_xk, stride_ym, stride_yn,
                            HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, CAST_F32: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """y[BM, BN] tile of x [M, K] @ W^T, W [N, K] in :class:`Packed24` form; grid (M/BM, N/BN)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _sparse24_tile(meta_ptr, values_ptr, rn, k0, N, KW, BLOCK_N, BLOCK_K)  # [BN, BK]
        x = _load_x(x_ptr, rm, k0, M, K, stride_xm, stride_xk, BLOCK_K)  # [BM, BK]
        acc = _mac(acc, x, w, USE_DOT, CAST_F32, PRECISION)
    _store_y(acc, y_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS)


# ---------------------------------------------------------------------------------------- launcher

@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch: powers of two, ``k`` a multiple of 32, ``n``/``k`` >= 16 for tl.dot."""

    m: int
    n: int
    k: int
    num_warps: int = 4


def choose_path(m: int, packed: PackedBitmask | Packed24) -> str:
    """``"decode"`` / ``"prefill"``, prefixed with ``"2:4-"`` for the 2:4 form."""
    kind = "decode" if m <= DECODE_MAX_M else "prefill"
    return f"2:4-{kind}" if isinstance(packed, Packed24) else kind


def choose_blocks(m: int, decode: bool, device: torch.device) -> Blocks:
    """Default tiles: untuned GPU guesses; on CPU (the interpreter) few large programs."""
    bm = triton.next_power_of_2(max(m, 1))
    if device.type == "cpu":  # TRITON_INTERPRET: each program instance costs milliseconds
        return Blocks(m=min(bm, 128), n=64, k=128)
    if decode:  # the [BM, BN, BK] product lives in registers
        return Blocks(m=bm, n=32 if bm <= 4 else 16, k=128 if bm <= 4 else 64)
    return Blocks(m=min(max(bm, 16), 64), n=64, k=64)


def _check_blocks(blocks: Blocks, use_dot: bool) -> None:
    sizes = (blocks.m, blocks.n, blocks.k)
    if any(s <= 0 or s & (s - 1) for s in sizes) or blocks.k % 32:
        raise ValueError(f"block sizes must be powers of two with k a multiple of 32, got {blocks}")
    if use_dot and min(sizes) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {blocks}")


def _check_inputs(x: Tensor, packed: PackedBitmask | Packed24, bias: Tensor | None) -> None:
    n, k = packed.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {sorted(map(str, SUPPORTED_DTYPES))}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {packed.device}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _interpreter_bf16_dot(x: Tensor, use_dot: bool) -> bool:
    """The interpreter (CPU tensors) multiplies the raw bits of bf16 ``tl.dot`` operands
    (triton-lang/triton#11584), so there bf16 tiles go through float32 - same exact products."""
    return use_dot and x.device.type == "cpu" and x.dtype == torch.bfloat16


def bitmask_linear_triton(x: Tensor, packed: PackedBitmask | Packed24, bias: Tensor | None = None,
                          *, blocks: Blocks | None = None) -> Tensor:
    """x [M, K], packed W [N, K], bias [N] | None -> y [M, N] in x's dtype (float32 accumulation)."""
    if not HAVE_TRITON:
        raise RuntimeError(_why_unavailable())
    _check_inputs(x, packed, bias)
    m, (n, k) = x.shape[0], packed.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
    use_dot = not choose_path(m, packed).endswith("decode")
    blocks = blocks or choose_blocks(m, not use_dot, x.device)
    _check_blocks(blocks, use_dot)
    cast_f32 = x.dtype != packed.values.dtype or _interpreter_bf16_dot(x, use_dot)
    common = dict(HAS_BIAS=bias is not None, USE_DOT=use_dot, CAST_F32=cast_f32,
                  PRECISION="ieee" if cast_f32 or x.dtype == torch.float32 else None,
                  BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, num_warps=blocks.num_warps)
    grid = (triton.cdiv(m, blocks.m), triton.cdiv(n, blocks.n))
    bias_arg = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    shape_args = (m, n, k, words_per_row(k), x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    if isinstance(packed, Packed24):
        _sparse24_linear_kernel[grid](x, packed.meta, packed.values, bias_arg, y, *shape_args, **common)
    else:
        _bitmask_linear_kernel[grid](x, packed.words, packed.offsets, packed.values, bias_arg, y,
                                     *shape_args, **common)
    return y


# ---------------------------------------------------------------------------------------- registry

def _available() -> bool:
    return HAVE_TRITON and torch.cuda.is_available()


def _why_unavailable() -> str:
    if not HAVE_TRITON:
        return "Triton is not installed (pip install triton) so the Triton kernels cannot run."
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False); the Triton kernels need one."
    return ""


register(Kernel(
    op="bitmask_linear", name="triton", priority=20,
    devices=frozenset({"cuda"}),
    dtypes=SUPPORTED_DTYPES,
    pack=pack_triton,
    apply=bitmask_linear_triton,
    available=_available,
    why_unavailable=_why_unavailable,
))
