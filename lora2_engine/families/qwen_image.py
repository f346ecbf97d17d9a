"""Qwen-Image (and its Edit variants, which ComfyUI builds from the same blocks): an MMDiT with
separate image/text weights per block and one joint attention over [text; image] tokens.

Its published checkpoints use diffusers' module names, and ComfyUI keeps them: the ComfyUI
style is ``diffusion_model.transformer_blocks.0.attn.to_q``, the diffusers style
``transformer.transformer_blocks.0.attn.to_q`` (no fused module, nothing to split), and the
kohya style ``lora_unet_transformer_blocks_0_attn_to_q`` is what musubi-tuner
(``networks/lora_qwen_image.py``: prefix ``lora_unet`` over the ``QwenImageTransformerBlock``
modules) writes. Stock ComfyUI maps all three.
"""

from __future__ import annotations

from .base import Family, Rename, TableNaming

B = "transformer_blocks.{}"
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
             "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
OTHER = ("img_mod.1", "txt_mod.1")
DIFFUSERS = tuple(Rename(f"{B}.{m}", f"{B}.{m}") for m in ATTENTION + MLP + OTHER) + tuple(
    Rename(m, m) for m in ("img_in", "txt_in", "proj_out", "norm_out.linear",
                           "time_text_embed.timestep_embedder.linear_1",
                           "time_text_embed.timestep_embedder.linear_2"))


def joint_attention(module):
    """Entropy of the image queries over the text keys in every block (after the q/k RMSNorms
    and RoPE; ComfyUI passes the RoPE as ``image_rotary_emb``)."""
    from ..joint_attention import JointAttentionCapture

    return JointAttentionCapture(module, "transformer_blocks", "attn.norm_q", "attn.norm_added_k",
                                 pe=("image_rotary_emb", 4))


def schedule():
    """ComfyUI's QwenImage sampling (``ModelSamplingFlux``, shift 1.15): rectified flow,
    ``sigma = e^1.15 / (e^1.15 + 1/t - 1)``, timestep = sigma."""
    from ..schedule import FluxShiftSchedule

    return FluxShiftSchedule(mu=1.15)


def conditioning(context, pooled, width: int, height: int) -> dict:
    """What ComfyUI's QwenImage ``extra_conds`` builds from a prompt: the text tokens only."""
    return {"c_crossattn": context}


def _is_qwen_image(class_name: str, config: dict) -> bool:
    return class_name == "QwenImageTransformer2DModel"


FAMILY = Family(
    name="qwen_image",
    display="Qwen-Image",
    naming=TableNaming(DIFFUSERS),
    targets=ATTENTION,
    targets_mlp=MLP,
    comfy_image_models=("qwen_image",),
    diffusers_class="QwenImageTransformer2DModel",
    diffusers_match=_is_qwen_image,
    comfy_loads=("kohya", "comfy", "diffusers"),
    diffusers_component="transformer",
    conditioning=conditioning,
    schedule=schedule,
    entropy=joint_attention,
    entropy_where="every block: image queries over the text keys of the joint attention, "
                  "after q/k norm and RoPE",
    grad_checkpointing=True,
    latent_channels=16,
    video=True,  # ComfyUI's Qwen-Image latents are Wan's, (C, T, h, w): an image is one frame
    kohya_version=("qwen_image", "Qwen-Image/lora"),
    file_signature=("img_mlp.net", "img_mlp_net", "txt_mlp.net", "txt_mlp_net", "img_mod.1",
                    "img_mod_1"),
    stand_in="lora2_engine.models.tiny_qwen_image:STAND_IN",
)
