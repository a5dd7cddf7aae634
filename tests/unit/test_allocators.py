"""compress.sparsity.allocation: exact weighted means, bounds, ATP range, OWL order, CKA, the LP."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from compress.sparsity import allocation as A

LAYERS = (1, 3, 30, 32)
TARGETS = (0.5, 0.6, 0.7)
EXACT = 1e-9


def _params(num_layers: int, equal: bool) -> list[int] | None:
    if equal:
        return None
    rng = random.Random(num_layers)
    return [rng.randint(1_000, 50_000) for _ in range(num_layers)]


def _reps(num_layers: int, n: int = 6, d: int = 10, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    reps = []
    for _ in range(num_layers):  # a drifting residual stream: neighbours are similar
        base = base + 0.7 * torch.randn(n, d, generator=g)
        reps.append(base.clone())
    return reps


def _in_legal_range(rates: list[float]) -> bool:
    return all(0.0 <= r < 1.0 for r in rates)


def _all_allocations(num_layers: int, target: float, params) -> dict[str, list[float]]:
    ratios = [random.Random(7 + i).random() * 0.1 for i in range(num_layers)]
    limit = A.atp_beta_limit(num_layers, target)
    return {
        "uniform": A.uniform(num_layers, target, params),
        "owl": A.owl(ratios, target, 0.08, params),
        "atp_half": A.atp(num_layers, target, limit / 2, params),
        "atp_limit": A.atp(num_layers, target, limit, params),
        "rmi": A.rmi(_reps(num_layers), target, 1.0, None, params),
        "rmi_gamma100": A.rmi(_reps(num_layers), target, 100.0, None, params),
        "explicit": A.explicit(A.atp(num_layers, target, limit / 3, params), target, params),
    }


# -- the contract every allocator keeps --------------------------------------------------


@pytest.mark.parametrize("equal", [True, False], ids=["equal-params", "unequal-params"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_weighted_mean_is_exact_and_rates_legal(num_layers, target, equal):
    params = _params(num_layers, equal)
    for name, rates in _all_allocations(num_layers, target, params).items():
        assert len(rates) == num_layers, name
        assert abs(A.weighted_mean(rates, params) - target) < EXACT, name
        assert _in_legal_range(rates), (name, rates)


@pytest.mark.parametrize("equal", [True, False], ids=["equal-params", "unequal-params"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_bounds_of_owl_and_rmi(num_layers, target, equal):
    params = _params(num_layers, equal)
    lam = 0.08
    ratios = [random.Random(3 + i).random() for i in range(num_layers)]
    rates = A.owl(ratios, target, lam, params)
    # OWL (as the reference code): spread exactly 2 lam, then one shift to the mean -> within S +- 2 lam
    if num_layers > 1:
        assert max(rates) - min(rates) == pytest.approx(2 * lam, abs=1e-12)
    assert all(target - 2 * lam - 1e-12 <= r <= target + 2 * lam + 1e-12 for r in rates)
    delta = A.rmi_delta(target)
    rates = A.rmi(_reps(num_layers), target, 1.0, None, params)
    assert all(target - delta - 1e-12 <= r <= target + delta + 1e-12 for r in rates)


def test_weighted_mean_uses_the_parameter_counts():
    assert A.weighted_mean([0.2, 0.8]) == pytest.approx(0.5)
    assert A.weighted_mean([0.2, 0.8], [3, 1]) == pytest.approx(0.35)


def test_extreme_targets_stay_in_range_and_exact():
    params = [5, 1, 9, 2]
    for target in (0.0, 0.01, 0.99):
        for rates in (A.owl([0.0, 0.3, 0.1, 0.9], target, 0.08, params),
                      A.atp(4, target, A.atp_beta_limit(4, target), params),
                      A.solve_allocation_lp([0.3, 0.1, 0.2, 0.4], target, 0.03, params)):
            assert _in_legal_range(rates)
            assert abs(A.weighted_mean(rates, params) - target) < EXACT


# -- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_target_outside_zero_one_is_refused(target):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        A.uniform(4, target)


def test_bad_layer_counts_and_lengths_are_refused():
    with pytest.raises(ValueError, match="num_layers"):
        A.uniform(0, 0.5)
    with pytest.raises(ValueError, match="3 entries but there are 4 layers"):
        A.uniform(4, 0.5, [1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        A.atp(2, 0.5, 0.0, [1, 0])


# -- explicit -----------------------------------------------------------------------------------


def test_explicit_checks_each_rate_and_the_target():
    assert A.explicit([0.1, 0.9]) == [0.1, 0.9]
    with pytest.raises(ValueError, match=r"rates\[1\] = 1\.0.*\[0, 1\)"):
        A.explicit([0.5, 1.0])
    with pytest.raises(ValueError) as err:
        A.explicit([0.5, 0.7], target=0.7)
    assert "0.6" in str(err.value) and "0.7" in str(err.value)


def test_explicit_snaps_a_tiny_remainder_to_the_exact_target():
    rates = A.explicit([0.5, 0.7 + 4e-7], target=0.6)
    assert abs(A.weighted_mean(rates) - 0.6) < 1e-15
    assert rates[1] - rates[0] == pytest.approx(0.2 + 4e-7)


# -- ATP ------------------------------------------------------------------------------------------


def test_atp_limit_for_seventy_percent_and_thirty_layers():
    assert A.atp_beta_limit(30, 0.7) == pytest.approx(0.6 / 29, rel=1e-12)
    assert A.atp_beta_limit(1, 0.7) == 0.0


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("target", TARGETS)
def test_atp_rises_with_depth(target, equal):
    num_layers = 30
    params = _params(num_layers, equal)
    limit = A.atp_beta_limit(num_layers, target)
    for beta in (0.002, limit / 2, limit):
        rates = A.atp(num_layers, target, beta, params)
        assert all(b > a for a, b in zip(rates, rates[1:])), beta
        if equal:
            assert rates[1] - rates[0] == pytest.approx(beta, rel=1e-9)
            assert rates[0] == pytest.approx(target - beta * (num_layers - 1) / 2, abs=1e-12)


def test_atp_beta_zero_is_uniform():
    assert A.atp(5, 0.6, 0.0) == pytest.approx([0.6] * 5, abs=1e-15)
    assert A.atp(1, 0.6, 0.0) == [0.6]


@pytest.mark.parametrize("num_layers, target", [(30, 0.7), (32, 0.5), (3, 0.6), (8, 0.2)])
def test_atp_beta_outside_the_legal_range_is_refused_with_the_range(num_layers, target):
    limit = A.atp_beta_limit(num_layers, target)
    A.atp(num_layers, target, limit)  # the limit itself is legal
    for beta in (limit * (1 + 1e-9), limit + 1e-6, -0.001, float("inf")):
        with pytest.raises(ValueError) as err:
            A.atp(num_layers, target, beta)
        message = str(err.value)
        assert "0 < beta <=" in message and repr(limit) in message
        assert f"L={num_layers}" in message and f"S={target}" in message


def test_atp_single_layer_allows_only_beta_zero():
    with pytest.raises(ValueError, match="only beta = 0"):
        A.atp(1, 0.5, 0.002)
    assert A.atp_beta_grid(1, 0.5) == []


@pytest.mark.parametrize("num_layers, target, step", [(30, 0.7, 0.002), (32, 0.5, 0.002), (3, 0.6, 0.01),
                                                        (11, 0.5, 0.002), (6, 0.55, 0.003)])
def test_atp_grid_is_legal_step_spaced_and_capped(num_layers, target, step):
    grid = A.atp_beta_grid(num_layers, target, step)
    limit = A.atp_beta_limit(num_layers, target)
    assert grid and grid[0] == pytest.approx(step)
    assert all(b - a == pytest.approx(step, abs=1e-12) for a, b in zip(grid, grid[1:]))
    assert grid[-1] <= limit and limit - grid[-1] < step + 1e-12
    for beta in grid:
        A.atp(num_layers, target, beta)  # never raises


def test_atp_grid_reaches_a_limit_that_is_a_multiple_of_the_step():
    grid = A.atp_beta_grid(11, 0.5, 0.002)  # limit 1 / 10 = 50 steps
    assert len(grid) == 50 and grid[-1] <= A.atp_beta_limit(11, 0.5)


# -- OWL ------------------------------------------------------------------------------------------


def test_outlier_ratio_matches_a_hand_count():
    scores = torch.tensor([1.0] * 9 + [100.0])  # mean 10.9 -> threshold 54.5 -> 1 of 10
    assert A.outlier_ratio(scores) == pytest.approx(0.1)
    assert A.outlier_ratio(scores, m=0.05) == pytest.approx(1.0)  # threshold 0.545: all
    assert A.outlier_ratio(scores.reshape(2, 5)) == pytest.approx(0.1)


def test_outlier_ratio_pools_the_linears_of_a_layer():
    parts = [torch.ones(2, 2), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 100.0]])]
    assert A.outlier_ratio(parts) == pytest.approx(0.1)  # pooled: 1 of 10, not mean of 0 and 1/6


def test_owl_gives_the_most_outliers_the_least_sparsity():
    ratios = [0.02, 0.11, 0.05, 0.03, 0.07]
    for params in (None, [3, 1, 4, 1, 5]):
        rates = A.owl(ratios, 0.7, 0.08, params)
        assert rates.index(min(rates)) == ratios.index(max(ratios))
        assert rates.index(max(rates)) == ratios.index(min(ratios))
        order = sorted(range(5), key=lambda i: ratios[i])
        assert all(rates[a] > rates[b] for a, b in zip(order, order[1:]))


def test_owl_equal_ratios_are_uniform():
    assert A.owl([0.04] * 6, 0.6) == [0.6] * 6
    assert A.owl([0.3], 0.6) == [0.6]


def test_owl_clips_into_range_and_reshifts_the_rest():
    ratios = [0.0, 0.1, 0.2, 0.3, 0.4]
    rates = A.owl(ratios, 0.05, 0.08)  # raw rates go below 0
    assert min(rates) == 0.0 and _in_legal_range(rates)
    assert abs(A.weighted_mean(rates) - 0.05) < EXACT
    assert all(a >= b for a, b in zip(rates, rates[1:]))


# -- CKA ------------------------------------------------------------------------------------------


def _data(n: int = 40, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_cka_of_a_matrix_with_itself_is_one():
    x = _data()
    assert A.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_isotropic_scaling_and_orthogonal_maps():
    x, y = _data(seed=1).double(), (_data(d=5, seed=2) + 0.5 * _data(seed=1)[:, :5]).double()
    q, _ = torch.linalg.qr(_data(n=8, d=8, seed=3).double())  # [8, 8] orthogonal
    reference = A.linear_cka(x, y)
    assert A.linear_cka(3.7 * x, 0.2 * y) == pytest.approx(reference, abs=1e-12)
    assert A.linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-12)
    assert A.linear_cka(y, x) == pytest.approx(reference, abs=1e-12)


def test_cka_separates_independent_from_nearly_equal():
    x = _data(n=300, d=4, seed=4)
    independent = A.linear_cka(x, _data(n=300, d=4, seed=5))
    noisy = A.linear_cka(x, x + 0.01 * _data(n=300, d=4, seed=6))
    assert noisy > 0.999 and independent < 0.1


def test_cka_matrix_is_symmetric_with_unit_diagonal():
    reps = _reps(5, n=10, d=12)
    cka = A.cka_matrix(reps)
    assert cka.shape == (5, 5) and cka.dtype == torch.float64
    assert torch.equal(cka, cka.T) and torch.equal(cka.diagonal(), torch.ones(5, dtype=torch.float64))
    assert A.linear_cka(reps[1], reps[3]) == pytest.approx(float(cka[1, 3]), abs=1e-12)
    grams = [r.double() @ r.double().T for r in reps]  # uncentered Grams give the same matrix
    assert torch.allclose(A.cka_from_grams(grams), cka, atol=1e-12)


def test_cka_flattens_samples_and_rejects_constant_representations():
    x = _data(n=6, d=12).reshape(6, 3, 4)  # [n, T, D]
    assert A.linear_cka(x, x.reshape(6, 12)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="do not vary"):
        A.cka_matrix([x, torch.ones(6, 5)])


# -- RMI importance and the exact LP --------------------------------------------------------------


def test_rmi_importance_and_delta():
    cka = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    importance = A.rmi_importance(cka, 2.0)
    redundancy = torch.tensor([1.0, 1.4, 0.6], dtype=torch.float64) / 3.0
    assert torch.allclose(importance, torch.exp(-2.0 * redundancy))
    assert [A.rmi_delta(s) for s in (0.3, 0.5, 0.55, 0.6, 0.7)] == [0.01, 0.01, 0.02, 0.02, 0.03]
    rates = A.rmi(cka, 0.7, 2.0)  # most redundant layer 1 gets the most sparsity
    assert rates == pytest.approx([0.7, 0.73, 0.67])


def test_rmi_accepts_representations_as_a_list_or_a_stacked_tensor():
    reps = _reps(4)
    expected = A.rmi(A.cka_matrix(reps), 0.6, 1.0)
    assert A.rmi(reps, 0.6, 1.0) == expected
    assert A.rmi(torch.stack(reps), 0.6, 1.0) == expected


def _vertex_optimum(importance, target, delta, params) -> float:
    """Brute force over LP vertices: all variables at a bound but at most one."""
    lo, hi = max(0.0, target - delta), min(A.MAX_SPARSITY, target + delta)
    total, best = sum(params), math.inf
    n = len(importance)
    for free in range(n):
        others = [i for i in range(n) if i != free]
        for bounds in itertools.product((lo, hi), repeat=n - 1):
            s = [0.0] * n
            for i, b in zip(others, bounds):
                s[i] = b
            s[free] = (target * total - sum(params[i] * s[i] for i in others)) / params[free]
            if lo - 1e-12 <= s[free] <= hi + 1e-12:
                best = min(best, sum(p * x * c for p, x, c in zip(params, s, importance)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_lp_greedy_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    importance = [rng.random() for _ in range(n)]
    if seed % 4 == 0:
        importance[1] = importance[0]  # a tie
    params = [rng.randint(1, 100) for _ in range(n)]
    target, delta = rng.uniform(0.2, 0.8), rng.uniform(0.005, 0.05)
    rates = A.solve_allocation_lp(importance, target, delta, params)
    assert abs(A.weighted_mean(rates, params) - target) < EXACT
    assert all(target - delta - 1e-12 <= r <= target + delta + 1e-12 for r in rates)
    assert sum(1 for r in rates if min(abs(r - target - delta), abs(r - target + delta)) > 1e-12) <= 1
    objective = sum(p * x * c for p, x, c in zip(params, rates, importance))
    assert objective == pytest.approx(_vertex_optimum(importance, target, delta, params), abs=1e-9)


def test_lp_breaks_ties_by_layer_index():
    rates = A.solve_allocation_lp([0.5, 0.5, 0.5], 0.6, 0.02)
    assert rates == pytest.approx([0.62, 0.6, 0.58])


def test_lp_with_tensor_importance_and_zero_delta():
    assert A.solve_allocation_lp(torch.tensor([0.3, 0.2]), 0.5, 0.0) == [0.5, 0.5]


# -- registry ---------------------------------------------------------------------------------


def test_registry_names_and_needs():
    assert set(A.ALLOCATIONS) == {"uniform", "owl", "atp", "rmi", "explicit"}
    assert A.ALLOCATIONS["uniform"].needs == ()
    assert A.ALLOCATIONS["owl"].needs == ("outlier_ratios",)
    assert A.ALLOCATIONS["atp"].needs == ("beta",)
    assert A.ALLOCATIONS["rmi"].needs == ("representations",)
    assert A.ALLOCATIONS["explicit"].needs == ("rates",)


def test_allocate_through_the_registry():
    params = [4, 2, 3]
    reps = _reps(3)
    inputs = {"uniform": {}, "owl": {"outlier_ratios": [0.1, 0.3, 0.2], "lam": 0.05},
              "atp": {"beta": 0.01}, "rmi": {"representations": reps, "gamma": 1.0},
              "explicit": {"rates": [0.55, 0.7, 0.6]}}  # weighted mean 0.6
    for name, kwargs in inputs.items():
        rates = A.allocate(name, 3, 0.6, params, **kwargs)
        assert len(rates) == 3 and _in_legal_range(rates)
        assert abs(A.weighted_mean(rates, params) - 0.6) < EXACT
    assert A.allocate("rmi", 3, 0.6, params, representations=A.cka_matrix(reps)) == \
        A.allocate("rmi", 3, 0.6, params, representations=reps)
    with pytest.raises(ValueError, match="needs beta"):
        A.allocate("atp", 3, 0.6)
    with pytest.raises(ValueError, match="unknown allocation 'owl2'; known: uniform"):
        A.allocate("owl2", 3, 0.6)
    with pytest.raises(ValueError, match="2 entries but there are 3 layers"):
        A.allocate("owl", 3, 0.6, outlier_ratios=[0.1, 0.2])
