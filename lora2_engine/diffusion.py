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
from .formats.io import safe_output_path
from .formats.keys import OTHER, UNetLayout
from .formats.lora_file import export_adapters
from .inject import Adapters, attach
from .objective import EntropyCapture
from .report import loss_figure, rank_map_figure, report_from_adapters, save_figure, save_json
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


def train_unet(unet: nn.Module, examples: list[dict], adapter_cfg: AdapterConfig,
               train_cfg: TrainConfig, out_dir: str | os.PathLike, name: str = "lora2",
               export: ExportConfig | None = None, schedule: Schedule | None = None,
               callbacks: Callbacks | None = None, resume: str | os.PathLike | None = None,
               layout: UNetLayout | None = None, predict=None) -> RunOutputs:
    """Train adaptive adapters on ``unet`` and write adapter, reports and plots to ``out_dir``.

    Nothing existing is overwritten unless ``export.overwrite``; a checkpoint
    ``<name>.state.safetensors`` is kept on cancel, on a non-finite loss and every
    ``checkpoint_every`` steps, and removed after a successful export. ``predict`` defaults
    to :func:`ldm_predict` (tiny and ComfyUI-layout UNets); diffusers UNets bring their own.
    """
    export = export or ExportConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_path = safe_output_path(out, name)
    paths = RunOutputs(lora_path, out / "rank_report.json", out / "rank_report.png",
                       out / "loss.png", lora_path.with_name(lora_path.stem + ".state.safetensors"))
    if paths.lora.exists() and not export.overwrite:
        raise FileExistsError(f"{paths.lora} already exists: choose another name or pass "
                              "overwrite")
    layout = layout or layout_of(unet)
    adapters: Adapters = attach(unet, adapter_cfg, seed=train_cfg.seed)
    entropy = EntropyCapture(unet)
    try:
        predict = predict or ldm_predict(unet)
        trainer = Trainer(adapters, diffusion_loss(predict, schedule or Schedule()),
                          examples, train_cfg, entropy=entropy, checkpoint_path=paths.checkpoint,
                          callbacks=callbacks)
        if resume:
            trainer.load_checkpoint(resume)
        history = trainer.run()
        extra = {"lora2.name": name, "ss_output_name": name}
        export_adapters(adapters, paths.lora, export, layout, train_cfg, trainer.step, extra)
        report = report_from_adapters(adapters)
        save_json(report, paths.report_json, overwrite=True)
        save_figure(rank_map_figure(report, f"{name}: learned rank per component"),
                    paths.rank_map, overwrite=True)
        save_figure(loss_figure(history, f"{name}: loss"), paths.loss_plot, overwrite=True)
        paths.history, paths.ranks = history, adapters.ranks()
        paths.checkpoint.unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"adapter": to_dict(adapter_cfg), "train": to_dict(train_cfg),
             "export": to_dict(export)}, indent=1))
        return paths
    finally:
        entropy.remove()
        adapters.detach()
