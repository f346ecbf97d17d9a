"""A tiny Wan 2.1 / 2.2 (text-to-video) with the real module tree and key names, used on one
frame as an image model, which ComfyUI detects as ``WAN21_T2V``.

ComfyUI derives Wan from tensor shapes (``comfy/model_detection.py``, 0.28.0 and 0.3.54): the
width from ``head.modulation``, heads = width / 128, the MLP width from ``blocks.0.ffn.0``,
layers counted, in/out channels from ``patch_embedding`` / ``head.head``. So width 128 (one
head of 128), MLP 512 and one block is a Wan. The text width is not read from shapes: it is
4096 (umT5-XXL) unless the file's metadata says otherwise, which ComfyUI 0.28.0 reads
(``{"config": {"transformer": {"text_dim": ...}}}``, as Wan files may carry) and 0.3.54
ignores. The stand-in therefore takes 768-wide text (CLIP-L: the conditioning the SD1.5 tests
already make) with that metadata on 0.28.0, and 4096-wide text on 0.3.54. Latents are
(C, T, h, w) with T = 1 for a still image.

Written from the published architecture (Alibaba's Wan 2.1: a 3-D patch embedding (1, 2, 2),
blocks of RoPE self-attention, cross-attention on the text and a GELU MLP, each modulated by
six vectors from the timestep; RMS q/k norms over the full width; 3-axis RoPE over
(frame, row, col)), in plain torch; ``tests/comfyui/test_families.py`` checks it against
ComfyUI's own ``WanModel``, output for output.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .standin import StandIn
from .tiny import _init_weights, _materialize
from .tiny_flux import apply_rope, rope

DIM, FFN, HEAD, TEXT, CHANNELS, FREQ = 128, 512, 128, 768, 16, 256
PATCH = (1, 2, 2)
COMFY_TEXT = 4096  # ComfyUI's Wan text width when a file does not say


def sinusoidal_embedding(dim: int, position: Tensor) -> Tensor:
    """Wan's timestep embedding: cosine half first, no scaling of the timestep."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, device=position.device).float().div(half))
    args = torch.outer(position.float(), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Attention(nn.Module):
    """q, k, v, o projections with RMS norms of q and k over the full width."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, L, H, d) q, k, v → (B, L, H*d)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.num_heads, -1)  # (B, L, H, d)


class SelfAttention(Attention):
    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        q = apply_rope(self._heads(self.norm_q(self.q(x))).transpose(1, 2), pe).transpose(1, 2)
        k = apply_rope(self._heads(self.norm_k(self.k(x))).transpose(1, 2), pe).transpose(1, 2)
        return self.o(self._attend(q, k, self._heads(self.v(x))))


class CrossAttention(Attention):
    """Image tokens (queries) read the text tokens (keys, values): the entropy term's layer."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        return self.o(self._attend(self._heads(q), self._heads(k), self._heads(self.v(context))))


class Block(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)  # cross_attn_norm: affine
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor, e: Tensor, pe: Tensor, context: Tensor, **_) -> Tensor:
        e = (self.modulation.to(x.dtype) + e).unbind(1)  # 6 x (B, dim)
        x = x + self.self_attn(self.norm1(x) * (1 + e[1][:, None]) + e[0][:, None],
                               pe) * e[2][:, None]
        x = x + self.cross_attn(self.norm3(x), context)
        h = self.norm2(x) * (1 + e[4][:, None]) + e[3][:, None]
        return x + self.ffn(h) * e[5][:, None]


class Head(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, math.prod(PATCH) * out)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.to(x.dtype) + e[:, None]).unbind(1)
        return self.head(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class TinyWan(nn.Module):
    """Wan 2.1 T2V layout: ``forward(x (B, C, T, h, w), timesteps, context)`` like ComfyUI's
    ``WanModel``."""

    def __init__(self, dim: int = DIM, ffn: int = FFN, layers: int = 1,
                 context: int = TEXT) -> None:
        super().__init__()
        self.dim, self.heads, self.ffn_dim, self.text_dim = dim, dim // HEAD, ffn, context
        self.patch_embedding = nn.Conv3d(CHANNELS, dim, PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(nn.Linear(context, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(FREQ, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, ffn, self.heads) for _ in range(layers))
        self.head = Head(dim, CHANNELS)
        d = dim // self.heads
        self.axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def position_embedding(self, frames: int, rows: int, cols: int, device) -> Tensor:
        """RoPE matrices (1, 1, L, d/2, 2, 2) for (frame, row, col) ids of every token."""
        grid = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32)
                                for n in (frames, rows, cols)), indexing="ij")
        ids = torch.stack(grid, -1).reshape(1, -1, 3)
        pe = torch.cat([rope(ids[..., i], self.axes[i], 10000) for i in range(3)], dim=-3)
        return pe[:, None]

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, **_) -> Tensor:
        b, c, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % PATCH[2], 0, (-h) % PATCH[1], 0, 0), mode="circular")
        img = self.patch_embedding(x.float()).to(x.dtype)
        grid = img.shape[2:]
        img = img.flatten(2).transpose(1, 2)  # (B, T*rows*cols, dim)
        e = self.time_embedding(sinusoidal_embedding(FREQ, timesteps).to(img.dtype))  # (B, dim)
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))  # (B, 6, dim)
        txt = self.text_embedding(context)
        pe = self.position_embedding(*grid, x.device)
        for block in self.blocks:
            img = block(img, e=e0, pe=pe, context=txt)
        out = self.head(img, e)  # (B, L, prod(PATCH) * c)
        out = out.view(b, *grid, *PATCH, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, c, *(g * p for g, p in zip(grid, PATCH)))
        return out[:, :, :t, :h, :w]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **size) -> TinyWan:
    """The tiny Wan with weights fixed by ``seed`` (q/k norm scales 1); ``size``: TinyWan's
    ``dim``, ``ffn``, ``layers``, ``context``."""
    model = _materialize(TinyWan, *[size.get(k, d) for k, d in (
        ("dim", DIM), ("ffn", FFN), ("layers", 1), ("context", TEXT))])
    g = torch.Generator().manual_seed(seed)
    _init_weights(model, g)
    with torch.no_grad():
        conv = model.patch_embedding
        bound = conv.weight[0].numel() ** -0.5
        conv.weight.uniform_(-bound, bound, generator=g)
        conv.bias.uniform_(-bound, bound, generator=g)
        for m in model.modules():
            if isinstance(m, Block | Head):
                m.modulation.normal_(0.0, model.dim**-0.5, generator=g)
    return model.to(dtype)


def comfy_state_dict(model: TinyWan) -> dict[str, Tensor]:
    """Keys as in the published Wan 2.1 T2V files (no prefix): what UNETLoader opens."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def comfy_metadata(model: TinyWan) -> dict[str, str]:
    """The text width for ComfyUI when it is not umT5's 4096 (read by 0.28.0)."""
    text = model.text_dim
    return {} if text == COMFY_TEXT else {
        "config": json.dumps({"transformer": {"text_dim": text}})}


def diffusers_model(model: TinyWan):
    """A ``WanTransformer3DModel`` of the same shapes (its module names are what the diffusers
    key style maps to; weights are diffusers' own random init)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=PATCH, num_attention_heads=model.heads, attention_head_dim=HEAD,
        in_channels=CHANNELS, out_channels=CHANNELS,
        text_dim=model.text_dim, freq_dim=FREQ, ffn_dim=model.ffn_dim,
        num_layers=len(model.blocks))


STAND_IN = StandIn(
    family="wan", build=build, comfy_state_dict=comfy_state_dict,
    comfy_names=("WAN21_T2V",), latent_shape=(CHANNELS, 1, 8, 8), context_dim=TEXT,
    pooled_dim=0, latent_scale=1.0,
    how_made="TinyWan: Wan 2.1 key names, width 128 (head.modulation; 1 head of 128), MLP 512, "
             "1 block, text 768 wide via the file's metadata config (ComfyUI 0.28.0 reads it; "
             "4096 on 0.3.54, which does not); latents (16, 1, h, w): one frame",
    sizes={"0.28.0": {}, "0.3.54": {"context": COMFY_TEXT}},
    comfy_metadata=comfy_metadata,
    diffusers_model=diffusers_model)
