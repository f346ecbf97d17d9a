"""The ground-truth tasks of the rank-recovery benchmark: frozen models, planted updates of known
rank, a training loss and a held-out evaluation.

``LayersTask`` is a bank of independent frozen ``nn.Linear`` layers (any shapes); the target adds
a planted ``Delta W*`` of known rank to each, with a flat or decaying spectrum, trained on fresh
Gaussian inputs or on a finite noisy training set, in any input scale or loss unit. The named
configurations in :data:`LAYER_TASKS` differ in exactly those respects, so that defaults chosen
on some can be reported on the others. ``UNetTask`` plants updates in the tiny SDXL UNet and
trains with the real diffusion path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lora2_engine.objective import EntropyCapture, mse_target


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (``cols <= rows``)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


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


class LinearBank(nn.Module):
    """Independent frozen layers ``l00..``; ``forward`` takes and returns one tensor per layer."""

    def __init__(self, shapes: Sequence[tuple[int, int]], gen: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for i, (n_in, m_out) in enumerate(shapes):
            lin = nn.Linear(n_in, m_out, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(m_out, n_in, generator=gen) / math.sqrt(n_in))
            self.layers[f"l{i:02d}"] = lin

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [lin(x) for lin, x in zip(self.layers.values(), xs)]


def bank_mse(ys: Sequence[torch.Tensor], ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """MSE over every output element of every layer (layers of any width weigh per element)."""
    err = torch.stack([(y.float() - t.float()).pow(2).sum() for y, t in zip(ys, ts)]).sum()
    return err / sum(t.numel() for t in ts)


LAYER_RANKS = (0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 36, 40, 44, 48)


class LayersTask(Task):
    """A bank of frozen random layers; the target is ``(W + Delta W*) x`` with rank ``k_l``.

    ``shapes``: ``(in, out)`` per layer (default ``dim x dim`` for every planted rank).
    ``spectrum``: ``"flat"`` (every planted direction has singular value ``sigma``) or
    ``"decay"`` (geometric from ``sigma`` down to ``sigma / 4``: still exactly rank ``k``).
    ``n_train``: ``None`` draws fresh inputs every step; an integer fixes a training set of that
    size whose targets carry label noise of std ``noise`` (the held-out set is fresh and
    noise-free, so over-fitting shows). ``input_scale`` multiplies every input and
    ``loss_scale`` the training loss (a change of units): a scale-free method ranks the same.
    """

    def __init__(self, seed: int, steps: int = 1000, lr: float = 2e-3, batch_size: int = 64,
                 dim: int = 96, ranks: Sequence[int] = LAYER_RANKS, sigma: float = 1.0,
                 shapes: Sequence[tuple[int, int]] | None = None, spectrum: str = "flat",
                 n_train: int | None = None, noise: float = 0.0, input_scale: float = 1.0,
                 loss_scale: float = 1.0, name: str = "layers") -> None:
        self.name, self.seed, self.steps, self.lr = name, seed, steps, lr
        self.batch_size, self.dim, self.sigma = batch_size, dim, sigma
        self.input_scale, self.loss_scale = input_scale, loss_scale
        gen = torch.Generator().manual_seed(10_000 + seed)
        perm = torch.randperm(len(ranks), generator=gen).tolist()  # ranks not in name order
        self.true_ranks = [int(ranks[p]) for p in perm]
        self.shapes = [tuple(s) for s in shapes] if shapes else [(dim, dim)] * len(ranks)
        self.shapes = [self.shapes[p % len(self.shapes)] for p in range(len(ranks))]
        self.targets = tuple(f"layers.l{i:02d}" for i in range(len(ranks)))
        self._base = LinearBank(self.shapes, gen)
        self.weights = [lin.weight.detach().clone() for lin in self._base.layers.values()]
        self.deltas = []
        for (n_in, m_out), k in zip(self.shapes, self.true_ranks):
            if k == 0:
                self.deltas.append(torch.zeros(m_out, n_in))
                continue
            s = torch.full((k,), sigma) if spectrum == "flat" else (
                sigma * 0.25 ** (torch.arange(k) / max(k - 1, 1)))
            u, v = orthonormal(m_out, k, gen), orthonormal(n_in, k, gen)
            self.deltas.append((u * s) @ v.T)
        eg = torch.Generator().manual_seed(20_000 + seed)
        self.x_eval = self._inputs(4096, eg)
        self.y_eval = self.teacher(self.x_eval)
        self.train: list[dict] | None = None
        if n_train:
            tg = torch.Generator().manual_seed(25_000 + seed)
            xs = self._inputs(n_train, tg)
            ys = [y + noise * input_scale * torch.randn(y.shape, generator=tg)
                  for y in self.teacher(xs)]
            self.train = [{**{f"x{j}": x[i] for j, x in enumerate(xs)},
                           **{f"y{j}": y[i] for j, y in enumerate(ys)}} for i in range(n_train)]
        self.scale = {"spread": {"r_max": 64}, "paper": {"r_max": 64, "r_target": 8,
                                                          "init_rank": 8}}

    def _inputs(self, b: int, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(b, n_in, generator=gen) * self.input_scale for n_in, _ in self.shapes]

    def model(self) -> nn.Module:
        return copy.deepcopy(self._base)

    @torch.no_grad()
    def teacher(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x @ (w + d).T for x, w, d in zip(xs, self.weights, self.deltas)]

    def dataset(self) -> list[dict]:
        return self.train or [{"i": torch.tensor(0)}]  # fresh inputs are drawn in the loss

    def make_loss(self, model: nn.Module) -> Callable[[dict, torch.Generator], torch.Tensor]:
        n = len(self.targets)

        def loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
            if self.train is None:
                xs = self._inputs(self.batch_size, gen)
                ts = self.teacher(xs)
            else:
                xs = [batch[f"x{j}"] for j in range(n)]
                ts = [batch[f"y{j}"] for j in range(n)]
            return self.loss_scale * bank_mse(model(xs), ts)

        return loss

    @torch.no_grad()
    def held_out(self, model: nn.Module) -> float:
        """Error against the noise-free teacher on fresh inputs, in the task's own units."""
        return self.loss_scale * float(bank_mse(model(self.x_eval), self.y_eval))


SHAPES_MIXED = ((64, 160), (160, 64), (128, 128), (48, 192), (192, 48), (96, 96))
SHAPES_FINITE = ((80, 120), (120, 80), (100, 100), (64, 144))
# name -> LayersTask keyword arguments. "layers", "shapes" and "noisy" are where defaults are
# chosen; "finite", "unet" and the scaled variants are only ever reported (README: rank recovery).
LAYER_TASKS: dict[str, dict[str, Any]] = {
    "layers": {},
    "shapes": {"shapes": SHAPES_MIXED, "spectrum": "decay",
               "ranks": (0, 0, 1, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                         30, 32, 34, 36)},
    "noisy": {"n_train": 384, "noise": 0.2, "batch_size": 32,
              "ranks": (0, 0, 0, 1, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32)},
    "finite": {"shapes": SHAPES_FINITE, "spectrum": "decay", "n_train": 512, "noise": 0.3,
               "batch_size": 32,
               "ranks": (0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28)},
}


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


def make_task(name: str, seed: int, **kw: Any) -> Task:
    """A task by name: ``unet``, one of :data:`LAYER_TASKS`, optionally ``@in10``/``@in0.1``
    (inputs scaled) or ``@loss100``/``@loss0.01`` (loss units) appended, e.g. ``layers@in10``."""
    base, _, variant = name.partition("@")
    if base == "unet":
        return UNetTask(seed, **kw)
    if base not in LAYER_TASKS:
        raise ValueError(f"unknown task {name!r}: choose unet or one of {sorted(LAYER_TASKS)}")
    args = {**LAYER_TASKS[base], **kw, "name": name}
    if variant.startswith("in"):
        args["input_scale"] = float(variant[2:])
    elif variant.startswith("loss"):
        args["loss_scale"] = float(variant[4:])
    elif variant:
        raise ValueError(f"task variant {variant!r}: use in<scale> or loss<scale>")
    return LayersTask(seed, **args)
