"""A Lumina 2 (NextDiT) with the real module tree and key names, which ComfyUI detects as Lumina2.

What ComfyUI 0.28.0 derives from a Lumina 2 / Z-Image file (``comfy/model_detection.py``): the
width from ``cap_embedder.1.weight`` (and the text width from its input side), the number of
``layers``; but heads, RoPE axes and the MLP ratio only for the two real widths, 2304 (Lumina
2: 24 heads, 8 key/value heads, axes 32/32/32) and 3840 (Z-Image: 30 heads, axes 32/48/48).
At any other width the class defaults apply (32 heads, axes 16/56/56) and the model asserts
``width / 32 == 128``: the only other width it builds is 4096. The two refiner stacks are fixed
at 2 blocks each. So the cheapest file ComfyUI detects is Lumina 2 at 2304 with one layer and a
768-wide text input: 0.42 B parameters (1 layer at 3840 as Z-Image: 0.90 B; at 4096: 1.40 B;
measured on the meta device with ComfyUI's own class). ComfyUI 0.3.54 fixes every size
(2304 wide, 26 layers, 2304-wide text: 2.6 B parameters): no stand-in there. The engine-side
tests use the same class at 2 heads (1 key/value head) of 96, width 192.

Written from the published architecture (Alpha-VLLM's Lumina-Image 2.0, NextDiT: a text
refiner and an image refiner of 2 blocks each, then single-stream blocks over the joint
[text; image] sequence with grouped-query attention, sandwich RMSNorms, tanh-gated adaLN
scales, SwiGLU MLPs; 3-axis RoPE where text tokens count along axis 0 and the image sits after
them; 2x2 patches of a 16-channel latent; it predicts ``x0 - noise`` at time ``1 - sigma``), in
plain torch; ``tests/comfyui/test_families.py`` checks it against ComfyUI's own ``NextDiT``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .standin import StandIn
from .tiny import _init_weights, _materialize
from .tiny_flux import apply_rope, rope, timestep_embedding

HEAD_DIM, CONTEXT, CHANNELS, PATCH = 96, 768, 16, 2
AXES, THETA, FFN_MULT, MULTIPLE_OF, NORM_EPS = (32, 32, 32), 10000, 4.0, 256, 1e-5


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, L, D) x3 → (B, L, H*D); q and k already rotated."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class JointAttention(nn.Module):
    """Fused ``qkv`` (queries for every head, then the shared key and value heads), ``out``."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * HEAD_DIM, bias=False)
        self.out = nn.Linear(heads * HEAD_DIM, dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(HEAD_DIM), nn.RMSNorm(HEAD_DIM)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * HEAD_DIM, self.kv_heads * HEAD_DIM,
                                     self.kv_heads * HEAD_DIM], dim=-1)
        q = self.q_norm(q.view(b, n, self.heads, HEAD_DIM))  # (B, L, H, D), as ComfyUI
        k = self.k_norm(k.view(b, n, self.kv_heads, HEAD_DIM))
        pe = pe.transpose(1, 2)  # heads-first, as q and k now
        q, k = apply_rope(q.transpose(1, 2), pe), apply_rope(k.transpose(1, 2), pe)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.view(b, n, self.kv_heads, HEAD_DIM).transpose(1, 2).repeat_interleave(rep, dim=1)
        return self.out(attention(q, k, v))


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = MULTIPLE_OF * -(-int(FFN_MULT * dim) // MULTIPLE_OF)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-normed attention and MLP; ``modulation``: tanh-gated adaLN scales from the
    time embedding (the text refiner has none)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, modulation: bool) -> None:
        super().__init__()
        self.attention = JointAttention(dim, heads, kv_heads)
        self.feed_forward = FeedForward(dim)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            setattr(self, n, nn.RMSNorm(dim, eps=NORM_EPS))
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim))

    def forward(self, x: Tensor, mask, pe: Tensor, adaln_input: Tensor | None = None) -> Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), pe))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        s_msa, g_msa, s_mlp, g_mlp = self.adaLN_modulation(adaln_input)[:, None].chunk(4, -1)
        h = self.attention(self.attention_norm1(x) * (1 + s_msa), pe)
        x = x + g_msa.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + s_mlp))
        return x + g_mlp.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, PATCH * PATCH * CHANNELS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c)[:, None]))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


class TinyLumina2(nn.Module):
    """Lumina 2 layout: ``forward(x, timesteps, context, num_tokens)`` like ComfyUI's NextDiT."""

    def __init__(self, heads: int = 2, kv_heads: int = 1, depth: int = 1,
                 context: int = CONTEXT) -> None:
        super().__init__()
        dim = heads * HEAD_DIM
        self.x_embedder = nn.Linear(PATCH * PATCH * CHANNELS, dim)
        self.noise_refiner = nn.ModuleList(TransformerBlock(dim, heads, kv_heads, True)
                                           for _ in range(2))
        self.context_refiner = nn.ModuleList(TransformerBlock(dim, heads, kv_heads, False)
                                             for _ in range(2))
        self.t_embedder = TimestepEmbedder(min(dim, 1024))
        self.cap_embedder = nn.Sequential(nn.RMSNorm(context, eps=NORM_EPS),
                                          nn.Linear(context, dim))
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, kv_heads, True)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(dim)

    @staticmethod
    def position_embedding(ids: Tensor) -> Tensor:
        """RoPE (1, L, 1, D/2, 2, 2) for ids (L, 3): sequence-first, as ComfyUI passes it."""
        return torch.cat([rope(ids[None, :, i], AXES[i], THETA) for i in range(3)], dim=-3)[
            :, :, None]

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, num_tokens=None,
                **_) -> Tensor:
        b, c, h, w = x.shape
        x = F.pad(x, (0, (-w) % PATCH, 0, (-h) % PATCH), mode="circular")
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        adaln = self.t_embedder.mlp(timestep_embedding(1.0 - timesteps, 256, time_factor=1.0)
                                    .to(x.dtype))
        cap = self.cap_embedder(context)
        n_txt = cap.shape[1]
        txt_ids = torch.zeros(n_txt, 3, device=x.device)
        txt_ids[:, 0] = torch.arange(n_txt, device=x.device) + 1.0
        img_ids = torch.zeros(rows, cols, 3, device=x.device)
        img_ids[..., 0] = n_txt + 1
        img_ids[..., 1] = torch.arange(rows, device=x.device)[:, None].float()
        img_ids[..., 2] = torch.arange(cols, device=x.device)[None, :].float()
        pe_txt = self.position_embedding(txt_ids)
        pe_img = self.position_embedding(img_ids.flatten(0, 1))
        img = x.reshape(b, c, rows, PATCH, cols, PATCH).permute(0, 2, 4, 3, 5, 1)
        img = self.x_embedder(img.flatten(3).flatten(1, 2))  # patch order (row, col, channel)
        for block in self.context_refiner:
            cap = block(cap, None, pe_txt)
        for block in self.noise_refiner:
            img = block(img, None, pe_img, adaln)
        joint, pe = torch.cat((cap, img), 1), torch.cat((pe_txt, pe_img), 1)
        for block in self.layers:
            joint = block(joint, None, pe, adaln)
        out = self.final_layer(joint, adaln)[:, n_txt:]
        out = out.view(b, rows, cols, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return -out.reshape(b, c, rows * PATCH, cols * PATCH)[:, :, :h, :w]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **size) -> TinyLumina2:
    """The Lumina 2 stand-in with weights fixed by ``seed`` (RMSNorm weights 1); ``size``:
    TinyLumina2's ``heads``, ``kv_heads`` (of 96), ``depth`` and ``context`` (text width)."""
    model = _materialize(TinyLumina2, *[size.get(k, d) for k, d in (
        ("heads", 2), ("kv_heads", 1), ("depth", 1), ("context", CONTEXT))])
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model.to(dtype)


def comfy_state_dict(model: TinyLumina2) -> dict[str, Tensor]:
    """Keys as in the published lumina_2 diffusion-model file (no prefix): what UNETLoader
    opens."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def diffusers_model(model: TinyLumina2):
    """A ``Lumina2Transformer2DModel`` of the same shapes (diffusers' own random init)."""
    from diffusers import Lumina2Transformer2DModel

    attn = model.layers[0].attention
    torch.manual_seed(0)
    return Lumina2Transformer2DModel(
        sample_size=16, patch_size=PATCH, in_channels=CHANNELS,
        hidden_size=model.x_embedder.out_features, num_layers=len(model.layers),
        num_refiner_layers=2, num_attention_heads=attn.heads, num_kv_heads=attn.kv_heads,
        multiple_of=MULTIPLE_OF, ffn_dim_multiplier=None, norm_eps=NORM_EPS,
        axes_dim_rope=AXES, axes_lens=(300, 512, 512),
        cap_feat_dim=model.cap_embedder[1].in_features)


STAND_IN = StandIn(
    family="lumina2", build=build, comfy_state_dict=comfy_state_dict,
    comfy_names=("Lumina2",), latent_shape=(CHANNELS, 8, 8), context_dim=CONTEXT,
    pooled_dim=0, latent_scale=0.3611,
    how_made="TinyLumina2: Lumina 2 (NextDiT) key names, 2+2 refiner blocks and 1 layer; "
             "ComfyUI sets heads only at the real widths, so its tests build it at 2304 (24 "
             "heads, 8 key/value heads; 0.42 B parameters) with a 768-wide text input; engine "
             "tests: width 192",
    sizes={"0.28.0": {"heads": 24, "kv_heads": 8}},
    why_not={"0.3.54": "ComfyUI 0.3.54 fixes Lumina 2 at 26 layers, 2304 wide with a "
                       "2304-wide text input (2.6 B parameters): no affordable stand-in"},
    diffusers_model=diffusers_model)
