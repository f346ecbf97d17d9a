"""Training precision: the autocast dtype of each step and the dtype of the adapters.

The frozen weights stay as the model holds them (fp32, bf16, fp16 or fp8: ComfyUI's cast
layers dequantise one layer at a time in its forward), the step runs under ``torch.autocast``
in ``training_dtype`` and the adapters' ``A``/``B`` are stored in ``adapter_dtype``; ``nu`` and
the optimizer's arithmetic stay fp32.

``auto`` picks bf16 on a CUDA device that supports it (fp16 with a GradScaler on older GPUs)
and fp32 on the CPU: without native bf16 arithmetic (AVX512-BF16 / AMX), CPU autocast to bf16
measured 4x (tiny Flux) to 13x (tiny SDXL) slower than fp32 on the 2-core test machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError

TRAINING_DTYPES = ("auto", "bf16", "fp16", "fp32")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionConfig:
    """How a run computes (``training_dtype``) and stores its adapters (``adapter_dtype``)."""

    training_dtype: str = field(default="auto", metadata={"help": "auto, bf16, fp16, fp32"})
    adapter_dtype: str = field(default="fp32", metadata={"help": "fp32, bf16, fp16"})

    def __post_init__(self) -> None:
        if self.training_dtype not in TRAINING_DTYPES:
            raise ConfigError(f"training_dtype={self.training_dtype!r} is invalid: choose one "
                              f"of {TRAINING_DTYPES}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype={self.adapter_dtype!r} is invalid: choose one of "
                              f"{ADAPTER_DTYPES}")

    def resolve(self, device: torch.device | str) -> tuple[str, torch.dtype]:
        """``(TrainConfig.mixed_precision, adapter dtype)`` for training on ``device``."""
        device = torch.device(device)
        dtype = self.training_dtype
        if dtype == "auto":
            if device.type == "cuda":
                dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                dtype = "fp32"
        if dtype == "fp16" and device.type != "cuda":
            raise ConfigError("training_dtype='fp16' needs a CUDA device (its loss scaling is "
                              "CUDA's GradScaler): use bf16 or fp32 here")
        if dtype == "fp16" and self.adapter_dtype == "fp16":
            raise ConfigError("adapter_dtype='fp16' with training_dtype='fp16': the GradScaler "
                              "needs fp32 (or bf16) adapters; use adapter_dtype fp32")
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[dtype]
        return mixed, _TORCH[self.adapter_dtype]
