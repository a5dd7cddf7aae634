"""Lossless exponent coding of dense bf16 weights: 12 bits a weight where a weight's high bytes take few values.

Contract: :func:`code_exponents` turns a bf16 weight [N, K] into a :class:`CodedWeight`, or returns None when
it cannot be coded exactly (K not a multiple of 32, or more than 16 distinct high bytes); :func:`decode_exponents`
gives the weight back bit for bit. Pure torch functions; the AVX-512 decode GEMV that reads the layout
(``coded_rows`` in ``kernels/cpu/bitmask_linear.cpp``) decodes each 32-weight chunk in registers.

A bf16 weight's high byte is its sign and the top 7 bits of its exponent; the low byte the exponent's last
bit and the mantissa. Decoding a small model is bound by reading its weights, and most tensors' high bytes
take dozens of values, but some take few: SmolLM2's LM head (its tied embedding, dequantized from a GGUF
file) has 13 exponents (zero and 116-127), so 14 high bytes, and its 56.6 MB fit in 42.5 MB this way. Its
decoder linears have 18-20 exponents and stay plain.

Layout:
    low    uint8 [N, K]      each weight's low byte
    codes  uint8 [N, K / 2]  the index of its high byte in ``table``, 4 bits; chunk c of a row (weights
                             32c .. 32c + 31) holds its codes in bytes 16c .. 16c + 15: byte 16c + j has weight
                             32c + j in the low nibble and 32c + 16 + j in the high one
    table  uint8 [16]        the high byte per code (unused codes 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 32  # weights per decoded register (bf16 lanes of 512 bits)
CODES = 16  # high bytes a 4-bit code can name
ROWS_PER_BLOCK = 4096  # rows coded at a time, so coding a large LM head needs little more than its output


@dataclass(frozen=True)
class CodedWeight:
    """A bf16 weight [N, K] in the exponent-coded layout (module docstring)."""

    low: Tensor  # uint8 [N, K]
    codes: Tensor  # uint8 [N, K / 2]
    table: Tensor  # uint8 [16]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.low.shape[0], self.low.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.low, self.codes, self.table))


def _high(bits: Tensor) -> Tensor:  # bits int16 [...] -> the high bytes, int16 [...] in 0 .. 255
    return (bits >> 8) & 0xFF


def code_exponents(weight: Tensor) -> CodedWeight | None:
    """``weight`` (bf16 [N, K]) coded, or None when K is not a multiple of 32 or it has over 16 high bytes."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] % CHUNK != 0:
        return None
    bits = weight.detach().contiguous().view(torch.int16)  # [N, K]
    counts = torch.zeros(256, dtype=torch.long, device=weight.device)
    for block in bits.split(ROWS_PER_BLOCK):
        counts += torch.bincount(_high(block).flatten().long(), minlength=256)
    present = counts.nonzero().flatten()  # the high bytes used, ascending
    if present.numel() > CODES:
        return None
    code_of = torch.zeros(256, dtype=torch.uint8, device=weight.device)
    code_of[present] = torch.arange(present.numel(), dtype=torch.uint8, device=weight.device)
    n, k = bits.shape
    low = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    for start, block in zip(range(0, n, ROWS_PER_BLOCK), bits.split(ROWS_PER_BLOCK)):
        rows = slice(start, start + block.shape[0])
        low[rows] = (block & 0xFF).to(torch.uint8)
        c = code_of[_high(block).long()].view(-1, k // CHUNK, 2, CHUNK // 2)  # [rows, chunks, half, 16]
        codes[rows] = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, k // 2)
    table = torch.zeros(CODES, dtype=torch.uint8, device=weight.device)
    table[: present.numel()] = present.to(torch.uint8)
    return CodedWeight(low, codes, table)


def decode_exponents(coded: CodedWeight) -> Tensor:
    """The bf16 weight [N, K] that ``coded`` holds, bit for bit."""
    n, k = coded.shape
    c = coded.codes.view(n, k // CHUNK, 1, CHUNK // 2).to(torch.int32)
    code = torch.cat([c & 0x0F, c >> 4], dim=2).view(n, k)  # [N, K]
    bits = (coded.table.to(torch.int32)[code] << 8) | coded.low.to(torch.int32)  # 0 .. 65535
    return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.bfloat16)
