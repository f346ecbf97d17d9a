"""Compress a LoRA to a budget: ranks chosen jointly over the file, the file's bytes measured.

``compress(lora, Budget.megabytes(40))`` takes the exact SVD of every module (from its factors,
see :mod:`spectrum`), lets :func:`budget.allocate` spend the bytes where each singular
direction removes the most error per byte across the whole file, and writes every module back
as ``U sqrt(S)``, ``sqrt(S) Vh`` with the file's one alpha (``file_alpha``: every loader
applies exactly ``Delta W``). A byte budget
is the size of the file on disk: the file is serialised and measured (header, metadata and
alphas included) and the tensor budget is lowered by any overshoot until it fits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import (
    MB,
    Budget,
    BudgetError,
    allocate,
    allocate_error,
    minimum_cost,
    total_rel_error,
)
from .formats.io import atomic_write_bytes
from .formats.lora_file import (
    FORMAT_VERSION,
    LoraFile,
    ModuleWeights,
    file_alpha,
    lora_contents,
    network_metadata,
    set_metadata,
)
from .spectrum import Spectrum

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOWER_BOUND = 0.98  # a byte budget is met from below: file bytes in [0.98, 1] x budget
_STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256",
          "lora_adapter_metadata", "lora2.padded_to", "lora2.original_ranks",
          "lora2.source_dtype", "lora2.split")


@dataclass
class ModuleResult:
    """One module of a result: its rank before and after, and the error it now carries."""

    key: str
    name: str
    rank_before: int
    rank: int
    m: int
    n: int
    rel_error: float  # ||dW - dW_r||_F / ||dW||_F from the spectrum (before dtype rounding)
    at_dense_cap: bool = False  # stopped where r (m + n) would reach m n

    @property
    def params(self) -> int:
        return self.rank * (self.m + self.n)


@dataclass
class CompressResult:
    """A compressed or merged LoRA: the file in memory, its exact bytes, and what it costs."""

    lora: LoraFile
    data: bytes  # exactly what :meth:`write` puts on disk
    budget: Budget
    rows: list[ModuleResult]
    total_rel_error: float
    source_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    unchanged: bool = False

    @property
    def file_bytes(self) -> int:
        return len(self.data)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    def write(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the file atomically; an existing file is refused unless ``overwrite``."""
        path = atomic_write_bytes(path, self.data, overwrite=overwrite)
        self.lora.path = path
        return path

    def report(self):
        from .report import ComponentRow, RankReport

        rows = [ComponentRow(r.name, r.rank, r.params, None, r.rel_error) for r in self.rows]
        bpp = next(iter(self.lora.modules.values())).down.element_size()
        return RankReport(rows, bpp, budget=self.budget.describe(), file_bytes=self.file_bytes,
                          total_rel_error=self.total_rel_error)

    def summary(self) -> str:
        ranks = [r.rank for r in self.rows]
        src = f" from {self.source_bytes:,}" if self.source_bytes else ""
        lines = [f"{len(self.rows)} modules, ranks {min(ranks)}..{max(ranks)}, "
                 f"{self.file_bytes:,} bytes{src} (budget {self.budget.describe()}), "
                 f"total relative error {self.total_rel_error:.4f}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def serialize(lora: LoraFile) -> bytes:
    """The exact bytes :func:`write_lora` would write for ``lora``."""
    from safetensors.torch import save

    tensors, meta = lora_contents(lora)
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                metadata=meta)


def save_dtype(lora: LoraFile, dtype: str | torch.dtype | None) -> torch.dtype:
    """The requested dtype, or the source's (its first module's ``down``)."""
    if dtype is None:
        converted = lora.metadata.get("lora2.source_dtype")  # e.g. a LoHa converted in fp32
        if converted in SAVE_DTYPES:
            return SAVE_DTYPES[converted]
        dt = next(iter(lora.modules.values())).down.dtype
        return dt if dt in SAVE_DTYPES.values() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(dtype, dtype)
    if name not in SAVE_DTYPES:
        raise BudgetError(f"save dtype {dtype!r}: choose float32, float16 or bfloat16")
    return SAVE_DTYPES[name]


def module_spectra(lora: LoraFile) -> dict[str, Spectrum]:
    return {k: Spectrum.from_module(w) for k, w in lora.modules.items()}


def _names(lora: LoraFile) -> dict[str, str]:
    """File key -> the module's own name (from our record for LoRA² files, else the key)."""
    rec = lora.lora2_modules() or {}
    by_key = {r.get("key"): n for n, r in rec.items() if isinstance(r, dict)}
    return {k: by_key.get(k, k) for k in lora.modules}


def _metadata(template: LoraFile, spectra: Mapping[str, Spectrum], ranks: Mapping[str, int],
              budget: Budget, provenance: dict, keep_record: tuple[str, ...] = ()
              ) -> dict[str, str]:
    meta = {k: v for k, v in template.metadata.items() if k not in _STALE}
    kept = {k: r for k, r in ranks.items() if r > 0}
    record = template.lora2_modules()
    if isinstance(record, dict):  # our own record: new ranks, nu no longer describes them
        meta["lora2.modules"] = json.dumps(  # (unless kept: a trained run's learned nu);
            {n: {k: v for k, v in rec.items() if k != "nu" or k in keep_record}  # a module
             | {"rank": kept.get(rec["key"], 0)}  # left out stays in the record at rank 0
             for n, rec in record.items() if isinstance(rec, dict)})
    fam = template.family()
    if fam:
        meta["lora2.family"] = fam
    meta["lora2.format_version"] = FORMAT_VERSION
    err = total_rel_error({k: s.s for k, s in spectra.items()}, ranks)
    info = {"budget": budget.to_json(), **provenance, "total_rel_error": float(f"{err:.4g}"),
            "rel_error": {k: float(f"{spectra[k].rel_error(r):.4g}") for k, r in kept.items()}}
    meta["lora2.compression"] = json.dumps(info)
    return meta


def build(template: LoraFile, spectra: Mapping[str, Spectrum], ranks: Mapping[str, int],
          dtype: torch.dtype, budget: Budget, provenance: dict,
          placeholder: bool = False, keep_record: tuple[str, ...] = ()) -> LoraFile:
    """The LoRA file with every module refactored to its rank (rank 0 drops the module).

    ``placeholder`` builds zero tensors of the right shapes: same header and size, no SVD.
    ``keep_record``: fields of our per-module record kept as they are (e.g. ``"nu"``).
    """
    modules = {}
    for key, spec in spectra.items():
        r = ranks[key]
        if r <= 0:
            continue
        if placeholder:
            modules[key] = ModuleWeights(torch.zeros((r, *spec.down_tail), dtype=dtype),
                                         torch.zeros((spec.m, r, *spec.up_tail), dtype=dtype),
                                         file_alpha(template.style, r))
        else:
            modules[key] = spec.module(r, dtype, file_alpha(template.style, r))
    meta = _metadata(template, spectra, ranks, budget, provenance, keep_record)
    if "ss_network_dim" in meta or "ss_network_alpha" in meta:
        set_metadata(meta, network_metadata(modules))
    return LoraFile(modules, template.style, meta, dict(template.extra))


def choose_ranks(spectra: Mapping[str, Spectrum], budget: Budget, *, min_rank: int = 1
                 ) -> dict[str, int]:
    """Ranks for a params or error budget (bytes go through :func:`_fit_bytes`)."""
    sv = {k: s.s for k, s in spectra.items()}
    costs = {k: s.rank_cost for k, s in spectra.items()}
    caps = {k: s.max_rank for k, s in spectra.items()}
    if budget.kind == "params":
        floor = minimum_cost(sv, costs, min_rank, caps)
        if floor > budget.value:
            raise BudgetError(f"{budget.describe()} is below the smallest possible result: "
                              f"rank {min_rank} for each of {len(sv)} modules needs "
                              f"{floor:,.0f} parameters; give at least that")
        return allocate(sv, costs, budget.value, min_rank=min_rank, max_rank=caps)
    return allocate_error(sv, costs, budget.value, min_rank=min_rank, max_rank=caps)


def _fit_bytes(template, spectra, budget, dtype, provenance, min_rank, keep_record=()):
    """Ranks and file bytes for a byte budget: allocate, serialise, measure, lower, repeat."""
    bpp = torch.empty((), dtype=dtype).element_size()
    sv = {k: s.s for k, s in spectra.items()}
    costs = {k: s.rank_cost * bpp for k, s in spectra.items()}
    caps = {k: s.max_rank for k, s in spectra.items()}
    floor = max(min_rank, 1)  # min_rank 0: the header of every module is still counted
    lo = {k: min(floor, caps[k]) for k in spectra}
    smallest = len(serialize(build(template, spectra, lo, dtype, budget, provenance, True,
                                   keep_record)))
    if smallest > budget.value:
        raise BudgetError(
            f"{budget.describe()} is below the smallest file these {len(spectra)} modules fit in "
            f"(rank {floor} each, header and metadata included: {smallest:,} bytes): give at "
            f"least {smallest / MB:.3f} MB")
    overhead = smallest - minimum_cost(sv, costs, floor, caps)
    target, step = budget.value - overhead, min(costs.values())
    best, fits, over = None, None, None  # the largest target that fit, the smallest that did not
    for _ in range(16):
        ranks = allocate(sv, costs, max(target, 0), min_rank=min_rank, max_rank=caps)
        lora = build(template, spectra, ranks, dtype, budget, provenance,
                     keep_record=keep_record)
        data = serialize(lora)
        gap = budget.value - len(data)  # the header grew (wider numbers) or shrank (modules
        if gap >= 0:                    # left out at min_rank 0): move the tensor budget by it
            if best is None or len(data) > len(best[2]):
                best = ranks, lora, data
            if len(data) >= LOWER_BOUND * budget.value:
                break
            fits = target
        else:
            over = target
        if fits is not None and over is not None:  # a module let back in brings its header:
            if over - fits < step:                  # bisect between the two
                break
            target = (fits + over) / 2
        else:
            target = target + gap if gap >= 0 else \
                sum(ranks[k] * costs[k] for k in ranks) + gap
    if best is None:
        raise BudgetError(f"could not fit {budget.describe()} after 16 tries; please report this")
    return best


def refactor(template: LoraFile, spectra: Mapping[str, Spectrum], budget: Budget,
             dtype: torch.dtype, provenance: dict, *, min_rank: int = 1,
             names: Mapping[str, str] | None = None, ranks_before: Mapping[str, int] | None = None,
             source_bytes: int | None = None, keep_record: tuple[str, ...] = ()
             ) -> CompressResult:
    """Choose ranks for ``budget`` jointly over ``spectra`` and build the file."""
    if not spectra:
        raise BudgetError("there are no LoRA modules to compress")
    if budget.kind == "bytes":
        ranks, lora, data = _fit_bytes(template, spectra, budget, dtype, provenance, min_rank,
                                       keep_record)
    else:
        ranks = choose_ranks(spectra, budget, min_rank=min_rank)
        lora = build(template, spectra, ranks, dtype, budget, provenance,
                     keep_record=keep_record)
        data = serialize(lora)
    return _result(lora, data, spectra, ranks, budget, names or {}, ranks_before or {},
                   source_bytes)


def _result(lora, data, spectra, ranks, budget, names, before, source_bytes) -> CompressResult:
    rows = [ModuleResult(k, names.get(k, k), before.get(k, s.s.numel()), ranks[k], s.m, s.n,
                         s.rel_error(ranks[k]),
                         ranks[k] == s.dense_cap < s.numerical_rank)
            for k, s in spectra.items()]
    err = total_rel_error({k: s.s for k, s in spectra.items()}, ranks)
    res = CompressResult(lora, data, budget, rows, err, source_bytes)
    capped = [r for r in rows if r.at_dense_cap]
    if capped:
        res.notes.append(
            f"{len(capped)} module(s) stop at the dense cost (rank r with r (m + n) >= m n would "
            f"store more than Delta W itself), e.g. {capped[0].key} at rank {capped[0].rank}; "
            "they stay LoRA modules so every loader reads the file")
    full = all(ranks[k] >= s.max_rank for k, s in spectra.items())
    if budget.kind == "bytes" and len(data) < LOWER_BOUND * budget.value:
        why = ("the next direction of any module would exceed the budget" if not full else
               "every direction is kept: the exact result is smaller than the budget"
               if not capped else "every module is at its largest useful rank (all its "
               "directions, or the dense cost)")
        res.notes.append(f"the file is {len(data) / budget.value:.1%} of the budget: {why}")
    if budget.kind == "error" and err > budget.value:
        res.notes.append(f"error {err:.4g} > tolerance {budget.value:g}: the dense caps stop it")
    return res


def _unchanged(lora: LoraFile, budget: Budget, dtype: torch.dtype, data: bytes) -> bool:
    if next(iter(lora.modules.values())).down.dtype != dtype:
        return False
    if budget.kind == "bytes":
        return len(data) <= budget.value
    if budget.kind == "params":
        return sum(w.rank * (w.up.shape[0] + w.down.flatten(1).shape[1])
                   for w in lora.modules.values()) <= budget.value
    return False


def compress(lora: LoraFile, budget: Budget, dtype: str | torch.dtype | None = None, *,
             min_rank: int = 1) -> CompressResult:
    """``lora`` refactored under ``budget`` with ranks chosen jointly over all its modules.

    A LoRA that already fits the budget (bytes or params, same dtype) comes back unchanged.
    ``dtype``: the save dtype (default: the source's). ``min_rank``: the fewest directions a
    module keeps (0 lets the allocator drop modules whose update is negligible).
    """
    dt = save_dtype(lora, dtype)
    data = serialize(lora)
    names = _names(lora)
    if _unchanged(lora, budget, dt, data):
        rows = [ModuleResult(k, names[k], w.rank, w.rank, w.up.shape[0],
                             w.down.flatten(1).shape[1], 0.0) for k, w in lora.modules.items()]
        return CompressResult(lora, data, budget, rows, 0.0, len(data),
                              ["the LoRA already fits the budget: returned unchanged"],
                              unchanged=True)
    provenance = {"method": "joint-svd", "source": lora.path.name if lora.path else None,
                  "source_bytes": len(data)}
    return refactor(lora, module_spectra(lora), budget, dt, provenance, min_rank=min_rank,
                    names=names, ranks_before=lora.ranks(), source_bytes=len(data))
