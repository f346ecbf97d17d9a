"""Model families as data: one module per family in this package, found automatically.

Adding a family touches nothing but its entry and its stand-in (the contract):

1. ``lora2_engine/families/<name>.py`` defines ``FAMILY = Family(...)`` (``base.py``): how it is
   recognised (ComfyUI's ``model_config`` class names or ``unet_config["image_model"]``; a
   diffusers class), ``targets`` (attention projections) and ``targets_mlp`` (the opt-in MLPs),
   ``naming`` (module name → file keys per key style, with split rules for fused modules),
   ``entropy`` (a capture of its text→image attention, or ``None``: λ_e > 0 is then refused),
   ``cond_keys`` / ``conditioning`` / ``schedule`` (how its denoiser is called and conditioned
   on the engine side), ``inplace_blocks`` / ``grad_checkpointing`` and ``stand_in``.
2. ``lora2_engine/models/tiny_<name>.py`` (named by ``stand_in``) is the tiny stand-in, with
   real key names and shapes so that ComfyUI itself detects the family. It provides
   ``build(seed=0, dtype=torch.float32) -> nn.Module`` (ComfyUI's calling convention:
   ``model(x, timesteps, context=..., **conds)``), ``comfy_state_dict(model)`` (the file
   ComfyUI's loaders open), ``example_conds(batch, seed) -> dict`` (conditioning in ComfyUI's
   names, no text encoder needed), ``LATENT_SHAPE`` and ``COMFY_MODEL_NAMES`` (what ComfyUI
   0.28.0 detects), and ``comfy_versions`` (the ComfyUI versions where it is detectable,
   with the reason for any other) plus, when ``diffusers_class`` is set,
   ``diffusers_model(model)`` (the same weights in the diffusers class, for the round trip).

The engine itself never imports a stand-in; tests, the demo and ``bench/`` do. Tests iterate
:func:`registry` (``tests/test_families.py`` and ``tests/comfyui/test_families.py``), so a new
entry is picked up by the key-style, diffusers and stock-LoraLoader checks without edits.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from functools import cache

from .base import KEY_STYLES, Family, Rename, TableNaming, UNetNaming

__all__ = ["KEY_STYLES", "Family", "Rename", "TableNaming", "UNetNaming", "registry", "get",
           "find", "from_comfy", "from_diffusers"]


@cache
def registry() -> dict[str, Family]:
    """Every family entry of this package, by name (modules whose ``FAMILY`` is set)."""
    out: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(fam, Family):
            out[fam.name] = fam
    return out


def find(name: str | None) -> Family | None:
    return registry().get(name or "")


def get(name: str) -> Family:
    fam = find(name)
    if fam is None:
        raise ValueError(f"model family {name!r} is unknown: LoRA² knows "
                         f"{', '.join(f.display for f in registry().values())}")
    return fam


def from_comfy(config_names: Sequence[str], unet_config: dict | None = None) -> Family | None:
    """The family of a ComfyUI model from its ``model_config`` class (and MRO) names and its
    detected ``unet_config`` (``image_model`` for DiTs)."""
    image_model = (unet_config or {}).get("image_model")
    for fam in registry().values():
        if set(config_names) & set(fam.comfy_configs):
            return fam
        if image_model and image_model in fam.comfy_image_models:
            return fam
    return None


def from_diffusers(class_name: str, config: dict) -> Family | None:
    """The family of a diffusers model from its class name and config."""
    for fam in registry().values():
        if fam.diffusers_match is not None and fam.diffusers_match(class_name, config):
            return fam
    return None
