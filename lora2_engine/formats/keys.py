"""Key styles as data: mapping module names between ComfyUI/LDM, diffusers and kohya.

Adapters are named after the model they were trained on: LDM names (``input_blocks.4.1...``;
ComfyUI and the SGM SDXL code) or diffusers names (``down_blocks.1.attentions.0...``). A UNet's
layout (res blocks per level) is all it takes to map the transformer sub-trees between the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs to know about a UNet: its family and res blocks per level."""

    family: str  # "sd15", "sdxl" or "other"
    num_res_blocks: tuple[int, ...] = ()
    has_middle: bool = True

    def input_map(self) -> dict[int, tuple[int, int]]:
        """LDM ``input_blocks`` index → diffusers ``(down_block, attention)``."""
        out, idx, last = {}, 1, len(self.num_res_blocks) - 1
        for level, nrb in enumerate(self.num_res_blocks):
            for k in range(nrb):
                out[idx] = (level, k)
                idx += 1
            idx += level != last  # the downsampler takes a slot
        return out

    def output_map(self) -> dict[int, tuple[int, int]]:
        """LDM ``output_blocks`` index → diffusers ``(up_block, attention)``."""
        out, idx = {}, 0
        for up, nrb in enumerate(reversed(self.num_res_blocks)):
            for k in range(nrb + 1):
                out[idx] = (up, k)
                idx += 1
        return out


SD15 = UNetLayout("sd15", (2, 2, 2, 2))
SDXL = UNetLayout("sdxl", (2, 2, 2), has_middle=True)
OTHER = UNetLayout("other")
KNOWN_LAYOUTS = {"sd15": SD15, "sdxl": SDXL}

_LDM_IN = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_LDM_OUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.+)$")
_DF_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DF_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DF_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


def is_ldm_name(name: str) -> bool:
    return name.startswith(("input_blocks.", "middle_block.", "output_blocks."))


def is_diffusers_name(name: str) -> bool:
    return name.startswith(("down_blocks.", "mid_block.", "up_blocks."))


def ldm_to_diffusers(name: str, layout: UNetLayout) -> str | None:
    """Map an LDM transformer-subtree name to diffusers; ``None`` where no mapping exists."""
    if m := _LDM_IN.match(name):
        hit = layout.input_map().get(int(m[1]))
        return hit and f"down_blocks.{hit[0]}.attentions.{hit[1]}.{m[2]}"
    if m := _LDM_OUT.match(name):
        hit = layout.output_map().get(int(m[1]))
        return hit and f"up_blocks.{hit[0]}.attentions.{hit[1]}.{m[2]}"
    if m := _LDM_MID.match(name):
        return f"mid_block.attentions.0.{m[1]}"
    return None


def diffusers_to_ldm(name: str, layout: UNetLayout) -> str | None:
    """Inverse of :func:`ldm_to_diffusers`."""
    if m := _DF_DOWN.match(name):
        inv = {v: k for k, v in layout.input_map().items()}
        idx = inv.get((int(m[1]), int(m[2])))
        return None if idx is None else f"input_blocks.{idx}.1.{m[3]}"
    if m := _DF_UP.match(name):
        inv = {v: k for k, v in layout.output_map().items()}
        idx = inv.get((int(m[1]), int(m[2])))
        return None if idx is None else f"output_blocks.{idx}.1.{m[3]}"
    if m := _DF_MID.match(name):
        return f"middle_block.1.{m[1]}"
    return None


def as_ldm(name: str, layout: UNetLayout) -> str:
    return (diffusers_to_ldm(name, layout) or name) if is_diffusers_name(name) else name


def as_diffusers(name: str, layout: UNetLayout) -> str:
    return (ldm_to_diffusers(name, layout) or name) if is_ldm_name(name) else name


def file_key(name: str, style: str, layout: UNetLayout) -> str:
    """The key prefix a module gets in a file of ``style`` (what stock loaders look for).

    kohya: sd-scripts names SDXL modules after the SGM (LDM) UNet and SD1.x modules after
    diffusers; ComfyUI: ``diffusion_model.`` + LDM name; diffusers/PEFT: ``unet.`` + diffusers.
    """
    if style == "kohya":
        base = as_diffusers(name, layout) if layout.family == "sd15" else as_ldm(name, layout)
        return "lora_unet_" + base.replace(".", "_")
    if style == "comfy":
        return "diffusion_model." + as_ldm(name, layout)
    if style == "diffusers":
        return "unet." + as_diffusers(name, layout)
    raise ValueError(f"key style {style!r}: choose kohya, comfy or diffusers")
