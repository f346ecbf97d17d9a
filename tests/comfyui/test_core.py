"""The ComfyUI-free glue of the nodes (``nodes/core.py``): runs without ComfyUI.

The denoising maths is the engine's (``tests/test_schedule.py``); the in-process ComfyUI test
repeats the loss check against ComfyUI's own classes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from .conftest import PACK, write_subject


# ------------------------------------------------------------------ names and files
@pytest.mark.parametrize("name", ["../evil", "a/../../b", "/etc/passwd", "~/x", "C:\\x",
                                  "a//b", "./a", "", "  ", "bad|name", "a/b\x00c"])
def test_unsafe_names_are_refused(core, name):
    with pytest.raises(ValueError):
        core.safe_relative_name(name)


@pytest.mark.parametrize("name,expected", [("subject", "subject.safetensors"),
                                           ("lora2/my dog", "lora2/my dog.safetensors"),
                                           ("x.safetensors", "x.safetensors"),
                                           ("lora2\\win", "lora2/win.safetensors")])
def test_safe_names_are_kept(core, name, expected):
    assert str(core.safe_relative_name(name)) == expected


def test_free_path_with_a_double_suffix(core, tmp_path):
    (tmp_path / "run.state.safetensors").write_bytes(b"x")
    assert core.free_path(tmp_path, "run", ".state.safetensors").name == \
        "run_2.state.safetensors"
    assert str(core.safe_relative_name("a.state.safetensors", ".state.safetensors")) == \
        "a.state.safetensors"


def test_free_path_never_overwrites(core, tmp_path):
    first = core.free_path(tmp_path, "lora2/dog")
    assert first == tmp_path / "lora2" / "dog.safetensors"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    second = core.free_path(tmp_path, "lora2/dog")
    assert second.name == "dog_2.safetensors" and first.read_bytes() == b"x"


def test_lora_state_dict_is_what_the_file_holds(core, tmp_path):
    from safetensors.torch import load_file

    formats = importlib.import_module(f"{PACK}.lora2_engine.formats")
    mods = {"lora_unet_a": formats.ModuleWeights(torch.randn(3, 8), torch.randn(5, 3), 3.0),
            "lora_unet_b": formats.ModuleWeights(torch.randn(1, 4), torch.randn(4, 1), 1.0)}
    for style in ("kohya", "diffusers"):
        lora = formats.LoraFile(mods, style, {"k": "v"})
        path = formats.write_lora(lora, tmp_path / f"{style}.safetensors")
        on_disk, ours = load_file(path), core.lora_state_dict(lora)
        alphas = {k for k in ours if k.endswith(".alpha")}
        assert set(on_disk) == (set(ours) if style == "kohya" else set(ours) - alphas)
        assert all(torch.equal(on_disk[k], ours[k]) for k in on_disk)
        assert {float(ours[k]) for k in alphas} == {3.0, 1.0}


def test_peft_names_are_renamed_to_names_comfyui_maps(core):
    known = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
             "lora_unet_x"}
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    sd = {p + "to_q.lora_A.weight": 1, p + "to_q.alpha": 2, p + "to_out.0.lora_B.weight": 3,
          "lora_unet_x.lora_up.weight": 4, p + "to_v.lora_A.weight": 5}
    assert core.match_peft_names(sd, known) == {
        p + "processor.to_q.lora_A.weight": 1, p + "processor.to_q.alpha": 2,
        p + "processor.to_out.lora_B.weight": 3, "lora_unet_x.lora_up.weight": 4,
        p + "to_v.lora_A.weight": 5}  # unknown either way: left for ComfyUI to report


# ------------------------------------------------------------------ subjects
def test_subject_folder_keeps_good_images_and_names_bad_ones(core, tmp_path):
    folder = write_subject(tmp_path / "s")
    subject = core.subject_from_folder(folder, "a photo of sks dog", 64, "crop")
    assert subject.names == ["img0.png", "img1.png", "img2.png"]
    assert subject.captions[1] == "a photo of sks dog, sitting"
    assert subject.captions[0] == "a photo of sks dog"
    assert any("broken.jpg" in w for w in subject.warnings)
    assert all(p.shape == (3, 64, 64) for p in subject.pixels)
    batch = core.to_image_batch(subject.pixels)
    assert batch.shape == (3, 64, 64, 3) and 0 <= batch.min() and batch.max() <= 1


def test_subject_folder_without_images_is_a_clear_error(core, tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.jpg").write_bytes(b"no")
    with pytest.raises(ValueError, match="x.jpg"):
        core.subject_from_folder(tmp_path / "e", "p", 64, "crop")


def test_subject_from_image_batch(core):
    images = torch.rand(2, 70, 90, 4)
    subject = core.subject_from_images(images, "a photo of sks cat", 64, "bucket")
    assert len(subject.pixels) == 2 and subject.captions == ["a photo of sks cat"] * 2
    assert subject.pixels[0].shape[0] == 3 and subject.pixels[0].shape[1] % 64 == 0


def test_examples_are_made_stackable(core):
    exs = [{"latents": torch.zeros(4, 8, 8), "c_crossattn": torch.randn(77, 8)},
           {"latents": torch.zeros(4, 8, 8), "c_crossattn": torch.randn(154, 8)}]
    out = core.stackable(exs, 2)
    assert {e["c_crossattn"].shape[0] for e in out} == {154}
    assert torch.equal(out[0]["c_crossattn"][77:], out[0]["c_crossattn"][:77])
    mixed = [{"latents": torch.zeros(4, 8, 8)}, {"latents": torch.zeros(4, 8, 12)}]
    assert core.stackable(mixed, 1) == mixed
    with pytest.raises(ValueError, match="batch_size"):
        core.stackable(mixed, 2)


# ------------------------------------------------------------------ torch plumbing
@pytest.mark.parametrize("moved", [False, True], ids=["as-loaded", "moved-after"])
def test_inference_tensors_are_released_for_training(core, moved):
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    if moved:  # ComfyUI moving a loaded model to the GPU: is_inference() is False afterwards,
        net.to(torch.float64).to(torch.float32)  # but there is still no version counter
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        net(x).sum().backward()
    assert core.release_inference_tensors(net) == 6
    net(x).sum().backward()  # works now
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert core.release_inference_tensors(net) == 0


@pytest.mark.parametrize("size_mb,r_target,match", [
    (4.0, 8.0, "size_mb=4 and r_target=8 are both set.*leave r_target at the preset"),
    (-1.0, 0.0, "size_mb=-1.0 is invalid: give the file size in MB"),
])
def test_train_node_budget_settings_are_checked(core, size_mb, r_target, match):
    with pytest.raises(ValueError, match=match):
        core.export_config("kohya", "float16", size_mb, r_target)


def test_train_node_budget_settings(core):
    off = core.export_config("comfy", "bfloat16", 0.0, 8.0)  # 0 = no budget: r_target rules
    assert off.budget is None and off.key_style == "comfy" and off.dtype == "bfloat16"
    on = core.export_config("kohya", "float16", 12.5, 0.0)
    assert on.size_mb == 12.5 and on.budget.value == 12_500_000 and on.dtype == "float16"


def test_build_configs_names_the_bad_option(core):
    with pytest.raises(ValueError, match="r_target"):
        core.build_configs("spread", {"r_target": -3.0})
    a, t = core.build_configs("paper", {"lr": None, "targets": "to_q, to_k"})
    assert a.targets == ("to_q", "to_k") and t.lr == 5e-5
