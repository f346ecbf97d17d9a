import json

import pytest
import torch
from safetensors.torch import load_file

from lora2_engine.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--steps", "3", "--resolution", "64", "--out", str(out)])
    assert rc == 0
    return out


def test_demo_writes_adapter_report_and_plots(demo_run):
    for name in ("lora2_demo.safetensors", "lora2_demo.rank_report.json",
                 "lora2_demo.rank_report.png", "lora2_demo.loss.png", "lora2_demo.config.json"):
        assert (demo_run / name).stat().st_size > 0, name
    assert not (demo_run / "lora2_demo.state.safetensors").exists()  # removed after export
    rep = json.loads((demo_run / "lora2_demo.rank_report.json").read_text())
    sd = load_file(str(demo_run / "lora2_demo.safetensors"))
    downs = {k: v for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert len(rep["components"]) == 168  # tiny SDXL: 42 attention modules x 4
    # the report describes the file: zero updates are left out of it at rank 0
    assert len(downs) == sum(r["rank"] > 0 for r in rep["components"])
    assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_")
               for k in downs)
    assert sum(r["params"] for r in rep["components"]) == sum(
        v.shape[0] * (v.shape[1] + sd[k.replace("lora_down", "lora_up")].shape[0])
        for k, v in downs.items())


def test_demo_refuses_to_overwrite(demo_run, capsys):
    rc = main(["demo", "--steps", "1", "--resolution", "64", "--out", str(demo_run)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err


def test_report_and_pad_commands(demo_run, capsys):
    f = demo_run / "lora2_demo.safetensors"
    assert main(["report", str(f)]) == 0
    out = capsys.readouterr().out
    assert "style kohya, family sdxl, LoRA2" in out and "uniform rank" in out
    assert main(["pad", str(f), "--rank", "1"]) == 2
    assert "below the largest rank" in capsys.readouterr().err
    assert main(["pad", str(f), "--rank", "40"]) == 0
    padded = load_file(str(demo_run / "lora2_demo_r40.safetensors"))
    src = load_file(str(f))
    for k in src:
        if k.endswith("lora_down.weight"):
            p = k[: -len(".lora_down.weight")]
            d0 = src[f"{p}.lora_up.weight"] @ src[k] * (src[f"{p}.alpha"] / src[k].shape[0])
            d1 = padded[f"{p}.lora_up.weight"] @ padded[k] * (padded[f"{p}.alpha"] / 40)
            assert torch.allclose(d0, d1, atol=1e-6)
