"""The sparse-bitmask layout for 2-D weights, in pure torch.

Contract: this is the on-disk layout ``compressed-tensors`` defined as
``sparse-bitmask`` (its library no longer ships the compressor, so we own the
code; checkpoints stay readable by tools that know the format). A weight
``W: [rows, cols]`` named ``<prefix>.weight`` is stored as four tensors:

``<prefix>.shape``        int64 ``[2]`` = ``(rows, cols)``
``<prefix>.compressed``   ``[nnz]`` the nonzero values of ``W`` in row-major
                          order, in ``W``'s dtype (bit-exact, no conversion)
``<prefix>.bitmask``      uint8 ``[rows, ceil(cols / 8)]``: bit ``j % 8`` of
                          byte ``j // 8`` of row ``r`` is set iff
                          ``W[r, j] != 0``; LITTLE bit order, i.e. the same
                          bytes as ``numpy.packbits(W != 0, axis=-1,
                          bitorder="little")``; padding bits are zero
``<prefix>.row_offsets``  int64 ``[rows]``: index into ``compressed`` where
                          row ``r`` starts (exclusive cumsum of the per-row
                          nonzero counts)

"Zero" means ``== 0``: ``-0.0`` compares equal to zero, so it is dropped and
comes back as ``+0.0`` (the only value that does not round-trip bit-exactly;
it has no effect on any matmul). NaN and inf are nonzero and are kept.

Every function here is vectorised (no Python loop over rows) and works on any
device; callers move tensors where they want them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: names of the four tensors of one compressed weight, by role
SUFFIXES: dict[str, str] = {"shape": "shape", "values": "compressed",
                            "bitmask": "bitmask", "row_offsets": "row_offsets"}


def _bit_weights(device: torch.device) -> Tensor:
    return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)  # [8]


def packed_cols(cols: int) -> int:
    """Bytes per bitmask row for ``cols`` columns: ``ceil(cols / 8)``."""
    return (cols + 7) // 8


def pack_bitmask(mask: Tensor) -> Tensor:
    """Pack a bool mask ``[R, C]`` into uint8 ``[R, ceil(C/8)]``, little bit order."""
    if mask.dim() != 2:
        raise ValueError(f"pack_bitmask expects a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    nbytes = packed_cols(cols)
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, nbytes * 8 - cols))  # [R, 8*B]
    bits = padded.view(rows, nbytes, 8) * _bit_weights(mask.device)  # [R, B, 8], distinct powers of 2
    return bits.sum(dim=-1, dtype=torch.uint8)  # [R, B]


def words_per_row(cols: int) -> int:
    """32-bit words per row for ``cols`` columns: ``ceil(cols / 32)``."""
    return (cols + 31) // 32


def as_int32_bits(v: Tensor) -> Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def padded_words(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 [R, ceil(cols/8)] -> int64 [R, KW, 4], zero bytes appended up to whole words."""
    rows, nbytes = bitmask.shape
    padded = torch.nn.functional.pad(bitmask, (0, 4 * words_per_row(cols) - nbytes))  # [R, 4*KW]
    return padded.to(torch.int64).view(rows, words_per_row(cols), 4)


def bitmask_words(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 bitmask [R, ceil(cols/8)] -> int32 [R, ceil(cols/32)]: bit j of word c is column 32c + j
    (byte b of a word holds columns 8b..8b+7; padding bits zero). The kernels' 32-column chunks."""
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=bitmask.device)
    return as_int32_bits((padded_words(bitmask, cols) << shifts).sum(-1))  # [R, KW]


def word_popcounts(bitmask: Tensor, cols: int) -> Tensor:
    """Nonzeros in every 32-column word: uint8 bitmask [R, ceil(cols/8)] -> int64 [R, ceil(cols/32)]."""
    table = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=bitmask.device)
    return table[padded_words(bitmask, cols)].sum(-1)  # [R, KW]


def unpack_bitmask(bits: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_bitmask`: uint8 ``[R, ceil(cols/8)]`` -> bool ``[R, cols]``."""
    if bits.dim() != 2 or bits.dtype != torch.uint8:
        raise ValueError(f"unpack_bitmask expects a 2-D uint8 tensor, got {bits.dtype} {tuple(bits.shape)}")
    if bits.shape[1] != packed_cols(cols):
        raise ValueError(f"bitmask has {bits.shape[1]} bytes per row; {cols} columns need {packed_cols(cols)}")
    expanded = bits.unsqueeze(-1) & _bit_weights(bits.device)  # [R, B, 8]
    return (expanded != 0).reshape(bits.shape[0], -1)[:, :cols]  # [R, cols]


def row_offsets_of(mask: Tensor) -> Tensor:
    """Exclusive cumsum of per-row nonzero counts: bool ``[R, C]`` -> int64 ``[R]``."""
    counts = mask.sum(dim=1, dtype=torch.int64)  # [R]
    return torch.cumsum(counts, dim=0) - counts


@dataclass(frozen=True)
class BitmaskTensor:
    """One 2-D weight in the sparse-bitmask layout (see the module docstring).

    Promises: ``decompress()`` returns a tensor bit-equal to the compressed
    weight (``-0.0`` becomes ``+0.0``); ``to_state_dict(prefix)`` gives exactly
    the four on-disk tensors; ``from_state_dict`` validates them and raises
    ``ValueError`` naming the inconsistency.
    """

    shape: tuple[int, int]
    values: Tensor       # [nnz], dtype of the weight
    bitmask: Tensor      # uint8 [rows, ceil(cols/8)]
    row_offsets: Tensor  # int64 [rows]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def density(self) -> float:
        """Fraction of nonzeros (1 - sparsity)."""
        total = self.rows * self.cols
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the four stored tensors (what the layout costs on disk)."""
        shape_bytes = 2 * 8
        return (shape_bytes + self.values.numel() * self.values.element_size()
                + self.bitmask.numel() + self.row_offsets.numel() * 8)

    def mask(self) -> Tensor:
        """Bool ``[rows, cols]``, True where the weight is nonzero."""
        return unpack_bitmask(self.bitmask, self.cols)

    def decompress(self) -> Tensor:
        """The dense weight ``[rows, cols]`` in the values' dtype and device."""
        return decompress(self.values, self.bitmask, self.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BitmaskTensor":
        """Move all tensors to ``device``; cast only the values to ``dtype``."""
        return BitmaskTensor(self.shape, self.values.to(device=device, dtype=dtype),
                             self.bitmask.to(device), self.row_offsets.to(device))

    def to_state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The four tensors under ``<prefix>.shape`` / ``.compressed`` / ``.bitmask`` / ``.row_offsets``."""
        return {
            f"{prefix}.{SUFFIXES['shape']}": torch.tensor(self.shape, dtype=torch.int64),
            f"{prefix}.{SUFFIXES['values']}": self.values,
            f"{prefix}.{SUFFIXES['bitmask']}": self.bitmask,
            f"{prefix}.{SUFFIXES['row_offsets']}": self.row_offsets,
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str) -> "BitmaskTensor":
        """Read and validate the four tensors of ``prefix`` (``KeyError`` if one is absent)."""
        shape_t = tensors[f"{prefix}.{SUFFIXES['shape']}"]
        if shape_t.numel() != 2 or shape_t.is_floating_point():
            raise ValueError(f"{prefix}.shape must hold two integers, got {shape_t.tolist()}")
        rows, cols = (int(v) for v in shape_t.tolist())
        out = cls((rows, cols), tensors[f"{prefix}.{SUFFIXES['values']}"],
                  tensors[f"{prefix}.{SUFFIXES['bitmask']}"],
                  tensors[f"{prefix}.{SUFFIXES['row_offsets']}"].to(torch.int64))
        out.validate(prefix)
        return out

    def validate(self, name: str = "bitmask tensor") -> None:
        """Raise ``ValueError`` unless the four tensors are mutually consistent."""
        rows, cols = self.shape
        if tuple(self.bitmask.shape) != (rows, packed_cols(cols)) or self.bitmask.dtype != torch.uint8:
            raise ValueError(f"{name}: bitmask is {self.bitmask.dtype} {tuple(self.bitmask.shape)}, expected "
                             f"uint8 {(rows, packed_cols(cols))} for shape {self.shape}")
        if self.values.dim() != 1:
            raise ValueError(f"{name}: values must be 1-D, got shape {tuple(self.values.shape)}")
        if tuple(self.row_offsets.shape) != (rows,):
            raise ValueError(f"{name}: row_offsets has shape {tuple(self.row_offsets.shape)}, expected ({rows},)")
        mask = self.mask()
        if int(mask.sum()) != self.nnz:
            raise ValueError(f"{name}: bitmask marks {int(mask.sum())} nonzeros but {self.nnz} values are stored")
        if not torch.equal(row_offsets_of(mask), self.row_offsets.to(mask.device)):
            raise ValueError(f"{name}: row_offsets disagree with the bitmask")


def compress(weight: Tensor) -> BitmaskTensor:
    """Compress a 2-D weight ``[R, C]`` (any dtype, any device) into the bitmask layout."""
    if weight.dim() != 2:
        raise ValueError(f"compress expects a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.detach()
    mask = weight != 0  # [R, C]
    return BitmaskTensor(shape=(int(weight.shape[0]), int(weight.shape[1])),
                         values=weight[mask],  # [nnz], row-major
                         bitmask=pack_bitmask(mask),
                         row_offsets=row_offsets_of(mask))


def decompress(values: Tensor, bitmask: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense ``[rows, cols]`` from values ``[nnz]`` and bitmask ``[rows, ceil(cols/8)]``."""
    rows, cols = shape
    mask = unpack_bitmask(bitmask.to(values.device), cols)  # [R, C]
    out = torch.zeros((rows, cols), dtype=values.dtype, device=values.device)
    return out.masked_scatter_(mask, values)
