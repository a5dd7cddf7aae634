"""Pruning the real model end to end through the CLI: a small Wanda run that must keep SmolLM2
a working language model, written as a sparse checkpoint that serves."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from compress.checkpoint import load_manifest

pytestmark = pytest.mark.slow


def run(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "compress.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_wanda_50_keeps_smollm2_working(smollm2_dir, tmp_path):
    dense = last_json(run("eval", str(smollm2_dir), "--seq-len", "256", "--max-windows", "4", "--no-store"))
    out = tmp_path / "wanda50"
    summary = last_json(run("prune", str(smollm2_dir), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
                            "--allocation", "owl", "--set", "calibration.samples=8",
                            "--set", "calibration.seq_len=256"))
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.002)
    sparse = last_json(run("eval", str(out), "--seq-len", "256", "--max-windows", "4"))
    ratio = sparse["perplexity"]["ppl"] / dense["perplexity"]["ppl"]
    assert math.isfinite(ratio) and 1.0 < ratio < 3.0  # pruned, but still a language model
    manifest = load_manifest(out)
    assert manifest.extra["prune_report"]["allocation"]["name"] == "owl"
    assert "perplexity/eval@256" in manifest.evaluation
    answer = subprocess.run([sys.executable, "-m", "sparse_serve.cli", str(out), "--prompt",
                             "What is the capital of France?", "--max-tokens", "16"],
                            capture_output=True, text=True, check=True).stdout
    assert answer.strip()


def test_offloaded_prune_of_smollm2_is_bit_identical(smollm2_dir, tmp_path):
    from safetensors.torch import load_file

    common = ["--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "atp", "--set", "atp.beta=0.01",
              "--set", "calibration.samples=4", "--set", "calibration.seq_len=128"]
    run("prune", str(smollm2_dir), "-o", str(tmp_path / "memory"), *common)
    run("prune", str(smollm2_dir), "-o", str(tmp_path / "offload"), "--offload", *common)
    in_memory = load_file(str(tmp_path / "memory" / "model.safetensors"))
    offloaded = load_file(str(tmp_path / "offload" / "model.safetensors"))
    assert in_memory.keys() == offloaded.keys()
    assert any(name.endswith(".bitmask") for name in offloaded)
    for name, tensor in in_memory.items():
        assert torch.equal(tensor, offloaded[name]), name
