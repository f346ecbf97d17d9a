"""Flux.1 (dev, schnell; and Chroma, which ComfyUI builds from the same blocks): a DiT with
double-stream blocks (separate image/text weights, joint attention) and single-stream blocks
whose ``linear1`` fuses q, k, v and the MLP input.

Fused projections are one component each with one learned rank. Key styles: ComfyUI's own
``diffusion_model.<name>``; kohya/sd-scripts ``lora_unet_<name with _>`` (``networks/
lora_flux.py``); diffusers ``transformer.<FluxTransformer2DModel name>``, where diffusers splits
``qkv`` into ``to_q``/``to_k``/``to_v`` (and ``linear1`` into those plus ``proj_mlp``): the export
repeats ``A`` for every part and splits ``B`` by rows, which is exact.
"""

from __future__ import annotations

from .base import Family, Rename, TableNaming


def _thirds(m: int, n: int) -> tuple[int, ...]:
    return (m // 3,) * 3


def _qkv_mlp(m: int, n: int) -> tuple[int, ...]:
    return (n, n, n, m - 3 * n)  # linear1 rows: q, k, v (hidden each), then the MLP input


D, S = "transformer_blocks.{}", "single_transformer_blocks.{}"
DIFFUSERS = (
    Rename("double_blocks.{}.img_attn.qkv", (f"{D}.attn.to_q", f"{D}.attn.to_k",
                                             f"{D}.attn.to_v"), _thirds),
    Rename("double_blocks.{}.txt_attn.qkv", (f"{D}.attn.add_q_proj", f"{D}.attn.add_k_proj",
                                             f"{D}.attn.add_v_proj"), _thirds),
    Rename("double_blocks.{}.img_attn.proj", f"{D}.attn.to_out.0"),
    Rename("double_blocks.{}.txt_attn.proj", f"{D}.attn.to_add_out"),
    Rename("double_blocks.{}.img_mlp.0", f"{D}.ff.net.0.proj"),
    Rename("double_blocks.{}.img_mlp.2", f"{D}.ff.net.2"),
    Rename("double_blocks.{}.txt_mlp.0", f"{D}.ff_context.net.0.proj"),
    Rename("double_blocks.{}.txt_mlp.2", f"{D}.ff_context.net.2"),
    Rename("double_blocks.{}.img_mod.lin", f"{D}.norm1.linear"),
    Rename("double_blocks.{}.txt_mod.lin", f"{D}.norm1_context.linear"),
    Rename("single_blocks.{}.linear1", (f"{S}.attn.to_q", f"{S}.attn.to_k", f"{S}.attn.to_v",
                                        f"{S}.proj_mlp"), _qkv_mlp),
    Rename("single_blocks.{}.linear2", f"{S}.proj_out"),
    Rename("single_blocks.{}.modulation.lin", f"{S}.norm.linear"),
    Rename("img_in", "x_embedder"),
    Rename("txt_in", "context_embedder"),
    Rename("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    Rename("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    Rename("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    Rename("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    Rename("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    Rename("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    Rename("final_layer.linear", "proj_out"),
)


def joint_attention(module):
    """Entropy of the image queries over the text keys in every double-stream block."""
    from ..joint_attention import JointAttentionCapture

    return JointAttentionCapture(module, "double_blocks", "img_attn.norm", "txt_attn.norm")


def schnell_schedule():
    """ComfyUI's FluxSchnell sampling: rectified flow, shift 1, timestep = sigma."""
    from ..schedule import FlowSchedule

    return FlowSchedule(shift=1.0, multiplier=1.0)


def conditioning(context, pooled, width: int, height: int) -> dict:
    """What ComfyUI's Flux ``extra_conds`` builds: text tokens and the pooled vector ``y``."""
    out = {"c_crossattn": context}
    if pooled is not None:
        out["y"] = pooled
    return out


def _is_flux(class_name: str, config: dict) -> bool:
    return class_name in ("FluxTransformer2DModel", "ChromaTransformer2DModel")


FAMILY = Family(
    name="flux",
    display="Flux.1",
    naming=TableNaming(DIFFUSERS),
    targets=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1",
             "linear2"),
    targets_mlp=("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
    comfy_image_models=("flux", "chroma"),
    diffusers_class="FluxTransformer2DModel",
    diffusers_match=_is_flux,
    comfy_loads=("kohya", "comfy", "diffusers"),
    diffusers_component="transformer",
    cond_keys=("y", "guidance"),
    conditioning=conditioning,
    schedule=schnell_schedule,
    entropy=joint_attention,
    entropy_where="double blocks: image queries over the text keys of the joint attention, "
                  "after q/k norm and RoPE",
    inplace_blocks=True,  # ComfyUI's blocks do `img += ...`
    grad_checkpointing=True,
    latent_channels=16,
    kohya_version=("flux1", "flux-1-dev/lora"),
    file_signature=("double_blocks", "single_blocks", "single_transformer_blocks"),
    stand_in="lora2_engine.models.tiny_flux:STAND_IN",
    notes={"chroma": "Chroma is recognised (ComfyUI image_model 'chroma', the same block "
                     "names) but has no stand-in: ComfyUI fixes its guidance approximator at "
                     "3072/5120 wide, ~0.65 B parameters"},
)
