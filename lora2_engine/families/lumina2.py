"""Lumina 2 and Z-Image (ComfyUI builds both from ``NextDiT``; its ``ZImage`` config is a
``Lumina2`` subclass): a text refiner and an image refiner of two blocks each, then
single-stream blocks over the joint [text; image] sequence. Each block's attention has one
fused ``qkv`` (query heads, then the grouped key and value heads): one component, one rank.

Key styles: ComfyUI's ``diffusion_model.layers.0.attention.qkv``; kohya
``lora_unet_layers_0_attention_qkv``, the names sd-scripts (``networks/lora_lumina.py``) writes
for Lumina 2 and musubi-tuner's ``convert_z_image_lora_to_comfy.py`` writes for Z-Image (stock
ComfyUI loads both styles for either model); diffusers ``transformer.layers.0.attn.to_q``...,
``Lumina2Transformer2DModel``'s names, where the fused ``qkv`` is split by rows exactly (q: one
row per query-head feature, k and v: the rest, halved). Stock ComfyUI maps Z-Image's diffusers
names but not Lumina 2's, so the diffusers style is for diffusers only, and Z-Image's own
diffusers names (``ZImageTransformer2DModel``) are not written.
"""

from __future__ import annotations

from .base import Family, Rename, TableNaming


def _q_k_v(m: int, n: int) -> tuple[int, ...]:
    kv = (m - n) // 2  # qkv rows: n = width = query heads x head dim, then k and v alike
    return (n, kv, kv)


DIFFUSERS = tuple(
    r for blk in ("layers.{}", "noise_refiner.{}", "context_refiner.{}") for r in (
        Rename(f"{blk}.attention.qkv", (f"{blk}.attn.to_q", f"{blk}.attn.to_k",
                                        f"{blk}.attn.to_v"), _q_k_v),
        Rename(f"{blk}.attention.out", f"{blk}.attn.to_out.0"),
        Rename(f"{blk}.feed_forward.w1", f"{blk}.feed_forward.linear_1"),
        Rename(f"{blk}.feed_forward.w2", f"{blk}.feed_forward.linear_2"),
        Rename(f"{blk}.feed_forward.w3", f"{blk}.feed_forward.linear_3")))


def joint_attention(module):
    """Entropy of the image queries over the text keys in every single-stream layer, after the
    q/k RMSNorms and RoPE; the text length is that of the text refiner's output."""
    from ..joint_attention import JointAttentionCapture

    return JointAttentionCapture(module, "layers", "attention.q_norm", "attention.k_norm",
                                 pe=("freqs_cis", 2), text_len="context_refiner.0")


def schedule():
    """ComfyUI's Lumina2 sampling: rectified flow, shift 6, timestep = sigma (Z-Image: 3)."""
    from ..schedule import FlowSchedule

    return FlowSchedule(shift=6.0, multiplier=1.0)


def conditioning(context, pooled, width: int, height: int) -> dict:
    """What ComfyUI's Lumina2 ``extra_conds`` builds from a prompt: the text tokens and their
    number (a required argument of ``NextDiT``, which does not use its value)."""
    import torch

    return {"c_crossattn": context, "num_tokens": torch.tensor(context.shape[-2])}


def _is_lumina2(class_name: str, config: dict) -> bool:
    return class_name == "Lumina2Transformer2DModel"


FAMILY = Family(
    name="lumina2",
    display="Lumina 2 / Z-Image",
    naming=TableNaming(DIFFUSERS),
    targets=("attention.qkv", "attention.out"),
    targets_mlp=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    comfy_configs=("Lumina2",),  # and its subclass ZImage
    diffusers_class="Lumina2Transformer2DModel",
    diffusers_match=_is_lumina2,
    comfy_loads=("kohya", "comfy"),
    diffusers_component="transformer",
    cond_keys=("num_tokens",),
    conditioning=conditioning,
    schedule=schedule,
    entropy=joint_attention,
    entropy_where="single-stream layers: image queries over the text keys of the joint "
                  "attention, after q/k norm and RoPE (grouped keys repeated per head)",
    grad_checkpointing=True,
    latent_channels=16,
    kohya_version=("lumina2", "lumina-2/lora"),
    file_signature=("noise_refiner", "context_refiner"),
    stand_in="lora2_engine.models.tiny_lumina2:STAND_IN",
    notes={"zimage": "Z-Image is recognised (ComfyUI's ZImage config subclasses Lumina2; the "
                     "same module names) but not trained in the tests: ComfyUI sets its heads "
                     "only at 3840 wide, 0.90 B parameters with one layer"},
)
