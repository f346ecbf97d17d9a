"""Size budgets and the joint rank allocator: bytes go where the error is largest.

Keeping the i-th singular direction of module l removes ``s_li^2`` of squared Frobenius error
and costs ``c_l = (m_l + n_l) * bytes_per_param``. The total error is a sum over modules, and
within a module the gains ``s_li^2`` never increase with i, so taking directions in order of
``s_li^2 / c_l`` across the whole file is the greedy solution of a knapsack whose items come
in sorted chains. Every prefix of that order is optimal for the cost it spends (it is the
LP-relaxation optimum, and integral there); the leftover budget, less than one direction of
some module, is then filled with the best directions that still fit. Per-module thresholds
(sd-scripts' ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``) decide each module alone and
cannot trade error between modules; see ``tests/test_budget.py`` for a case they lose.

The allocator knows nothing about files: ``allocate(spectra, costs, budget)`` works for any
per-module singular values and any cost unit (bytes, parameters), e.g. a trained LoRA²
adapter's spectra when trimming it to a size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

MB = 1_000_000  # budgets in MB are SI megabytes (10^6 bytes), as the reports print them
KINDS = ("bytes", "params", "error")


class BudgetError(ValueError):
    """A budget cannot be met or makes no sense; the message names the value and the fix."""


@dataclass(frozen=True)
class Budget:
    """What a compressed or merged file must fit: file bytes on disk, parameters, or error.

    ``bytes``: the whole file (header, metadata, alphas included) <= value.
    ``params``: the factor parameters ``sum r (m + n)`` <= value.
    ``error``: the total relative Frobenius error of ``Delta W`` over the file <= value.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BudgetError(f"budget kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        v = self.value
        if not isinstance(v, (int, float)) or v != v:
            raise BudgetError(f"budget {v!r} is not a number: give e.g. a size in MB")
        if self.kind == "error":
            if not 0 <= v < 1:
                raise BudgetError(f"error tolerance {v} must be in [0, 1): e.g. 0.05 keeps "
                                  "95% of Delta W in Frobenius norm")
        elif v <= 0:
            unit = "a size such as --size-mb 40" if self.kind == "bytes" else "--params 1000000"
            raise BudgetError(f"a {self.kind} budget must be positive, got {v:g}: give {unit}")

    @classmethod
    def megabytes(cls, mb: float) -> Budget:
        if not isinstance(mb, (int, float)) or not mb > 0:
            raise BudgetError(f"size budget {mb!r} MB must be positive: e.g. 40 for a 40 MB file")
        return cls("bytes", int(mb * MB))

    @classmethod
    def of_bytes(cls, n: int) -> Budget:
        return cls("bytes", int(n) if n == int(n) else n)

    @classmethod
    def of_params(cls, n: int) -> Budget:
        return cls("params", int(n) if n == int(n) else n)

    @classmethod
    def of_error(cls, tol: float) -> Budget:
        return cls("error", float(tol))

    def describe(self) -> str:
        if self.kind == "bytes":
            return f"{self.value / MB:.6g} MB ({int(self.value):,} bytes)"
        if self.kind == "params":
            return f"{int(self.value):,} parameters"
        return f"relative error <= {self.value:g}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value}


def _bounds(spectra: Mapping[str, torch.Tensor], min_rank: int,
            max_rank: Mapping[str, int] | None) -> dict[str, tuple[int, int]]:
    out = {}
    for name, s in spectra.items():
        hi = len(s) if max_rank is None else min(len(s), max_rank.get(name, len(s)))
        out[name] = (min(min_rank, max(hi, 0)), max(hi, 0))
    return out


def _candidates(spectra, costs, bounds):
    """Every direction beyond the minimum ranks: (gain per cost, cost, module index)."""
    ratios, cost, owner = [], [], []
    for i, (name, s) in enumerate(spectra.items()):
        lo, hi = bounds[name]
        gains = s[lo:hi].double() ** 2
        gains = gains[gains > 0]  # a zero direction removes no error: never worth bytes
        c = float(costs[name])
        if c <= 0:
            raise BudgetError(f"module {name!r} has cost {c}: every rank must cost something")
        ratios.append(gains / c)
        cost.append(torch.full_like(gains, c))
        owner.append(torch.full(gains.shape, i, dtype=torch.long))
    if not ratios:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), \
            torch.zeros(0, dtype=torch.long)
    ratio, cost, owner = torch.cat(ratios), torch.cat(cost), torch.cat(owner)
    order = torch.sort(ratio, descending=True, stable=True).indices  # ties keep chain order
    return ratio[order], cost[order], owner[order]


def minimum_cost(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, float],
                 min_rank: int = 1, max_rank: Mapping[str, int] | None = None) -> float:
    """What the minimum ranks cost: below this no allocation exists."""
    bounds = _bounds(spectra, min_rank, max_rank)
    return sum(bounds[n][0] * float(costs[n]) for n in spectra)


def allocate(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, float], budget: float,
             *, min_rank: int = 1, max_rank: Mapping[str, int] | None = None
             ) -> dict[str, int]:
    """Ranks per module that keep the most ``sum s^2`` for total cost <= ``budget``.

    ``spectra``: singular values per module, descending. ``costs``: cost of one rank of each
    module, in the unit of ``budget``. Every module keeps at least ``min_rank`` directions and
    at most ``max_rank[name]`` (default: all); a :class:`BudgetError` says when the minimum
    ranks alone exceed the budget.
    """
    bounds = _bounds(spectra, min_rank, max_rank)
    floor = minimum_cost(spectra, costs, min_rank, max_rank)
    if floor > budget:
        raise BudgetError(f"budget {budget:,.0f} is below the minimum {floor:,.0f} "
                          f"({min_rank} rank(s) for each of {len(spectra)} modules)")
    names = list(spectra)
    ratio, cost, owner = _candidates(spectra, costs, bounds)
    left = budget - floor
    taken = torch.zeros(len(names), dtype=torch.long)
    n_prefix = int(torch.searchsorted(torch.cumsum(cost, 0), torch.tensor(left, dtype=cost.dtype),
                                      right=True))
    taken += torch.bincount(owner[:n_prefix], minlength=len(names))
    left -= float(cost[:n_prefix].sum())
    for c, i in zip(cost[n_prefix:].tolist(), owner[n_prefix:].tolist()):
        if c <= left:  # a skipped module's later directions cost the same: chains stay prefixes
            taken[i] += 1
            left -= c
    return {n: bounds[n][0] + int(taken[i]) for i, n in enumerate(names)}


def allocate_error(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, float],
                   tolerance: float, *, min_rank: int = 1,
                   max_rank: Mapping[str, int] | None = None) -> dict[str, int]:
    """The cheapest ranks whose total relative Frobenius error is <= ``tolerance``.

    The error is over the whole file: ``sqrt(sum dropped s^2 / sum s^2)``. Directions are
    added in the same gain-per-cost order as :func:`allocate`; if the ``max_rank`` caps stop
    it first, the capped ranks are returned (the caller reports the error reached).
    """
    bounds = _bounds(spectra, min_rank, max_rank)
    total = sum(float((s.double() ** 2).sum()) for s in spectra.values())
    kept = sum(float((s[: bounds[n][0]].double() ** 2).sum()) for n, s in spectra.items())
    names = list(spectra)
    ratio, cost, owner = _candidates(spectra, costs, bounds)
    need = total * (1 - tolerance ** 2) - kept  # energy still to keep
    gains = ratio * cost
    n_take = 0 if need <= 0 else int(torch.searchsorted(torch.cumsum(gains, 0),
                                                        torch.tensor(need, dtype=gains.dtype)))
    n_take = min(n_take + (need > 0), len(gains))
    taken = torch.bincount(owner[:n_take], minlength=len(names))
    return {n: bounds[n][0] + int(taken[i]) for i, n in enumerate(names)}


def total_rel_error(spectra: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> float:
    """``||Delta W - Delta W_ranks||_F / ||Delta W||_F`` over all modules together."""
    total = sum(float((s.double() ** 2).sum()) for s in spectra.values())
    lost = sum(float((spectra[n][r:].double() ** 2).sum()) for n, r in ranks.items())
    return (lost / total) ** 0.5 if total > 0 else 0.0
