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


def dense_cap(m: int, n: int) -> int:
    """Largest useful rank of an ``m x n`` update: from ``r (m + n) >= m n`` on a dense
    ``Delta W`` would be no larger than its factors, so more rank only adds bytes."""
    return max(1, (m * n - 1) // (m + n))


def _in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.groups == 1:
        return base.in_channels, base.out_channels
    raise TypeError(f"{type(base).__name__} cannot carry a LoRA: use nn.Linear or a 1x1 Conv2d")


class LoRALayer(nn.Module):
    """``y = base(x) + scale * B diag(lam) A x`` with a fixed rank (the baseline: lam = 1).

    ``slot_init`` chooses how a slot that becomes active starts: ``"random"`` (A Gaussian, B
    zero: PEFT's LoRA) or ``"gradient"`` (A and B zero until the next backward pass, then A is
    set to the leading right singular directions of the loss gradient w.r.t. ``Delta W`` that
    the active slots do not already cover: see :meth:`init_pending_from_gradient`).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None, slot_init: str = "random") -> None:
        super().__init__()
        self.n, self.m = _in_out(base)
        self.base = base
        self.is_conv = isinstance(base, nn.Conv2d)
        self.alpha = float(rank if alpha is None else alpha)
        self.rank = 0
        self.slot_init = slot_init
        self.pending = 0  # trailing active slots waiting for their gradient initialisation
        self._grad_sum: torch.Tensor | None = None  # sum of dL/dDeltaW while slots are pending
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

    def slot_row_norms(self, scale: torch.Tensor) -> torch.Tensor:
        """Norms of gradient-initialised ``A`` rows (``scale``: their slot scales): the norm a
        random row would have."""
        return torch.full_like(scale, self.init_std() * math.sqrt(self.n))

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
        inactive; if they return they are re-initialised, as method.md §1 asks. With
        ``slot_init="gradient"`` new slots start with A and B zero and are *pending* until
        :meth:`init_pending_from_gradient` (the function is unchanged too).
        """
        old_rank, old_cap = self.rank, self.capacity
        if new_rank == old_rank:
            return None
        if new_rank < old_rank:  # a shrink drops the newest slots first, pending ones included
            self.pending = max(0, self.pending - (old_rank - new_rank))
        if new_rank > old_cap:  # geometric growth keeps reallocations rare
            cap = max(new_rank, min(2 * old_cap, getattr(self, "r_max", new_rank)))
            for name, shape, dim in (("A", (cap, self.n), 0), ("B", (self.m, cap), 1)):
                p = getattr(self, name)
                grown = torch.zeros(shape, dtype=p.dtype, device=p.device)
                grown.narrow(dim, 0, old_cap).copy_(p.data)
                p.data = grown  # same Parameter object: optimizer groups stay valid
        if new_rank > old_rank:
            self.rank = new_rank  # init_std may depend on the new rank (paper init)
            k = new_rank - old_rank
            if self.slot_init == "gradient":
                self.A.data[old_rank:new_rank] = 0
                self.B.data[:, old_rank:new_rank] = 0
                self.pending += k
                self.rank = new_rank
                return Resize(old_rank, new_rank, old_cap, self.capacity)
            std = self.init_std()
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
            out = y + F.conv2d(h, b.to(x.dtype)[:, :, None, None])
        else:
            out = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        if self.pending and out.requires_grad:
            xd = x.detach()
            out.register_hook(lambda g: self._add_grad(xd, g))
        return out

    # -- gradient initialisation of new slots -----------------------------------------------
    @torch.no_grad()
    def _add_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Accumulate ``dL/dDeltaW = sum_tokens grad_out^T x`` (the output is linear in it)."""
        if self.is_conv:  # (B, C, H, W) -> (B*H*W, C)
            x, grad_out = x.movedim(1, -1), grad_out.movedim(1, -1)
        g = grad_out.reshape(-1, self.m).float().T @ x.reshape(-1, self.n).float()  # (m, n)
        self._grad_sum = g if self._grad_sum is None else self._grad_sum + g

    @property
    def pending_grad(self) -> torch.Tensor | None:
        """The ``dL/dDeltaW`` accumulated for the pending slots this step (or ``None``)."""
        return self._grad_sum

    def clear_pending_grad(self) -> None:
        """Forget a partly accumulated gradient (a step that was rolled back)."""
        self._grad_sum = None

    @torch.no_grad()
    def init_pending_from_gradient(self, generator: torch.Generator | None = None) -> bool:
        """Give the pending slots the directions the loss most wants and that are not yet used.

        With ``G = dL/dDeltaW`` of this step, new ``A`` rows are the leading right singular
        vectors of ``G`` after projecting out the row space of the active ``A`` (rows with the
        norm a random row would have), and the new ``B`` columns get the gradient they would
        have had with those rows, ``G (Lambda A)^T``. B stays zero, so the function is
        unchanged until the optimizer step, which then moves along the steepest new directions
        instead of random ones (LoRA-GA / PiSSA's motivation, applied at every growth).
        """
        if not self.pending or self._grad_sum is None or self.B.grad is None:
            return False
        if not bool(torch.isfinite(self._grad_sum).all()):  # a bad step: the trainer stops it
            self._grad_sum = None
            return False
        g, k, r0 = self._grad_sum, self.pending, self.rank - self.pending
        if r0 > 0:  # the residual: directions the active slots' A rows do not span
            q, _ = torch.linalg.qr(self.A[:r0].float().T)  # (n, r0)
            g = g - (g @ q) @ q.T
        v = _top_right_singular(g, k)  # (n, k') with k' <= k
        if v.shape[1] < k:  # fewer directions than slots: fill with random orthogonal ones
            extra = torch.randn(self.n, k - v.shape[1], generator=generator)
            basis = torch.cat([self.A[:r0].float().T, v], 1) if r0 else v
            if basis.shape[1]:
                qb, _ = torch.linalg.qr(basis)
                extra = extra - qb @ (qb.T @ extra)
            v = torch.cat([v, extra / extra.norm(dim=0).clamp_min(1e-12)], 1)
        self.pending = 0
        scale = self.slot_scale().detach()[r0:self.rank].float()
        norms = self.slot_row_norms(scale)  # (k,)
        rows = (v.T * norms[:, None]).to(self.A)  # (k, n)
        self.A.data[r0:self.rank] = rows
        self.B.grad[:, r0:self.rank] = (self._grad_sum @ (rows.float() * scale[:, None]).T
                                        ).to(self.B.grad)
        self._grad_sum = None
        return True

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, rank={self.rank}, capacity={self.capacity}"


def _top_right_singular(g: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading right singular vectors of ``g`` as columns (fewer if ``g`` has fewer
    non-negligible singular values); randomized for large matrices."""
    small = min(g.shape)
    if small <= 512:
        _, s, vh = torch.linalg.svd(g, full_matrices=False)
        v = vh[:k].T
    else:
        _, s, v = torch.svd_lowrank(g, q=min(k + 8, small), niter=2)
        v = v[:, :k]
    s = s[:k]
    keep = s > (s[:1] * 1e-6 if len(s) else s)  # drop numerically zero directions
    return v[:, keep] if len(s) and s[0] > 0 else v[:, :0]


class AdaptiveLoRALayer(LoRALayer):
    """LoRA² (paper Eq. 4-6): ``Delta W = B Lambda A`` with ``Lambda = diag f(.; nu)``."""

    def __init__(self, base: nn.Module, config: AdapterConfig,
                 generator: torch.Generator | None = None) -> None:
        self.config = config  # plain attributes: read by the first resize
        self.r_max = config.r_max
        self.cached_scale: torch.Tensor | None = None  # set per step by Adapters.cache_scales
        self.floor = nu_floor(config.r_max, config.q)
        n, m = _in_out(base)
        super().__init__(base, min(config.init_rank, dense_cap(m, n)), alpha=None,
                         generator=generator, slot_init=config.slot_init)

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

    def slot_row_norms(self, scale: torch.Tensor) -> torch.Tensor:
        if self.config.slot_norm == "each":  # every slot's Lambda-weighted row at Kaiming norm
            return math.sqrt(2.0) / scale.clamp_min(1e-12)
        return super().slot_row_norms(scale)

    def init_std(self) -> float:
        with torch.no_grad():
            f = self.slot_scale()
        if self.config.init == "paper":  # sqrt 2 / sqrt(sum f^2)  (paper §3.3.1)
            return math.sqrt(2.0) / float(f.pow(2).sum().sqrt())
        return math.sqrt(2.0 / self.n) / float(f.max())  # first effective row at Kaiming scale
