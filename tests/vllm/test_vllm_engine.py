"""Real vLLM (CPU) with the sparse_vllm plugin against the project's reference forward (transformers
through ``compress.checkpoint.load_checkpoint``), on checkpoints the project's own CLI pruned and exported:

* float32, vLLM's offline ``LLM``: greedy outputs of a FLAP checkpoint (per-layer heads, KV heads, MLP
  widths, o_proj / down_proj biases) and of a Wanda 50% checkpoint (sparse linears, a dense down_proj, a
  fused q/k/v whose k part is dense) equal the reference token for token;
* bf16, ``python -m vllm.entrypoints.openai.api_server`` queried with the official ``openai`` client: the
  Wanda checkpoint's sparse linears run on the project's AVX-512 kernel (where the CPU has it), and every
  generated token is the reference's bf16 argmax, or one whose reference logit is within bf16 rounding of
  it (two engines that sum in different orders may break a bf16 tie either way; steps are teacher-forced so
  each is checked, and at most 10% may need that allowance).

One engine start per test (30-110 s each). Marked ``vllm``; skipped where vLLM is not installed (``make
test`` in .venv); ``make test-vllm`` runs them in .venv-vllm.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# "vllm.version", not "vllm": without vLLM installed, this very directory (tests/vllm, on sys.path through the
# rootdir conftest) would import as an empty namespace package named vllm
pytest.importorskip("vllm.version", reason="vLLM is not installed in this environment; `make test-vllm` runs "
                                           "these tests in their own venv (.venv-vllm)")

from compress.checkpoint import load_checkpoint  # noqa: E402
from sparse_vllm import ARCHITECTURE, QUANT_METHOD  # noqa: E402

pytestmark = pytest.mark.vllm

HERE = Path(__file__).parent
MAX_TOKENS = 16
#: token-id prompts of different lengths (byte-level tokenizer: ids 3..258 are bytes)
PROMPTS = [[1, 72, 105, 33], [1, *range(40, 75)], [1, 200, 17, 99, 3, 250, 11]]
ENGINE_START_S = 600


def reference_greedy(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuation by the project's reference forward (full recompute every step, no KV cache)."""
    model = load_checkpoint(model_dir, dtype=dtype).model
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(steps):
                next_id = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            out.append(ids[0, len(prompt):].tolist())
    return out


def vllm_env() -> dict[str, str]:
    """The environment for a vLLM CPU process: a 1 GiB KV cache unless the caller chose."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def test_plugin_registers_once_and_claims_sparse_bitmask_checkpoints():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import get_quantization_config

    import sparse_vllm
    from sparse_vllm.linear_method import SparseBitmaskConfig

    assert "sparse_vllm" in {ep.name for ep in entry_points(group="vllm.general_plugins")}
    sparse_vllm.register()
    sparse_vllm.register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert get_quantization_config(QUANT_METHOD) is SparseBitmaskConfig
    ours = {"quant_method": QUANT_METHOD, "format": "sparse-bitmask"}
    compressed_tensors = {"quant_method": "compressed-tensors", "format": "dense",
                          "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"]}}
    quantized = dict(compressed_tensors, config_groups={"group_0": {}})
    assert SparseBitmaskConfig.override_quantization_method(ours, None) == QUANT_METHOD
    assert SparseBitmaskConfig.override_quantization_method(compressed_tensors, None) == QUANT_METHOD
    assert SparseBitmaskConfig.override_quantization_method(quantized, None) is None
    assert SparseBitmaskConfig.override_quantization_method(compressed_tensors, "fp8") is None


def test_unexported_checkpoint_resolves_to_the_plugin_with_hf_overrides(sparse_dir, sparse_vllm_dir):
    """The original checkpoint (compressed-tensors sparsity block) needs only its architecture overridden."""
    from vllm.config import ModelConfig

    import sparse_vllm

    sparse_vllm.register()
    original = ModelConfig(model=str(sparse_dir), dtype="bfloat16", hf_overrides={"architectures": [ARCHITECTURE]})
    exported = ModelConfig(model=str(sparse_vllm_dir), dtype="bfloat16")
    assert original.quantization == exported.quantization == QUANT_METHOD
    assert original.architectures == exported.architectures == [ARCHITECTURE]


@pytest.mark.timeout(ENGINE_START_S + 300)
@pytest.mark.parametrize("name", ["flap", "sparse"])
def test_greedy_in_float32_equals_reference_token_for_token(name, request, tmp_path):
    """float32 leaves no rounding room: every token must be the reference's. (The sparse linears run on
    ``cpu_dense`` here, the AVX-512 kernel being bf16-only; the bf16 server test below covers it.)"""
    source, exported = request.getfixturevalue(f"{name}_dir"), request.getfixturevalue(f"{name}_vllm_dir")
    out = tmp_path / "tokens.json"
    cmd = [sys.executable, str(HERE / "vllm_generate.py"), str(exported), "--prompts", json.dumps(PROMPTS),
           "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--out", str(out)]
    done = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=ENGINE_START_S + 240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    got = json.loads(out.read_text())["token_ids"]
    assert got == reference_greedy(source, torch.float32, PROMPTS, MAX_TOKENS)


@pytest.fixture()
def sparse_server(sparse_vllm_dir, free_port, tmp_path):
    """vLLM's OpenAI server on 127.0.0.1 serving the exported Wanda checkpoint in bf16; its log path."""
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(sparse_vllm_dir),
           "--served-model-name", "tiny-wanda-50", "--host", "127.0.0.1", "--port", str(free_port),
           "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--seed", "0"]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=vllm_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{free_port}", proc, log)
        yield f"http://127.0.0.1:{free_port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + ENGINE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"the vLLM server did not become healthy in {ENGINE_START_S} s:\n{log.read_text()[-6000:]}")


def bf16_ulp(value: float) -> float:
    """The spacing of bfloat16 numbers at ``value`` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - 7)


def check_bf16_greedy(model_dir: Path, prompts: list[list[int]], outputs: list[list[int]], ulps: int = 4) -> int:
    """Teacher-forced check of bf16 greedy outputs against the reference forward in bf16: at every step the
    output token must be the reference's argmax, or - where two engines that round differently may pick
    either - have a reference logit within ``ulps`` bf16 steps of the maximum. Returns how many steps
    needed that allowance (every other step matched exactly)."""
    model = load_checkpoint(model_dir, dtype=torch.bfloat16).model
    near_ties = 0
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()  # [steps, V]
            for step, (row, token) in enumerate(zip(logits, output)):
                best = float(row.max())
                if int(row.argmax()) == token:
                    continue
                near_ties += 1
                assert float(row[token]) >= best - ulps * bf16_ulp(best), (
                    f"prompt {prompt}, step {step}: vLLM chose {token} (reference logit {float(row[token]):.4f}) "
                    f"but the reference's best is {int(row.argmax())} ({best:.4f}), beyond bf16 rounding")
    return near_ties


@pytest.mark.timeout(ENGINE_START_S + 300)
def test_sparse_checkpoint_served_by_vllm_equals_reference(sparse_server, sparse_dir):
    from openai import OpenAI

    from kernels.cpu import avx512_available

    url, log = sparse_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-wanda-50"]
    reply = client.completions.create(model="tiny-wanda-50", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    got = [choice.token_ids for choice in sorted(reply.choices, key=lambda c: c.index)]
    assert [len(ids) for ids in got] == [MAX_TOKENS] * len(PROMPTS)
    assert reply.usage.completion_tokens == MAX_TOKENS * len(PROMPTS)
    near_ties = check_bf16_greedy(sparse_dir, PROMPTS, got)
    print(f"bf16: {near_ties} of {len(PROMPTS) * MAX_TOKENS} steps took a token within bf16 rounding of the best")
    assert near_ties <= len(PROMPTS) * MAX_TOKENS // 10, f"{near_ties} steps differ from the reference's argmax"

    chat = client.chat.completions.create(model="tiny-wanda-50", messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    expected_kernel = "cpu_avx512" if avx512_available() else "cpu_dense"
    assert f"sparse-bitmask linears run on kernel {expected_kernel}" in log.read_text()
