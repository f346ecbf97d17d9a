"""The entropy term for joint attention (Flux double blocks): image queries over text keys,
after q/k norm and RoPE, checked against a direct computation and gradient-checked."""

from __future__ import annotations

import pytest
import torch

from lora2_engine.joint_attention import JointAttentionCapture, text_entropy
from lora2_engine.models import tiny_flux
from tests.conftest import activate_slots


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(L, D/2) angles → RoPE matrices (1, 1, L, D/2, 2, 2)."""
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([c, -s, s, c], -1).reshape(*angles.shape, 2, 2)[None, None]


def _direct(img_q, txt_k, ang_img, ang_txt):
    """Rotate each pair (x0, x1) by its angle, softmax over text keys, mean entropy."""
    def rot(x, ang):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = torch.cos(ang) * x0 - torch.sin(ang) * x1
        out[..., 1::2] = torch.sin(ang) * x0 + torch.cos(ang) * x1
        return out

    q, k = rot(img_q.double(), ang_img.double()), rot(txt_k.double(), ang_txt.double())
    total, count = 0.0, 0
    d = q.shape[-1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = torch.softmax(q[b, h] @ k[b, h].T / d**0.5, dim=-1)  # (L_img, L_txt)
            total += float(-(p * p.log()).sum())
            count += p.shape[0]
    return total / count


@pytest.mark.parametrize("heads", [1, 2])
def test_text_entropy_equals_the_direct_computation(heads):
    g = torch.Generator().manual_seed(heads)
    img_q, txt_k = torch.randn(2, heads, 6, 8, generator=g), torch.randn(2, heads, 5, 8,
                                                                         generator=g)
    ang_img, ang_txt = torch.rand(6, 4, generator=g) * 6, torch.rand(5, 4, generator=g) * 6
    got = text_entropy(img_q, txt_k, _rotation(ang_img), _rotation(ang_txt))
    assert float(got) == pytest.approx(_direct(img_q, txt_k, ang_img, ang_txt), rel=1e-5)
    no_rope = text_entropy(img_q, txt_k)
    zero = torch.zeros(6, 4), torch.zeros(5, 4)
    assert float(no_rope) == pytest.approx(_direct(img_q, txt_k, *zero), rel=1e-5)


def test_text_entropy_gradient_matches_autograd_of_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    pe_q = _rotation(torch.rand(4, 3, generator=g, dtype=torch.float64) * 6)
    pe_k = _rotation(torch.rand(3, 3, generator=g, dtype=torch.float64) * 6)
    # rotate() computes in fp32; gradcheck needs fp64 end to end, so check the pieces in fp64
    from lora2_engine.objective import attention_entropy

    def f(a, b):
        def rot(x, pe):
            pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
            return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape)
        qa, kb = rot(a, pe_q), rot(b, pe_k)
        return attention_entropy(qa.transpose(1, 2).flatten(2), kb.transpose(1, 2).flatten(2),
                                 2)

    assert torch.autograd.gradcheck(f, (q, k))
    # and text_entropy's own gradient agrees with it (fp32 rotation)
    a, b = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ours = torch.autograd.grad(text_entropy(a, b, pe_q.float(), pe_k.float()), (a, b))
    ref = torch.autograd.grad(f(q, k), (q, k))
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-6)


def test_capture_sees_the_q_and_k_the_model_attends_with(monkeypatch):
    """On the tiny Flux: record what its attention really receives (q, k, pe), rotate them as
    it does, and compare the image-rows/text-columns entropy with the capture's value."""
    model = tiny_flux.build(seed=2)
    seen = []
    attention = tiny_flux.attention

    def spy(q, k, v, pe):
        seen.append((q.detach(), k.detach(), pe))
        return attention(q, k, v, pe)

    monkeypatch.setattr(tiny_flux, "attention", spy)
    cap = JointAttentionCapture(model)
    g = torch.Generator().manual_seed(0)
    n_txt = 11
    with torch.no_grad():
        model(torch.randn(2, 16, 8, 6, generator=g), torch.tensor([0.3, 0.8]),
              torch.randn(2, n_txt, 768, generator=g), torch.randn(2, 768, generator=g))
    q, k, pe = seen[0]  # the double block's joint attention: [text; image] tokens
    qr, kr = tiny_flux.apply_rope(q, pe), tiny_flux.apply_rope(k, pe)
    scores = qr[:, :, n_txt:] @ kr[:, :, :n_txt].transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.softmax(scores.double(), -1)
    want = float(-(p * p.log()).sum(-1).mean())
    assert cap.num_layers == 1 and float(cap.values["double_blocks.0"]) == pytest.approx(
        want, rel=1e-5)
    cap.remove()


def test_capture_gradient_survives_checkpointing():
    from lora2_engine import AdapterConfig, attach
    from lora2_engine.checkpointing import checkpointed_blocks

    model = tiny_flux.build(seed=1)
    ad = attach(model, AdapterConfig(targets=("img_attn.qkv", "txt_attn.qkv"), init_rank=3))
    for layer in ad.layers.values():
        activate_slots(layer, None)
        layer.B.data.normal_(std=0.1)
    cap = JointAttentionCapture(model)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5]),
              torch.randn(1, 7, 768, generator=g), torch.randn(1, 768, generator=g))

    def grads(ckpt):
        cap.clear()
        with checkpointed_blocks(model, checkpoint=ckpt):
            model(*inputs)
            (cap.mean()).backward()
        out = [p.grad.clone() for p in ad.factor_parameters()]
        model.zero_grad()
        return out

    plain, ckpt = grads(False), grads(True)
    assert any(p.abs().sum() > 0 for p in plain)  # the entropy reaches the adapters
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    cap.remove()
    ad.detach()
