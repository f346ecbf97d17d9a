"""ComfyUI-free glue between the nodes and ``lora2_engine``: plain torch, tested without ComfyUI.

The node modules translate ComfyUI values, ``bridge.py`` reaches into ComfyUI, and everything
here works on tensors and engine objects, so it can be unit-tested without ComfyUI. Training
itself (loss, noise levels, sampler) is the engine's ``diffusion.train_diffusion``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..lora2_engine.config import ConfigError, preset
from ..lora2_engine.formats.lora_file import LoraFile

SAFE_NAME = re.compile(r"^[\w\-. ]+$")


# ------------------------------------------------------------------ values between nodes
@dataclass
class Subject:
    """Training images (3, H, W) in [0, 1] with one caption each (the SUBJECT socket)."""

    pixels: list[torch.Tensor]
    captions: list[str]
    names: list[str]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pixels or not (len(self.pixels) == len(self.captions) == len(self.names)):
            raise ValueError("a subject needs at least one image and one caption per image")

    def summary(self) -> str:
        sizes = sorted({f"{p.shape[2]}x{p.shape[1]}" for p in self.pixels})
        lines = [f"{len(self.pixels)} images ({', '.join(sizes)})"]
        lines += [f"{n}: {c}" for n, c in zip(self.names, self.captions)]
        return "\n".join(lines + self.warnings)


@dataclass
class AdaptiveLora:
    """A trained or loaded adaptive LoRA in memory (the ADAPTIVE_LORA socket)."""

    lora: LoraFile
    name: str
    path: Path | None = None
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the file this LoRA is (or would be), keyed as the file keys them."""
        return lora_state_dict(self.lora)


def lora_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    """Key → tensor as ``write_lora`` stores them, plus a ``.alpha`` for every module.

    Diffusers-style files keep alpha in metadata (``alpha_pattern``), which ComfyUI ignores;
    ComfyUI reads ``.alpha`` for any naming, so the scale is the one diffusers would use.
    """
    return lora.state_dict(alphas=True)


def subject_from_folder(folder: str | Path, prompt: str, resolution: int, mode: str,
                        within: str | Path | None = None) -> Subject:
    """Every readable image of ``folder`` (kohya ``name.txt`` captions override ``prompt``);
    files linking outside ``within`` are skipped unread."""
    from ..lora2_engine.data import SubjectDataError, load_subject

    try:
        data = load_subject(folder, prompt, resolution, mode, within)
    except SubjectDataError as exc:
        raise ValueError(str(exc)) from None
    return Subject([im.pixels for im in data.images], [im.caption for im in data.images],
                   [im.path.name if im.path else f"image {i}" for i, im in
                    enumerate(data.images)], data.warnings())


def subject_from_images(images: torch.Tensor, prompt: str, resolution: int,
                        mode: str) -> Subject:
    """An IMAGE batch (B, H, W, C) resized exactly as files are; one caption for all."""
    import numpy as np
    from PIL import Image

    from ..lora2_engine.data import resize_bucket, resize_center_crop

    resize = resize_bucket if mode == "bucket" else resize_center_crop
    pixels = []
    for img in images:
        arr = (img[..., :3].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        out = resize(Image.fromarray(arr, "RGB"), resolution)
        pixels.append(torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)
                      .permute(2, 0, 1).contiguous())
    return Subject(pixels, [prompt] * len(pixels), [f"image {i}" for i in range(len(pixels))])


def match_peft_names(state_dict: dict, known) -> dict:
    """Rename diffusers/PEFT module keys (``unet.….attn1.to_k.lora_A.weight``, ``….alpha``)
    to the attention-processor names ComfyUI's key map knows (``unet.….attn1.processor.to_k``),
    where the plain name is unknown and the processor name is known; other keys are unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            prefix, tail = key[: -len(".alpha")], ".alpha"
        else:
            prefix, sep, rest = key.partition(".lora_")
            tail = sep + rest
        if tail and prefix not in known:
            alt = prefix.replace(".to_", ".processor.to_")
            alt = alt[:-2] if alt.endswith(".to_out.0") else alt
            key = alt + tail if alt in known else key
        out[key] = value
    return out


# ------------------------------------------------------------------ options and file names
def build_configs(preset_name: str, options: dict):
    """``preset(preset_name)`` with the node options that are set (``None`` means preset)."""
    overrides = {k: v for k, v in options.items() if v is not None}
    if isinstance(overrides.get("targets"), str):
        overrides["targets"] = tuple(t.strip() for t in overrides["targets"].split(",")
                                     if t.strip())
    try:
        return preset(preset_name, **overrides)
    except ConfigError as exc:
        raise ValueError(f"LoRA² settings: {exc}") from None


def export_config(key_style: str, save_dtype: str, size_mb: float, r_target: float | None):
    """TrainAdaptiveLoRA's export settings; ``size_mb`` 0 = no budget, else it replaces
    ``r_target`` (a changed r_target with a budget is refused: the budget derives it)."""
    from ..lora2_engine.config import ExportConfig

    if size_mb and r_target:
        raise ValueError(f"LoRA² settings: size_mb={size_mb:g} and r_target={r_target:g} are "
                         "both set: a size budget chooses r_target itself, so leave r_target "
                         "at the preset's value (or set size_mb to 0)")
    try:
        return ExportConfig(key_style=key_style, dtype=save_dtype, size_mb=size_mb or None)
    except ConfigError as exc:
        raise ValueError(f"LoRA² settings: {exc}") from None


def safe_relative_name(name: str, suffix: str = ".safetensors") -> PurePosixPath:
    """A file name confined to one folder: no absolute path, no ``..``, no odd characters."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise ValueError("the file name is empty: type a name such as 'lora2/my_subject'")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).drive or name.startswith("~"):
        raise ValueError(f"file name {name!r} is absolute: give a name relative to the loras "
                         "folder, e.g. 'lora2/my_subject'")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"file name {name!r} leaves the loras folder ('..' or '.'): "
                         "use a plain name such as 'lora2/my_subject'")
    bad = [part for part in pure.parts if not SAFE_NAME.match(part)]
    if bad:
        raise ValueError(f"file name {name!r}: {bad[0]!r} has characters other than letters, "
                         "digits, space, '-', '_' and '.'")
    if not pure.name.lower().endswith(suffix):
        pure = pure.with_name(pure.name + suffix)
    return pure


def free_path(folder: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name<suffix>``, or ``name_2``, ``name_3``... when taken: never overwrite."""
    rel = safe_relative_name(name, suffix)
    folder = Path(folder).resolve()
    path = (folder / rel).resolve()
    if folder not in path.parents:
        raise ValueError(f"file name {name!r} resolves outside {folder}")
    base, k = path.name[: -len(suffix)], 2
    while path.exists():
        path = path.with_name(f"{base}_{k}{suffix}")
        k += 1
    return path


# ------------------------------------------------------------------ training examples
def lcm_tokens(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat (T, D) contexts to a common length (ComfyUI's rule for long prompts in a batch)."""
    lengths = {c.shape[0] for c in contexts}
    if len(lengths) == 1:
        return list(contexts)
    common = math.lcm(*lengths)
    return [c.repeat(common // c.shape[0], 1) for c in contexts]


def stackable(examples: list[dict], batch_size: int) -> list[dict]:
    """Make examples collatable: equal token counts; equal image sizes when batched."""
    if "c_crossattn" in examples[0]:
        for ex, ctx in zip(examples, lcm_tokens([e["c_crossattn"] for e in examples])):
            ex["c_crossattn"] = ctx
    shapes = {tuple(e["latents"].shape) for e in examples}
    if batch_size > 1 and len(shapes) > 1:
        raise ValueError(f"batch_size={batch_size} needs images of one size, got {len(shapes)} "
                         "sizes (bucket mode): use batch_size 1 with grad_accum instead, or crop")
    return examples


# ------------------------------------------------------------------ torch plumbing
def _is_inference(t: torch.Tensor) -> bool:
    """True for inference tensors, including a Parameter created in inference mode whose
    ``.data`` was later replaced (``module.to(device)``): it still has no version counter."""
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018
    except RuntimeError:
        return True
    return False


def release_inference_tensors(model: torch.nn.Module) -> int:
    """Give every parameter/buffer created under ``torch.inference_mode`` a normal copy.

    ComfyUI runs nodes in inference mode, so a MODEL loaded by an upstream node holds inference
    tensors, which autograd refuses to save for backward even when frozen. The copies hold the
    same values (one tensor at a time, so memory peaks by one tensor), the module tree is
    untouched and later runs find nothing to do. Returns how many tensors were replaced.
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and _is_inference(p):
                    module._parameters[name] = torch.nn.Parameter(p.clone(),
                                                                  requires_grad=p.requires_grad)
                    count += 1
            for name, b in list(module._buffers.items()):
                if b is not None and _is_inference(b):
                    module._buffers[name] = b.clone()
                    count += 1
    return count


# ------------------------------------------------------------------ pictures
def figure_to_image(fig) -> torch.Tensor:
    """A matplotlib figure → ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def to_image_batch(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images → one IMAGE batch; other sizes are letterboxed to the largest."""
    h = max(p.shape[1] for p in pixels)
    w = max(p.shape[2] for p in pixels)
    out = torch.zeros(len(pixels), h, w, 3)
    for i, p in enumerate(pixels):
        top, left = (h - p.shape[1]) // 2, (w - p.shape[2]) // 2
        out[i, top:top + p.shape[1], left:left + p.shape[2]] = p.permute(1, 2, 0)
    return out
