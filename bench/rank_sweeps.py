"""Rank learning across the settings people use: step counts, learning rates, loss scales.

Each setting runs the fixed-rank front (ranks 2..32 at that setting), the default LoRA² and, for
step counts, AdaLoRA at LoRA²'s mean rank with its learning rate tuned over a grid; the table
gives each method's held-out loss relative to the fixed-rank front at its own file size, and the
Spearman correlation of exported ranks with the planted ones (planted components only).

    python bench/rank_sweeps.py --suite steps   # 150 / 600 / 1500 steps
    python bench/rank_sweeps.py --suite lr      # 5e-5 .. 5e-3, fixed ranks at the same lr
    python bench/rank_sweeps.py --suite scale   # inputs x10 / x0.1, loss units x100 / x0.01
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_recovery import (  # noqa: E402
    ADALORA_LRS,
    RESULTS,
    RunResult,
    RunSpec,
    best_adalora,
    check_point,
    load_jsonl,
    run_all,
    save_jsonl,
    summarize,
)

SWEEP_RANKS = (2, 4, 8, 16, 32)
SUITES = {
    "steps": [(task, {"steps": s}) for task in ("layers", "shapes") for s in (150, 600, 1500)],
    "lr": [(task, {"steps": 600, "lr": lr}) for task in ("layers", "shapes")
           for lr in (5e-5, 2e-4, 1e-3, 5e-3)],
    "scale": [(task, {"steps": 600}) for task in ("layers", "layers@in10", "layers@in0.1",
                                                  "layers@loss100", "layers@loss0.01")],
}


def specs_for(suite: str) -> list[RunSpec]:
    specs = [RunSpec("lora2-default", default=True)]
    if suite != "scale":
        specs = [RunSpec(f"fixed-r{r}", fixed_rank=r) for r in SWEEP_RANKS] + specs
    if suite == "steps":
        specs += [RunSpec(f"adalora-lr{lr:g}", adalora_target=0, lr=lr) for lr in ADALORA_LRS]
    return specs


def setting_label(task: str, kw: dict) -> str:
    return f"{task} " + " ".join(f"{k}={v:g}" for k, v in kw.items())


def row(label: str, results: list[RunResult]) -> dict:
    summ = summarize(results)
    d = next(v for v in summ.values() if v["default"])
    out = {"setting": label, "bytes": d["bytes"], "loss": d["loss"],
           "rho_planted": d["rho_planted"], "rho": d["rho"],
           "zero_max": max(x for r in d["runs"] for x, t in zip(r.learned, r.true) if t == 0)}
    fixed = [(v["bytes"], v["loss"]) for v in summ.values() if v["kind"] == "fixed"]
    if fixed:
        out["ratio"] = check_point(fixed, d["bytes"], d["loss"])[1]
        ada = best_adalora(summ, fixed)
        if ada:
            name, v, ratio = ada
            out.update(ada_name=name, ada_bytes=v["bytes"], ada_ratio=ratio,
                       ada_rho_planted=v["rho_planted"])
    return out


def markdown(suite: str, rows: list[dict], meta: dict) -> str:
    L = [f"# Rank learning across settings: `{suite}`", ""]
    L += [f"- {k}: {v}" for k, v in meta.items()]
    L += ["", "| setting | LoRA² bytes | loss / front | Spearman planted | planted-0 max rank | "
          "AdaLoRA (best lr) bytes | AdaLoRA loss / front | AdaLoRA Spearman planted |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        ada = (f"{r['ada_bytes']:,.0f} ({r['ada_name']}) | {r['ada_ratio']:.2f} | "
               f"{r['ada_rho_planted']:.3f}") if "ada_name" in r else "- | - | -"
        L.append(f"| {r['setting']} | {r['bytes']:,.0f} | {ratio} | {r['rho_planted']:.3f} | "
                 f"{r['zero_max']} | {ada} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: 0 1 2 for scale, 0 otherwise")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--load", help="make the table from this .jsonl instead of running")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the suite")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="steps suite: only these step counts")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="lr suite: only these learning rates")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or ([0, 1, 2] if args.suite == "scale" else [0])
    jsonl = Path(args.out) / f"rank_sweeps_{args.suite}.jsonl"
    rows, t0 = [], time.perf_counter()
    saved = load_jsonl([args.load]) if args.load else []
    settings = [(t, kw) for t, kw in SUITES[args.suite]
                if (not args.tasks or t in args.tasks)
                and (not args.steps or args.suite != "steps" or kw["steps"] in args.steps)
                and (not args.lrs or args.suite != "lr" or kw["lr"] in args.lrs)]
    for task, kw in settings:
        label = setting_label(task, kw)
        if args.load:
            results = [r for r in saved if r.config.get("setting") == label]
        else:
            results = run_all(task, seeds, specs_for(args.suite), kw, args.jobs)
            for r in results:
                r.config["setting"] = label
            save_jsonl(results, jsonl)
        rows.append(row(label, results))
        print(json.dumps(rows[-1], default=str), flush=True)
    meta = {"command": "python bench/rank_sweeps.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
            "seeds": seeds, "wall time": f"{time.perf_counter() - t0:.0f} s",
            "per-run records": jsonl.name,
            "note": "planted-0 max rank: the largest exported rank of a component with nothing "
                    "planted (r_target is 1)"}
    text = markdown(args.suite, rows, meta)
    (Path(args.out) / f"rank_sweeps_{args.suite}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
