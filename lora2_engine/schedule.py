"""Noise, timesteps and regression targets behind one small protocol.

A :class:`Schedule` turns clean latents into ``(noisy, timestep, target)`` for the prediction
type the model was trained with: ``eps`` (SD1.5, SDXL), ``v`` (SD2-768) or ``flow``
(rectified flow: target ``noise - x0``). ComfyUI models bring their own schedule (nodes/bridge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PREDICTIONS = ("eps", "v", "flow")


@dataclass
class Schedule:
    """The DDPM ``scaled_linear`` schedule of SD1.x/SDXL, or rectified flow."""

    prediction: str = "eps"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}: choose one of {PREDICTIONS}")
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_timesteps,
                               dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def sample(self, x0: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw noise and timesteps with ``generator``; return ``(x_t, t, target)``."""
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        if self.prediction == "flow":
            s = torch.rand(b, generator=generator).to(x0)  # device and dtype of the latents
            sv = s.view(-1, *[1] * (x0.dim() - 1))
            return (1 - sv) * x0 + sv * noise, s * self.num_timesteps, noise - x0
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator)
        ac = self.alphas_cumprod[t].to(x0).view(-1, *[1] * (x0.dim() - 1))
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        target = noise if self.prediction == "eps" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        return x_t, t.to(device=x0.device, dtype=x0.dtype), target


Predict = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def diffusion_loss(predict: Predict, schedule: Schedule) -> Callable[[dict, torch.Generator],
                                                                     torch.Tensor]:
    """The standard denoising MSE as a trainer loss: ``batch["latents"]`` plus conditioning.

    ``predict(x_t, t, batch)`` runs the model; everything else in ``batch`` is conditioning.
    """
    from .objective import mse_target

    def loss(batch: dict, generator: torch.Generator) -> torch.Tensor:
        x_t, t, target = schedule.sample(batch["latents"], generator)
        return mse_target(predict(x_t, t, batch), target)

    return loss
