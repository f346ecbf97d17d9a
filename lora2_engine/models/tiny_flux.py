"""A tiny Flux.1 with the real module tree and key names, which ComfyUI detects as FluxSchnell.

ComfyUI derives Flux's widths from tensor shapes (``comfy/model_detection.py``, 0.28.0): hidden
size from ``img_in.weight``, context width from ``txt_in.weight``, vec width from
``vector_in.in_layer.weight``, heads = hidden / 128, depths counted; no ``guidance_in`` means
schnell. So hidden 128 (one head of 128), one double and one single block, context 768 (CLIP-L
width: the conditioning the SD1.5 tests already make) and vec 768 give a 1.15 M-parameter model
that runs through ComfyUI's real ``model_base.Flux`` (rectified flow, shift 1).

Written from the published architecture (Black Forest Labs' Flux: double-stream blocks with
separate image/text weights and joint attention, single-stream blocks with fused ``linear1`` =
qkv + MLP-in, RMS q/k norms, 3-axis RoPE over (0, row, col) ids, 2x2 patches), in plain torch
and without in-place updates; ``tests/comfyui/test_families.py`` checks it against ComfyUI's own
``Flux`` module, output for output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .standin import StandIn
from .tiny import _init_weights, _materialize

HIDDEN, CONTEXT, VEC, CHANNELS, PATCH = 128, 768, 768, 16, 2
AXES, THETA, MLP_RATIO = (16, 56, 56), 10000, 4.0


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """Flux's sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000), cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (..., n, dim/2, 2, 2) for positions ``pos`` (..., n) on one axis."""
    scale = torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64, device=pos.device)
    angles = pos.float()[..., None] * (1.0 / theta**scale)  # (..., n, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x`` (B, H, L, D) by ``pe`` (B, 1, L, D/2, 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))  # BFL's name: ``.scale``

    def forward(self, x: Tensor) -> Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """shift, scale, gate (x2 for double blocks) from the conditioning vector."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return list(self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1))


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """(B, H, L, D) x3 → (B, L, H*D), after RoPE on q and k."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, _ = qkv.shape
    return tuple(qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4))  # 3 x (B, H, L, D)


def _mlp(dim: int) -> nn.Sequential:
    hidden = int(dim * MLP_RATIO)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [text; image] tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(dim, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(dim, heads))
            setattr(self, f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", _mlp(dim))

    def _qkv(self, side: str, x: Tensor, shift: Tensor, scale: Tensor):
        attn = getattr(self, f"{side}_attn")
        q, k, v = _heads(attn.qkv((1 + scale) * getattr(self, f"{side}_norm1")(x) + shift),
                         self.heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, side: str, x: Tensor, attn: Tensor, mods: list[Tensor]) -> Tensor:
        x = x + mods[2] * getattr(self, f"{side}_attn").proj(attn)
        h = (1 + mods[4]) * getattr(self, f"{side}_norm2")(x) + mods[3]
        return x + mods[5] * getattr(self, f"{side}_mlp")(h)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, **_) -> tuple:
        img_mods, txt_mods = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", img, img_mods[0], img_mods[1])
        tq, tk, tv = self._qkv("txt", txt, txt_mods[0], txt_mods[1])
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2),
                         pe)
        n_txt = txt.shape[1]
        return (self._finish("img", img, attn[:, n_txt:], img_mods),
                self._finish("txt", txt, attn[:, :n_txt], txt_mods))


class SingleStreamBlock(nn.Module):
    """One stream of [text; image] tokens: ``linear1`` = qkv + MLP-in, ``linear2`` = out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.mlp_hidden = dim, heads, int(dim * MLP_RATIO)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, **_) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split(
            [3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), 2)
        return x + gate * self.linear2(out)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class TinyFlux(nn.Module):
    """Flux.1-schnell layout: ``forward(x, timesteps, context, y)`` like ComfyUI's ``Flux``."""

    def __init__(self, hidden: int = HIDDEN, depth: int = 1, depth_single: int = 1,
                 context: int = CONTEXT, vec: int = VEC) -> None:
        super().__init__()
        heads = hidden // sum(AXES)
        self.vec_dim = vec
        self.img_in = nn.Linear(CHANNELS * PATCH * PATCH, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(vec, hidden)
        self.txt_in = nn.Linear(context, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads)
                                           for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads)
                                           for _ in range(depth_single))
        self.final_layer = LastLayer(hidden, CHANNELS * PATCH * PATCH)

    @staticmethod
    def position_embedding(n_txt: int, rows: int, cols: int, batch: int, device) -> Tensor:
        """RoPE for [text; image] tokens: text ids are 0, image ids are (0, row, col)."""
        ids = torch.zeros(rows, cols, 3, device=device)
        ids[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(cols, device=device, dtype=torch.float32)[None, :]
        ids = torch.cat([torch.zeros(n_txt, 3, device=device), ids.flatten(0, 1)])
        ids = ids[None].expand(batch, -1, -1)
        pe = torch.cat([rope(ids[..., i], AXES[i], THETA) for i in range(3)], dim=-3)
        return pe[:, None]  # (B, 1, L, D/2, 2, 2)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                **_) -> Tensor:
        b, c, h, w = x.shape
        x = F.pad(x, (0, (-w) % PATCH, 0, (-h) % PATCH), mode="circular")
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        img = x.reshape(b, c, rows, PATCH, cols, PATCH).permute(0, 2, 4, 1, 3, 5).flatten(3)
        img = self.img_in(img.flatten(1, 2))  # (B, rows*cols, hidden)
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if y is None:
            y = torch.zeros(b, self.vec_dim, device=x.device, dtype=img.dtype)
        vec = vec + self.vector_in(y[:, : self.vec_dim])
        txt = self.txt_in(context)
        pe = self.position_embedding(txt.shape[1], rows, cols, b, x.device)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        stream = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            stream = block(stream, vec=vec, pe=pe)
        out = self.final_layer(stream[:, txt.shape[1]:], vec)  # (B, rows*cols, c*4)
        out = out.view(b, rows, cols, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, rows * PATCH, cols * PATCH)[:, :, :h, :w]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **size) -> TinyFlux:
    """The tiny Flux with weights fixed by ``seed`` (RMSNorm scales 1); ``size``: TinyFlux's
    ``hidden``, ``depth``, ``depth_single``, ``context``, ``vec``."""
    model = _materialize(TinyFlux, *[size.get(k, d) for k, d in (
        ("hidden", HIDDEN), ("depth", 1), ("depth_single", 1), ("context", CONTEXT),
        ("vec", VEC))])
    _init_weights(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.scale.fill_(1.0)
    return model.to(dtype)


def comfy_state_dict(model: TinyFlux) -> dict[str, Tensor]:
    """Keys as in the published flux1-schnell file (no prefix): what UNETLoader opens."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def diffusers_model(model: TinyFlux):
    """A ``FluxTransformer2DModel`` of the same shapes (its module names are what the diffusers
    key style maps to; weights are diffusers' own random init)."""
    from diffusers import FluxTransformer2DModel

    hidden = model.img_in.out_features
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS * PATCH * PATCH, num_layers=len(model.double_blocks),
        num_single_layers=len(model.single_blocks), attention_head_dim=sum(AXES),
        num_attention_heads=hidden // sum(AXES), joint_attention_dim=model.txt_in.in_features,
        pooled_projection_dim=model.vec_dim, guidance_embeds=False, axes_dims_rope=AXES)


STAND_IN = StandIn(
    family="flux", build=build, comfy_state_dict=comfy_state_dict,
    comfy_names=("FluxSchnell",), latent_shape=(CHANNELS, 8, 8), context_dim=CONTEXT,
    pooled_dim=VEC, latent_scale=0.3611,
    how_made="TinyFlux: BFL key names, hidden 128 (1 head), 1 double + 1 single block, "
             "txt_in 768 wide (CLIP-L conditioning), vector_in 768, no guidance_in; 1.15 M "
             "params, saved unprefixed as flux1-schnell files are",
    # ComfyUI 0.3.54 fixes Flux's hidden size at 3072 and its context at 4096 in detection:
    # there the stand-in is full width (0.54 B parameters, ~10 s per CPU step, 3.4 GB)
    sizes={"0.28.0": {}, "0.3.54": {"hidden": 3072, "context": 4096}},
    diffusers_model=diffusers_model)
