"""Noise schedules written for the tests from the textbook formulas (k-diffusion's EPS, V,
rectified-flow CONST and X0 parameterisations with sigma_data = 1), independent of
``lora2_engine/schedule.py``, with ComfyUI's method names."""

from __future__ import annotations

import torch


class StandInSampling:
    """sigma schedule + parameterisation with ComfyUI's method names, sigma_data = 1."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "flow":
            self.sigmas = torch.linspace(0.001, 1.0, 1000)
        else:
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
            ac = torch.cumprod(1 - betas, 0)
            self.sigmas = ((1 - ac) / ac).sqrt().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def percent_to_sigma(self, p: float) -> float:
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return float(self.sigmas[round((1 - p) * 999)])

    def timestep(self, sigma):
        sigmas = self.sigmas.to(sigma.device)
        return (sigma[:, None] - sigmas[None]).abs().argmin(1).float()

    @staticmethod
    def _v(s, like):
        return s.view(s.shape[:1] + (1,) * (like.ndim - 1))

    def calculate_input(self, sigma, x):
        return x if self.kind == "flow" else x / (self._v(sigma, x) ** 2 + 1) ** 0.5

    def noise_scaling(self, sigma, noise, x0, max_denoise=False):
        s = self._v(sigma, noise)
        if self.kind == "flow":
            return s * noise + (1 - s) * x0
        return x0 + noise * ((1 + s**2) ** 0.5 if max_denoise else s)

    def calculate_denoised(self, sigma, out, x):
        s = self._v(sigma, out)
        if self.kind == "v":
            return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5
        if self.kind == "x0":
            return out
        return x - out * s

    def target(self, sigma, noise, x0):
        """The regression target of the raw output, written independently of the code."""
        s = self._v(sigma, noise)
        return {"eps": noise, "v": (noise - s * x0) / (s**2 + 1) ** 0.5,
                "flow": noise - x0, "x0": x0}[self.kind]
