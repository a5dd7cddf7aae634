"""Fixtures for the vLLM plugin tests: a tiny random LLaMA with shapes vLLM's CPU backend takes
(head size 32: its attention kernels support 32, 64, 80, ...), pruned by the project's own CLI into a
FLAP checkpoint and a Wanda 50% sparse one, each exported with ``sparse-compress export --vllm``."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.cli import main
from compress.models.tiny import build_tiny_llama

#: 4 query heads over 2 KV heads (GQA, so FLAP can drop a whole KV group), head size 32
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SMALL_CALIBRATION = ["--set", "calibration.samples=8", "--set", "calibration.seq_len=32"]


def run_cli(*argv: str) -> None:
    assert main(list(argv)) == 0, f"sparse-compress {' '.join(argv)} failed"


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("vllm-tiny") / "tiny", **VLLM_TINY)


@pytest.fixture(scope="session")
def flap_dir(vllm_tiny_dir, tmp_path_factory) -> Path:
    """FLAP at 50% (AL-AM, bias compensation): layers keep different heads (4, 2, 4) and widths, with biases."""
    out = tmp_path_factory.mktemp("flap") / "flap"
    run_cli("flap", str(vllm_tiny_dir), "-o", str(out), "--ratio", "0.5", "--mlp-multiple", "8",
            "--min-mlp-width", "8", "--dtype", "float32", *SMALL_CALIBRATION)
    return out


@pytest.fixture(scope="session")
def sparse_dir(vllm_tiny_dir, tmp_path_factory) -> Path:
    """Wanda 50%, bf16. k_proj and down_proj stay dense, so one model has sparse linears, a dense one
    (vLLM's own path) and a fused q/k/v whose parts are sparse, dense, sparse."""
    out = tmp_path_factory.mktemp("sparse") / "wanda-50"
    run_cli("prune", str(vllm_tiny_dir), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
            "--ignore", r"re:self_attn\.k_proj", r"re:mlp\.down_proj", *SMALL_CALIBRATION)
    return out


@pytest.fixture(scope="session")
def flap_vllm_dir(flap_dir) -> Path:
    run_cli("export", str(flap_dir), "-o", str(flap_dir.with_name("flap-vllm")), "--vllm")
    return flap_dir.with_name("flap-vllm")


@pytest.fixture(scope="session")
def sparse_vllm_dir(sparse_dir) -> Path:
    run_cli("export", str(sparse_dir), "-o", str(sparse_dir.with_name("wanda-50-vllm")), "--vllm")
    return sparse_dir.with_name("wanda-50-vllm")
