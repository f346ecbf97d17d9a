"""AdaLoRA (PEFT's implementation) as a baseline of the rank-recovery benchmark.

AdaLoRA parametrises ``Delta W = P diag(E) Q`` and prunes singular-value triplets by a smoothed
sensitivity score down to a global budget of ``target_r`` per module on a cubic schedule
(Zhang et al., ICLR 2023). Here it runs through PEFT as its docs say (``update_and_allocate``
every step, after ``optimizer.step()``), with its orthogonality term added explicitly because
our tasks' outputs carry no ``.loss``. Its final triplets are exported into the same kind of file
as LoRA²'s, so bytes, ranks and the held-out loss are measured the same way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lora2_engine.formats.lora_file import LoraFile, ModuleWeights, write_lora
from lora2_engine.trainer import collate


def orthogonality(model: torch.nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser: mean over P, Q of ``||P P^T - I||_F`` (PEFT's own formula)."""
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and p.requires_grad:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0]), "fro"))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def adalora_config(task, target_r: int, init_r: int, steps: int):
    from peft import AdaLoraConfig

    return AdaLoraConfig(target_modules=list(task.targets), init_r=init_r, target_r=target_r,
                         tinit=int(0.1 * steps), tfinal=int(0.2 * steps), deltaT=1,
                         total_step=steps, lora_alpha=init_r, lora_dropout=0.0,
                         orth_reg_weight=0.5)


@torch.no_grad()
def exported(model: torch.nn.Module, task) -> LoraFile:
    """The surviving triplets of every module as plain LoRA factors (alpha = rank: scale 1)."""
    from rank_recovery import file_key_of

    modules = {}
    for name in task.targets:
        layer = model.get_submodule(name)
        a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
        keep = e[:, 0] != 0
        if not bool(keep.any()):
            continue
        scale = layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)
        down = (a * e)[keep] * scale  # (r, n)
        up = b[:, keep]  # (m, r)
        modules[file_key_of(name)] = ModuleWeights(down.float().clone(), up.float().clone(),
                                                   float(down.shape[0]))
    if not modules:
        name = task.targets[0]
        lin = model.get_submodule(name).base_layer
        modules[file_key_of(name)] = ModuleWeights(torch.zeros(1, lin.in_features),
                                                   torch.zeros(lin.out_features, 1), 1.0)
    return LoraFile(modules, "kohya", {"lora2.baseline": "adalora"})


def run_adalora(task, spec, seed: int, path: Path):
    """Train AdaLoRA on ``task`` and measure its exported file like every other run."""
    from peft import get_peft_model
    from rank_recovery import (
        RunResult,
        file_bytes,
        file_ranks,
        held_out_from_file,
        spearman,
    )

    over = dict(spec.overrides)
    steps, lr = task.steps, spec.lr or task.lr
    target_r = max(1, round(spec.adalora_target))
    init_r = int(over.get("init_r", max(target_r + 1, math.ceil(1.5 * target_r))))
    torch.manual_seed(seed)
    model = task.model()
    peft_model = get_peft_model(model, adalora_config(task, target_r, init_r, steps))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = task.make_loss(model)  # PEFT swapped the layers in place: this is the model
    data = task.dataset()
    bs = task.batch_size if len(data) > 1 else 1
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.empty(0, dtype=torch.long), 0
    t0 = time.perf_counter()
    for step in range(steps):
        items = []
        for _ in range(bs):
            if pos >= len(order):
                order, pos = torch.randperm(len(data), generator=gen), 0
            items.append(data[int(order[pos])])
            pos += 1
        loss = loss_fn(collate(items), gen) + 0.5 * orthogonality(model)
        loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    lora = exported(model, task)
    write_lora(lora, path)
    size = file_bytes(path)
    learned = file_ranks(task, lora)
    loss = held_out_from_file(task, lora)
    nparams = sum(w.rank * (w.up.shape[0] + w.down.shape[1]) for w in lora.modules.values())
    cfg = {"adalora": {"target_r": target_r, "init_r": init_r, "tinit": int(0.1 * steps),
                       "tfinal": int(0.2 * steps), "orth_reg_weight": 0.5},
           "train": {"steps": steps, "lr": lr}}
    return RunResult(task.name, spec.name, "adalora", seed, size.total, size.payload, nparams,
                     loss, spearman(learned, task.true_ranks), learned, list(task.true_ranks),
                     wall, spec.default, cfg)
