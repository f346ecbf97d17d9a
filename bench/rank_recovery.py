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
import copy
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora2_engine import AdapterConfig, TrainConfig, attach, preset  # noqa: E402
from lora2_engine.formats import export_adapters, read_lora  # noqa: E402
from lora2_engine.objective import EntropyCapture, mse_target  # noqa: E402
from lora2_engine.trainer import Callbacks, Trainer  # noqa: E402

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


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (``cols <= rows``)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


# -- run specifications ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: a fixed-rank LoRA or a LoRA² preset/init with overrides."""

    name: str
    fixed_rank: int | None = None
    preset: str = "spread"
    init: str = "kaiming"
    overrides: tuple[tuple[str, Any], ...] = ()
    default: bool = False
    nu_warmup: int = 0  # a proposal, not an engine option: nu's lr is 0 for these steps
    lr: float | None = None  # this run's base learning rate, if not the task's


    @property
    def kind(self) -> str:
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
    learned: list[int]
    true: list[int]
    wall_s: float
    default: bool = False
    config: dict[str, Any] = field(default_factory=dict)


# -- the tasks ---------------------------------------------------------------------------------
class Task:
    """A model with frozen weights, a planted target, a loss and a held-out evaluation."""

    name: str
    targets: tuple[str, ...]  # module names the adapters attach to (the components)
    true_ranks: list[int]  # planted rank per component, in ``targets`` order
    steps: int
    lr: float
    batch_size: int
    scale: dict[str, dict[str, Any]]  # per preset: what this task changes, documented

    def model(self) -> nn.Module:
        raise NotImplementedError

    def make_loss(self, model: nn.Module) -> Callable[[dict, torch.Generator], torch.Tensor]:
        raise NotImplementedError

    def dataset(self) -> list[dict]:
        raise NotImplementedError

    @torch.no_grad()
    def held_out(self, model: nn.Module) -> float:
        raise NotImplementedError

    def entropy(self, model: nn.Module) -> EntropyCapture | None:
        return None


class ParallelLinears(nn.Module):
    """``n`` independent frozen ``Linear(dim, dim)`` layers ``l00..``; input (B, n, dim)."""

    def __init__(self, n: int, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for i in range(n):
            lin = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(dim, dim, generator=gen) / math.sqrt(dim))
            self.layers[f"l{i:02d}"] = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(self.layers.values())], 1)


LAYER_RANKS = (0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 36, 40, 44, 48)


class LayersTask(Task):
    """24 frozen random 96x96 layers; the target is ``(W + Delta W*) x`` with rank ``k_l``."""

    name = "layers"

    def __init__(self, seed: int, steps: int = 1000, lr: float = 2e-3, batch_size: int = 64,
                 dim: int = 96, ranks: Sequence[int] = LAYER_RANKS, sigma: float = 1.0) -> None:
        self.seed, self.steps, self.lr, self.batch_size = seed, steps, lr, batch_size
        self.dim, self.sigma = dim, sigma
        gen = torch.Generator().manual_seed(10_000 + seed)
        perm = torch.randperm(len(ranks), generator=gen).tolist()  # ranks not in name order
        self.true_ranks = [int(ranks[p]) for p in perm]
        self.targets = tuple(f"layers.l{i:02d}" for i in range(len(ranks)))
        self._base = ParallelLinears(len(ranks), dim, gen)
        self.weights = [lin.weight.detach().clone() for lin in self._base.layers.values()]
        self.deltas = []
        for k in self.true_ranks:  # Delta W* = sigma U V^T, flat spectrum: rank k exactly
            if k == 0:
                self.deltas.append(torch.zeros(dim, dim))
            else:
                self.deltas.append(sigma * orthonormal(dim, k, gen) @ orthonormal(dim, k, gen).T)
        eg = torch.Generator().manual_seed(20_000 + seed)
        self.x_eval = torch.randn(4096, len(ranks), dim, generator=eg)
        self.y_eval = self.teacher(self.x_eval)
        self.scale = {
            "spread": {"r_max": 64},
            "paper": {"r_max": 64, "r_target": 8, "init_rank": 8},
        }

    def model(self) -> nn.Module:
        return copy.deepcopy(self._base)

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, i] @ (w + d).T for i, (w, d) in
                            enumerate(zip(self.weights, self.deltas))], 1)

    def dataset(self) -> list[dict]:
        return [{"i": torch.tensor(0)}]  # inputs are drawn fresh in the loss

    def make_loss(self, model: nn.Module) -> Callable[[dict, torch.Generator], torch.Tensor]:
        n, dim, bs = len(self.targets), self.dim, self.batch_size

        def loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
            x = torch.randn(bs, n, dim, generator=gen)
            return mse_target(model(x), self.teacher(x))

        return loss

    @torch.no_grad()
    def held_out(self, model: nn.Module) -> float:
        return float(mse_target(model(self.x_eval), self.y_eval))


# -- running -----------------------------------------------------------------------------------
def configs_for(task: Task, spec: RunSpec) -> tuple[AdapterConfig, TrainConfig]:
    """The configs of one run: fixed-rank runs share the task's optimizer settings."""
    base = {"steps": task.steps, "lr": spec.lr or task.lr,
            "batch_size": task.batch_size if task.name == "unet" else 1}
    if spec.fixed_rank is not None:
        return (AdapterConfig(targets=task.targets, r_max=max(64, spec.fixed_rank)),
                TrainConfig(**base, lambda_r=0.0, lambda_e=0.0))
    kw = dict(task.scale.get(spec.preset, {}))
    kw.update(base)
    kw.update(init=spec.init, targets=task.targets)
    kw.update({k: (base["lr"] if v == "lr" else v) for k, v in spec.overrides})
    return preset(spec.preset, **kw)


def run_one(task: Task, spec: RunSpec, seed: int, out_dir: Path) -> RunResult:
    torch.manual_seed(seed)
    model = task.model()
    a_cfg, t_cfg = configs_for(task, spec)
    t_cfg.seed = seed
    t0 = time.perf_counter()
    if spec.fixed_rank is not None:
        adapters = attach(model, a_cfg, fixed_rank=spec.fixed_rank, seed=seed)
    else:
        adapters = attach(model, a_cfg, seed=seed)
    entropy = task.entropy(model)
    try:
        callbacks = None
        if spec.nu_warmup:  # through the public API: the "nu" param group's lr, then restored
            def restore(tr: Trainer, _rec: dict) -> None:
                if tr.step == spec.nu_warmup:
                    for g in tr.optimizer.param_groups:
                        if g.get("name") == "nu":
                            g["lr"] = t_cfg.nu_lr
            callbacks = Callbacks(on_step=restore)
        trainer = Trainer(adapters, task.make_loss(model), task.dataset(), t_cfg, entropy=entropy,
                          callbacks=callbacks)
        if spec.nu_warmup:
            for g in trainer.optimizer.param_groups:
                if g.get("name") == "nu":
                    g["lr"] = 0.0
        trainer.run()
        loss = task.held_out(model)
        wall = time.perf_counter() - t0
        path = out_dir / f"{task.name}_{spec.name}_s{seed}.safetensors"
        export_adapters(adapters, path)
        size = file_bytes(path)
        lora = read_lora(path)
        record = lora.lora2_modules()
        by_key = {rec["key"]: name for name, rec in record.items()}
        file_ranks = {by_key[k]: r for k, r in lora.ranks().items()}
        learned = [file_ranks[n] for n in task.targets]
        assert learned == [adapters.ranks()[n] for n in task.targets]
        params = adapters.num_parameters()
    finally:
        if entropy is not None:
            entropy.remove()
        adapters.detach()
    rho = spearman(learned, task.true_ranks)
    cfg = {"adapter": {k: getattr(a_cfg, k) for k in ("r_target", "init_rank", "r_max", "init")},
           "train": {k: getattr(t_cfg, k) for k in ("steps", "lr", "nu_lr", "lambda_r",
                                                     "lambda_e")},
           "nu_warmup": spec.nu_warmup}
    return RunResult(task.name, spec.name, spec.kind, seed, size.total, size.payload, params,
                     loss, rho, learned, list(task.true_ranks), wall, spec.default, cfg)


def default_specs(task_name: str, fixed_lrs: Sequence[float] = ()) -> list[RunSpec]:
    specs = [RunSpec(f"fixed-r{r}", fixed_rank=r) for r in FIXED_RANKS]
    specs += [RunSpec(f"fixed-r{r}-lr{lr:g}", fixed_rank=r, lr=lr)
              for lr in fixed_lrs for r in FIXED_RANKS]
    for p in ("spread", "paper"):
        for init in ("kaiming", "paper"):
            specs.append(RunSpec(f"lora2-{p}-{init}", preset=p, init=init,
                                 default=(p == "spread" and init == "kaiming")))
    specs.append(RunSpec("ablate-no-reg", overrides=(("lambda_r", 0.0),)))
    if task_name == "unet":  # the layers task has no attention, so no entropy term to remove
        specs.append(RunSpec("ablate-no-entropy", overrides=(("lambda_e", 0.0),)))
    specs.append(RunSpec("ablate-nu-lr=lr", overrides=(("nu_lr", "lr"),)))
    return specs


def make_task(name: str, seed: int, **kw: Any) -> Task:
    if name == "layers":
        return LayersTask(seed, **kw)
    if name == "unet":
        return UNetTask(seed, **kw)
    raise ValueError(f"unknown task {name!r}: choose layers or unet")


WORDS = ("a photo of sks dog cat vase red blue green small large wooden metal on the table "
         "in a garden at night sunny beach snow forest city street old new shiny soft bright "
         "dark portrait close up wide angle painting sketch").split()
UNET_BLOCKS = ("output_blocks.2.1", "output_blocks.3.1")  # level-1 decoder transformers
PROJ = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
PLANTED = ("to_v", "to_out.0")  # q/k of this random UNet barely move its output: kept at 0
UNET_RANKS = (0, 0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 32)  # over the 16 v/out
DIRECTION_WEIGHT = 1.0 / (96 * 24)  # loss of one planted direction in the layers task


def noised_input(schedule, x0: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's input and timestep at the noise levels the training loss draws
    (``schedule.denoising_loss``: sigma uniform in the schedule, then noise)."""
    from lora2_engine.schedule import sample_sigmas

    sigma = sample_sigmas(schedule, x0.shape[0], gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0)
    x_t = schedule.noise_scaling(sigma, noise, x0)
    return schedule.calculate_input(sigma, x_t), schedule.timestep(sigma).float()


class UNetTask(Task):
    """Tiny SDXL UNet student vs a teacher with planted low-rank updates on attention layers.

    Components: every attention projection of the level-1 decoder transformers (2 x depth 2
    blocks x 8 projections = 32). The 16 value/output projections get planted ranks 0..32;
    the 16 query/key projections are untouched (true rank 0). A planted ``Delta W* =
    U diag(s) V^T`` uses the top-k principal directions of the component's own input as ``V``
    (every direction is excited by the data, so the rank is identifiable) with ``s_i`` chosen so
    each direction adds the same energy to the layer's output; the whole update is then scaled
    so it changes the UNet's output by ``k * e_unit`` (MSE), i.e. loss is proportional to rank.
    The task loss is ``MSE(student, teacher) * kappa`` with ``kappa = DIRECTION_WEIGHT /
    e_unit``: one planted direction weighs what it weighs in the layers task, so ``lambda_r``
    and ``lambda_e`` mean the same thing in both tasks.
    """

    name = "unet"

    def __init__(self, seed: int, steps: int = 300, lr: float = 2e-3, batch_size: int = 2,
                 latent: int = 8, tokens: int = 8, n_train: int = 64, n_eval: int = 16,
                 ranks: Sequence[int] = UNET_RANKS, rel_unit: float = 1e-4,
                 device: str = "cpu") -> None:
        from lora2_engine.models.tiny import build_tiny, sdxl_adm
        from lora2_engine.schedule import DiscreteSchedule
        from lora2_engine.trainer import collate

        self.seed, self.steps, self.lr, self.batch_size = seed, steps, lr, batch_size
        self.latent, self.tokens = latent, tokens
        unet, text, _ = build_tiny("sdxl", seed=seed)
        self.device = torch.device(device)
        self._base = unet.requires_grad_(False).eval().to(self.device)
        text = text.to(self.device)
        self.targets = tuple(f"{b}.transformer_blocks.{d}.{p}"
                             for b in UNET_BLOCKS for d in range(2) for p in PROJ)
        gen = torch.Generator().manual_seed(30_000 + seed)

        def examples(n: int) -> list[dict]:
            out = []
            for _ in range(n):
                words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=gen)]
                ctx, pooled = text.encode([" ".join(words)])
                lat = torch.randn(4, latent, latent, generator=gen).to(self.device)
                out.append({"latents": lat, "context": ctx[0, :tokens].clone(),
                            "y": sdxl_adm(pooled, 8 * latent, 8 * latent)[0]})
            return out

        self.train = examples(n_train)
        self.schedule = DiscreteSchedule("eps")

        def noised(exs: list[dict], g: torch.Generator) -> dict:
            b = collate(exs)
            x_t, t = noised_input(self.schedule, b["latents"], g)
            return {"x_t": x_t, "t": t, "context": b["context"], "y": b["y"]}

        evals = examples(n_eval)
        self.eval_batch = noised(evals + evals, torch.Generator().manual_seed(40_000 + seed))
        calib = noised(self.train[:8], torch.Generator().manual_seed(45_000 + seed))
        planted = [i for i, n in enumerate(self.targets) if n.endswith(PLANTED)]
        perm = torch.randperm(len(planted), generator=gen).tolist()
        self.true_ranks = [0] * len(self.targets)
        for j, p in enumerate(perm):
            self.true_ranks[planted[p]] = int(ranks[j])
        self.teacher = copy.deepcopy(self._base)
        with torch.no_grad():
            base_out = self._predict(self._base, calib)
            self.e_unit = rel_unit * float(base_out.var())
            self._plant(gen, calib, base_out)
            self.y_eval = self._predict(self.teacher, self.eval_batch)
        self.kappa = DIRECTION_WEIGHT / self.e_unit
        self.scale = {
            "spread": {"r_max": 64},
            "paper": {"r_max": 64, "r_target": 16, "init_rank": 16},
        }

    @staticmethod
    def _predict(model: nn.Module, b: dict) -> torch.Tensor:
        return model(b["x_t"], b["t"], b["context"], b["y"])

    @torch.no_grad()
    def _inputs(self) -> dict[str, torch.Tensor]:
        """Inputs of every component on the (noised) training data."""
        from lora2_engine.trainer import collate

        seen: dict[str, list[torch.Tensor]] = {n: [] for n in self.targets}
        hooks = [self.teacher.get_submodule(n).register_forward_pre_hook(
            lambda _m, inp, n=n: seen[n].append(inp[0].reshape(-1, inp[0].shape[-1])))
            for n in self.targets]
        gen = torch.Generator().manual_seed(50_000 + self.seed)
        try:
            for i in range(0, len(self.train), 16):  # noise drawn on the CPU, as in training
                batch = collate(self.train[i:i + 16])
                x_t, t = noised_input(self.schedule, batch["latents"], gen)
                self.teacher(x_t, t, batch["context"], batch["y"])
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(v).double() for n, v in seen.items()}

    @torch.no_grad()
    def _plant(self, gen: torch.Generator, calib: dict, base_out: torch.Tensor) -> None:
        inputs = self._inputs()
        scaled: dict[str, torch.Tensor] = {}
        for name, k in zip(self.targets, self.true_ranks):
            if k == 0:
                continue
            lin = self.teacher.get_submodule(name)
            x, w = inputs[name], lin.weight.double()
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
            lam = s[:k] ** 2 / x.shape[0]  # mean squared input along each v_i
            u = orthonormal(w.shape[0], k, gen).double().to(x.device)
            delta = ((u / lam.sqrt()) @ vh[:k]).float()  # each direction: equal output energy
            original = lin.weight.clone()
            lin.weight += delta  # measured alone: the other updates are not in yet
            effect = float((self._predict(self.teacher, calib) - base_out).pow(2).mean())
            lin.weight.copy_(original)
            scaled[name] = math.sqrt(k * self.e_unit / effect) * delta  # MSE ~ scale^2
        for name, delta in scaled.items():
            self.teacher.get_submodule(name).weight += delta

    def model(self) -> nn.Module:
        return copy.deepcopy(self._base)

    def dataset(self) -> list[dict]:
        return self.train

    def entropy(self, model: nn.Module) -> EntropyCapture | None:
        return EntropyCapture(model)

    def make_loss(self, model: nn.Module) -> Callable[[dict, torch.Generator], torch.Tensor]:
        def student(x_t, t, b):
            return model(x_t, t, b["context"], b["y"])

        def teacher(x_t, t, b):
            return self.teacher(x_t, t, b["context"], b["y"])

        def loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
            x_t, t = noised_input(self.schedule, batch["latents"], gen)  # the loss's noise levels
            with torch.no_grad():
                target = teacher(x_t, t, batch)  # the teacher's noise prediction at x_t, t
            return self.kappa * mse_target(student(x_t, t, batch), target)

        return loss

    @torch.no_grad()
    def held_out(self, model: nn.Module) -> float:
        return self.kappa * float(mse_target(self._predict(model, self.eval_batch), self.y_eval))


# -- many runs -----------------------------------------------------------------------------------
_TASKS: dict[tuple[str, int], Task] = {}


def _job(args: tuple[str, int, RunSpec, dict[str, Any], str]) -> RunResult:
    task_name, seed, spec, task_kw, out_dir = args
    torch.set_num_threads(1)
    key = (task_name, seed)
    if key not in _TASKS:
        _TASKS.clear()  # one task in memory per worker
        _TASKS[key] = make_task(task_name, seed, **task_kw)
    return run_one(_TASKS[key], spec, seed, Path(out_dir))


def run_all(task_name: str, seeds: Sequence[int], specs: Sequence[RunSpec],
            task_kw: dict[str, Any], jobs: int = 1,
            log: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every spec on every seed (seed-major, so a worker builds each task once)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = [(task_name, s, spec, task_kw, tmp) for s in seeds for spec in specs]
        results: list[RunResult] = []
        if jobs <= 1:
            for w in work:
                results.append(_job(w))
                if log:
                    log(results[-1])
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(jobs, maxtasksperchild=None) as pool:
                for r in pool.imap_unordered(_job, work, chunksize=1):
                    results.append(r)
                    if log:
                        log(r)
        order = {(s, spec.name): i for i, (_, s, spec, _, _) in enumerate(work)}
        return sorted(results, key=lambda r: order[(r.seed, r.name)])


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
    summ = summarize(results)
    fixed_mean = [(v["bytes"], v["loss"]) for v in summ.values() if v["kind"] == "fixed"]
    d = next(v for v in summ.values() if v["default"])
    if fixed_mean:
        ok, ratio, dom = check_point(fixed_mean, d["bytes"], d["loss"])
        lines.append(f"mean over seeds: {d['bytes']:,.0f} B, loss {d['loss']:.3g} = {ratio:.2f} "
                     f"x front ({'on/below' if ok else 'ABOVE'}); Spearman mean {d['rho']:.3f}, "
                     f"min {d['rho_min']:.3f}")
    return lines, ok_all


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
          "lambda_e | nu warm-up |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in summ.items():
        c = v["runs"][0].config
        a, t = c.get("adapter", {}), c.get("train", {})
        if v["kind"] == "fixed":
            L.append(f"| {name} | - | {v['runs'][0].learned[0]} (fixed) | - | - | "
                     f"{t.get('steps')} | {t.get('lr')} | - | 0 | 0 | - |")
        else:
            L.append(f"| {name} | {a.get('r_target')} | {a.get('init_rank')} | {a.get('r_max')} "
                     f"| {a.get('init')} | {t.get('steps')} | {t.get('lr')} | {t.get('nu_lr')} | "
                     f"{t.get('lambda_r')} | {t.get('lambda_e')} | {c.get('nu_warmup', 0)} |")
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
    for k, v in summ.items():
        if v["kind"] == "fixed":
            continue
        c = next(colors)
        if not (v["default"] or k.endswith("-paper") or "paper-kaiming" in k):
            continue
        xs = [t + 0.25 * (r.seed - 1) for r in v["runs"] for t in r.true]
        ys = [lr for r in v["runs"] for lr in r.learned]
        top = max(top, *ys, *xs)
        bx.scatter(xs, ys, s=14, color=c, alpha=0.7,
                   label=f"{k}: Spearman {v['rho']:.2f} (min {v['rho_min']:.2f})")
    bx.plot([0, top], [0, top], ":", color="0.5", label="learned = true")
    bx.set(xlabel="true (planted) rank", ylabel="learned rank (exported file)",
           title=f"{task}: learned vs true rank per component, all seeds")
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
    ap.add_argument("--task", choices=("layers", "unet"), required=True)
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
