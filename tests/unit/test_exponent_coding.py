"""Exponent-coded dense weights (kernels/exponent_coding.py, coded_gemm_decode): the coding is lossless, the
coded decode GEMV gives the plain GEMV's output bit for bit, the dense path takes it wherever a weight can be
coded, and a model whose weights can be decodes exactly as with them plain, through the compiled decoder too."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import kernels.cpu as cpu
from kernels.exponent_coding import code_exponents, decode_exponents
from kernels.linear import PrepackedLinear
from sparse_serve.config import EngineConfig
from sparse_serve.engine import LLMEngine
from sparse_serve.loader import load_for_serving
from sparse_serve.models.llama import ENV_DECODER
from sparse_serve.sampling_params import SamplingParams

needs_avx512 = pytest.mark.skipif(not cpu.avx512_available(), reason="no AVX-512 kernels")


def narrow(w: torch.Tensor) -> torch.Tensor:
    """``w`` with its magnitudes in [2^-6, 8) or zero: at most 10 exponents, so codable."""
    w = w.clamp(-7.9, 7.9)
    return torch.where(w.abs() < 2**-6, torch.zeros_like(w), w)


def codable(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return narrow(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).bfloat16()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("n, k", [(1, 32), (17, 64), (33, 576), (5000, 96)])
def test_coding_is_lossless(n, k):
    w = codable(n, k, seed=n)
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39])  # zeros and subnormals (exponent 0) keep their bits
    coded = code_exponents(w)
    assert coded is not None
    assert coded.shape == (n, k) and coded.nbytes == n * k * 3 // 2 + 16  # 12 bits a weight and the table
    assert torch.equal(bits(decode_exponents(coded)), bits(w))


def test_weights_it_cannot_code_exactly_are_left_plain():
    wide = torch.randn(256, 256).bfloat16() * torch.logspace(-12, 12, 256, base=2)  # ~40 exponents
    assert code_exponents(wide) is None
    assert code_exponents(codable(4, 48)) is None  # K not a multiple of 32
    assert code_exponents(codable(4, 64).float()) is None  # not bf16
    assert code_exponents(codable(4, 64)[0]) is None  # not a matrix


@needs_avx512
@pytest.mark.parametrize("n, k", [(1, 32), (17, 64), (129, 576)])
@pytest.mark.parametrize("m", [1, 2, 8, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_coded_gemv_is_the_plain_gemv_bit_for_bit(n, k, m, with_bias):
    w = codable(n, k, seed=k)
    coded = code_exponents(w)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    ext = cpu.extension()
    got = ext.coded_gemm_decode(x, coded.low, coded.codes, coded.table, bias)
    assert torch.equal(bits(got), bits(ext.dense_gemm_decode(x, w, bias)))
    assert not got.isnan().any()


@needs_avx512
def test_coded_gemv_names_bad_input():
    coded = code_exponents(codable(8, 64))
    ext = cpu.extension()
    with pytest.raises(RuntimeError, match="low must be contiguous uint8"):
        ext.coded_gemm_decode(torch.randn(1, 32).bfloat16(), coded.low, coded.codes, coded.table, None)
    with pytest.raises(RuntimeError, match="table must be contiguous uint8"):
        ext.coded_gemm_decode(torch.randn(1, 64).bfloat16(), coded.low, coded.codes, coded.table[:8], None)


@needs_avx512
def test_dense_path_takes_the_coded_gemv_where_it_can(monkeypatch):
    w, bias = codable(40, 96), torch.randn(40).bfloat16()
    packed = cpu.prepack_dense(w)
    assert packed.coded is not None and packed.rows is None  # the plain copy is not kept
    linear = torch.nn.Linear(96, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    assert "gemv=coded" in repr(PrepackedLinear(linear))
    monkeypatch.setattr(cpu.TUNING, "code_exponents", False)
    plain = cpu.prepack_dense(w)
    assert plain.coded is None and plain.rows is not None
    for m in (1, 2, 3):  # the GEMV up to two rows, the blocked GEMM (or oneDNN) above
        x = torch.randn(m, 96).bfloat16()
        want = cpu.dense_linear(x, plain, bias)
        assert torch.equal(bits(cpu.dense_linear(x, packed, bias)), bits(want))
        assert torch.equal(bits(cpu.bind_dense(packed, bias)(x)), bits(want))
    native = cpu.native_dense(packed, bias)
    gemv_rows = cpu.TUNING.dense_decode_rows(*packed.shape)
    assert native is not None
    assert native.max_rows == (cpu.TUNING.blocked_gemm_max_rows if packed.pairs is not None else gemv_rows)
    for m in (1, gemv_rows, gemv_rows + 1):  # the coded GEMV, then the blocked GEMM on the prepacked weight
        x = torch.randn(m, 96).bfloat16()
        assert torch.equal(bits(native(x)), bits(cpu.dense_linear(x, plain, bias)))


@pytest.fixture(scope="module")
def codable_model_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """The tiny model with every weight matrix's magnitudes narrowed (module ``narrow``), so all are codable."""
    from compress.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(narrow(p * 8))
    path = tmp_path_factory.mktemp("codable") / "tiny"
    save_checkpoint(model, tiny_tokenizer, path)
    return path


def greedy_logits(path, monkeypatch, decoder: str, coded: bool) -> tuple[list[torch.Tensor], int]:
    """Every step's logits of two greedy requests, and how many linears decode from coded weights."""
    monkeypatch.setenv(ENV_DECODER, decoder)
    monkeypatch.setattr(cpu.TUNING, "code_exponents", coded)
    model = load_for_serving(path, dtype=torch.bfloat16).model
    n_coded = sum(isinstance(m, PrepackedLinear) and m.packed.coded is not None for m in model.modules())
    eng = LLMEngine(model, eos_token_ids=[2], max_model_len=128, config=EngineConfig(), dtype=torch.bfloat16)
    assert (eng.runner.net.compiled is not None) == (decoder == "compiled")
    logits, execute = [], eng.runner.execute
    eng.runner.execute = lambda chunks, argmax=False: logits.append(execute(chunks)) or logits[-1]  # logits, always
    for i, prompt in enumerate([list(range(3, 30)), list(range(10, 50))]):
        eng.add_request(str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10))
    while eng.has_work():
        eng.step()
    return logits, n_coded


@needs_avx512
@pytest.mark.parametrize("decoder", ["compiled", "python"])
def test_a_codable_model_decodes_as_with_plain_weights(codable_model_dir, monkeypatch, decoder):
    got, n_coded = greedy_logits(codable_model_dir, monkeypatch, decoder, coded=True)
    want, n_plain = greedy_logits(codable_model_dir, monkeypatch, decoder, coded=False)
    assert n_coded > 0 and n_plain == 0  # the LM head and the fused decoder linears
    assert len(got) == len(want) >= 10
    for g, w in zip(got, want):
        assert torch.equal(g, w)
