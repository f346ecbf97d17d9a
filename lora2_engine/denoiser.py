"""The denoiser a diffusion run trains: a module, its noise schedule, and how it is called.

``denoiser(x_t, sigma, **conds)`` returns the *denoised* estimate; ``denoiser.module`` is the
network adapters attach to and ``denoiser.model_sampling`` its schedule (``schedule.py``).
ComfyUI's MODEL already is one (``BaseModel.apply_model``): ``nodes/bridge.py`` wraps it in
:class:`ApplyModelDenoiser`. The CLI, library and tests wrap a module in
:class:`ModuleDenoiser`, which composes schedule and network exactly as ``apply_model`` does,
so both paths compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class Denoiser(Protocol):
    module: nn.Module
    model_sampling: object

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor: ...


@dataclass
class ApplyModelDenoiser:
    """A ComfyUI-style ``apply_model(x_t, sigma, **conds) -> denoised`` and its module."""

    module: nn.Module
    model_sampling: object
    apply_model: Callable[..., torch.Tensor]

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor:
        return self.apply_model(x_t, sigma, **conds)


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


@dataclass
class ModuleDenoiser:
    """``module(x_in, t, context=c_crossattn, **conds)`` (the calling convention of ComfyUI's
    diffusion models and of the stand-ins) under ``model_sampling``.

    ``call(module, x_in, t, conds)`` replaces the convention for other models (diffusers).
    Inputs are cast to the module's dtype and the output to fp32, as ComfyUI does.
    """

    module: nn.Module
    model_sampling: object
    cond_keys: tuple[str, ...] = ()
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None

    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor:
        ms, dtype = self.model_sampling, self.dtype()
        x_in = ms.calculate_input(sigma, x_t).to(dtype)
        t = ms.timestep(sigma).float()
        if self.call is not None:
            out = self.call(self.module, x_in, t, conds)
        else:
            extra = {k: _cast(conds[k], dtype) for k in self.cond_keys if k in conds}
            out = self.module(x_in, t, context=_cast(conds["c_crossattn"], dtype), **extra)
        return ms.calculate_denoised(sigma, out.float(), x_t)
