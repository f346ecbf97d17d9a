import pytest
import torch

from lora2_engine.config import AdapterConfig
from lora2_engine.distribution import slot_weights
from lora2_engine.layer import AdaptiveLoRALayer, LoRALayer


def _layer(init_rank=4, conv=False, **kw):
    torch.manual_seed(0)
    base = torch.nn.Conv2d(12, 10, 1) if conv else torch.nn.Linear(12, 10)
    cfg = AdapterConfig(r_target=2, init_rank=init_rank, r_max=64, **{"slot_init": "random", **kw})
    layer = AdaptiveLoRALayer(base, cfg, generator=torch.Generator().manual_seed(1))
    layer.B.data.normal_()  # a trained-looking B so the adapter contributes
    return layer


@pytest.mark.parametrize("conv", [False, True])
def test_delta_weight_is_B_Lambda_A(conv):
    layer = _layer(conv=conv)
    lam = slot_weights(layer.nu.detach(), layer.rank)
    direct = layer.B[:, :4] @ torch.diag(lam) @ layer.A[:4]
    assert torch.allclose(layer.delta_weight(), direct, atol=1e-6)
    x = torch.randn(3, 12, 5, 5) if conv else torch.randn(3, 12)
    w = layer.base.weight.flatten(1) + direct
    want = (torch.nn.functional.conv2d(x, w[:, :, None, None], layer.base.bias) if conv
            else x @ w.T + layer.base.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)


@pytest.mark.parametrize("new_rank", [5, 9, 40])
def test_growth_leaves_output_unchanged(new_rank):
    layer = _layer()
    x = torch.randn(6, 12)
    before = layer(x).detach()
    change = layer.resize(new_rank)
    assert change.new_rank == new_rank and layer.rank == new_rank
    assert torch.equal(layer.B[:, 4:new_rank], torch.zeros(10, new_rank - 4))
    assert layer.A[4:new_rank].abs().sum() > 0  # new A rows are initialised, not zero
    assert torch.allclose(layer(x), before, atol=1e-6)


def test_shrink_drops_exactly_the_tail():
    layer = _layer(init_rank=6)
    lam = slot_weights(layer.nu.detach(), 6)
    keep = layer.B[:, :3] @ torch.diag(lam[:3]) @ layer.A[:3]
    layer.resize(3)
    assert layer.rank == 3
    assert torch.allclose(layer.delta_weight(), keep, atol=1e-6)


def test_capacity_grows_geometrically_not_to_r_max():
    layer = _layer(init_rank=4)
    layer.resize(5)
    assert layer.capacity == 8
    layer.resize(3)
    assert layer.capacity == 8
    layer.resize(20)
    assert layer.capacity == 20 and layer.capacity < layer.r_max


@pytest.mark.parametrize("init", ["kaiming", "paper"])
def test_init_std_follows_rule(init):
    torch.manual_seed(0)
    cfg = AdapterConfig(r_target=2, init_rank=64, r_max=512, init=init, slot_init="random")
    layer = AdaptiveLoRALayer(torch.nn.Linear(400, 96), cfg, torch.Generator().manual_seed(0))
    f = slot_weights(layer.nu.detach(), 64)
    want = (2 / 400) ** 0.5 / float(f.max()) if init == "kaiming" else (
        2**0.5 / float(f.pow(2).sum().sqrt()))
    assert float(layer.A[:64].detach().std()) == pytest.approx(want, rel=0.05)
    assert torch.count_nonzero(layer.B) == 0


def test_fixed_lora_scale_and_gradients():
    base = torch.nn.Linear(8, 6)
    layer = LoRALayer(base, 3, alpha=6.0)
    layer.B.data.normal_()
    assert torch.allclose(layer.delta_weight(), layer.B @ layer.A * 2.0, atol=1e-6)
    layer(torch.randn(2, 8)).sum().backward()
    assert layer.A.grad is not None and base.weight.grad is not None


def test_non_linear_module_is_refused():
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALayer(torch.nn.Conv2d(3, 3, 3), 2)


def _grad_layer(rank=3, m=10, n=12):
    torch.manual_seed(0)
    cfg = AdapterConfig(r_target=2, init_rank=rank, r_max=64, slot_init="gradient")
    return AdaptiveLoRALayer(torch.nn.Linear(n, m), cfg, generator=torch.Generator().manual_seed(1))


def test_gradient_slots_start_at_zero_and_take_the_gradient_directions():
    layer = _grad_layer(rank=3)
    assert layer.pending == 3 and torch.count_nonzero(layer.A[:3]) == 0
    x, target = torch.randn(64, 12), torch.randn(64, 10)
    before = layer(x).detach()
    assert torch.equal(before, layer.base(x).detach())  # pending slots change nothing
    loss = (layer(x) - target).pow(2).mean()
    loss.backward()
    # the gradient w.r.t. Delta W, computed independently: d/dW of the same loss at W
    w = layer.base.weight.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x, w, layer.base.bias) - target).pow(2).mean().backward()
    g = w.grad
    assert layer.init_pending_from_gradient()
    assert layer.pending == 0
    v = torch.linalg.svd(g.double(), full_matrices=False)[2][:3]  # leading right vectors
    rows = layer.A[:3].detach().double()
    rows = rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose((rows @ v.T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-4)
    lam = layer.slot_scale().detach()
    want = g @ (lam[:, None] * layer.A[:3].detach()).T  # dL/dB for those rows of A
    assert torch.allclose(layer.B.grad[:, :3], want, atol=1e-5)
    assert torch.equal(layer(x).detach(), before)  # B is still zero until the optimizer step


def test_growth_with_gradient_slots_uses_the_residual_and_pays_at_once():
    layer = _grad_layer(rank=2)
    x, target = torch.randn(128, 12), torch.randn(128, 10)
    opt = torch.optim.Adam([layer.A, layer.B], lr=1e-2)

    def step():
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        layer.init_pending_from_gradient()
        opt.step()
        opt.zero_grad()

    for _ in range(20):
        step()
    before = layer(x).detach()
    layer.resize(4)  # growth: two pending slots
    assert torch.allclose(layer(x).detach(), before, atol=1e-6)  # unchanged at the growth
    opt.state.clear()  # (the trainer moves moments with optim.apply_resizes; not needed here)
    (layer(x) - target).pow(2).mean().backward()
    assert layer.init_pending_from_gradient()
    old_rows, new_rows = layer.A[:2].detach(), layer.A[2:4].detach()
    assert (old_rows @ new_rows.T).abs().max() < 1e-4  # new rows: the residual directions only
    opt.step()
    new = layer.B[:, 2:4].detach() @ (layer.slot_scale().detach()[2:4, None] * layer.A[2:4])
    assert new.abs().sum() > 0  # the new slots contribute after one step


def test_pending_slots_are_dropped_first_on_shrink():
    layer = _grad_layer(rank=4)
    layer.resize(2)
    assert layer.pending == 2
    layer.resize(1)
    assert layer.pending == 1
