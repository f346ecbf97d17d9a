"""Step time of our TrainAdaptiveLoRA vs ComfyUI's own TrainLoraNode, through a real server.

Both run on the same graph (tiny SD1.5-family checkpoint, the same subject images and prompt,
fp32, batch 1, no gradient checkpointing) at the same mean rank: TrainLoraNode at ``--rank``,
ours with ``init_rank = r_target = --rank`` (the final mean rank is printed). Each trainer runs
once to warm up (model load, encoding cached), then at two step counts; the per-step time is
the difference of the prompt times divided by the difference of steps, so loading, encoding
and saving cancel out. Needs COMFYUI_PATH / COMFYUI_PYTHON (see tests/comfyui/harness.py).

    python bench/comfy_vs_native.py [--resolution 128] [--rank 8] [--steps 4 24] [--repeat 2]
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

from tests.comfyui.conftest import CHECKPOINT, prepare_base  # noqa: E402
from tests.comfyui.harness import skip_reason, start_server  # noqa: E402
from tests.comfyui.tiny_checkpoint import write_tiny_sd15_checkpoint  # noqa: E402

PROMPT = "a photo of sks dog"
WIDE = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out"
TRAINERS = {  # name → (node, targets of ours, what is adapted)
    "native": ("TrainLoraNode", None, "every weight: LoRA on Linear/Conv, diffs on norms/biases"),
    "ours": ("TrainAdaptiveLoRA", "to_q,to_k,to_v,to_out.0", "attention q/k/v/out (default)"),
    "ours_wide": ("TrainAdaptiveLoRA", WIDE, "attention + feed-forward + proj_in/out"),
}


def defaults(info: dict) -> dict:
    """Every widget input of a node at its default (what a freshly added node holds)."""
    out = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list):
                out[name] = opts.get("default", spec[0][0] if spec[0] else None)
            elif "default" in opts:
                out[name] = opts["default"]
    return out


def graph(info: dict, which: str, steps: int, args) -> dict:
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoRA2_LoadSubjectImages", "inputs": {
            "folder": "bench", "instance_token": "sks", "class_noun": "dog",
            "resolution": args.resolution, "mode": "crop"}},
    }
    if which != "native":
        train = defaults(info["LoRA2_TrainAdaptiveLoRA"])
        train.update(model=["1", 0], clip=["1", 1], vae=["1", 2], subject=["2", 0],
                     steps=steps, learning_rate=args.lr, r_target=float(args.rank),
                     init_rank=args.rank, seed=0, filename="", preview_every=0,
                     targets=TRAINERS[which][1])
        api["3"] = {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": train}
        return api
    api["3"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 1], "vae": ["1", 2]}}
    api["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}}
    train = defaults(info["TrainLoraNode"])
    train.update(model=["1", 0], latents=["3", 0], positive=["4", 0], batch_size=1,
                 grad_accumulation_steps=1, steps=steps, learning_rate=args.lr,
                 rank=args.rank, seed=0, training_dtype="fp32", lora_dtype="fp32",
                 algorithm="LoRA", gradient_checkpointing=False)
    api["5"] = {"class_type": "TrainLoraNode", "inputs": train}
    old = "SaveLoRANode" in info  # 0.3.54: (MODEL, LORA_MODEL, LOSS_MAP, INT); 0.28: no MODEL
    save = "SaveLoRANode" if old else "SaveLoRA"
    api["6"] = {"class_type": save, "inputs": {"lora": ["5", 1 if old else 0],
                                               "prefix": "loras/bench_native"}}
    return api


def seconds(entry: dict) -> float:
    stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def mean_rank(entry: dict) -> float | None:
    for out in entry["outputs"].values():
        for text in out.get("text", []):
            m = re.search(r"mean ([\d.]+)\)", text)
            if m:
                return float(m.group(1))
    return None


def measure(server, info, which, args) -> dict:
    server.run(graph(info, which, 1, args), timeout=1800)  # warm-up: load, encode, cache
    lo, hi = args.steps
    times = {lo: [], hi: []}
    rank = None
    for _ in range(args.repeat):
        for n in (lo, hi):
            entry = server.run(graph(info, which, n, args), timeout=3600)
            times[n].append(seconds(entry))
            rank = args.rank if which == "native" else mean_rank(entry)
    t_lo, t_hi = min(times[lo]), min(times[hi])
    return {"trainer": which, "t_lo": t_lo, "t_hi": t_hi,
            "per_step": (t_hi - t_lo) / (hi - lo), "mean_rank": rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 24))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    base = Path(tempfile.mkdtemp(prefix="lora2-bench-"))
    ckpt = write_tiny_sd15_checkpoint(base / "ckpt" / CHECKPOINT)
    prepare_base(base / "comfy", ckpt)
    from tests.comfyui.conftest import write_subject

    write_subject(base / "comfy" / "input" / "bench", n=args.images,
                  size=(args.resolution, args.resolution))
    for txt in (base / "comfy" / "input" / "bench").glob("*.txt"):
        txt.unlink()  # one prompt for both trainers
    server = start_server(base / "comfy")
    try:
        info = server.object_info()
        version = server.request("/system_stats")["system"].get("comfyui_version", "?")
        rows = [measure(server, info, which, args) for which in TRAINERS]
    finally:
        server.stop()
    native = rows[0]
    lo, hi = args.steps
    print(f"ComfyUI {version}, CPU, tiny SD1.5-family UNet, {args.resolution}px, "
          f"{args.images} images, batch 1, fp32, rank {args.rank}; best of {args.repeat}")
    print(f"| trainer | adapted layers | mean rank | {lo} steps (s) | {hi} steps (s) "
          f"| s/step (vs native) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        node, _, layers = TRAINERS[r["trainer"]]
        r["ratio"] = r["per_step"] / native["per_step"]
        print(f"| {node} | {layers} | {r['mean_rank']} | {r['t_lo']:.2f} | "
              f"{r['t_hi']:.2f} | {r['per_step']:.3f} ({r['ratio']:.2f}x) |")
    ratio = rows[1]["ratio"]
    print(f"\nratio TrainAdaptiveLoRA / TrainLoraNode per step: {ratio:.2f}x (target <= 1.3x); "
          f"with feed-forward and proj layers too: {rows[2]['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"comfyui": version, "args": vars(args) | {
            "json": str(args.json)}, "rows": rows, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
