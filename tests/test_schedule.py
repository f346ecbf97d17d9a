"""The denoising maths (``lora2_engine/schedule.py``) on any ``model_sampling``-like schedule.

``StandInSampling`` (tests/sampling.py) is written from the textbook formulas, independently of
the engine; the engine's own schedules are checked against it here and against ComfyUI's
classes, value for value, in ``tests/comfyui/inprocess_checks.py`` (check ``loss``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lora2_engine.denoiser import ApplyModelDenoiser
from lora2_engine.schedule import (
    DiscreteSchedule,
    FlowSchedule,
    denoising_loss,
    euler_sample,
    output_scale,
    sample_sigmas,
)
from tests.sampling import StandInSampling


def _raw(x):  # any fixed "network"
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 2
    return torch.tanh(torch.einsum("oc,bchw->bohw", w, x))


def _denoiser(ms):
    def apply_model(x, sigma, c_crossattn=None):
        assert c_crossattn is not None
        return ms.calculate_denoised(sigma, _raw(ms.calculate_input(sigma, x)), x)

    return ApplyModelDenoiser(torch.nn.Identity(), ms, apply_model)


SCHEDULES = [pytest.param(lambda k=k: StandInSampling(k), k, id=f"textbook-{k}")
             for k in ("eps", "v", "flow", "x0")] + [
    pytest.param(lambda: DiscreteSchedule("eps"), "eps", id="engine-eps"),
    pytest.param(lambda: DiscreteSchedule("v"), "v", id="engine-v"),
    pytest.param(lambda: FlowSchedule(shift=3.0), "flow", id="engine-flow-shift3")]


@pytest.mark.parametrize("make,kind", SCHEDULES)
def test_denoising_loss_is_mse_on_the_native_target(make, kind):
    ms = make()
    x0 = torch.randn(3, 4, 8, 8)
    batch = {"latents": x0, "c_crossattn": torch.zeros(3, 77, 8)}
    got = denoising_loss(_denoiser(ms))(batch, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, then the textbook target
    sigma = sample_sigmas(ms, 3, g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = ms.noise_scaling(sigma, noise, x0)
    target = StandInSampling(kind).target(sigma, noise, x0)
    want = torch.nn.functional.mse_loss(_raw(ms.calculate_input(sigma, x_t)), target)
    assert torch.allclose(got, want, rtol=2e-4, atol=1e-6), (float(got), float(want))


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_discrete_schedule_matches_the_textbook_one(kind):
    ours, ref = DiscreteSchedule(kind), StandInSampling(kind)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-5, atol=0)  # fp32 vs fp64 path
    sigma = torch.tensor([0.05, 1.0, 7.0])
    x, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(ours.calculate_input(sigma, x), ref.calculate_input(sigma, x))
    torch.testing.assert_close(ours.calculate_denoised(sigma, out, x),
                               ref.calculate_denoised(sigma, out, x))
    for p in (0.0, 0.25, 0.999):  # percent → sigma lands on the schedule's own timesteps
        s = ours.percent_to_sigma(p) if p > 0 else float(ours.sigma_max)
        assert ours.sigmas.min() <= s <= ours.sigmas.max() * 1.0001
    assert ours.percent_to_sigma(1.0) == 0.0
    assert torch.equal(ours.timestep(ours.sigmas[[0, 500, 999]]), torch.tensor([0, 500, 999]))


def test_flow_schedule_shift_and_multiplier():
    ms = FlowSchedule(shift=3.0, multiplier=1000.0)
    assert ms.percent_to_sigma(0.5) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert float(ms.timestep(torch.tensor(0.25))) == 250.0
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.2, 0.9])
    x_t = ms.noise_scaling(sigma, noise, x0)
    torch.testing.assert_close(x_t, sigma.view(2, 1, 1, 1) * noise
                               + (1 - sigma.view(2, 1, 1, 1)) * x0)
    v = noise - x0  # the velocity target: denoised from it is x0 exactly
    torch.testing.assert_close(ms.calculate_denoised(sigma, v, x_t), x0)


@pytest.mark.parametrize("make,kind", SCHEDULES[:4])
def test_output_scale_is_the_slope_of_denoised(make, kind):
    ms = make()
    sigma, like = torch.tensor([0.3, 2.0]), torch.zeros(2, 4, 2, 2)
    slope = output_scale(ms, sigma, like)
    x, a, b = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    diff = ms.calculate_denoised(sigma, a, x) - ms.calculate_denoised(sigma, b, x)
    torch.testing.assert_close(diff, slope * (a - b))


def test_sampled_sigmas_stay_in_the_schedule():
    ms = StandInSampling("eps")
    s = sample_sigmas(ms, 4000, torch.Generator().manual_seed(0))
    assert float(s.min()) >= float(ms.sigma_min) and float(s.max()) <= float(ms.sigma_max)
    expected = float((ms.sigmas < 1).float().mean())  # uniform over the 1000 timesteps
    assert math.isclose(float((s < 1).float().mean()), expected, abs_tol=0.03)


def test_euler_preview_runs_from_noise_to_an_estimate():
    ms = StandInSampling("eps")

    def apply_model(x, sigma, **_):
        return ms.calculate_denoised(sigma, torch.zeros_like(x), x) * 0  # predicts x0 = 0

    out = euler_sample(ApplyModelDenoiser(torch.nn.Identity(), ms, apply_model), {},
                       (1, 4, 8, 8), 5, seed=0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() < 1e-4
