"""One data-parallel training run of the tiny SD1.5 UNet, for tests/test_distributed.py.

Run it plainly (one process) or under ``torchrun`` (gloo on the CPU). Every process writes
``<out>/rank<R>.json`` (the ranks of every component after every step, and the history); the
main process writes ``<out>/adapter.safetensors`` (A, B and nu of the active slots). With
``--stop-at K`` the run stops after step K and process 0 writes its state to ``<out>/state``;
``--resume FILE`` continues one; ``--fsdp`` shards the frozen UNet over the processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora2_engine.config import AdapterConfig, TrainConfig  # noqa: E402
from lora2_engine.formats.io import save_tensors  # noqa: E402
from lora2_engine.inject import attach  # noqa: E402
from lora2_engine.models.loader import load_model  # noqa: E402
from lora2_engine.parallel import Parallel  # noqa: E402
from lora2_engine.schedule import denoising_loss  # noqa: E402
from lora2_engine.trainer import Callbacks, Trainer  # noqa: E402


def examples(n: int, model) -> list[dict]:
    """``n`` fixed examples (random latents, captions through the stand-in text encoder)."""
    g = torch.Generator().manual_seed(123)
    pixels = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    return model.encode(pixels, [f"a photo of sks thing {i}" for i in range(n)])


def configs(model, steps: int, batch_size: int) -> tuple[AdapterConfig, TrainConfig]:
    """Ranks that move both ways within a few steps (nu moves ~0.3 a step); growth makes
    pending slots, initialised from the (averaged) gradient."""
    a_cfg = AdapterConfig(init_rank=3, r_max=12, r_target=1.0,
                          targets=model.family.resolve_targets("attention"))
    t_cfg = TrainConfig(steps=steps, lr=3e-3, nu_lr=0.3, lambda_r=0.6, lambda_e=0.0,
                        batch_size=batch_size, seed=7)
    return a_cfg, t_cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--fsdp", action="store_true", help="shard the frozen UNet (FSDP2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    par = Parallel.from_env()
    out = Path(args.out)
    model = load_model("tiny-sd15")
    data = examples(5, model)
    a_cfg, t_cfg = configs(model, args.steps, args.batch_size)
    module = model.denoiser.module
    adapters = attach(module, a_cfg, seed=7)
    trained = {id(p) for p in adapters.factor_parameters() + adapters.nu_parameters()}
    if args.fsdp:
        par.fsdp = True
        par.shard_frozen(module, adapters.factor_parameters() + adapters.nu_parameters())
    # how much of the frozen weights this process holds (1: all of them; FSDP: its shard)
    frozen = [p for p in module.parameters() if id(p) not in trained]
    held = sum(getattr(p, "_local_tensor", p).numel() for p in frozen) / sum(
        p.numel() for p in frozen)
    per_step: list[dict] = []

    def on_step(trainer, rec):
        per_step.append({"step": rec["step"], "ranks": trainer.adapters.ranks(),
                         "pending": {n: la.pending for n, la in trainer.adapters.layers.items()},
                         "nus": trainer.adapters.nus()})

    trainer = Trainer(adapters, denoising_loss(model.denoiser), data, t_cfg,
                      checkpoint_path=out / "state.safetensors",
                      callbacks=Callbacks(on_step=on_step), parallel=par)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    trainer.run(args.stop_at or args.steps)
    if args.stop_at:
        trainer._save_if_possible()
    (out / f"rank{par.rank}.json").write_text(json.dumps(
        {"world": par.world, "held": held, "per_step": per_step, "history": trainer.history}))
    if par.is_main:
        save_tensors(out / "adapter.safetensors", adapters.state_dict(), {}, overwrite=True)


if __name__ == "__main__":
    main()
