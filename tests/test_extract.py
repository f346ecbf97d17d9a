"""Extracting an adaptive-rank LoRA from a fine-tuned model: planted updates come back exactly,
a budget is met with the optimal error, keys are ComfyUI's (``diffusion_model.`` + LDM name)."""

import os

import pytest
import torch
from safetensors.torch import save_file

from lora2_engine.cli import main
from lora2_engine.formats.keys import SD15, file_key
from lora2_engine.models.tiny import build_unet, comfy_state_dict
from tests.test_compress import plain_deltas

PLANTED = {  # module -> rank of the planted update
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": 3,
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": 5,
    "input_blocks.1.1.transformer_blocks.0.ff.net.2": 8,
    "input_blocks.1.0.in_layers.2": 4,  # a 3x3 conv
}


@pytest.fixture
def models(tmp_path):
    base = comfy_state_dict(build_unet("sd15", seed=0))
    tuned = dict(base)
    g = torch.Generator().manual_seed(1)
    planted = {}
    for name, r in PLANTED.items():
        w = base[f"model.diffusion_model.{name}.weight"]
        m, n = w.shape[0], w[0].numel()
        s = torch.linspace(1, 0.2, r)
        delta = (torch.randn(m, r, generator=g) * s) @ torch.randn(r, n, generator=g) * 0.05
        tuned[f"model.diffusion_model.{name}.weight"] = w + delta.reshape(w.shape)
        planted[name] = delta
    bias = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias"
    tuned[bias] = base[bias] + 1
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", planted


def test_extract_recovers_planted_updates_exactly(models, tmp_path, capsys):
    base, tuned, planted = models
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(tuned), "--size-mb", "10", "--family", "sd15",
                 "--dtype", "float32", "--out", str(out)]) == 0
    assert "biases, norms" in capsys.readouterr().out
    got = plain_deltas(out)
    assert set(got) == {file_key(n, "comfy", SD15) for n in planted}
    for name, delta in planted.items():
        key = file_key(name, "comfy", SD15)
        assert torch.allclose(got[key].float(), delta, atol=1e-5), name


def test_extract_to_a_budget(models, tmp_path):
    base, tuned, planted = models
    out = tmp_path / "small.safetensors"
    assert main(["extract", str(base), str(tuned), "--size-mb", "0.02", "--family", "sd15",
                 "--out", str(out)]) == 0
    assert 0.98 * 20_000 <= os.path.getsize(out) <= 20_000
    got = plain_deltas(out)
    lost = total = 0.0
    best_lost = 0.0
    for name, delta in planted.items():
        d = delta.double()
        g = got[file_key(name, "comfy", SD15)]
        lost += float((g - d).square().sum())
        total += float(d.square().sum())
        rank = int(torch.linalg.matrix_rank(g.float()))  # the rank this module was given
        best_lost += float(torch.linalg.svdvals(d)[rank:].square().sum())
    assert lost / total == pytest.approx(best_lost / total, abs=2e-3)


def test_extract_refuses_pickles_and_identical_models(models, tmp_path, capsys):
    base, _, _ = models
    assert main(["extract", str(base), str(base), "--size-mb", "1"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert main(["extract", str(base), str(tmp_path / "tuned.ckpt"), "--size-mb", "1"]) == 2
    assert "pickles are never opened" in capsys.readouterr().err
    assert not list(tmp_path.glob("*_lora.safetensors"))
