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
        "lora2_engine.models.tiny", "lora2_engine.schedule", "lora2_engine.denoiser",
        "lora2_engine.diffusion")}


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


def weights(patcher, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with the patcher's patches applied (only ``keys``, when
    given: full-width stand-ins are too large to copy whole several times)."""
    patcher.patch_model()
    try:
        return {k: v.detach().to("cpu", copy=True) for k, v in
                patcher.model.diffusion_model.state_dict().items() if keys is None or k in keys}
    finally:
        patcher.unpatch_model()


def patched_keys(*patchers) -> set[str]:
    """Diffusion-model keys any of these patchers patches: the only weights that can differ
    between them and the unpatched model."""
    prefix = "diffusion_model."
    return {k.removeprefix(prefix) for p in patchers for k in p.patches if k.startswith(prefix)}


def snapshot(patcher, copy: bool = True):
    """Module identities, weights (copied, or the live tensors to compare against a copy)
    and the number of patches of a MODEL."""
    dm = patcher.model.diffusion_model
    return ({n: id(m) for n, m in dm.named_modules()},
            {k: v.detach().to("cpu", copy=True) if copy else v.detach()
             for k, v in dm.state_dict().items()},
            len(patcher.patches))


def same(a, b) -> bool:
    return a[0] == b[0] and a[2] == b[2] and set(a[1]) == set(b[1]) and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1])


# ------------------------------------------------------------------ checks
def check_loss(mods, _args) -> dict:
    """The engine's loss equals MSE on the native target with ComfyUI's real
    parameterisations, and the engine's own schedules equal ComfyUI's, value for value."""
    import types

    import comfy.model_sampling as ms_mod

    sched = mods["lora2_engine.schedule"]
    denoiser = mods["lora2_engine.denoiser"]
    out = {"loss": {}, "same": {}}

    def comfy_ms(base, pred, **settings):
        cfg = types.SimpleNamespace(sampling_settings=settings) if settings else None
        return type("MS", (base, pred), {})(cfg)

    combos = {"eps": (ms_mod.ModelSamplingDiscrete, ms_mod.EPS, {}),
              "v": (ms_mod.ModelSamplingDiscrete, ms_mod.V_PREDICTION, {}),
              "flow": (ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST, {"shift": 3.0})}
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 2
    for kind, (base, pred, settings) in combos.items():
        ms = comfy_ms(base, pred, **settings)

        def raw(x):
            return torch.tanh(torch.einsum("oc,bchw->bohw", w, x))

        def apply_model(x, sigma, ms=ms, **_):
            return ms.calculate_denoised(sigma, raw(ms.calculate_input(sigma, x)), x)

        x0 = torch.randn(3, 4, 8, 8)
        loss = sched.denoising_loss(denoiser.ApplyModelDenoiser(None, ms, apply_model))
        got = loss({"latents": x0}, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        sigma = sched.sample_sigmas(ms, 3, g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = ms.noise_scaling(sigma, noise, x0)
        s = sigma.view(-1, 1, 1, 1)
        target = {"eps": noise, "v": (noise - s * x0) / (s**2 + 1) ** 0.5,
                  "flow": noise - x0}[kind]
        want = torch.nn.functional.mse_loss(raw(ms.calculate_input(sigma, x_t)), target)
        out["loss"][kind] = [float(got), float(want)]

    engine = {"eps": (sched.DiscreteSchedule("eps"), comfy_ms(*combos["eps"][:2])),
              "v": (sched.DiscreteSchedule("v"), comfy_ms(*combos["v"][:2])),
              "flux-schnell": (sched.FlowSchedule(1.0, 1.0), comfy_ms(
                  ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST, shift=1.0, multiplier=1.0)),
              "sd3": (sched.FlowSchedule(3.0, 1000.0), comfy_ms(
                  ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST, shift=3.0))}
    for name, (ours, theirs) in engine.items():
        out["same"][name] = schedule_checks(ours, theirs)
    return out


def schedule_checks(ours, theirs) -> list[bool]:
    """An engine schedule against ComfyUI's ``model_sampling``: sigma table, percent_to_sigma,
    timestep, calculate_input / calculate_denoised, noise_scaling — each equal or not."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sig = torch.tensor([float(theirs.percent_to_sigma(p)) for p in (0.1, 0.5)])
    return [torch.equal(ours.sigmas.float(), theirs.sigmas.float()),
            all(ours.percent_to_sigma(p) == theirs.percent_to_sigma(p)
                for p in (0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0)),
            torch.equal(ours.timestep(sig), theirs.timestep(sig)),
            torch.equal(ours.calculate_input(sig, x), theirs.calculate_input(sig, x)),
            torch.equal(ours.calculate_denoised(sig, y, x), theirs.calculate_denoised(sig, y, x)),
            torch.equal(ours.noise_scaling(sig, y, x), theirs.noise_scaling(sig, y, x))]


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
        a_cfg, t_cfg = core.build_configs("spread", {"steps": 2, "init_rank": 2, "lr": 1e-3,
                                                     "grad_checkpointing": style == "comfy"})
        out = tmp / "loras" / f"sdxl_{style}.safetensors"
        res, previews = train._train(model, examples, a_cfg, t_cfg,
                                     cfg.ExportConfig(key_style=style), out,
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
                                 preview_every=2, gradient_checkpointing="on", **common)
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
    res["report"] = [list(image.shape), table.splitlines()[0]]  # the summary comes first
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


def check_one_path(mods, args) -> dict:
    """TrainAdaptiveLoRA's route (``nodes/train._train`` on ComfyUI's MODEL, its apply_model
    and model_sampling) and the engine route (the same ComfyUI UNet under the engine's own
    schedule and calling convention, as the CLI runs stand-ins): the same adapter, bit for bit."""
    import comfy.sd

    core, bridge, train = mods["nodes.core"], mods["nodes.bridge"], mods["nodes.train"]
    cfg, tiny = mods["lora2_engine.config"], mods["lora2_engine.models.tiny"]
    sched, denoiser = mods["lora2_engine.schedule"], mods["lora2_engine.denoiser"]
    diffusion = mods["lora2_engine.diffusion"]
    use_scratch_folders(Path(args["tmp"]))
    model = comfy.sd.load_diffusion_model_state_dict(
        tiny.comfy_state_dict(tiny.build_unet("sd15", seed=2)))
    g = torch.Generator().manual_seed(0)
    examples = [{"latents": torch.randn(4, 8, 8, generator=g),
                 "c_crossattn": torch.randn(77, 768, generator=g)} for _ in range(3)]
    settings = {"steps": 3, "init_rank": 3, "lr": 1e-3, "seed": 4}
    a_cfg, t_cfg = core.build_configs("spread", settings)
    export = cfg.ExportConfig()
    node, _ = train._train(model, [dict(e) for e in examples], a_cfg, t_cfg, export, None, 0, "")
    with torch.inference_mode(False), bridge.training_mode():
        target = bridge.load_for_training(model)
        core.release_inference_tensors(target.denoiser.module)
        ours = denoiser.ModuleDenoiser(target.denoiser.module, sched.DiscreteSchedule("eps"),
                                       target.family.cond_keys)
        engine = diffusion.train_diffusion(ours, bridge.to_device(examples, target.device),
                                           target.family, a_cfg, t_cfg, export,
                                           layout=target.layout)
    same = [torch.equal(w.down, engine.lora.modules[k].down) and
            torch.equal(w.up, engine.lora.modules[k].up) for k, w in node.lora.modules.items()]
    return {"modules": len(same), "bit_equal": sum(same),
            "loss_node": [h["loss"] for h in node.history],
            "loss_engine": [h["loss"] for h in engine.history],
            "learned": any(float(w.up.abs().max()) > 0 for w in node.lora.modules.values())}


def _stitched_delta(lora, name: str) -> torch.Tensor:
    """Delta W of module ``name`` from the LoRA's own tensors (split parts stacked by rows);
    a module exported at rank 0 (its update is exactly zero) has no tensors in the file."""
    rec = lora.lora2_modules()[name]
    if rec["rank"] == 0:
        return torch.zeros(rec["m"], rec["n"])
    keys = [k for k, _ in rec.get("split", [[rec["key"], None]])]
    return torch.cat([lora.modules[k].delta() for k in keys])


def check_family(mods, args) -> dict:
    """A family's stand-in file through UNETLoader; TrainAdaptiveLoRA from LATENT +
    CONDITIONING in each key style; the file in stock LoraLoaderModelOnly vs ApplyAdaptiveLoRA;
    the incoming MODEL unchanged."""
    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py
    import folder_paths

    train, apply, bridge = mods["nodes.train"], mods["nodes.apply"], mods["nodes.bridge"]
    tmp = Path(args["tmp"])
    use_scratch_folders(tmp)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(args["file"]).parent),
                                       is_default=True)
    log = KeyLog()
    logging.getLogger().addHandler(log)
    loader = comfy_nodes.UNETLoader()
    model = getattr(loader, loader.FUNCTION)(Path(args["file"]).name,
                                             args.get("weight_dtype", "default"))[0]
    base = model.model
    fam = bridge.model_family(base)
    res = {"config": type(base.model_config).__name__, "family": getattr(fam, "name", None),
           "styles": {}, "schedule_same": schedule_checks(fam.schedule(), base.model_sampling)}
    g = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(2, *args["latent_shape"], generator=g)}
    extra = ({"pooled_output": torch.randn(1, args["pooled"], generator=g)} if args["pooled"]
             else {})
    extra.update(args.get("cond_extra", {}))
    positive = [[torch.randn(1, 77, args["context"], generator=g), extra]]
    before = snapshot(model)
    during: set[str] = set()  # dtypes of the frozen Linear weights while training
    update = bridge.Progress.update

    def spy(self, value, preview=None):
        during.update(str(p.dtype) for n, p in base.diffusion_model.named_parameters()
                      if p.dim() == 2 and not n.endswith((".A", ".B")))
        update(self, value, preview)

    bridge.Progress.update = spy
    common = {"model": model, "positive": positive, "preset": "spread", "steps": args["steps"],
              "learning_rate": 1e-3, "seed": 0, "init_rank": 4, "nu_lr": 0.3}
    for i, style in enumerate(args["styles"]):
        n_lines = len(log.lines)
        preview = args.get("preview_every", 0) if i == 0 else 0
        out = call(train.TrainAdaptiveLoRA, latents=latents, preview_every=preview,
                   filename=f"lora2/{args['family']}_{style}", key_style=style, **common,
                   **args.get("train", {}))
        lora = out[0]
        if preview:
            res["previews"] = list(out[2].shape)
        name = f"lora2/{args['family']}_{style}.safetensors"
        ours = call(apply.ApplyAdaptiveLoRA, model=model, strength_model=0.8,
                    adaptive_lora=lora)[0]
        node = comfy_nodes.LoraLoaderModelOnly()
        stock = getattr(node, node.FUNCTION)(model, name, 0.8)[0]
        keys = patched_keys(ours, stock)  # every other weight is the base one in both
        w_base, w_ours, w_stock = (weights(p, keys) for p in (model, ours, stock))
        records = lora.lora.lora2_modules()
        formula, live = [], 0
        for mod in records:  # fp8 weights are re-quantised after patching: no exact formula
            key, delta = mod + ".weight", _stitched_delta(lora.lora, mod)
            nonzero = bool(delta.abs().max() > 0)  # a module no loss reaches keeps B = 0
            live += nonzero
            if key not in keys:  # patched by neither: right only if its update is zero
                formula.append(not nonzero)
            elif w_base[key].dtype == torch.float32:
                want = w_base[key] + 0.8 * delta
                formula.append(bool(torch.allclose(w_stock[key], want, atol=1e-5)))
        res["styles"][style] = {
            "modules": len(records), "file_keys": len(lora.lora.modules), "live": live,
            "equal_stock": all(torch.equal(w_ours[k], w_stock[k]) for k in w_stock),
            "changed": sum(not torch.equal(w_base[k], w_stock[k]) for k in w_base),
            "formula": formula, "not_loaded": log.lines[n_lines:],
            "ranks": sorted(set(lora.lora.ranks().values())),
            "loss": [h["loss"] for h in lora.history],
            "entropy": [h["entropy"] for h in lora.history],
            "mixed_precision": json.loads(lora.lora.metadata["lora2.train_config"])[
                "mixed_precision"]}
    bridge.Progress.update = update
    if args.get("checkpointing_check"):  # ComfyUI's own blocks (in place or not) under
        runs = [call(train.TrainAdaptiveLoRA, latents=latents, gradient_checkpointing=c,
                     filename=f"lora2/ckpt_{c}", **{**common, "steps": 2})[0].lora.modules
                for c in ("off", "on")]  # checkpointing: the same adapter as without
        res["checkpointing_same"] = runs[0].keys() == runs[1].keys() and all(
            torch.allclose(w.up, runs[1][k].up, atol=1e-6, rtol=1e-5)
            and torch.allclose(w.down, runs[1][k].down, atol=1e-6, rtol=1e-5)
            for k, w in runs[0].items())
    if latents["samples"].ndim == 5:  # a video model also takes an image latent: one frame
        image = {"samples": latents["samples"][:, :, 0]}
        out = call(train.TrainAdaptiveLoRA, latents=image, filename="lora2/image_latent",
                   **{**common, "steps": 1})
        res["image_latent_loss"] = [h["loss"] for h in out[0].history]
    res["weight_dtypes_during_training"] = sorted(during)
    res["model_unchanged"] = same(before, snapshot(model, copy=False))
    return res


def check_chroma_refused(mods, args) -> dict:
    """TrainAdaptiveLoRA on a model whose blocks cannot be trained: the node's error."""
    comfy_nodes = importlib.import_module("nodes")
    import folder_paths

    use_scratch_folders(Path(args["tmp"]))
    folder_paths.add_model_folder_path("diffusion_models", str(Path(args["file"]).parent),
                                       is_default=True)
    loader = comfy_nodes.UNETLoader()
    model = getattr(loader, loader.FUNCTION)(Path(args["file"]).name, "default")[0]
    latents = {"samples": torch.zeros(1, 16, 8, 8)}
    positive = [[torch.zeros(1, 77, 4096), {"pooled_output": None}]]
    try:
        call(mods["nodes.train"].TrainAdaptiveLoRA, model=model, latents=latents,
             positive=positive, preset="spread", steps=1, learning_rate=1e-3, r_target=0.0,
             seed=0, init_rank=4, nu_lr=0.3, filename="lora2/refused")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


CHECKS = {"loss": check_loss, "sdxl": check_sdxl, "sd15": check_sd15,
          "one_path": check_one_path, "family": check_family,
          "chroma_refused": check_chroma_refused,
          "loader_matrix": check_loader_matrix}

if __name__ == "__main__":
    check, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    args.setdefault("tmp", tempfile.mkdtemp(prefix="lora2-inproc-"))
    mods = import_pack()
    with torch.inference_mode():
        result = CHECKS[check](mods, args)
    print("RESULT " + json.dumps(result))
