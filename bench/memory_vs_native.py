"""Peak training memory and step time: TrainAdaptiveLoRA vs ComfyUI's TrainLoraNode, through a
real server, on the tiny Flux and tiny SDXL graphs (needs COMFYUI_PATH / COMFYUI_PYTHON).

Each (graph, trainer) runs in a fresh ComfyUI server so that neither inherits the other's
allocations: a 1-step warm-up prompt (loads the model, encodes the prompt), a ``lo``-step and a
``hi``-step prompt. Step time = (t_hi - t_lo) / (hi - lo), so loading and saving cancel out.
Peak memory = the server's peak resident set (``VmHWM``, reset through ``/proc/PID/clear_refs``
just before the ``hi`` prompt) minus its resident set before that prompt: what training adds
on top of the loaded models. Both trainers adapt the same modules at the same rank: every
Linear of the diffusion model (TrainLoraNode cannot be restricted; on SDXL it also adapts the
3x3 convolutions and trains norm/bias differences, which ours cannot), fp32 on the CPU, batch
1; gradient checkpointing: TrainLoraNode's default (on), ours ``--checkpointing`` (auto: on
for DiTs, off for UNets).

The SDXL graph needs 2048-wide conditioning: it writes a CLIP-L + CLIP-G pair with random
weights at full size (ComfyUI builds SDXL's text encoders from fixed configs); its memory is in
the baseline, not in the increments. Numbers are ratios measured side by side in one run; on
a shared CPU, treat them as provisional.

    python bench/memory_vs_native.py [--graphs flux sdxl] [--rank 8] [--steps 3 11]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.comfy_vs_native import defaults  # noqa: E402
from lora2_engine.families import get  # noqa: E402
from lora2_engine.models.standin import load_stand_in  # noqa: E402
from tests.comfyui.conftest import CHECKPOINT, prepare_base  # noqa: E402
from tests.comfyui.harness import skip_reason, start_server  # noqa: E402
from tests.comfyui.tiny_checkpoint import write_tiny_sd15_checkpoint  # noqa: E402

PROMPT = "a photo of sks dog"
LATENT = {4: "EmptyLatentImage", 16: "EmptySD3LatentImage"}


def write_sdxl_clips(folder: Path) -> tuple[str, str]:
    """CLIP-L and CLIP-G text encoders, random, at full size (key names from transformers)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    names = []
    for name, cls, cfg in (
        ("clip_l_random.safetensors", CLIPTextModel, CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, hidden_act="quick_gelu")),
        ("clip_g_random.safetensors", CLIPTextModelWithProjection, CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
            num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"))):
        with torch.device("meta"):  # ComfyUI's names: text_model.* (+ text_projection)
            keys = {k if k.startswith(("text_model.", "text_projection")) else
                    "text_model." + k: v.shape for k, v in cls(cfg).state_dict().items()}
        sd = {k: (torch.ones(s) if k.endswith("norm.weight") or "layer_norm" in k and
                  k.endswith("weight") else torch.randn(s, generator=g) * 0.02
                  ).to(torch.float16) for k, s in keys.items()}
        save_file(sd, str(folder / name))
        names.append(name)
    return names[0], names[1]


def all_linear(model: torch.nn.Module) -> str:
    return ",".join(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def graph(info: dict, which: str, steps: int, g: dict, args) -> dict:
    api = {"2": {"class_type": "UNETLoader", "inputs": {"unet_name": g["unet"],
                                                        "weight_dtype": "default"}},
           "4": {"class_type": LATENT[g["channels"]], "inputs": {
               "width": args.resolution, "height": args.resolution, "batch_size": 1}}}
    if g["clip"] == "checkpoint":
        api["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}
        clip = ["1", 1]
    else:
        api["1"] = {"class_type": "DualCLIPLoader", "inputs": {
            **defaults(info["DualCLIPLoader"]), "clip_name1": g["clip"][0],
            "clip_name2": g["clip"][1], "type": "sdxl"}}
        clip = ["1", 0]
    api["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}}
    if which == "ours":
        train = defaults(info["LoRA2_TrainAdaptiveLoRA"])
        train.update(model=["2", 0], latents=["4", 0], positive=["3", 0], steps=steps,
                     learning_rate=args.lr, r_target=float(args.rank), init_rank=args.rank,
                     seed=0, filename="", preview_every=0, targets=g["targets"],
                     training_dtype="fp32", gradient_checkpointing=args.checkpointing)
        api["5"] = {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": train}
        return api
    train = defaults(info["TrainLoraNode"])
    train.update(model=["2", 0], latents=["4", 0], positive=["3", 0], batch_size=1,
                 grad_accumulation_steps=1, steps=steps, learning_rate=args.lr,
                 rank=args.rank, seed=0, training_dtype="fp32", lora_dtype="fp32",
                 algorithm="LoRA")
    api["5"] = {"class_type": "TrainLoraNode", "inputs": train}
    old = "SaveLoRANode" in info  # 0.3.54: (MODEL, LORA_MODEL, LOSS_MAP, INT); 0.28: no MODEL
    api["6"] = {"class_type": "SaveLoRANode" if old else "SaveLoRA", "inputs": {
        "lora": ["5", 1 if old else 0], "prefix": "loras/bench_native"}}
    return api


def seconds(entry: dict) -> float:
    stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


def measure(base: Path, g: dict, which: str, args) -> dict:
    server = start_server(base)
    try:
        info = server.object_info()
        pid = server.proc.pid
        row = {"graph": g["name"], "trainer": which}
        try:
            server.run(graph(info, which, 1, g, args), timeout=3600)  # warm-up
            lo, hi = args.steps
            t_lo = seconds(server.run(graph(info, which, lo, g, args), timeout=3600))
            before = status_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
            t_hi = seconds(server.run(graph(info, which, hi, g, args), timeout=3600))
            peak = status_kb(pid, "VmHWM")
        except Exception as exc:  # noqa: BLE001  (a trainer that cannot run: report why)
            row["error"] = str(exc).splitlines()[0][:300]
            return row
        row.update(per_step=(t_hi - t_lo) / (hi - lo), rss_before_mb=before / 1024,
                   peak_mb=peak / 1024, added_mb=(peak - before) / 1024)
        return row
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", nargs="+", default=["flux", "sdxl"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs=2, default=(3, 11))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--flux-size", default="",
                        help="TinyFlux sizes, e.g. hidden=1024,depth=2,depth_single=4 "
                             "(ComfyUI 0.28 detects any width; default: the 1.15 M stand-in)")
    parser.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                        help="ours; TrainLoraNode keeps its default (on)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    root = Path(tempfile.mkdtemp(prefix="lora2-mem-"))
    ckpt = write_tiny_sd15_checkpoint(root / "ckpt" / CHECKPOINT)
    base = prepare_base(root / "comfy", ckpt)
    (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    graphs = []
    for name in args.graphs:
        stand_in = load_stand_in(get(name))
        size = ({k: int(v) for k, v in (kv.split("=") for kv in args.flux_size.split(","))}
                if name == "flux" and args.flux_size else {})
        model = stand_in.build(seed=0, **size)
        unet = f"tiny_{name}.safetensors"
        save_file(stand_in.comfy_state_dict(model), str(base / "models" / "diffusion_models"
                                                        / unet))
        clip = ("checkpoint" if stand_in.context_dim == 768
                else write_sdxl_clips(base / "models" / "text_encoders"))
        graphs.append({"name": name + (f" ({args.flux_size})" if size else ""), "unet": unet,
                       "clip": clip, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                       "channels": stand_in.latent_shape[0], "targets": all_linear(model)})
    rows = [measure(base, g, which, args) for g in graphs for which in ("native", "ours")]
    from tests.comfyui.test_families import comfy_version

    version = comfy_version()
    print(f"ComfyUI {version}, CPU, {args.resolution}px, batch 1, fp32, rank {args.rank}, every "
          f"Linear adapted; steps {args.steps[0]}→{args.steps[1]}; our gradient checkpointing "
          f"{args.checkpointing}")
    for g in graphs:
        print(f"{g['name']}: {g['params_m']:.1f} M parameters")
    print("| graph | trainer | s/step | RSS before (MB) | peak (MB) | added by training (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['graph']} | {r['trainer']} | failed: {r['error']} | | | |")
            continue
        print(f"| {r['graph']} | {r['trainer']} | {r['per_step']:.3f} | "
              f"{r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | {r['added_mb']:.0f} |")
    for g in graphs:
        pair = {r["trainer"]: r for r in rows if r["graph"] == g["name"]}
        if all("error" not in r for r in pair.values()):
            n, o = pair["native"], pair["ours"]
            print(f"{g['name']}: step time ours/native {o['per_step'] / n['per_step']:.2f}x "
                  f"(target <= 1.3x); peak RSS {o['peak_mb'] / n['peak_mb']:.2f}x, memory added "
                  f"by training {o['added_mb'] / max(n['added_mb'], 1e-9):.2f}x "
                  "(target <= 1.0x)")
    if args.json:
        args.json.write_text(json.dumps({"comfyui": version, "rows": rows,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
