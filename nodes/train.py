"""TrainAdaptiveLoRA: MODEL + CLIP + VAE + SUBJECT → ADAPTIVE_LORA (and a file in models/loras).

The run is the engine's ``diffusion.train_diffusion`` on ComfyUI's own denoiser (the MODEL's
``apply_model`` and ``model_sampling``, from ``bridge``): no loss or sampler lives here. The
incoming MODEL is never changed: adapters are attached for the run and detached in
``finally``, and the engine verifies the module tree and weights afterwards.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch
from comfy_api.latest import io

from ..lora2_engine.config import DEFAULT_PRESET, PRESETS, preset
from ..lora2_engine.diffusion import preview, train_diffusion
from ..lora2_engine.formats.io import check_can_create, resolve_inside
from ..lora2_engine.precision import ADAPTER_DTYPES, TRAINING_DTYPES, PrecisionConfig
from ..lora2_engine.report import loss_figure
from ..lora2_engine.trainer import Callbacks, NonFiniteLoss, TrainingInterrupted
from . import bridge, core
from .types import (
    ADAPTIVE_LORA,
    CATEGORY,
    LORA_OUT_TIP,
    SUBJECT,
    advanced,
    show,
    with_options,
)

PREVIEW_STEPS = 20
STATE = ".state.safetensors"  # resumable training state, in output/lora2_checkpoints
TARGETS = "attention"
# diffusers (PEFT) names load in stock ComfyUI only for some families (Flux: yes; SD1.5/SDXL:
# no, ComfyUI maps only the old attention-processor names); the family entry says which.
KEY_STYLES = ["kohya", "comfy", "diffusers"]
CHECKPOINTING = ["auto", "on", "off"]


# The method's numbers a preset sets: widget name -> (config field, "adapter" or "train").
PRESET_WIDGETS = {"learning_rate": ("lr", "train"), "r_target": ("r_target", "adapter"),
                  "init_rank": ("init_rank", "adapter"), "r_max": ("r_max", "adapter"),
                  "lambda_r": ("lambda_r", "train"), "lambda_e": ("lambda_e", "train"),
                  "nu_lr": ("nu_lr", "train")}


def preset_values() -> dict[str, dict[str, float]]:
    """Each preset's value of every PRESET_WIDGETS widget: the widgets show these (web/lora2.js
    sets them when the preset changes), and an omitted input (API) takes them."""
    out = {}
    for name in sorted(PRESETS):
        cfgs = dict(zip(("adapter", "train"), preset(name)))
        out[name] = {w: getattr(cfgs[part], f) for w, (f, part) in PRESET_WIDGETS.items()}
    return out


def _inputs() -> list:
    F, I = io.Float.Input, io.Int.Input  # noqa: E741
    pv = preset_values()[DEFAULT_PRESET]
    basic = [
        io.Model.Input("model", tooltip="the model to train on; it is never changed (the "
                                        "adapters live only in the output LoRA)"),
        io.Clip.Input("clip", optional=True, tooltip="encodes the subject's captions"),
        io.Vae.Input("vae", optional=True, tooltip="encodes the subject's photos"),
        SUBJECT.Input("subject", optional=True, tooltip="photos + captions (with CLIP and VAE)"),
        io.Latent.Input("latents", optional=True,
                        tooltip="instead of a subject: already-encoded latents"),
        io.Conditioning.Input("positive", optional=True,
                              tooltip="with latents: one conditioning, or one per latent"),
        with_options(io.Combo.Input(
            "preset", options=sorted(PRESETS), default=DEFAULT_PRESET,
            tooltip="spread (default): the pack's settings, chosen on the rank-recovery "
                    "benchmark; paper: the paper's SDXL settings as written. Choosing one sets "
                    "learning_rate and the advanced rank settings to its values"),
            lora2_presets=preset_values()),
        I("steps", default=500, min=1, max=100000,
          tooltip="optimizer steps: 500-1500 for a subject on a GPU; the shipped template "
                  "uses 30 so that it finishes in minutes on a CPU"),
        F("learning_rate", default=pv["learning_rate"], min=1e-7, max=1.0, step=0.00001,
          round=0.0000001, optional=True, tooltip="the adapters' learning rate (set by the "
                                                  "preset)"),
        I("seed", default=0, min=0, max=2**31 - 1,
          tooltip="seeds the adapters' start, the noise and the timesteps: the same seed and "
                  "inputs train the same LoRA"),
        io.String.Input("filename", default="lora2/subject",
                        tooltip="saved as models/loras/<filename>.safetensors (never "
                                "overwritten: _2, _3... are added); empty = keep in memory"),
        I("preview_every", default=0, min=0, max=100000, optional=True,
          tooltip="sample a preview every N steps (0 = off; each costs 20 model calls)"),
    ]
    rare = [  # collapsed under "show advanced inputs" where the frontend has it
        F("r_target", default=pv["r_target"], min=0.5, max=4096.0, step=0.5, optional=True,
          tooltip="the rank the regulariser pulls every component toward (set by the "
                  "preset)"),
        I("init_rank", default=pv["init_rank"], min=1, max=4096, optional=True,
          tooltip="every component's rank at step 0 (set by the preset)"),
        I("r_max", default=pv["r_max"], min=1, max=4096, optional=True,
          tooltip="the largest rank a component may grow to (set by the preset)"),
        F("lambda_r", default=pv["lambda_r"], min=0.0, max=1000.0, step=0.00001,
          round=0.0000001, optional=True,
          tooltip="weight of the rank regulariser: higher = smaller ranks and files (set by "
                  "the preset)"),
        F("lambda_e", default=pv["lambda_e"], min=0.0, max=1000.0, step=0.00001,
          round=0.0000001, optional=True,
          tooltip="weight of the cross-attention entropy term (set by the preset)"),
        F("nu_lr", default=pv["nu_lr"], min=1e-7, max=1.0, step=0.0001, round=0.0000001,
          optional=True, tooltip="learning rate of the rank parameters nu (set by the preset)"),
        I("batch_size", default=1, min=1, max=64, optional=True,
          tooltip="images per step (>1 needs images of one size: crop mode)"),
        I("grad_accum", default=1, min=1, max=256, optional=True,
          tooltip="steps whose gradients add up before one update: a larger batch without "
                  "its memory"),
        io.String.Input("targets", default=TARGETS, optional=True,
                        tooltip="attention: the model family's attention projections; "
                                "attention+mlp: also the MLPs; or comma-separated module name "
                                "suffixes"),
        io.Combo.Input("key_style", options=KEY_STYLES, default="kohya", optional=True,
                       tooltip="kohya: loads in ComfyUI, A1111/Forge, kohya, diffusers; comfy: "
                               "ComfyUI's own names; diffusers: PEFT names (stock ComfyUI "
                               "loads them for Flux only)"),
        io.Combo.Input("save_dtype", options=["float32", "float16", "bfloat16"],
                       default="float32", optional=True,
                       tooltip="number format of the saved file: float16 halves its size"),
        io.Combo.Input("gradient_checkpointing", options=CHECKPOINTING, default="auto",
                       optional=True, tooltip="recompute activations during the backward "
                       "pass: less memory, slower steps. auto: on for DiTs (Flux), off for "
                       "UNets"),
        I("checkpoint_every", default=0, min=0, max=100000, optional=True,
          tooltip="save a resumable state every N steps (0 = only on cancel)"),
        io.String.Input("resume", default="", optional=True,
                        tooltip="a .state.safetensors in output/lora2_checkpoints to continue"),
        io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto",
                       optional=True, tooltip="autocast of each step. auto: bf16 on GPUs that "
                       "have it (else fp16 + loss scaling), fp32 on the CPU (faster there)"),
        io.Combo.Input("adapter_dtype", options=list(ADAPTER_DTYPES), default="fp32",
                       optional=True, tooltip="dtype of the trained A/B matrices"),
        F("size_mb", default=0.0, min=0.0, max=100000.0, step=0.1, optional=True,
          tooltip="train to a file size: MB on disk at save_dtype (the file lands within 2% "
                  "below it; ranks still learned, strongest directions kept). 0 = the learned "
                  "ranks decide. Replaces r_target"),
    ]
    return basic + [advanced(i) for i in rare]


class TrainAdaptiveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_TrainAdaptiveLoRA", display_name="Train Adaptive LoRA (LoRA²)",
            category=CATEGORY, is_output_node=True, inputs=_inputs(),
            description="Trains a LoRA² adapter on the subject: every attention projection "
                        "learns its own rank. Cancel keeps a resumable state.",
            outputs=[ADAPTIVE_LORA.Output(display_name="adaptive_lora", tooltip=LORA_OUT_TIP),
                     io.Image.Output(display_name="loss_curve",
                                     tooltip="task loss and mean rank per step"),
                     io.Image.Output(display_name="previews",
                                     tooltip="the samples taken every preview_every steps "
                                             "(the loss curve when previews are off)")])

    @classmethod
    def execute(cls, model, preset, steps, seed, filename, clip=None, vae=None, subject=None,
                latents=None, positive=None, key_style="kohya", save_dtype="float32",
                preview_every=0, resume="", training_dtype="auto", adapter_dtype="fp32",
                size_mb=0.0, **options) -> io.NodeOutput:
        family = bridge.require_family(model.model)
        family.check_key_style(key_style, in_comfyui=True)
        given = {k: options.pop(k, None) for k in PRESET_WIDGETS}
        adapter_cfg, train_cfg = _configs(family, preset, steps, seed, given, options)
        precision = PrecisionConfig(training_dtype, adapter_dtype)
        precision.resolve(bridge.compute_device())  # refuse e.g. fp16 on a CPU before work
        r_set = given.get("r_target") not in (None, preset_values()[preset]["r_target"])
        export_cfg = core.export_config(key_style, save_dtype, size_mb,
                                        given["r_target"] if r_set else None)
        out = core.free_path(bridge.loras_folder(), filename) if filename.strip() else None
        examples = core.stackable(bridge.training_examples(model, clip, vae, subject, latents,
                                                           positive), train_cfg.batch_size)
        t0 = time.perf_counter()
        result, previews = _train(model, examples, adapter_cfg, train_cfg, export_cfg, out,
                                  preview_every, resume, precision)
        lora = core.AdaptiveLora(result.lora, out.stem if out else "in-memory", out,
                                 result.history)
        curve = core.figure_to_image(loss_figure(result.history, f"{lora.name}: loss"))
        bridge.Progress(train_cfg.steps).update(train_cfg.steps, curve)  # last preview: curve
        text = _status(out, result, family, preset, given, time.perf_counter() - t0)
        return io.NodeOutput(lora, curve, previews if previews is not None else curve,
                             ui=show(cls, text, curve))


def _configs(family, preset_name: str, steps: int, seed: int, given: dict, options: dict):
    """Adapter and training configs from the preset, the method widgets that are set
    (``given``; ``None`` = the preset's) and the other options (targets and gradient
    checkpointing resolved for the model's family)."""
    o = options
    ckpt = o.get("gradient_checkpointing", "auto")
    adapter_cfg, train_cfg = core.build_configs(preset_name, dict(
        steps=steps, seed=seed, batch_size=o.get("batch_size", 1),
        grad_accum=o.get("grad_accum", 1), checkpoint_every=o.get("checkpoint_every", 0),
        targets=family.resolve_targets(o.get("targets", TARGETS)),
        grad_checkpointing={"on": True, "off": False}.get(ckpt, family.grad_checkpointing),
        **{PRESET_WIDGETS[k][0]: v for k, v in given.items()}))
    family.check_entropy(train_cfg.lambda_e)
    return adapter_cfg, train_cfg


def _status(out: Path | None, result, family, preset_name: str, given: dict,
            seconds: float) -> str:
    """What the node shows when training ends: one fact per short line."""
    ranks = list(result.ranks.values())
    hist = result.history
    changed = [f"{k} {v:g}" for k, v in given.items()
               if v is not None and v != preset_values()[preset_name][k]]
    where = None if out is None else out.relative_to(Path(bridge.loras_folder()).resolve())
    return "\n".join([
        f"saved models/loras/{where.as_posix()}" if where else
        "not saved (no filename): the LoRA is only in memory",
        f"{family.display}: {len(ranks)} components, ranks {min(ranks)}..{max(ranks)} "
        f"(mean {sum(ranks) / len(ranks):.1f})",
        f"{hist[-1]['step']} steps in {seconds:.0f} s, task loss {hist[0]['task']:.4f} -> "
        f"{hist[-1]['task']:.4f}",
        f"preset {preset_name}" + (f", changed: {', '.join(changed)}" if changed else "")]
        + ([f"size budget: {result.sized.summary()}"] if result.sized else []))


def _train(model, examples, adapter_cfg, train_cfg, export_cfg, out: Path | None,
           preview_every: int, resume: str, precision: PrecisionConfig | None = None):
    """The engine's training path on ComfyUI's denoiser, with ComfyUI's progress and cancel."""
    stem = out.stem if out else f"lora2_{uuid.uuid4().hex[:8]}"
    resume_path = _resume_path(resume)
    state = bridge.checkpoint_folder() / f"{stem}{STATE}"
    if resume_path is None or state.resolve() != resume_path.resolve():
        state = core.free_path(bridge.checkpoint_folder(), stem, STATE)  # keep older states
    check_can_create([p for p in (out, state) if p])  # writable, names fit: before training
    progress, previews = bridge.Progress(train_cfg.steps), []
    with torch.inference_mode(False), bridge.training_mode():
        target = bridge.load_for_training(model)
        core.release_inference_tensors(target.denoiser.module)
        data = bridge.to_device(examples, target.device)
        first = {k: v[None] for k, v in data[0].items() if k != "latents"}

        def on_preview(trainer) -> None:
            lat = preview(trainer, target.denoiser, first, tuple(data[0]["latents"].shape),
                          PREVIEW_STEPS, train_cfg.seed, target.device)
            img = bridge.latent_preview(lat, target.rgb_factors)
            if img is not None:
                previews.append(img)
                progress.update(trainer.step, img)

        callbacks = Callbacks(on_step=lambda tr, rec: progress.update(tr.step),
                              should_stop=progress.should_stop, on_preview=on_preview,
                              preview_every=preview_every,
                              interrupts=(bridge.InterruptProcessingException,))
        state.parent.mkdir(parents=True, exist_ok=True)
        bridge.log.info("LoRA² training %s: %d examples, %d steps", stem, len(data),
                        train_cfg.steps)
        try:
            result = train_diffusion(
                target.denoiser, data, target.family, adapter_cfg, train_cfg, export_cfg,
                layout=target.layout, callbacks=callbacks, checkpoint_path=state,
                resume=resume_path, out_file=out, precision=precision,
                extra_metadata={"lora2.name": stem, "ss_output_name": stem,
                                "lora2.trained_in": "ComfyUI"})
        except TrainingInterrupted as exc:
            bridge.log.warning("LoRA² %s", exc)
            raise bridge.interrupted() from exc
        except NonFiniteLoss as exc:
            raise RuntimeError(f"LoRA²: {exc}") from None
    batch = torch.cat(previews) if previews else None
    return result, batch


def _resume_path(resume: str) -> Path | None:
    """A state in output/lora2_checkpoints (anywhere only with LORA2_ALLOW_ANY_FOLDER=1)."""
    if not resume.strip():
        return None
    folder = bridge.checkpoint_folder()
    fix = f"give the name of a {STATE} file in output/{bridge.CHECKPOINT_FOLDER}"
    name = resume.strip()
    name += "" if name.lower().endswith(STATE) else STATE
    path = resolve_inside(folder, name, "resume", fix)
    if not path.is_file():
        raise ValueError(f"resume: {resume.strip()!r} is not in output/"
                         f"{bridge.CHECKPOINT_FOLDER}: {fix}")
    return path
