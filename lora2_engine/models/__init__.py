"""Model stand-ins with real ComfyUI key layouts, for tests and the CPU demo."""

from .tiny import (
    COMFY_PREFIX,
    SD15_TINY,
    SDXL_TINY,
    SPECS,
    CrossAttention,
    TinyTextEncoder,
    TinyUNet,
    TinyVAE,
    UNetSpec,
    attention_module_names,
    build_tiny,
    build_unet,
    comfy_state_dict,
    cross_attention_modules,
    sdxl_adm,
    timestep_embedding,
)

__all__ = [
    "COMFY_PREFIX",
    "SD15_TINY",
    "SDXL_TINY",
    "SPECS",
    "CrossAttention",
    "TinyTextEncoder",
    "TinyUNet",
    "TinyVAE",
    "UNetSpec",
    "attention_module_names",
    "build_tiny",
    "build_unet",
    "comfy_state_dict",
    "cross_attention_modules",
    "sdxl_adm",
    "timestep_embedding",
]
