"""The LM head's argmax screen: its bounds hold, and the token it picks is the full head's argmax, bit for bit,
ties included; where it cannot decide it says so and the engine computes the head."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu
from kernels.argmax_screen import (ArgmaxScreen, build_argmax_screen, max_candidates, quantize_activation,
                                   screen_bounds)
from kernels.linear import PrepackedLinear
from sparse_serve.sampling import argmax_rows

needs_avx512 = pytest.mark.skipif(not cpu.avx512_available(), reason="no AVX-512 kernels")


def head(v: int, k: int, seed: int = 0, codable: bool = False) -> torch.Tensor:
    """A [v, k] bf16 weight; ``codable``: magnitudes in [2^-6, 8) (few exponents, so exponent-coded)."""
    w = torch.randn(v, k, generator=torch.Generator().manual_seed(seed)) * (1.0 if codable else 0.05)
    if codable:
        w = torch.where(w.abs() < 2**-6, torch.zeros_like(w), w.clamp(-7.9, 7.9))
    return w.bfloat16()


def activations(m: int, k: int, seed: int, outlier: float = 0.0) -> torch.Tensor:
    """[m, k] bf16 rows like a final norm's output; ``outlier``: channel 3 that many times larger."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, 3] *= max(outlier, 1.0)
    return x.bfloat16()


def test_screen_rows_are_the_weight_rounded_to_int8():
    w = head(37, 70)  # neither whole tiles (16 rows) nor whole 64-column blocks
    screen = build_argmax_screen(w)
    assert isinstance(screen, ArgmaxScreen) and screen.vocab == 37
    assert screen.q.shape == (3, 32, 16, 4) and screen.stats.shape == (6, 48) and screen.qsum.shape == (48,)
    q = screen.rows().double()  # [37, 128]
    scale = screen.stats[0, :37].double()
    assert torch.equal(q[:, 70:], torch.zeros(37, 58, dtype=torch.float64))
    assert (w.double() - scale[:, None] * q[:, :70]).abs().le(scale[:, None] / 2 * (1 + 1e-9)).all()
    assert torch.equal(screen.qsum[:37], screen.rows().sum(dim=1, dtype=torch.int32))
    assert screen.nbytes == 48 * 128 + 48 * 4 + 6 * 48 * 4  # a byte a weight, plus 28 a row


def test_screen_says_why_it_cannot_take_a_weight():
    assert "bfloat16" in build_argmax_screen(torch.randn(8, 16))
    w = head(8, 16)
    w[2, 5] = float("nan")
    assert "non-finite" in build_argmax_screen(w)


@pytest.mark.parametrize("outlier", [1.0, 40.0])
@pytest.mark.parametrize("m", [1, 3])
def test_bounds_hold_the_exact_logits(m, outlier):
    w = head(500, 96, seed=1)
    screen = build_argmax_screen(w)
    for seed in range(5):
        x = activations(m, 96, seed, outlier)
        a, b = screen_bounds(x, screen)
        exact = x.double() @ w.double().T  # [m, 500]
        assert ((exact - a).abs() <= b).all()
        assert (b < 0.2 * exact.abs().amax()).all()  # and they are tight enough to screen with


def test_activations_are_quantized_away_from_their_outliers():
    x = activations(2, 64, seed=0, outlier=100.0)
    xq, sx, outliers = quantize_activation(x)
    assert (outliers == 3).any(dim=1).all()  # the big channel is kept out of the scale
    rest = x.double().scatter(1, outliers, 0.0)
    assert torch.allclose(sx, rest.abs().amax(dim=1) / 127, rtol=1e-6)
    assert (xq.abs() <= 127).all() and (xq.gather(1, outliers) == 0).all()


def exact_weight(packed: cpu.PrepackedDense) -> list[torch.Tensor]:
    coded = packed.coded
    return [coded.low, coded.codes, coded.table] if coded is not None else [packed.rows]


@needs_avx512
@pytest.mark.parametrize("codable, k", [(False, 200), (True, 96)])  # the row-major GEMV; the exponent-coded one
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_screened_argmax_is_the_full_heads(codable, k, m):
    w = head(3000, k, seed=k, codable=codable)
    w[1700] = w[900]  # two equal rows: ties go to the first, as argmax breaks them
    packed = cpu.prepack_dense(w)
    assert (packed.coded is not None) == codable
    screen = build_argmax_screen(w)
    decided = 0
    for seed in range(12):
        x = activations(m, k, seed, outlier=30.0 if seed % 2 else 1.0)
        if seed % 3 == 0:
            x[0] = (w[900].float() * 40).bfloat16()  # row 900 (and 1700) wins row 0
        ids = cpu.extension().screened_argmax(x, screen.q, screen.qsum, screen.stats, exact_weight(packed),
                                              screen.vocab, max_candidates(screen.vocab))
        full = argmax_rows(packed_gemv(x, packed).float())
        if (ids >= 0).all():
            decided += 1
            assert torch.equal(ids, full), (seed, ids, full)
            if seed % 3 == 0:
                assert ids[0] == 900
        else:
            assert (ids < 0).all()
    assert decided >= 10


def packed_gemv(x: torch.Tensor, packed: cpu.PrepackedDense) -> torch.Tensor:
    """The decode GEMV over the whole head, one pass of x's rows: the logits the screen must reproduce."""
    ext = cpu.extension()
    if packed.coded is not None:
        return ext.coded_gemm_decode(x, packed.coded.low, packed.coded.codes, packed.coded.table, None)
    return ext.dense_gemm_decode(x, packed.rows, None)


def prepacked_head(w: torch.Tensor, bias: bool = False) -> PrepackedLinear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    return PrepackedLinear(linear)


@needs_avx512
def test_the_layer_serves_argmax_only_where_the_screen_decides():
    layer = prepacked_head(head(4000, 64, seed=3))
    x = activations(2, 64, seed=4)
    assert layer.argmax(x) is None  # no screen kept yet
    assert layer.enable_argmax_screen() is None
    assert torch.equal(layer.argmax(x), argmax_rows(layer(x).float()))
    rows = min(8, cpu.TUNING.dense_decode_rows(4000, 64))
    assert layer.argmax(activations(rows + 1, 64, seed=5)) is None  # beyond one pass of the decode GEMV
    bad = x.clone()
    bad[1, 7] = float("inf")
    assert layer.argmax(bad) is None  # a non-finite activation: the full head decides (and its NaN rules)
    assert layer.argmax(torch.zeros(1, 64, dtype=torch.bfloat16)) is None  # every logit ties: too many to check
    assert "bias" in prepacked_head(head(64, 64), bias=True).enable_argmax_screen()


@needs_avx512
def test_greedy_engine_steps_pick_tokens_through_the_screen(tiny_model_dir):
    from sparse_serve.config import EngineConfig
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving
    from sparse_serve.sampling_params import SamplingParams

    def answers(screen: bool, **params) -> tuple[list[list[int]], int]:
        served = load_for_serving(tiny_model_dir, dtype=torch.bfloat16, argmax_screen=screen)
        assert served.argmax_screen == ("kept" if screen else "not requested")
        eng = LLMEngine(served.model, eos_token_ids=[2], max_model_len=256, config=EngineConfig(), dtype=torch.bfloat16)
        net, picked = eng.runner.net, []
        head_argmax = net.head_argmax

        def spy(x):
            ids = head_argmax(x)
            picked.append(ids is not None)
            return ids
        net.head_argmax = spy
        # two at a time: a small head's decode GEMV (and so its screen) takes up to two rows
        for i, prompt in enumerate([list(range(3, 40)), list(range(60, 70))]):
            eng.add_request(str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12, **params))
        done = {}
        while eng.has_work():
            for out in eng.step()[0]:
                done[out.request_id] = out.outputs[0].token_ids
        return [done[str(i)] for i in range(2)], sum(picked)

    screened, used = answers(True)
    full, _ = answers(False)
    assert screened == full and used > 0
    assert answers(True, logprobs=2)[1] == 0  # logprobs need the logits: the screen is not asked
    assert answers(True, repetition_penalty=1.3)[1] == 0
