"""The compiled decoder stack (kernels/cpu/decoder.cpp): decode steps through it give the logits of the
Python loop over the same kernels bit for bit, for a dense, a sparse and a structurally pruned model
(bf16, the tiny model), and it stays off where some part of the model has no compiled form."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu

from kernels.cpu import avx512_available, avx512_unavailable_reason
from sparse_serve.config import EngineConfig
from sparse_serve.engine import LLMEngine
from sparse_serve.loader import load_for_serving
from sparse_serve.models.llama import ENV_DECODER
from sparse_serve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not avx512_available(), reason=f"no AVX-512 kernels: {avx512_unavailable_reason()}")


class Counting:
    """The compiled decoder, counting its runs (to show a step went through it)."""

    def __init__(self, decoder):
        self.decoder, self.max_rows, self.runs = decoder, decoder.max_rows, 0

    def run(self, *args):
        self.runs += 1
        return self.decoder.run(*args)


def engine(path, monkeypatch, decoder: str) -> LLMEngine:
    monkeypatch.setenv(ENV_DECODER, decoder)
    model = load_for_serving(path, dtype=torch.bfloat16).model
    return LLMEngine(model, eos_token_ids=[2], max_model_len=128, config=EngineConfig(), dtype=torch.bfloat16)


def step_logits(eng: LLMEngine, prompts: list[list[int]], tokens: int) -> list[torch.Tensor]:
    """The logits of every step while ``prompts`` decode ``tokens`` greedy tokens each."""
    logits, execute = [], eng.runner.execute
    eng.runner.execute = lambda chunks, argmax=False: logits.append(execute(chunks)) or logits[-1]  # logits, always
    for i, prompt in enumerate(prompts):
        eng.add_request(str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=tokens))
    while eng.has_work():
        eng.step()
    return logits


def checkpoint(kind: str, tiny_model_dir, pruned_dirs):
    return tiny_model_dir if kind == "dense" else pruned_dirs / kind


@pytest.mark.parametrize("kind, sequences", [("dense", 1), ("dense", 5), ("sparse", 1), ("sparse", 5),
                                             ("pruned", 1), ("pruned", 5)])
def test_decode_steps_equal_the_python_loop(tiny_model_dir, pruned_dirs, monkeypatch, kind, sequences):
    path = checkpoint(kind, tiny_model_dir, pruned_dirs)
    compiled, python = engine(path, monkeypatch, "compiled"), engine(path, monkeypatch, "python")
    assert python.runner.net.compiled is None
    counter = compiled.runner.net.compiled = Counting(compiled.runner.net.compiled)
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(sequences)]  # different lengths
    got, want = step_logits(compiled, prompts, 12), step_logits(python, prompts, 12)
    assert counter.runs >= 10  # every pure decode step (the prefills take the Python loop)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_rows_beyond_the_linears_take_the_python_loop(tiny_model_dir, monkeypatch):
    """The dense GEMV takes up to ``TUNING.dense_decode_rows`` rows (two on the tiny model's narrow weights)
    and the blocked GEMM on oneDNN's prepacked weight up to ``blocked_gemm_max_rows`` (three here), so a dense
    model's decoder runs steps of up to three sequences, the third row through the blocked GEMM; four
    decoding together go through the Python loop. Both match the Python loop."""
    monkeypatch.setattr(cpu.TUNING, "blocked_gemm_max_rows", 3)
    compiled, python = engine(tiny_model_dir, monkeypatch, "compiled"), engine(tiny_model_dir, monkeypatch, "python")
    assert cpu.TUNING.dense_decode_max_rows == 2 and compiled.runner.net.compiled.max_rows == 3
    counter = compiled.runner.net.compiled = Counting(compiled.runner.net.compiled)
    three = [list(range(5, 20)), list(range(9, 30)), list(range(40, 52))]
    got, want = step_logits(compiled, three, 6), step_logits(python, three, 6)
    assert counter.runs == 5  # every decode step of the three sequences (the prefill step gives the first token)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    four = three + [list(range(60, 71))]
    got, want = step_logits(compiled, four, 6), step_logits(python, four, 6)
    assert counter.runs == 5  # none more: four rows are beyond the blocked GEMM's three
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sparse_rows_past_the_decode_kernel_stay_compiled(pruned_dirs, monkeypatch):
    """A sparse linear hands the rows past the decode kernel's to the panels (or, for a weight with few nonzero
    column pairs, the pair gather) inside the compiled decoder: with the decode kernel at two rows, steps of
    five sequences still run compiled, equal to the Python loop."""
    monkeypatch.setattr(cpu.TUNING, "decode_max_rows", 2)
    compiled, python = (engine(pruned_dirs / "sparse", monkeypatch, way) for way in ("compiled", "python"))
    assert compiled.runner.net.compiled.max_rows >= min(cpu.TUNING.panels_max_rows, cpu.TUNING.pairs_max_rows)
    counter = compiled.runner.net.compiled = Counting(compiled.runner.net.compiled)
    prompts = [list(range(3 + i, 30 + 5 * i)) for i in range(5)]
    got, want = step_logits(compiled, prompts, 8), step_logits(python, prompts, 8)
    assert counter.runs >= 6
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_run_names_the_rows_it_takes(tiny_model_dir, monkeypatch):
    decoder = engine(tiny_model_dir, monkeypatch, "compiled").runner.net.compiled
    rows = decoder.max_rows + 1
    h = torch.zeros(rows, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"takes 1 to {rows - 1} rows, got {rows}"):
        decoder.run(h, h, h, torch.zeros(rows, dtype=torch.long), torch.zeros(rows, 1, dtype=torch.long),
                    torch.ones(rows, dtype=torch.long), [])


def test_off_where_a_part_has_no_compiled_form(tiny_model_dir, monkeypatch):
    def compiled(**env) -> object:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        model = load_for_serving(tiny_model_dir, dtype=torch.bfloat16).model
        return LLMEngine(model, [2], 64, EngineConfig(), torch.bfloat16).runner.net.compiled

    assert compiled() is not None
    assert compiled(SPARSE_SERVE_FUSED_OPS="torch") is None  # the reference layer ops
    monkeypatch.delenv("SPARSE_SERVE_FUSED_OPS")
    float32 = load_for_serving(tiny_model_dir, dtype=torch.float32).model  # no float32 decode kernels
    assert LLMEngine(float32, [2], 64, EngineConfig(), torch.float32).runner.net.compiled is None
    gelu = load_for_serving(tiny_model_dir, dtype=torch.bfloat16).model
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert LLMEngine(gelu, [2], 64, EngineConfig(), torch.bfloat16).runner.net.compiled is None
    with pytest.raises(ValueError, match="choose one of compiled, python"):
        compiled(SPARSE_SERVE_DECODER="cpp")


def test_rotary_table_is_the_module_and_falls_back_beyond_it(tiny_model_dir):
    """cos/sin from the table equal the rotary module's at any positions, also past the table's end."""
    from sparse_serve.models.llama import _Rotary

    model = load_for_serving(tiny_model_dir, dtype=torch.bfloat16).model
    module = model.model.rotary_emb
    rotary = _Rotary(module, torch.bfloat16)
    assert rotary.table is not None
    n = rotary.table[0].shape[0]
    h = torch.zeros(3, 96, dtype=torch.bfloat16)
    for positions in (torch.tensor([0, 5, 77]), torch.tensor([1, n - 1, n + 3])):
        cos, sin = rotary(h, positions)
        want_cos, want_sin = module(h.unsqueeze(0), positions.unsqueeze(0))
        assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
