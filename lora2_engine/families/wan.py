"""Wan 2.1 / 2.2 text-to-video, used as an image model (one frame): blocks of RoPE
self-attention, cross-attention on the text and an MLP, each with its own q, k, v, o.

Key styles: ComfyUI's own ``diffusion_model.<name>``; kohya-style ``lora_unet_<name with _>``,
which is what musubi-tuner (kohya's trainer for Wan; sd-scripts has none) writes for the Wan
module names (``networks/lora_wan.py``: prefix ``lora_unet``, e.g.
``lora_unet_blocks_0_self_attn_q``); diffusers ``transformer.<WanTransformer3DModel name>``
(``attn1``/``attn2``, nothing fused). Stock ComfyUI has no diffusers-name map for Wan
(``comfy/lora.py``), so that style is written by the command line only.
"""

from __future__ import annotations

from .base import Family, Rename, TableNaming

B = "blocks.{}"
DIFFUSERS = (
    *(Rename(f"{B}.self_attn.{a}", f"{B}.attn1.{b}") for a, b in (
        ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *(Rename(f"{B}.cross_attn.{a}", f"{B}.attn2.{b}") for a, b in (
        ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    Rename(f"{B}.ffn.0", f"{B}.ffn.net.0.proj"),
    Rename(f"{B}.ffn.2", f"{B}.ffn.net.2"),
    Rename("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    Rename("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    Rename("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    Rename("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    Rename("time_projection.1", "condition_embedder.time_proj"),
    Rename("head.head", "proj_out"),
)


def cross_attention(module):
    """Entropy of every ``cross_attn`` (image queries over the text), on the q and k after the
    model's RMS norms."""
    from ..objective import EntropyCapture

    return EntropyCapture(module, "cross_attn", q="norm_q", k="norm_k")


def wan_schedule():
    """ComfyUI's Wan 2.1 sampling: rectified flow, shift 8, timestep = 1000 sigma."""
    from ..schedule import FlowSchedule

    return FlowSchedule(shift=8.0, multiplier=1000.0)


def text_only(context, pooled, width: int, height: int) -> dict:
    return {"c_crossattn": context}


def _is_wan(class_name: str, config: dict) -> bool:
    return class_name == "WanTransformer3DModel"


FAMILY = Family(
    name="wan",
    display="Wan 2.1 / 2.2 (one frame)",
    naming=TableNaming(DIFFUSERS),
    targets=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
             "cross_attn.k", "cross_attn.v", "cross_attn.o"),
    targets_mlp=("ffn.0", "ffn.2"),
    comfy_image_models=("wan2.1",),
    diffusers_class="WanTransformer3DModel",
    diffusers_match=_is_wan,
    diffusers_pipeline="WanPipeline",
    comfy_loads=("kohya", "comfy"),
    diffusers_component="transformer",
    conditioning=text_only,
    schedule=wan_schedule,
    entropy=cross_attention,
    entropy_where="cross_attn (image queries over the text, after the q/k RMS norms)",
    grad_checkpointing=True,
    latent_channels=16,
    video=True,
    kohya_version=("wan2.1", "wan2.1/lora"),
    file_signature=("self_attn_q", "cross_attn_k", "self_attn.q", "cross_attn.k"),
    stand_in="lora2_engine.models.tiny_wan:STAND_IN",
)
