"""Pruners against independent references on odd shapes (tiny tensors, CPU)."""

from __future__ import annotations

import pytest
import torch

from compress.sparsity.pruners import (
    PRUNERS,
    InputStats,
    NotPositiveDefiniteError,
    get_pruner,
    layer_reconstruction_error,
    nm_mask_from_scores,
    parse_pattern,
    pattern_sparsity,
    prune_counts,
    row_mask_from_scores,
    sparsegpt_prune,
)

SHAPES = [(17, 130), (8, 256), (33, 64), (1, 128)]
NAMES = ["magnitude", "wanda", "sparsegpt"]


def _dense_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)  # w: [out, in]
    return torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-2), w)  # no zeros to start


def _inputs(tokens: int, in_features: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_features, generator=g) * torch.rand(in_features, generator=g) * 3  # x: [tokens, in]


def _correlated_inputs(tokens: int, in_features: int, seed: int = 1) -> torch.Tensor:
    """x = z @ A + noise with z: [tokens, in/4]: strongly correlated channels, full rank."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, in_features // 4, generator=g)
    return z @ torch.randn(in_features // 4, in_features, generator=g) + 0.1 * torch.randn(tokens, in_features, generator=g)


def _stats(x: torch.Tensor, with_hessian: bool = True) -> InputStats:
    stats = InputStats.empty(x.shape[-1], with_hessian=with_hessian)
    stats.update(x)
    return stats


def _prune(name: str, w: torch.Tensor, sparsity: float, pattern=None, x: torch.Tensor | None = None):
    x = _inputs(4 * w.shape[1], w.shape[1]) if x is None else x
    return get_pruner(name).prune(w, _stats(x), sparsity, pattern)


def _expected_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute force: per row, argsort ascending and drop the first int(in * s)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = int(scores.shape[1] * sparsity)
    for r in range(scores.shape[0]):
        keep[r, scores[r].numpy().argsort(kind="stable")[:k].tolist()] = False
    return keep


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_every_row_loses_exactly_int_in_times_s(name, shape, sparsity):
    w = _dense_weight(shape)
    pruned = _prune(name, w, sparsity)
    zeros_per_row = (pruned == 0).sum(dim=1)
    assert pruned.shape == w.shape and pruned.dtype == torch.float32
    assert torch.all(zeros_per_row == int(shape[1] * sparsity)), zeros_per_row
    assert torch.all(w != 0), "the input weight must not be modified"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_dtype_preserved(name):
    w = _dense_weight((17, 130)).bfloat16()
    pruned = _prune(name, w, 0.5, x=_inputs(300, 130).bfloat16())
    assert pruned.dtype == torch.bfloat16
    assert torch.all((pruned == 0).sum(dim=1) == 65)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(17, 64), (1, 128), (8, 256)])
def test_nm_every_group_has_m_minus_n_zeros(name, n, m, shape):
    pruned = _prune(name, _dense_weight(shape), pattern_sparsity((n, m)), (n, m))
    groups = (pruned == 0).reshape(shape[0], shape[1] // m, m).sum(dim=-1)
    assert torch.all(groups == m - n)


@pytest.mark.parametrize("name", NAMES)
def test_nm_needs_in_divisible_by_m(name):
    with pytest.raises(ValueError, match=r"\(17, 130\).*m=4"):
        _prune(name, _dense_weight((17, 130)), 0.5, (2, 4))


def test_nm_pattern_fixes_sparsity():
    with pytest.raises(ValueError, match="pattern 2:4 means sparsity 0.5"):
        _prune("wanda", _dense_weight((4, 64)), 0.7, (2, 4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_and_magnitude_masks_equal_brute_force(shape, sparsity):
    w, x = _dense_weight(shape), _inputs(50, shape[1])
    wanda_scores = w.abs() * x.pow(2).sum(dim=0).sqrt()  # independent: |w| * ||X_j||_2
    assert torch.equal(_prune("wanda", w, sparsity, x=x) != 0, _expected_keep(wanda_scores, sparsity))
    assert torch.equal(_prune("magnitude", w, sparsity, x=x) != 0, _expected_keep(w.abs(), sparsity))


def test_mask_ties_are_broken_by_index():
    scores = torch.ones(3, 8)
    assert torch.equal(row_mask_from_scores(scores, 0.5)[0], torch.tensor([False] * 4 + [True] * 4))
    assert torch.equal(nm_mask_from_scores(scores, 2, 4)[0], torch.tensor([False, False, True, True] * 2))


def test_kept_weights_are_unchanged_by_mask_pruners():
    w = _dense_weight((5, 64))
    pruned = _prune("wanda", w, 0.5)
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])


def _reference_sparsegpt(w, x, sparsity, pattern, blocksize):
    """SparseGPT's fasterprune written out as in the reference, with the row-wise block mask."""
    w, cols = w.clone().float(), w.shape[1]
    h = 2 * x.T @ x / x.shape[0]
    h += 0.01 * torch.diag(h).mean() * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, q1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        tmp = w1**2 / torch.diag(hinv1)[None, :] ** 2
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None:
            k = int(i2 * sparsity) - int(i1 * sparsity)
            mask1.scatter_(1, torch.topk(tmp, k, dim=1, largest=False)[1], True)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                tmp = w1[:, i : i + pattern[1]] ** 2 / torch.diag(hinv1)[i : i + pattern[1]][None, :] ** 2
                mask1.scatter_(1, i + torch.topk(tmp, pattern[1] - pattern[0], dim=1, largest=False)[1], True)
            q = w1[:, i].clone()
            q[mask1[:, i]] = 0
            q1[:, i], err1[:, i] = q, (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err1[:, i : i + 1] @ hinv1[i : i + 1, i:]
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


@pytest.mark.parametrize("shape,sparsity,pattern,blocksize", [((17, 130), 0.7, None, 128), ((5, 96), 0.5, None, 32),
                                                              ((9, 64), 0.5, (2, 4), 16), ((3, 128), 0.5, (4, 8), 128)])
def test_sparsegpt_equals_reference_loop(shape, sparsity, pattern, blocksize):
    w, x = _dense_weight(shape), _correlated_inputs(600, shape[1])
    got = sparsegpt_prune(w, _stats(x), sparsity, pattern, blocksize=blocksize)
    expected = _reference_sparsegpt(w, x, sparsity, pattern, blocksize)
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # float32 sums in another order


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_beats_wanda_on_correlated_inputs(sparsity):
    w, x = _dense_weight((32, 64)), _correlated_inputs(2048, 64)
    errors = {name: layer_reconstruction_error(w, _prune(name, w, sparsity, x=x), x) for name in ("wanda", "sparsegpt")}
    assert errors["sparsegpt"] < 0.6 * errors["wanda"], errors  # OBS updates use the correlations


def test_sparsegpt_at_zero_sparsity_keeps_the_weight():
    w, x = _dense_weight((9, 70)), _correlated_inputs(500, 70)
    assert torch.allclose(_prune("sparsegpt", w, 0.0, x=x), w, atol=1e-6)


def test_sparsegpt_counts_telescope_over_small_blocks():
    w, x = _dense_weight((6, 50)), _inputs(200, 50)
    pruned = sparsegpt_prune(w, _stats(x), 0.7, blocksize=16)  # blocks 16,16,16,2
    assert torch.all((pruned == 0).sum(dim=1) == prune_counts(50, 0.7))


def test_sparsegpt_zeroes_dead_inputs():
    x = _inputs(200, 32)
    x[:, [3, 20]] = 0
    pruned = sparsegpt_prune(_dense_weight((4, 32)), _stats(x), 0.25)
    assert torch.all(pruned[:, [3, 20]] == 0)


def test_sparsegpt_non_positive_definite_raises():
    stats = InputStats(tokens=10, sq_sum=torch.ones(8), hessian=-torch.eye(8))
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        sparsegpt_prune(_dense_weight((2, 8)), stats, 0.5)


def test_sparsegpt_nm_blocksize_must_align():
    with pytest.raises(ValueError, match="multiple of m=8"):
        sparsegpt_prune(_dense_weight((2, 64)), _stats(_inputs(100, 64)), 0.5, (4, 8), blocksize=20)


def test_stats_update_in_chunks_equals_one_update():
    x = torch.randn(2, 7, 12)  # [batch, seq, in]
    whole, chunked = _stats(x), InputStats.empty(12, with_hessian=True)
    chunked.update(x[0])
    chunked.update(x[1:])
    assert chunked.tokens == whole.tokens == 14
    assert torch.allclose(chunked.sq_sum, whole.sq_sum) and torch.allclose(chunked.hessian, whole.hessian)
    assert torch.allclose(whole.sq_sum, torch.diagonal(whole.hessian))
    assert InputStats.empty(12, with_hessian=False).hessian is None


def test_magnitude_needs_no_stats_and_wanda_does():
    w = _dense_weight((3, 16))
    assert torch.all((get_pruner("magnitude").prune(w, None, 0.5, None) == 0).sum(dim=1) == 8)
    with pytest.raises(ValueError, match="needs input statistics"):
        get_pruner("wanda").prune(w, None, 0.5, None)


def test_registry_flags():
    assert set(PRUNERS) == set(NAMES)
    assert get_pruner("wanda").needs_sq_sum and not get_pruner("wanda").needs_hessian
    assert get_pruner("sparsegpt", blocksize=64).needs_hessian
    assert not get_pruner("magnitude").needs_sq_sum and not get_pruner("magnitude").needs_hessian


def test_get_pruner_errors_list_the_choices():
    with pytest.raises(ValueError, match="magnitude.*sparsegpt.*wanda"):
        get_pruner("obs")
    with pytest.raises(ValueError, match="accepted: \\['blocksize', 'percdamp'\\]"):
        get_pruner("sparsegpt", block=3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
@pytest.mark.parametrize("name", NAMES)
def test_bad_sparsity_raises(name, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        _prune(name, _dense_weight((2, 16)), sparsity)


@pytest.mark.parametrize("text,expected", [(None, None), ("unstructured", None), ("2:4", (2, 4)),
                                           ("4:8", (4, 8)), (" 1:3 ", (1, 3))])
def test_parse_pattern_good(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["", "2-4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "50%"])
def test_parse_pattern_bad(text):
    with pytest.raises(ValueError, match="'2:4', '4:8'"):
        parse_pattern(text)


def test_pattern_sparsity():
    assert pattern_sparsity((2, 4)) == 0.5 and pattern_sparsity((4, 8)) == 0.5 and pattern_sparsity((1, 4)) == 0.75
    with pytest.raises(ValueError):
        pattern_sparsity(None)


def test_layer_reconstruction_error():
    w, x = _dense_weight((4, 8)), _inputs(30, 8)
    assert layer_reconstruction_error(w, w, x) == 0.0
    assert layer_reconstruction_error(w, torch.zeros_like(w), x) == pytest.approx(1.0)
