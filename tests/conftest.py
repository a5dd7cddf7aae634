"""Shared fixtures: a tiny random LLaMA (no download) and, for tests marked
``slow``, the bundled SmolLM2 checkpoint and text (built once into the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; Triton reads this once, when it
# is imported, and transformers imports it (through torch._dynamo) below - so set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from compress.models.tiny import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compiled_extensions() -> None:
    """Compile the C++ extensions once, up front (a fresh machine takes about a minute each), so no
    test that starts a server subprocess spends its startup timeout compiling; both are cached on disk."""
    from kernels import cpu, fused

    cpu.extension()
    fused.extension()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a deterministic tiny LLaMA checkpoint (GQA, byte tokenizer)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh fp32 copy of the tiny model, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct checkpoint (converted once into the cache)."""
    from compress.models.registry import fetch_model

    return fetch_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of SmolLM2 in bf16, shared by the integration tests (do not modify)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture()
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (servers in tests bind loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_server_url(tiny_model_dir):
    """Base URL of a real sparse-serve server (uvicorn and the engine in threads of this process) serving
    the tiny model on 127.0.0.1, shared by the load-test and deploy tests; stopped at the end."""
    import asyncio
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from sparse_serve.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
    from sparse_serve.server import DrainingServer, build_app, load_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = load_state(ModelConfig(model=str(tiny_model_dir), dtype="float32", max_model_len=2048, variant="tiny"),
                       EngineConfig(cache=CacheConfig(num_blocks=512)), ServerConfig(port=port, log_level="warning"))
    state.engine.start()
    server = DrainingServer(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"), state)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "the tiny server did not become healthy"
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        asyncio.run(state.engine.shutdown(0))


@pytest.fixture(scope="session")
def pruned_dirs(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    """A 60%-sparse (kept compressed on load) and a structurally pruned (fewer heads, narrower MLP,
    o_proj/down_proj biases in two layers) copy of the tiny model: ``<root>/sparse``, ``<root>/pruned``."""
    from compress.adapter import LayerStructure, get_adapter
    from compress.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("engine")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name and name.endswith("proj.weight"):
                p.mul_(p.abs() > p.abs().quantile(0.6, dim=1, keepdim=True))
    save_checkpoint(model, tiny_tokenizer, root / "sparse")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    adapter = get_adapter(model)
    for index in (0, 2):
        adapter.resize_layer(index, LayerStructure(num_heads=2, num_kv_heads=1, head_dim=adapter.head_dim,
                                                   intermediate_size=32, o_proj_bias=True, down_proj_bias=True))
    save_checkpoint(model, tiny_tokenizer, root / "pruned")
    return root
