"""The adapters: a fixed-rank LoRA and the adaptive LoRA² layer, sharing everything but ranks.

Training layout (not the file layout): ``A`` is ``(capacity, n)`` and ``B`` is ``(m, capacity)``,
of which the first ``rank`` slots are active. Capacity grows geometrically, so memory follows
the current rank, not ``r_max``. :meth:`LoRALayer.resize` is the only method that changes shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .distribution import (
    nu_floor,
    nu_for_rank,
    nu_from_param,
    param_from_nu,
    slot_weights,
)


@dataclass(frozen=True)
class Resize:
    """What :meth:`LoRALayer.resize` changed, so the optimizer can follow (see ``optim.py``)."""

    old_rank: int
    new_rank: int
    old_capacity: int
    new_capacity: int


def _in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.groups == 1:
        return base.in_channels, base.out_channels
    raise TypeError(f"{type(base).__name__} cannot carry a LoRA: use nn.Linear or a 1x1 Conv2d")


class LoRALayer(nn.Module):
    """``y = base(x) + scale * B diag(lam) A x`` with a fixed rank (the baseline: lam = 1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n, self.m = _in_out(base)
        self.base = base
        self.is_conv = isinstance(base, nn.Conv2d)
        self.alpha = float(rank if alpha is None else alpha)
        self.rank = 0
        w = base.weight
        self.A = nn.Parameter(torch.zeros(0, self.n, dtype=torch.float32, device=w.device))
        self.B = nn.Parameter(torch.zeros(self.m, 0, dtype=torch.float32, device=w.device))
        self._init_rank_params()
        self.resize(rank, generator)

    def _init_rank_params(self) -> None:
        """Hook for parameters that the first :meth:`resize` needs (LoRA²: ``nu``)."""

    # -- what subclasses change -------------------------------------------------------------
    def slot_scale(self) -> torch.Tensor:
        """Per-slot multiplier of the active slots (fixed LoRA: ``alpha / r`` everywhere)."""
        return torch.full((self.rank,), self.alpha / self.rank, device=self.A.device)

    def init_std(self) -> float:
        """Std of new ``A`` rows: PEFT's kaiming-uniform(a=sqrt 5) has std ``1/sqrt(3 n)``."""
        return 1.0 / math.sqrt(3 * self.n)

    # -- shape ----------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    @torch.no_grad()
    def resize(self, new_rank: int, generator: torch.Generator | None = None,
               random_b: bool = False) -> Resize | None:
        """Make ``new_rank`` slots active; slots that become active are freshly initialised.

        New ``A`` rows follow :meth:`init_std`, new ``B`` columns are zero so the layer's
        function is unchanged at the moment of growth. Slots dropped by a shrink are simply
        inactive; if they return they are re-initialised, as method.md §1 asks.
        """
        old_rank, old_cap = self.rank, self.capacity
        if new_rank == old_rank:
            return None
        if new_rank > old_cap:  # geometric growth keeps reallocations rare
            cap = max(new_rank, min(2 * old_cap, getattr(self, "r_max", new_rank)))
            for name, shape, dim in (("A", (cap, self.n), 0), ("B", (self.m, cap), 1)):
                p = getattr(self, name)
                grown = torch.zeros(shape, dtype=p.dtype, device=p.device)
                grown.narrow(dim, 0, old_cap).copy_(p.data)
                p.data = grown  # same Parameter object: optimizer groups stay valid
        if new_rank > old_rank:
            self.rank = new_rank  # init_std may depend on the new rank (paper init)
            std = self.init_std()
            k = new_rank - old_rank
            a = torch.randn(k, self.n, generator=generator, dtype=torch.float32)
            self.A.data[old_rank:new_rank] = (a * std).to(self.A)
            if random_b:
                b = torch.randn(self.m, k, generator=generator, dtype=torch.float32)
                self.B.data[:, old_rank:new_rank] = (b * std).to(self.B)
            else:
                self.B.data[:, old_rank:new_rank] = 0
        self.rank = new_rank
        return Resize(old_rank, new_rank, old_cap, self.capacity)

    # -- maths ----------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Active ``(B', A')`` with the slot scale folded into A: ``delta = B' @ A'``."""
        s = self.slot_scale()
        return self.B[:, : self.rank], self.A[: self.rank] * s[:, None]

    def delta_weight(self) -> torch.Tensor:
        """``Delta W = B diag(scale) A`` as an ``(m, n)`` matrix."""
        b, a = self.factors()
        return b @ a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b, a = self.factors()
        if self.is_conv:
            h = F.conv2d(x, a.to(x.dtype)[:, :, None, None])
            return y + F.conv2d(h, b.to(x.dtype)[:, :, None, None])
        return y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, rank={self.rank}, capacity={self.capacity}"


class AdaptiveLoRALayer(LoRALayer):
    """LoRA² (paper Eq. 4-6): ``Delta W = B Lambda A`` with ``Lambda = diag f(.; nu)``."""

    def __init__(self, base: nn.Module, config: AdapterConfig,
                 generator: torch.Generator | None = None) -> None:
        self.config = config  # plain attributes: read by the first resize
        self.r_max = config.r_max
        self.cached_scale: torch.Tensor | None = None  # set per step by Adapters.cache_scales
        self.floor = nu_floor(config.r_max, config.q)
        n, m = _in_out(base)
        super().__init__(base, min(config.init_rank, m, n), alpha=None, generator=generator)

    def _init_rank_params(self) -> None:
        # nu starts at the initial rank (nu_init); the init std of A depends on it.
        p0 = param_from_nu(nu_for_rank(self.config.init_rank, self.config.q), self.floor)
        self.nu_param = nn.Parameter(torch.tensor(p0, dtype=torch.float32, device=self.A.device))

    @property
    def nu(self) -> torch.Tensor:
        return nu_from_param(self.nu_param, self.floor)

    def slot_scale(self) -> torch.Tensor:
        if self.cached_scale is not None:
            return self.cached_scale
        c = self.config
        return slot_weights(self.nu, self.rank, c.renormalize, c.q, c.r_max)

    def init_std(self) -> float:
        with torch.no_grad():
            f = self.slot_scale()
        if self.config.init == "paper":  # sqrt 2 / sqrt(sum f^2)  (paper §3.3.1)
            return math.sqrt(2.0) / float(f.pow(2).sum().sqrt())
        return math.sqrt(2.0 / self.n) / float(f.max())  # first effective row at Kaiming scale
