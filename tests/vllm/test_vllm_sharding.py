"""The plugin's pure parts, with no vLLM: tensor-parallel shards of the sparse-bitmask layout equal the
same shards of the dense weight, rank shards match vLLM's loaders, and per-layer structures and their
tensor-parallel constraints are read and checked with errors that name the fix.

These run in every environment (``make test`` too); the tests that start vLLM are in test_vllm_engine.py.
"""

from __future__ import annotations

import pytest
import torch

from compress.adapter import LayerStructure
from kernels.bitmask import compress
from sparse_vllm.sharding import Shard, column_shard, concat_rows, fuse, qkv_shard, row_shard, take
from sparse_vllm.structure import (
    TensorParallelError, check_tensor_parallel, layer_structures, tp_problem, valid_tp_sizes,
)


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w.to(dtype)


SHAPES = [(1, 1), (17, 13), (127, 129), (128, 128), (33, 250)]


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_row_and_column_slices_equal_dense_slices(rows, cols, sparsity):
    dense = sparse_weight(rows, cols, sparsity)
    packed = compress(dense)
    for dim, total in ((0, rows), (1, cols)):
        for start, size in {(0, total), (0, max(1, total // 2)), (total // 3, total - total // 3), (total // 2, 1),
                            (min(5, total - 1), max(1, min(9, total - 5)))}:
            shard = Shard(dim, start, size)
            part = take(packed, shard)
            part.validate()  # row offsets, bitmask and value count agree
            assert torch.equal(part.decompress(), take(dense, shard)), (dim, start, size)


def test_out_of_range_shard_is_refused():
    with pytest.raises(ValueError, match="outside a weight with 4 rows"):
        take(compress(sparse_weight(4, 8, 0.5)), Shard(0, 3, 2))


def test_concat_rows_and_fuse():
    parts = [sparse_weight(r, 40, 0.6, seed=r) for r in (3, 16, 1)]
    fused = concat_rows([compress(p) for p in parts])
    fused.validate()
    assert torch.equal(fused.decompress(), torch.cat(parts))
    mixed = fuse([compress(parts[0]), parts[1], compress(parts[2])], torch.float32)  # a dense part among sparse
    assert mixed.dtype == torch.float32 and torch.equal(mixed.decompress(), torch.cat(parts).float())
    dense = fuse(parts, torch.float32)
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, torch.cat(parts).float())
    with pytest.raises(ValueError, match="different column counts"):
        concat_rows([compress(parts[0]), compress(sparse_weight(2, 41, 0.5))])


def vllm_qkv_rows(part: str, heads: int, kv_heads: int, head_dim: int, rank: int, tp: int) -> range:
    """What vLLM's QKVParallelLinear.weight_loader narrows, restated from its source."""
    num_heads = heads // tp
    num_kv = 1 if tp >= kv_heads else kv_heads // tp
    replicas = tp // kv_heads if tp >= kv_heads else 1
    size = (num_heads if part == "q" else num_kv) * head_dim
    shard_rank = rank if part == "q" else rank // replicas
    return range(shard_rank * size, shard_rank * size + size)


@pytest.mark.parametrize("heads, kv_heads, tp", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 2, 8), (6, 3, 3), (4, 1, 4)])
def test_qkv_shards_match_vllm_and_cover_every_head(heads, kv_heads, tp):
    head_dim = 4
    for part, total in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        covered = set()
        for rank in range(tp):
            s = qkv_shard(part, heads, kv_heads, head_dim, rank, tp)
            assert range(s.start, s.start + s.size) == vllm_qkv_rows(part, heads, kv_heads, head_dim, rank, tp)
            covered |= set(range(s.start, s.start + s.size))
        assert covered == set(range(total * head_dim))


def test_column_and_row_shards_tile_the_weight():
    w = sparse_weight(24, 36, 0.5)
    packed = compress(w)
    for tp in (1, 2, 3, 4):
        rows = torch.cat([take(packed, column_shard(24, r, tp)).decompress() for r in range(tp)])
        cols = torch.cat([take(packed, row_shard(36, r, tp)).decompress() for r in range(tp)], dim=1)
        assert torch.equal(rows, w) and torch.equal(cols, w)
    with pytest.raises(ValueError, match="36 input columns cannot be split evenly over 5"):
        row_shard(36, 0, 5)


def test_row_parallel_partial_sums_equal_the_full_product():
    """What tensor parallelism computes with column shards of o_proj / down_proj: sum_r x_r W_r^T = x W^T."""
    w, x = sparse_weight(16, 64, 0.7, dtype=torch.float32), torch.randn(3, 64)
    packed = compress(w)
    for tp in (2, 4):
        total = sum(x[:, s.start:s.start + s.size] @ take(packed, s).decompress().T
                    for s in (row_shard(64, r, tp) for r in range(tp)))
        torch.testing.assert_close(total, x @ w.T)


PRUNED = [LayerStructure(8, 4, 64, 512, True, True), LayerStructure(4, 2, 64, 256, True, True),
          LayerStructure(6, 3, 64, 384, True, False)]


def test_layer_structures_from_config():
    config = {"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512,
              "intermediate_size": 1024}
    uniform = layer_structures(config)
    assert uniform == [LayerStructure(8, 4, 64, 1024, False, False)] * 3
    config["sparse_serve_layers"] = [s.to_dict() for s in PRUNED]
    assert layer_structures(config) == PRUNED
    config["sparse_serve_layers"] = config["sparse_serve_layers"][:2]
    with pytest.raises(ValueError, match="must list 3 layers"):
        layer_structures(config)


def test_tensor_parallel_constraints_name_the_layer_and_the_fix():
    assert valid_tp_sizes(PRUNED) == [1]  # layer 2 keeps 3 KV groups, layer 1 two
    assert valid_tp_sizes(PRUNED[:2]) == [1, 2, 4]
    assert tp_problem(PRUNED[2], 2) == "3 KV heads neither divide nor are divided by 2"
    assert tp_problem(PRUNED[1], 4) is None and tp_problem(PRUNED[1], 8) == "4 query heads are not a multiple of 8"
    check_tensor_parallel(PRUNED[:2], 4)
    with pytest.raises(TensorParallelError) as err:
        check_tensor_parallel(PRUNED, 2)
    message = str(err.value)
    assert "layer 2" in message and "3 KV heads" in message and "[1]" in message
    assert "--pipeline-parallel-size" in message and "--mlp-multiple 64" in message
    with pytest.raises(TensorParallelError, match="MLP width 256 is not a multiple of 3"):
        check_tensor_parallel([LayerStructure(3, 3, 64, 256)], 3)


def test_cli_lists_structures_and_valid_tp_sizes(tmp_path, capsys):
    import json

    from sparse_vllm.__main__ import main

    config = {"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512,
              "intermediate_size": 1024, "sparse_serve_layers": [s.to_dict() for s in PRUNED[:2]] + [PRUNED[0].to_dict()]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main([str(tmp_path), "--max-tp", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "layers [0, 2]" in lines[0] and "layers [1]" in lines[1]
    assert json.loads(lines[-1]) == {"valid_tensor_parallel_sizes": [1, 2, 4]}
    assert main([str(tmp_path / "none")]) == 2 and "config.json" in capsys.readouterr().err
