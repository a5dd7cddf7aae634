"""Integration tests on the real bundled model (SmolLM2-135M-Instruct) and text."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.data.tasks import load_task
from compress.data.text import eval_token_ids
from compress.eval.perplexity import perplexity, windows_of
from compress.eval.zeroshot import evaluate_task, score_requests
from compress.models.registry import STAMP, _verify, fetch_model

pytestmark = pytest.mark.slow


def test_gguf_conversion_answers_paris(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "sparse_serve.cli", str(smollm2_dir), "--prompt",
                          "What is the capital of France?", "--max-tokens", "20"],
                         capture_output=True, text=True, check=True)
    assert "Paris" in out.stdout


def test_converted_checkpoint_is_a_normal_hf_checkpoint(smollm2_dir, smollm2):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["num_key_value_heads"] == 3 and config["num_hidden_layers"] == 30
    _, tok = smollm2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (smollm2_dir / "model.safetensors").is_file()


def test_fetch_is_idempotent_and_verified(smollm2_dir):
    stamp = json.loads((smollm2_dir / STAMP).read_text())
    assert "model.safetensors" in stamp["files"]
    assert fetch_model("smollm2-135m-instruct") == smollm2_dir  # verified copy, no rebuild
    assert _verify(smollm2_dir)


def test_perplexity_on_fixed_slice_equals_transformers(smollm2):
    model, tok = smollm2
    ids = eval_token_ids(tok)
    result = perplexity(model, ids, seq_len=256, max_windows=3, progress=False)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows_of(ids, 256, 3)]
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=2e-3)
    assert 5 < result.ppl < 60  # a working model on Wikipedia, not noise (vocab 49152)


def test_piqa_scoring_matches_direct_computation(smollm2_dir, smollm2):
    # fp32: batched (padded) and one-at-a-time forwards then agree to rounding; bf16 differs by ~0.5%
    _, tok = smollm2
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    items = load_task("piqa", limit=6)
    result = evaluate_task(model, tok, "piqa", limit=6, batch_size=4, progress=False)
    correct = 0
    for item in items:
        direct = []
        for ctx, cont in zip(item.contexts, item.continuations):
            c = tok(ctx, add_special_tokens=False).input_ids
            whole = tok(ctx + cont, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            direct.append(float(sum(logp[i - 1, whole[i]] for i in range(len(c), len(whole)))))
        batched = score_requests(model, tok, list(zip(item.contexts, item.continuations)), progress=False)
        assert [s.logprob for s in batched] == pytest.approx(direct, rel=1e-4, abs=1e-3)
        correct += int(max(range(len(direct)), key=direct.__getitem__) == item.label)
    assert result.acc == pytest.approx(correct / len(items))
