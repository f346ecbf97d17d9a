"""File formats: key styles, metadata, atomic save and safe load (method.md §4)."""

from .io import LoraFileError, atomic_write_bytes, load_tensors, save_tensors
from .lora_file import (
                        LoraFile,
                        ModuleWeights,
                        adapters_to_lora,
                        export_adapters,
                        read_lora,
                        write_lora,
)

__all__ = ["LoraFileError", "atomic_write_bytes", "load_tensors", "save_tensors", "LoraFile",
           "ModuleWeights", "adapters_to_lora", "export_adapters", "read_lora", "write_lora"]
