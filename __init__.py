"""LoRA² for ComfyUI: train, inspect, apply and merge adaptive-rank LoRA adapters.

ComfyUI imports this folder as a package and calls :func:`comfy_entrypoint` (node API V3).
Nothing ComfyUI-specific is imported at module level, so the engine and its tests can import
this package, or never touch it, without a ComfyUI install.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """The extension ComfyUI registers: the five LoRA² nodes."""
    from .nodes.extension import LoRA2Extension

    return LoRA2Extension()
