"""A subject-training run on an LDM-style UNet: encode, attach, train, export, report.

This is what the CLI's ``demo``/``train`` and the benchmarks call. ComfyUI's nodes reuse the
same pieces with ComfyUI's own model and noise schedule (``nodes/bridge.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig, ExportConfig, TrainConfig, to_dict
from .formats.keys import OTHER, UNetLayout
from .formats.lora_file import adapters_to_lora, lora_bytes
from .inject import Adapters, attach
from .objective import EntropyCapture
from .report import figure_png, loss_figure, rank_map_figure, report_bytes, report_from_adapters
from .runfiles import RunFiles
from .schedule import Schedule, diffusion_loss
from .trainer import Callbacks, Trainer


def layout_of(unet: nn.Module) -> UNetLayout:
    """The name-mapping layout of a tiny/ComfyUI UNet (from its spec or unet_config)."""
    spec = getattr(unet, "spec", None)
    if spec is not None:
        return UNetLayout(spec.family, tuple(spec.num_res_blocks),
                          spec.transformer_depth_middle >= -1)
    return OTHER


@torch.no_grad()
def encode_examples(pixels: list[torch.Tensor], captions: list[str], vae, text_encoder,
                    family: str) -> list[dict]:
    """Images (3, H, W) in [0, 1] and captions → training examples (latents + conditioning)."""
    from .models.tiny import sdxl_adm

    examples = []
    for img, cap in zip(pixels, captions):
        latents = vae.encode(img[None])[0]
        context, pooled = text_encoder.encode([cap])
        ex = {"latents": latents, "context": context[0]}
        if family == "sdxl":
            ex["y"] = sdxl_adm(pooled, img.shape[1], img.shape[2])[0]
        examples.append(ex)
    return examples


def ldm_predict(unet: nn.Module):
    """``predict(x_t, t, batch)`` for UNets called as ``unet(x, timesteps, context, y)``."""
    def predict(x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        return unet(x_t, t, batch["context"], batch.get("y"))
    return predict


@dataclass
class RunOutputs:
    """Where a run wrote its files, and what it learned."""

    lora: Path
    report_json: Path
    rank_map: Path
    loss_plot: Path
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    config_json: Path | None = None


def train_unet(unet: nn.Module, examples: list[dict], adapter_cfg: AdapterConfig,
               train_cfg: TrainConfig, out_dir: str | os.PathLike, name: str = "lora2",
               export: ExportConfig | None = None, schedule: Schedule | None = None,
               callbacks: Callbacks | None = None, resume: str | os.PathLike | None = None,
               layout: UNetLayout | None = None, predict=None,
               resume_force: bool = False) -> RunOutputs:
    """Train adaptive adapters on ``unet`` and write adapter, reports and plots to ``out_dir``.

    The files are ``<name>.safetensors`` and ``<name>.*`` side files (see ``runfiles``),
    checked before training and written as one set. Nothing existing is overwritten unless
    ``export.overwrite``; a checkpoint ``<name>.state.safetensors`` is kept on cancel, on a
    non-finite loss and every ``checkpoint_every`` steps, and removed after a successful
    export. ``predict`` defaults to :func:`ldm_predict` (tiny and ComfyUI-layout UNets);
    diffusers UNets bring their own.
    """
    export = export or ExportConfig()
    run = RunFiles.plan(out_dir, name, overwrite=export.overwrite, resume=resume)
    paths = RunOutputs(run.adapter, run.report_json, run.rank_map, run.loss_plot, run.state,
                       config_json=run.config_json)
    layout = layout or layout_of(unet)
    adapters: Adapters = attach(unet, adapter_cfg, seed=train_cfg.seed)
    entropy = EntropyCapture(unet)
    try:
        run.reserve()
        run.check_space(run.needed_bytes(adapters.factor_parameters()))
        predict = predict or ldm_predict(unet)
        trainer = Trainer(adapters, diffusion_loss(predict, schedule or Schedule()),
                          examples, train_cfg, entropy=entropy, checkpoint_path=paths.checkpoint,
                          callbacks=callbacks)
        if resume:
            trainer.load_checkpoint(resume, allow_changes=resume_force)
        history = trainer.run()
        with run.finishing(save_state=trainer.save_checkpoint):  # Ctrl-C held; state kept
            extra = {"lora2.name": name, "ss_output_name": name}
            lora = adapters_to_lora(adapters, export, layout, train_cfg, trainer.step, extra)
            report = report_from_adapters(adapters)
            config = {"adapter": to_dict(adapter_cfg), "train": to_dict(train_cfg),
                      "export": to_dict(export)}
            run.publish(lora_bytes(lora), {
                run.report_json: report_bytes(report),
                run.rank_map: figure_png(rank_map_figure(report, f"{name}: learned rank per "
                                                                 "component")),
                run.loss_plot: figure_png(loss_figure(history, f"{name}: loss")),
                run.config_json: json.dumps(config, indent=1).encode()})
        paths.history, paths.ranks = history, adapters.ranks()
        return paths
    finally:
        entropy.remove()
        adapters.detach()
        run.release()
