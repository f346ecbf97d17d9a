import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class TinyAttnNet(torch.nn.Module):
    """Two blocks with attn1/attn2-named projections: a stand-in for a UNet's naming."""

    def __init__(self, dim: int = 16, ctx: int = 12, heads: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blocks = torch.nn.ModuleList()
        for _ in range(2):
            blk = torch.nn.Module()
            for attn, kv in (("attn1", dim), ("attn2", ctx)):
                a = torch.nn.Module()
                a.heads = heads
                a.to_q = torch.nn.Linear(dim, dim, bias=False)
                a.to_k = torch.nn.Linear(kv, dim, bias=False)
                a.to_v = torch.nn.Linear(kv, dim, bias=False)
                a.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim))
                setattr(blk, attn, a)
            self.blocks.append(blk)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    @staticmethod
    def _attend(a, x, kv):
        q, k, v = a.to_q(x), a.to_k(kv), a.to_v(kv)
        b, n, d = q.shape
        h = a.heads
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return a.to_out(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, x, context):
        for blk in self.blocks:
            x = x + self._attend(blk.attn1, x, x)
            x = x + self._attend(blk.attn2, x, context)
        return x


@pytest.fixture
def attn_net():
    return TinyAttnNet()


def activate_slots(layer, generator=None) -> None:
    """Tests that fake a trained adapter (random B) need A rows: gradient-initialised slots
    are zero until a backward pass, so give them the Gaussian rows random init would."""
    if layer.pending:
        r0 = layer.rank - layer.pending
        std = layer.init_std()
        rows = torch.randn(layer.pending, layer.n, generator=generator) * std
        layer.A.data[r0:layer.rank] = rows.to(layer.A)
        layer.pending = 0
