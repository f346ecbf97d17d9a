"""Tiny SD1.5 / SDXL UNets: real LDM key layout, working training maths, and ComfyUI parity.

The layout checks count blocks from key names, the way ComfyUI's detection does, so a
layout change that would make ComfyUI misdetect the model fails here even without ComfyUI.
The parity test (needs COMFYUI_PATH) loads our weights into ComfyUI's own UNetModel.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora2_engine.models import (
    COMFY_PREFIX,
    SD15_TINY,
    SDXL_TINY,
    SPECS,
    CrossAttention,
    TinyUNet,
    UNetSpec,
    attention_module_names,
    build_tiny,
    build_unet,
    comfy_state_dict,
    sdxl_adm,
)

torch.set_num_threads(min(2, torch.get_num_threads()))
FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def unet(request: pytest.FixtureRequest) -> TinyUNet:
    return build_unet(request.param, seed=0)


def _inputs(spec: UNetSpec, batch: int = 1, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "timesteps": torch.tensor([999.0, 10.5][:batch] + [500.0] * max(0, batch - 2)),
        "context": torch.randn(batch, 77, spec.context_dim, generator=g),
    }
    if spec.adm_in_channels:
        inputs["y"] = torch.randn(batch, spec.adm_in_channels, generator=g)
    return inputs


def _expected_transformer_blocks(spec: UNetSpec) -> int:
    return (
        sum(spec.transformer_depth)
        + max(spec.transformer_depth_middle, 0)
        + sum(spec.transformer_depth_output)
    )


def _count(keys: list[str], pattern: str) -> int:
    """Number of consecutive indices n for which some key starts with pattern.format(n)."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


# ---------------------------------------------------------------- layout and key names


def test_sdxl_key_shapes() -> None:
    sd = comfy_state_dict(build_unet("sdxl"))
    p = COMFY_PREFIX
    expected = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "label_emb.0.0.weight": (1280, 2816),
        "label_emb.0.2.weight": (1280, 1280),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.2.0.op.weight": (320, 320, 3, 3),
        "input_blocks.3.1.proj_in.weight": (320, 320),  # Linear: what marks SDXL
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": (320, 2048),
        "input_blocks.3.1.transformer_blocks.1.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.1.transformer_blocks.1.ff.net.2.weight": (320, 1280),
        "input_blocks.5.1.transformer_blocks.4.attn1.to_out.0.bias": (320,),
        "output_blocks.0.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.1.2.conv.weight": (320, 320, 3, 3),
        "output_blocks.3.2.conv.weight": (320, 320, 3, 3),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[p + key].shape) == shape, key
    keys = list(sd)
    assert not any(k.startswith(p + "middle_block.") for k in keys)
    assert not any(k.startswith(p + "input_blocks.4.1.") for k in keys)  # a Downsample
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in keys)
    assert all(k.startswith(p) for k in keys)


def test_sd15_key_shapes() -> None:
    sd = comfy_state_dict(build_unet("sd15"))
    p = COMFY_PREFIX
    expected = {
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),  # 1x1 conv: what marks SD1.x
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "middle_block.0.in_layers.2.weight": (320, 320, 3, 3),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "middle_block.1.proj_out.weight": (320, 320, 1, 1),
        "middle_block.2.out_layers.3.weight": (320, 320, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
    }
    for key, shape in expected.items():
        assert tuple(sd[p + key].shape) == shape, key
    assert p + "label_emb.0.0.weight" not in sd
    assert p + "input_blocks.0.0.weight" in sd


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_view_matches_spec(family: str) -> None:
    """Re-derive what ComfyUI's detection reads from keys: per-block transformer depths etc."""
    spec = SPECS[family]
    sd = comfy_state_dict(build_unet(family))
    keys = [k[len(COMFY_PREFIX) :] for k in sd]
    n_in = _count(keys, "input_blocks.{}.")
    n_out = _count(keys, "output_blocks.{}.")
    assert n_out == n_in
    depth_in = [
        _count(keys, f"input_blocks.{i}.1.transformer_blocks.{{}}.")
        for i in range(n_in)
        if f"input_blocks.{i}.0.in_layers.0.weight" in keys
    ]
    assert depth_in == list(spec.transformer_depth)
    depth_out = [
        _count(keys, f"output_blocks.{i}.1.transformer_blocks.{{}}.") for i in range(n_out)
    ]
    assert depth_out[::-1] == list(spec.transformer_depth_output)  # ComfyUI lists them reversed
    assert sd[COMFY_PREFIX + "input_blocks.0.0.weight"].shape[0] == 320
    first = next(i for i in range(n_in) if f"input_blocks.{i}.1.proj_in.weight" in keys)
    assert (sd[f"{COMFY_PREFIX}input_blocks.{first}.1.proj_in.weight"].dim() == 2) == (
        spec.use_linear_in_transformer
    )
    context_key = f"{COMFY_PREFIX}input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd[context_key].shape[1] == spec.context_dim
    if spec.transformer_depth_middle >= 0:
        assert (
            _count(keys, "middle_block.1.transformer_blocks.{}.") == spec.transformer_depth_middle
        )
    else:
        assert not any(k.startswith("middle_block.") for k in keys)


def test_attention_modules(unet: TinyUNet) -> None:
    spec = unet.spec
    names = attention_module_names(unet)
    assert len(names) == _expected_transformer_blocks(spec) * 2 * 4
    assert len(set(names)) == len(names)
    modules = dict(unet.named_modules())
    for name in names:
        assert isinstance(modules[name], nn.Linear), name
        assert re.search(r"transformer_blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0)$", name)
    attns = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert sum(a.is_cross for a in attns) == len(attns) // 2
    for name, m in unet.named_modules():
        if isinstance(m, CrossAttention):
            assert m.is_cross == name.endswith("attn2")
            heads, dim_head = spec.heads(320)
            assert (m.heads, m.dim_head) == (heads, dim_head)
    first = "input_blocks.3.1" if spec.family == "sdxl" else "input_blocks.1.1"
    assert names[0] == f"{first}.transformer_blocks.0.attn1.to_q"


def test_heads_follow_comfyui_rules() -> None:
    assert SD15_TINY.heads(320) == (8, 40)  # SD15: num_heads=8, num_head_channels=-1
    assert SDXL_TINY.heads(320) == (5, 64)  # default: num_head_channels=64


# ---------------------------------------------------------------- maths


def test_forward_backward(unet: TinyUNet) -> None:
    inputs = _inputs(unet.spec, batch=2)
    unet.zero_grad(set_to_none=True)
    out = unet(**inputs)
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-2
    assert not torch.allclose(out[0], out[1])
    (out**2).mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_sdxl_requires_y() -> None:
    unet = build_unet("sdxl")
    inputs = _inputs(SDXL_TINY)
    del inputs["y"]
    with pytest.raises(ValueError):
        unet(**inputs)


def test_odd_latent_size(unet: TinyUNet) -> None:
    """Upsampling follows the skip's size, so non-power-of-two latents work (as in ComfyUI)."""
    x = torch.randn(1, 4, 13, 11)
    inputs = _inputs(unet.spec) | {"x": x}
    with torch.no_grad():
        assert unet(**inputs).shape == x.shape


def test_determinism() -> None:
    a, b, c = build_unet("sd15", seed=3), build_unet("sd15", seed=3), build_unet("sd15", seed=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.out[2].weight, c.out[2].weight)
    torch.manual_seed(0)
    d = build_unet("sd15", seed=3)
    assert torch.equal(a.out[2].weight, d.out[2].weight)  # global RNG does not leak in


def test_gradient_checkpointing_matches(unet: TinyUNet) -> None:
    inputs = _inputs(unet.spec)
    results = []
    for ckpt in (False, True):
        unet.gradient_checkpointing = ckpt
        unet.zero_grad(set_to_none=True)
        out = unet(**inputs)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}))
    unet.gradient_checkpointing = False
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_attention_hook_sees_heads_layout(unet: TinyUNet) -> None:
    """Wrapping CrossAttention.attention changes nothing and exposes (B, heads, T, d)."""
    inputs = _inputs(unet.spec, size=16)
    with torch.no_grad():
        ref = unet(**inputs)
    seen: list[tuple[bool, tuple[int, ...], tuple[int, ...]]] = []
    originals = {}
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            originals[m] = m.attention

            def wrapped(q, k, v, _m=m, _orig=m.attention):
                seen.append((_m.is_cross, tuple(q.shape), tuple(k.shape)))
                return _orig(q, k, v)

            m.attention = wrapped
    try:
        with torch.no_grad():
            out = unet(**inputs)
    finally:
        for m in originals:
            del m.attention
    torch.testing.assert_close(out, ref)
    assert len(seen) == 2 * _expected_transformer_blocks(unet.spec)
    heads, dim_head = unet.spec.heads(320)
    for is_cross, q, k in seen:
        assert q[1:2] + q[3:] == (heads, dim_head)
        assert k[2] == (77 if is_cross else q[2])


# ---------------------------------------------------------------- stand-ins


def test_sdxl_adm_layout() -> None:
    pooled = torch.randn(2, 1280)
    adm = sdxl_adm(pooled, 1024, 768, crop_top=16, crop_left=0)
    assert adm.shape == (2, 2816)
    assert torch.equal(adm[:, :1280], pooled)
    assert torch.equal(adm[0, 1280:], adm[1, 1280:])
    # cos half first; frequency 0 is exactly 1 rad per unit
    assert adm[0, 1280].item() == pytest.approx(math.cos(1024.0), abs=1e-5)
    assert adm[0, 1280 + 128].item() == pytest.approx(math.sin(1024.0), abs=1e-5)
    assert adm[0, 1280 + 256].item() == pytest.approx(math.cos(768.0), abs=1e-5)
    assert adm[0, 1280 + 2 * 256].item() == pytest.approx(math.cos(16.0), abs=1e-5)
    assert adm[0, 1280 + 4 * 256].item() == pytest.approx(math.cos(1024.0), abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_tiny_stand_ins(family: str) -> None:
    spec = SPECS[family]
    _, text, vae = build_tiny(family)
    ctx, pooled = text.encode(["a photo of sks dog", "a photo of a dog"])
    assert ctx.shape == (2, 77, spec.context_dim)
    assert (pooled is None) == (spec.pooled_dim == 0)
    if pooled is not None:
        assert pooled.shape == (2, 1280)
    again, _ = build_tiny(family)[1].encode(["a photo of sks dog"])
    assert torch.equal(again[0], ctx[0])
    # shared words -> shared embeddings at the same positions; different words differ
    assert torch.equal(ctx[0, :4], ctx[1, :4])
    assert not torch.equal(ctx[0, 4], ctx[1, 4])
    assert not any(p.requires_grad for p in [*text.parameters(), *vae.parameters()])

    images = torch.rand(2, 3, 64, 48)
    latents = vae.encode(images)
    assert latents.shape == (2, 4, 8, 6)
    assert vae.scaling_factor == spec.latent_scale
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape
    assert decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(vae.encode(decoded), latents, atol=1e-4, rtol=0)  # projection


# ---------------------------------------------------------------- ComfyUI parity

_COMFY_SCRIPT = r"""
import json, sys
comfy_path, weights, inputs_path, out_path = sys.argv[1:5]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_management
import comfy.model_detection
from safetensors.torch import load_file, save_file

prefix = "model.diffusion_model."
sd = load_file(weights)
ours = {k[len(prefix):]: v for k, v in sd.items()}
config = comfy.model_detection.model_config_from_unet(dict(sd), prefix)
report = {"config": type(config).__name__ if config is not None else None}
if config is not None:
    model = config.get_model(dict(sd), prefix)
    report["model_base"] = [c.__name__ for c in type(model).__mro__]
    dm = model.diffusion_model
    missing, unexpected = dm.load_state_dict(config.process_unet_state_dict(ours), strict=False)
    report["missing"], report["unexpected"] = list(missing), list(unexpected)
    report["unet_config"] = {k: v for k, v in config.unet_config.items() if k != "dtype"}
    inp = load_file(inputs_path)
    dm.eval()
    with torch.no_grad():
        out = {"out": dm(inp["x"], inp["timesteps"], inp["context"], inp.get("y")).contiguous()}
        if "pooled" in inp:
            out["adm"] = model.encode_adm(pooled_output=inp["pooled"], width=768, height=1024,
                                          crop_w=8, crop_h=16, target_width=640,
                                          target_height=512).contiguous()
    save_file(out, out_path)
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_detects_loads_and_matches(family: str, tmp_path: Path) -> None:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH not set: no ComfyUI checkout to compare against")
    from safetensors.torch import load_file, save_file

    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    spec = SPECS[family]
    unet = build_unet(family, seed=5)
    inputs = _inputs(spec, batch=2, size=24, seed=2)
    save_file(comfy_state_dict(unet), tmp_path / "unet.safetensors")
    pooled = torch.randn(2, 1280)
    save_file(inputs | ({"pooled": pooled} if spec.adm_in_channels else {}), tmp_path / "in.st")
    proc = subprocess.run(
        [
            python,
            "-c",
            _COMFY_SCRIPT,
            comfy_path,
            str(tmp_path / "unet.safetensors"),
            str(tmp_path / "in.st"),
            str(tmp_path / "out.st"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=comfy_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert report["config"] in spec.comfy_model_names, report
    assert report["missing"] == [] and report["unexpected"] == []
    detected = report["unet_config"]
    for field in (
        "model_channels", "context_dim", "use_linear_in_transformer", "num_heads",
        "num_head_channels", "channel_mult", "num_res_blocks", "transformer_depth",
        "transformer_depth_output", "transformer_depth_middle",
    ):  # fmt: skip
        value = getattr(spec, field)
        assert detected[field] == (list(value) if isinstance(value, tuple) else value), field
    assert (detected["adm_in_channels"] or 0) == spec.adm_in_channels
    assert ("SDXL" in report["model_base"]) == (family == "sdxl")
    assert "BaseModel" in report["model_base"]

    theirs = load_file(tmp_path / "out.st")
    with torch.no_grad():
        ours = unet(**inputs)
    assert ours.abs().max() > 1e-2
    torch.testing.assert_close(theirs["out"], ours, atol=1e-4, rtol=1e-4)
    if spec.adm_in_channels:
        adm = sdxl_adm(
            pooled, 1024, 768, crop_top=16, crop_left=8, target_height=512, target_width=640
        )
        torch.testing.assert_close(theirs["adm"], adm, atol=1e-5, rtol=0)
