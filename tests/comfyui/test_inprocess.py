"""Nodes and bridge on ComfyUI's own objects, in one ComfyUI process per check.

See ``inprocess_checks.py``: the loss against ComfyUI's real eps / v / flow parameterisations,
a tiny SDXL-family UNet (ADM conditioning, previews, key styles), and on the SD1.5-family test
checkpoint: the incoming MODEL unchanged, ApplyAdaptiveLoRA bit-equal to stock
LoraLoaderModelOnly, padding, cancel → checkpoint → resume.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import write_subject
from .harness import find_testbed

SCRIPT = Path(__file__).with_name("inprocess_checks.py")


def run_check(name: str, **args) -> dict:
    comfy, python = find_testbed()
    proc = subprocess.run([python, str(SCRIPT), name, json.dumps(args)], cwd=comfy,
                          capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT "):])


def test_loss_matches_comfyui_parameterisations(comfy_ready):
    result = run_check("loss")
    for kind, (ours, textbook) in result["loss"].items():
        assert ours == pytest.approx(textbook, rel=1e-5), kind
    # sigmas, percent_to_sigma, timestep, calculate_input/denoised, noise_scaling: all equal
    assert result["same"] == {k: [True] * 6 for k in ("eps", "v", "flux-schnell", "sd3")}


def test_node_route_equals_the_engine_route_bit_for_bit(comfy_ready, tmp_path):
    """TrainAdaptiveLoRA's training on ComfyUI's own MODEL and denoiser equals the engine's
    route (the CLI's schedule and calling convention) on the same UNet, bit for bit."""
    r = run_check("one_path", tmp=str(tmp_path))
    assert r["learned"] and r["modules"] == 32
    assert r["bit_equal"] == r["modules"], r
    assert r["loss_node"] == r["loss_engine"]


def test_sdxl_family_training_and_key_styles(comfy_ready, tmp_path):
    result = run_check("sdxl", tmp=str(tmp_path))
    assert result["model"] in ("KOALA_700M", "SDXL")
    assert result["example_keys"] == ["c_crossattn", "latents", "y"]
    assert result["y_shape"] == [2816]
    assert result["model_unchanged"]
    for style, res in result["styles"].items():
        assert res["modules"] == 168 and res["unmatched"] == [], style
        assert res["not_loaded_lines"] == 0 and res["finite"], style
        assert res["previews"] == ([1, 64, 64, 3] if style == "kohya" else None), style
    # stock ComfyUI maps kohya and comfy names; PEFT names only after match_peft_names
    assert result["styles"]["kohya"]["stock_unmatched"] == 0
    assert result["styles"]["comfy"]["stock_unmatched"] == 0
    assert result["styles"]["diffusers"]["stock_unmatched"] == 168


def test_sd15_nodes_in_process(comfy_ready, checkpoint_file, tmp_path):
    subject = write_subject(tmp_path / "subject")
    r = run_check("sd15", tmp=str(tmp_path / "comfy"), checkpoint=str(checkpoint_file),
                  subject=str(subject))
    assert r["model_unchanged"] and r["model_unchanged_after_apply"]
    assert r["model_unchanged_end"]
    assert r["history_steps"] == [1, 2, 3]
    assert r["previews"] == [1, 64, 64, 3] and r["curve"][0] == 1
    assert r["equal_mem_stock"] and r["equal_file_stock"]
    assert r["changed_weights"] == 32 and r["delta_matches_formula"]
    assert r["report"][1].startswith("total: 32 components")
    assert len(r["padded_ranks"]) == 1 and r["padded_equal"]
    assert r["cancel"] == "interrupted" and r["checkpoint_written"]
    assert r["checkpoint_step"] == "2"
    assert not r["interrupt_flag_after"]
    assert r["resumed_steps"] == [1, 2, 3, 4] and r["checkpoint_removed"]
    assert r["not_loaded_lines"] == []


def test_loader_matrix_comfyui_column(comfy_ready, tmp_path):
    """Stock LoraLoaderModelOnly applies every module of the pack's file at scale 1 (also the
    old conventions); the PEFT-named diffusers file is not mapped by ComfyUI at all."""
    result = run_check("loader_matrix", tmp=str(tmp_path))
    for conv in ("one alpha", "alpha = rank", "no alpha"):
        assert result[conv]["off"] == 0 and result[conv]["max_rel_error"] < 1e-5, conv
    assert result["diffusers"]["max_scale"] == 0.0
