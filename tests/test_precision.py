"""Training precision: what ``auto`` picks, what is refused, and fp16 + GradScaler on CUDA."""

from __future__ import annotations

import pytest
import torch

from lora2_engine import preset
from lora2_engine.config import ConfigError
from lora2_engine.diffusion import train_diffusion
from lora2_engine.models.loader import load_model
from lora2_engine.precision import PrecisionConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="fp16 + GradScaler needs a CUDA device; none on this machine")


@pytest.mark.parametrize("training,adapter,want", [
    ("auto", "fp32", ("no", torch.float32)),  # CPU: fp32 (bf16 is emulated and slower here)
    ("bf16", "fp32", ("bf16", torch.float32)),
    ("fp32", "bf16", ("no", torch.bfloat16)),
    ("bf16", "fp16", ("bf16", torch.float16)),
])
def test_cpu_resolution(training, adapter, want):
    assert PrecisionConfig(training, adapter).resolve("cpu") == want


@pytest.mark.parametrize("training,adapter,match", [
    ("fp16", "fp32", "needs a CUDA device"),
    ("fp8", "fp32", "training_dtype='fp8' is invalid"),
    ("bf16", "int8", "adapter_dtype='int8' is invalid"),
])
def test_refusals_name_the_value_and_the_fix(training, adapter, match):
    with pytest.raises(ConfigError, match=match):
        PrecisionConfig(training, adapter).resolve("cpu")


def _run(name: str, precision: PrecisionConfig, device: str = "cpu"):
    bundle = load_model(f"tiny-{name}")
    bundle.denoiser.module.to(device)
    g = torch.Generator().manual_seed(0)
    examples = [{k: v.to(device) for k, v in ex.items()} for ex in bundle.encode(
        [torch.rand(3, 64, 64, generator=g) for _ in range(2)], ["a photo of sks dog"] * 2)]
    a_cfg, t_cfg = preset("spread", steps=3, init_rank=4, lr=1e-3,
                          targets=bundle.family.targets, grad_checkpointing=True)
    seen = {}

    def spy(trainer, rec):
        seen["autocast"] = trainer._amp_dtype
        seen["scaler"] = trainer._scaler is not None
        seen["adapters"] = {p.dtype for p in trainer.adapters.factor_parameters()}

    from lora2_engine.trainer import Callbacks

    res = train_diffusion(bundle.denoiser, examples, bundle.family, a_cfg, t_cfg,
                          callbacks=Callbacks(on_step=spy), precision=precision)
    return res, seen


def test_bf16_autocast_trains_tiny_flux_on_the_cpu():
    res, seen = _run("flux", PrecisionConfig("bf16", "fp32"))
    assert seen == {"autocast": torch.bfloat16, "scaler": False, "adapters": {torch.float32}}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert '"mixed_precision": "bf16"' in res.lora.metadata["lora2.train_config"]


@CUDA
def test_fp16_with_grad_scaler_on_cuda():
    res, seen = _run("flux", PrecisionConfig("fp16", "fp32"), "cuda")
    assert seen == {"autocast": torch.float16, "scaler": True, "adapters": {torch.float32}}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
