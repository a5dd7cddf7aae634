"""Pruning the real model end to end through the CLI: a small Wanda run that must keep SmolLM2
a working language model, written as a sparse checkpoint that serves."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

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
