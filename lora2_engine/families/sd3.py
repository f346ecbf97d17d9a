"""Stable Diffusion 3 / 3.5 (MMDiT): joint blocks of a context and an image stream with their
own weights and one joint attention over [text; image] tokens; SD3.5 Medium (MMDiT-X) adds a
second self-attention ``attn2`` on the image tokens in its first blocks.

Fused ``qkv`` projections are one component each with one learned rank. Key styles: ComfyUI's
own ``diffusion_model.<name>``; kohya/sd-scripts ``lora_unet_<name with _>`` (``networks/
lora_sd3.py``: ``lora_unet_joint_blocks_0_x_block_attn_qkv``); diffusers
``transformer.<SD3Transformer2DModel name>``, where diffusers splits ``qkv`` into ``to_q``/
``to_k``/``to_v`` (``add_q_proj``… for the context stream): the export repeats ``A`` for every
part and splits ``B`` by rows, which is exact. Stock ComfyUI maps all three (``comfy/lora.py``
reads diffusers SD3 names through ``mmdit_to_diffusers``). The context stream's adaLN layer has
no diffusers name here: diffusers swaps its shift/scale halves in the last block, which is not
a renaming.
"""

from __future__ import annotations

from .base import Family, Rename, TableNaming


def _thirds(m: int, n: int) -> tuple[int, ...]:
    return (m // 3,) * 3


J, T = "joint_blocks.{}", "transformer_blocks.{}"
DIFFUSERS = (
    Rename(f"{J}.x_block.attn.qkv", (f"{T}.attn.to_q", f"{T}.attn.to_k", f"{T}.attn.to_v"),
           _thirds),
    Rename(f"{J}.context_block.attn.qkv", (f"{T}.attn.add_q_proj", f"{T}.attn.add_k_proj",
                                           f"{T}.attn.add_v_proj"), _thirds),
    Rename(f"{J}.x_block.attn.proj", f"{T}.attn.to_out.0"),
    Rename(f"{J}.context_block.attn.proj", f"{T}.attn.to_add_out"),
    Rename(f"{J}.x_block.attn2.qkv", (f"{T}.attn2.to_q", f"{T}.attn2.to_k", f"{T}.attn2.to_v"),
           _thirds),
    Rename(f"{J}.x_block.attn2.proj", f"{T}.attn2.to_out.0"),
    Rename(f"{J}.x_block.mlp.fc1", f"{T}.ff.net.0.proj"),
    Rename(f"{J}.x_block.mlp.fc2", f"{T}.ff.net.2"),
    Rename(f"{J}.context_block.mlp.fc1", f"{T}.ff_context.net.0.proj"),
    Rename(f"{J}.context_block.mlp.fc2", f"{T}.ff_context.net.2"),
    Rename(f"{J}.x_block.adaLN_modulation.1", f"{T}.norm1.linear"),
    Rename("context_embedder", "context_embedder"),
    Rename("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    Rename("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    Rename("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    Rename("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    Rename("final_layer.linear", "proj_out"),
)


def joint_attention(module):
    """Entropy of the image queries over the text keys in every joint block."""
    from ..joint_attention import JointAttentionCapture

    return JointAttentionCapture(module, "joint_blocks", "x_block.attn.ln_q",
                                 "context_block.attn.ln_k", pe=None, sequence_first=True)


def sd3_schedule():
    """ComfyUI's SD3 sampling: rectified flow, shift 3, timestep = 1000 sigma."""
    from ..schedule import FlowSchedule

    return FlowSchedule(shift=3.0, multiplier=1000.0)


def conditioning(context, pooled, width: int, height: int) -> dict:
    """What ComfyUI's SD3 ``extra_conds`` builds: text tokens and the pooled vector ``y``."""
    out = {"c_crossattn": context}
    if pooled is not None:
        out["y"] = pooled
    return out


def _is_sd3(class_name: str, config: dict) -> bool:
    return class_name == "SD3Transformer2DModel"


FAMILY = Family(
    name="sd3",
    display="SD3 / SD3.5",
    naming=TableNaming(DIFFUSERS),
    targets=("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj"),
    targets_mlp=("mlp.fc1", "mlp.fc2"),
    comfy_configs=("SD3",),
    diffusers_class="SD3Transformer2DModel",
    diffusers_match=_is_sd3,
    diffusers_pipeline="StableDiffusion3Pipeline",
    comfy_loads=("kohya", "comfy", "diffusers"),
    diffusers_component="transformer",
    cond_keys=("y",),
    conditioning=conditioning,
    schedule=sd3_schedule,
    entropy=joint_attention,
    entropy_where="joint blocks: image queries over the text keys of the joint attention, "
                  "after the q/k norms",
    grad_checkpointing=True,
    latent_channels=16,
    kohya_version=("sd3", "stable-diffusion-3/lora"),
    file_signature=("joint_blocks", "context_block"),
    stand_in="lora2_engine.models.tiny_sd3:STAND_IN",
)
