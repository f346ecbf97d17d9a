"""Stable Diffusion 1.x: the LDM UNet with cross-attention on CLIP-L text (768 wide)."""

from __future__ import annotations

from ..formats.keys import UNetLayout
from .base import Family, UNetNaming

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")


def unet_layout(family: str):
    """The key layout of an LDM UNet from ComfyUI's ``unet_config`` (res blocks per level)."""

    def layout(cfg: dict) -> UNetLayout:
        nrb = cfg.get("num_res_blocks") or ()
        if not isinstance(nrb, (list, tuple)):
            nrb = (nrb,) * len(cfg.get("channel_mult") or ())
        return UNetLayout(family, tuple(nrb), cfg.get("transformer_depth_middle", 0) != -2)

    return layout


def cross_attention(module):
    """Entropy of every ``attn2`` (cross-attention on the text) of an LDM UNet."""
    from ..objective import EntropyCapture

    return EntropyCapture(module, "attn2")


def ldm_schedule():
    from ..schedule import DiscreteSchedule

    return DiscreteSchedule("eps")


def text_only(context, pooled, width: int, height: int) -> dict:
    return {"c_crossattn": context}


def _is_sd15(class_name: str, config: dict) -> bool:
    return (class_name == "UNet2DConditionModel" and config.get("cross_attention_dim") == 768
            and config.get("addition_embed_type") != "text_time")


FAMILY = Family(
    name="sd15",
    display="SD1.5",
    naming=UNetNaming(),
    targets=ATTENTION,
    targets_mlp=FEED_FORWARD,
    comfy_configs=("SD15",),
    diffusers_class="UNet2DConditionModel",
    diffusers_match=_is_sd15,
    comfy_loads=("kohya", "comfy"),
    diffusers_component="unet",
    conditioning=text_only,
    schedule=ldm_schedule,
    entropy=cross_attention,
    entropy_where="attn2 (cross-attention on the text)",
    layout=unet_layout("sd15"),
    kohya_version=("sd_v1", "stable-diffusion-v1/lora"),
    stand_in="lora2_engine.models.tiny:SD15_STAND_IN",
)
