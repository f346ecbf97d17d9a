"""Noise schedules behind ComfyUI's ``model_sampling`` protocol, and the denoising maths on them.

Every model trains the same way, whatever its parameterisation: a noise level ``sigma`` is drawn
uniformly in the model's own timestep schedule (``percent_to_sigma``), the clean latent is noised
(``noise_scaling``), the denoiser returns its *denoised* estimate (``calculate_denoised`` of the
raw output) and the x0 error is divided by ``d denoised / d output``. Every parameterisation is
affine in the raw output, so that quotient is exactly ``output - target`` for eps, v, flow and
x0 prediction (method.md §2, Eq. 11), and one loss serves every family.

A ComfyUI MODEL brings its own ``model_sampling``. :class:`DiscreteSchedule` (SD1.x/SDXL, eps or
v) and :class:`FlowSchedule` (rectified flow: Flux, SD3, ...) are the engine's implementations of
the same protocol (the formulas of k-diffusion / ComfyUI, written from the maths) for the CLI,
the library and the tests, so both paths run the same numbers.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

PREDICTIONS = ("eps", "v")


class ModelSampling(Protocol):
    """What the loss and the sampler need from a schedule (ComfyUI's ``model_sampling``)."""

    sigma_min: torch.Tensor
    sigma_max: torch.Tensor

    def percent_to_sigma(self, percent: float) -> float: ...
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor: ...
    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...
    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor: ...
    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor: ...


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """``sigma`` broadcastable over (B, ...) tensors: a scalar for one value, else (B, 1, ...)."""
    return sigma.view(()) if sigma.numel() == 1 else sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class _SigmaTable:
    """A schedule tabulated at its training timesteps: ``sigmas`` ascending."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]


class DiscreteSchedule(_SigmaTable):
    """The DDPM ``scaled_linear`` schedule of SD1.x/SDXL as sigmas (eps or v prediction).

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; ``percent_to_sigma`` interpolates ``log sigma``
    between the 1000 training timesteps and ``timestep`` returns the nearest one.
    """

    def __init__(self, prediction: str = "eps", num_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: choose one of {PREDICTIONS} "
                             "(rectified flow is FlowSchedule)")
        self.prediction = prediction
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                               dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, 0)
        sigmas = ((1 - abar) / abar) ** 0.5  # in float64, then stored in float32
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, noise.ndim)
        return noise / (s**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, model_output.ndim)
        if self.prediction == "v":
            return model_input / (s**2 + 1.0) - model_output * s / (s**2 + 1.0) ** 0.5
        return model_input - model_output * s

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        s = _per_sample(sigma, noise.ndim)
        noise = noise * torch.sqrt(1.0 + s**2.0) if max_denoise else noise * s
        return noise + latent_image


class FlowSchedule(_SigmaTable):
    """Rectified flow: ``x_t = sigma * noise + (1 - sigma) * x0``; the model predicts
    ``noise - x0``. ``shift`` warps sigma toward noise (SD3: 3.0; Flux schnell: 1.0) and the
    model sees ``timestep = sigma * multiplier`` (1000 for SD3, 1 for Flux)."""

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0,
                 num_timesteps: int = 1000) -> None:
        self.shift, self.multiplier = shift, multiplier
        ts = torch.arange(1, num_timesteps + 1, 1) / num_timesteps * multiplier
        self.sigmas = self.sigma(ts)

    def _shifted(self, t):
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._shifted(timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self._shifted(1.0 - percent)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        return model_input - model_output * _per_sample(sigma, model_output.ndim)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        s = _per_sample(sigma, noise.ndim)
        return s * noise + (1.0 - s) * latent_image


class FluxShiftSchedule(FlowSchedule):
    """Rectified flow with the exponential shift of Flux dev, Qwen-Image and Chroma:
    ``sigma = e^mu / (e^mu + (1/t - 1))``, timestep = sigma, a 10000-step table. The curve is
    ``FlowSchedule(shift=e^mu)``'s; it is computed in this form because ComfyUI's
    ``ModelSamplingFlux`` is, and the engine's numbers must be the MODEL's to the bit."""

    def __init__(self, mu: float = 1.15) -> None:
        self.mu = mu
        super().__init__(shift=math.exp(mu), multiplier=1.0, num_timesteps=10000)

    def _shifted(self, t):
        return math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1) ** 1.0)


# ------------------------------------------------------------------ the maths on any schedule
def output_scale(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``d denoised / d model_output`` per sample (every parameterisation is affine in it)."""
    shape = (sigma.shape[0],) + (1,) * (like.ndim - 1)
    one = torch.ones(shape, dtype=like.dtype, device=like.device)
    zero = torch.zeros_like(one)
    return (model_sampling.calculate_denoised(sigma, one, zero)
            - model_sampling.calculate_denoised(sigma, zero, zero))


def sample_sigmas(model_sampling, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` noise levels uniform in the model's own timestep schedule (``percent_to_sigma``)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    sig = [float(model_sampling.percent_to_sigma(float(p))) for p in u]
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    return torch.tensor(sig, dtype=torch.float32).clamp(lo, hi)


def denoising_loss(denoiser):
    """MSE between the model's raw output and its own target (eps, v, flow velocity, x0...),
    as a trainer loss ``loss(batch, generator)``.

    ``denoiser(x_t, sigma, **conds)`` returns the *denoised* estimate (ComfyUI's
    ``apply_model``); ``denoiser.model_sampling`` is its schedule. Everything in ``batch`` but
    ``latents`` is conditioning, passed by name. Dividing the x0 error by :func:`output_scale`
    gives ``output - target`` exactly (Eq. 11).

    With ``shard`` (data-parallel, ``parallel.Shard``) ``batch`` holds rows ``start:stop`` of
    a global batch: the noise levels and noise are drawn for the whole global batch, so every
    process draws the same numbers and uses its own rows of them.
    """
    from .objective import mse_target

    ms = denoiser.model_sampling

    def loss(batch: dict, generator: torch.Generator, shard=None) -> torch.Tensor:
        x0 = batch["latents"]
        rows = slice(0, x0.shape[0]) if shard is None else slice(shard.start, shard.stop)
        total = x0.shape[0] if shard is None else shard.total
        sigma = sample_sigmas(ms, total, generator)[rows].to(x0.device)
        noise = torch.randn((total, *x0.shape[1:]), generator=generator,
                            dtype=torch.float32)[rows].to(x0)
        x_t = ms.noise_scaling(sigma, noise, x0)
        conds = {k: v for k, v in batch.items() if k != "latents" and torch.is_tensor(v)}
        denoised = denoiser(x_t, sigma, **conds).float()
        err = (denoised - x0.float()) / output_scale(ms, sigma, denoised)
        return mse_target(err, torch.zeros_like(err))

    loss.shardable = True
    return loss


@torch.no_grad()
def euler_sample(denoiser, conds: dict, shape: tuple[int, ...], steps: int, seed: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A few Euler steps from pure noise (training previews; cfg 1, no negative prompt)."""
    ms = denoiser.model_sampling
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g).to(device)
    hi = float(ms.sigma_max)
    sig = [min(float(ms.percent_to_sigma(i / steps)), hi) for i in range(steps)]
    sigmas = torch.tensor(sig + [0.0], dtype=torch.float32, device=device)
    x = ms.noise_scaling(sigmas[:1].expand(shape[0]), noise, torch.zeros_like(noise),
                         max_denoise=True)
    for i in range(steps):
        s = sigmas[i].expand(shape[0])
        denoised = denoiser(x, s, **conds).float()
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x

