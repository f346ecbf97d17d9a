"""Zero-padding to one rank for tools that need equal ranks (method.md §5).

A rank-r module padded to R gets zero rows at the tail of ``down`` and zero columns at the tail
of ``up`` (slots are ordered by importance); the file keeps one alpha for all modules
(``file_alpha``) and the factors are rescaled so that ``up @ down * alpha / R`` and therefore
``Delta W`` are unchanged.

Padding does not make factor-wise merges right: PEFT's ``linear`` and sd-scripts' merge without
``--concat`` combine ``up`` and ``down`` separately, which is not the weighted sum of the
updates (README, "Merging"); concatenating or SVD merges need no padding.
"""

from __future__ import annotations

import json

import torch

from .formats.lora_file import (
    LoraFile,
    ModuleWeights,
    file_alpha,
    network_metadata,
    set_metadata,
)

MAX_PAD_RANK = 4096  # the nodes' and r_max's limit; a padded file grows linearly with it


class PadRankError(ValueError):
    """The requested rank is below a module's rank (padding cannot shrink) or above the cap."""


def pad_module(w: ModuleWeights, rank: int, alpha: float | None = None) -> ModuleWeights:
    """``w`` at ``rank`` with the same ``Delta W``, stored with ``alpha`` (default: rank,
    i.e. scale 1)."""
    r = w.rank
    if rank < r or r == 0:
        raise PadRankError(f"cannot pad a rank-{r} module to rank {rank}")
    extra = rank - r
    down = torch.cat([w.down, w.down.new_zeros((extra, *w.down.shape[1:]))], 0)
    up = torch.cat([w.up, w.up.new_zeros((w.up.shape[0], extra, *w.up.shape[2:]))], 1)
    # the zero slots change the stock scale alpha/rank: keep the old per-slot scale ...
    kept = ModuleWeights(down, up, w.scale * rank)
    return kept.with_alpha(float(rank) if alpha is None else alpha)  # ... then the file's alpha


def pad_lora(lora: LoraFile, rank: int | None = None) -> LoraFile:
    """Pad every module to ``rank`` (default: the largest rank in the file)."""
    largest = max(w.rank for w in lora.modules.values())
    rank = largest if rank is None else rank
    if not isinstance(rank, int) or rank < largest:
        worst = max(lora.modules, key=lambda k: lora.modules[k].rank)
        raise PadRankError(
            f"rank={rank} is below the largest rank in the file ({largest}, module {worst!r}): "
            f"use --rank {largest} or more")
    if rank > max(MAX_PAD_RANK, largest):
        raise PadRankError(f"rank={rank} is above {MAX_PAD_RANK}, the largest rank padding "
                           f"makes (the file would grow {rank // largest}x): use --rank "
                           f"{largest}..{MAX_PAD_RANK}")
    meta = dict(lora.metadata)
    meta["lora2.padded_to"] = str(rank)
    meta["lora2.original_ranks"] = json.dumps(lora.ranks())
    alpha = file_alpha(lora.style, rank)
    padded = {k: pad_module(w, rank, alpha) for k, w in lora.modules.items()}
    set_metadata(meta, network_metadata(padded))
    return LoraFile(padded, lora.style, meta, dict(lora.extra), None)
