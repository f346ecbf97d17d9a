"""LoRA² engine: adaptive-rank LoRA adapters that learn their own rank while they train.

Pure torch + safetensors; ComfyUI, diffusers and matplotlib are optional and imported lazily.
The names below load on first use, so ``python -m lora2_engine`` is answering (and Ctrl-C is
handled by its error boundary) before torch is imported.
"""

from importlib import import_module

_EXPORTS = {
    "AdapterConfig": ".config", "ConfigError": ".config", "ExportConfig": ".config",
    "TrainConfig": ".config", "preset": ".config",
    "Adapters": ".inject", "attach": ".inject", "detach": ".inject",
    "AdaptiveLoRALayer": ".layer", "LoRALayer": ".layer",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lora2_engine' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
