"""Our re-implementation of kohya-ss/sd-scripts' dynamic LoRA resize rules (for comparison).

Written from the definitions in sd-scripts ``networks/resize_lora.py`` (``index_sv_ratio``,
``index_sv_fro``, ``index_sv_cumulative``, ``rank_resize``): each module's new rank is decided
from its own singular values alone, at least 1 and at most ``max_rank``:

- ``sv_ratio`` (t >= 1): keep the directions with ``s_i > s_0 / t``;
- ``sv_fro`` (t in (0, 1]): the fewest directions whose cumulative ``sum s_i^2 / sum s^2``
  reaches ``t^2`` (Frobenius norm retained >= t);
- ``sv_cumulative`` (t in (0, 1]): the fewest directions whose ``sum s_i / sum s`` reaches t;
- a zero module (``s_0 <= 1e-6``) gets rank 1.

sd-scripts cannot aim at a size: :func:`tune_threshold` bisects the threshold to the largest
total size that fits a budget, which is how the benchmark compares at equal bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

MIN_SV = 1e-6
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def _clamp(index: int, n: int) -> int:
    return max(0, min(index, n - 1))


def new_rank(s: torch.Tensor, method: str, param: float, max_rank: int | None = None) -> int:
    """sd-scripts' rank for one module with singular values ``s`` (descending)."""
    s = s.double()
    n = len(s)
    if method == "sv_ratio":
        index = _clamp(int((s > s[0] / param).sum()) - 1, n)
    elif method == "sv_fro":
        sq = s ** 2
        frac = torch.cumsum(sq, 0) / sq.sum()
        index = _clamp(int(torch.searchsorted(frac, torch.tensor(param ** 2, dtype=frac.dtype))),
                       n)
    elif method == "sv_cumulative":
        frac = torch.cumsum(s, 0) / s.sum()
        index = _clamp(int(torch.searchsorted(frac, torch.tensor(param, dtype=frac.dtype))), n)
    else:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    rank = index + 1
    if float(s[0]) <= MIN_SV:
        return 1
    return min(rank, max_rank) if max_rank else rank


def ranks_for(spectra: Mapping[str, torch.Tensor], method: str, param: float,
              max_rank: int | None = None) -> dict[str, int]:
    return {k: new_rank(s, method, param, max_rank) for k, s in spectra.items()}


def param_range(method: str) -> tuple[float, float]:
    """The threshold interval, ordered so that a larger value never gives smaller ranks."""
    return (1.0, 1e8) if method == "sv_ratio" else (1e-6, 1.0)


def tune_threshold(method: str, size_of: Callable[[float], float], budget: float,
                   iters: int = 60) -> float:
    """The threshold whose result is the largest that still fits ``budget`` (bisection).

    Ranks grow monotonically with the threshold (``sv_ratio`` bisected in log space), so the
    size is a non-decreasing step function of it; the lower end always fits when any does.
    """
    lo, hi = param_range(method)
    if size_of(hi) <= budget:
        return hi
    log = method == "sv_ratio"
    for _ in range(iters):
        mid = (lo * hi) ** 0.5 if log else (lo + hi) / 2
        if size_of(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
