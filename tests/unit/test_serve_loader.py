"""Serving loads sparse linears onto the sparse kernels and answers like the dense model."""

from __future__ import annotations

import pytest
import torch

from compress.checkpoint import save_checkpoint
from compress.sparsity.prune import prune_model
from compress.sparsity.recipe import parse_recipe
from kernels.linear import SparseLinear
from sparse_serve.cli import main
from sparse_serve.loader import load_for_serving


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    recipe = parse_recipe({"method": "magnitude", "sparsity": 0.6,
                           "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2}})
    prune_model(model, tiny_tokenizer, recipe, progress=False)
    out = tmp_path_factory.mktemp("serve") / "sparse"
    save_checkpoint(model, tiny_tokenizer, out)
    return out


def test_sparse_linears_run_on_kernels_and_match_dense(sparse_dir):
    sparse = load_for_serving(sparse_dir)
    dense = load_for_serving(sparse_dir, dense=True)
    assert len(sparse.sparse_linears) == 3 * 4  # o, down and the fused q/k/v and gate/up of each layer
    assert len(load_for_serving(sparse_dir, fuse=False).sparse_linears) == 3 * 7  # every decoder linear
    assert isinstance(sparse.model.get_submodule(sparse.sparse_linears[0]), SparseLinear)
    assert not dense.sparse_linears
    ids = torch.randint(3, 200, (2, 13))
    with torch.no_grad():
        a = sparse.model(input_ids=ids).logits.float()
        b = dense.model(input_ids=ids).logits.float()
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_forced_kernel_reaches_every_layer(sparse_dir):
    served = load_for_serving(sparse_dir, kernel="reference")
    kernels = {served.model.get_submodule(name).kernel.name for name in served.sparse_linears}
    assert kernels == {"reference"}


def test_cli_answers_and_names_a_bad_kernel(sparse_dir, capsys):
    for flags in ([], ["--dense"]):
        assert main([str(sparse_dir), "--prompt", "hi", "--max-tokens", "4", *flags]) == 0
    capsys.readouterr()
    assert main([str(sparse_dir), "--prompt", "hi", "--kernel", "no-such"]) == 2
    assert "no-such" in capsys.readouterr().err


def test_cli_names_a_missing_or_unsupported_model_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "neither a local checkpoint directory nor a bundled model" in capsys.readouterr().err
    assert main([str(tmp_path), "--port", "0"]) == 2  # a directory without config.json: no server starts
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("dense", [False, True])
def test_huge_pages_hold_every_streamed_weight_and_change_no_logit(sparse_dir, dense):
    from kernels.hugepages import why_no_huge_pages
    from kernels.linear import decode_weights

    placed = load_for_serving(sparse_dir, dense=dense)
    plain = load_for_serving(sparse_dir, dense=dense, huge_pages=False)
    assert plain.huge_pages == "not requested"
    if why_no_huge_pages():
        assert placed.huge_pages == why_no_huge_pages()
        return
    arena = placed.huge_pages
    memory = torch.frombuffer(arena.mapping, dtype=torch.uint8)
    lo, hi = memory.data_ptr(), memory.data_ptr() + memory.numel()
    weights = decode_weights(placed.model)
    assert weights and all(lo <= w.data_ptr() < hi for w in weights)
    assert not any(lo <= w.data_ptr() < hi for w in decode_weights(plain.model))
    ids = torch.randint(3, 200, (2, 13))
    with torch.no_grad():
        assert torch.equal(placed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
