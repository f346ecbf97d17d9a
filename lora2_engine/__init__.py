"""LoRA² engine: adaptive-rank LoRA adapters that learn their own rank while they train.

Pure torch + safetensors; ComfyUI, diffusers and matplotlib are optional and imported lazily.
"""

from .config import AdapterConfig, ConfigError, ExportConfig, TrainConfig, preset
from .inject import Adapters, attach, detach
from .layer import AdaptiveLoRALayer, LoRALayer

__all__ = [
    "AdapterConfig", "ConfigError", "ExportConfig", "TrainConfig", "preset",
    "Adapters", "attach", "detach", "AdaptiveLoRALayer", "LoRALayer",
]
__version__ = "0.1.0"
