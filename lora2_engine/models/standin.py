"""What a family's tiny stand-in provides (tests, the demo and ``bench/`` use it; the engine
never does). See the contract in ``lora2_engine/families/__init__.py``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class StandIn:
    """A tiny model with a family's real key names and shapes, random weights."""

    family: str
    build: Callable[..., nn.Module]  # (seed=0, dtype=float32) -> the ComfyUI-layout model
    comfy_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]  # UNETLoader's file
    comfy_names: tuple[str, ...]  # model_config classes ComfyUI 0.28.0 detects (any)
    latent_shape: tuple[int, int, int]  # (C, h, w) of a test latent
    context_dim: int  # width of c_crossattn
    pooled_dim: int  # width of the pooled text vector (0: none)
    latent_scale: float  # of the VAE stand-in
    how_made: str  # one line for the README
    unet_config: Callable[[nn.Module], dict] = lambda _m: {}  # ComfyUI vocabulary (layout)
    # ComfyUI version -> build() size arguments ("context": its c_crossattn width if not
    # context_dim); a version missing here is not tested, with the reason in ``why_not``
    sizes: dict[str, dict] = field(default_factory=dict)
    why_not: dict[str, str] = field(default_factory=dict)
    diffusers_model: Callable[[nn.Module], nn.Module] | None = None  # same shapes, diffusers


def load_stand_in(family) -> StandIn:
    """The stand-in a family entry names (``"module:attribute"``)."""
    module, _, attr = family.stand_in.partition(":")
    if not module:
        raise ValueError(f"{family.display} has no tiny stand-in")
    return getattr(importlib.import_module(module), attr or "STAND_IN")
