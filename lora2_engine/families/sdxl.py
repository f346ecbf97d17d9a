"""Stable Diffusion XL (and ComfyUI's SDXL subclasses: SSD-1B, Vega, KOALA): LDM UNet with
cross-attention on CLIP-L + OpenCLIP-G text (2048 wide) and a 2816-wide ``y`` vector."""

from __future__ import annotations

import math

import torch

from .base import Family, UNetNaming
from .sd15 import ATTENTION, FEED_FORWARD, cross_attention, ldm_schedule, unet_layout

ADM_EMBED_DIM = 256  # one sinusoidal embedding per size/crop number


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM sinusoidal embedding, cosine half first (the order the trained weights expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def sdxl_adm(pooled: torch.Tensor, height: int, width: int, crop_top: int = 0,
             crop_left: int = 0, target_height: int | None = None,
             target_width: int | None = None) -> torch.Tensor:
    """SDXL ``y``: pooled text (1280) + embeddings of original size, crop, target size (pixels).

    Same order and embedding as ComfyUI's ``model_base.SDXL.encode_adm``.
    """
    values = [height, width, crop_top, crop_left,
              height if target_height is None else target_height,
              width if target_width is None else target_width]
    t = torch.tensor(values, dtype=torch.float32, device=pooled.device)
    flat = timestep_embedding(t, ADM_EMBED_DIM).flatten()
    return torch.cat([pooled, flat.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=1)


def conditioning(context, pooled, width: int, height: int) -> dict:
    """What ComfyUI's SDXL ``extra_conds`` builds from one caption and the image size."""
    return {"c_crossattn": context, "y": sdxl_adm(pooled[None], height, width)[0]}


def _is_sdxl(class_name: str, config: dict) -> bool:
    return (class_name == "UNet2DConditionModel"
            and config.get("addition_embed_type") == "text_time")


FAMILY = Family(
    name="sdxl",
    display="SDXL",
    naming=UNetNaming(),
    targets=ATTENTION,
    targets_mlp=FEED_FORWARD,
    comfy_configs=("SDXL",),
    diffusers_class="UNet2DConditionModel",
    diffusers_match=_is_sdxl,
    comfy_loads=("kohya", "comfy"),
    diffusers_component="unet",
    cond_keys=("y",),
    conditioning=conditioning,
    schedule=ldm_schedule,
    entropy=cross_attention,
    entropy_where="attn2 (cross-attention on the text)",
    layout=unet_layout("sdxl"),
    kohya_version=("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    stand_in="lora2_engine.models.tiny:SDXL_STAND_IN",
)
