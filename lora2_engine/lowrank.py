"""Exact low-rank algebra on LoRA factors: the SVD of ``up @ down`` without forming it.

``Delta W = up @ down`` has rank at most ``r``; a thin QR of each factor reduces its SVD to an
``r x r`` problem, so an ``m x n`` update of any size costs ``O((m + n) r^2)``. Used when a
trained adapter is exported (its numerical rank, not its training capacity, is what the file
needs) and by the compression tools.
"""

from __future__ import annotations

import torch


def factor_svd(up: torch.Tensor, down: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` with ``up @ down = U diag(S) V^T``; ``U``: (m, r), ``V``: (n, r), fp64.

    ``up``: (m, r), ``down``: (r, n). Singular values come sorted, largest first.
    """
    qu, ru = torch.linalg.qr(up.double())  # (m, r), (r, r)
    qd, rd = torch.linalg.qr(down.double().T)  # (n, r), (r, r)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, qd @ vh.T


def rank_for_tolerance(s: torch.Tensor, tol: float) -> int:
    """Smallest ``k`` whose truncation error ``||Delta W - Delta W_k||_F`` is at most
    ``tol * ||Delta W||_F`` (0 when ``Delta W`` is zero)."""
    energy = s.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[i] = sum_{j>=i}
    allowed = (tol**2) * total
    return int((tail > allowed).sum())


def truncate(up: torch.Tensor, down: torch.Tensor, rank: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``up @ down`` (Eckart–Young), singular values split
    evenly: ``(U sqrt(S), sqrt(S) V^T)`` in the input's dtype."""
    u, s, v = factor_svd(up, down)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (u[:, :k] * root).to(up.dtype), (root[:, None] * v[:, :k].T).to(down.dtype)
