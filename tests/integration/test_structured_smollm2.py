"""FLAP on the real model: SmolLM2 (GQA, 3 query heads per KV head, MLP 1536) pruned by 30% keeps
whole KV groups and widths that are multiples of 32, round-trips bit-exactly through the checkpoint,
and sparse-serve answers from it with the same greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch

from compress.adapter import get_adapter
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.structured.flap import structured_prune
from compress.structured.recipe import FlapRecipe

pytestmark = pytest.mark.slow


def test_flap_smollm2_structure_round_trip_and_serving(smollm2_dir, tmp_path):
    from sparse_serve.config import CacheConfig, EngineConfig
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving
    from sparse_serve.sampling_params import SamplingParams

    loaded = load_checkpoint(smollm2_dir, dtype=torch.bfloat16)
    model, tok = loaded.model, loaded.tokenizer
    recipe = FlapRecipe(ratio=0.3, calibration={"samples": 32, "seq_len": 128, "batch_size": 16})
    report = structured_prune(model, tok, recipe, progress=False)
    assert abs(report.achieved_ratio - 0.3) < 0.01
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        s = adapter.layer_structure(i)
        assert s.num_heads == 3 * s.num_kv_heads and s.num_kv_heads >= 1
        assert s.intermediate_size % 32 == 0 and s.o_proj_bias and s.down_proj_bias
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_checkpoint(model, tok, tmp_path / "flap", recipe=recipe.model_dump())
    reloaded = load_checkpoint(tmp_path / "flap", dtype=torch.bfloat16).model
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        hf = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    serving = load_for_serving(tmp_path / "flap", dtype=torch.bfloat16)
    assert serving.facts["structured"] and serving.variant == "pruned"
    engine = LLMEngine(serving.model, set(), 64, EngineConfig(cache=CacheConfig(kv_cache_gb=0.05)), torch.bfloat16)
    engine.add_request("r", ids[0].tolist(), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = []
    while engine.has_work():
        for out in engine.step()[0]:
            tokens = out.outputs[0].token_ids
    assert len(tokens) == 8 and tokens[:4] == hf[:4]  # bf16 sums in another order may differ late
