"""Train to a size: LoRA² trained to 1/4, 1/2 and 1x the default run's file, vs fixed ranks.

On a ground-truth task of ``bench/recovery_tasks.py`` (default ``layers``: 24 frozen 96x96
layers with planted updates of rank 0..48, held-out loss against the noise-free teacher):

``default``          the default LoRA² run (preset ``spread`` at the task's scale, export at
                     numerical rank): its file's bytes ``S`` set the budgets;
``to-budget``        LoRA² trained with ``ExportConfig(size_mb=f * S)`` (``lora2_engine.sizing``:
                     ``r_target`` from the budget, the file spent on the learned updates'
                     strongest directions): the feature under test;
``default+compress`` the default run's trained adapter (all its learned directions) compressed
                     to the same budget after training (``compress``): no capacity from the
                     budget, the same joint allocation;
``fixed-r<k>``       plain LoRA of the largest uniform rank whose file fits the budget (equal or
                     fewer bytes), and ``front``: the fixed-rank loss interpolated (log-log) at
                     the budget's bytes between ranks k and k + 1 (``rank_recovery.front_loss``).

Every file is serialised as it would be written (float32, header included) and its bytes
counted; loss is the task's held-out loss with the file's ``Delta W`` added to the frozen model.

    python bench/train_budget.py    # 10 runs of 1000 steps: 773 s wall on one thread of the
                                    # shared 2-core machine (others running)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rank_recovery import (  # noqa: E402
    RunSpec,
    configs_for,
    file_ranks,
    front_loss,
    held_out_from_file,
    spearman,
)
from recovery_tasks import make_task  # noqa: E402

from lora2_engine import attach  # noqa: E402
from lora2_engine.budget import Budget  # noqa: E402
from lora2_engine.compress import compress  # noqa: E402
from lora2_engine.config import ExportConfig  # noqa: E402
from lora2_engine.formats.lora_file import adapters_to_lora, lora_bytes  # noqa: E402
from lora2_engine.sizing import capacity_config, check_budget, export_to_budget  # noqa: E402
from lora2_engine.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FRACTIONS = (0.25, 0.5, 1.0)


def row(task, name: str, lora, nbytes: int, budget: int | None, wall: float, **extra) -> dict:
    ranks = file_ranks(task, lora)
    return {"method": name, "budget": budget, "bytes": nbytes,
            "loss": held_out_from_file(task, lora), "ranks": ranks,
            "spearman": spearman(ranks, task.true_ranks), "wall_s": wall, **extra}


def train_lora2(task, export: ExportConfig, sized: bool):
    """One LoRA² run: (file-ready result, trained-rank LoRA, configs, wall seconds)."""
    model = task.model()
    a_cfg, t_cfg = configs_for(task, RunSpec("lora2-default", default=True))
    if sized:
        a_cfg = capacity_config(model, a_cfg, export)
    t0 = time.perf_counter()
    ad = attach(model, a_cfg, seed=t_cfg.seed)
    try:
        if sized:
            check_budget(ad, export, train_cfg=t_cfg, steps=t_cfg.steps)
        Trainer(ad, task.make_loss(model), task.dataset(), t_cfg,
                entropy=task.entropy(model)).run()
        out = export_to_budget(ad, export, train_cfg=t_cfg, steps=t_cfg.steps) if sized \
            else adapters_to_lora(ad, export, train_config=t_cfg, steps=t_cfg.steps)
        full = adapters_to_lora(ad, ExportConfig(rank_tol=0.0), train_config=t_cfg,
                                steps=t_cfg.steps)
    finally:
        ad.detach()
    return out, full, a_cfg, time.perf_counter() - t0


def fixed_bytes(task, rank: int) -> int:
    """The file bytes of a fixed-rank LoRA (untrained: the size does not depend on values)."""
    model = task.model()
    a_cfg, _ = configs_for(task, RunSpec(f"fixed-r{rank}", fixed_rank=rank))
    ad = attach(model, a_cfg, fixed_rank=rank)
    try:
        return len(lora_bytes(adapters_to_lora(ad, ExportConfig(rank_tol=0.0))))
    finally:
        ad.detach()


def train_fixed(task, rank: int):
    model = task.model()
    a_cfg, t_cfg = configs_for(task, RunSpec(f"fixed-r{rank}", fixed_rank=rank))
    t0 = time.perf_counter()
    ad = attach(model, a_cfg, fixed_rank=rank, seed=t_cfg.seed)
    try:
        Trainer(ad, task.make_loss(model), task.dataset(), t_cfg).run()
        lora = adapters_to_lora(ad, ExportConfig(rank_tol=0.0), train_config=t_cfg)
    finally:
        ad.detach()
    return lora, time.perf_counter() - t0


def markdown(rows: list[dict], meta: dict) -> str:
    L = ["# Train to a size: LoRA² at 1/4, 1/2 and 1x the default run's bytes", ""]
    L += [f"- {k}: {v}" for k, v in meta.items()]
    L += ["", "| budget | method | file bytes (of budget) | learned / budget | held-out loss | "
          "loss / fixed front | ranks min/median/max | Spearman vs planted | wall s |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rk = sorted(r["ranks"])
        b = r["budget"]
        frac = "-" if b is None else f"{r['fraction']:g}x ({b:,} B)"
        of = "" if b is None else f" ({r['bytes'] / b:.1%})"
        learned = f"{r['learned_bytes'] / b:.2f}" if r.get("learned_bytes") and b else "-"
        front = f"{r['loss'] / r['front']:.2f}" if r.get("front") else "-"
        rho = "n/a" if r["spearman"] != r["spearman"] else f"{r['spearman']:.3f}"
        L.append(f"| {frac} | {r['method']} | {r['bytes']:,}{of} | {learned} | {r['loss']:.4g} | "
                 f"{front} | {rk[0]}/{rk[len(rk) // 2]}/{rk[-1]} | {rho} | "
                 f"{r['wall_s']:.0f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="layers", help="a bench/recovery_tasks.py layer task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the task's")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = make_task(args.task, args.seed, **({"steps": args.steps} if args.steps else {}))
    default, default_full, _, wall = train_lora2(task, ExportConfig(), sized=False)
    size = len(lora_bytes(default))
    rows = [row(task, "default", default, size, None, wall, fraction=None)]
    print(f"[{time.perf_counter() - t0:4.0f}s] default: {size:,} B, loss {rows[0]['loss']:.4g}",
          flush=True)
    fixed: dict[int, tuple] = {}
    for frac in FRACTIONS:
        budget = int(frac * size)
        export = ExportConfig(size_mb=budget / 1e6)
        budget = int(export.budget.value)
        res, _, a_cfg, wall = train_lora2(task, export, sized=True)
        rows.append(row(task, "to-budget", res.lora, res.file_bytes, budget, wall, fraction=frac,
                        learned_bytes=res.source_bytes, r_target=a_cfg.r_target,
                        notes=res.notes))
        post = compress(default_full, Budget.of_bytes(budget), torch.float32)
        rows.append(row(task, "default+compress", post.lora, post.file_bytes, budget, 0.0,
                        fraction=frac, learned_bytes=len(lora_bytes(default_full))))
        k = 1
        while fixed_bytes(task, k + 1) <= budget:
            k += 1
        pts = []
        for r in (k, k + 1):
            if r not in fixed:
                fixed[r] = train_fixed(task, r)
            lora, w = fixed[r]
            pts.append((len(lora_bytes(lora)), held_out_from_file(task, lora)))
        lora, w = fixed[k]
        rows.append(row(task, f"fixed-r{k}", lora, pts[0][0], budget, w, fraction=frac))
        front = front_loss(pts, budget)
        for r in rows[-3:]:
            r["front"] = front
        for r in rows[-3:]:
            print(f"[{time.perf_counter() - t0:4.0f}s] {frac:g}x {r['method']:<17} "
                  f"{r['bytes']:>9,} B ({r['bytes'] / budget:6.1%}) loss {r['loss']:.4g} "
                  f"(front {front:.4g}) rho {r['spearman']:.3f}", flush=True)
    meta = {"command": "python bench/train_budget.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "task": f"bench/recovery_tasks.py {args.task} (seed {args.seed}, {task.steps} steps, "
                    f"lr {task.lr}); planted ranks {task.true_ranks}",
            "LoRA²": "preset 'spread' (the defaults) at the task's scale (r_max 64); to-budget "
                     "runs get r_target = init_rank = ceil(1.25 x the budget's uniform rank)",
            "bytes": "len() of the serialised safetensors file, float32, header included",
            "threads": "torch.set_num_threads(1); wall s per run measured in this one process "
                       "on a machine shared with other jobs: not a timing claim",
            "total wall time": f"{time.perf_counter() - t0:.0f} s",
            "torch": torch.__version__}
    text = markdown(rows, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_budget.md").write_text(text)
    (out / "train_budget.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
