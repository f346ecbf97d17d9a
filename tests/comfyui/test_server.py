"""The pack in a real ComfyUI server: node definitions, the shipped workflows run through
``POST /prompt`` on a tiny checkpoint, stock loading of the written file, cancel and resume."""

from __future__ import annotations

import json
import time

import pytest
from safetensors import safe_open

from .conftest import CHECKPOINT
from .workflow_tools import WORKFLOWS_API, load

NOT_LOADED = "lora key not loaded"
EXPECTED = {  # node id → (required inputs, optional inputs, output types)
    "LoRA2_LoadSubjectImages": (
        {"folder": "STRING", "instance_token": "STRING", "class_noun": "STRING",
         "resolution": "INT", "mode": "COMBO"}, {"images": "IMAGE"},
        ["SUBJECT", "IMAGE", "STRING"]),
    "LoRA2_TrainAdaptiveLoRA": (
        {"model": "MODEL", "preset": "COMBO", "steps": "INT", "seed": "INT",
         "filename": "STRING"},
        {"clip": "CLIP", "vae": "VAE", "subject": "SUBJECT", "latents": "LATENT",
         "positive": "CONDITIONING", "learning_rate": "FLOAT", "r_target": "FLOAT",
         "init_rank": "INT", "r_max": "INT", "lambda_r": "FLOAT", "lambda_e": "FLOAT",
         "nu_lr": "FLOAT", "batch_size": "INT", "grad_accum": "INT", "targets": "STRING",
         "key_style": "COMBO", "save_dtype": "COMBO", "gradient_checkpointing": "COMBO",
         "checkpoint_every": "INT", "preview_every": "INT", "resume": "STRING",
         "training_dtype": "COMBO", "adapter_dtype": "COMBO", "size_mb": "FLOAT"},
        ["ADAPTIVE_LORA", "IMAGE", "IMAGE"]),
    "LoRA2_ApplyAdaptiveLoRA": (
        {"model": "MODEL", "strength_model": "FLOAT"},
        {"adaptive_lora": "ADAPTIVE_LORA", "lora_name": "COMBO", "clip": "CLIP",
         "strength_clip": "FLOAT"}, ["MODEL", "CLIP"]),
    "LoRA2_RankReport": ({}, {"adaptive_lora": "ADAPTIVE_LORA", "lora_name": "COMBO"},
                         ["IMAGE", "STRING"]),
    "LoRA2_ExpandForMerge": ({"rank": "INT", "filename": "STRING"},
                             {"adaptive_lora": "ADAPTIVE_LORA", "lora_name": "COMBO"},
                             ["ADAPTIVE_LORA"]),
}


def _type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def tiny(api: dict, **train) -> dict:
    """The shipped graph at test size: tiny checkpoint, 64 px, few steps."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif kind == "LoRA2_LoadSubjectImages":
            inputs["resolution"] = 64
        elif kind == "LoRA2_TrainAdaptiveLoRA":
            inputs.update({"steps": 6, "preview_every": 3, "learning_rate": 1e-3,
                           "nu_lr": 0.3, **train})
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 2
    return api


def not_loaded(server, since: int = 0) -> list[str]:
    return [ln for ln in server.log()[since:].splitlines() if NOT_LOADED in ln]


@pytest.mark.parametrize("node_id", sorted(EXPECTED))
def test_object_info_declares_the_node(server, node_id):
    info = server.object_info()[node_id]
    required, optional, outputs = EXPECTED[node_id]
    assert info["category"] == "LoRA²"
    assert info["python_module"].endswith("comfyui-lora2")
    assert {k: _type(v) for k, v in info["input"].get("required", {}).items()} == required
    assert {k: _type(v) for k, v in info["input"].get("optional", {}).items()} == optional
    assert info["output"] == outputs
    assert all(name for name in info["output_name"])


@pytest.fixture(scope="module")
def trained(server):
    """The shipped train → report → apply → sample workflow, run once through POST /prompt."""
    start = len(server.log())
    api = tiny(load(WORKFLOWS_API / "lora2_train_and_apply_api.json"), filename="lora2/e2e")
    history = server.run(api, timeout=900)
    return api, history, start


def test_workflow_trains_saves_reports_applies_and_samples(server, trained):
    api, history, start = trained
    out = history["outputs"]
    ids = {node["class_type"]: nid for nid, node in api.items()}
    lora_file = server.base / "models" / "loras" / "lora2" / "e2e.safetensors"
    assert lora_file.is_file()
    with safe_open(str(lora_file), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["lora2.family"] == "sd15" and meta["lora2.steps"] == "6"
    assert meta["lora2.trained_in"] == "ComfyUI"
    train_ui = out[ids["LoRA2_TrainAdaptiveLoRA"]]
    assert train_ui["images"] and "e2e.safetensors" in train_ui["text"][0]
    assert "broken.jpg" in out[ids["LoRA2_LoadSubjectImages"]]["text"][0]
    assert "total: 32 components" in out[ids["LoRA2_RankReport"]]["text"][0]
    assert out[ids["LoRA2_RankReport"]]["images"]
    assert out[ids["LoRA2_ApplyAdaptiveLoRA"]]["text"][0].endswith("32 of 32 modules applied")
    saved = out[ids["SaveImage"]]["images"][0]
    assert (server.base / "output" / saved["subfolder"] / saved["filename"]).is_file()
    assert not_loaded(server, start) == []
    assert not (server.base / "output" / "lora2_checkpoints" / "e2e.state.safetensors").exists()


def stock_loader_graph(lora_name: str, strength_model: float = 0.8) -> dict:
    """Checkpoint → stock LoraLoader with ``lora_name`` → one sampling step → SaveLatent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
            "strength_model": strength_model, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks dog", "clip": ["2", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                     "filename_prefix": "lora2/stock"}},
    }


def test_stock_lora_loader_loads_the_file_with_no_unmatched_key(server, trained):
    start = len(server.log())
    server.run(stock_loader_graph("lora2/e2e.safetensors"), timeout=600)
    assert not_loaded(server, start) == []


def test_expand_for_merge_workflow(server, trained):
    start = len(server.log())
    api = load(WORKFLOWS_API / "lora2_expand_for_merge_api.json")
    for node in api.values():
        if node["class_type"] == "LoRA2_ExpandForMerge":
            node["inputs"].update(lora_name="lora2/e2e.safetensors", filename="lora2/e2e_pad")
    history = server.run(api, timeout=600)
    padded = server.base / "models" / "loras" / "lora2" / "e2e_pad.safetensors"
    with safe_open(str(padded), "pt") as fh:
        ranks = {fh.get_tensor(k).shape[0] for k in fh.keys() if k.endswith("lora_down.weight")}
        meta = fh.metadata()
    assert len(ranks) == 1 and meta["lora2.padded_to"] == str(ranks.pop())
    texts = [v["text"][0] for v in history["outputs"].values() if "text" in v]
    assert any("padded to rank" in t for t in texts)
    assert not_loaded(server, start) == []
    # a second run never overwrites: it writes e2e_pad_2
    for node in api.values():
        if node["class_type"] == "LoRA2_ExpandForMerge":
            node["inputs"]["rank"] = 64
    server.run(api, timeout=600)
    assert padded.with_name("e2e_pad_2.safetensors").is_file()


def test_bad_filename_is_refused_before_training(server):
    api = tiny(load(WORKFLOWS_API / "lora2_train_and_apply_api.json"), filename="../../escape")
    with pytest.raises(Exception, match="leaves the loras folder"):
        server.run(api, timeout=600)
    assert not (server.base / "models" / "escape.safetensors").exists()


def _wait_status(server, prompt_id: str, timeout: float = 600) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hist = server.request(f"/history/{prompt_id}")
        if prompt_id in hist:
            return hist[prompt_id]
        time.sleep(0.2)
    raise AssertionError("prompt did not finish")


def test_cancel_keeps_a_checkpoint_and_resume_finishes(server, trained):
    api = tiny(load(WORKFLOWS_API / "lora2_train_and_apply_api.json"), filename="lora2/cancel",
               steps=100000, preview_every=0)
    api = {k: v for k, v in api.items()
           if v["class_type"] in ("CheckpointLoaderSimple", "LoRA2_LoadSubjectImages",
                                  "LoRA2_TrainAdaptiveLoRA")}
    state = server.base / "output" / "lora2_checkpoints" / "cancel.state.safetensors"
    start = len(server.log())
    prompt_id = server.queue(api)
    deadline = time.monotonic() + 300
    while "LoRA² training cancel" not in server.log()[start:] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # a few steps
    server.request("/interrupt", {}, method="POST")
    entry = _wait_status(server, prompt_id)
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    assert state.is_file()
    with safe_open(str(state), "pt") as fh:
        step = int(fh.metadata()["step"])
    assert step >= 1
    train = next(v for v in api.values() if v["class_type"] == "LoRA2_TrainAdaptiveLoRA")
    train["inputs"].update(steps=step + 2, resume="cancel.state.safetensors")
    history = server.run(api, timeout=600)
    assert (server.base / "models" / "loras" / "lora2" / "cancel.safetensors").is_file()
    assert not state.exists()
    text = next(v["text"][0] for v in history["outputs"].values() if "text" in v and
                "cancel.safetensors" in v["text"][0])
    assert f"{step + 2} steps" in text


def test_trains_from_latents_and_conditioning_without_a_subject(server):
    """The path for ComfyUI's own dataset nodes: LATENT + CONDITIONING in, no CLIP/VAE."""
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1],
                                                         "text": "a photo of sks dog"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 2}},
        "4": {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0], "preset": "spread",
            "steps": 3, "learning_rate": 1e-3, "seed": 0,
            "filename": "lora2/from_latents"}},
    }
    entry = _wait_status(server, server.queue(api))
    assert entry["status"]["status_str"] == "success", entry["status"]
    path = server.base / "models" / "loras" / "lora2" / "from_latents.safetensors"
    assert path.is_file()
    with safe_open(str(path), "pt") as fh:
        assert any(k.endswith("lora_down.weight") for k in fh.keys())
        assert json.loads(fh.metadata()["lora2.modules"])


def test_nothing_to_train_on_is_a_clear_error(server):
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "4": {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": {
            "model": ["1", 0], "preset": "spread", "steps": 3, "seed": 0, "filename": ""}},
    }
    entry = _wait_status(server, server.queue(api))
    text = json.dumps(entry["status"])
    assert "nothing to train on: connect a subject" in text, text


def _apply_file(server, lora_name: str) -> str:
    """The shipped graph's apply → sample chain with a file from models/loras instead of a
    trained adapter; returns the prompt's status as the client sees it."""
    api = tiny(load(WORKFLOWS_API / "lora2_train_and_apply_api.json"))
    api = {k: v for k, v in api.items() if v["class_type"] not in (
        "LoRA2_LoadSubjectImages", "LoRA2_TrainAdaptiveLoRA", "LoRA2_RankReport")}
    apply = next(v for v in api.values() if v["class_type"] == "LoRA2_ApplyAdaptiveLoRA")
    del apply["inputs"]["adaptive_lora"]
    apply["inputs"]["lora_name"] = lora_name
    return json.dumps(_wait_status(server, server.queue(api))["status"])


def test_apply_refuses_a_lora_of_another_family(server):
    """An SDXL LoRA on the SD1.5 checkpoint: a message naming both, not a silent half-patch."""
    import torch

    from lora2_engine import AdapterConfig, attach
    from lora2_engine.formats.keys import SDXL
    from lora2_engine.formats.lora_file import export_adapters

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    folder = server.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    export_adapters(attach(net, AdapterConfig(targets=("0",), init_rank=2)),
                    folder / "other_family.safetensors", layout=SDXL)
    text = _apply_file(server, "other_family.safetensors")
    assert "was made for SDXL but the model is SD1.5: pick a LoRA trained for SD1.5" in text, text


def test_apply_refuses_a_lora_full_of_nan_and_the_server_stays_up(server):
    """A diverged LoRA would turn every image black while saying "32 of 32 modules applied"."""
    import torch
    from safetensors.torch import save_file

    folder = server.base / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.full((2, 320), float("nan")),
               f"{key}.lora_up.weight": torch.zeros(320, 2)}, str(folder / "nan.safetensors"))
    text = _apply_file(server, "nan.safetensors")
    assert "nan.safetensors: 1 of 1 modules hold NaN or inf" in text, text
    assert server.request("/system_stats")["system"]  # still serving
