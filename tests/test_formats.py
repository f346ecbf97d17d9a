import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora2_engine import AdapterConfig, ExportConfig, attach
from lora2_engine.formats import LoraFileError, read_lora
from lora2_engine.formats.io import atomic_write_bytes, parse_json_metadata
from lora2_engine.formats.keys import (
    SD15,
    SDXL,
    UNetLayout,
    diffusers_to_ldm,
    file_key,
    ldm_to_diffusers,
)
from lora2_engine.formats.lora_file import export_adapters
from tests.conftest import activate_slots


def _trained(attn_net, ranks=(1, 3, 7)):
    ad = attach(attn_net, AdapterConfig(r_target=2, init_rank=4, r_max=32))
    g = torch.Generator().manual_seed(3)
    for i, layer in enumerate(ad.layers.values()):
        layer.resize(ranks[i % len(ranks)])
        activate_slots(layer, g)
        layer.B.data.normal_(generator=g)
        layer.nu_param.data += 0.1 * i
    return ad


def _plain_delta(tensors, prefix, down="lora_down", up="lora_up"):
    """Delta W from a file read with plain safetensors and the stock alpha/rank rule."""
    d = tensors[f"{prefix}.{down}.weight"].float()
    u = tensors[f"{prefix}.{up}.weight"].float()
    alpha = float(tensors[f"{prefix}.alpha"]) if f"{prefix}.alpha" in tensors else d.shape[0]
    return u @ d * (alpha / d.shape[0])


@pytest.mark.parametrize("style", ["kohya", "comfy", "diffusers"])
def test_exported_file_gives_B_Lambda_A(attn_net, tmp_path, style):
    ad = _trained(attn_net)
    path = export_adapters(ad, tmp_path / "a.safetensors",
                           ExportConfig(key_style=style, rank_tol=0))
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    record = json.loads(meta["lora2.modules"])
    for name, layer in ad.layers.items():
        lam = layer.slot_scale().detach()
        direct = layer.B[:, :layer.rank] @ torch.diag(lam) @ layer.A[:layer.rank]
        key = record[name]["key"]
        if style == "diffusers":
            got = _plain_delta(tensors, key, "lora_A", "lora_B")
        else:
            got = _plain_delta(tensors, key)
            assert float(tensors[f"{key}.alpha"]) == layer.rank
        assert torch.allclose(got, direct.detach(), atol=1e-6), name
        assert record[name]["rank"] == layer.rank
        assert record[name]["nu"] == pytest.approx(float(layer.nu.detach()))
    if style == "diffusers":  # diffusers packs the PEFT config under the component prefix
        peft = json.loads(meta["lora_adapter_metadata"])
        ranks = {name: peft["unet.rank_pattern"].get(name, peft["unet.r"])
                 for name in peft["unet.target_modules"]}
        assert sorted(ranks.values()) == sorted(ad.ranks().values())
        assert peft["unet.alpha_pattern"] == peft["unet.rank_pattern"]
        assert peft["unet.lora_alpha"] == peft["unet.r"]


@pytest.mark.parametrize("tol", [0.01, 0.03, 0.2])
def test_export_at_numerical_rank_is_the_best_low_rank_fit(attn_net, tmp_path, tol):
    """rank_tol > 0: each module is written at the smallest rank whose best approximation of
    B Lambda A (Eckart-Young, from an independent SVD of the dense product) is within tol;
    a module whose update is zero is left out of the file and recorded at rank 0."""
    ad = _trained(attn_net)
    zero = list(ad.layers.values())[-1]
    zero.B.data.zero_()
    path = export_adapters(ad, tmp_path / "a.safetensors", ExportConfig(rank_tol=tol))
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        record = json.loads(fh.metadata()["lora2.modules"])
    for name, layer in ad.layers.items():
        lam = layer.slot_scale().detach().double()
        direct = (layer.B[:, :layer.rank].double() @ torch.diag(lam)
                  @ layer.A[:layer.rank].double()).detach()
        rec = record[name]
        assert rec["trained_rank"] == layer.rank
        if layer is zero:
            assert rec["rank"] == 0 and f"{rec['key']}.lora_down.weight" not in tensors
            continue
        s = torch.linalg.svdvals(direct)
        tail = [float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
                for k in range(len(s) + 1)]
        k = next(k for k, e in enumerate(tail) if e <= tol)
        assert rec["rank"] == k, (name, tail)
        got = _plain_delta(tensors, rec["key"]).double()
        u, sv, vh = torch.linalg.svd(direct)
        best = u[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
        assert torch.allclose(got, best, atol=1e-5), name
        assert float((got - direct).norm() / direct.norm()) <= tol + 1e-6


def test_file_bytes_match_formula(attn_net, tmp_path):
    ad = _trained(attn_net)
    path = export_adapters(ad, tmp_path / "a.safetensors", ExportConfig(rank_tol=0))
    n_header = int.from_bytes(path.read_bytes()[:8], "little")
    payload = path.stat().st_size - 8 - n_header
    want = 4 * sum(layer.rank * (layer.m + layer.n) for layer in ad.layers.values())
    assert payload == want + 4 * len(ad)  # + one fp32 alpha per module


def test_read_back_round_trip_and_family(attn_net, tmp_path):
    ad = _trained(attn_net)
    for style in ("kohya", "comfy", "diffusers"):
        path = export_adapters(ad, tmp_path / f"{style}.safetensors",
                               ExportConfig(key_style=style, rank_tol=0), layout=SDXL)
        lora = read_lora(path)
        assert lora.style == style
        assert sorted(lora.ranks().values()) == sorted(ad.ranks().values())
        assert lora.family() == "sdxl"
        assert all(w.scale == 1.0 for w in lora.modules.values())


def test_read_comfy_savelora_style_file(tmp_path):
    """ComfyUI's SaveLoRA: diffusion_model.* with alpha 1.0 and .diff extras, no metadata."""
    t = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight":
         torch.randn(4, 320),
         "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight":
         torch.randn(320, 4),
         "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(1.),
         "diffusion_model.input_blocks.1.1.norm.diff": torch.randn(320)}
    save_file(t, str(tmp_path / "c.safetensors"))
    lora = read_lora(tmp_path / "c.safetensors")
    w = next(iter(lora.modules.values()))
    assert lora.style == "comfy" and w.scale == 0.25 and len(lora.extra) == 1
    assert lora.lora2_modules() is None


@pytest.mark.parametrize("layout,ldm,df", [
    (SD15, "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    (SD15, "input_blocks.8.1.proj_in", "down_blocks.2.attentions.1.proj_in"),
    (SD15, "output_blocks.3.1.transformer_blocks.0.attn2.to_k",
     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    (SD15, "output_blocks.11.1.transformer_blocks.0.ff.net.2",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
    (SD15, "middle_block.1.transformer_blocks.0.attn1.to_out.0",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    (SDXL, "input_blocks.4.1.transformer_blocks.1.attn1.to_v",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v"),
    (SDXL, "output_blocks.2.1.transformer_blocks.9.attn2.to_q",
     "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_q"),
    (UNetLayout("sdxl", (1, 1, 1)), "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
])
def test_ldm_diffusers_names_round_trip(layout, ldm, df):
    assert ldm_to_diffusers(ldm, layout) == df
    assert diffusers_to_ldm(df, layout) == ldm


@pytest.mark.parametrize("style,layout,want", [
    ("kohya", SDXL, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("kohya", SD15, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("comfy", SD15, "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("diffusers", SDXL, "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
])
def test_file_key_styles(style, layout, want):
    assert file_key("input_blocks.4.1.transformer_blocks.0.attn1.to_q", style, layout) == want


def test_no_silent_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    p = atomic_write_bytes(tmp_path / "x.bin", b"first")
    with pytest.raises(FileExistsError, match=r"x\.bin: it already exists: choose another name"):
        atomic_write_bytes(p, b"second")
    import os

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(p, b"third", overwrite=True)
    assert p.read_bytes() == b"first"
    assert [f.name for f in tmp_path.iterdir()] == ["x.bin"]


def test_malformed_metadata_is_an_error_message():
    with pytest.raises(LoraFileError, match="'lora2.modules' is not valid JSON"):
        parse_json_metadata({"lora2.modules": "{oops"}, "lora2.modules")


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_in_memory_lora_equals_the_written_file(attn_net, tmp_path, style):
    from lora2_engine.formats import adapters_to_lora

    ad = _trained(attn_net)
    export = ExportConfig(key_style=style, dtype="float16")
    mem = adapters_to_lora(ad, export, SDXL)
    disk = read_lora(export_adapters(ad, tmp_path / "f.safetensors", export, SDXL))
    assert mem.modules.keys() == disk.modules.keys()
    for k, w in mem.modules.items():
        assert w.down.dtype == torch.float16
        assert torch.equal(w.down, disk.modules[k].down) and torch.equal(w.up, disk.modules[k].up)
        assert w.scale == disk.modules[k].scale == 1.0
