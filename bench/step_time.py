"""Step time, memory and file size: LoRA² vs fixed-rank LoRA vs the frozen model, one run.

Tiny SDXL-shaped UNet (105.7 M params, the real SDXL attention names), latents 1x4x32x32
(256 px), default targets (q, k, v, out of attn1 and attn2: 168 components). The three
variants are timed interleaved (frozen, fixed, LoRA², frozen, …) so machine noise hits all
alike; medians are reported with ratios. Run alone: threads oversubscribe otherwise.

    python bench/step_time.py [--steps 20] [--threads 2] [--latent 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora2_engine import AdapterConfig, TrainConfig, attach  # noqa: E402
from lora2_engine.denoiser import ModuleDenoiser  # noqa: E402
from lora2_engine.families import get  # noqa: E402
from lora2_engine.formats.lora_file import export_adapters  # noqa: E402
from lora2_engine.models.loader import encoder  # noqa: E402
from lora2_engine.models.tiny import build_tiny, unet_config  # noqa: E402
from lora2_engine.objective import EntropyCapture  # noqa: E402
from lora2_engine.schedule import DiscreteSchedule, denoising_loss  # noqa: E402
from lora2_engine.trainer import Trainer  # noqa: E402

SDXL = get("sdxl")


def _examples(text, vae, latent: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, latent * 8, latent * 8, generator=g) for _ in range(n)]
    return encoder(vae, text, SDXL)(imgs, ["a photo of sks dog"] * n)


def _loss(model, schedule):
    return denoising_loss(ModuleDenoiser(model, schedule, SDXL.cond_keys))


def _state_bytes(trainer: Trainer) -> int:
    """Adapter parameters + their gradients + Adam moments, as allocated (capacity)."""
    params = trainer.adapters.factor_parameters() + trainer.adapters.nu_parameters()
    total = sum(p.numel() * p.element_size() * 2 for p in params)  # value + grad
    for st in trainer.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--init-rank", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    unet, text, vae = build_tiny("sdxl")
    data = _examples(text, vae, args.latent)
    schedule = DiscreteSchedule()
    cfg = TrainConfig(steps=10_000, lr=1e-4, nu_lr=1e-2, lambda_r=3e-4, lambda_e=1e-4)

    frozen = copy.deepcopy(unet).requires_grad_(False)
    frozen.input_blocks[0][0].weight.requires_grad_(True)  # backward through every layer
    frozen_loss = _loss(frozen, schedule)
    gen = torch.Generator().manual_seed(0)

    def frozen_step() -> None:
        frozen_loss({k: v[None] for k, v in data[0].items()}, gen).backward()

    lora2_model = copy.deepcopy(unet)
    ad2 = attach(lora2_model, AdapterConfig(r_target=1, init_rank=args.init_rank, r_max=512))
    tr2 = Trainer(ad2, _loss(lora2_model, schedule), data, cfg,
                  entropy=EntropyCapture(lora2_model))
    for _ in range(args.warmup):
        tr2.train_step()
    mean_rank = max(1, round(sum(ad2.ranks().values()) / len(ad2)))

    noent_model = copy.deepcopy(unet)
    ad0 = attach(noent_model, AdapterConfig(r_target=1, init_rank=args.init_rank, r_max=512))
    tr0 = Trainer(ad0, _loss(noent_model, schedule), data,
                  TrainConfig(**{**cfg.__dict__, "lambda_e": 0.0}))

    fixed_model = copy.deepcopy(unet)
    adf = attach(fixed_model, fixed_rank=mean_rank)
    trf = Trainer(adf, _loss(fixed_model, schedule), data, cfg)
    for _ in range(args.warmup):
        trf.train_step()
        tr0.train_step()
        frozen_step()

    steps = {"frozen fwd+bwd": frozen_step, "fixed LoRA step": trf.train_step,
             "LoRA² step": tr2.train_step, "LoRA² step, λ_e = 0 (no entropy)": tr0.train_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    with tempfile.TemporaryDirectory() as d:
        layout = SDXL.model_layout(unet_config(unet))
        path = export_adapters(ad2, Path(d) / "a.safetensors", layout=layout)
        raw = path.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        payload = len(raw) - 8 - header
    formula = 4 * sum(layer.rank * (layer.m + layer.n) for layer in ad2.layers.values())
    ranks = list(ad2.ranks().values())

    print(f"tiny SDXL UNet, latents 1x4x{args.latent}x{args.latent}, {len(ad2)} components, "
          f"{args.threads} threads, torch {torch.__version__}, {args.steps} interleaved steps\n")
    print("| variant | median step (s) | vs frozen | vs fixed LoRA |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['frozen fwd+bwd']:.2f}× | "
              f"{v / med['fixed LoRA step']:.2f}× |")
    print(f"\nLoRA² ranks {min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.2f}); "
          f"fixed LoRA rank {mean_rank}")
    print(f"adapter training state (params+grads+Adam): LoRA² {_state_bytes(tr2) / 1e6:.2f} MB, "
          f"fixed {_state_bytes(trf) / 1e6:.2f} MB; process max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")
    print(f"exported tensor bytes {payload:,} vs 4·ΣD(m+n) = {formula:,} "
          f"(+{payload - formula} B = {len(ad2)} fp32 alphas; "
          f"{100 * (payload - formula) / formula:.3f}%); header {header:,} B")


if __name__ == "__main__":
    main()
