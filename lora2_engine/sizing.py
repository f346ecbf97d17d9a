"""Train to a size: give the run the capacity a budget needs, then spend exactly the budget.

A run with ``ExportConfig.size_mb`` (or ``.params``) differs from a plain run in two places.

1. **Capacity, before training** (:func:`capacity_config`). The rank regulariser
   ``lambda_r * |nu - nu_target|`` pulls every component toward ``r_target`` with a force of
   constant size, whatever the distance: a component whose fit pulls harder grows past
   ``r_target`` exactly as it would in a plain run, one whose fit does not care rests at it. So
   ``r_target`` decides where the idle components rest, i.e. the run's spare capacity, and not how
   far the needed ones grow. The budget sets ``r_target`` to :data:`CAPACITY` times the single
   rank that would spend the budget on tensors alone (the header makes that rank an
   over-estimate, on the safe side): the learned adapter then holds at least the budget, and the
   components that need rank hold more than the rest. ``bench/train_budget.py`` reports the
   learned size over the budget of every run.
2. **The budget, at export** (:func:`export_to_budget`). Every component's learned update
   ``B Lambda A`` at its trained rank is decomposed exactly and ``budget.allocate`` keeps the
   singular directions that remove the most error per byte across all components, until the
   file on disk (header and metadata included) is within 2% below the budget
   (``compress.refactor``, the same code as CompressLoRA). The ranks are the learned updates'
   own, trimmed where their spectra are weakest: not a uniform cut. The file's metadata and
   the report carry the budget, the bytes and each module's relative ``Delta W`` error.

A learned adapter smaller than the budget (a simple subject, a large budget, ranks capped by
``r_max`` or by the dense size of a layer) gives a smaller file, never one padded with directions
that were not learned; a warning says how much smaller and why.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from .budget import MB, Budget, BudgetError
from .compress import LOWER_BOUND, CompressResult, build, module_spectra, refactor, serialize
from .config import AdapterConfig, ExportConfig
from .formats.keys import OTHER, UNetLayout
from .formats.lora_file import LoraFile, adapters_to_lora
from .inject import Adapters, find_targets
from .layer import _in_out, dense_cap

CAPACITY = 1.25  # r_target = 1.25 x the budget's uniform rank: idle components rest there
METHOD = "train-to-budget"
KEEP = ("nu",)  # the learned nu stays in the file's record (compress drops it)
# room for the metadata to grow between the check before training and the export (wider
# numbers: ranks, nu, per-module errors): per module, plus a fixed part
_SLACK_PER_MODULE, _SLACK = 48, 1024


def bytes_per_param(export: ExportConfig) -> int:
    return torch.empty((), dtype=getattr(torch, export.dtype)).element_size()


def capacity_config(model: torch.nn.Module, adapter_cfg: AdapterConfig, export: ExportConfig
                    ) -> AdapterConfig:
    """``adapter_cfg`` with ``r_target`` derived from ``export``'s budget (see the module doc).

    The uniform rank ``r_B = budget / sum_l cost_l`` over the modules the config targets
    (cost: ``(m + n)`` parameters, times the save dtype's bytes for a size budget); ``r_target =
    ceil(CAPACITY * r_B)``, at least 1, at most ``r_max`` and the largest dense cap.
    ``init_rank`` is raised to ``r_target`` where below it: the idle components would climb
    there anyway, and a short run then has the capacity from its first step.
    """
    budget = export.budget
    if budget is None:
        return adapter_cfg
    names = find_targets(model, adapter_cfg.targets, adapter_cfg.exclude)
    shapes = [_in_out(model.get_submodule(n)) for n in names]
    unit = bytes_per_param(export) if budget.kind == "bytes" else 1
    uniform = budget.value / (unit * sum(n + m for n, m in shapes))
    cap = min(adapter_cfg.r_max, max(dense_cap(m, n) for n, m in shapes))
    r_target = min(cap, max(1, math.ceil(CAPACITY * uniform)))
    return dataclasses.replace(adapter_cfg, r_target=float(r_target),
                               init_rank=max(adapter_cfg.init_rank, r_target))


def _template(adapters: Adapters, export: ExportConfig, layout: UNetLayout, train_cfg,
              steps: int | None, extra: dict[str, str] | None) -> LoraFile:
    """The adapters as a LoRA at their trained ranks (``rank_tol`` 0): the budget decides."""
    full = dataclasses.replace(export, rank_tol=0.0)
    return adapters_to_lora(adapters, full, layout, train_cfg, steps, extra)


def _names(lora: LoraFile) -> dict[str, str]:
    """File key -> component name (split parts keep their own key)."""
    return {r["key"]: n for n, r in (lora.lora2_modules() or {}).items()}


def _provenance(learned_bytes: int, learned_params: int) -> dict:
    return {"method": METHOD, "learned_bytes": learned_bytes, "learned_params": learned_params}


def check_budget(adapters: Adapters, export: ExportConfig, layout: UNetLayout = OTHER,
                 train_cfg=None, steps: int | None = None,
                 extra: dict[str, str] | None = None) -> int:
    """Refuse, before training, a budget below rank 1 for every module; returns that floor.

    The floor is measured: the file with every module at rank 1 (zero tensors of the right
    shapes, the run's metadata), serialised, plus room for wider numbers at the end.
    """
    budget = export.budget
    lora = _template(adapters, export, layout, train_cfg, steps, extra)
    spectra = module_spectra(lora)
    ones = {k: 1 for k in spectra}
    dtype = getattr(torch, export.dtype)
    what = "size_mb" if budget.kind == "bytes" else "params"
    if budget.kind == "bytes":
        probe = build(lora, spectra, ones, dtype, budget, _provenance(10**9, 10**9),
                      placeholder=True, keep_record=KEEP)
        floor = len(serialize(probe)) + _SLACK_PER_MODULE * len(spectra) + _SLACK
        fix = f"give at least size_mb={math.ceil(floor / MB * 1000) / 1000:g}"
    else:
        floor = sum(s.rank_cost for s in spectra.values())
        fix = f"give at least params={floor}"
    if budget.value < floor:
        value = export.size_mb if budget.kind == "bytes" else export.params
        raise BudgetError(
            f"{what}={value:g} ({budget.describe()}) is below the smallest file this run can "
            f"write: rank 1 for each of its {len(spectra)} modules, header included, needs "
            f"{floor:,} {'bytes' if budget.kind == 'bytes' else 'parameters'}: {fix}, or "
            "train fewer modules (targets)")
    return floor


def export_to_budget(adapters: Adapters, export: ExportConfig, layout: UNetLayout = OTHER,
                     train_cfg=None, steps: int | None = None,
                     extra: dict[str, str] | None = None) -> CompressResult:
    """The trained adapters as a LoRA that fits ``export``'s budget (see the module doc).

    The result's ``data`` is the file; its ``notes`` say when the learned adapter was smaller
    than the budget (also warned).
    """
    budget: Budget = export.budget
    template = _template(adapters, export, layout, train_cfg, steps, extra)
    learned_bytes = len(serialize(template))
    learned_params = sum(w.rank * (w.up.shape[0] + w.down.flatten(1).shape[1])
                         for w in template.modules.values())
    spectra = module_spectra(template)

    def fit(min_rank: int) -> CompressResult:
        return refactor(template, spectra, budget, getattr(torch, export.dtype),
                        _provenance(learned_bytes, learned_params), min_rank=min_rank,
                        names=_names(template), ranks_before=template.ranks(),
                        source_bytes=learned_bytes, keep_record=KEEP)

    # A module whose learned update is negligible gets no bytes (rank 0: left out, as a plain
    # export leaves out an exactly-zero module). A module let back in costs its header too,
    # which the allocator does not see: if that leaves the file short of the budget, every
    # module keeps rank 1 instead (header known in advance) when that lands closer.
    def left(res: CompressResult) -> bool:  # learned directions the file does not hold
        return any(r.rank < spectra[r.key].max_rank and spectra[r.key].energy > 0
                   for r in res.rows)

    result = fit(0)
    if _short(result, budget) and left(result) and any(r.rank == 0 for r in result.rows):
        other = fit(1)
        if not _short(other, budget) or other.file_bytes > result.file_bytes:
            result = other
    if _short(result, budget) and not left(result):
        got = result.file_bytes if budget.kind == "bytes" else result.params
        unit = "bytes" if budget.kind == "bytes" else "parameters"
        kept = sum(r.rank for r in result.rows)
        msg = (f"the trained adapter is smaller than the budget {budget.describe()}: with every "
               f"learned direction kept (ranks sum {kept}, trained ranks sum "
               f"{sum(template.ranks().values())}) it is {got:,} {unit}, "
               f"{got / budget.value:.1%} of the budget; nothing is padded. For a larger "
               "file raise r_max or init_rank, train longer, or target more modules")
        result.notes = [n for n in result.notes if "of the budget" not in n] + [msg]
        warnings.warn(msg, stacklevel=2)
    return result


def _short(result: CompressResult, budget: Budget) -> bool:
    got = result.file_bytes if budget.kind == "bytes" else result.params
    return got < LOWER_BOUND * budget.value
