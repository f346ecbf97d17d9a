"""The one training path of a diffusion run: examples → attach → loop → export → detach.

The CLI, the library and ComfyUI's TrainAdaptiveLoRA all call :func:`train_diffusion`. They
differ only in the denoiser they hand it (``denoiser.py``: ComfyUI's ``apply_model``, or a
module under the engine's schedule) and in what they do with the result. The adapter is
exported in memory; a file is written only when ``out_file`` is given, or, with ``run``
(:class:`runfiles.RunFiles`), as the run's complete set: adapter, rank report, rank map, loss
plot and configs, checked before training and published so that a kill leaves either the old
files or the whole new set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import sizing
from .checkpointing import checkpointed_blocks
from .compress import CompressResult
from .config import AdapterConfig, ExportConfig, TrainConfig, to_dict
from .families import Family, get
from .formats.io import atomic_write_bytes
from .formats.keys import UNetLayout
from .formats.lora_file import LoraFile, adapters_to_lora, lora_bytes
from .inject import attach
from .parallel import Parallel
from .precision import PrecisionConfig
from .report import report_from_file
from .runfiles import RunFiles
from .schedule import denoising_loss, euler_sample
from .trainer import Callbacks, Trainer


@dataclass
class TrainResult:
    """What a run learned: the LoRA (in memory; ``lora.path`` once written), the loss history
    and the rank of every component as written; ``sized``: with a size budget, the budget,
    the file's bytes and each module's error (``sizing.py``)."""

    lora: LoraFile
    history: list[dict] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    sized: CompressResult | None = None


def fingerprint(model: nn.Module) -> tuple[dict[str, int], float]:
    """The module tree and the sum of every weight (one tensor at a time in fp32)."""
    mods = {n: id(m) for n, m in model.named_modules()}
    total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            total += float(p.detach().float().sum())
    return mods, total


def _has_own_switch(model: nn.Module) -> bool:
    return hasattr(model, "gradient_checkpointing") or hasattr(
        model, "enable_gradient_checkpointing")


def train_diffusion(denoiser, examples: list[dict], family: Family | str,
                    adapter_cfg: AdapterConfig, train_cfg: TrainConfig,
                    export_cfg: ExportConfig | None = None, *, layout: UNetLayout | None = None,
                    callbacks: Callbacks | None = None,
                    checkpoint_path: str | os.PathLike | None = None,
                    resume: str | os.PathLike | None = None, resume_force: bool = False,
                    out_file: str | os.PathLike | None = None, run: RunFiles | None = None,
                    extra_metadata: dict[str, str] | None = None,
                    precision: PrecisionConfig | None = None,
                    parallel: Parallel | None = None) -> TrainResult:
    """Train LoRA² adapters on ``denoiser.module`` and return them as a LoRA in memory.

    ``examples``: ``{"latents": (C, h, w), "c_crossattn": (T, D), ...}`` with conditioning in
    ComfyUI's names. The module is restored bit for bit afterwards (checked: module tree and
    weight sums). A checkpoint is kept at ``checkpoint_path`` on cancel, on a non-finite loss
    and every ``checkpoint_every`` steps, and removed after a successful export. ``precision``
    (default: ``train_cfg.mixed_precision`` as given, fp32 adapters) picks the autocast dtype
    for the module's device and the adapters' dtype. ``resume_force`` resumes a state whose
    settings differ (``resume.py`` lists what differs otherwise). With ``run`` the state lives
    at ``run.state`` and the whole output set is published (see the module docstring).
    With a size budget in ``export_cfg`` (``size_mb`` / ``params``) ``r_target`` comes from the
    budget, a budget below rank 1 per module is refused before training, and the file spends
    the budget on the learned updates' strongest directions (``sizing.py``).
    With ``parallel`` (several processes: ``parallel.py``) every process trains its shard of
    each global batch and only the main one writes files; every process returns the result.
    """
    par = parallel or Parallel()
    if run is not None:
        checkpoint_path = run.state
    family = get(family) if isinstance(family, str) else family
    family.check_entropy(train_cfg.lambda_e)
    export_cfg = export_cfg or ExportConfig()
    family.check_key_style(export_cfg.key_style)
    module = denoiser.module
    layout = layout or family.model_layout()
    before = fingerprint(module)
    low, high = par.extremes([before[1]])
    if low != high:
        raise ValueError(f"the processes of this run hold different models (weight sums "
                         f"{low[0]:.6g} to {high[0]:.6g}): every process must load the same "
                         "model file")
    own = _has_own_switch(module)
    ckpt = train_cfg.grad_checkpointing
    adapter_dtype = None
    if precision is not None:
        mixed, adapter_dtype = precision.resolve(next(module.parameters()).device)
        train_cfg = dataclasses.replace(train_cfg, mixed_precision=mixed)
    trainer_cfg = dataclasses.replace(train_cfg, grad_checkpointing=ckpt and own)
    sized = export_cfg.budget is not None
    if sized:
        adapter_cfg = sizing.capacity_config(module, adapter_cfg, export_cfg)
    adapters = attach(module, adapter_cfg, seed=train_cfg.seed)
    if adapter_dtype is not None and adapter_dtype != torch.float32:
        for p in adapters.factor_parameters():
            p.data = p.data.to(adapter_dtype)
    entropy = family.entropy(module) if train_cfg.lambda_e > 0 else None
    if par.fsdp:  # after attach: the adapters stay out of FSDP (they change shape)
        par.shard_frozen(module, adapters.factor_parameters() + adapters.nu_parameters())
    try:
        if run is not None:
            def hold() -> None:
                run.reserve()
                run.check_space(run.needed_bytes(adapters.factor_parameters()))
            par.on_main(hold)
        if entropy is not None and entropy.num_layers == 0:
            raise ValueError(f"lambda_e={train_cfg.lambda_e}: no text→image attention layer "
                             f"found in this {family.display} model; set lambda_e to 0")
        if sized:
            sizing.check_budget(adapters, export_cfg, layout, train_cfg, train_cfg.steps,
                                extra_metadata)
        trainer = Trainer(adapters, denoising_loss(denoiser), examples, trainer_cfg,
                          entropy=entropy, checkpoint_path=checkpoint_path, callbacks=callbacks,
                          parallel=par)
        if resume:
            par.agree(lambda: trainer.load_checkpoint(resume, allow_changes=resume_force))
        with checkpointed_blocks(module, checkpoint=ckpt and not own,
                                 out_of_place=family.inplace_blocks):
            history = trainer.run()
        result = None
        if sized:
            result = sizing.export_to_budget(adapters, export_cfg, layout, train_cfg,
                                             trainer.step, extra_metadata)
            lora, data = result.lora, result.data
        else:
            lora = adapters_to_lora(adapters, export_cfg, layout, train_cfg, trainer.step,
                                    extra_metadata)
            data = lora_bytes(lora)
        ranks = {row.name: row.rank for row in report_from_file(lora).rows}  # as written
        if run is not None:
            configs = {"adapter": to_dict(adapter_cfg), "train": to_dict(train_cfg),
                       "export": to_dict(export_cfg),
                       "result": run_result(history, trainer.step, par.world)}

            def finish() -> None:
                with run.finishing(save_state=trainer.save_checkpoint):  # Ctrl-C held
                    run.publish(data, run_side_files(run, lora, history, configs, len(data)))
            par.on_main(finish)
            lora.path = run.adapter
        elif out_file is not None:
            lora.path = par.on_main(
                lambda: atomic_write_bytes(out_file, data, overwrite=export_cfg.overwrite)
            ) or Path(out_file)
    finally:
        if entropy is not None:
            entropy.remove()
        adapters.detach()
        if run is not None:
            run.release()
    if not par.fsdp and fingerprint(module) != before:  # a sharded model is the run's own
        raise RuntimeError("LoRA² training changed the incoming model; please report this bug")
    if checkpoint_path is not None and run is None and par.is_main:
        Path(checkpoint_path).unlink(missing_ok=True)
    return TrainResult(lora, history, ranks, trainer.step, result)


LAST_STEPS = 10  # the final loss of a run is the mean task loss of its last steps


def run_result(history: list[dict], steps: int, processes: int) -> dict:
    """What a run reached, kept in its ``config.json`` (the sweep's summary reads it)."""
    tail = [h["task"] for h in history[-LAST_STEPS:]]
    return {"steps": steps, "processes": processes,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "final_loss_steps": len(tail)}


def run_side_files(run: RunFiles, lora: LoraFile, history: list[dict], configs: dict,
                   file_bytes: int | None = None) -> dict[Path, bytes]:
    """The report, rank map, loss plot and configs a run leaves beside its adapter; the report
    describes the file as written (numerical ranks, omitted zero modules at rank 0; with a
    size budget: the budget, ``file_bytes`` and each module's error)."""
    from .report import figure_png, loss_figure, rank_map_figure, report_bytes

    report = report_from_file(lora)
    if report.budget is not None:
        report.file_bytes = file_bytes
    return {run.report_json: report_bytes(report),
            run.rank_map: figure_png(rank_map_figure(report, f"{run.name}: learned rank per "
                                                             "component")),
            run.loss_plot: figure_png(loss_figure(history, f"{run.name}: loss")),
            run.config_json: json.dumps(configs, indent=1).encode()}


def preview(trainer: Trainer, denoiser, conds: dict, latent_shape: tuple[int, ...],
            steps: int, seed: int, device) -> torch.Tensor:
    """A few Euler steps from noise with the adapters as they are (entropy capture paused)."""
    entropy = trainer.entropy
    if entropy is not None:
        entropy.enabled = False
    try:
        return euler_sample(denoiser, conds, (1, *latent_shape), steps, seed, device)
    finally:
        if entropy is not None:
            entropy.enabled = True
