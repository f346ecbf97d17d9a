"""Size-budget benchmark: compress and merge real LoRAs of the tiny SDXL at equal bytes.

Sources (trained here through the public API on ``bench/rank_recovery.py``'s ``UNetTask``: a
tiny SDXL student distils a teacher with planted low-rank updates on 32 attention projections):

``lora2``      a LoRA² adapter (the ``paper`` preset at the task's scale: r_target 16);
``fixed-r32``  plain fixed-rank LoRA, rank 32;   ``fixed-r64``  rank 64.

Compression to 10 / 25 / 50 % of each source's file bytes, every method landing at or below
the same byte budget (bytes measured from the serialised file: header and metadata included):

``joint``          ours (``lora2_engine.compress``): ranks chosen jointly over the file;
``uniform``        one rank for every module, the largest that fits;
``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``  our re-implementation of sd-scripts' per-module
                   rules (``bench/sd_scripts_resize.py``), threshold bisected to the budget.

Reported: total relative Delta W error (Frobenius, over the file) and the denoising loss of the
tiny UNet with the result applied (the task's held-out loss: MSE to the teacher's prediction).

Merges of 2 and 3 sources: PEFT's ``add_weighted_adapter`` (``svd``, ``ties_svd``,
``dare_linear_svd``; one rank for all modules) against ``merge_loras`` (``linear``, ``ties``,
``dare``) at PEFT's bytes; each error is against that tool's own un-truncated merged Delta W
(PEFT's is captured from its ``merge_utils`` call).

    python bench/budget.py            # ~4-6 min on one CPU thread
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sd_scripts_resize as sd  # noqa: E402
from rank_recovery import RunSpec, UNetTask, configs_for  # noqa: E402

from lora2_engine import attach  # noqa: E402
from lora2_engine.budget import Budget, total_rel_error  # noqa: E402
from lora2_engine.compress import build, compress, module_spectra, serialize  # noqa: E402
from lora2_engine.formats import export_adapters, read_lora  # noqa: E402
from lora2_engine.merging import merge_loras  # noqa: E402
from lora2_engine.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FRACTIONS = (0.10, 0.25, 0.50)
METHODS = ("joint", "uniform", *sd.METHODS)
DENSITY = 0.5


# -- sources -------------------------------------------------------------------------------------
def train_source(task: UNetTask, spec: RunSpec, lr: float, folder: Path):
    """Train one adapter on the task and read its exported file back (bytes from disk)."""
    model = task.model()
    a_cfg, t_cfg = configs_for(task, spec)
    t_cfg.lr = lr
    ad = (attach(model, a_cfg, fixed_rank=spec.fixed_rank) if spec.fixed_rank
          else attach(model, a_cfg))
    entropy = task.entropy(model) if spec.fixed_rank is None else None
    try:
        Trainer(ad, task.make_loss(model), task.dataset(), t_cfg, entropy=entropy).run()
        path = export_adapters(ad, folder / f"{spec.name}.safetensors")
    finally:
        if entropy is not None:
            entropy.remove()
        ad.detach()
    return read_lora(path)


class Evaluator:
    """The task's held-out loss with a LoRA's Delta W added to the frozen UNet (then removed)."""

    def __init__(self, task: UNetTask) -> None:
        self.task, self.model = task, task.model()

    @torch.no_grad()
    def loss(self, lora) -> float:
        names = {r["key"]: n for n, r in (lora.lora2_modules() or {}).items()}
        saved = {}
        for key, w in lora.modules.items():
            lin = self.model.get_submodule(names[key])
            saved[key] = lin.weight.clone()
            lin.weight += w.delta().reshape(lin.weight.shape)
        try:
            return self.task.held_out(self.model)
        finally:
            for key, weight in saved.items():
                self.model.get_submodule(names[key]).weight.copy_(weight)


# -- compression ---------------------------------------------------------------------------------
_SIZES: dict[tuple, int] = {}


def size_at(lora, spectra, ranks) -> int:
    """Bytes of the file with these ranks (zero tensors of the right shapes: same size)."""
    key = (id(lora), tuple(ranks[k] for k in spectra))
    if key not in _SIZES:
        _SIZES[key] = len(serialize(build(lora, spectra, ranks, torch.float32,
                                          Budget.of_bytes(1), {"method": "baseline"},
                                          placeholder=True)))
    return _SIZES[key]


def baseline_ranks(method: str, lora, spectra, budget: int) -> dict[str, int]:
    sv = {k: s.s for k, s in spectra.items()}
    top = max(len(s) for s in sv.values())
    if method == "uniform":
        best = {k: 1 for k in sv}
        for r in range(1, top + 1):
            ranks = {k: min(r, len(s)) for k, s in sv.items()}
            if size_at(lora, spectra, ranks) > budget:
                break
            best = ranks
        return best
    t = sd.tune_threshold(method, lambda p: size_at(lora, spectra, sd.ranks_for(sv, method, p)),
                          budget)
    return sd.ranks_for(sv, method, t)


def compress_rows(name: str, lora, ev: Evaluator) -> list[dict]:
    spectra = module_spectra(lora)
    sv = {k: s.s for k, s in spectra.items()}
    full = len(serialize(lora))
    rows = [{"source": name, "fraction": 1.0, "method": "source", "budget": full,
             "bytes": full, "error": 0.0, "loss": ev.loss(lora),
             "ranks": sorted(lora.ranks().values())}]
    for frac in FRACTIONS:
        budget = int(frac * full)
        for method in METHODS:
            if method == "joint":
                res = compress(lora, Budget.of_bytes(budget), torch.float32)
                out, nbytes = res.lora, res.file_bytes
                ranks = {r.key: r.rank for r in res.rows}
            else:
                ranks = baseline_ranks(method, lora, spectra, budget)
                out = build(lora, spectra, ranks, torch.float32, Budget.of_bytes(budget),
                            {"method": method})
                nbytes = len(serialize(out))
            rows.append({"source": name, "fraction": frac, "method": method, "budget": budget,
                         "bytes": nbytes, "error": total_rel_error(sv, ranks),
                         "loss": ev.loss(out), "ranks": sorted(ranks.values())})
            print(f"  {name:<10} {frac:>4.0%} {method:<13} {nbytes:>9,} B "
                  f"({nbytes / budget:6.1%})  error {rows[-1]['error']:.4f}  "
                  f"loss {rows[-1]['loss']:.4f}", flush=True)
    return rows


# -- merging against PEFT ------------------------------------------------------------------------
@contextlib.contextmanager
def capture_peft_merges():
    """Record the merged Delta W PEFT computes before its SVD (one per module, in order)."""
    import peft.tuners.lora.model as pm

    seen: list[torch.Tensor] = []
    names = ("task_arithmetic", "ties", "dare_linear")
    originals = {n: getattr(pm, n) for n in names}

    def wrap(fn):
        def inner(*a, **k):
            out = fn(*a, **k)
            seen.append(out.detach().double().clone())
            return out
        return inner

    for n in names:
        setattr(pm, n, wrap(originals[n]))
    try:
        yield seen
    finally:
        for n, fn in originals.items():
            setattr(pm, n, fn)


def peft_merge(loras, weights, combination: str, rank: int, seed: int):
    """PEFT add_weighted_adapter on Linear stand-ins with the sources' shapes and factors."""
    from peft import LoraConfig, get_peft_model

    keys = list(loras[0].modules)
    tags = {k: f"m_{i:02d}" for i, k in enumerate(keys)}
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleDict({
        tags[k]: torch.nn.Linear(w.down.flatten(1).shape[1], w.up.shape[0], bias=False)
        for k, w in loras[0].modules.items()})
    model = None
    for i, lora in enumerate(loras):
        ranks = {tags[k]: w.rank for k, w in lora.modules.items()}
        alphas = {tags[k]: w.rank * w.scale for k, w in lora.modules.items()}
        cfg = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()),
                         target_modules=list(tags.values()), rank_pattern=ranks,
                         alpha_pattern=alphas)
        if model is None:
            model = get_peft_model(net, cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
        for k, w in lora.modules.items():
            layer = model.base_model.model.layers[tags[k]]
            layer.lora_A[f"a{i}"].weight.data = w.down.flatten(1).float().clone()
            layer.lora_B[f"a{i}"].weight.data = w.up.flatten(1).float().clone()
    torch.manual_seed(seed)
    with capture_peft_merges() as exact:
        model.add_weighted_adapter([f"a{i}" for i in range(len(loras))], list(weights),
                                   "merged", combination_type=combination, svd_rank=rank,
                                   density=None if combination == "svd" else DENSITY)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "merged" in m.lora_A]
    got = [m.get_delta_weight("merged").detach().double() for m in layers]
    err = sum(float((g - e).square().sum()) for g, e in zip(got, exact))
    total = sum(float(e.square().sum()) for e in exact)
    return (err / total) ** 0.5


def merge_rows(sources: dict, names: list[str], rank: int) -> list[dict]:
    loras = [sources[n] for n in names]
    weights = [1.0 / len(loras)] * len(loras)
    template = loras[0]
    spectra = module_spectra(template)
    uniform = {k: min(rank, s.m, s.n) for k, s in spectra.items()}
    peft_bytes = size_at(template, spectra, uniform)  # PEFT's result written as our LoRA file
    rows = []
    for peft_name, ours in (("svd", "linear"), ("ties_svd", "ties"),
                            ("dare_linear_svd", "dare")):
        peft_err = peft_merge(loras, weights, peft_name, rank, seed=0)
        res = merge_loras(loras, weights, ours, Budget.of_bytes(peft_bytes), density=DENSITY,
                          seed=0, dtype=torch.float32)
        rows.append({"sources": "+".join(names), "rank": rank, "peft": peft_name,
                     "ours": ours, "bytes_peft": peft_bytes, "bytes_ours": res.file_bytes,
                     "error_peft": peft_err, "error_ours": res.total_rel_error})
        print(f"  merge {rows[-1]['sources']:<26} r{rank:<3} {peft_name:<16} "
              f"{peft_err:.4f} vs {ours:<6} {res.total_rel_error:.4f} "
              f"({res.file_bytes:,} / {peft_bytes:,} B)", flush=True)
    return rows


# -- output --------------------------------------------------------------------------------------
def markdown(rows, merges, meta) -> str:
    L = ["# Size budgets: compress and merge at equal bytes", ""]
    L += [f"- {k}: {v}" for k, v in meta.items()]
    L += ["", "## Compression (bytes of the serialised file; lower error/loss is better)", "",
          "| source | budget | method | bytes (of budget) | total rel. Delta W error | "
          "denoising loss | ranks min/median/max |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        rk = r["ranks"]
        frac = "100% (source)" if r["method"] == "source" else f"{r['fraction']:.0%}"
        best = ""
        if r["method"] != "source":
            same = [x for x in rows if x["source"] == r["source"] and
                    x["fraction"] == r["fraction"] and x["method"] != "source"]
            best = " **(best)**" if r["error"] <= min(x["error"] for x in same) else ""
        L.append(f"| {r['source']} | {frac} | {r['method']} | {r['bytes']:,} "
                 f"({r['bytes'] / r['budget']:.1%}) | {r['error']:.4f}{best} | "
                 f"{r['loss']:.4f} | {rk[0]}/{rk[len(rk) // 2]}/{rk[-1]} |")
    L += ["", "## Merging (equal weights; error against each tool's own un-truncated merge)", "",
          "| sources | PEFT svd_rank | PEFT method | PEFT error | ours | our error | "
          "bytes ours / PEFT's |", "|---|---:|---|---:|---|---:|---:|"]
    for m in merges:
        L.append(f"| {m['sources']} | {m['rank']} | {m['peft']} | {m['error_peft']:.4f} | "
                 f"{m['ours']} | {m['error_ours']:.4f} | {m['bytes_ours']:,} / "
                 f"{m['bytes_peft']:,} |")
    return "\n".join(L) + "\n"


def picture(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(2, len(sources), figsize=(4.2 * len(sources), 7), squeeze=False)
    for j, src in enumerate(sources):
        base = next(r for r in rows if r["source"] == src and r["method"] == "source")
        for method, marker in zip(METHODS, "o^svD"):
            pts = [r for r in rows if r["source"] == src and r["method"] == method]
            x = [r["fraction"] * 100 for r in pts]
            axes[0][j].plot(x, [r["error"] for r in pts], marker=marker, label=method,
                            lw=2.5 if method == "joint" else 1)
            axes[1][j].plot(x, [r["loss"] for r in pts], marker=marker, label=method,
                            lw=2.5 if method == "joint" else 1)
        axes[1][j].axhline(base["loss"], color="k", ls=":", label="uncompressed")
        axes[0][j].set(title=f"{src}: Delta W error", xlabel="% of the source's bytes",
                       ylabel="total relative error")
        axes[1][j].set(title=f"{src}: denoising loss", xlabel="% of the source's bytes",
                       ylabel="held-out loss")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
            ax.set_xticks([f * 100 for f in FRACTIONS])
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = UNetTask(args.seed, steps=args.steps)
    specs = [(RunSpec("lora2", preset="paper"), task.lr),
             (RunSpec("fixed-r32", fixed_rank=32), 5e-4),
             (RunSpec("fixed-r64", fixed_rank=64), 5e-4)]
    sources = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec, lr in specs:
            sources[spec.name] = train_source(task, spec, lr, Path(tmp))
            print(f"[{time.perf_counter() - t0:5.0f}s] trained {spec.name}: ranks "
                  f"{sorted(sources[spec.name].ranks().values())}", flush=True)
        ev = Evaluator(task)
        rows = [r for name, lora in sources.items() for r in compress_rows(name, lora, ev)]
        merges = []
        for names in (["lora2", "fixed-r32"], ["lora2", "fixed-r32", "fixed-r64"]):
            for rank in (4, 16):
                merges += merge_rows(sources, names, rank)
    meta = {"command": "python bench/budget.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
            "task": f"bench/rank_recovery.py UNetTask(seed={args.seed}) (tiny SDXL, 32 attention "
                    f"projections, planted teacher), {args.steps} training steps per source; "
                    "LoRA² at the task's lr 2e-3 (preset 'paper' at task scale, entropy term on), "
                    "fixed ranks at lr 5e-4 (2e-3 diverges at r64)",
            "bytes": "len() of the serialised safetensors file (what is written to disk); all "
                     "results saved in float32",
            "density (TIES/DARE)": DENSITY,
            "threads": "torch.set_num_threads(1)",
            "total wall time": f"{time.perf_counter() - t0:.0f} s",
            "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, merges, meta)
    (out / "budget.md").write_text(text)
    (out / "budget.json").write_text(json.dumps({"compress": rows, "merge": merges}, indent=1))
    picture(rows, out / "budget.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
