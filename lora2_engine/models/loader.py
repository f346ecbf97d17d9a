"""One way to get a trainable model for the CLI: a family's tiny stand-in or a diffusers folder.

A :class:`ModelBundle` is what a subject-training run needs from any model: the denoiser (the
network adapters attach to, its schedule and calling convention), its family and key layout,
and how photos and captions become training examples in ComfyUI's conditioning names. ComfyUI
models are handled by the nodes' bridge; both end in ``diffusion.train_diffusion``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..denoiser import ModuleDenoiser
from ..families import Family, from_diffusers, registry
from ..formats.keys import UNetLayout


@dataclass
class ModelBundle:
    denoiser: ModuleDenoiser
    family: Family
    layout: UNetLayout
    encode: Callable[[list[torch.Tensor], list[str]], list[dict]]
    name: str


def tiny_names() -> list[str]:
    return [f"tiny-{name}" for name, fam in registry().items() if fam.stand_in]


def load_model(spec: str) -> ModelBundle:
    """``"tiny-<family>"`` (e.g. tiny-sdxl, tiny-flux) or a diffusers SD1.x/SDXL folder."""
    if spec in tiny_names():
        return _tiny(registry()[spec.removeprefix("tiny-")])
    path = Path(spec)
    if path.is_dir() and (path / "model_index.json").is_file():
        _check_pipeline_index(path / "model_index.json")
        return _diffusers(path)
    if path.is_file():
        raise ValueError(
            f"{path}: single-file checkpoints are loaded by ComfyUI (use the TrainAdaptiveLoRA "
            "node); on the command line give a diffusers pipeline folder (with model_index.json)")
    raise ValueError(f"--model {spec!r}: use {', '.join(tiny_names())} or a diffusers "
                     "pipeline folder")


def _check_pipeline_index(index: Path) -> None:
    """A readable ``model_index.json`` naming a UNet, or a message (not diffusers' traceback)."""
    import json

    from ..data import read_text_file

    try:
        data = json.loads(read_text_file(index))
    except ValueError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc}): restore it from the model's "
                         "download") from None
    if not isinstance(data, dict) or "unet" not in data:
        raise ValueError(f"{index}: names no 'unet': give the folder of an SD1.x/SDXL "
                         "diffusers pipeline")


def encoder(vae, text_encoder, family: Family):
    """Photos (3, H, W) in [0, 1] and captions → examples, with the stand-in VAE and text
    encoder; the family builds the conditioning (e.g. SDXL's ``y``) as ComfyUI would."""

    @torch.no_grad()
    def encode(pixels: list[torch.Tensor], captions: list[str]) -> list[dict]:
        out = []
        for img, cap in zip(pixels, captions):
            context, pooled = text_encoder.encode([cap])
            conds = family.conditioning(context[0], None if pooled is None else pooled[0],
                                        img.shape[2], img.shape[1])
            out.append({"latents": vae.encode(img[None])[0], **conds})
        return out

    return encode


def _tiny(family: Family) -> ModelBundle:
    from .standin import load_stand_in
    from .tiny import text_and_vae

    stand_in = load_stand_in(family)
    model = stand_in.build(seed=0)
    text, vae = text_and_vae(stand_in.context_dim, stand_in.pooled_dim, stand_in.latent_scale,
                             seed=0, channels=stand_in.latent_shape[0])
    denoiser = ModuleDenoiser(model, family.schedule(), family.cond_keys)
    return ModelBundle(denoiser, family, family.model_layout(stand_in.unet_config(model)),
                       encoder(vae, text, family), f"tiny-{family.name}")


def _diffusers(path: Path) -> ModelBundle:
    from diffusers import DiffusionPipeline

    from ..schedule import DiscreteSchedule

    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: diffusers cannot load this pipeline ({type(exc).__name__}: "
                         f"{str(exc)[:300]}): check that the folder is a complete SD1.x/SDXL "
                         "diffusers pipeline") from None
    unet = pipe.unet
    family = from_diffusers(type(unet).__name__, dict(unet.config))
    if family is None or family.name not in ("sd15", "sdxl"):
        raise ValueError(f"{path}: only SD1.x/SDXL diffusers folders train from the command "
                         "line; other families train in ComfyUI (TrainAdaptiveLoRA)")
    sdxl = family.name == "sdxl"
    nrb = unet.config.layers_per_block
    levels = len(unet.config.block_out_channels)
    layout = UNetLayout(family.name, (nrb,) * levels if isinstance(nrb, int) else tuple(nrb))
    sc = pipe.scheduler.config
    pred = {"epsilon": "eps", "v_prediction": "v"}.get(sc.get("prediction_type", "epsilon"))
    if pred is None or sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"{path}: scheduler {sc.get('prediction_type')}/"
                         f"{sc.get('beta_schedule')} is not supported; use an SD1.x/SDXL folder")
    schedule = DiscreteSchedule(pred, sc.get("num_train_timesteps", 1000),
                                sc.get("beta_start", 0.00085), sc.get("beta_end", 0.012))
    vae, scale = pipe.vae.requires_grad_(False), pipe.vae.config.scaling_factor
    for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)

    @torch.no_grad()
    def encode(pixels: list[torch.Tensor], captions: list[str]) -> list[dict]:
        out = []
        for img, cap in zip(pixels, captions):
            lat = vae.encode(img[None] * 2 - 1).latent_dist.mean[0] * scale
            if sdxl:
                ctx, _, pooled, _ = pipe.encode_prompt(cap, device="cpu",
                                                       do_classifier_free_guidance=False)
                h, w = img.shape[1:]
                out.append({"latents": lat, "c_crossattn": ctx[0], "pooled": pooled[0],
                            "time_ids": torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)})
            else:
                ctx, _ = pipe.encode_prompt(cap, "cpu", 1, False)
                out.append({"latents": lat, "c_crossattn": ctx[0]})
        return out

    def call(module, x_in, t, conds: dict) -> torch.Tensor:
        extra = ({"added_cond_kwargs": {"text_embeds": conds["pooled"],
                                        "time_ids": conds["time_ids"]}} if sdxl else {})
        return module(x_in, t, encoder_hidden_states=conds["c_crossattn"], **extra).sample

    return ModelBundle(ModuleDenoiser(unet, schedule, call=call), family, layout, encode,
                       path.name)
