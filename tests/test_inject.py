import pytest
import torch

from lora2_engine import AdapterConfig, attach
from lora2_engine.layer import AdaptiveLoRALayer
from tests.conftest import activate_slots


def test_attach_finds_default_targets_and_detach_restores_bit_for_bit(attn_net):
    before = {k: v.clone() for k, v in attn_net.state_dict().items()}
    modules_before = dict(attn_net.named_modules())
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    y0 = attn_net(x, ctx)
    ad = attach(attn_net, AdapterConfig(r_target=2, init_rank=4, r_max=32, slot_init="random"))
    assert len(ad) == 16  # 2 blocks x 2 attentions x q,k,v,out
    assert all(isinstance(m, AdaptiveLoRALayer) for _, m in ad)
    assert not any(p.requires_grad for n, p in attn_net.named_parameters() if ".base." in n)
    for layer in ad.layers.values():
        activate_slots(layer, None)
        layer.B.data.normal_()
    assert not torch.allclose(attn_net(x, ctx), y0)
    ad.detach()
    after = attn_net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in attn_net.parameters())
    assert dict(attn_net.named_modules()).keys() == modules_before.keys()
    assert torch.equal(attn_net(x, ctx), y0)


@pytest.mark.parametrize("targets,exclude,count", [
    (("to_q",), (), 4), (("to_k", "to_v"), ("attn1",), 4), (("attn2.to_out.0",), (), 2)])
def test_name_patterns(attn_net, targets, exclude, count):
    ad = attach(attn_net, AdapterConfig(targets=targets, exclude=exclude, init_rank=2))
    assert len(ad) == count


def test_no_match_is_a_clear_error(attn_net):
    with pytest.raises(ValueError, match="no module matches targets=.*proj_xyz"):
        attach(attn_net, AdapterConfig(targets=("proj_xyz",)))


def test_attach_twice_is_refused(attn_net):
    attach(attn_net, AdapterConfig(init_rank=2))
    with pytest.raises(ValueError, match="already carries adapters"):
        attach(attn_net, AdapterConfig(init_rank=2))


def test_fixed_rank_baseline(attn_net):
    ad = attach(attn_net, fixed_rank=3)
    assert set(ad.ranks().values()) == {3} and not ad.adaptive and ad.nu_parameters() == []


def test_cached_scales_match_each_layers_own_and_carry_gradient(attn_net):
    ad = attach(attn_net, AdapterConfig(r_target=2, init_rank=4, r_max=32, slot_init="random"))
    for i, layer in enumerate(ad.layers.values()):
        layer.nu_param.data += 0.2 * i
    ad.update_ranks()
    own = {n: layer.slot_scale().detach().clone() for n, layer in ad.layers.items()}
    ad.cache_scales()
    for n, layer in ad.layers.items():
        assert torch.allclose(layer.slot_scale(), own[n], atol=1e-7)
    sum(layer.slot_scale().sum() * k for k, layer in enumerate(ad.layers.values())).backward()
    assert all(layer.nu_param.grad is not None for layer in ad.layers.values())
    ad.clear_scales()
    assert all(layer.cached_scale is None for layer in ad.layers.values())


@pytest.mark.parametrize("n_in, m_out", [(6, 4), (32, 32), (64, 160)])
def test_rank_is_capped_where_a_dense_update_is_smaller(n_in, m_out):
    """r (m + n) >= m n: a rank-r factorisation would cost as much as the dense update, so the
    rank stops below that (and so below min(m, n))."""
    cap = max(r for r in range(1, min(n_in, m_out) + 1) if r * (n_in + m_out) < n_in * m_out)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, m_out))
    ad = attach(net, AdapterConfig(targets=("0",), r_target=1, init_rank=cap + 5, r_max=512))
    assert ad.ranks() == {"0": cap}
    ad.layers["0"].nu_param.data.fill_(-20.0)  # nu at its floor: D(nu) = r_max
    ad.update_ranks()
    assert ad.ranks() == {"0": cap}


def test_detach_restores_flags_of_parameters_made_under_inference_mode():
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    ad = attach(net, AdapterConfig(targets=("0",), init_rank=2))
    net(torch.randn(2, 4)).sum().backward()
    assert ad.layers["0"].A.grad is not None
    ad.detach()
    assert net[0].weight.is_inference() and net[0].weight.requires_grad
