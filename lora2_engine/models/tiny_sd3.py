"""A tiny SD3 / SD3.5 MMDiT with the real module tree and key names, which ComfyUI detects as SD3.

ComfyUI derives an MMDiT from tensor shapes (``comfy/model_detection.py``, 0.28.0 and 0.3.54
alike): ``depth = x_embedder.proj.weight.shape[0] // 64``, hidden size ``64 * depth`` with
``depth`` heads of 64 and ``depth`` joint blocks; context width from ``context_embedder``,
pooled width from ``y_embedder.mlp.0``, ``pos_embed_max_size`` from ``pos_embed``, RMS q/k
norms from ``ln_q`` and MMDiT-X self-attention layers from ``x_block.attn2``; in_channels 16
makes it ``SD3``. Depth 2 is the smallest with a context block that is not "pre-only" (the last
block's context stream has no output projection), so: hidden 128, two heads, two joint blocks,
context and pooled width 768 (CLIP-L: the conditioning the SD1.5 tests already make),
``pos_embed`` for up to 32x32 patches (512 px), RMS q/k norms and an ``attn2`` in block 0
as SD3.5 Medium has: 1.40 M parameters (plus a 32x32x128 position table) that run through
ComfyUI's real ``model_base.SD3`` (rectified flow, shift 3).

Written from the published architecture (Stability AI's MMDiT: per-stream adaLN-modulated
blocks whose q, k, v are concatenated [context; image] for one joint attention, fused ``qkv``
projections, 2x2 patches, a cropped learned position table), in plain torch;
``tests/comfyui/test_families.py`` checks it against ComfyUI's own ``MMDiT``, output for output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families.sdxl import timestep_embedding
from .standin import StandIn
from .tiny import _init_weights, _materialize

DEPTH, CONTEXT, POOLED, CHANNELS, PATCH, POS_MAX = 2, 768, 768, 16, 2, 32
HEAD = 64  # ComfyUI: hidden = 64 * depth, heads = depth


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return shift[:, None] + x * (1 + scale[:, None])


def _sequential(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(a, b), nn.SiLU(), nn.Linear(b, b))


class SelfAttention(nn.Module):
    """Fused ``qkv`` and ``proj`` (absent when pre-only); RMS q/k norms per head."""

    def __init__(self, dim: int, heads: int, pre_only: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.ln_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.ln_k = nn.RMSNorm(self.head_dim, eps=1e-6)

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)  # (B, L, H, d)
        return self.ln_q(q).flatten(2), self.ln_k(k).flatten(2), v.flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """(B, L, H*d) x3 → (B, L, H*d)."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN modulation, attention projections, MLP.

    ``pre_only`` (the last block's context stream): only q, k, v, from 2 modulations.
    ``self_attn`` (SD3.5 Medium's MMDiT-X): a second attention over the image tokens alone,
    9 modulations.
    """

    def __init__(self, dim: int, heads: int, pre_only: bool = False,
                 self_attn: bool = False) -> None:
        super().__init__()
        self.pre_only, self.self_attn = pre_only, self_attn
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, pre_only)
        if self_attn:
            self.attn2 = SelfAttention(dim, heads)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim)
        n_mods = 9 if self_attn else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim))

    def pre_attention(self, x: Tensor, c: Tensor):
        mods = self.adaLN_modulation(c).chunk(9 if self.self_attn else 2 if self.pre_only
                                              else 6, dim=1)
        h = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(h, mods[0], mods[1]))
        qkv2 = self.attn2.pre_attention(modulate(h, mods[6], mods[7])) if self.self_attn else None
        return qkv, qkv2, mods

    def post_attention(self, x: Tensor, attn: Tensor, attn2: Tensor | None, mods) -> Tensor:
        x = x + mods[2][:, None] * self.attn.proj(attn)
        if attn2 is not None:
            x = x + mods[8][:, None] * self.attn2.proj(attn2)
        return x + mods[5][:, None] * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))


class JointBlock(nn.Module):
    """Context and image streams with their own weights and one attention over both."""

    def __init__(self, dim: int, heads: int, pre_only: bool, self_attn: bool) -> None:
        super().__init__()
        self.heads = heads
        self.context_block = DismantledBlock(dim, heads, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, heads, self_attn=self_attn)

    def forward(self, context: Tensor, x: Tensor, c: Tensor, **_) -> tuple:
        ctx_qkv, _, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        joint = attention(*(torch.cat((a, b), 1) for a, b in zip(ctx_qkv, x_qkv)), self.heads)
        n_ctx = context.shape[1]
        attn2 = attention(*x_qkv2, self.heads) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, joint[:, n_ctx:], attn2, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, joint[:, :n_ctx], None, ctx_mods), x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(CHANNELS, dim, PATCH, stride=PATCH)


class FinalLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, PATCH * PATCH * CHANNELS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Embedder(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.mlp = _sequential(a, b)


class TinySD3(nn.Module):
    """SD3.5-layout MMDiT: ``forward(x, timesteps, context, y)`` like ComfyUI's wrapper."""

    def __init__(self, depth: int = DEPTH, context: int = CONTEXT, pooled: int = POOLED,
                 pos_max: int = POS_MAX, self_attn_layers: tuple[int, ...] = (0,)) -> None:
        super().__init__()
        dim = HEAD * depth
        self.pos_max, self.context_dim, self.pooled_dim = pos_max, context, pooled
        self.x_embedder = PatchEmbed(dim)
        self.register_buffer("pos_embed", torch.zeros(1, pos_max * pos_max, dim))
        self.t_embedder = Embedder(256, dim)
        self.y_embedder = Embedder(pooled, dim)
        self.context_embedder = nn.Linear(context, dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, depth, pre_only=i == depth - 1, self_attn=i in self_attn_layers)
            for i in range(depth))
        self.final_layer = FinalLayer(dim)

    def cropped_pos_embed(self, rows: int, cols: int) -> Tensor:
        """The centre ``rows x cols`` of the learned table (SD3 crops, it does not resize)."""
        top, left = (self.pos_max - rows) // 2, (self.pos_max - cols) // 2
        table = self.pos_embed.view(1, self.pos_max, self.pos_max, -1)
        return table[:, top: top + rows, left: left + cols].flatten(1, 2)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                **_) -> Tensor:
        b, c, h, w = x.shape
        x = F.pad(x, (0, (-w) % PATCH, 0, (-h) % PATCH), mode="circular")
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        if rows > self.pos_max or cols > self.pos_max:
            raise ValueError(f"latent {h}x{w} exceeds pos_embed_max_size {self.pos_max}")
        img = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # (B, rows*cols, dim)
        img = img + self.cropped_pos_embed(rows, cols).to(img)
        vec = self.t_embedder.mlp(timestep_embedding(timesteps, 256).to(img.dtype))
        if y is not None:
            vec = vec + self.y_embedder.mlp(y)
        txt = self.context_embedder(context)
        for block in self.joint_blocks:
            txt, img = block(txt, img, c=vec)
        out = self.final_layer(img, vec)  # (B, rows*cols, p*p*c)
        out = out.view(b, rows, cols, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, rows * PATCH, cols * PATCH)[:, :, :h, :w]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **size) -> TinySD3:
    """The tiny SD3.5 with weights fixed by ``seed`` (q/k norm scales 1); ``size``: TinySD3's
    ``depth``, ``context``, ``pooled``, ``pos_max``."""
    model = _materialize(TinySD3, *[size.get(k, d) for k, d in (
        ("depth", DEPTH), ("context", CONTEXT), ("pooled", POOLED), ("pos_max", POS_MAX))])
    g = torch.Generator().manual_seed(seed)
    _init_weights(model, g)
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 0.5, generator=g)
    return model.to(dtype)


def comfy_state_dict(model: TinySD3) -> dict[str, Tensor]:
    """Keys as in the published sd3.5 files' diffusion model (no prefix): what UNETLoader
    opens."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def diffusers_model(model: TinySD3):
    """An ``SD3Transformer2DModel`` of the same shapes (its module names are what the diffusers
    key style maps to; weights are diffusers' own random init)."""
    from diffusers import SD3Transformer2DModel

    depth = len(model.joint_blocks)
    dual = tuple(i for i, blk in enumerate(model.joint_blocks) if blk.x_block.self_attn)
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=model.pos_max, patch_size=PATCH, in_channels=CHANNELS, num_layers=depth,
        attention_head_dim=HEAD, num_attention_heads=depth,
        joint_attention_dim=model.context_dim, caption_projection_dim=HEAD * depth,
        pooled_projection_dim=model.pooled_dim, out_channels=CHANNELS,
        pos_embed_max_size=model.pos_max, dual_attention_layers=dual, qk_norm="rms_norm")


STAND_IN = StandIn(
    family="sd3", build=build, comfy_state_dict=comfy_state_dict, comfy_names=("SD3",),
    latent_shape=(CHANNELS, 8, 8), context_dim=CONTEXT, pooled_dim=POOLED, latent_scale=1.5305,
    how_made="TinySD3: SAI MMDiT key names, x_embedder 128 wide (ComfyUI: depth 2 = 2 joint "
             "blocks, 2 heads of 64), context_embedder and y_embedder 768 wide (CLIP-L "
             "conditioning), pos_embed 32x32, RMS q/k norms, x_block.attn2 in block 0 "
             "(SD3.5 Medium's MMDiT-X); 1.40 M params, saved unprefixed",
    sizes={"0.28.0": {}, "0.3.54": {}},
    diffusers_model=diffusers_model)
