"""The sparse-bitmask layout against numpy.packbits(bitorder="little") and bit-exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.bitmask import BitmaskTensor, compress, decompress, pack_bitmask, unpack_bitmask

SHAPES = [(1, 1), (3, 7), (17, 129), (128, 128), (5, 8)]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_mask(shape: tuple[int, int], density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < density  # [R, C]


def mixed_rows_mask(rows: int, cols: int) -> torch.Tensor:
    """Random rows interleaved with all-zero and all-one rows."""
    mask = random_mask((rows, cols), 0.4, seed=1)
    mask[::3] = False
    mask[1::3] = True
    return mask


def sparse_weight(shape: tuple[int, int], density: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen).to(dtype)
    values[values == 0] = 1  # so the mask alone decides the zeros
    return torch.where(random_mask(shape, density, seed), values, torch.zeros((), dtype=dtype))


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_pack_matches_numpy_little(shape, density):
    mask = random_mask(shape, density)
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], (shape[1] + 7) // 8)
    np.testing.assert_array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bitmask(packed, shape[1]), mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_all_zero_and_all_one_rows(shape):
    mask = mixed_rows_mask(*shape)
    packed = pack_bitmask(mask)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, shape[1]), mask)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_bitmask(torch.zeros(2, 3, dtype=torch.uint8), cols=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compress_round_trip_bit_exact(dtype, shape, density):
    weight = sparse_weight(shape, density, dtype)
    packed = compress(weight)
    assert packed.values.dtype == dtype
    assert torch.equal(packed.values, weight[weight != 0])  # row-major order
    out = packed.decompress()
    assert out.dtype == dtype and out.shape == weight.shape
    assert torch.equal(bits_of(out), bits_of(weight))
    assert torch.equal(bits_of(decompress(packed.values, packed.bitmask, packed.shape)), bits_of(weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_survive_and_negative_zero_becomes_zero(dtype):
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal
    weight = torch.tensor([[float("inf"), -float("inf"), 0.0, tiny],
                           [float("nan"), -0.0, 1.5, -2.0]], dtype=dtype)
    out = compress(weight).decompress()
    keep = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(bits_of(out)[keep], bits_of(weight)[keep])  # NaN/inf/subnormal bit-exact
    assert bits_of(out)[1, 1] == 0  # -0.0 counts as zero and comes back as +0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_row_offsets_are_exclusive_cumsum(shape):
    weight = torch.where(mixed_rows_mask(*shape), torch.ones(shape), torch.zeros(shape))
    packed = compress(weight)
    counts = [int((row != 0).sum()) for row in weight]  # reference, row by row
    expected = [sum(counts[:i]) for i in range(len(counts))]
    assert packed.row_offsets.dtype == torch.int64
    assert packed.row_offsets.tolist() == expected
    assert packed.nnz == sum(counts)


def test_state_dict_round_trip_and_validation():
    weight = sparse_weight((17, 129), 0.3, torch.bfloat16)
    packed = compress(weight)
    tensors = packed.to_state_dict("model.layers.0.mlp.up_proj")
    assert sorted(tensors) == [f"model.layers.0.mlp.up_proj.{s}"
                               for s in ("bitmask", "compressed", "row_offsets", "shape")]
    assert tensors["model.layers.0.mlp.up_proj.shape"].tolist() == [17, 129]
    assert tensors["model.layers.0.mlp.up_proj.shape"].dtype == torch.int64
    again = BitmaskTensor.from_state_dict(tensors, "model.layers.0.mlp.up_proj")
    assert torch.equal(bits_of(again.decompress()), bits_of(weight))
    tensors["model.layers.0.mlp.up_proj.row_offsets"] = torch.zeros(17, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_offsets"):
        BitmaskTensor.from_state_dict(tensors, "model.layers.0.mlp.up_proj")


def test_density_and_nbytes_at_70_percent():
    weight = sparse_weight((256, 1024), 0.3, torch.bfloat16)
    packed = compress(weight)
    assert packed.density == pytest.approx(0.3, abs=0.01)
    dense_bytes = weight.numel() * weight.element_size()
    expected = 16 + packed.nnz * 2 + 256 * 128 + 256 * 8  # shape + values + bitmask + row_offsets
    assert packed.nbytes == expected
    assert packed.nbytes <= 0.4 * dense_bytes
