"""The demo's planted-rank part: a teacher with updates of known rank, and the ranks LoRA² learns.

A copy of the tiny SDXL UNet (the teacher) gets low-rank updates ``Delta W*`` of known rank on
the value and output projections of two decoder transformers; their query and key projections
stay untouched (rank 0: in a random UNet they barely move the output). A student (the same
UNet) trains LoRA² adapters on all of them with the engine's public API (``preset``, ``attach``,
``Trainer``, ``EntropyCapture``) and the real diffusion noise, to predict the teacher's noise
on random latents and prompts. Each planted direction reads a direction its layer's input
really has and changes the UNet's output by the same amount, so the rank a component needs is
its planted rank: the demo draws planted against learned rank, and the rank map.

A smaller, faster version of ``bench/rank_recovery.py``'s ``UNetTask`` (same planting and loss
scale, fewer examples and steps); nothing here depends on which ranks come out.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

BLOCKS = ("output_blocks.2.1", "output_blocks.3.1")  # level-1 decoder transformers (depth 2)
PROJ = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
PLANTED = ("to_v", "to_out.0")
RANKS = (0, 0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 32)  # over the 16 v/out
DIRECTION_WEIGHT = 1.0 / (96 * 24)  # loss of one planted direction (bench/rank_recovery.py)
WORDS = ("a photo of sks dog cat vase red blue green small large wooden metal on the table "
         "in a garden at night sunny beach snow forest city street").split()
STEPS = 100  # ~0.4 s of one CPU thread each (tiny SDXL: 105 M weights, 8 x 8 latents)


@dataclass
class PlantedRun:
    """What the planted part learned, in component order."""

    names: list[str]
    planted: list[int]
    learned: list[int]
    history: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def spearman(self) -> float:
        return spearman(self.planted, self.learned)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else 0.0


def noised(x0: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``x_t`` and ``t`` as SD1.x/SDXL training draws them (DDPM, scaled-linear betas,
    1000 steps): only the inputs where teacher and student are compared."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).float()
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    a = alphas[t].view(-1, *[1] * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=gen)
    return {"x_t": a.sqrt() * x0 + (1 - a).sqrt() * noise, "t": t.float()}


class PlantedTask:
    """The teacher, the data and the loss (see the module docstring)."""

    def __init__(self, seed: int = 0, latent: int = 8, tokens: int = 8, n_train: int = 32,
                 rel_unit: float = 1e-4) -> None:
        from .models.tiny import build_tiny, sdxl_adm

        unet, text, _ = build_tiny("sdxl", seed=seed)
        self.unet = unet.requires_grad_(False).eval()
        self.names = [f"{b}.transformer_blocks.{d}.{p}" for b in BLOCKS for d in range(2)
                      for p in PROJ]
        gen = torch.Generator().manual_seed(30_000 + seed)
        self.examples = []
        for _ in range(n_train):
            words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=gen)]
            ctx, pooled = text.encode([" ".join(words)])
            self.examples.append({"latents": torch.randn(4, latent, latent, generator=gen),
                                  "context": ctx[0, :tokens].clone(),
                                  "y": sdxl_adm(pooled, 8 * latent, 8 * latent)[0]})
        planted = [i for i, n in enumerate(self.names) if n.endswith(PLANTED)]
        perm = torch.randperm(len(planted), generator=gen).tolist()
        self.planted = [0] * len(self.names)
        for j, p in enumerate(perm):
            self.planted[planted[p]] = RANKS[j % len(RANKS)]
        self.teacher = copy.deepcopy(self.unet)
        calib = self._noised(self.examples[:2], torch.Generator().manual_seed(45_000 + seed))
        with torch.no_grad():
            base = self._call(self.unet, calib)
            self.e_unit = rel_unit * float(base.var())
            self._plant(gen, calib, base, seed)
        self.kappa = DIRECTION_WEIGHT / self.e_unit  # one planted direction: a fixed loss

    def _noised(self, examples: list[dict], gen: torch.Generator) -> dict:
        from .trainer import collate

        b = collate(examples)
        return {**noised(b["latents"], gen), "context": b["context"], "y": b["y"]}

    @staticmethod
    def _call(model: torch.nn.Module, b: dict) -> torch.Tensor:
        return model(b["x_t"], b["t"], b["context"], b["y"])

    @torch.no_grad()
    def _plant(self, gen: torch.Generator, calib: dict, base: torch.Tensor, seed: int) -> None:
        """``Delta W* = U diag(s) V^T``: ``V`` the top principal directions of the layer's own
        input, ``s`` so every direction adds the same output energy, the whole update scaled so
        the UNet's output moves by ``k * e_unit`` (MSE): the loss grows with the rank."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        hooks = [self.teacher.get_submodule(n).register_forward_pre_hook(
            lambda _m, inp, n=n: seen[n].append(inp[0].reshape(-1, inp[0].shape[-1])))
            for n in self.names]
        try:
            self._call(self.teacher, self._noised(self.examples,
                                                  torch.Generator().manual_seed(50_000 + seed)))
        finally:
            for h in hooks:
                h.remove()
        scaled = {}
        for name, k in zip(self.names, self.planted):
            if k == 0:
                continue
            lin = self.teacher.get_submodule(name)
            x = torch.cat(seen[name]).double()
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
            lam = s[:k] ** 2 / x.shape[0]  # mean squared input along each direction
            q, r = torch.linalg.qr(torch.randn(lin.weight.shape[0], k, generator=gen,
                                               dtype=torch.float64))
            u = q * torch.sign(torch.diagonal(r))
            delta = ((u / lam.sqrt()) @ vh[:k]).float()
            lin.weight += delta  # its effect alone: the others are not in yet
            effect = float((self._call(self.teacher, calib) - base).pow(2).mean())
            lin.weight -= delta
            scaled[name] = math.sqrt(k * self.e_unit / effect) * delta
        for name, delta in scaled.items():
            self.teacher.get_submodule(name).weight += delta

    def loss(self, student: torch.nn.Module) -> Callable[[dict, torch.Generator], torch.Tensor]:
        """MSE between the student's and the teacher's noise prediction at the same
        ``x_t, t`` (SDXL's noise levels), times ``kappa``."""
        from .objective import mse_target

        def loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
            b = {**noised(batch["latents"], gen), "context": batch["context"], "y": batch["y"]}
            with torch.no_grad():
                target = self._call(self.teacher, b)
            return self.kappa * mse_target(self._call(student, b), target)

        return loss


def run_planted(out_dir: str | os.PathLike, name: str = "lora2_demo_planted",
                steps: int = STEPS, seed: int = 0, overwrite: bool = False,
                on_step=None, preset_name: str | None = None) -> PlantedRun:
    """Train LoRA² (the preset's defaults) against the planted teacher and write
    ``<name>.safetensors``, ``<name>.ranks.png`` (planted vs learned), ``<name>.rank_map.png``
    and ``<name>.json`` into ``out_dir`` (checked before training; never overwritten unless
    ``overwrite``)."""
    import json

    from .config import DEFAULT_PRESET, preset
    from .formats.io import atomic_write_bytes, check_can_create
    from .formats.lora_file import adapters_to_lora, lora_bytes
    from .inject import attach
    from .objective import EntropyCapture
    from .report import figure_png, rank_map_figure, report_from_file
    from .trainer import Callbacks, Trainer

    out = Path(out_dir)
    files = {kind: out / f"{name}{suffix}" for kind, suffix in (
        ("lora", ".safetensors"), ("plot", ".ranks.png"), ("map", ".rank_map.png"),
        ("json", ".json"))}
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        taken = [p for p in files.values() if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists: choose another --out or "
                                  "pass --overwrite")
    check_can_create(list(files.values()))
    task = PlantedTask(seed)
    adapter_cfg, train_cfg = preset(preset_name or DEFAULT_PRESET, targets=tuple(task.names),
                                    steps=steps, seed=seed, batch_size=2)
    student = copy.deepcopy(task.unet)
    adapters = attach(student, adapter_cfg, seed=seed)
    entropy = EntropyCapture(student)
    try:
        trainer = Trainer(adapters, task.loss(student), task.examples, train_cfg,
                          entropy=entropy, callbacks=Callbacks(on_step=on_step))
        history = trainer.run()
        lora = adapters_to_lora(adapters, extra_metadata={
            "lora2.name": name,
            "lora2.planted_ranks": json.dumps(dict(zip(task.names, task.planted)))})
        record = lora.lora2_modules()  # the ranks the file holds (what a user gets)
        learned = [int(record[n]["rank"]) for n in task.names]
        run = PlantedRun(task.names, task.planted, learned, history, files)
        report = report_from_file(lora)
        blobs = {
            files["lora"]: lora_bytes(lora),
            files["plot"]: figure_png(planted_figure(run)),
            files["map"]: figure_png(rank_map_figure(report, f"{name}: learned rank per "
                                                             "component")),
            files["json"]: json.dumps({
                "components": [{"name": n, "planted": p, "learned": lr} for n, p, lr in
                               zip(task.names, task.planted, learned)],
                "spearman": run.spearman, "steps": steps, "preset": preset_name or
                DEFAULT_PRESET}, indent=1).encode()}
    finally:
        entropy.remove()
        adapters.detach()
    for path, data in blobs.items():
        atomic_write_bytes(path, data, overwrite=overwrite)
    return run


def planted_figure(run: PlantedRun, title: str = "planted rank vs learned rank"):
    """Bars per component: the planted rank (grey) and the learned rank (colour), in the
    teacher's order, plus the scatter of one against the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import block_and_kind

    labels = [" ".join(block_and_kind(n)) for n in run.names]
    order = sorted(range(len(run.names)), key=lambda i: (run.planted[i], run.learned[i]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2),
                                 gridspec_kw={"width_ratios": [3, 1.2]})
    x = torch.arange(len(order)).tolist()
    ax.bar([i - 0.2 for i in x], [run.planted[i] for i in order], 0.4, color="0.6",
           label="planted")
    ax.bar([i + 0.2 for i in x], [run.learned[i] for i in order], 0.4, color="C0",
           label="learned")
    ax.set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    bx.scatter(run.planted, run.learned, s=18, color="C0")
    top = max(run.planted + run.learned + [1])
    bx.plot([0, top], [0, top], color="0.7", lw=0.8, ls="--")
    bx.set_xlabel("planted rank")
    bx.set_ylabel("learned rank")
    bx.set_title(f"Spearman {run.spearman:.2f}", fontsize=10)
    fig.tight_layout()
    return fig
