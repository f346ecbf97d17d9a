"""Gradient checkpointing by block wrapping, and in-place residuals made safe for autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora2_engine.checkpointing import OutOfPlaceAugmented, checkpointed_blocks


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.input_blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.GELU())
                                          for _ in range(3))
        self.out = nn.Linear(6, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / 3

    def forward(self, x, scale=1.0):
        for b in self.input_blocks:
            x = b(x) * scale
        return self.out(x)


def test_checkpointed_blocks_give_the_same_gradients_and_undo():
    net, x = _Blocks(), torch.randn(5, 6)
    plain = torch.autograd.grad(net(x, scale=0.5).sum(), list(net.parameters()))
    with checkpointed_blocks(net) as wrapped:
        assert len(wrapped) == 3
        ckpt = torch.autograd.grad(net(x, scale=0.5).sum(), list(net.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(plain, ckpt))
    assert all("forward" not in vars(b) for b in net.input_blocks)


class InplaceBlock(nn.Module):
    """A residual block written like ComfyUI's Flux blocks: ``x += f(norm(x))`` in place."""

    def __init__(self, dim: int, inplace: bool = True) -> None:
        super().__init__()
        self.norm, self.lin, self.inplace = nn.LayerNorm(dim), nn.Linear(dim, dim), inplace
        self.lin2 = nn.Linear(dim, dim)

    def forward(self, x, gate):
        if self.inplace:
            x += self.lin(self.norm(x)) * gate  # LayerNorm saved x: autograd needs it intact
            x += self.lin2(self.norm(x))
        else:
            x = x + self.lin(self.norm(x)) * gate
            x = x + self.lin2(self.norm(x))
        return x


class InplaceNet(nn.Module):
    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(InplaceBlock(8, inplace) for _ in range(2))

    def forward(self, x, gate):
        h = self.proj(x)
        for b in self.blocks:
            h = b(h, gate)
        return h


def _grads(net, x, gate):
    return torch.autograd.grad(net(x, gate).square().sum(), list(net.parameters()))


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_in_place_residual_blocks_get_exact_gradients(checkpoint):
    x, gate = torch.randn(3, 8), torch.rand(8) + 0.5
    reference = _grads(InplaceNet(inplace=False), x, gate)
    net = InplaceNet(inplace=True)
    with pytest.raises(RuntimeError, match="inplace"):
        _grads(net, x, gate)  # what autograd says without the guard
    with checkpointed_blocks(net, checkpoint=checkpoint, out_of_place=True):
        got = _grads(net, x, gate)
    for a, b in zip(reference, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpointing_alone_gets_in_place_blocks_wrong():
    """Why the guard exists: the recomputed activations are overwritten by the block's own
    ``+=`` (no error, wrong gradients) — measured on ComfyUI's Flux blocks too."""
    x, gate = torch.randn(3, 8), torch.rand(8) + 0.5
    reference = _grads(InplaceNet(inplace=False), x, gate)
    net = InplaceNet(inplace=True)
    with checkpointed_blocks(net, checkpoint=True, out_of_place=False):
        try:
            got = _grads(net, x, gate)
        except RuntimeError:
            return  # refused loudly: acceptable
    assert any(not torch.allclose(a, b, rtol=1e-4) for a, b in zip(reference, got))


def test_only_augmented_assignments_go_out_of_place():
    a, b = torch.ones(2), torch.ones(2)
    with OutOfPlaceAugmented():
        c = a
        c += b  # rebinds c: a unchanged
        d = a.clone()
        d.add_(b)  # an explicit in-place call stays in place
        e = a.clone()
        e *= 3
    assert torch.equal(a, torch.ones(2)) and torch.equal(c, torch.full((2,), 2.0))
    assert torch.equal(d, torch.full((2,), 2.0)) and torch.equal(e, torch.full((2,), 3.0))
