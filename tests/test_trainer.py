import pytest
import torch

from lora2_engine import AdapterConfig, TrainConfig, attach
from lora2_engine.distribution import nu_for_rank
from lora2_engine.objective import EntropyCapture
from lora2_engine.trainer import Callbacks, NonFiniteLoss, Trainer, TrainingInterrupted
from tests.conftest import TinyAttnNet, activate_slots


def _task(seed=0, n=8):
    """Match a teacher copy whose attention projections carry planted low-rank updates."""
    g = torch.Generator().manual_seed(seed)
    teacher = TinyAttnNet()
    with torch.no_grad():
        for i, blk in enumerate(teacher.blocks):
            blk.attn2.to_v.weight += torch.randn(16, 2 + 4 * i, generator=g) @ torch.randn(
                2 + 4 * i, 12, generator=g) * 0.3
    data = []
    for _ in range(n):
        x, ctx = torch.randn(5, 16, generator=g), torch.randn(7, 12, generator=g)
        data.append({"x": x, "ctx": ctx, "y": teacher(x[None], ctx[None])[0].detach()})
    return data


def _trainer(data, steps=30, ckpt=None, seed=0, **kw):
    net = TinyAttnNet()
    ad = attach(net, AdapterConfig(r_target=kw.pop("r_target", 2), init_rank=4, r_max=32),
                seed=seed)
    cfg = TrainConfig(steps=steps, lr=kw.pop("lr", 1e-2), nu_lr=kw.pop("nu_lr", 5e-2),
                      lambda_r=kw.pop("lambda_r", 1e-4), lambda_e=kw.pop("lambda_e", 1e-4),
                      batch_size=2, seed=seed, **kw)

    def loss(batch, gen):
        noise = torch.randn(batch["x"].shape, generator=gen) * 0.01
        return torch.nn.functional.mse_loss(net(batch["x"] + noise, batch["ctx"]), batch["y"])

    return Trainer(ad, loss, data, cfg, entropy=EntropyCapture(net), checkpoint_path=ckpt)


def test_training_lowers_loss_and_ranks_move_both_ways():
    tr = _trainer(_task(), steps=150, lambda_r=1.0)  # the default rank pressure
    hist = tr.run()
    first, last = sum(h["task"] for h in hist[:5]) / 5, sum(h["task"] for h in hist[-5:]) / 5
    assert last < 0.5 * first
    ranks = tr.adapters.ranks()
    assert len(set(ranks.values())) > 1  # ranks differ across layers
    assert max(ranks.values()) > 4 and min(ranks.values()) < 4  # moved up and down from 4


def test_large_lambda_r_pins_ranks_to_target():
    # lambda_r is in units of the (normalised) task signal, where 1 is the default balance
    tr = _trainer(_task(), steps=120, lambda_r=100.0, r_target=3, nu_lr=0.05)
    tr.run()
    # nu_target(3) is the edge of the D=3 interval, so an L1 pull settles on 3 or 3+1
    assert set(tr.adapters.ranks().values()) <= {3, 4}
    for nu in tr.adapters.nus().values():
        assert nu == pytest.approx(nu_for_rank(3), rel=0.1)


def test_grad_accumulation_and_checkpointing_flags_run():
    tr = _trainer(_task(), steps=3, grad_accum=2, grad_checkpointing=True)
    assert len(tr.run()) == 3


@pytest.mark.parametrize("stop_at", [7, 13])
def test_resume_is_bit_identical(tmp_path, stop_at):
    data = _task()
    ref = _trainer(data, steps=20)
    ref.run()
    first = _trainer(data, steps=20, ckpt=tmp_path / "state.safetensors")
    first.run(steps=stop_at)
    first.save_checkpoint()
    resumed = _trainer(data, steps=20)
    resumed.load_checkpoint(tmp_path / "state.safetensors")
    assert resumed.step == stop_at
    resumed.run()
    want, got = ref.adapters.state_dict(), resumed.adapters.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k  # bit-identical on CPU
    assert [h["loss"] for h in ref.history] == [h["loss"] for h in resumed.history]


def test_cancel_saves_a_checkpoint(tmp_path):
    tr = _trainer(_task(), steps=50, ckpt=tmp_path / "c.safetensors")
    tr.callbacks = Callbacks(should_stop=lambda: tr.step >= 4)
    with pytest.raises(TrainingInterrupted, match="cancelled at step 4; resume from") as exc:
        tr.run()
    assert exc.value.checkpoint.exists()


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path):
    tr = _trainer(_task(), steps=10, ckpt=tmp_path / "n.safetensors")
    tr.run(steps=3)
    good = tr.adapters.state_dict()
    base_loss = tr.loss_fn
    tr.loss_fn = lambda b, g: base_loss(b, g) * float("nan")
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 4.*kept at step 3"):
        tr.train_step()
    for k, v in tr.adapters.state_dict().items():
        assert torch.equal(v, good[k])
    assert (tmp_path / "n.safetensors").exists()


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="dataset is empty"):
        _trainer([], steps=1)


def test_bf16_autocast_trains_and_keeps_fp32_adapters():
    tr = _trainer(_task(), steps=40, mixed_precision="bf16")
    hist = tr.run()
    assert all(p.dtype == torch.float32 for p in tr.adapters.factor_parameters())
    assert sum(h["task"] for h in hist[-5:]) < sum(h["task"] for h in hist[:5])


class _UserCancel(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (raised inside the forward)."""


def test_interrupt_inside_a_step_rolls_back_and_resumes_bit_identically(tmp_path):
    data = _task()
    ref = _trainer(data, steps=12)
    ref.run()
    tr = _trainer(data, steps=12, ckpt=tmp_path / "s.safetensors")
    tr.callbacks = Callbacks(interrupts=(_UserCancel,))
    inner = tr.loss_fn
    calls = {"n": 0}

    def flaky(batch, gen):
        calls["n"] += 1
        out = inner(batch, gen)  # the random draws of the step happen, then the cancel
        if calls["n"] == 8:
            raise _UserCancel()
        return out

    tr.loss_fn = flaky
    with pytest.raises(TrainingInterrupted, match="cancelled at step 7") as exc:
        tr.run()
    resumed = _trainer(data, steps=12)
    resumed.load_checkpoint(exc.value.checkpoint)
    resumed.run()
    want, got = ref.adapters.state_dict(), resumed.adapters.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_grad_checkpointing_wraps_blocks_of_models_without_a_switch():
    """A model with no checkpointing switch: blocks of its ModuleList are wrapped during run()."""
    from lora2_engine.checkpointing import checkpointed_blocks

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
                                 for _ in range(3))
    model = torch.nn.Module()
    model.blocks = blocks
    x = torch.randn(4, 8)

    def forward():
        h = x
        for b in model.blocks:
            h = b(h)
        return h.pow(2).mean()

    ad = attach(model, AdapterConfig(targets=("0",), init_rank=2, slot_init="random"))
    for layer in ad.layers.values():
        activate_slots(layer, None)
        layer.B.data.normal_()
    forward().backward()
    plain = [p.grad.clone() for p in ad.factor_parameters()]
    model.zero_grad()
    with checkpointed_blocks(model) as wrapped:
        assert len(wrapped) == 3
        forward().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(plain, ad.factor_parameters()))
    assert all("forward" not in vars(b) for b in blocks)  # undone on exit
    tr = Trainer(ad, lambda b, g: forward(), [{"i": torch.zeros(1)}],
                 TrainConfig(steps=2, grad_checkpointing=True))
    assert tr._wrap_blocks
    tr.run()
    assert all("forward" not in vars(b) for b in blocks)
