import math

import pytest
import torch

from lora2_engine.distribution import (
    nu_floor,
    nu_for_rank,
    nu_from_param,
    param_from_nu,
    rank_from_nu,
    slot_weights,
)


@pytest.mark.parametrize("nu", [0.01, 0.2, 1.0, 3.0])
def test_f_matches_closed_form(nu):
    f = slot_weights(torch.tensor(nu, dtype=torch.float64), 10, renormalize=False)
    direct = [math.exp(-nu * x) - math.exp(-nu * (x + 1)) for x in range(10)]
    assert torch.allclose(f, torch.tensor(direct, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("nu", [0.01, 0.2, 1.0])
def test_renormalised_f_sums_to_one_over_D(nu):
    d = rank_from_nu(nu)
    f = slot_weights(torch.tensor(nu, dtype=torch.float64), d, renormalize=True)
    assert float(f.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("nu", [0.003, 0.05, 0.3, 1.7])
def test_D_is_smallest_count_reaching_q(nu):
    q = 0.9
    d = rank_from_nu(nu, q, r_max=10_000)
    mass = lambda k: 1 - math.exp(-nu * k)  # noqa: E731  sum_{x<k} f(x)
    assert mass(d) >= q - 1e-12
    assert d == 1 or mass(d - 1) < q
    assert d == math.ceil(-math.log(1 - q) / nu - 1e-6)


def test_D_monotone_and_clamped():
    nus = torch.logspace(-4, 1, 200).tolist()
    ds = [rank_from_nu(v, 0.9, 512) for v in nus]
    assert all(a >= b for a, b in zip(ds, ds[1:]))
    assert ds[0] == 512 and ds[-1] == 1


@pytest.mark.parametrize("r", [1, 2, 7, 64, 128, 512])
def test_nu_target_round_trip(r):
    assert rank_from_nu(nu_for_rank(r), 0.9, 512) == r
    floor = nu_floor(512)
    p = param_from_nu(nu_for_rank(r), floor)
    assert float(nu_from_param(torch.tensor(p, dtype=torch.float64), floor)) == pytest.approx(
        max(nu_for_rank(r), floor + 1e-6), rel=1e-9)


def test_slot_weights_gradient_flows_to_nu():
    nu = torch.tensor(0.3, requires_grad=True)
    slot_weights(nu, 8).pow(2).sum().backward()
    assert nu.grad is not None and torch.isfinite(nu.grad) and nu.grad != 0


def test_batched_slot_weights_equal_per_layer():
    from lora2_engine.distribution import slot_weights_batched

    nus = torch.tensor([0.01, 0.3, 1.2, 2.5], dtype=torch.float64)
    batched = slot_weights_batched(nus, 9)
    for i, nu in enumerate(nus):
        assert torch.allclose(batched[i], slot_weights(nu, 9), rtol=1e-12)
