"""Tiny SD1.5 / SDXL-family UNets with the real LDM (openaimodel/SGM) layout, plus stand-ins.

No real checkpoint can be downloaded where the pack is tested, so training, export and the
ComfyUI round trip are exercised on UNets that have the exact module tree and state-dict key
names of ComfyUI's ``UNetModel`` but minimal depth and random weights. ComfyUI detects a
checkpoint from per-block transformer depths, context width and projection type, so the shapes
below are identified as ``SD15`` and ``KOALA_700M`` (an ``SDXL`` subclass) and run through the
real ``model_base`` classes. Written from the architecture, in plain torch (no ComfyUI import).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..families.sdxl import sdxl_adm, timestep_embedding  # noqa: F401  (re-exported)
from .standin import StandIn

COMFY_PREFIX = "model.diffusion_model."
TOKENS = 77  # CLIP context length; ComfyUI conditioning is (B, 77 * k, context_dim)
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class UNetSpec:
    """Hyper-parameters in ComfyUI's ``unet_config`` vocabulary (what detection reads back).

    ``transformer_depth`` has one entry per input ResBlock and ``transformer_depth_output`` one
    per output block, both as ComfyUI lists them (the output list is consumed from its end).
    ``transformer_depth_middle``: -2 no middle block, -1 a lone ResBlock, >= 0 the usual
    ResBlock / SpatialTransformer / ResBlock. Heads follow ComfyUI's rule: with
    ``num_head_channels == -1`` every transformer has ``num_heads`` heads (SD1.5), otherwise
    ``channels // num_head_channels`` heads of that width (SDXL).
    """

    family: str
    context_dim: int
    use_linear_in_transformer: bool
    adm_in_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int
    num_heads: int
    num_head_channels: int
    latent_scale: float
    pooled_dim: int
    comfy_model_names: tuple[str, ...]
    model_channels: int = 320
    in_channels: int = 4
    out_channels: int = 4
    prediction: str = "eps"

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer at ``channels``, as ComfyUI picks."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


SD15_TINY = UNetSpec(
    family="sd15",
    context_dim=768,
    use_linear_in_transformer=False,
    adm_in_channels=0,
    channel_mult=(1,),
    num_res_blocks=(1,),
    transformer_depth=(1,),
    transformer_depth_output=(1, 1),
    transformer_depth_middle=1,
    num_heads=8,  # ComfyUI's SD15 config: 8 heads everywhere (head width 40 at 320 channels)
    num_head_channels=-1,
    latent_scale=0.18215,
    pooled_dim=0,
    comfy_model_names=("SD15",),
)

SDXL_TINY = UNetSpec(
    family="sdxl",
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    channel_mult=(1, 1, 1),
    num_res_blocks=(1, 1, 1),
    transformer_depth=(0, 2, 5),
    transformer_depth_output=(0, 0, 2, 2, 5, 5),
    transformer_depth_middle=-2,
    num_heads=-1,
    num_head_channels=64,
    latent_scale=0.13025,
    pooled_dim=1280,
    comfy_model_names=("KOALA_700M", "SDXL"),
)

SPECS: dict[str, UNetSpec] = {"sd15": SD15_TINY, "sdxl": SDXL_TINY}


def _group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    # ResBlocks and ``out`` use torch's default eps; SpatialTransformer.norm uses 1e-6.
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """LDM ResBlock: norm-act-conv, add projected time embedding, norm-act-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            _group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling to the matching skip's size, then a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, output_shape: torch.Size | None = None) -> Tensor:
        size = (
            tuple(output_shape[2:])
            if output_shape is not None
            else tuple(s * 2 for s in x.shape[2:])
        )
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention with LDM key names (``to_q``/``to_k``/``to_v``/``to_out.0``).

    The score/softmax/value step is the separate :meth:`attention` so the engine can wrap or
    replace it (e.g. to record cross-attention entropy) without touching the projections.
    """

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, is_cross: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross = is_cross
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, heads, Tq, d), (B, heads, Tk, d) x2 -> (B, heads, Tq, d); scale 1/sqrt(d)."""
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)

        out = self.attention(
            split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        )
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """Gated GELU input projection of the LDM feed-forward (value half first, gate second)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, is_cross=False)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, is_cross=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image <-> token sequence wrapper; proj_in/out are 1x1 convs (SD1.5) or Linear (SDXL)."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = linear
        self.norm = _group_norm(channels, eps=1e-6)
        self.proj_in: nn.Module = (
            nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out: nn.Module = (
            nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)
        )

    def forward(self, x: Tensor, context: Tensor, use_checkpoint: bool = False) -> Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.movedim(1, 3).flatten(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            if use_checkpoint:
                x = checkpoint(block, x, context, use_reentrant=False)
            else:
                x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).movedim(3, 1)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """Runs a UNet block's layers, giving each the inputs its type needs."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor,
        output_shape: torch.Size | None = None,
        use_checkpoint: bool = False,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, use_checkpoint)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """ComfyUI/LDM ``UNetModel`` layout for ``spec`` (2-D, spatial transformers, no dropout)."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.spec = spec
        # Recompute each transformer block in backward (saves activation memory). Note that
        # hooks on CrossAttention.attention then also run during the backward recompute.
        self.gradient_checkpointing = False
        mc, emb_dim = spec.model_channels, spec.time_embed_dim

        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if spec.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(spec.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = spec.heads(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, spec.context_dim, spec.use_linear_in_transformer
            )

        depth_in = list(spec.transformer_depth)
        depth_out = list(spec.transformer_depth_output)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(spec.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(spec.channel_mult):
            for _ in range(spec.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                depth = depth_in.pop(0)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(spec.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block: TimestepEmbedSequential | None = None
        if spec.transformer_depth_middle >= -1:
            mid: list[nn.Module] = [ResBlock(ch, emb_dim)]
            if spec.transformer_depth_middle >= 0:
                mid += [transformer(ch, spec.transformer_depth_middle), ResBlock(ch, emb_dim)]
            self.middle_block = TimestepEmbedSequential(*mid)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.channel_mult))):
            for i in range(spec.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                depth = depth_out.pop()  # ComfyUI consumes this list from the end
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == spec.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _group_norm(ch), nn.SiLU(), nn.Conv2d(mc, spec.out_channels, 3, padding=1)
        )

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """Noise prediction for latents ``x`` at ``timesteps`` (0..999) given text ``context``."""
        if (y is not None) != bool(self.spec.adm_in_channels):
            raise ValueError(f"{self.spec.family}: y must be given iff the model has label_emb")
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        emb = self.time_embed(timestep_embedding(timesteps, self.spec.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))

        skips: list[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, use_checkpoint=use_ckpt)
            skips.append(h)
        if self.middle_block is not None:
            h = self.middle_block(h, emb, context, use_checkpoint=use_ckpt)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            shape = skips[-1].shape if skips else None
            h = block(h, emb, context, output_shape=shape, use_checkpoint=use_ckpt)
        return self.out(h.to(x.dtype))


def _named_leaf_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.GroupNorm | nn.LayerNorm | nn.Embedding):
            yield name, m


@torch.no_grad()
def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded init independent of the global RNG: U(+-1/sqrt(fan_in)) like torch's default.

    Output convs are deliberately *not* zeroed (LDM does zero them) so a fresh model has
    non-zero outputs and every parameter receives gradient.
    """
    for _, m in _named_leaf_modules(module):
        if isinstance(m, nn.GroupNorm | nn.LayerNorm):
            if m.weight is not None:  # (DiTs' LayerNorms have no affine parameters)
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, 1.0, generator=generator)
        else:
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)


def _materialize(make: Callable[..., M], *args: object) -> M:
    """Build on the meta device (skips torch's own init) and allocate on the CPU."""
    with torch.device("meta"):
        module = make(*args)
    return module.to_empty(device="cpu")


def build_unet(family: str = "sdxl", seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyUNet:
    """A tiny UNet of ``family`` ("sd15" | "sdxl") with weights fixed by ``seed``."""
    spec = SPECS[family]
    unet = _materialize(TinyUNet, spec)
    _init_weights(unet, torch.Generator().manual_seed(seed))
    return unet.to(dtype)


def comfy_state_dict(unet: TinyUNet) -> dict[str, Tensor]:
    """State dict under ComfyUI's checkpoint prefix ``model.diffusion_model.``."""
    return {COMFY_PREFIX + k: v.detach().contiguous() for k, v in unet.state_dict().items()}


def cross_attention_modules(unet: nn.Module) -> list[tuple[str, CrossAttention]]:
    """All attention modules (attn1 and attn2) with their qualified names, in model order."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, CrossAttention)]


def attention_module_names(unet: nn.Module) -> list[str]:
    """Qualified names of every attention Linear (to_q/to_k/to_v/to_out.0): LoRA targets."""
    return [
        f"{name}.{proj}"
        for name, _ in cross_attention_modules(unet)
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ]


_WORD = re.compile(r"\w+|[^\w\s]")


class TinyTextEncoder(nn.Module):
    """Deterministic stand-in for CLIP: each word hashes to a fixed random embedding.

    Prompts sharing words share token embeddings (so "sks dog" and "dog" overlap, as a
    DreamBooth test needs); position embeddings break symmetry. Never trained.
    """

    def __init__(self, context_dim: int, pooled_dim: int = 0, vocab: int = 4096) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.vocab = vocab
        self.token_embedding = nn.Embedding(vocab, context_dim)
        self.position_embedding = nn.Embedding(TOKENS, context_dim)
        self.text_projection = (
            nn.Linear(context_dim, pooled_dim, bias=False) if pooled_dim else None
        )

    def tokenize(self, prompt: str) -> list[int]:
        """BOS=0, words hashed (stable across processes, unlike ``hash``), EOS/pad=1."""
        ids = [0]
        for word in _WORD.findall(prompt.lower())[: TOKENS - 2]:
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            ids.append(2 + int.from_bytes(digest, "little") % (self.vocab - 2))
        return ids + [1] * (TOKENS - len(ids))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """(context (B, 77, context_dim), pooled (B, pooled_dim) or None without one)."""
        device = self.token_embedding.weight.device
        ids = torch.tensor([self.tokenize(p) for p in prompts], device=device)
        context = self.token_embedding(ids) + self.position_embedding.weight[None]
        if self.text_projection is None:
            return context, None
        real = (ids != 1).unsqueeze(-1).to(context.dtype)
        mean = (context * real).sum(1) / real.sum(1)
        return context, self.text_projection(mean)


class TinyVAE(nn.Module):
    """Fixed random 'VAE': 8x8 pixel patches projected to ``channels`` (4; Flux 16) and back.

    The encoder is an orthonormal 192 -> channels projection, the decoder its transpose, so
    decode(encode(x)) is the projection of x onto that patch subspace. Weights are buffers.
    Never trained.
    """

    def __init__(self, scaling_factor: float, seed: int = 0, channels: int = 4) -> None:
        super().__init__()
        self.scaling_factor = scaling_factor
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(3 * 64, channels, generator=g))
        self.register_buffer("basis", q.T.contiguous())  # (channels, 192), orthonormal rows

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (B, C, H/8, W/8), already scaled."""
        patches = F.pixel_unshuffle(images * 2.0 - 1.0, 8)
        # A real VAE's raw latents are ~1/scaling_factor this size; we return them pre-scaled.
        return torch.einsum("cp,bphw->bchw", self.basis.to(patches.dtype), patches)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        patches = torch.einsum("cp,bchw->bphw", self.basis.to(latents.dtype), latents)
        return ((F.pixel_shuffle(patches, 8) + 1.0) / 2.0).clamp(0.0, 1.0)


def text_and_vae(context_dim: int, pooled_dim: int, latent_scale: float, seed: int = 0,
                 dtype: torch.dtype = torch.float32, channels: int = 4
                 ) -> tuple[TinyTextEncoder, TinyVAE]:
    """Frozen text-encoder and VAE stand-ins, seeded by ``seed`` (any family's demo)."""
    text = _materialize(TinyTextEncoder, context_dim, pooled_dim)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        text.token_embedding.weight.normal_(0.0, 1.0, generator=g)
        text.position_embedding.weight.normal_(0.0, 0.1, generator=g)
        if text.text_projection is not None:
            text.text_projection.weight.normal_(0.0, context_dim**-0.5, generator=g)
    vae = TinyVAE(latent_scale, seed + 2, channels)
    return (text.to(dtype).requires_grad_(False).eval(),
            vae.to(dtype).requires_grad_(False).eval())


def build_tiny(
    family: str = "sdxl", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[TinyUNet, TinyTextEncoder, TinyVAE]:
    """UNet plus frozen text encoder and VAE stand-ins for ``family``, all seeded by ``seed``."""
    spec = SPECS[family]
    unet = build_unet(family, seed, dtype)
    return (unet, *text_and_vae(spec.context_dim, spec.pooled_dim, spec.latent_scale, seed,
                                dtype))


def unet_config(unet: TinyUNet) -> dict:
    """The fields of ComfyUI's ``unet_config`` that the key layout reads."""
    s = unet.spec
    return {"num_res_blocks": list(s.num_res_blocks), "channel_mult": list(s.channel_mult),
            "transformer_depth_middle": s.transformer_depth_middle}


def _stand_in(family: str) -> StandIn:
    spec = SPECS[family]
    return StandIn(
        family=family,
        build=lambda seed=0, dtype=torch.float32, **_: build_unet(family, seed, dtype),
        comfy_state_dict=comfy_state_dict, comfy_names=spec.comfy_model_names,
        latent_shape=(4, 8, 8), context_dim=spec.context_dim, pooled_dim=spec.pooled_dim,
        latent_scale=spec.latent_scale, unet_config=unet_config,
        how_made=f"TinyUNet ({family}): real LDM key names, model_channels 320, context "
                 f"{spec.context_dim}, transformer depths {list(spec.transformer_depth)} / "
                 f"{list(spec.transformer_depth_output)}; detected as "
                 f"{' or '.join(spec.comfy_model_names)} (docs: tiny-models.md)",
        sizes={"0.3.54": {}, "0.28.0": {}},
        why_not={"diffusers": "tests/test_diffusers_model.py loads the files into a diffusers "
                              "SD pipeline built from config"})


SD15_STAND_IN = _stand_in("sd15")
SDXL_STAND_IN = _stand_in("sdxl")
