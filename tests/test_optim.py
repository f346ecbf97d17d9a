import torch

from lora2_engine import AdapterConfig, TrainConfig, attach
from lora2_engine.optim import apply_resizes, make_optimizer


def test_moments_follow_resizes(attn_net):
    ad = attach(attn_net, AdapterConfig(targets=("attn1.to_q",), init_rank=4, r_max=64,
                                    slot_init="random"))
    opt = make_optimizer(ad, TrainConfig(lr=1e-2, nu_lr=1e-2))
    assert [g["name"] for g in opt.param_groups] == ["factors", "nu"]
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    for _ in range(2):
        attn_net(x, ctx).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    name, layer = next(iter(ad))
    kept_a = opt.state[layer.A]["exp_avg"][:4].clone()
    kept_b = opt.state[layer.B]["exp_avg_sq"][:, :4].clone()
    assert kept_b.abs().sum() > 0
    change = layer.resize(11)  # beyond capacity: new tensors
    apply_resizes(opt, ad, {name: change})
    st_a, st_b = opt.state[layer.A], opt.state[layer.B]
    assert st_a["exp_avg"].shape == layer.A.shape and st_b["exp_avg_sq"].shape == layer.B.shape
    assert torch.equal(st_a["exp_avg"][:4], kept_a) and torch.equal(st_b["exp_avg_sq"][:, :4],
                                                                   kept_b)
    assert st_a["exp_avg"][4:11].abs().sum() == 0 and st_b["exp_avg"][:, 4:11].abs().sum() == 0
    # a step after the resize works and touches the new slots
    attn_net(x, ctx).pow(2).mean().backward()
    opt.step()
    assert st_b["exp_avg"][:, 4:11].abs().sum() > 0  # B gets gradient first (A rows: B=0)


def test_shrink_then_regrow_reinitialises(attn_net):
    ad = attach(attn_net, AdapterConfig(targets=("attn1.to_q",), init_rank=6, r_max=64,
                                    slot_init="random"))
    opt = make_optimizer(ad, TrainConfig(lr=1e-2))
    name, layer = next(iter(ad))
    layer.B.data.normal_()
    attn_net(torch.randn(2, 5, 16), torch.randn(2, 7, 12)).sum().backward()
    opt.step()
    apply_resizes(opt, ad, {name: layer.resize(3)})
    apply_resizes(opt, ad, {name: layer.resize(6)})
    assert torch.count_nonzero(layer.B[:, 3:6]) == 0
    assert opt.state[layer.A]["exp_avg"][3:6].abs().sum() == 0
