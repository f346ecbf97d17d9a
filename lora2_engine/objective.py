"""The LoRA² objective (paper Eq. 11-14) as plain functions, plus cross-attention capture.

``L = MSE(pred, target) + lambda_r * sum_l |nu_l - nu_target| + lambda_e * mean H(attn2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distribution import nu_for_rank
from .inject import Adapters


def mse_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE against the model's own target (eps, v or flow), in fp32 (Eq. 11)."""
    return F.mse_loss(pred.float(), target.float())


def rank_penalty(adapters: Adapters) -> torch.Tensor:
    """``sum_l |nu_l - nu_target|`` (Eq. 13): a pull toward ``r_target`` from both sides."""
    if not adapters.adaptive:
        return torch.zeros(())
    nu = adapters.stacked_nu()
    c = adapters.config
    return (nu - nu_for_rank(c.r_target, c.q)).abs().sum()


class _SoftmaxEntropy(torch.autograd.Function):
    """Mean over rows of ``H(softmax(s))``, one autograd node instead of six.

    ``dH/ds = -p (log p + H)`` row-wise; saving ``p`` and ``log p`` is all the backward needs.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores, dim=-1)
        p = logp.exp()
        h = -(p * logp).sum(-1, keepdim=True)  # (..., 1)
        ctx.save_for_backward(p, logp, h)
        return h.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        p, logp, h = ctx.saved_tensors
        return -p * (logp + h) * (grad / h.numel())


def attention_entropy(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Mean entropy of ``softmax(q k^T / sqrt d)`` over the keys (Eq. 14), in fp32.

    ``q``: (B, Nq, heads*d), ``k``: (B, Nk, heads*d); mean over batch, heads and queries.
    """
    b, nq, inner = q.shape
    d = inner // heads
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 → fp32; fp64 stays
    qh = (q.to(dtype) * d**-0.5).reshape(b, nq, heads, d).transpose(1, 2)  # (B, heads, Nq, d)
    kh = k.to(dtype).reshape(b, k.shape[1], heads, d).permute(0, 2, 3, 1)  # (B, heads, d, Nk)
    return _SoftmaxEntropy.apply(qh @ kh)  # scores (B, heads, Nq, Nk)


class EntropyCapture:
    """Records the cross-attention entropy of every ``attn2`` during a forward pass.

    Forward hooks on ``attn2.to_q`` and ``attn2.to_k`` see the (adapted) projections, so the
    attention itself keeps its fused kernel; ``q`` / ``k`` name other submodules whose outputs
    are the (B, N, heads*d) queries and keys (Wan: the q/k norms ``norm_q`` / ``norm_k``).
    Values are stored per layer and overwritten, so the recomputation of non-reentrant gradient
    checkpointing stores the same value again.
    """

    def __init__(self, model: nn.Module, pattern: str = "attn2", q: str = "to_q",
                 k: str = "to_k") -> None:
        self.values: dict[str, torch.Tensor] = {}
        self._q: dict[str, torch.Tensor] = {}
        self._handles = []
        self.enabled = True
        for name, module in model.named_modules():
            if not name.endswith(pattern):
                continue
            heads = getattr(module, "heads", None) or getattr(module, "num_heads", None)
            to_q, to_k = getattr(module, q, None), getattr(module, k, None)
            if heads is None or to_q is None or to_k is None:
                continue
            self._handles.append(to_q.register_forward_hook(self._store_q(name)))
            self._handles.append(to_k.register_forward_hook(self._store_k(name, int(heads))))
        self.num_layers = len(self._handles) // 2

    def _store_q(self, name: str):
        def hook(_m, _inp, out):
            if self.enabled:
                self._q[name] = out
        return hook

    def _store_k(self, name: str, heads: int):
        def hook(_m, _inp, out):
            if self.enabled and name in self._q:
                self.values[name] = attention_entropy(self._q.pop(name), out, heads)
        return hook

    def mean(self) -> torch.Tensor:
        """Mean entropy over the captured layers (zero when none were captured)."""
        if not self.values:
            return torch.zeros(())
        return torch.stack(list(self.values.values())).mean()

    def clear(self) -> None:
        self.values.clear()
        self._q.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
