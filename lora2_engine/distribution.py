"""The rank distribution of LoRA² (paper Eq. 4-6): a discretized exponential over rank slots.

Slot ``x`` (0-based) of a component gets weight ``f(x; nu) = exp(-nu x) - exp(-nu (x+1))``.
The component's rank ``D`` is the smallest count of slots whose mass reaches ``q``.
No ``nn.Module`` here: these are the closed forms every other module builds on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Rounding guard so that D(nu_target(r)) == r despite floating point.
_EPS = 1e-6


def slot_weights(nu: torch.Tensor, rank: int, renormalize: bool = True,
                 q: float = 0.9, r_max: int = 512) -> torch.Tensor:
    """Return ``f(0..rank-1; nu)``, differentiable in ``nu``.

    With ``renormalize`` the weights are divided by their mass over the ``D(nu)`` slots (as AWN
    does; the paper does not say, the difference is at most ``1/q``). The normaliser counts
    ``D(nu)``, not the active length, so growing a layer at fixed ``nu`` changes nothing.
    """
    x = torch.arange(rank, dtype=nu.dtype, device=nu.device)
    f = torch.exp(-nu * x) * (-torch.expm1(-nu))  # e^{-nu x} (1 - e^{-nu}), stable for small nu
    if renormalize:
        d = torch.ceil(-math.log1p(-q) / nu.detach() - _EPS).clamp(1, r_max)  # D(nu), no sync
        f = f / (-torch.expm1(-nu * d))  # sum_{x<D} f = 1 - e^{-nu D}
    return f


def slot_weights_batched(nu: torch.Tensor, width: int, renormalize: bool = True,
                         q: float = 0.9, r_max: int = 512) -> torch.Tensor:
    """:func:`slot_weights` for a vector of ``nu`` at once: ``(L,) -> (L, width)``."""
    x = torch.arange(width, dtype=nu.dtype, device=nu.device)
    nu = nu[:, None]
    f = torch.exp(-nu * x) * (-torch.expm1(-nu))
    if renormalize:
        d = torch.ceil(-math.log1p(-q) / nu.detach() - _EPS).clamp(1, r_max)
        f = f / (-torch.expm1(-nu * d))
    return f


def rank_from_nu(nu: float, q: float = 0.9, r_max: int = 512) -> int:
    """``D = ceil(-ln(1-q) / nu)`` clamped to ``[1, r_max]`` (paper Eq. 6)."""
    if not nu > 0:
        return r_max
    d = math.ceil(-math.log1p(-q) / nu - _EPS)
    return int(min(max(d, 1), r_max))


def nu_for_rank(rank: float, q: float = 0.9) -> float:
    """The ``nu`` whose rank is exactly ``rank`` (the paper's ``nu_target``, Eq. 13)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return -math.log1p(-q) / rank


def nu_floor(r_max: int, q: float = 0.9) -> float:
    """Smallest useful ``nu``: below it ``D`` would exceed ``r_max``."""
    return nu_for_rank(r_max, q)


def nu_from_param(p: torch.Tensor, floor: float) -> torch.Tensor:
    """``nu = floor + softplus(p)``: positive, smooth, never below the floor."""
    return floor + F.softplus(p)


def param_from_nu(nu: float, floor: float) -> float:
    """Inverse of :func:`nu_from_param` (clamped just above the floor)."""
    y = max(nu - floor, 1e-6)
    return y + math.log(-math.expm1(-y))  # softplus^{-1}(y) = log(e^y - 1)
