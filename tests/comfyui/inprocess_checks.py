"""Checks that need ComfyUI's own objects in the same process; run under COMFYUI_PYTHON.

``python inprocess_checks.py CHECK ARGS_JSON`` with the current directory = COMFYUI_PATH prints
one line ``RESULT <json>``. Everything runs under ``torch.inference_mode()``, as ComfyUI runs
nodes, so MODELs hold inference tensors exactly as in a real workflow. Called by
``test_inprocess.py``; it is a script, not a test module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = "comfyui_lora2"
sys.path.insert(0, os.getcwd())

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = os.environ.get("LORA2_COMFY_CPU", "1") == "1"  # 0: use the GPU
import torch  # noqa: E402

torch.set_num_threads(1)


class KeyLog(logging.Handler):
    """Counts ComfyUI's "lora key not loaded" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "lora key not loaded" in msg or "NOT LOADED" in msg:
            self.lines.append(msg)


def import_pack():
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return {name: importlib.import_module(f"{PACK}.{name}") for name in (
        "nodes.core", "nodes.bridge", "nodes.train", "nodes.apply", "nodes.report",
        "nodes.merge", "lora2_engine.config", "lora2_engine.formats",
        "lora2_engine.models.tiny")}


def call(node, **inputs):
    """Run a V3 node's execute the way the executor does (on a prepared class clone)."""
    out = node.PREPARE_CLASS_CLONE(None).execute(**inputs)
    return out.args if hasattr(out, "args") else out.result


def use_scratch_folders(tmp: Path):
    import folder_paths

    for sub in ("loras", "output", "temp"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(tmp / "loras"), is_default=True)
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_temp_directory(str(tmp / "temp"))


def weights(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with the patcher's patches applied."""
    patcher.patch_model()
    try:
        return {k: v.detach().to("cpu", copy=True) for k, v in
                patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def snapshot(patcher):
    dm = patcher.model.diffusion_model
    return ({n: id(m) for n, m in dm.named_modules()},
            {k: v.detach().to("cpu", copy=True) for k, v in dm.state_dict().items()},
            len(patcher.patches))


def same(a, b) -> bool:
    return a[0] == b[0] and a[2] == b[2] and set(a[1]) == set(b[1]) and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1])


# ------------------------------------------------------------------ checks
def check_loss(mods, _args) -> dict:
    """Our loss equals MSE on the native target with ComfyUI's real parameterisations."""
    import comfy.model_sampling as ms_mod

    core = mods["nodes.core"]
    out = {}
    combos = {"eps": (ms_mod.ModelSamplingDiscrete, ms_mod.EPS),
              "v": (ms_mod.ModelSamplingDiscrete, ms_mod.V_PREDICTION),
              "flow": (ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST)}
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 2
    for kind, (sched, pred) in combos.items():
        ms = type("MS", (sched, pred), {})(None)

        def raw(x):
            return torch.tanh(torch.einsum("oc,bchw->bohw", w, x))

        def apply_model(x, sigma, ms=ms, **_):
            return ms.calculate_denoised(sigma, raw(ms.calculate_input(sigma, x)), x)

        x0 = torch.randn(3, 4, 8, 8)
        got = core.denoising_loss(apply_model, ms)({"latents": x0},
                                                   torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        sigma = core.sample_sigmas(ms, 3, g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = ms.noise_scaling(sigma, noise, x0)
        s = sigma.view(-1, 1, 1, 1)
        target = {"eps": noise, "v": (noise - s * x0) / (s**2 + 1) ** 0.5,
                  "flow": noise - x0}[kind]
        want = torch.nn.functional.mse_loss(raw(ms.calculate_input(sigma, x_t)), target)
        out[kind] = [float(got), float(want)]
    return out


def check_sdxl(mods, args) -> dict:
    """Tiny SDXL-family UNet (ComfyUI: KOALA_700M): ADM conditioning, previews, key styles."""
    import comfy.sd

    core, bridge, train = mods["nodes.core"], mods["nodes.bridge"], mods["nodes.train"]
    cfg, tiny = mods["lora2_engine.config"], mods["lora2_engine.models.tiny"]
    tmp = Path(args["tmp"])
    use_scratch_folders(tmp)
    log = KeyLog()
    logging.getLogger().addHandler(log)
    model = comfy.sd.load_diffusion_model_state_dict(
        tiny.comfy_state_dict(tiny.build_unet("sdxl", seed=3)))
    base = model.model
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(2):
        latent = torch.randn(1, 4, 8, 8, generator=g)
        conds = base.extra_conds(cross_attn=torch.randn(1, 77, 2048, generator=g),
                                 pooled_output=torch.randn(1, 1280, generator=g), width=64,
                                 height=64, device="cpu", noise=latent, latent_image=latent)
        examples.append({"latents": latent[0], **{k: v.cond[0] for k, v in conds.items()}})
    before = snapshot(model)
    result = {"model": type(base.model_config).__name__, "layout": None, "styles": {},
              "example_keys": sorted(examples[0]), "y_shape": list(examples[0]["y"].shape)}
    result["layout"] = list(bridge.layout_of(base).num_res_blocks)
    for style in ("kohya", "comfy", "diffusers"):  # diffusers: loaded via match_peft_names
        a_cfg, t_cfg = core.build_configs("spread", {"steps": 2, "init_rank": 2, "lr": 1e-3})
        out = tmp / "loras" / f"sdxl_{style}.safetensors"
        res, previews = train._train(model, examples, a_cfg, t_cfg,
                                     cfg.ExportConfig(key_style=style), out, style == "comfy",
                                     2 if style == "kohya" else 0, "")
        lora = core.AdaptiveLora(res.lora, out.stem, out)
        n_lines = len(log.lines)
        _, _, modules, unmatched = bridge.apply_lora(model, None, lora.state_dict(), 1.0, 1.0)
        stock = bridge.lora_key_map(model, None)
        result["styles"][style] = {
            "modules": len(modules), "unmatched": unmatched,
            "stock_unmatched": len({k.split(".lora_")[0] for k in lora.state_dict()
                                    if ".lora_" in k} - set(stock)),
            "not_loaded_lines": len(log.lines) - n_lines,
            "previews": None if previews is None else list(previews.shape),
            "finite": all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)}
    result["model_unchanged"] = same(before, snapshot(model))
    return result


def check_sd15(mods, args) -> dict:
    """The nodes on a full SD1.5-family checkpoint: unchanged MODEL, stock-equal patches,
    cancel → checkpoint → resume, report and padding."""
    import comfy.model_management as mm
    import comfy.sd

    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py

    def stock_loader(lora_name: str, strength: float):
        node = comfy_nodes.LoraLoaderModelOnly()
        return getattr(node, node.FUNCTION)(model, lora_name, strength)[0]

    core, train = mods["nodes.core"], mods["nodes.train"]
    apply, report, merge = mods["nodes.apply"], mods["nodes.report"], mods["nodes.merge"]
    tmp = Path(args["tmp"])
    use_scratch_folders(tmp)
    log = KeyLog()
    logging.getLogger().addHandler(log)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        args["checkpoint"], output_vae=True, output_clip=True)[:3]
    subject = core.subject_from_folder(args["subject"], "a photo of sks dog", 64, "crop")
    common = dict(model=model, clip=clip, vae=vae, subject=subject, preset="spread",
                  learning_rate=1e-3, seed=0, init_rank=4)
    res = {}
    before = snapshot(model)
    lora, curve, previews = call(train.TrainAdaptiveLoRA, steps=3, filename="lora2/inproc",
                                 preview_every=2, gradient_checkpointing=True, **common)
    res["model_unchanged"] = same(before, snapshot(model))
    res["file"] = str(lora.path)
    res["curve"], res["previews"] = list(curve.shape), list(previews.shape)
    res["history_steps"] = [h["step"] for h in lora.history]

    # ApplyAdaptiveLoRA (in-memory and by file) against stock LoraLoaderModelOnly
    name = "lora2/inproc.safetensors"
    ours_mem = call(apply.ApplyAdaptiveLoRA, model=model, strength_model=0.7,
                    adaptive_lora=lora)[0]
    ours_file = call(apply.ApplyAdaptiveLoRA, model=model, strength_model=0.7,
                     lora_name=name)[0]
    stock = stock_loader(name, 0.7)
    w_base, w_mem, w_file, w_stock = (weights(p) for p in (model, ours_mem, ours_file, stock))
    res["equal_mem_stock"] = all(torch.equal(w_mem[k], w_stock[k]) for k in w_stock)
    res["equal_file_stock"] = all(torch.equal(w_file[k], w_stock[k]) for k in w_stock)
    res["changed_weights"] = sum(not torch.equal(w_base[k], w_stock[k]) for k in w_base)
    records = lora.lora.lora2_modules()  # our LDM module name -> file key, rank, nu
    name_ = next(n for n in records if "attn2.to_k" in n)
    mw, ldm = lora.lora.modules[records[name_]["key"]], name_ + ".weight"
    expect = w_base[ldm] + 0.7 * mw.delta().to(w_base[ldm].dtype)
    res["delta_matches_formula"] = bool(torch.allclose(w_stock[ldm], expect, atol=1e-6))
    res["model_unchanged_after_apply"] = same(before, snapshot(model))

    # report and padding
    image, table = call(report.RankReport, adaptive_lora=lora)[:2]
    res["report"] = [list(image.shape), table.splitlines()[-1]]
    padded = call(merge.ExpandForMerge, adaptive_lora=lora, rank=0,
                  filename="lora2/inproc_padded")[0]
    stock_pad = stock_loader("lora2/inproc_padded.safetensors", 0.7)
    w_pad = weights(stock_pad)
    res["padded_ranks"] = sorted(set(padded.lora.ranks().values()))
    res["padded_equal"] = all(torch.allclose(w_pad[k], w_stock[k], atol=1e-6) for k in w_stock)

    # the user presses cancel during step 2 → checkpoint at step 2; resume → finishes
    bridge = mods["nodes.bridge"]
    update = bridge.Progress.update

    def cancel_at_2(self, value, preview=None):
        update(self, value, preview)
        if value == 2:
            mm.interrupt_current_processing(True)

    bridge.Progress.update = cancel_at_2
    try:
        call(train.TrainAdaptiveLoRA, steps=4, filename="lora2/cancelled", **common)
        res["cancel"] = "not raised"
    except mm.InterruptProcessingException:
        res["cancel"] = "interrupted"
    finally:
        bridge.Progress.update = update
    state = tmp / "output" / "lora2_checkpoints" / "cancelled.state.safetensors"
    res["checkpoint_written"] = state.is_file()
    if state.is_file():
        from safetensors import safe_open

        with safe_open(str(state), "pt") as fh:
            res["checkpoint_step"] = fh.metadata()["step"]
    res["interrupt_flag_after"] = mm.processing_interrupted()
    resumed = call(train.TrainAdaptiveLoRA, steps=4, filename="lora2/cancelled",
                   resume="cancelled.state.safetensors", **common)[0]
    res["resumed_steps"] = [h["step"] for h in resumed.history]
    res["checkpoint_removed"] = not state.exists()
    res["model_unchanged_end"] = same(before, snapshot(model))
    res["not_loaded_lines"] = log.lines
    return res


def check_loader_matrix(mods, args) -> dict:
    """The ComfyUI column of tests/loader_matrix.py: each convention's file (a mixed-rank
    LoRA on the tiny SD1.5 UNet) through stock LoraLoaderModelOnly, against B Lambda A."""
    import comfy.sd
    import folder_paths

    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's, before the repo is on the path
    sys.path.append(str(REPO))  # for lora2_engine (ComfyUI has its own "tests" package)
    spec = importlib.util.spec_from_file_location("lora2_loader_matrix",
                                                  REPO / "tests" / "loader_matrix.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)

    tiny = mods["lora2_engine.models.tiny"]
    tmp = Path(args["tmp"])
    use_scratch_folders(tmp)
    with torch.inference_mode(False):
        unet = tiny.build_unet("sd15", seed=1)
        model = comfy.sd.load_diffusion_model_state_dict(tiny.comfy_state_dict(unet))
        ad = lm.mixed_adapters(unet)
        want = lm.truth(ad)
        files = lm.write_conventions(ad, lm.layout_of(unet), Path(folder_paths.get_folder_paths(
            "loras")[0]) / "matrix")
        ad.detach()
    base = weights(model)
    out = {}
    for conv, path in files.items():
        node = comfy_nodes.LoraLoaderModelOnly()
        patched = weights(getattr(node, node.FUNCTION)(model, f"matrix/{path.name}", 1.0)[0])
        loaded = {n: (patched[n + ".weight"] - base[n + ".weight"]).flatten(1) for n in want}
        out[conv] = lm.compare(loaded, want)
    return out


CHECKS = {"loss": check_loss, "sdxl": check_sdxl, "sd15": check_sd15,
          "loader_matrix": check_loader_matrix}

if __name__ == "__main__":
    check, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    args.setdefault("tmp", tempfile.mkdtemp(prefix="lora2-inproc-"))
    mods = import_pack()
    with torch.inference_mode():
        result = CHECKS[check](mods, args)
    print("RESULT " + json.dumps(result))
