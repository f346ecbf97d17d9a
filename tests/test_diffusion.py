"""The one training path (``diffusion.train_diffusion``): what every caller gets from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora2_engine import preset
from lora2_engine.diffusion import train_diffusion
from lora2_engine.families import get
from lora2_engine.formats import read_lora
from lora2_engine.models.loader import load_model
from lora2_engine.precision import PrecisionConfig


def _examples(bundle, n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return bundle.encode([torch.rand(3, size, size, generator=g) for _ in range(n)],
                         ["a photo of sks dog"] * n)


def _configs(**kw):
    return preset("spread", steps=2, init_rank=2, lr=1e-3, **kw)


def test_exports_in_memory_and_writes_only_when_asked(tmp_path):
    bundle = load_model("tiny-sd15")
    a_cfg, t_cfg = _configs()
    res = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                          layout=bundle.layout)
    assert res.lora.path is None and list(tmp_path.iterdir()) == []
    assert res.steps == 2 and len(res.history) == 2 and len(res.lora.modules) == 32
    out = tmp_path / "x.safetensors"
    res2 = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                           layout=bundle.layout, out_file=out)
    assert res2.lora.path == out and read_lora(out).ranks() == res2.lora.ranks()
    for k, w in res.lora.modules.items():  # same seed, same data: the same adapter
        assert torch.equal(w.up, res2.lora.modules[k].up)


def test_the_model_is_restored_and_tampering_is_caught():
    from lora2_engine.trainer import Callbacks

    bundle = load_model("tiny-sd15")
    module = bundle.denoiser.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    a_cfg, t_cfg = _configs()
    train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    def tamper(trainer, rec):
        with torch.no_grad():
            module.out[2].bias.add_(1.0)

    with pytest.raises(RuntimeError, match="changed the incoming model"):
        train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                        callbacks=Callbacks(on_step=tamper))


def test_entropy_needs_text_to_image_attention():
    bundle = load_model("tiny-sd15")
    blind = dataclasses.replace(bundle.family, entropy=None)
    a_cfg, t_cfg = _configs(lambda_e=1e-4)
    with pytest.raises(ValueError, match="no text→image attention.*set lambda_e to 0"):
        train_diffusion(bundle.denoiser, _examples(bundle), blind, a_cfg, t_cfg)
    nothing = dataclasses.replace(bundle.family, entropy=lambda m: get("sd15").entropy(
        torch.nn.Linear(2, 2)))  # finds no attention layer in the model it is given
    with pytest.raises(ValueError, match="no text→image attention layer found"):
        train_diffusion(bundle.denoiser, _examples(bundle), nothing, a_cfg, t_cfg)
    a_cfg, t_cfg = _configs(lambda_e=0.0)  # λ_e 0: fine without
    assert train_diffusion(bundle.denoiser, _examples(bundle), blind, a_cfg, t_cfg).steps == 2


def test_adapter_dtype_is_the_dtype_of_A_and_B():
    bundle = load_model("tiny-sd15")
    a_cfg, t_cfg = _configs()
    seen = []

    def spy(trainer, rec):
        seen.extend({p.dtype for p in trainer.adapters.factor_parameters()})

    from lora2_engine.trainer import Callbacks

    res = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                          callbacks=Callbacks(on_step=spy),
                          precision=PrecisionConfig("fp32", "bf16"))
    assert set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(w.up.float()).all() for w in res.lora.modules.values())



DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
           pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_trains_weights_of_the_compute_dtype_with_checkpointing(device, dtype):
    """On a GPU the weights are fp16 (as ComfyUI loads them there); adapters stay fp32."""
    from lora2_engine.denoiser import ModuleDenoiser
    from lora2_engine.models.tiny import build_unet
    from lora2_engine.schedule import DiscreteSchedule

    unet = build_unet("sd15", seed=0).to(device, dtype)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    examples = [{"latents": torch.randn(4, 8, 8, generator=g).to(device),
                 "c_crossattn": torch.randn(77, 768, generator=g).to(device)} for _ in range(2)]
    a_cfg, t_cfg = _configs(grad_checkpointing=True)
    res = train_diffusion(ModuleDenoiser(unet, DiscreteSchedule()), examples, "sd15", a_cfg,
                          t_cfg)
    assert all(torch.isfinite(w.up).all() for w in res.lora.modules.values())
    assert any(w.up.abs().max() > 0 for w in res.lora.modules.values())
    assert all(k.startswith("lora_unet_") for k in res.lora.modules)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
