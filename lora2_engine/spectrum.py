"""Singular spectra of LoRA modules, and refactoring a module to a chosen rank.

A LoRA module's update ``Delta W = up @ down * scale`` has rank <= r, so its SVD never needs the
dense (m, n) matrix: thin QR of ``up`` and ``down^T`` reduces it to an r x r SVD. Merges that
act entry-wise (TIES, DARE) do need the dense matrix; for those only the singular values are
kept and the vectors are recomputed for the chosen rank, so memory stays at one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .formats.lora_file import ModuleWeights

_EPS64 = torch.finfo(torch.float64).eps
_EPS32 = torch.finfo(torch.float32).eps


def _numerical_zeros(s: torch.Tensor, m: int, n: int, eps: float) -> torch.Tensor:
    """Zero the singular values below the rounding floor (numpy's matrix_rank tolerance)."""
    if s.numel() and float(s[0]) > 0:
        s = torch.where(s > float(s[0]) * max(m, n) * eps, s, torch.zeros_like(s))
    return s


@dataclass
class Spectrum:
    """``Delta W`` (m, n) of one module as ``U diag(s) Vh``, plus how to write it back.

    ``n`` is the flattened input side (``in * kh * kw`` for a conv); ``down_tail`` and
    ``up_tail`` are the trailing shapes a rank-r ``down`` (r, *down_tail) and ``up``
    (m, r, *up_tail) take in the file, so a LoCon 3x3 module stays a LoCon 3x3 module.
    """

    s: torch.Tensor  # (k,) float64, descending; numerical zeros are exactly 0
    m: int
    n: int
    down_tail: tuple[int, ...]
    up_tail: tuple[int, ...]
    _u: torch.Tensor | None = None  # (m, k') with k' <= k: the vectors kept so far
    _vh: torch.Tensor | None = None  # (k', n)
    _dense: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                     ) -> Spectrum:
        """Exact SVD of ``up @ down * scale`` through QR of the thin factors (float64)."""
        u = up.flatten(1).double()  # (m, r)
        d = down.flatten(1).double()  # (r, n)
        qu, ru = torch.linalg.qr(u)  # (m, p), (p, r)
        qd, rd = torch.linalg.qr(d.T)  # (n, q), (q, r)
        uc, s, vch = torch.linalg.svd(ru @ rd.T * scale)  # (p, q) core
        m, n = u.shape[0], d.shape[1]
        s = _numerical_zeros(s, m, n, 16 * _EPS64)
        # vectors kept in float32 (a 900 MB LoRA's spectra then take ~2x its fp16 size)
        return cls(s, m, n, tuple(down.shape[1:]), tuple(up.shape[2:]), (qu @ uc).float(),
                   (vch @ qd.T).float())

    @classmethod
    def from_module(cls, w: ModuleWeights) -> Spectrum:
        return cls.from_factors(w.up, w.down, w.scale)

    @classmethod
    def from_dense(cls, make: Callable[[], torch.Tensor], down_tail: tuple[int, ...],
                   up_tail: tuple[int, ...] = ()) -> Spectrum:
        """Singular values of ``make()`` (m, n); the vectors are recomputed when needed.

        ``make`` must return the same matrix every time (seed any randomness in it).
        """
        delta = make().float()
        m, n = delta.shape
        s = _numerical_zeros(torch.linalg.svdvals(delta).double(), m, n, _EPS32)
        return cls(s, m, n, tuple(down_tail), tuple(up_tail), _dense=make)

    # -- sizes and errors ---------------------------------------------------------------------
    @property
    def rank_cost(self) -> int:
        """Parameters one rank costs: a column of ``up`` and a row of ``down``."""
        return self.m + self.n

    @property
    def numerical_rank(self) -> int:
        return int((self.s > 0).sum())

    @property
    def dense_cap(self) -> int:
        """The largest rank that still costs fewer parameters than the dense ``m x n`` update.

        From ``r (m + n) >= m n`` on, a factorisation stores more than ``Delta W`` itself, so
        no rank beyond this is worth its bytes; at least 1.
        """
        return max(1, (self.m * self.n - 1) // (self.m + self.n))

    @property
    def max_rank(self) -> int:
        """Ranks beyond this remove no error or cost more than the dense update."""
        return max(1, min(self.numerical_rank, self.dense_cap))

    @property
    def energy(self) -> float:
        """``||Delta W||_F^2``."""
        return float((self.s ** 2).sum())

    def tail_energy(self, rank: int) -> float:
        """``||Delta W - Delta W_r||_F^2`` for the best rank-``rank`` approximation."""
        return float((self.s[rank:] ** 2).sum())

    def rel_error(self, rank: int) -> float:
        """Relative Frobenius error of the rank-``rank`` truncation (0 for a zero update)."""
        e = self.energy
        return (self.tail_energy(rank) / e) ** 0.5 if e > 0 else 0.0

    # -- writing back ---------------------------------------------------------------------------
    def _vectors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._u is None or self._u.shape[1] < rank:
            if self._dense is None:
                raise ValueError(f"rank {rank} exceeds this module's {self.s.numel()} "
                                 "singular directions")
            u, _, vh = torch.linalg.svd(self._dense().float(), full_matrices=False)
            self._u, self._vh = u[:, :rank].contiguous(), vh[:rank].contiguous()
        return self._u[:, :rank], self._vh[:rank]

    def factors(self, rank: int, dtype: torch.dtype = torch.float32, gain: float = 1.0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down) = (U sqrt(S g), sqrt(S g) Vh)`` at ``rank``, shaped as the file stores
        them (``g = gain``: ``up @ down = gain * Delta W_rank``).

        Splitting ``S`` evenly keeps both factors in the same range (fp16/bf16 safe).
        """
        u, vh = self._vectors(rank)
        u, vh = u.double(), vh.double()
        root = (self.s[:rank] * gain).sqrt()
        up = (u * root[None, :]).to(dtype).reshape(self.m, rank, *self.up_tail)
        down = (root[:, None] * vh).to(dtype).reshape(rank, *self.down_tail)
        return up.contiguous(), down.contiguous()

    def module(self, rank: int, dtype: torch.dtype = torch.float32,
               alpha: float | None = None) -> ModuleWeights:
        """The module at ``rank`` stored with ``alpha`` (default ``rank``: scale 1); the
        factors carry ``rank / alpha`` so every loader's ``alpha / rank`` gives ``Delta W``."""
        alpha = float(rank) if alpha is None else float(alpha)
        up, down = self.factors(rank, dtype, gain=rank / alpha)
        return ModuleWeights(down, up, alpha)
