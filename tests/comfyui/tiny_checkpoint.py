"""A complete SD1.5-family checkpoint that ComfyUI loads with CheckpointLoaderSimple, on a CPU.

No real weights can be downloaded where the pack is tested, and ComfyUI builds its text encoder
and VAE from fixed configs, so the checkpoint holds: the engine's tiny SD1.5 UNet (detected as
SD15 by ComfyUI), a full-size CLIP ViT-L/14 text model with random weights (the smallest text
encoder an SD1.5 checkpoint can carry: ComfyUI's config is fixed) and a random TAESD as the VAE
(ComfyUI picks TAESD from the key names; 1 M parameters instead of 83 M). Key names follow the
public SD1.5 checkpoint layout (``cond_stage_model.transformer.text_model.*``) and TAESD's
published module tree. About 300 MB in float16; written in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora2_engine.models.tiny import build_unet, comfy_state_dict

CLIP = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."


def _clip_l(rnd) -> dict[str, torch.Tensor]:
    d, ff, sd = 768, 3072, {}
    sd[CLIP + "embeddings.token_embedding.weight"] = rnd(49408, d)
    sd[CLIP + "embeddings.position_embedding.weight"] = rnd(77, d, std=0.01)
    for i in range(12):
        p = f"{CLIP}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rnd(d, d)
            sd[p + f"self_attn.{proj}.bias"] = torch.zeros(d)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = torch.ones(d), torch.zeros(d)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(ff, d), torch.zeros(ff)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(d, ff), torch.zeros(d)
    sd[CLIP + "final_layer_norm.weight"] = torch.ones(d)
    sd[CLIP + "final_layer_norm.bias"] = torch.zeros(d)
    return sd


def _taesd(rnd) -> dict[str, torch.Tensor]:
    sd = {}

    def conv(name: str, cin: int, cout: int, bias: bool = True) -> None:
        sd[f"{VAE}{name}.weight"] = rnd(cout, cin, 3, 3, std=(0.5 / (9 * cin)) ** 0.5)
        if bias:
            sd[f"{VAE}{name}.bias"] = torch.zeros(cout)

    for part, blocks, plain, first, last in (
        ("taesd_encoder", (1, 3, 4, 5, 7, 8, 9, 11, 12, 13), (2, 6, 10), (0, 3, 64),
         (14, 64, 4)),
        ("taesd_decoder", (3, 4, 5, 8, 9, 10, 13, 14, 15, 18), (7, 12, 17), (1, 4, 64),
         (19, 64, 3)),
    ):
        for i in blocks:
            for j in (0, 2, 4):
                conv(f"{part}.{i}.conv.{j}", 64, 64)
        for i in plain:
            conv(f"{part}.{i}", 64, 64, bias=False)
        conv(f"{part}.{first[0]}", first[1], first[2])
        conv(f"{part}.{last[0]}", last[1], last[2])
    sd[VAE + "vae_scale"], sd[VAE + "vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return sd


def write_tiny_sd15_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint (float16 safetensors) and return its path."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = dict(comfy_state_dict(build_unet("sd15", seed=seed)))
    sd.update(_clip_l(rnd))
    sd.update(_taesd(rnd))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
    return path
