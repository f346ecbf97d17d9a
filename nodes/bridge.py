"""The only module that knows ComfyUI's internals: ``comfy.*`` and ``folder_paths``.

MODEL → module + noise schedule + conditioning, CLIP/VAE encoding, progress and cancel,
folders, and LoRA patches through ComfyUI's own loader. Checked against ComfyUI 0.3.54 and
0.28.0 (see docs/comfyui-notes.md); everything else in the pack goes through here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..lora2_engine import families
from ..lora2_engine.denoiser import ApplyModelDenoiser
from ..lora2_engine.formats.io import allow_any_folder, resolve_inside
from ..lora2_engine.formats.keys import OTHER, UNetLayout
from .core import Subject, match_peft_names, to_image_batch

log = logging.getLogger("LoRA2")
InterruptProcessingException = mm.InterruptProcessingException
CHECKPOINT_FOLDER = "lora2_checkpoints"


# ------------------------------------------------------------------ folders
def input_folder(folder: str) -> Path:
    """A folder inside ComfyUI's input directory (symlinks resolved; see ``resolve_inside``);
    absolute or outside folders only when the server's owner set LORA2_ALLOW_ANY_FOLDER=1."""
    return resolve_inside(folder_paths.get_input_directory(), folder, "folder",
                          "put the photos in a sub-folder of ComfyUI/input and give its name, "
                          "e.g. 'subject'")


def input_root() -> Path | None:
    """The folder a subject's files must stay in (``None``: the owner allows any folder)."""
    return None if allow_any_folder() else Path(folder_paths.get_input_directory())


def loras_folder() -> Path:
    """The first ``loras`` folder (``models/loras`` unless extra_model_paths says otherwise)."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    return list(folder_paths.get_filename_list("loras"))


def lora_file(name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise("loras", name))


def checkpoint_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / CHECKPOINT_FOLDER


def compute_device() -> torch.device:
    return mm.get_torch_device()


# ------------------------------------------------------------------ the model
@dataclass
class TrainingModel:
    """What training needs from a MODEL: the denoiser (module + schedule), family, names."""

    denoiser: ApplyModelDenoiser  # ComfyUI's apply_model over BaseModel.diffusion_model
    family: families.Family
    device: torch.device
    layout: UNetLayout
    rgb_factors: tuple | None  # latent → RGB preview projection, if the format has one


def model_family(base_model) -> families.Family | None:
    """The pack's family entry for ComfyUI's detected model config (None: not supported)."""
    names = [c.__name__ for c in type(base_model.model_config).__mro__]
    return families.from_comfy(names, base_model.model_config.unet_config)


def require_family(base_model) -> families.Family:
    fam = model_family(base_model)
    if fam is None:
        detected = type(base_model.model_config).__name__
        raise ValueError(f"LoRA² has no entry for this model (ComfyUI detects it as {detected}):"
                         f" it trains {', '.join(f.display for f in families.registry().values())}"
                         "; see the README, 'Model families'")
    return fam


def layout_of(base_model) -> UNetLayout:
    """Key-naming layout from ComfyUI's detected model config (OTHER for unknown models)."""
    fam = model_family(base_model)
    return fam.model_layout(base_model.model_config.unet_config) if fam else OTHER


def load_for_training(model) -> TrainingModel:
    """Load the MODEL fully onto the compute device (applying its pending patches)."""
    mm.load_models_gpu([model], force_full_load=True)
    base = model.model
    fmt = base.latent_format
    factors = getattr(fmt, "latent_rgb_factors", None)
    rgb = (factors, getattr(fmt, "latent_rgb_factors_bias", None)) if factors else None
    fam = require_family(base)
    denoiser = ApplyModelDenoiser(base.diffusion_model, base.model_sampling, base.apply_model)
    return TrainingModel(denoiser, fam, mm.get_torch_device(),
                         fam.model_layout(base.model_config.unet_config), rgb)


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own switch for differentiable kernels (0.28: Flux RoPE), restored after."""
    before = getattr(mm, "in_training", None)
    mm.in_training = True
    try:
        yield
    finally:
        if before is None:
            del mm.in_training
        else:
            mm.in_training = before


@torch.no_grad()
def encode_subject(model, clip, vae, subject: Subject) -> list[dict]:
    """Each image → processed latents; each caption → the model's own conditioning tensors.

    ``BaseModel.extra_conds`` builds exactly what the samplers pass to ``apply_model``
    (``c_crossattn``, SDXL's ``y`` from pooled text and the image size, ``c_concat``...).
    Run before the UNet is loaded: CLIP and VAE may need the memory.
    """
    base = model.model
    examples, captions = [], {}
    for pixels, caption in zip(subject.pixels, subject.captions):
        if caption not in captions:
            captions[caption] = clip.encode_from_tokens(clip.tokenize(caption),
                                                        return_pooled=True, return_dict=True)
        enc = dict(captions[caption])
        image = pixels.permute(1, 2, 0)[None]  # (1, H, W, 3)
        latent = base.process_latent_in(vae.encode(image).float().cpu())
        examples.append(_example(base, latent, enc.pop("cond"), enc, image.shape[2],
                                 image.shape[1]))
    return examples


def _example(base, latent, cross_attn, extra: dict, width: int, height: int) -> dict:
    """One training example: the latent plus exactly what the samplers pass to ``apply_model``."""
    conds = base.extra_conds(cross_attn=cross_attn, **extra, device="cpu", width=width,
                             height=height, noise=latent, latent_image=latent, seed=0)
    ex = {"latents": latent[0]}
    for key, cond in conds.items():
        value = getattr(cond, "cond", None)
        if torch.is_tensor(value):
            ex[key] = value[0].detach().clone().cpu()
    return ex


def training_examples(model, clip, vae, subject, latents, positive) -> list[dict]:
    """Examples from a subject (with CLIP and VAE) or from LATENT + CONDITIONING."""
    if subject is not None:
        if clip is None or vae is None:
            raise ValueError("a subject needs CLIP and VAE connected (to encode its captions "
                             "and photos); or connect latents + positive instead")
        return encode_subject(model, clip, vae, subject)
    if latents is None or positive is None:
        raise ValueError("nothing to train on: connect a subject (with CLIP and VAE), or "
                         "latents + positive conditioning")
    return encode_latents(model, latents, positive)


def encode_latents(model, latents: dict, positive: list) -> list[dict]:
    """LATENT + CONDITIONING → examples; one conditioning for all latents, or one per latent."""
    base = model.model
    samples = latents["samples"].float().cpu()
    if len(positive) not in (1, samples.shape[0]):
        raise ValueError(f"positive has {len(positive)} conditionings for {samples.shape[0]} "
                         "latents: give one, or one per latent")
    examples = []
    for i in range(samples.shape[0]):
        cond, extra = positive[i if len(positive) > 1 else 0]
        latent = base.process_latent_in(samples[i: i + 1])
        enc = {k: v for k, v in extra.items() if k in ("pooled_output", "guidance")}
        examples.append(_example(base, latent, cond[:1].float().cpu(), enc,
                                 latent.shape[3] * 8, latent.shape[2] * 8))
    return examples


def to_device(examples: list[dict], device) -> list[dict]:
    """Fresh (non-inference) copies on the training device: autograd may save them."""
    return [{k: v.detach().clone().to(device) for k, v in ex.items()} for ex in examples]


def latent_preview(latent: torch.Tensor, rgb_factors) -> torch.Tensor | None:
    """Latents → IMAGE via the format's linear RGB projection (no VAE: safe mid-training)."""
    if rgb_factors is None:
        return None
    factors, bias = rgb_factors
    f = torch.tensor(factors, dtype=torch.float32)
    img = latent.float().cpu().movedim(1, -1) @ f  # (B, h, w, 3)
    if bias is not None:
        img = img + torch.tensor(bias, dtype=torch.float32)
    img = ((img + 1) / 2).clamp(0, 1).movedim(-1, 1)
    return to_image_batch([torch.nn.functional.interpolate(img, scale_factor=8)[i]
                           for i in range(img.shape[0])])


# ------------------------------------------------------------------ progress and cancel
class Progress:
    """ComfyUI's progress bar; remembers a cancel instead of raising in the middle of a step."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.cancelled = False

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        pil = None
        if preview is not None:
            from PIL import Image

            arr = (preview[0].clamp(0, 1).numpy() * 255).round().astype("uint8")
            pil = ("JPEG", Image.fromarray(arr), 512)
        try:
            self.bar.update_absolute(value, preview=pil)
        except InterruptProcessingException:
            self.cancelled = True

    def should_stop(self) -> bool:
        return self.cancelled or mm.processing_interrupted()


def interrupted() -> BaseException:
    """The exception ComfyUI treats as a user cancel (not an error)."""
    mm.interrupt_current_processing(False)
    return InterruptProcessingException()


# ------------------------------------------------------------------ LoRA patches
def lora_key_map(model, clip) -> dict:
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def apply_lora(model, clip, state_dict: dict, strength_model: float, strength_clip: float):
    """Patch through ComfyUI's own loader (what LoraLoader does): clones, never mutates.

    diffusers/PEFT names, which stock ComfyUI does not map, are renamed to ones it does.

    Returns the new MODEL, the new CLIP (or None), the LoRA's module keys and those of them
    that nothing in this model matched (stock ComfyUI logs those as "lora key not loaded").
    """
    key_map = lora_key_map(model, clip)
    state_dict = match_peft_names(state_dict, key_map)
    modules = sorted({k.split(".lora_", 1)[0] for k in state_dict if ".lora_" in k})
    unmatched = [m for m in modules if m not in key_map]
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, state_dict,
                                                        strength_model, strength_clip)
    return new_model, new_clip, modules, unmatched
