"""Every family of the registry in real ComfyUI (``COMFYUI_PATH``), through its stand-in.

For the testbed's ComfyUI version and each family (sizes from the stand-in; a version it has no
size for is skipped with its reason): ComfyUI itself detects the stand-in file as the family
(and the pack's bridge maps it to the entry), ComfyUI's own module gives the stand-in's output;
TrainAdaptiveLoRA trains from LATENT + CONDITIONING in every key style stock ComfyUI loads,
and the file in stock LoraLoaderModelOnly gives exactly ApplyAdaptiveLoRA's weights with no
"lora key not loaded", equal to base + strength · B Λ A; the incoming MODEL is unchanged; the
family's engine schedule equals the MODEL's own ``model_sampling``.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora2_engine.families import get, registry
from lora2_engine.models.standin import load_stand_in

from .harness import find_testbed
from .test_inprocess import run_check

FAMILIES = sorted(registry())
PARITY = Path(__file__).with_name("family_parity.py")


def comfy_version() -> str:
    comfy, _ = find_testbed()
    text = (comfy / "comfyui_version.py").read_text()
    return text.split('__version__ = "')[1].split('"')[0]


@pytest.fixture(scope="module")
def version(comfy_ready) -> str:
    return comfy_version()


def stand_in_file(name: str, version: str, folder: Path):
    """The family's stand-in at this version's size, saved as UNETLoader opens it."""
    fam = get(name)
    stand_in = load_stand_in(fam)
    if version not in stand_in.sizes:
        pytest.skip(stand_in.why_not.get(version, f"no {fam.display} stand-in for {version}"))
    size = stand_in.sizes[version]
    model = stand_in.build(seed=1, **size)
    big = sum(p.numel() for p in model.parameters()) > 200_000_000
    sd = stand_in.comfy_state_dict(model)
    if big:  # full-width stand-ins: bf16 on disk (ComfyUI upcasts on the CPU)
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny_{name}.safetensors"
    save_file(sd, str(path), metadata=stand_in.comfy_metadata(model) or None)
    return fam, stand_in, model, size, path, big


@pytest.mark.parametrize("name", FAMILIES)
def test_comfyui_detects_the_stand_in_and_computes_its_output(name, version, tmp_path):
    fam, stand_in, model, size, path, big = stand_in_file(name, version, tmp_path)
    if big:
        model = model.to(torch.bfloat16).float()  # what ComfyUI loads from the bf16 file
    g = torch.Generator().manual_seed(0)
    *lead, h, w = stand_in.latent_shape  # (C, h, w), or (C, T, h, w) for video models
    ctx = torch.randn(2, 77, size.get("context", stand_in.context_dim), generator=g)
    pooled = (torch.randn(2, stand_in.pooled_dim, generator=g) if stand_in.pooled_dim
              else None)
    conds = [fam.conditioning(ctx[i], None if pooled is None else pooled[i], 64, 64)
             for i in range(2)]
    inputs = {"x": torch.randn(2, *lead, h, w + 2, generator=g), "t": torch.tensor([0.7, 0.2]),
              **{k: torch.stack([cd[k] for cd in conds]) for k in conds[0]}}
    inputs["t"] = fam.schedule().timestep(inputs["t"]).float()
    save_file(inputs, str(tmp_path / "in.safetensors"))
    comfy, python = find_testbed()
    proc = subprocess.run([python, str(PARITY), str(path), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], cwd=comfy, capture_output=True,
                          text=True, timeout=900, env={"OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULT "):])
    assert report["config"] in stand_in.comfy_names, report
    assert report["family"] == name
    theirs = load_file(str(tmp_path / "out.safetensors"))["out"]
    conds = {k: v for k, v in inputs.items() if k not in ("x", "t", "c_crossattn")}
    capture = fam.entropy(model) if fam.entropy else None
    with torch.no_grad():
        ours = model(inputs["x"], inputs["t"], context=inputs["c_crossattn"], **conds)
    assert ours.abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4 if not big else 2e-3, rtol=1e-4)
    if capture is not None:  # the capture reads ComfyUI's tensors (its layouts) as ours
        assert report["entropy"] == pytest.approx(float(capture.mean()), rel=1e-4), report
        assert 0 < report["entropy"] < math.log(inputs["c_crossattn"].shape[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_trained_files_load_in_stock_loraloader_like_apply(name, version, tmp_path):
    fam, stand_in, model, size, path, big = stand_in_file(name, version, tmp_path / "models")
    del model
    r = run_check("family", tmp=str(tmp_path / "comfy"), file=str(path), family=name,
                  styles=list(fam.comfy_loads), steps=1 if big else 3,
                  latent_shape=list(stand_in.latent_shape),
                  context=size.get("context", stand_in.context_dim),
                  pooled=stand_in.pooled_dim, preview_every=0 if big else 2,
                  checkpointing_check=not big)
    assert r["family"] == name and r["config"] in stand_in.comfy_names
    assert r["schedule_same"] == [True] * 6  # the engine's schedule is the MODEL's own
    if not big:  # one preview (step 2 of 3) from the latent format's RGB factors, 64x64
        assert r["previews"] == [1, 64, 64, 3]
        assert r["checkpointing_same"]  # the family's inplace_blocks is right for its blocks
    if len(stand_in.latent_shape) == 4:  # a video family takes an image latent as one frame:
        first = r["styles"][fam.comfy_loads[0]]["loss"][0]  # the same first step
        assert r["image_latent_loss"] == [pytest.approx(first, rel=1e-6)]
    assert_stock_loads_like_apply(r, fam)


def assert_stock_loads_like_apply(r: dict, fam) -> None:
    """Each key style's file in stock LoraLoaderModelOnly: no unmatched key, weights equal to
    ApplyAdaptiveLoRA's and to base + strength · B Λ A; the incoming MODEL unchanged."""
    assert r["model_unchanged"]
    assert set(r["styles"]) == set(fam.comfy_loads)
    for style, s in r["styles"].items():
        assert s["not_loaded"] == [], style
        # every module with an update changes its weight; the others keep B = 0 (in a 1-block
        # Qwen-Image the last block's text path reaches no output, so no gradient: measured)
        assert s["equal_stock"] and s["changed"] == s["live"] > 0, style
        assert len(s["formula"]) == s["modules"] and all(s["formula"]), style
        assert s["file_keys"] >= s["live"]  # zero modules are left out (rank 0 recorded)
        assert all(e > 0 for e in s["entropy"]) if fam.entropy else True
        assert all(x == x and abs(x) < 1e6 for x in s["loss"]), s["loss"]  # finite


def test_chroma_trains_through_the_flux_entry(version, tmp_path):
    """A Chroma file (the Flux stand-in's blocks without modulation, plus the guidance
    approximator ComfyUI detects Chroma by; 3072 wide, as ComfyUI fixes it) is detected as
    ``Chroma``, mapped to the Flux entry, trained in every key style, and loaded by stock
    LoraLoader like ApplyAdaptiveLoRA. Chroma's noise schedule (flux shift 1.15) is not
    schnell's: in ComfyUI the denoiser takes the MODEL's own ``model_sampling``. ComfyUI
    0.3.54 runs Chroma on blocks of its own that add residuals with an explicit in-place
    ``addcmul_`` on a tensor autograd saved (measured: training fails with and without
    checkpointing): there TrainAdaptiveLoRA refuses it, naming the fix."""
    from lora2_engine.models.tiny_flux import CHROMA_HIDDEN, chroma_state_dict

    fam = get("flux")
    stand_in = load_stand_in(fam)
    size = {**stand_in.sizes.get(version, {}), "hidden": CHROMA_HIDDEN}
    model = stand_in.build(seed=1, **size)
    sd = {k: v.to(torch.bfloat16) for k, v in chroma_state_dict(model, seed=2).items()}
    del model
    path = tmp_path / "models" / "tiny_chroma.safetensors"
    path.parent.mkdir(parents=True)
    save_file(sd, str(path))
    del sd
    if version == "0.3.54":  # its own Chroma blocks (x.addcmul_ on a saved tensor)
        r = run_check("chroma_refused", tmp=str(tmp_path / "comfy"), file=str(path))
        assert "cannot be trained" in r["error"] and "update ComfyUI" in r["error"], r
        return
    r = run_check("family", tmp=str(tmp_path / "comfy"), file=str(path), family="chroma",
                  styles=list(fam.comfy_loads), steps=1, latent_shape=list(stand_in.latent_shape),
                  context=size.get("context", stand_in.context_dim), pooled=0,
                  # CLIPTextEncode with Chroma's T5 gives no pooled vector, as a None that
                  # 0.3.54's Flux conditioning reads
                  cond_extra={"pooled_output": None})
    assert r["config"] == "Chroma" and r["family"] == "flux"
    assert r["schedule_same"] != [True] * 6  # its own schedule, which the bridge uses
    assert_stock_loads_like_apply(r, fam)


CLIP_WIDTH = 768  # the tiny SD1.5 checkpoint's CLIP-L: context and pooled widths


def empty_latent(shape: tuple[int, ...], batch: int) -> dict:
    """The stock node for an empty 64x64 latent of this shape: by channels, and a one-frame
    video latent for (C, T, h, w)."""
    size = {"width": 64, "height": 64, "batch_size": batch}
    if len(shape) == 4:
        return {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**size, "length": 1}}
    node = {4: "EmptyLatentImage", 16: "EmptySD3LatentImage"}[shape[0]]
    return {"class_type": node, "inputs": size}


CLIP_FAMILIES = [f for f in FAMILIES if load_stand_in(get(f)).context_dim == CLIP_WIDTH]
PRECISIONS = [("default", "auto"), ("default", "bf16"), ("fp8_e4m3fn", "auto")]


@pytest.mark.parametrize("weight_dtype,training_dtype", PRECISIONS,
                         ids=["fp32", "bf16-autocast", "fp8-weights"])
@pytest.mark.parametrize("name", CLIP_FAMILIES)
def test_trains_through_the_server_from_unetloader(name, weight_dtype, training_dtype, server,
                                                   version):
    """POST /prompt: UNETLoader(stand-in, weight_dtype) + CLIP-L conditioning + an empty
    latent → TrainAdaptiveLoRA(training_dtype) → file; then stock LoraLoaderModelOnly +
    KSampler on it."""
    from .conftest import CHECKPOINT
    from .test_server import not_loaded

    fam = get(name)
    stand_in = load_stand_in(fam)
    size = stand_in.sizes.get(version)
    if size is None:
        pytest.skip(f"{fam.display} on {version}: " + stand_in.why_not.get(version,
                                                                          "no stand-in"))
    if size:
        pytest.skip(f"{fam.display} on {version}: the stand-in is built as {size} there " + (
            f"({size['context']}-wide text: no text encoder of that width fits a server graph)"
            if "context" in size else "(ComfyUI fixes its widths: too slow for a server "
            "graph on a CPU)") + "; covered in-process")
    folder = server.base / "models" / "diffusion_models"
    _, _, _, _, path, _ = stand_in_file(name, version, folder)
    start = len(server.log())
    common = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": path.name,
                                                     "weight_dtype": weight_dtype}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1],
                                                         "text": "a photo of sks dog"}},
        "4": empty_latent(stand_in.latent_shape, 2)}
    train = {"5": {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": {
        "model": ["2", 0], "latents": ["4", 0], "positive": ["3", 0], "preset": "spread",
        "steps": 3, "learning_rate": 1e-3, "seed": 0, "nu_lr": 0.3,
        "training_dtype": training_dtype, "filename": f"lora2/server_{name}"}}}
    history = server.run({**common, **train}, timeout=900)
    text = next(v["text"][0] for v in history["outputs"].values() if "text" in v)
    lora = server.base / text.splitlines()[0].removeprefix("saved ")  # _2, _3... added later
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert meta["lora2.family"] == name and meta["lora2.trained_in"] == "ComfyUI"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    mixed = json.loads(meta["lora2.train_config"])["mixed_precision"]
    assert mixed == {"auto": "no", "bf16": "bf16"}[training_dtype]  # CPU: auto is fp32
    assert text.splitlines()[1].startswith(f"{fam.display}: ")
    sample = {
        "6": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["2", 0], "lora_name": f"lora2/{lora.name}", "strength_model": 0.8}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0],
                                                     "filename_prefix": f"lora2/{name}"}}}
    server.run({**common, **sample}, timeout=900)
    assert not_loaded(server, start) == []


@pytest.mark.parametrize("name", CLIP_FAMILIES)
def test_fp8_weights_stay_fp8_while_training(name, version, tmp_path):
    """UNETLoader weight_dtype fp8_e4m3fn: the frozen weights are never dequantised as a whole
    (ComfyUI's cast layers dequantise one layer per forward); ours equals stock LoraLoader."""
    fam, stand_in, model, size, path, big = stand_in_file(name, version, tmp_path / "models")
    if big:
        pytest.skip("full-width stand-in: fp8 covered on the tiny one")
    r = run_check("family", tmp=str(tmp_path / "comfy"), file=str(path), family=name,
                  styles=["kohya"], steps=2, latent_shape=list(stand_in.latent_shape),
                  context=size.get("context", stand_in.context_dim),
                  pooled=stand_in.pooled_dim, weight_dtype="fp8_e4m3fn")
    assert r["weight_dtypes_during_training"] == ["torch.float8_e4m3fn"], r
    s = r["styles"]["kohya"]
    assert s["equal_stock"] and s["not_loaded"] == [] and r["model_unchanged"]
    assert all(x == x for x in s["loss"])
