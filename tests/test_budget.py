"""The joint rank allocator: optimal where per-module thresholds are not, checked by hand and by
brute force; budgets validated."""

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from lora2_engine.budget import Budget, BudgetError, allocate, allocate_error, total_rel_error

SPEC = importlib.util.spec_from_file_location(
    "sd_scripts_resize", Path(__file__).resolve().parents[1] / "bench" / "sd_scripts_resize.py")
sd_scripts = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sd_scripts)


def sq_error(spectra, ranks):
    return sum(float((spectra[k][r:] ** 2).sum()) for k, r in ranks.items())


# Two modules of the same shape; B is A scaled by 1/100. Relative thresholds treat them alike.
HAND = {"A": torch.tensor([100.0, 90.0, 80.0, 70.0]), "B": torch.tensor([1.0, 0.9, 0.8, 0.7])}
HAND_COST = {"A": 10, "B": 10}  # one rank of either costs 10 (m + n)


def test_hand_computed_case_joint_beats_every_per_module_threshold():
    """Budget of 4 ranks: joint keeps 100, 90, 80 of A and 1 of B (error^2 = 70^2 + 0.9^2 +
    0.8^2 + 0.7^2 = 4901.94); any sd-scripts threshold gives both modules the same rank, so the
    best that fits is (2, 2): 80^2 + 70^2 + 0.8^2 + 0.7^2 = 11301.13."""
    ranks = allocate(HAND, HAND_COST, 40)
    assert ranks == {"A": 3, "B": 1}
    assert sq_error(HAND, ranks) == pytest.approx(4901.94)
    best_threshold = math.inf
    for method in sd_scripts.METHODS:
        lo, hi = sd_scripts.param_range(method)
        grid = (torch.logspace(0, 4, 400) if method == "sv_ratio"
                else torch.linspace(lo, hi, 400)).tolist()
        for t in grid:
            r = sd_scripts.ranks_for(HAND, method, t)
            assert r["A"] == r["B"], (method, t)  # scale-invariant rules
            if sum(r.values()) * 10 <= 40:
                best_threshold = min(best_threshold, sq_error(HAND, r))
    assert best_threshold == pytest.approx(11301.13)
    assert sq_error(HAND, ranks) < best_threshold / 2


def test_cost_per_byte_decides_not_the_singular_value():
    """A's directions remove more error (9 vs 4) but cost 3x as much: B's are worth more."""
    spectra = {"A": torch.tensor([3.0, 3.0, 3.0]), "B": torch.tensor([2.0, 2.0, 2.0])}
    assert allocate(spectra, {"A": 3, "B": 1}, 3 + 1 + 2) == {"A": 1, "B": 3}
    assert allocate(spectra, {"A": 3, "B": 1}, 3 + 1 + 2, min_rank=0) == {"A": 1, "B": 3}
    assert allocate(spectra, {"A": 3, "B": 1}, 6, min_rank=0,
                    max_rank={"A": 3, "B": 1}) == {"A": 1, "B": 1}  # A's next (3) > budget


def _brute_force(spectra, costs, budget, min_rank=1):
    names = list(spectra)
    best = (math.inf, None)
    for rs in itertools.product(*[range(min_rank, len(spectra[n]) + 1) for n in names]):
        cost = sum(r * costs[n] for r, n in zip(rs, names))
        if cost <= budget:
            err = sq_error(spectra, dict(zip(names, rs)))
            best = min(best, (err, rs), key=lambda x: x[0])
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_at_its_spend_and_within_one_direction(seed):
    g = torch.Generator().manual_seed(seed)
    spectra = {f"m{i}": torch.sort(torch.rand(4, generator=g) * (1 + 9 * i), descending=True)[0]
               for i in range(3)}
    costs = {n: int(c) for n, c in zip(spectra, torch.randint(1, 5, (3,), generator=g))}
    floor = sum(costs.values())
    full = sum(c * 4 for c in costs.values())
    max_gain = max(float(s.max()) ** 2 for s in spectra.values())
    for budget in range(floor, full + 1):
        ranks = allocate(spectra, costs, budget)
        spend = sum(ranks[n] * costs[n] for n in ranks)
        assert spend <= budget
        # the fill after the prefix leaves at most one direction's error on the table
        assert sq_error(spectra, ranks) <= _brute_force(spectra, costs, budget) + max_gain
    for b in _prefix_spends(spectra, costs):  # where a greedy prefix ends: exactly optimal
        got = sq_error(spectra, allocate(spectra, costs, b))
        assert got == pytest.approx(_brute_force(spectra, costs, b), rel=1e-9, abs=1e-12)


def _prefix_spends(spectra, costs):
    """Total costs at which a pure greedy-by-ratio prefix ends (no fill needed)."""
    items = sorted(((float(s[i]) ** 2 / costs[n], costs[n]) for n, s in spectra.items()
                    for i in range(1, len(s))), key=lambda x: -x[0])
    spend, out = sum(costs.values()), [sum(costs.values())]
    for _, c in items:
        spend += c
        out.append(spend)
    return out


def test_error_tolerance_is_the_cheapest_within_it():
    ranks = allocate_error(HAND, HAND_COST, 0.1)
    err = total_rel_error(HAND, ranks)
    assert err <= 0.1
    # one direction fewer anywhere would break the tolerance
    for n in ranks:
        if ranks[n] > 1:
            fewer = dict(ranks, **{n: ranks[n] - 1})
            assert total_rel_error(HAND, fewer) > 0.1
    assert allocate_error(HAND, HAND_COST, 0.0) == {"A": 4, "B": 4}


@pytest.mark.parametrize("kind, value, message", [
    ("bytes", 0, "must be positive"),
    ("bytes", -5, "must be positive"),
    ("params", 0, "must be positive"),
    ("error", 1.0, "must be in \\[0, 1\\)"),
    ("error", -0.1, "must be in \\[0, 1\\)"),
    ("bytes", float("nan"), "not a number"),
    ("size", 3, "choose one of bytes, params, error"),
])
def test_bad_budgets_are_refused(kind, value, message):
    with pytest.raises(BudgetError, match=message):
        Budget(kind, value)


def test_megabytes_are_si_and_refuse_zero():
    assert Budget.megabytes(40).value == 40_000_000
    with pytest.raises(BudgetError, match="must be positive: e.g. 40"):
        Budget.megabytes(0)


def test_budget_below_the_minimum_ranks_is_refused():
    with pytest.raises(BudgetError, match="below the minimum 20 \\(1 rank\\(s\\) for each of 2"):
        allocate(HAND, HAND_COST, 19)
