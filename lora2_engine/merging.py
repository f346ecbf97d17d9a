"""Merge several LoRAs into one adaptive-rank LoRA under a budget: linear, TIES or DARE.

Each module's merged ``Delta W`` is refactored with the same joint rank allocation as
:func:`compress.compress`. ``linear`` (``sum w_i dW_i``) stays in factor form: the stacked
factors ``[w_i s_i up_i]`` and ``[down_i]`` have the merged update as their product, so its SVD
comes from thin QR. TIES and DARE act entry-wise and need the dense update of one module at a
time; they follow PEFT's definitions (``peft/utils/merge_utils.py``: ``ties`` = magnitude trim
to ``density``, sign elected by the sum of the trimmed updates, weighted disjoint mean;
``dare_linear`` = Bernoulli(``density``) keep mask, rescale by ``1/density``, weighted sum),
with DARE's masks drawn from a generator seeded per (seed, LoRA, module) so a merge repeats.

(:mod:`merge` is the other direction: zero-padding one LoRA for tools that need equal ranks.)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from .budget import Budget, BudgetError
from .compress import CompressResult, compress, refactor, save_dtype, serialize
from .formats.keys import KNOWN_LAYOUTS, OTHER, UNetLayout, as_ldm
from .formats.lora_file import LoraFile, ModuleWeights, family_names
from .spectrum import Spectrum

METHODS = ("linear", "ties", "dare")
_KEEP_META = ("ss_base_model_version", "ss_network_module", "modelspec.architecture",
              "modelspec.implementation", "modelspec.sai_model_spec")
_DF_BLOCK = re.compile(r"^(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_(.+)$")
_DF_MID = re.compile(r"^mid_block_attentions_0_(.+)$")
_TEXT = (("lora_te_", "te1:"), ("lora_te1_", "te1:"), ("lora_te2_", "te2:"),
         ("text_encoder.", "te1:"), ("text_encoder_2.", "te2:"))


class MergeError(ValueError):
    """LoRAs that cannot be merged together; the message names the files and the fix."""


def canonical_key(key: str, layout: UNetLayout = OTHER) -> str:
    """One name per module whatever the file's key style (kohya, ComfyUI, diffusers).

    UNet modules become ``unet:`` + their LDM name with ``_`` for ``.`` (kohya names SD1.x
    modules after diffusers, so those go through the layout's block map); text-encoder
    modules ``te1:``/``te2:`` + the underscored name. Anything else is kept as it is.
    """
    if key.startswith("diffusion_model."):
        return "unet:" + key[len("diffusion_model."):].replace(".", "_")
    if key.startswith("unet."):
        return "unet:" + as_ldm(key[len("unet."):], layout).replace(".", "_")
    if key.startswith("lora_unet_"):
        rest = key[len("lora_unet_"):]
        if m := _DF_BLOCK.match(rest):
            rest = as_ldm(f"{m[1]}.{m[2]}.attentions.{m[3]}.{m[4]}", layout)
        elif m := _DF_MID.match(rest):
            rest = as_ldm(f"mid_block.attentions.0.{m[1]}", layout)
        return "unet:" + rest.replace(".", "_")
    for prefix, tag in _TEXT:
        if key.startswith(prefix):
            return tag + key[len(prefix):].replace(".", "_")
    return key


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (PEFT's TIES trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.topk(delta.abs().flatten(), k).indices] = True
    return delta * keep.view_as(delta)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float
         ) -> torch.Tensor:
    """TIES: trim, elect the sign by the trimmed sum, mean of the weighted agreeing entries."""
    trimmed = torch.stack([magnitude_prune(d, density) for d in deltas])
    majority = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == majority
    w = torch.tensor(list(weights), dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    return (trimmed * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         generators: Sequence[torch.Generator]) -> torch.Tensor:
    """DARE (linear): drop entries with probability ``1 - density``, rescale, weighted sum."""
    out = torch.zeros_like(deltas[0])
    for d, w, g in zip(deltas, weights, generators):
        if density < 1:
            d = d * torch.bernoulli(torch.full_like(d, density), generator=g) / density
        out += w * d
    return out


def _generator(seed: int, index: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}:{name}".encode()))


def _label(lora: LoraFile, i: int) -> str:
    return Path(lora.path).name if lora.path else f"LoRA {i + 1}"


def _family(loras: Sequence[LoraFile], labels: Sequence[str]) -> str | None:
    fams = {lab: lora.family() for lab, lora in zip(labels, loras)}
    known = {f for f in fams.values() if f}
    if len(known) > 1:
        names = family_names()
        which = ", ".join(f"{lab} is {names.get(f, f)}" for lab, f in fams.items() if f)
        raise MergeError(f"these LoRAs were made for different base models ({which}): merge "
                         "only LoRAs made for one model family")
    return known.pop() if known else None


def _shape(w: ModuleWeights) -> tuple[int, ...]:
    return (w.up.shape[0], *w.down.shape[1:])


def _align(loras, labels, layout) -> dict[str, list[tuple[int, str, ModuleWeights]]]:
    """Canonical module name -> [(LoRA index, its key, weights)], shapes checked."""
    table: dict[str, list[tuple[int, str, ModuleWeights]]] = {}
    for i, lora in enumerate(loras):
        for key, w in lora.modules.items():
            entries = table.setdefault(canonical_key(key, layout), [])
            if entries and _shape(entries[0][2]) != _shape(w):
                j, k0, w0 = entries[0]
                raise MergeError(
                    f"module {key!r} has Delta W {_shape(w)} in {labels[i]} but "
                    f"{_shape(w0)} in {labels[j]} ({k0!r}): the LoRAs were made for different "
                    "models; merge only LoRAs of one base model")
            entries.append((i, key, w))
    return table


def _spectrum(entries, weights, method, density, seed, name) -> Spectrum:
    first = entries[0][2]
    tails = (tuple(first.down.shape[1:]), tuple(first.up.shape[2:]))
    if method == "linear":
        ups = [w.up.flatten(1).double() * (weights[i] * w.scale) for i, _, w in entries]
        downs = [w.down.flatten(1).double() for _, _, w in entries]
        spec = Spectrum.from_factors(torch.cat(ups, 1), torch.cat(downs, 0))
        spec.down_tail, spec.up_tail = tails
        return spec

    def make() -> torch.Tensor:  # the same matrix on every call: DARE masks are seeded
        deltas = [w.delta() for _, _, w in entries]
        ws = [weights[i] for i, _, _ in entries]
        if method == "ties":
            return ties(deltas, ws, density)
        return dare(deltas, ws, density, [_generator(seed, i, name) for i, _, _ in entries])

    return Spectrum.from_dense(make, *tails)


def check_inputs(loras: Sequence[LoraFile], weights: Sequence[float], method: str,
                 density: float) -> None:
    if not loras:
        raise MergeError("no LoRAs to merge: give at least one file")
    if len(weights) != len(loras):
        raise MergeError(f"{len(weights)} weight(s) for {len(loras)} LoRAs: give one weight per "
                         f"LoRA, e.g. --weights {' '.join(['1'] * len(loras))}")
    if method not in METHODS:
        raise MergeError(f"merge method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise MergeError(f"density {density} must be in (0, 1]: the fraction of each update's "
                         "entries TIES/DARE keep, e.g. 0.5")


def merge_loras(loras: Sequence[LoraFile], weights: Sequence[float], method: str,
                budget: Budget, *, density: float = 0.5, seed: int = 0,
                dtype: str | torch.dtype | None = None, min_rank: int = 1,
                labels: Sequence[str] | None = None) -> CompressResult:
    """Merge ``loras`` with ``weights`` by ``method`` into one file under ``budget``.

    Modules are matched across key styles by :func:`canonical_key`; a module missing from a
    LoRA counts as a zero update there, and the output keeps the first file's key for it.
    ``density`` is TIES's/DARE's kept fraction (ignored by ``linear``); ``seed`` fixes DARE.
    """
    check_inputs(loras, weights, method, density)
    if not isinstance(budget, Budget):
        raise BudgetError("a merge needs a budget: a size in MB, a parameter count or an error")
    labels = list(labels or [_label(lora, i) for i, lora in enumerate(loras)])
    family = _family(loras, labels)
    dt = save_dtype(loras[0], dtype)
    if len(loras) == 1 and weights[0] == 1 and (method == "linear" or density >= 1):
        return compress(loras[0], budget, dt, min_rank=min_rank)  # the identity merge
    table = _align(loras, labels, KNOWN_LAYOUTS.get(family or "", OTHER))
    spectra = {entries[0][1]: _spectrum(entries, weights, method, density, seed, canon)
               for canon, entries in table.items()}
    first = loras[0]
    meta = {k: v for k, v in first.metadata.items() if k in _KEEP_META}
    if family:
        meta["lora2.family"] = family
    template = LoraFile({e[0][1]: e[0][2] for e in table.values()}, first.style, meta)
    provenance = {"method": f"merge-{method}", "sources": labels, "weights": list(weights),
                  "density": density if method != "linear" else None, "seed": seed}
    sizes = [Path(lo.path).stat().st_size if lo.path and Path(lo.path).is_file()
             else len(serialize(lo)) for lo in loras]
    result = refactor(template, spectra, budget, dt, provenance, min_rank=min_rank,
                      ranks_before={k: s.numerical_rank for k, s in spectra.items()},
                      source_bytes=sum(sizes))
    dropped = sum(len(lo.extra) for lo in loras)
    if dropped:
        result.notes.append(f"{dropped} non-LoRA tensor(s) of the inputs (e.g. .diff) are not "
                            "merged")
    return result
