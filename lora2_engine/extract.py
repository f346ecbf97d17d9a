"""Extract an adaptive-rank LoRA from a fine-tuned model: ``tuned - base`` under a budget.

The counterpart of ComfyUI's "Extract and Save LoRA" with ranks chosen jointly (as in
:mod:`compress`): every 2-D weight and conv kernel that differs becomes one module. Tensors are
read lazily from the two safetensors files, one module at a time, so memory stays near one
weight matrix plus the result. 1-D tensors (biases, norms) cannot be LoRA modules and are
skipped (counted in a note).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from .budget import Budget, BudgetError
from .compress import CompressResult, refactor
from .formats.io import LoraFileError
from .formats.keys import OTHER, UNetLayout, file_key
from .formats.lora_file import LoraFile
from .spectrum import Spectrum

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI / SD checkpoints


def _module_name(key: str) -> str:
    """The module a weight key belongs to (no checkpoint prefix, no ``.weight``)."""
    name = key.removesuffix(".weight")
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def extract_lora(base: Callable[[str], torch.Tensor], tuned: Callable[[str], torch.Tensor],
                 keys: list[str], budget: Budget, *, style: str = "comfy",
                 layout: UNetLayout = OTHER, dtype: torch.dtype = torch.float16,
                 min_rank: int = 1) -> CompressResult:
    """``tuned(k) - base(k)`` for each weight key in ``keys`` as a LoRA under ``budget``.

    ``base``/``tuned`` return a tensor by key (lazily); only keys whose tensors differ become
    modules, named for ``style`` through ``layout``. ``comfy`` (ComfyUI's own extract format)
    is mapped by ComfyUI for every module; the kohya/diffusers maps cover attention blocks.
    """
    spectra: dict[str, Spectrum] = {}
    skipped = 0
    unet = [k for k in keys if k.startswith(PREFIXES)]
    others = len(keys) - len(unet) if unet else 0  # a full checkpoint: its UNet only
    for key in unet or keys:
        b, t = base(key), tuned(key)
        if b.shape != t.shape:
            raise LoraFileError(f"{key}: {tuple(b.shape)} in the base but {tuple(t.shape)} in "
                                "the fine-tuned model: they are different architectures")
        if torch.equal(b, t):
            continue
        if b.dim() not in (2, 4) or not key.endswith(".weight"):
            skipped += 1
            continue
        tail = tuple(b.shape[1:])
        up_tail = (1, 1) if b.dim() == 4 else ()
        spectra[file_key(_module_name(key), style, layout)] = Spectrum.from_dense(
            lambda key=key: (tuned(key).float() - base(key).float()).flatten(1), tail, up_tail)
    if not spectra:
        raise BudgetError("the two models have no differing 2-D or conv weights: nothing to "
                          "extract (is the fine-tuned file the same model?)")
    meta = {"lora2.family": layout.family} if layout.family != "other" else {}
    template = LoraFile({}, style, meta)
    result = refactor(template, spectra, budget, dtype, {"method": "extract"},
                      min_rank=min_rank)
    if others:
        result.notes.append(f"{others} tensors outside the diffusion model (text encoders, VAE) "
                            "were not compared: only the UNet/DiT is extracted")
    if skipped:
        result.notes.append(f"{skipped} changed tensors that are not matrices or conv kernels "
                            "(biases, norms) cannot be LoRA modules and were left out")
    return result


def extract_files(base_path: str | os.PathLike, tuned_path: str | os.PathLike,
                  budget: Budget, **kw) -> CompressResult:
    """:func:`extract_lora` reading two safetensors files lazily (never pickles)."""
    from safetensors import safe_open

    from .formats.io import PICKLE_SUFFIXES

    paths = [Path(base_path), Path(tuned_path)]
    for p in paths:
        if p.suffix.lower() in PICKLE_SUFFIXES or not p.is_file():
            raise LoraFileError(f"{p}: give an existing .safetensors model file (pickles are "
                                "never opened)")
    with ExitStack() as stack:
        fb, ft = (stack.enter_context(safe_open(str(p), framework="pt")) for p in paths)
        common = set(ft.keys())
        keys = [k for k in fb.keys() if k in common]
        return extract_lora(fb.get_tensor, ft.get_tensor, keys, budget, **kw)
