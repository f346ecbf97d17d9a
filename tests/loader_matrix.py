"""The loader matrix: does every loader apply each module of a mixed-rank file at scale 1?

One set of trained-like adapters (ranks mixed: most modules at one rank, the rest at others),
written in four file conventions, then loaded by four loaders; every module's loaded update is
compared with ``B Lambda A`` computed from the adapters themselves:

conventions  ``one alpha`` (what the pack writes: alpha 1 in every module, factors scaled),
             ``alpha = rank`` (every module its own alpha: the pack's files before), ``no
             alpha`` (no alpha keys, factors at scale 1), ``diffusers`` (PEFT key names, no
             alpha keys, ``lora_adapter_metadata``: the ``--key-style diffusers`` export)
loaders      ``comfyui``: stock ``LoraLoaderModelOnly`` (tests/comfyui, in a real ComfyUI);
             ``kohya``: the A1111/Forge/sd-scripts rule from the raw tensors (``alpha / dim``,
             scale 1 without an alpha); ``diffusers``: ``pipe.load_lora_weights`` then
             ``fuse_lora``; ``peft``: PEFT ``LoraConfig`` filled from the file itself (its
             ``lora_adapter_metadata``; for kohya files ``lora_alpha = ss_network_alpha``
             and each module's rank from its tensors, as a PEFT user reads kohya metadata)

``python -m tests.loader_matrix`` prints the table the README shows (the ComfyUI column when
``COMFYUI_PATH``/``COMFYUI_PYTHON`` name a testbed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lora2_engine import AdapterConfig, ExportConfig, attach  # noqa: E402
from lora2_engine.families import get  # noqa: E402
from lora2_engine.formats.keys import UNetLayout  # noqa: E402
from lora2_engine.formats.lora_file import adapters_to_lora, write_lora  # noqa: E402

CONVENTIONS = ("one alpha", "alpha = rank", "no alpha", "diffusers")
LOADERS = ("comfyui", "kohya", "diffusers", "peft")
RANKS = (4, 4, 4, 1, 4, 8, 4, 2, 4, 4, 6, 4)  # one common rank, several others (as trained)
EXACT = 1e-5  # relative error of a module loaded at the right scale (float32 rounding)


def mixed_adapters(unet: torch.nn.Module, seed: int = 0):
    """Adapters on ``unet``'s attention projections with mixed ranks and non-zero updates."""
    ad = attach(unet, AdapterConfig(r_target=4, init_rank=8, r_max=16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(ad.layers.values()):
            layer.resize(RANKS[i % len(RANKS)])
            layer.A.normal_(generator=g)
            layer.B.normal_(generator=g).mul_(0.05)
    return ad


def layout_of(unet: torch.nn.Module) -> UNetLayout:
    """The key layout of a tiny stand-in UNet, as the CLI's model loader finds it."""
    from lora2_engine.models.tiny import unet_config

    return get(unet.spec.family).model_layout(unet_config(unet))


def truth(adapters) -> dict[str, torch.Tensor]:
    """``B Lambda A`` per module name, from the layers (never from a file)."""
    with torch.no_grad():
        return {n: (lay.B[:, :lay.rank] * lay.slot_scale()[None]) @ lay.A[:lay.rank]
                for n, lay in adapters.layers.items()}


def write_conventions(adapters, layout: UNetLayout, folder: Path) -> dict[str, Path]:
    """The same adapters in every convention: ``{convention: file}``."""
    folder.mkdir(parents=True, exist_ok=True)
    exact = {"rank_tol": 0}  # the trained factors, not their numerical-rank truncation
    ours = adapters_to_lora(adapters, ExportConfig(key_style="kohya", **exact), layout)
    out = {"one alpha": write_lora(ours, folder / "one_alpha.safetensors"),
           "diffusers": write_lora(adapters_to_lora(
               adapters, ExportConfig(key_style="diffusers", **exact), layout),
               folder / "diffusers.safetensors")}
    per_rank = {k: w.with_alpha(w.rank) for k, w in ours.modules.items()}
    meta = dict(ours.metadata, ss_network_alpha=str(max(w.rank for w in per_rank.values())))
    tensors = {}
    for k, w in per_rank.items():  # the pack's files before: alpha = rank, one per module
        tensors |= {f"{k}.lora_down.weight": w.down, f"{k}.lora_up.weight": w.up,
                    f"{k}.alpha": torch.tensor(w.alpha)}
    save_file(tensors, str(folder / "alpha_rank.safetensors"), meta)
    out["alpha = rank"] = folder / "alpha_rank.safetensors"
    meta.pop("ss_network_alpha")  # no alpha anywhere: none in the metadata either
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")},
              str(folder / "no_alpha.safetensors"), meta)
    out["no alpha"] = folder / "no_alpha.safetensors"
    return out


def compare(loaded: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """Per-module scale (projection of the loaded update on the true one) and worst error."""
    scales, errors = [], []
    for name, dw in want.items():
        got = loaded[name].double()
        ref = dw.double()
        scales.append(float((got * ref).sum() / (ref * ref).sum()))
        errors.append(float(torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref)))
    return {"modules": len(want), "min_scale": min(scales), "max_scale": max(scales),
            "max_rel_error": max(errors), "off": sum(e > EXACT for e in errors)}


def cell(result: dict) -> str:
    if result["max_scale"] == result["min_scale"] == 0:
        return "not loaded (names not mapped)"
    if result["off"] == 0:
        return f"exact ({result['max_rel_error']:.0e})"
    return (f"**{result['off']} of {result['modules']} off**: "
            f"{result['min_scale']:.2f}x..{result['max_scale']:.2f}x")


# ------------------------------------------------------------------ loaders without ComfyUI
def kohya_rule(path: Path) -> dict[str, torch.Tensor]:
    """Update per file key as A1111/Forge (``calc_scale``) and sd-scripts compute it."""
    t = load_file(str(path))
    out = {}
    for key in t:
        for down, up in ((".lora_down.weight", ".lora_up.weight"),
                         (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down):
                p = key[: -len(down)]
                d, u = t[key].double(), t[p + up].double()
                alpha = t.get(p + ".alpha")
                scale = 1.0 if alpha is None else float(alpha) / d.shape[0]
                out[p] = u @ d * scale
    return out


def by_module(loaded: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """File keys (any style) → module names: match on the name with ``.``/``_`` folded."""
    fold = {n.replace(".", "_"): n for n in names}
    out = {}
    for key, dw in loaded.items():
        bare = key.removeprefix("lora_unet_").removeprefix("unet.").replace(".", "_")
        if bare in fold:
            out[fold[bare]] = dw
    return out


def tiny_sd15_pipeline(folder: Path) -> Path:
    """A diffusers SD1.x pipeline with random weights and tiny sizes (hand-made tokenizer)."""
    import diffusers
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
        attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"


PIPELINE_LAYOUT = UNetLayout("sd15", (1, 1))  # the tiny pipeline's UNet: 1 res block per level


def load_unet(pipeline_dir: Path):
    import diffusers

    return diffusers.UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")


def diffusers_load(pipeline_dir: Path, file: Path) -> dict[str, torch.Tensor]:
    """``W_after - W_before`` per UNet weight after ``load_lora_weights`` + ``fuse_lora``."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    return {k.removesuffix(".weight"): after[k] - before[k] for k in before
            if k.endswith(".weight") and not torch.equal(after[k], before[k])}


def peft_load(pipeline_dir: Path, file: Path) -> dict[str, torch.Tensor]:
    """Each module's ``get_delta_weight`` after injecting a ``LoraConfig`` read from the file."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = load_unet(pipeline_dir)
    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(file))
    names = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix, role in ((".lora_down.weight", "A"), (".lora_up.weight", "B"),
                             (".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(suffix):
                bare = key[: -len(suffix)].removeprefix("lora_unet_").removeprefix("unet.")
                factors.setdefault(names[bare.replace(".", "_")], {})[role] = t
    if "lora_adapter_metadata" in meta:  # a PEFT config, as diffusers' exporter writes it
        cfg = {k.removeprefix("unet."): v for k, v in
               json.loads(meta["lora_adapter_metadata"]).items()}
    else:  # kohya metadata: network alpha = lora_alpha; ranks from the tensors
        ranks = {n: f["A"].shape[0] for n, f in factors.items()}
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        cfg = {"r": r0, "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
               "lora_alpha": float(meta.get("ss_network_alpha", r0)),
               "target_modules": sorted(factors)}
    cfg = {k: v for k, v in cfg.items() if k in ("r", "lora_alpha", "rank_pattern",
                                                  "alpha_pattern", "target_modules")}
    inject_adapter_in_model(LoraConfig(**cfg), unet)
    out = {}
    with torch.no_grad():
        for name, f in factors.items():
            layer = unet.get_submodule(name)
            layer.lora_A["default"].weight.copy_(f["A"])
            layer.lora_B["default"].weight.copy_(f["B"])
            out[name] = layer.get_delta_weight("default")
    return out


def python_matrix(folder: Path) -> dict[str, dict[str, dict]]:
    """The kohya, diffusers and PEFT columns: ``{convention: {loader: compare(...)}}``."""
    pipeline = tiny_sd15_pipeline(folder / "pipeline")
    unet = load_unet(pipeline)
    ad = mixed_adapters(unet)
    want = truth(ad)
    files = write_conventions(ad, PIPELINE_LAYOUT, folder / "files")
    ad.detach()
    out = {}
    for conv, path in sorted(files.items(), key=lambda kv: CONVENTIONS.index(kv[0])):
        out[conv] = {"kohya": compare(by_module(kohya_rule(path), want), want),
                     "diffusers": compare(by_module(diffusers_load(pipeline, path), want),
                                          want),
                     "peft": compare(peft_load(pipeline, path), want)}
    return out


def markdown(matrix: dict[str, dict[str, dict]]) -> str:
    cols = [c for c in LOADERS if any(c in row for row in matrix.values())]
    lines = ["| file | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for conv, row in matrix.items():
        lines.append(f"| {conv} | " + " | ".join(cell(row[c]) if c in row else "-"
                                                 for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="lora2-matrix-"))
    matrix = python_matrix(folder)
    try:
        from tests.comfyui.harness import skip_reason
        from tests.comfyui.test_inprocess import run_check

        if skip_reason() is None:
            comfy = run_check("loader_matrix", tmp=str(folder / "comfy"))
            for conv, res in comfy.items():
                matrix[conv]["comfyui"] = res
    except ImportError:
        pass
    print(markdown(matrix))
    print(f"\nranks of the {len(next(iter(matrix.values()))['kohya'] and RANKS)}-module cycle: "
          f"{RANKS}")


if __name__ == "__main__":
    main()
