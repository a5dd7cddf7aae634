"""Fusing q/k/v and gate/up at load time changes no output and keeps sparse weights sparse."""

from __future__ import annotations

import pytest
import torch

from kernels.linear import PrepackedLinear, SparseLinear
from sparse_serve.fusion import SlicedLinear
from sparse_serve.loader import load_for_serving


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from compress.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "down_proj.weight")):
                p.mul_(p.abs() > p.abs().median(dim=1, keepdim=True).values)  # gate/up stay dense
    out = tmp_path_factory.mktemp("fusion") / "sparse"
    save_checkpoint(model, tiny_tokenizer, out)
    return out


@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_fused_model_gives_the_same_logits(tiny_model_dir, sparse_dir, which):
    path = tiny_model_dir if which == "dense" else sparse_dir
    fused = load_for_serving(path, dtype=torch.float32)
    plain = load_for_serving(path, dtype=torch.float32, fuse=False)
    attn, mlp = fused.model.model.layers[0].self_attn, fused.model.model.layers[0].mlp
    assert isinstance(attn.q_proj, SlicedLinear) and isinstance(mlp.up_proj, SlicedLinear)
    expected_qkv = SparseLinear if which == "sparse" else PrepackedLinear
    assert isinstance(attn.qkv_proj, expected_qkv) and isinstance(mlp.gate_up_proj, PrepackedLinear)
    assert attn.qkv_proj.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    if which == "sparse":
        assert attn.qkv_proj.density == pytest.approx(0.5, abs=0.02)  # still compressed, not densified
    ids = torch.randint(3, 250, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(fused.model(input_ids=ids).logits, plain.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
