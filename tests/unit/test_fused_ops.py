"""The fused layer ops (kernels.fused) against the transformers modules they replace, both
implementations, float32 and bfloat16 (where the compiled ops must round exactly like the modules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from kernels.fused import ENV_FORCE, TORCH_OPS, LayerOps, cpu_fused_ops, gather_blocks, layer_ops

DTYPES = [torch.float32, torch.bfloat16]


def implementations() -> list[LayerOps]:
    fused = cpu_fused_ops()
    return [TORCH_OPS] + ([fused] if fused is not None else [])


@pytest.fixture(params=["torch", "cpu_fused"])
def ops(request) -> LayerOps:
    chosen = {o.name: o for o in implementations()}
    if request.param not in chosen:
        pytest.skip("the fused CPU extension could not be compiled here")
    return chosen[request.param]


def exact(dtype: torch.dtype) -> dict:
    """bf16 results must be bit-identical to the modules; float32 within summation-order noise."""
    return {"atol": 0, "rtol": 0} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_add_match_llama_rmsnorm(ops, dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    h, delta = torch.randn(7, 96).to(dtype) * 3, torch.randn(7, 96).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ops.rms_norm(h, norm.weight, 1e-5), norm(h), **exact(dtype))
        stream = h.clone()
        y = ops.add_rms_norm_(stream, delta, norm.weight, 1e-5)
        assert torch.equal(stream, h + delta)  # the residual stream is updated in place, rounded like torch
        torch.testing.assert_close(y, norm(h + delta), **exact(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_strided_views_matches_transformers(ops, dtype):
    torch.manual_seed(1)
    t, hq, hk, d = 5, 6, 2, 16
    qkv = torch.randn(t, hq + 2 * hk, d).to(dtype)  # a fused projection's output, split into views
    angles = torch.randn(t, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    q, k, v = qkv.clone().split([hq, hk, hk], dim=1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # [T, H, d]
    ops.rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, want_q, **exact(dtype))
    torch.testing.assert_close(k, want_k, **exact(dtype))
    assert torch.equal(v, qkv[:, hq + hk:])  # values untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cache_rotates_then_stores_keys_and_values_in_their_slots(ops, dtype):
    torch.manual_seed(4)
    t, hq, hk, d, blocks, bs = 3, 6, 2, 16, 5, 4
    qkv = torch.randn(t, hq + 2 * hk, d).to(dtype)
    angles = torch.randn(t, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    q, k, v = qkv.clone().split([hq, hk, hk], dim=1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    k_cache, v_cache = torch.zeros(blocks, bs, hk, d, dtype=dtype), torch.zeros(blocks, bs, hk, d, dtype=dtype)
    slots = torch.tensor([17, 2, 9])  # block 4 offset 1, block 0 offset 2, block 2 offset 1
    ops.rotary_cache_(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, want_q, **exact(dtype))
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    torch.testing.assert_close(flat_k[slots], want_k, **exact(dtype))
    assert torch.equal(flat_v[slots], qkv[:, hq + hk:])
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_rotary_cache_refuses_a_slot_outside_the_cache():
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused.rotary_cache_(q, k, v, cos, sin, cache, cache.clone(), torch.tensor([8]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [7, 40, 56, 300, 1536])  # scalar only, vector + tail, past one exp block
def test_silu_mul_matches_the_gated_mlp(ops, dtype, inter):
    torch.manual_seed(2)
    gate_up = torch.randn(33, 2 * inter).to(dtype) * 4
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **exact(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_matches_attention_over_the_gathered_context(ops, dtype):
    torch.manual_seed(3)
    blocks, bs, hk, group, d = 12, 4, 2, 3, 16
    k_cache, v_cache = torch.randn(blocks, bs, hk, d).to(dtype), torch.randn(blocks, bs, hk, d).to(dtype)
    tables = torch.tensor([[5, 2, 9, 0], [7, 0, 0, 0], [1, 3, 4, 11]])  # padded with block 0
    lens = torch.tensor([10, 1, 16])
    q = torch.randn(3, hk * group, d).to(dtype)
    out = ops.paged_decode(q, k_cache, v_cache, tables, lens, 0.3)
    for b in range(3):  # one sequence at a time, plain softmax attention over its own positions
        keys = gather_blocks(k_cache, tables[b:b + 1])[0, :, : lens[b]].float()  # [Hk, L, d]
        values = gather_blocks(v_cache, tables[b:b + 1])[0, :, : lens[b]].float()
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [Hq, L, d]
        probs = torch.softmax(q[b].float().unsqueeze(1) @ keys.transpose(1, 2) * 0.3, dim=-1)  # [Hq, 1, L]
        tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(out[b].float(), (probs @ values).squeeze(1), **tol)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain float32 softmax attention of each sequence over its own gathered positions: [B, Hq, d]."""
    out = []
    group = q.shape[1] // k_cache.shape[2]
    for b in range(q.shape[0]):
        keys = gather_blocks(k_cache, tables[b:b + 1])[0, :, : lens[b]].float().repeat_interleave(group, 0)
        values = gather_blocks(v_cache, tables[b:b + 1])[0, :, : lens[b]].float().repeat_interleave(group, 0)
        probs = torch.softmax(q[b].float().unsqueeze(1) @ keys.transpose(1, 2) * scale, dim=-1)  # [Hq, 1, L]
        out.append((probs @ values).squeeze(1))
    return torch.stack(out)


# bf16 with d 64 or 128 takes register-resident passes of up to 4 (d 64) or 2 (d 128) query heads per KV head:
# groups that fill them, leave a remainder, or are smaller; contexts within a block, across blocks, and long
# enough to be split into spans attended in parallel
@pytest.mark.parametrize("d,group", [(64, 1), (64, 3), (64, 4), (64, 6), (128, 1), (128, 3), (128, 5)])
def test_paged_decode_register_passes_match_attention(d, group):
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    torch.manual_seed(d + group)
    blocks, bs, hk = 80, 16, 2
    k_cache, v_cache = torch.randn(blocks, bs, hk, d).bfloat16(), torch.randn(blocks, bs, hk, d).bfloat16()
    tables = torch.randperm(blocks)[:75].view(3, 25)  # each sequence's blocks scattered over the cache
    lens = torch.tensor([1, 37, 400])
    q = torch.randn(3, hk * group, d).bfloat16()
    expected = attention_reference(q, k_cache, v_cache, tables, lens, 0.125)
    out = fused.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    alone = fused.paged_decode(q[2:], k_cache, v_cache, tables[2:], lens[2:], 0.125)  # one sequence: split in spans
    torch.testing.assert_close(alone.float(), expected[2:], atol=2e-2, rtol=2e-2)


def test_paged_decode_takes_float64_too():
    """The compiled op dispatches float64 as well: its value sums must not go through the float32 vector loads."""
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    torch.manual_seed(6)
    k_cache, v_cache = torch.randn(8, 16, 2, 64, dtype=torch.float64), torch.randn(8, 16, 2, 64, dtype=torch.float64)
    tables, lens, q = torch.arange(8)[None], torch.tensor([100]), torch.randn(1, 4, 64, dtype=torch.float64)
    out = fused.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    expected = attention_reference(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)


def test_paged_decode_spans_merge_to_the_single_pass_result():
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    torch.manual_seed(5)
    k_cache, v_cache = torch.randn(64, 16, 3, 64).bfloat16() * 3, torch.randn(64, 16, 3, 64).bfloat16()
    tables, lens, q = torch.arange(64).view(1, 64), torch.tensor([1000]), torch.randn(1, 9, 64).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # four spans of 250 positions
        spans = fused.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
        torch.set_num_threads(1)  # one pass
        single = fused.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(spans.float(), single.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(single.float(), attention_reference(q, k_cache, v_cache, tables, lens, 0.125),
                               atol=2e-2, rtol=2e-2)


# a whole prompt (plain causal), a later chunk over what is cached before it, a chunk of one row; d 16 takes
# the generic loops, d 64 the register passes; 150 rows are enough to run on several threads
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("past,rows,d", [(0, 13, 16), (21, 9, 16), (7, 1, 16), (0, 150, 64), (40, 110, 64)])
def test_paged_prefill_is_causal_attention_over_the_cache(ops, dtype, past, rows, d):
    torch.manual_seed(past + rows + d)
    blocks, bs, hk, group = 48, 4, 3, 3
    k_cache, v_cache = torch.randn(blocks, bs, hk, d).to(dtype), torch.randn(blocks, bs, hk, d).to(dtype)
    table = torch.randperm(blocks)[: -(-(past + rows) // bs)]  # the sequence's blocks, scattered
    q = torch.randn(rows, hk * group + 2 * hk, d).to(dtype)[:, : hk * group]  # a view of a fused q/k/v output
    out = ops.paged_prefill(q, k_cache, v_cache, table, past, 0.2)
    assert out.shape == (rows, hk * group, d) and not out.isnan().any()
    # row i is the single query at position past + i over the positions up to its own
    lens = past + 1 + torch.arange(rows)
    expected = attention_reference(q, k_cache, v_cache, table.expand(rows, -1), lens, 0.2)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.float(), expected, **tol)


def test_compiled_prefill_rows_equal_decode_queries_bit_for_bit():
    """A prompt attends exactly as its tokens would one by one: each prefill row is the decode query of its length."""
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    torch.manual_seed(8)
    k_cache, v_cache = torch.randn(40, 16, 3, 64).bfloat16(), torch.randn(40, 16, 3, 64).bfloat16()
    table, past, rows = torch.randperm(40)[:30], 200, 260
    q = torch.randn(rows, 9, 64).bfloat16()
    out = fused.paged_prefill(q, k_cache, v_cache, table, past, 0.125)
    for i in (0, 1, 63, 64, 200, rows - 1):
        one = fused.paged_decode(q[i:i + 1], k_cache, v_cache, table[None], torch.tensor([past + i + 1]), 0.125)
        assert torch.equal(out[i], one[0]), i


def test_the_compiled_ops_reject_bad_shapes_with_the_reason():
    fused = cpu_fused_ops()
    if fused is None:
        pytest.skip("the fused CPU extension could not be compiled here")
    with pytest.raises(RuntimeError, match="w must be a contiguous"):
        fused.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        fused.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="outside the block table"):
        fused.paged_decode(torch.randn(1, 2, 4), torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4),
                           torch.tensor([[1]]), torch.tensor([5]), 1.0)
    with pytest.raises(RuntimeError, match=r"positions 3 to 6 are outside the block table \(4 positions\)"):
        fused.paged_prefill(torch.randn(3, 2, 4), torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4),
                            torch.tensor([0, 1]), 3, 1.0)


def test_layer_ops_selection_and_forcing(monkeypatch):
    monkeypatch.delenv(ENV_FORCE, raising=False)
    assert layer_ops("cpu", torch.float16).name == "torch"  # the compiled ops take float32 / bfloat16 only
    best = layer_ops("cpu", torch.bfloat16).name
    assert best == ("cpu_fused" if cpu_fused_ops() is not None else "torch")
    monkeypatch.setenv(ENV_FORCE, "torch")
    assert layer_ops("cpu", torch.bfloat16) is TORCH_OPS
    monkeypatch.setenv(ENV_FORCE, "fast")
    with pytest.raises(ValueError, match="choose 'torch' or 'cpu_fused'"):
        layer_ops("cpu", torch.bfloat16)
