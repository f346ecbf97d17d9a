"""CompressLoRA and MergeLoRAs in a real ComfyUI server: the written files fit their budget and
load in stock LoraLoader with no "lora key not loaded"; LoHa/LoKr conversion against ComfyUI's
own LyCORIS adapters (run in ComfyUI's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import activate_slots

from .harness import find_testbed
from .test_server import not_loaded, stock_loader_graph

EXPECTED = {
    "LoRA2_CompressLoRA": ({"size_mb": "FLOAT", "filename": "STRING"},
                           {"adaptive_lora": "ADAPTIVE_LORA", "lora_name": "COMBO",
                            "max_error": "FLOAT", "save_dtype": "COMBO"}),
    "LoRA2_MergeLoRAs": ({"method": "COMBO", "density": "FLOAT", "seed": "INT",
                          "size_mb": "FLOAT", "filename": "STRING"},
                         {"max_error": "FLOAT", "save_dtype": "COMBO",
                          **{f"lora_{i}": "COMBO" for i in range(1, 9)},
                          **{f"weight_{i}": "FLOAT" for i in range(1, 9)}}),
}


def write_sd15_lora(path, seed: int, rank: int = 8):
    """A kohya LoRA for every attention projection of the test checkpoint's UNet."""
    from lora2_engine import AdapterConfig, ExportConfig, attach
    from lora2_engine.formats.keys import SD15
    from lora2_engine.formats.lora_file import export_adapters
    from lora2_engine.models.tiny import build_unet

    ad = attach(build_unet("sd15", seed=0), AdapterConfig(init_rank=rank, r_max=64),
                fixed_rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in ad.layers.values():
        activate_slots(layer, g)
        layer.B.data = torch.randn(layer.B.shape, generator=g) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_adapters(ad, path, ExportConfig(key_style="kohya", dtype="float16"),
                           layout=SD15)


@pytest.fixture(scope="module")
def sources(server):
    folder = server.base / "models" / "loras" / "budget"
    return [write_sd15_lora(folder / f"src{i}.safetensors", i) for i in range(3)]


@pytest.mark.parametrize("node_id", sorted(EXPECTED))
def test_object_info_declares_the_node(server, node_id):
    info = server.object_info()[node_id]
    required, optional = EXPECTED[node_id]
    kind = {k: "COMBO" if isinstance(v[0], list) else v[0]
            for k, v in info["input"].get("required", {}).items()}
    assert kind == required
    opt = {k: "COMBO" if isinstance(v[0], list) else v[0]
           for k, v in info["input"].get("optional", {}).items()}
    assert opt == optional
    assert info["output"] == ["ADAPTIVE_LORA"] and info["category"] == "LoRA²"


def _load_in_stock_loader(server, name: str) -> list[str]:
    start = len(server.log())
    server.run(stock_loader_graph(name, 1.0), timeout=600)
    return not_loaded(server, start)


def test_compress_node_writes_within_budget_and_loads_in_stock_loader(server, sources):
    src = os.path.getsize(sources[0])
    budget_mb = round(src * 0.3 / 1e6, 4)
    api = {"1": {"class_type": "LoRA2_CompressLoRA", "inputs": {
        "lora_name": "budget/src0.safetensors", "size_mb": budget_mb,
        "filename": "budget/compressed"}}}
    out = server.run(api, timeout=600)["outputs"]["1"]["text"][0]
    path = server.base / "models" / "loras" / "budget" / "compressed.safetensors"
    assert 0.98 * budget_mb * 1e6 <= os.path.getsize(path) <= budget_mb * 1e6
    assert "total relative error" in out and "rel.error" in out
    assert _load_in_stock_loader(server, "budget/compressed.safetensors") == []


def test_merge_node_writes_within_budget_and_loads_in_stock_loader(server, sources):
    api = {"1": {"class_type": "LoRA2_MergeLoRAs", "inputs": {
        "method": "ties", "density": 0.5, "seed": 0, "size_mb": 0.1,
        "filename": "budget/merged", "lora_1": "budget/src0.safetensors", "weight_1": 1.0,
        "lora_2": "budget/src1.safetensors", "weight_2": 0.5,
        "lora_3": "budget/src2.safetensors", "weight_3": 0.5}}}
    server.run(api, timeout=600)
    path = server.base / "models" / "loras" / "budget" / "merged.safetensors"
    assert 0.98 * 100_000 <= os.path.getsize(path) <= 100_000
    assert set(load_file(str(path))) == set(load_file(str(sources[0])))
    assert _load_in_stock_loader(server, "budget/merged.safetensors") == []


def test_train_node_writes_a_file_of_the_chosen_size(server):
    """TrainAdaptiveLoRA with size_mb through POST /prompt: the file on disk lands within 2%
    below the budget at the save dtype, the node says so, and stock LoraLoader loads it all."""
    from .test_server import tiny
    from .workflow_tools import WORKFLOWS_API, load

    budget_mb = 0.15
    api = tiny(load(WORKFLOWS_API / "lora2_train_and_apply_api.json"), filename="budget/trained",
               size_mb=budget_mb, save_dtype="float16", steps=3, preview_every=0)
    out = server.run(api, timeout=900)["outputs"]
    path = server.base / "models" / "loras" / "budget" / "trained.safetensors"
    assert 0.98 * budget_mb * 1e6 <= os.path.getsize(path) <= budget_mb * 1e6
    train_id = next(k for k, v in api.items() if v["class_type"] == "LoRA2_TrainAdaptiveLoRA")
    text = out[train_id]["text"][0]
    assert "size budget:" in text and "0.15 MB" in text
    report_id = next(k for k, v in api.items() if v["class_type"] == "LoRA2_RankReport")
    assert "rel.error" in out[report_id]["text"][0]
    assert {t.dtype for t in load_file(str(path)).values()} >= {torch.float16}
    assert _load_in_stock_loader(server, "budget/trained.safetensors") == []


def test_merge_node_needs_two_loras(server, sources):
    api = {"1": {"class_type": "LoRA2_MergeLoRAs", "inputs": {
        "method": "linear", "density": 0.5, "seed": 0, "size_mb": 0.1,
        "filename": "budget/one", "lora_1": "budget/src0.safetensors"}}}
    with pytest.raises(Exception, match="choose at least two LoRAs"):
        server.run(api, timeout=600)
    assert not (server.base / "models" / "loras" / "budget" / "one.safetensors").exists()


COMFY_DELTAS = r"""
import json, sys, torch
sys.path.insert(0, '.')
import comfy.cli_args
comfy.cli_args.args.cpu = True
from safetensors.torch import load_file, save_file
from comfy.weight_adapter.loha import LoHaAdapter
from comfy.weight_adapter.lokr import LoKrAdapter
src, shapes, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sd = load_file(src)
res = {}
for prefix, shape in shapes.items():
    alpha = sd[prefix + '.alpha'].item() if prefix + '.alpha' in sd else None
    ad = LoHaAdapter.load(prefix, sd, alpha, None) or LoKrAdapter.load(prefix, sd, alpha, None)
    w = torch.zeros(shape)
    res[prefix] = ad.calculate_weight(w, prefix, 1.0, 1.0, None, lambda a: a)
save_file(res, out)
"""


def test_lycoris_conversion_matches_comfyui_adapters(comfy_ready, tmp_path):
    """ComfyUI's own LoHa/LoKr weight computation is the reference for read_any's conversion."""
    from lora2_engine.lycoris import read_any
    from tests.test_lycoris import lycoris_tensors

    tensors, want = lycoris_tensors(seed=3)
    src = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(src))
    shapes = {k: list(v.shape) for k, v in want.items()}
    comfy, python = find_testbed()
    out = tmp_path / "comfy_deltas.safetensors"
    proc = subprocess.run([python, "-c", COMFY_DELTAS, str(src), json.dumps(shapes), str(out)],
                          cwd=comfy, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = load_file(str(out))
    lora = read_any(src)
    for key in want:
        w = lora.modules[key]
        got = (w.up.flatten(1).double() @ w.down.flatten(1).double() * w.scale)
        r = ref[key].double().flatten(1)
        assert torch.allclose(got, r, atol=1e-4 * float(r.abs().max())), key


def test_extracted_lora_loads_in_stock_loader(server, checkpoint_file):
    """tuned = the test checkpoint with changed attention, feed-forward and conv weights."""
    from lora2_engine.cli import main

    sd = load_file(str(checkpoint_file))
    g = torch.Generator().manual_seed(0)
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k",
                 "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
                 "input_blocks.1.0.in_layers.2", "middle_block.1.proj_in"):
        w = sd[f"model.diffusion_model.{name}.weight"]
        sd[f"model.diffusion_model.{name}.weight"] = w + 0.01 * torch.randn(
            w.shape, generator=g).to(w.dtype)
    tuned = server.base / "tuned.safetensors"
    save_file(sd, str(tuned))
    out = server.base / "models" / "loras" / "budget" / "extracted.safetensors"
    assert main(["extract", str(checkpoint_file), str(tuned), "--size-mb", "0.5", "--family",
                 "sd15", "--out", str(out)]) == 0
    assert len([k for k in load_file(str(out)) if k.endswith("lora_down.weight")]) == 4
    assert _load_in_stock_loader(server, "budget/extracted.safetensors") == []
