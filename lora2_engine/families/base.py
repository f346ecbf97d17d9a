"""The :class:`Family` record, and the key-naming pieces that family entries are built from.

A family entry is data: how ComfyUI and diffusers recognise the model, which modules LoRA²
adapts, how each adapted module is named in each key style (kohya, ComfyUI, diffusers/PEFT,
with the rules that split a fused module), where its text→image attention is (entropy term),
how its denoiser is called and conditioned, and which tiny stand-in tests it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..formats.keys import UNetLayout, file_key

KEY_STYLES = ("kohya", "comfy", "diffusers")
Rows = tuple[int, int] | None  # a slice of the weight's rows (output features), or all of it


class Naming(Protocol):
    """Module name (ComfyUI's ``diffusion_model.`` tree) → the key prefixes it gets in a file."""

    def file_keys(self, name: str, style: str, layout: UNetLayout, m: int,
                  n: int) -> list[tuple[str, Rows]]:
        """Key prefixes and the rows of ``Delta W`` (m, n) each holds; one entry unless the
        style stores this fused module as several (e.g. diffusers' to_q/to_k/to_v)."""
        ...


@dataclass(frozen=True)
class UNetNaming:
    """SD1.x / SDXL: LDM names ↔ diffusers names by the UNet's layout (``formats/keys.py``)."""

    def file_keys(self, name: str, style: str, layout: UNetLayout, m: int,
                  n: int) -> list[tuple[str, Rows]]:
        return [(file_key(name, style, layout), None)]


@dataclass(frozen=True)
class Rename:
    """One ComfyUI module name pattern and its name in another style; ``{}`` is a block index.

    ``other`` is a tuple when that style splits the fused ComfyUI module into several modules,
    rows of the weight in order; ``rows(m, n)`` gives each part's number of rows. The export
    then writes the same ``A`` for every part and ``B`` split by rows, which is exact:
    ``B[r0:r1] @ A`` are the rows ``r0:r1`` of ``B @ A``.
    """

    comfy: str
    other: str | tuple[str, ...]
    rows: Callable[[int, int], tuple[int, ...]] | None = None

    def match(self, name: str) -> tuple[str, ...] | None:
        pattern = "^" + re.escape(self.comfy).replace(r"\{\}", r"(\d+)") + "$"
        m = re.match(pattern, name)
        return m.groups() if m else None


@dataclass(frozen=True)
class TableNaming:
    """DiT families: ComfyUI names are the original checkpoint's; kohya/sd-scripts writes them
    with ``_`` for ``.`` after ``lora_unet_``; diffusers names come from a :class:`Rename`
    table under ``transformer.``."""

    diffusers: tuple[Rename, ...] = ()
    diffusers_prefix: str = "transformer."
    kohya_prefix: str = "lora_unet_"

    def file_keys(self, name: str, style: str, layout: UNetLayout, m: int,
                  n: int) -> list[tuple[str, Rows]]:
        if style == "comfy":
            return [("diffusion_model." + name, None)]
        if style == "kohya":
            return [(self.kohya_prefix + name.replace(".", "_"), None)]
        if style != "diffusers":
            raise ValueError(f"key style {style!r}: choose one of {KEY_STYLES}")
        for rule in self.diffusers:
            groups = rule.match(name)
            if groups is None:
                continue
            parts = (rule.other,) if isinstance(rule.other, str) else rule.other
            names = [self.diffusers_prefix + p.format(*groups) for p in parts]
            if rule.rows is None:
                return [(names[0], None)]
            sizes = rule.rows(m, n)
            if sum(sizes) != m or len(sizes) != len(names):
                raise ValueError(f"{name}: split sizes {sizes} do not cover its {m} rows")
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return [(k, (s, s + r)) for k, s, r in zip(names, starts, sizes)]
        raise ValueError(f"{name} has no diffusers name in this family: export it with the "
                         "kohya or comfy key style, or leave it out of the targets")


@dataclass(frozen=True)
class Family:
    """One model family, as data (see the package docstring for the contract)."""

    name: str  # registry key, written to files as ``lora2.family``
    display: str  # for messages and the README table
    naming: Naming
    targets: tuple[str, ...]  # default adapted modules (name suffixes): attention projections
    targets_mlp: tuple[str, ...] = ()  # added by the "attention+mlp" choice
    comfy_configs: tuple[str, ...] = ()  # ComfyUI supported_models classes (any in the MRO)
    comfy_image_models: tuple[str, ...] = ()  # or ComfyUI's detected unet_config["image_model"]
    diffusers_class: str = ""  # diffusers model class of this family ("" = none)
    diffusers_match: Callable[[str, dict], bool] | None = None  # (class name, config)
    comfy_loads: tuple[str, ...] = ("kohya", "comfy")  # styles stock LoraLoader maps
    diffusers_component: str = "unet"  # PEFT metadata prefix in diffusers files
    cond_keys: tuple[str, ...] = ()  # conditioning passed by name besides c_crossattn
    conditioning: Callable[..., dict] | None = None  # (context, pooled, width, height) -> conds
    schedule: Callable[[], Any] | None = None  # the family's own noise schedule (engine side)
    entropy: Callable[[Any], Any] | None = None  # module -> capture of text→image attention
    entropy_where: str = ""  # what the entropy term measures, for the README
    layout: Callable[[dict], UNetLayout] | None = None  # from ComfyUI's unet_config vocabulary
    inplace_blocks: bool = False  # ComfyUI's blocks add residuals in place (see checkpointing)
    grad_checkpointing: bool = False  # default when the node's input is "auto"
    latent_channels: int = 4
    kohya_version: tuple[str, str] | None = None  # ss_base_model_version, modelspec arch
    file_signature: tuple[str, ...] = ()  # key fragments marking this family's foreign files
    stand_in: str = ""  # module of the tiny stand-in (tests, demo, bench)
    notes: dict[str, str] = field(default_factory=dict)  # README cells that need a reason

    def model_layout(self, unet_config: dict | None = None) -> UNetLayout:
        return self.layout(unet_config or {}) if self.layout else UNetLayout(self.name)

    def resolve_targets(self, choice: str) -> tuple[str, ...]:
        """``attention`` (default), ``attention+mlp``, or comma-separated name suffixes."""
        choice = (choice or "attention").strip()
        if choice == "attention":
            return self.targets
        if choice in ("attention+mlp", "attention + mlp"):
            return self.targets + self.targets_mlp
        return tuple(t.strip() for t in choice.split(",") if t.strip())

    def check_key_style(self, style: str, in_comfyui: bool = False) -> None:
        """Refuse a key style this family's files cannot be written in (or ComfyUI can't load)."""
        if style == "diffusers" and not self.diffusers_class:
            raise ValueError(f"{self.display} has no diffusers model: use key style kohya or "
                             "comfy")
        if in_comfyui and style not in self.comfy_loads:
            raise ValueError(f"key style {style!r}: stock ComfyUI does not load these names for "
                             f"{self.display}; use one of {', '.join(self.comfy_loads)} (or "
                             "export diffusers-style files with the command line)")

    def check_entropy(self, lambda_e: float) -> None:
        """λ_e > 0 needs text→image attention to measure; refuse it rather than train without."""
        if lambda_e > 0 and self.entropy is None:
            raise ValueError(f"lambda_e={lambda_e}: {self.display} has no text→image attention "
                             "for the entropy term; set lambda_e to 0")
