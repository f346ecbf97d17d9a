"""One training path: TrainAdaptiveLoRA's route and the CLI/library route give the same adapter,
bit for bit, on the same tiny model, seed and data. Fails if ``nodes/`` grows its own loss,
noise sampling or sampler again.

Without ComfyUI the node route is reproduced with its ComfyUI-free parts (``nodes/core``: the
configs, stacking, inference-tensor release) and a denoiser shaped like ComfyUI's MODEL: an
``apply_model`` composed the way ``BaseModel.apply_model`` composes schedule and UNet, on a UNet
created under ``inference_mode`` as ComfyUI loads it. ``test_inprocess.py`` (check
``one_path``) repeats it through the real bridge and ``nodes/train.py`` on ComfyUI's own MODEL.
"""

from __future__ import annotations

import importlib
import re

import torch

from .conftest import PACK, REPO


def _comfy_style_denoiser(engine, unet, ms):
    """What ``bridge.load_for_training`` hands the engine: ``apply_model`` + model_sampling."""

    def apply_model(x, sigma, c_crossattn=None, **conds):
        dtype = unet.out[2].weight.dtype
        xc = ms.calculate_input(sigma, x).to(dtype)
        t = ms.timestep(sigma).float()
        out = unet(xc, t, context=c_crossattn.to(dtype), **conds)
        return ms.calculate_denoised(sigma, out.float(), x)

    return engine.denoiser.ApplyModelDenoiser(unet, ms, apply_model)


def test_node_route_and_cli_route_give_the_same_adapter_bit_for_bit(core):
    engine = importlib.import_module(f"{PACK}.lora2_engine")
    for sub in ("denoiser", "diffusion", "models.loader", "models.tiny", "schedule",
                "config"):
        importlib.import_module(f"{PACK}.lora2_engine.{sub}")
    loader, tiny = engine.models.loader, engine.models.tiny
    settings = {"steps": 3, "seed": 5, "lr": 1e-3, "init_rank": 3, "targets": "attention"}

    # the CLI / library route: a stand-in bundle and preset()
    cli = loader.load_model("tiny-sd15")
    g = torch.Generator().manual_seed(0)
    pixels = [torch.rand(3, 64, 64, generator=g) for _ in range(3)]
    examples = cli.encode(pixels, ["a photo of sks dog"] * 3)
    fam = cli.family
    a_cli, t_cli = engine.config.preset("spread", **{**settings,
                                                      "targets": fam.resolve_targets("attention")})
    ours = engine.diffusion.train_diffusion(cli.denoiser, examples, fam, a_cli, t_cli,
                                            layout=cli.layout)

    # the node route: a MODEL's UNet made under inference_mode, ComfyUI-shaped denoiser
    with torch.inference_mode():
        unet = tiny.build_unet("sd15", seed=0)
    core.release_inference_tensors(unet)
    a_node, t_node = core.build_configs("spread", {**settings, "r_target": None,
                                                    "targets": fam.resolve_targets("attention")})
    data = core.stackable([{k: v.clone() for k, v in ex.items()} for ex in examples], 1)
    theirs = engine.diffusion.train_diffusion(
        _comfy_style_denoiser(engine, unet, engine.schedule.DiscreteSchedule("eps")), data, fam,
        a_node, t_node, layout=fam.model_layout(tiny.unet_config(unet)))

    assert [h["loss"] for h in ours.history] == [h["loss"] for h in theirs.history]
    assert ours.ranks == theirs.ranks
    assert ours.lora.modules.keys() == theirs.lora.modules.keys()
    for key, w in ours.lora.modules.items():
        assert torch.equal(w.down, theirs.lora.modules[key].down), key
        assert torch.equal(w.up, theirs.lora.modules[key].up), key
    assert any(w.up.abs().max() > 0 for w in ours.lora.modules.values())  # it learned


# The names of the maths that must live in the engine (lora2_engine/schedule.py).
DENOISING_MATHS = re.compile(r"\b(randn|rand|percent_to_sigma|calculate_denoised|noise_scaling|"
                             r"calculate_input|mse_loss|mse_target|sample_sigmas|output_scale|"
                             r"euler_sample|denoising_loss)\b")


def test_nodes_hold_no_loss_noise_or_sampler_code():
    hits = [f"{path.name}:{i}: {line.strip()}" for path in sorted((REPO / "nodes").glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if DENOISING_MATHS.search(line)]
    assert hits == [], "denoising maths belongs in lora2_engine/schedule.py:\n" + "\n".join(hits)
