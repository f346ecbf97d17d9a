"""Rank-recovery benchmark: does LoRA² learn the rank a layer needs, and is it worth its bytes?

Two synthetic tasks with a *known* per-layer answer, trained through the engine's public API
(``attach`` / ``AdapterConfig`` / ``TrainConfig`` / ``Trainer`` / ``EntropyCapture`` /
``export_adapters`` / ``read_lora`` / ``schedule``):

``layers``  24 frozen random 96x96 ``nn.Linear`` layers; the target adds a planted ``Delta W*``
            of known rank (0..48) to each; loss = output MSE on fresh Gaussian inputs.
``unet``    the tiny SDXL-shaped UNet (``models.tiny.build_unet("sdxl")``); a teacher copy gets
            planted low-rank ``Delta W*`` on chosen attention projections (ranks 0..32); the
            student trains at the noise levels of the training loss (``noised_input``: sigma
            uniform in the schedule, as ``schedule.denoising_loss``) with cross-attention
            entropy, and regresses onto the teacher's noise prediction at the same input.

Every run exports its adapter with ``export_adapters``; its size is read from the file on disk.
Each run prints bytes, held-out loss, Spearman(learned rank, true rank) and wall time; the
table goes to ``bench/results/rank_recovery_<task>.md`` and a picture (loss vs bytes, learned
vs true rank) to ``bench/results/rank_recovery_<task>.png``.

    python bench/rank_recovery.py --task layers --seeds 0 1 2
    python bench/rank_recovery.py --task unet --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora2_engine import AdapterConfig, ExportConfig, TrainConfig, attach, preset  # noqa: E402
from lora2_engine.formats import export_adapters, read_lora  # noqa: E402
from lora2_engine.layer import dense_cap  # noqa: E402
from lora2_engine.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from recovery_tasks import (  # noqa: E402, F401  (re-exported: the tests use rr.LayersTask)
    LAYER_TASKS,
    LayersTask,
    LinearBank,
    Task,
    UNetTask,
    make_task,
)

RESULTS = ROOT / "bench" / "results"
FIXED_RANKS = (1, 2, 4, 8, 16, 32, 64)


# -- measuring ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSize:
    """Size of a safetensors file as read from disk: total, tensor payload and header."""

    total: int
    header: int
    payload: int


def file_bytes(path: str | os.PathLike) -> FileSize:
    """Bytes of the exported file, measured from the file itself (not from the adapters).

    ``total`` is the size on disk; the safetensors layout (8-byte little-endian header length,
    JSON header, tensor data) splits it into ``header`` (8 + JSON, metadata included) and
    ``payload`` (the tensor bytes).
    """
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return FileSize(total, 8 + n, total - 8 - n)


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties (Pearson of the rank vectors)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra, rb = _average_ranks(list(a)), _average_ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


# -- run specifications ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: fixed-rank LoRA, a LoRA² preset with overrides, or AdaLoRA."""

    name: str
    fixed_rank: int | None = None
    preset: str = "spread"
    init: str = "kaiming"
    overrides: tuple[tuple[str, Any], ...] = ()
    default: bool = False
    lr: float | None = None  # this run's base learning rate, if not the task's
    export_tol: float | None = None  # LoRA²: ExportConfig.rank_tol (None: the engine default)
    slot_init: str = "random"  # fixed rank: "gradient" is the LoRA-GA-like variant
    adalora_target: float | None = None  # AdaLoRA: mean final rank (its target_r)

    @property
    def kind(self) -> str:
        if self.adalora_target is not None:
            return "adalora"
        return "fixed" if self.fixed_rank is not None else "lora2"


@dataclass
class RunResult:
    task: str
    name: str
    kind: str
    seed: int
    file_bytes: int
    payload_bytes: int
    params: int
    loss: float
    spearman: float
    learned: list[int]  # rank per component in the exported file (0: module omitted)
    true: list[int]
    wall_s: float
    default: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    trained: list[int] = field(default_factory=list)  # LoRA²: the training rank D per component


# -- running -----------------------------------------------------------------------------------
def configs_for(task: Task, spec: RunSpec) -> tuple[AdapterConfig, TrainConfig]:
    """The configs of one run: fixed-rank runs share the task's optimizer settings."""
    base = {"steps": task.steps, "lr": spec.lr or task.lr,
            "batch_size": task.batch_size if len(task.dataset()) > 1 else 1}
    if spec.fixed_rank is not None:
        return (AdapterConfig(targets=task.targets, r_max=max(64, spec.fixed_rank)),
                TrainConfig(**base, lambda_r=0.0, lambda_e=0.0))
    kw = dict(task.scale.get(spec.preset, {}))
    kw.update(base)
    kw.update(init=spec.init, targets=task.targets)
    kw.update({k: (base["lr"] if v == "lr" else v) for k, v in spec.overrides})
    return preset(spec.preset, **kw)


def file_key_of(name: str) -> str:
    """The key prefix a component gets in the exported (kohya-style) file."""
    from lora2_engine.formats.keys import OTHER, file_key

    return file_key(name, "kohya", OTHER)


@torch.no_grad()
def held_out_from_file(task: Task, lora) -> float:
    """The task's held-out loss of its frozen model with the *file's* updates added: what a
    user gets, after export (rank truncation, dtype), not the training adapters."""
    model = task.model()
    for name in task.targets:
        w = lora.modules.get(file_key_of(name))
        if w is not None:
            lin = model.get_submodule(name)
            lin.weight += w.delta().reshape(lin.weight.shape).to(lin.weight)
    return task.held_out(model)


def file_ranks(task: Task, lora) -> list[int]:
    return [lora.modules[k].rank if (k := file_key_of(n)) in lora.modules else 0
            for n in task.targets]


def _shapes(model: torch.nn.Module, names: Sequence[str]) -> list[tuple[int, int]]:
    return [tuple(model.get_submodule(n).weight.shape[:2]) for n in names]


def run_one(task: Task, spec: RunSpec, seed: int, out_dir: Path) -> RunResult:
    torch.manual_seed(seed)
    path = out_dir / f"{task.name}_{spec.name}_s{seed}.safetensors"
    if spec.kind == "adalora":
        from adalora_baseline import run_adalora

        return run_adalora(task, spec, seed, path)
    model = task.model()
    shapes = _shapes(model, task.targets)
    a_cfg, t_cfg = configs_for(task, spec)
    t_cfg.seed = seed
    t0 = time.perf_counter()
    if spec.fixed_rank is not None:
        adapters = attach(model, a_cfg, fixed_rank=spec.fixed_rank, seed=seed,
                          slot_init=spec.slot_init)
        export = ExportConfig(rank_tol=0.0)
    else:
        adapters = attach(model, a_cfg, seed=seed)
        export = ExportConfig() if spec.export_tol is None else ExportConfig(
            rank_tol=spec.export_tol)
    entropy = task.entropy(model)
    try:
        trainer = Trainer(adapters, task.make_loss(model), task.dataset(), t_cfg, entropy=entropy)
        trainer.run()
        wall = time.perf_counter() - t0
        export_adapters(adapters, path, export)
        trained = [adapters.ranks()[n] for n in task.targets]
    finally:
        if entropy is not None:
            entropy.remove()
        adapters.detach()
    size = file_bytes(path)
    lora = read_lora(path)
    learned = file_ranks(task, lora)
    loss = held_out_from_file(task, lora)
    params = sum(w.rank * (w.up.shape[0] + w.down.flatten(1).shape[1])
                 for w in lora.modules.values())
    rho = spearman(learned, task.true_ranks)
    cfg = {"adapter": {k: getattr(a_cfg, k) for k in ("r_target", "init_rank", "r_max", "init",
                                                      "slot_init")},
           "train": {k: getattr(t_cfg, k) for k in ("steps", "lr", "nu_lr", "lambda_r",
                                                     "lambda_e", "task_norm", "nu_signal")},
           "export_tol": export.rank_tol,
           "caps": [dense_cap(*shape) for shape in shapes]}
    return RunResult(task.name, spec.name, spec.kind, seed, size.total, size.payload, params,
                     loss, rho, learned, list(task.true_ranks), wall, spec.default, cfg, trained)


ADALORA_LRS = (2e-3, 1e-2, 3e-2)  # its learning rate, tuned per task over this grid


def default_specs(task_name: str, fixed_lrs: Sequence[float] = (),
                  adalora_lrs: Sequence[float] = ADALORA_LRS) -> list[RunSpec]:
    """Fixed ranks, LoRA² (default and paper presets, ablations of each new mechanism) and
    AdaLoRA at the default LoRA² run's mean rank (``adalora_target=0``: matched per seed)."""
    specs = [RunSpec(f"fixed-r{r}", fixed_rank=r) for r in FIXED_RANKS]
    specs += [RunSpec(f"fixed-r{r}-lr{lr:g}", fixed_rank=r, lr=lr)
              for lr in fixed_lrs for r in FIXED_RANKS]
    specs += [RunSpec("lora2-default", default=True),
              RunSpec("lora2-paper-preset", preset="paper"),
              RunSpec("ablate-no-reg", overrides=(("lambda_r", 0.0),)),
              RunSpec("ablate-random-slots", overrides=(("slot_init", "random"),)),
              RunSpec("ablate-raw-nu-signal", overrides=(("nu_signal", "raw"),
                                                         ("lambda_r", 3e-4))),
              RunSpec("ablate-export-rank-D", export_tol=0.0),
              RunSpec("variant-slot-norm-each", overrides=(("slot_norm", "each"),))]
    if task_name == "unet":  # the layer tasks have no attention, so no entropy term to remove
        specs.append(RunSpec("ablate-no-entropy", overrides=(("lambda_e", 0.0),)))
    specs += [RunSpec(f"adalora-lr{lr:g}", adalora_target=0, lr=lr) for lr in adalora_lrs]
    return specs


# -- many runs -----------------------------------------------------------------------------------
_TASKS: dict[tuple[str, int], Task] = {}


def _job(args: tuple[str, int, RunSpec, dict[str, Any], str]) -> RunResult:
    task_name, seed, spec, task_kw, out_dir = args
    torch.set_num_threads(1)
    key = (task_name, seed, tuple(sorted(task_kw.items())))  # steps/lr change the task
    if key not in _TASKS:
        _TASKS.clear()  # one task in memory per worker
        _TASKS[key] = make_task(task_name, seed, **task_kw)
    return run_one(_TASKS[key], spec, seed, Path(out_dir))


def run_all(task_name: str, seeds: Sequence[int], specs: Sequence[RunSpec],
            task_kw: dict[str, Any], jobs: int = 1,
            log: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every spec on every seed (seed-major, so a worker builds each task once).

    AdaLoRA specs with ``adalora_target=0`` run in a second phase at the mean exported rank of
    the same seed's default LoRA² run, so the two are compared at (about) equal bytes.
    """
    first = [s for s in specs if s.adalora_target != 0]
    second = [s for s in specs if s.adalora_target == 0]
    with tempfile.TemporaryDirectory() as tmp:
        results = _run_work([(task_name, s, spec, task_kw, tmp) for s in seeds for spec in first],
                            jobs, log)
        matched = {r.seed: _mean(r.learned) for r in results if r.default}
        work = [(task_name, s, dataclasses.replace(spec, adalora_target=matched.get(s, 8.0)),
                 task_kw, tmp) for s in seeds for spec in second]
        results += _run_work(work, jobs, log)
    order = {(s, spec.name): i for i, (s, spec) in enumerate(
        (s, spec) for spec_list in (first, second) for s in seeds for spec in spec_list)}
    return sorted(results, key=lambda r: order[(r.seed, r.name)])


def _run_work(work: list, jobs: int, log) -> list[RunResult]:
    results: list[RunResult] = []
    if jobs <= 1:
        for w in work:
            results.append(_job(w))
            if log:
                log(results[-1])
        return results
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=None) as pool:
        for r in pool.imap_unordered(_job, work, chunksize=1):
            results.append(r)
            if log:
                log(r)
    return results


# -- summaries, targets, table, picture ----------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _sd(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """Per run name: mean bytes / loss / Spearman / wall over seeds, in first-seen order."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        out.setdefault(r.name, {"kind": r.kind, "default": r.default, "runs": []})["runs"].append(r)
    for s in out.values():
        runs = s["runs"]
        s.update(bytes=_mean([r.file_bytes for r in runs]),
                 payload=_mean([r.payload_bytes for r in runs]),
                 params=_mean([r.params for r in runs]),
                 loss=_mean([r.loss for r in runs]), loss_sd=_sd([r.loss for r in runs]),
                 rho=_mean([r.spearman for r in runs]),
                 rho_min=min(r.spearman for r in runs), wall=_mean([r.wall_s for r in runs]),
                 rho_planted=_mean([planted_spearman(r) for r in runs]),
                 mean_rank=_mean([_mean(r.learned) for r in runs]), n=len(runs))
    return out


def planted_spearman(r: RunResult) -> float:
    """Spearman over the components with a planted update only (true rank > 0)."""
    pairs = [(lr, t) for lr, t in zip(r.learned, r.true) if t > 0]
    return spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 1 else math.nan


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(bytes, loss)`` points that no other point beats on both (smaller and lower)."""
    front: list[tuple[float, float]] = []
    for b, lo in sorted(points):
        if not front or lo < front[-1][1]:
            front.append((b, lo))
    return front


def front_loss(fixed: Sequence[tuple[float, float]], nbytes: float) -> float:
    """Loss of the fixed-rank front at ``nbytes``: log-log interpolation between neighbours.

    ``fixed`` is ``(bytes, loss)`` per fixed-rank run (several learning rates allowed); the front
    is their Pareto front, so a larger rank that did worse never props it up. Beyond the
    measured range the front is the nearest end point (a flat extension, favouring fixed ranks).
    """
    pts = pareto(fixed)
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if b0 <= nbytes <= b1:
            w = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp((1 - w) * math.log(l0) + w * math.log(l1))
    return pts[-1][1]


def check_point(fixed: Sequence[tuple[float, float]], nbytes: float, loss: float
                ) -> tuple[bool, float, list[str]]:
    """Is ``(nbytes, loss)`` on or below the front? Returns (ok, loss / front, dominating)."""
    dominating = [f"{b:.0f} B / {lo:.3g}" for b, lo in fixed if b <= nbytes and lo <= loss]
    ratio = loss / front_loss(fixed, nbytes)
    return not dominating and ratio <= 1.0, ratio, dominating


def targets_report(results: Sequence[RunResult], rho_min: float = 0.8) -> tuple[list[str], bool]:
    """Check the two targets for the default LoRA² config, per seed and on the means."""
    lines, ok_all = [], True
    seeds = sorted({r.seed for r in results})
    default = [r for r in results if r.default]
    if not default:
        return ["no default LoRA² run in these results"], False
    for s in seeds:
        fixed = [(r.file_bytes, r.loss) for r in results if r.kind == "fixed" and r.seed == s]
        for d in (r for r in default if r.seed == s):
            ok, ratio, dom = check_point(fixed, d.file_bytes, d.loss) if fixed else (
                False, float("nan"), ["no fixed-rank runs"])
            good_rho = d.spearman >= rho_min
            ok_all &= ok and good_rho
            lines.append(f"seed {s}: {d.name} {d.file_bytes:,} B, loss {d.loss:.3g} = "
                         f"{ratio:.2f} x front ({'on/below' if ok else 'ABOVE'} the front"
                         + (f"; dominated by {', '.join(dom)}" if dom else "")
                         + f"); Spearman {d.spearman:.3f} ({'>=' if good_rho else '<'} "
                         f"{rho_min})")
    lines += calibration_lines(default)
    summ = summarize(results)
    fixed_mean = [(v["bytes"], v["loss"]) for v in summ.values() if v["kind"] == "fixed"]
    d = next(v for v in summ.values() if v["default"])
    if fixed_mean:
        ok, ratio, dom = check_point(fixed_mean, d["bytes"], d["loss"])
        lines.append(f"mean over seeds: {d['bytes']:,.0f} B, loss {d['loss']:.3g} = {ratio:.2f} "
                     f"x front ({'on/below' if ok else 'ABOVE'}); Spearman mean {d['rho']:.3f}, "
                     f"min {d['rho_min']:.3f}; over planted components {d['rho_planted']:.3f}")
        ada = best_adalora(summ, fixed_mean)
        if ada:
            name, v, a_ratio = ada
            lines.append(f"AdaLoRA (best lr: {name}) at its matched budget: {v['bytes']:,.0f} B, "
                         f"loss {v['loss']:.3g} = {a_ratio:.2f} x front; Spearman over planted "
                         f"{v['rho_planted']:.3f} -> LoRA² "
                         f"{'at or below' if ratio <= a_ratio else 'ABOVE'} AdaLoRA relative "
                         f"to the front ({ratio:.2f} vs {a_ratio:.2f}), "
                         f"{'better' if d['rho_planted'] > v['rho_planted'] else 'not better'} "
                         "rank ordering")
    return lines, ok_all


def calibration_lines(runs: Sequence[RunResult]) -> list[str]:
    """Issue #11's calibration targets over every component of ``runs``: a planted rank k > 0
    must end at k - 1 or more and at 1.5 k or less (k taken at the dense cap, (mn - 1) // (m + n),
    where it is above: 47 for 96 x 96), and nothing planted should end at 0."""
    low, high, zero, n = [], [], [], 0
    for r in runs:
        caps = r.config.get("caps") or [None] * len(r.true)
        for got, k, cap in zip(r.learned, r.true, caps):
            k_eff = min(k, cap) if cap else k
            if k == 0:
                zero += [got] if got > 0 else []
                continue
            n += 1
            if got < k_eff - 1:
                low.append(f"{k}->{got}")
            if got > 1.5 * k_eff:
                high.append(f"{k}->{got}")
    return [f"calibration over {n} planted components: {n - len(low) - len(high)} within "
            f"[planted - 1, 1.5 x planted]; below: {len(low)} ({', '.join(low[:8]) or '-'}); "
            f"above: {len(high)} ({', '.join(high[:8]) or '-'}); planted-0 components with a "
            f"rank in the file: {len(zero)} (max {max(zero, default=0)})"]


def best_adalora(summ: dict, fixed_mean) -> tuple[str, dict, float] | None:
    """The AdaLoRA row (lr of the grid) with the lowest loss relative to the fixed front."""
    rows = [(check_point(fixed_mean, v["bytes"], v["loss"])[1], k, v) for k, v in summ.items()
            if v["kind"] == "adalora"]
    if not rows:
        return None
    ratio, name, v = min(rows, key=lambda t: t[0])
    return name, v, ratio


def table(results: Sequence[RunResult], task: str, meta: dict[str, Any]) -> str:
    """The markdown the CLI prints and writes: summary, targets, every run, learned ranks."""
    summ = summarize(results)
    L = [f"# Rank recovery: `{task}`", ""]
    L += [f"- {v}" if k.startswith("note") else f"- {k}: {v}" for k, v in meta.items()]
    fixed_mean = [(v["bytes"], v["loss"]) for v in summ.values() if v["kind"] == "fixed"]
    L += ["", "| run | bytes (file) | tensor bytes | params | held-out loss | loss / front | "
          "Spearman (mean / min) | Spearman, planted only | mean rank | wall s | seeds |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in summ.items():
        tag = f"**{name}** (default)" if v["default"] else name
        rel = "-"
        if v["kind"] != "fixed" and fixed_mean:
            ok, ratio, _ = check_point(fixed_mean, v["bytes"], v["loss"])
            rel = f"{ratio:.2f}" + ("" if ok else " (above)")
        rho = ("n/a" if v["kind"] == "fixed" else f"{v['rho']:.3f} / {v['rho_min']:.3f}")
        rho_p = "n/a" if v["kind"] == "fixed" else f"{v['rho_planted']:.3f}"
        L.append(f"| {tag} | {v['bytes']:,.0f} | {v['payload']:,.0f} | {v['params']:,.0f} | "
                 f"{v['loss']:.3g} ± {v['loss_sd']:.2g} | {rel} | {rho} | {rho_p} | "
                 f"{v['mean_rank']:.1f} | {v['wall']:.1f} | {v['n']} |")
    L += ["", "Settings per run (presets as in `lora2_engine.config.PRESETS`, with the task's "
          "scale changes; fixed-rank runs are plain LoRA, no regulariser or entropy term):", "",
          "| run | r_target | init_rank | r_max | init | steps | lr | nu_lr | lambda_r | "
          "lambda_e | nu signal |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in summ.items():
        c = v["runs"][0].config
        a, t = c.get("adapter", {}), c.get("train", {})
        if v["kind"] == "fixed":
            L.append(f"| {name} | - | {v['runs'][0].learned[0]} (fixed) | - | - | "
                     f"{t.get('steps')} | {t.get('lr')} | - | 0 | 0 | - |")
        else:
            L.append(f"| {name} | {a.get('r_target')} | {a.get('init_rank')} | {a.get('r_max')} "
                     f"| {a.get('init')} | {t.get('steps')} | {t.get('lr')} | {t.get('nu_lr')} | "
                     f"{t.get('lambda_r')} | {t.get('lambda_e')} | {t.get('nu_signal')} |")
    lines, ok = targets_report(results)
    L += ["", f"Targets for the default LoRA² run ({'MET' if ok else 'NOT MET'}):", ""]
    L += [f"- {x}" for x in lines]
    L += ["", "Every run (bytes measured from the exported file with `os.stat`):", "",
          "| run | seed | bytes (file) | held-out loss | Spearman | wall s |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rho = "n/a" if r.kind == "fixed" else f"{r.spearman:.3f}"
        L.append(f"| {r.name} | {r.seed} | {r.file_bytes:,} | {r.loss:.3g} | {rho} | "
                 f"{r.wall_s:.1f} |")
    L += ["", "Learned ranks (component order of the task; true ranks first):", "", "```"]
    for s in sorted({r.seed for r in results}):
        first = next(r for r in results if r.seed == s)
        L.append(f"seed {s} true      {first.true}")
        for r in results:
            if r.seed == s and r.kind != "fixed":
                L.append(f"seed {s} {r.name:<22} {r.learned}")
    L += ["```", ""]
    return "\n".join(L)


def picture(results: Sequence[RunResult], task: str, path: Path) -> Path:
    """Loss vs bytes (fixed-rank front, LoRA² on top) and learned vs true rank per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(results)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    fixed = [(k, v) for k, v in summ.items() if v["kind"] == "fixed"]
    fixed.sort(key=lambda kv: kv[1]["bytes"])
    for _, v in fixed:
        ax.scatter([r.file_bytes for r in v["runs"]], [r.loss for r in v["runs"]], s=8,
                   color="0.6", zorder=1)
    front = pareto([(v["bytes"], v["loss"]) for _, v in fixed])
    ax.plot([b for b, _ in front], [lo for _, lo in front], "-", color="k", zorder=2,
            label="fixed-rank front (Pareto, means over seeds)")
    for k, v in fixed:
        other_lr = "-lr" in k
        ax.scatter([v["bytes"]], [v["loss"]], s=36, zorder=2, marker="o",
                   facecolor="white" if other_lr else "k", edgecolor="k")
        ax.annotate(k.replace("fixed-", ""), (v["bytes"], v["loss"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    markers = iter("*sD^vP<>Xhp")
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for k, v in summ.items():
        if v["kind"] == "fixed":
            continue
        c, m = next(colors), next(markers)
        ax.scatter([r.file_bytes for r in v["runs"]], [r.loss for r in v["runs"]], s=12,
                   color=c, marker=m, alpha=0.5, zorder=3)
        ax.scatter([v["bytes"]], [v["loss"]], s=160 if v["default"] else 70, color=c,
                   marker=m, edgecolor="k", zorder=4,
                   label=k + (" (default)" if v["default"] else ""))
    ax.set(xscale="log", yscale="log", xlabel="exported file size (bytes, from disk)",
           ylabel="held-out loss", title=f"{task}: loss vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    top = 1
    fixed_mean = [(v["bytes"], v["loss"]) for v in summ.values() if v["kind"] == "fixed"]
    ada = best_adalora(summ, fixed_mean) if fixed_mean else None
    shown = [k for k, v in summ.items() if v["default"] or k == "lora2-paper-preset"]
    shown += [ada[0]] if ada else []
    for k, c in zip(shown, ("C0", "C3", "C2")):
        v = summ[k]
        xs = [t * (1 + 0.04 * (r.seed - 1)) for r in v["runs"] for t in r.true]
        ys = [lr for r in v["runs"] for lr in r.learned]
        top = max(top, *ys, *xs)
        bx.scatter(xs, ys, s=14, color=c, alpha=0.7,
                   label=f"{k}: Spearman over planted {v['rho_planted']:.2f}")
    line = [0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128][: 3 + int(math.log2(max(top, 2)))]
    bx.plot(line, line, ":", color="0.4", label="learned = planted")
    bx.plot(line, [1.5 * x for x in line], "--", color="0.7", lw=0.8,
            label="1.5 x planted / planted - 1 (calibration bounds)")
    bx.plot(line, [max(x - 1, 0) for x in line], "--", color="0.7", lw=0.8)
    bx.set_xscale("symlog", linthresh=1)
    bx.set_yscale("symlog", linthresh=1)
    bx.set(xlabel="planted rank (log)", ylabel="rank in the exported file (log)",
           title=f"{task}: learned vs planted rank per component, all seeds")
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_jsonl(results: Sequence[RunResult], path: Path) -> None:
    with path.open("a") as fh:
        for r in results:
            fh.write(json.dumps(dataclasses.asdict(r)) + "\n")


def load_jsonl(paths: Sequence[str | os.PathLike]) -> list[RunResult]:
    return [RunResult(**json.loads(line)) for p in paths
            for line in Path(p).read_text().splitlines() if line.strip()]


def write_outputs(results: Sequence[RunResult], task: str, meta: dict[str, Any],
                  out: Path) -> str:
    text = table(results, task, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_recovery_{task}.md").write_text(text)
    picture(results, task, out / f"rank_recovery_{task}.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True,
                    help=f"unet or one of {sorted(LAYER_TASKS)}, optionally with @in<scale> / "
                         "@loss<scale> (e.g. layers@in10)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="*", help="run names to keep (default: all)")
    ap.add_argument("--steps", type=int, help="override the task's steps")
    ap.add_argument("--lr", type=float, help="override the task's base learning rate")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes (1 thread each)")
    ap.add_argument("--device", default="cpu", help="unet task only: cpu or cuda")
    ap.add_argument("--jsonl", help="also append every run's record to this file")
    ap.add_argument("--load", nargs="*", help="make the table/picture from saved .jsonl files")
    ap.add_argument("--out", default=str(RESULTS), help="where the .md and .png go")
    ap.add_argument("--note", action="append", default=[], help="a line for the .md header")
    ap.add_argument("--fixed-lr", type=float, action="append", default=[],
                    help="also run every fixed rank at this base learning rate")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cmd = "python bench/rank_recovery.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.load:
        results = [r for r in load_jsonl(args.load) if r.task == args.task]
        meta = {"made with": f"python bench/rank_recovery.py --task {args.task} --load "
                             f"{' '.join(Path(p).name for p in args.load)}"}
        meta.update({f"note {i + 1}": n for i, n in enumerate(args.note)})
        print(write_outputs(results, args.task, meta, Path(args.out)))
        return 0
    task_kw: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("lr", args.lr))
                               if v is not None}
    if args.task == "unet" and args.device != "cpu":
        task_kw["device"] = args.device
    specs = [s for s in default_specs(args.task, args.fixed_lr)
             if not args.runs or s.name in args.runs]
    t0 = time.perf_counter()

    def log(r: RunResult) -> None:
        rho = "" if r.kind == "fixed" else f" Spearman {r.spearman:.3f}"
        print(f"[{time.perf_counter() - t0:6.0f}s] seed {r.seed} {r.name:<24} "
              f"{r.file_bytes:>9,} B  loss {r.loss:.3g}{rho}  ({r.wall_s:.1f} s)", flush=True)
        if args.jsonl:
            save_jsonl([r], Path(args.jsonl))

    results = run_all(args.task, args.seeds, specs, task_kw, args.jobs, log)
    total = time.perf_counter() - t0
    meta = {"command": cmd,
            "threads": f"torch.set_num_threads(1) in each of {args.jobs} process(es)",
            "device": args.device, "total wall time": f"{total:.0f} s",
            "torch": torch.__version__}
    meta.update({f"note {i + 1}": n for i, n in enumerate(args.note)})
    print(write_outputs(results, args.task, meta, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
