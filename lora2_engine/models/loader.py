"""One way to get a trainable model for the CLI: the tiny built-ins or a diffusers folder.

A :class:`ModelBundle` is what a subject-training run needs from any model: the UNet to attach
adapters to, how to turn photos and captions into training examples, how to call the UNet,
its noise schedule and its key layout. ComfyUI models are handled by the nodes' bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..formats.keys import UNetLayout
from ..schedule import Schedule

TINY = ("tiny-sdxl", "tiny-sd15")


@dataclass
class ModelBundle:
    unet: nn.Module
    family: str
    layout: UNetLayout
    schedule: Schedule
    encode: Callable[[list[torch.Tensor], list[str]], list[dict]]
    predict: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
    name: str


def load_model(spec: str) -> ModelBundle:
    """``"tiny-sdxl"``, ``"tiny-sd15"`` or the path of a diffusers SD1.x/SDXL pipeline folder."""
    if spec in TINY:
        return _tiny(spec.removeprefix("tiny-"))
    path = Path(spec)
    if path.is_dir() and (path / "model_index.json").is_file():
        _check_pipeline_index(path / "model_index.json")
        return _diffusers(path)
    if path.is_file():
        raise ValueError(
            f"{path}: single-file checkpoints are loaded by ComfyUI (use the TrainAdaptiveLoRA "
            "node); on the command line give a diffusers pipeline folder (with model_index.json)")
    raise ValueError(f"--model {spec!r}: use tiny-sdxl, tiny-sd15 or a diffusers pipeline folder")


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


def _tiny(family: str) -> ModelBundle:
    from ..diffusion import encode_examples, layout_of, ldm_predict
    from .tiny import build_tiny

    unet, text, vae = build_tiny(family, seed=0)
    return ModelBundle(unet, family, layout_of(unet), Schedule(),
                       lambda px, caps: encode_examples(px, caps, vae, text, family),
                       ldm_predict(unet), f"tiny-{family}")


def _diffusers(path: Path) -> ModelBundle:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: diffusers cannot load this pipeline ({type(exc).__name__}: "
                         f"{str(exc)[:300]}): check that the folder is a complete SD1.x/SDXL "
                         "diffusers pipeline") from None
    unet = pipe.unet
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    family = "sdxl" if sdxl else ("sd15" if unet.config.cross_attention_dim == 768 else "other")
    nrb = unet.config.layers_per_block
    levels = len(unet.config.block_out_channels)
    layout = UNetLayout(family, (nrb,) * levels if isinstance(nrb, int) else tuple(nrb))
    sc = pipe.scheduler.config
    pred = {"epsilon": "eps", "v_prediction": "v"}.get(sc.get("prediction_type", "epsilon"))
    if pred is None or sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"{path}: scheduler {sc.get('prediction_type')}/"
                         f"{sc.get('beta_schedule')} is not supported; use an SD1.x/SDXL folder")
    schedule = Schedule(pred, sc.get("num_train_timesteps", 1000), sc.get("beta_start", 0.00085),
                        sc.get("beta_end", 0.012))
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
                out.append({"latents": lat, "context": ctx[0], "pooled": pooled[0],
                            "time_ids": torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)})
            else:
                ctx, _ = pipe.encode_prompt(cap, "cpu", 1, False)
                out.append({"latents": lat, "context": ctx[0]})
        return out

    def predict(x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        extra = ({"added_cond_kwargs": {"text_embeds": batch["pooled"],
                                        "time_ids": batch["time_ids"]}} if sdxl else {})
        return unet(x_t, t, encoder_hidden_states=batch["context"], **extra).sample

    return ModelBundle(unet, family, layout, schedule, encode, predict, path.name)
