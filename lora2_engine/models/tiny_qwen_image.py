"""A tiny Qwen-Image with the real module tree and key names, which ComfyUI detects as QwenImage.

ComfyUI reads only ``in_channels`` (from ``img_in.weight``) and the number of
``transformer_blocks`` from a Qwen-Image file (``comfy/model_detection.py``, 0.3.54 and 0.28.0);
every width is the class default: 24 heads of 128 (hidden 3072) and a 3584-wide text input
(Qwen2.5-VL-7B's hidden size). So the smallest model ComfyUI detects has one full-width block:
0.38 B parameters (measured: ~1.5 GB in fp32, ~1.3 s for a forward + backward on a 1×16×1×8×8
latent with 77 text tokens on one CPU thread, 1.9 GB peak RSS). The engine-side tests use the
same class at 1 head (hidden 128) with a 768-wide text input (CLIP-L, as the other stand-ins);
the ComfyUI tests build it at full width (``STAND_IN.sizes``).

Written from the published architecture (Qwen-Image, Apache 2.0: an MMDiT with separate image
and text weights per block and one joint attention over [text; image] tokens; RMS q/k norms;
3-axis RoPE with text positions on the diagonal after the image; 2x2 patches of a 16-channel
video-shaped latent), in plain torch; ``tests/comfyui/test_families.py`` checks it against
ComfyUI's own ``QwenImageTransformer2DModel``, output for output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .standin import StandIn
from .tiny import _init_weights, _materialize
from .tiny_flux import apply_rope, rope, timestep_embedding

HEAD_DIM, CONTEXT, CHANNELS, PATCH = 128, 768, 16, 2
AXES, THETA = (16, 56, 56), 10000


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(256, dim), nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj`` (GELU-tanh), ``net.1`` (dropout, nothing to store), ``net.2``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for m in self.net:
            x = m(x)
        return x


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """(B, H, L, D) x3 over [text; image] → (B, L, H*D), after RoPE on q and k."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class JointAttention(nn.Module):
    """Image projections ``to_q/k/v``, text projections ``add_{q,k,v}_proj``, one attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, n, nn.Linear(dim, dim))
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, n, nn.RMSNorm(HEAD_DIM, eps=1e-6))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.to_add_out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, L, D)

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        iq = self.norm_q(self._split(self.to_q(img)))
        ik = self.norm_k(self._split(self.to_k(img)))
        tq = self.norm_added_q(self._split(self.add_q_proj(txt)))
        tk = self.norm_added_k(self._split(self.add_k_proj(txt)))
        iv, tv = self._split(self.to_v(img)), self._split(self.add_v_proj(txt))
        out = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2),
                        pe)
        n = txt.shape[1]
        return self.to_out[0](out[:, n:]), self.to_add_out(out[:, :n])


def _modulate(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    shift, scale, gate = params.chunk(3, dim=-1)
    return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))
            setattr(self, f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", FeedForward(dim))
        self.attn = JointAttention(dim, heads)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                image_rotary_emb: Tensor) -> tuple[Tensor, Tensor]:
        img, txt = hidden_states, encoder_hidden_states
        img1, img2 = self.img_mod(temb).chunk(2, dim=-1)
        txt1, txt2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate = _modulate(self.img_norm1(img), img1)
        txt_in, txt_gate = _modulate(self.txt_norm1(txt), txt1)
        img_attn, txt_attn = self.attn(img_in, txt_in, image_rotary_emb)
        img, txt = img + img_gate * img_attn, txt + txt_gate * txt_attn
        img_in, img_gate = _modulate(self.img_norm2(img), img2)
        img = img + img_gate * self.img_mlp(img_in)
        txt_in, txt_gate = _modulate(self.txt_norm2(txt), txt2)
        return txt + txt_gate * self.txt_mlp(txt_in), img


class LastLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)  # scale first
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class TinyQwenImage(nn.Module):
    """Qwen-Image layout: ``forward(x, timesteps, context)`` like ComfyUI's module, on a
    (B, 16, T=1, H, W) latent (a 4-D (B, 16, H, W) one is taken as T=1 and given back 4-D)."""

    def __init__(self, heads: int = 1, depth: int = 1, context: int = CONTEXT) -> None:
        super().__init__()
        dim = heads * HEAD_DIM
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = nn.RMSNorm(context, eps=1e-6)
        self.img_in = nn.Linear(CHANNELS * PATCH * PATCH, dim)
        self.txt_in = nn.Linear(context, dim)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(dim, heads)
                                                for _ in range(depth))
        self.norm_out = LastLayer(dim)
        self.proj_out = nn.Linear(dim, PATCH * PATCH * CHANNELS)

    @staticmethod
    def position_embedding(n_txt: int, rows: int, cols: int, batch: int, device) -> Tensor:
        """RoPE for [text; image]: image ids (0, row - rows//2, col - cols//2), text ids
        (s, s, s) for s from max(rows, cols)//2 on."""
        ids = torch.zeros(rows, cols, 3, device=device)
        ids[..., 1] = (torch.arange(rows, device=device) - rows // 2)[:, None].float()
        ids[..., 2] = (torch.arange(cols, device=device) - cols // 2)[None, :].float()
        start = max(rows // 2, cols // 2)
        txt = torch.arange(start, start + n_txt, device=device, dtype=torch.float32)
        ids = torch.cat([txt[:, None].expand(-1, 3), ids.flatten(0, 1)])[None].expand(batch, -1, -1)
        pe = torch.cat([rope(ids[..., i], AXES[i], THETA) for i in range(3)], dim=-3)
        return pe[:, None]  # (B, 1, L, D/2, 2, 2)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, **_) -> Tensor:
        flat = x.ndim == 4
        if flat:
            x = x[:, :, None]
        b, c, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % PATCH, 0, (-h) % PATCH, 0, 0), mode="circular")
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        img = x.reshape(b, c, t, rows, PATCH, cols, PATCH).permute(0, 2, 3, 5, 1, 4, 6)
        img = self.img_in(img.reshape(b, t * rows * cols, c * PATCH * PATCH))
        txt = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed.timestep_embedder(  # sigma in [0, 1], scaled by 1000
            timestep_embedding(timesteps).to(img.dtype))
        pe = self.position_embedding(txt.shape[1], rows, cols, b, x.device).to(x.dtype)
        for block in self.transformer_blocks:
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb,
                             image_rotary_emb=pe)
        out = self.proj_out(self.norm_out(img, temb))
        out = out.view(b, t, rows, cols, c, PATCH, PATCH).permute(0, 4, 1, 2, 5, 3, 6)
        out = out.reshape(b, c, t, rows * PATCH, cols * PATCH)[..., :h, :w]
        return out[:, :, 0] if flat else out


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **size) -> TinyQwenImage:
    """The tiny Qwen-Image with weights fixed by ``seed`` (RMSNorm weights 1); ``size``:
    TinyQwenImage's ``heads`` (of 128), ``depth`` and ``context`` (text width)."""
    model = _materialize(TinyQwenImage, *[size.get(k, d) for k, d in (
        ("heads", 1), ("depth", 1), ("context", CONTEXT))])
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model.to(dtype)


def comfy_state_dict(model: TinyQwenImage) -> dict[str, Tensor]:
    """Keys as in the published qwen_image_bf16 file (no prefix): what UNETLoader opens."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def diffusers_model(model: TinyQwenImage):
    """A ``QwenImageTransformer2DModel`` of the same shapes (diffusers' own random init)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=PATCH, in_channels=CHANNELS * PATCH * PATCH, out_channels=CHANNELS,
        num_layers=len(model.transformer_blocks), attention_head_dim=HEAD_DIM,
        num_attention_heads=model.img_in.out_features // HEAD_DIM,
        joint_attention_dim=model.txt_in.in_features, axes_dims_rope=AXES)


FULL = {"heads": 24, "context": 3584}  # what ComfyUI builds for any Qwen-Image file
STAND_IN = StandIn(
    family="qwen_image", build=build, comfy_state_dict=comfy_state_dict,
    comfy_names=("QwenImage",), latent_shape=(CHANNELS, 1, 8, 8), context_dim=CONTEXT,
    pooled_dim=0, latent_scale=1.0,
    how_made="TinyQwenImage: Qwen-Image key names (ComfyUI's = diffusers'), 1 block; ComfyUI "
             "fixes the widths (24 heads of 128, text 3584), so its tests build it full width "
             "(0.38 B parameters); engine tests: 1 head, text 768",
    sizes={"0.28.0": FULL, "0.3.54": FULL},
    diffusers_model=diffusers_model)
