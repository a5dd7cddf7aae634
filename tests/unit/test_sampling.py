"""sparse_serve.sampling: greedy == argmax, seeded reproducibility, truncation, penalties, bans, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_serve.sampling import (
    SamplingRow,
    apply_min_p_,
    apply_penalties_,
    apply_top_k_,
    apply_top_p_,
    inverse_cdf_sample,
    make_generator,
    sample,
)
from sparse_serve.sampling_params import SamplingParams

V = 64
EOS = (3,)


def _logits(b: int, v: int = V, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * 3).to(dtype)


def _row(seed: int | None = None, index: int = 0, prompt=(), output=(), **kw) -> SamplingRow:
    params = SamplingParams(seed=seed, **kw).validate()
    return SamplingRow(params, list(prompt), list(output), make_generator(seed, index))


def _draws(logits_row: torch.Tensor, row_factory, steps: int) -> list[int]:
    """Tokens from ``steps`` calls with one row whose generator persists across calls."""
    row = row_factory()
    return [sample(logits_row[None], [row], EOS).token_ids[0] for _ in range(steps)]


# --- greedy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [1, 7])
def test_greedy_equals_argmax(b, dtype):
    logits = _logits(b, dtype=dtype)
    before = logits.clone()
    out = sample(logits, [_row(temperature=0.0) for _ in range(b)], EOS)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * b
    assert torch.equal(logits, before)  # the sampler never writes into the engine's logits


def test_greedy_ties_take_lowest_index():
    logits = torch.zeros(2, 10)
    logits[0, [4, 7]] = 5.0
    logits[1, [2, 9]] = 1.0
    processed = _row(temperature=0.0, presence_penalty=0.5, output=[0])  # the penalized (float32 copy) path
    out = sample(logits, [_row(temperature=0.0), processed], EOS)
    assert out.token_ids == [4, 2]


def test_greedy_rows_in_mixed_batch_equal_argmax():
    logits = _logits(6)
    rows = [_row(temperature=0.0) if b % 2 == 0 else _row(seed=b, temperature=1.0) for b in range(6)]
    out = sample(logits, rows, EOS)
    assert [out.token_ids[b] for b in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


# --- seeded randomness ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    logits = _logits(1)[0] / 3  # flat enough that draws vary
    a = _draws(logits, lambda: _row(seed=1234, temperature=1.0), 30)
    b = _draws(logits, lambda: _row(seed=1234, temperature=1.0), 30)
    c = _draws(logits, lambda: _row(seed=4321, temperature=1.0), 30)
    assert a == b
    assert len(set(a)) > 3  # really random, not argmax
    assert a != c


def test_seeded_row_independent_of_batch_composition():
    logits = _logits(1, seed=1) / 3
    params = dict(temperature=0.8, top_p=0.9, top_k=20)
    alone = _row(seed=7, **params)
    batched = [
        _row(seed=99, temperature=1.0),
        _row(temperature=0.0),
        _row(seed=7, **params),  # the same request as `alone`, at position 2
        _row(temperature=1.5),
        _row(seed=5, min_p=0.1),
    ]
    other = _logits(5, seed=2)
    tokens = set()
    for _ in range(20):
        # the batched copy of the row sees the same logits at position 2, different neighbours each step
        batch_logits = torch.cat([other[:2], logits, other[3:]])
        tok_alone = sample(logits, [alone], EOS).token_ids[0]
        tok_batched = sample(batch_logits, batched, EOS).token_ids[2]
        assert tok_alone == tok_batched
        tokens.add(tok_alone)
        other = other.roll(1, dims=1)
    assert len(tokens) > 1  # the row really samples


def test_choice_indices_get_different_reproducible_streams():
    logits = _logits(1)[0] / 3
    streams = [_draws(logits, lambda i=i: _row(seed=11, index=i, temperature=1.0), 30) for i in range(3)]
    assert len({tuple(s) for s in streams}) == 3
    assert streams[1] == _draws(logits, lambda: _row(seed=11, index=1, temperature=1.0), 30)
    assert make_generator(None, 0) is None


def test_sampling_frequencies_match_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]])
    # 5 tokens fit in one inverse-CDF block; test_two_level_inverse_cdf_matches_flat_cdf covers the blocks
    row = _row(seed=0, temperature=1.0)
    n = 4000
    draws = torch.tensor([sample(logits, [row], ()).token_ids[0] for _ in range(n)])
    counts = torch.bincount(draws, minlength=5)
    freq = counts.float() / n
    probs = logits[0].softmax(-1)
    # binomial std is at most sqrt(0.25 / 4000) ~ 0.008; allow ~4 sigma
    assert torch.allclose(freq, probs, atol=0.03), (freq, probs)


def test_temperature_sharpens_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]])
    hot = _row(seed=0, temperature=2.0)
    cold = _row(seed=0, temperature=0.25)
    n = 1000
    hot_top = sum(sample(logits, [hot], ()).token_ids[0] == 4 for _ in range(n)) / n
    cold_top = sum(sample(logits, [cold], ()).token_ids[0] == 4 for _ in range(n)) / n
    p_hot, p_cold = (logits[0] / 2.0).softmax(-1)[4].item(), (logits[0] / 0.25).softmax(-1)[4].item()
    assert abs(hot_top - p_hot) < 0.05 and abs(cold_top - p_cold) < 0.05


# --- truncation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(top_k=1),
        dict(top_p=1e-6),
        dict(min_p=1.0),
        dict(top_k=5, top_p=1e-6),
        dict(temperature=1e-7),
        dict(temperature=1e-40),  # logits / T would overflow to inf: below GREEDY_EPS it is greedy
    ],
    ids=["top_k=1", "top_p=tiny", "min_p=1", "top_k+top_p", "temperature=tiny", "temperature=denormal"],
)
def test_degenerate_truncation_equals_greedy(params):
    logits = _logits(4, seed=3) / 3  # flat: without truncation the draws would differ from argmax
    params = {"temperature": 1.5, **params}
    rows = [_row(seed=s, **params) for s in range(4)]
    for _ in range(10):
        assert sample(logits, rows, EOS).token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_k():
    logits = _logits(3)
    work = logits.clone()
    apply_top_k_(work, torch.tensor([1, 5, V]))
    kept = torch.isfinite(work).sum(-1).tolist()
    assert kept == [1, 5, V]
    assert set(work[1].isfinite().nonzero().flatten().tolist()) == set(logits[1].topk(5).indices.tolist())


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    work = probs.log()
    apply_top_p_(work, torch.tensor([0.5, 0.7, 1.0]))
    # sorted: 0.4, 0.3, 0.2, 0.1 -> p=0.5 needs {0.4, 0.3}; p=0.7 also {0.4, 0.3} (0.7 reached); p=1 keeps all
    assert work.isfinite().tolist() == [[False, True, False, True], [False, True, False, True], [True] * 4]
    zero = probs[:1].log()
    apply_top_p_(zero, torch.tensor([0.0]))  # below validate's range: still keeps the single best token
    assert zero.isfinite().tolist() == [[False, True, False, False]]


def test_top_p_small_candidate_set_leaves_inactive_rows_whole():
    logits = torch.stack([_logits(1, seed=8)[0] * 3, _logits(1, seed=9)[0]])  # a peaked row, any row
    apply_top_p_(logits, torch.tensor([0.5, 1.0]), candidates=2)
    kept = logits.isfinite().sum(-1).tolist()
    assert kept[0] <= 2 and kept[1] == V


@pytest.mark.parametrize("candidates", [1, 2, 5])
def test_top_p_candidate_search_equals_full_sort(candidates):
    logits = torch.cat([_logits(6, seed=8), _logits(6, seed=9) / 10])  # peaked and flat rows
    top_p = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99, 1.0] * 2)
    full, fast = logits.clone(), logits.clone()
    apply_top_p_(full, top_p, candidates=V)  # one topk over the whole vocabulary: a full sort
    apply_top_p_(fast, top_p, candidates=candidates)  # must grow the candidate set on the flat rows
    assert torch.equal(full.isfinite(), fast.isfinite())
    assert full.isfinite().sum(-1).tolist() != [V] * 12  # truncation really happened


def _reference_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]


@pytest.mark.parametrize("vocab", [1, 17, 127, 128, 129, 1000])
@pytest.mark.parametrize("block", [4, 128, 256])
def test_two_level_inverse_cdf_matches_flat_cdf(vocab, block):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(8, vocab, generator=g) ** 4  # uneven, unnormalized
    probs[:, ::3] = 0.0  # masked tokens
    probs[:, -1] = 1e-3  # every row keeps some mass
    u = torch.rand(8, dtype=torch.float64, generator=g)
    for _ in range(25):
        got = inverse_cdf_sample(probs, u, block=block)
        assert torch.equal(got, _reference_inverse_cdf(probs, u))
        assert bool((probs.gather(1, got[:, None]) > 0).all())
        u = torch.rand(8, dtype=torch.float64, generator=g)


def test_inverse_cdf_skips_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 1.0 - 1e-16], dtype=torch.float64)
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3, 3]
    assert inverse_cdf_sample(probs[:1] * 3, torch.tensor([0.6], dtype=torch.float64)).tolist() == [3]
    assert inverse_cdf_sample(probs, u, block=2).tolist() == [1, 1, 3, 3]  # block edges and the zero pad


def test_min_p_drops_relative_to_max():
    work = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    apply_min_p_(work, torch.tensor([0.35]))  # threshold 0.175
    assert work.isfinite().tolist() == [[True, True, False, False]]


def test_truncated_tokens_are_never_sampled():
    logits = _logits(1, seed=5) / 4
    row = _row(seed=3, temperature=1.0, top_k=4)
    allowed = set(logits[0].topk(4).indices.tolist())
    drawn = set(_draws(logits[0], lambda: row, 200))
    assert drawn <= allowed and len(drawn) > 1


# --- penalties and bans -----------------------------------------------------------------------------


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    row = _row(prompt=[0, 1], output=[1, 5], repetition_penalty=2.0)
    apply_penalties_(logits, row, EOS)
    # seen = {0, 1, 5}: 2 -> 1 (divided), -1 -> -2 (multiplied), 0 -> 0 (multiplied); 2, 3, 4 untouched
    assert logits.tolist() == [1.0, -2.0, 0.5, 3.0, -2.0, 0.0]


def test_frequency_and_presence_penalties_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    row = _row(prompt=[4, 4, 4], output=[3, 3, 3, 1], frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties_(logits, row, EOS)
    # output counts: token 3 x3 -> 3 - 1.5 - 0.25; token 1 x1 -> -1 - 0.5 - 0.25; prompt tokens untouched
    assert logits.tolist() == [2.0, -1.75, 0.5, 1.25, -2.0, 0.0]


def test_penalties_apply_in_order_repetition_first():
    logits = torch.tensor([4.0, 1.0, -1.0])
    row = _row(prompt=[2], output=[0, 0], repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    apply_penalties_(logits, row, EOS)
    # token 0: 4 / 2 - 2 * 1 - 0.5 = -0.5; token 2 (prompt only): -1 * 2 = -2
    assert logits.tolist() == [-0.5, 1.0, -2.0]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    plain = sample(logits, [_row(temperature=0.0, output=[1])], EOS).token_ids
    penalized = sample(logits, [_row(temperature=0.0, output=[1], repetition_penalty=1.5)], EOS).token_ids
    assert plain == [1] and penalized == [2]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 7], logits[0, 5] = 9.0, 8.0, 1.0  # 3 = EOS, 7 = stop id, 5 = the best allowed
    kw = dict(temperature=0.0, min_tokens=2, max_tokens=5, stop_token_ids=[7], ignore_eos=True)
    below = sample(logits, [_row(output=[1], **kw)], EOS).token_ids
    reached = sample(logits, [_row(output=[1, 1], **kw)], EOS).token_ids
    assert below == [5] and reached == [3]
    work = logits[0].clone()
    apply_penalties_(work, _row(output=[], **kw), EOS)
    assert torch.isneginf(work[[3, 7]]).all() and work.isfinite().sum() == 8


def test_min_tokens_ban_holds_for_random_rows():
    logits = torch.full((1, 6), -5.0)
    logits[0, 3] = 5.0  # EOS dominates; only bans keep it out
    row = _row(seed=0, temperature=1.0, min_tokens=3, output=[0])
    assert 3 not in _draws(logits[0], lambda: row, 50)


# --- logprobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_are_raw_log_softmax(k):
    logits = _logits(3, dtype=torch.bfloat16)
    rows = [
        _row(seed=1, temperature=0.7, repetition_penalty=1.3, output=[0, 1, 2], logprobs=k),
        _row(temperature=0.0),
        _row(temperature=0.0, presence_penalty=1.0, output=[5], logprobs=k + 3),  # ks differ within a batch
    ]
    out = sample(logits, rows, EOS)
    raw = logits.float().log_softmax(-1)
    assert out.logprobs[1] is None
    for b, want in ((0, k), (2, k + 3)):
        lp = out.logprobs[b]
        assert lp.token_id == out.token_ids[b]
        assert math.isclose(lp.logprob, raw[b, lp.token_id].item(), abs_tol=1e-6)
        assert len(lp.top) == want
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in lp.top] == raw[b].topk(want).indices.tolist()
        assert all(math.isclose(v, raw[b, t].item(), abs_tol=1e-6) for t, v in lp.top)


def test_logprobs_ignore_temperature():
    logits = _logits(1)
    cold = sample(logits, [_row(temperature=0.0, logprobs=2)], EOS).logprobs[0]
    hot = sample(logits, [_row(seed=0, temperature=5.0, top_k=3, logprobs=2)], EOS).logprobs[0]
    assert cold.top == hot.top  # the raw distribution, not the tempered or truncated one


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="B == len"):
        sample(torch.zeros(2, 5), [_row()], EOS)
    assert sample(torch.zeros(0, 5), [], EOS).token_ids == []


def test_argmax_rows_is_torch_argmax_with_ties_and_nan():
    from sparse_serve.sampling import argmax_rows

    x = torch.randn(5, 1000)
    x[1, [7, 300]] = 50.0  # a tie: the first index wins
    x[2, [10, 20]] = float("nan")  # a NaN counts as the maximum, the first one
    x[3] = float("-inf")
    x[4, 999] = float("inf")
    for rows in (x, x[:, ::2], x[[2]]):
        got = argmax_rows(rows)
        assert got.dtype == torch.long and torch.equal(got, rows.argmax(dim=-1))
