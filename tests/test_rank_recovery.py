"""The rank-recovery benchmark (bench/rank_recovery.py): a fast version of its layers task, and
its bookkeeping (bytes read from the exported file, Spearman, the fixed-rank front)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from lora2_engine import AdapterConfig, attach
from lora2_engine.config import preset
from lora2_engine.formats import export_adapters

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rank_recovery.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: a second intra-op thread only waits on a busy 2-core machine (30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("rank_recovery", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rank_recovery"] = mod
    spec.loader.exec_module(mod)
    return mod


PRESETS_DEFAULT_R_TARGET = preset("spread")[0].r_target
RANKS = (0, 0, 0, 2, 4, 8, 16, 24)  # 8 frozen 32x32 layers (dense cap: rank 15)


@pytest.fixture(scope="module")
def fast_runs(rr, tmp_path_factory):
    """The fast layers task with the default preset as it is (only steps and lr chosen per
    run), cached: ``(lr, input_scale) -> RunResult``."""
    cache = {}

    def run(lr: float, input_scale: float = 1.0):
        if (lr, input_scale) not in cache:
            torch.set_num_threads(1)
            task = rr.LayersTask(seed=0, steps=300, lr=lr, dim=32, ranks=RANKS,
                                 input_scale=input_scale)
            task.scale = {}  # no per-task changes: preset() defaults
            cache[lr, input_scale] = rr.run_one(task, rr.RunSpec("default"), 0,
                                                tmp_path_factory.mktemp("run"))
        return cache[lr, input_scale]

    return run


@pytest.mark.parametrize("lr", [1e-4, 2e-3])
def test_default_preset_recovers_zero_and_highest_ranks_at_any_lr(rr, fast_runs, lr):
    """ν's signal is normalised, so the weights' learning rate does not decide the ranks:
    at 1e-4 and at 2e-3 the zero layers stay at r_target + 1 or below (trained rank D) and
    are left out of the file, and the highest planted layers end highest."""
    res = fast_runs(lr)
    r_target = AdapterConfig().r_target
    assert res.config["adapter"]["r_target"] == r_target == PRESETS_DEFAULT_R_TARGET
    zero = [i for i, t in enumerate(res.true) if t == 0]
    assert zero and max(res.trained[i] for i in zero) <= r_target + 1, (res.trained, res.true)
    assert all(res.learned[i] == 0 for i in zero), res.learned
    by_true = sorted(range(len(res.true)), key=lambda i: res.true[i])
    top, rest = by_true[-2:], by_true[:-2]
    # the highest planted ranks end highest (ties allowed: ranks are capped at min(m, n))
    assert min(res.learned[i] for i in top) > max(res.learned[i] for i in rest), (
        res.learned, res.true)
    assert res.spearman > 0.8
    untrained = float(torch.stack([d.pow(2).sum() for d in
                                   rr.LayersTask(seed=0, dim=32, ranks=RANKS).deltas]).mean()
                      / 32)
    # it fitted something (lr 1e-4 is slow: 300 steps move every method little)
    assert res.loss < (0.5 if lr >= 1e-3 else 0.95) * untrained


@pytest.mark.parametrize("input_scale", [10.0, 0.1])
def test_ranks_do_not_depend_on_the_units_of_the_loss(fast_runs, input_scale):
    """Inputs x10 (loss x100) or x0.1: the same ranks within 1 per layer, because the task
    term is measured in units of its own first steps and ν's signal is normalised."""
    base, scaled = fast_runs(2e-3), fast_runs(2e-3, input_scale)
    assert all(abs(a - b) <= 1 for a, b in zip(base.learned, scaled.learned)), (
        base.learned, scaled.learned)
    assert abs(scaled.file_bytes - base.file_bytes) <= 0.15 * base.file_bytes


def test_bytes_are_read_from_the_exported_file(rr, tmp_path):
    model = rr.LinearBank([(16, 16)] * 3, torch.Generator().manual_seed(0))
    targets = ("layers.l00", "layers.l01", "layers.l02")
    adapters = attach(model, rr.AdapterConfig(targets=targets, r_target=1, init_rank=5, r_max=8,
                                              slot_init="random"))
    path = export_adapters(adapters, tmp_path / "a.safetensors", rr.ExportConfig(rank_tol=0))
    size = rr.file_bytes(path)
    assert size.total == os.path.getsize(path)
    assert size.header + size.payload == size.total
    wrong = 4 * adapters.num_parameters()  # the engine's count in fp32 bytes
    assert size.total != wrong and size.total > wrong  # header + alpha tensors are real bytes
    assert size.payload == wrong + 4 * len(adapters)  # fp32 A, B and one fp32 alpha per module
    with open(path, "ab") as fh:  # the measurement follows the file, not the adapters
        fh.write(b"\0" * 10)
    assert rr.file_bytes(path).total == size.total + 10
    adapters.detach()


def test_run_reports_the_size_of_its_file(rr, tmp_path):
    task = rr.LayersTask(seed=1, steps=5, dim=16, ranks=(0, 1, 2))
    res = rr.run_one(task, rr.RunSpec("fixed-r2", fixed_rank=2), 1, tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    assert res.file_bytes == os.path.getsize(f)
    assert res.learned == [2, 2, 2] and res.params == 3 * 2 * 32


def test_spearman_and_front(rr):
    assert rr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    a, b = [0, 0, 1, 5, 3, 3, 9], [1, 2, 2, 8, 4, 4, 7]
    scipy = pytest.importorskip("scipy.stats")
    assert rr.spearman(a, b) == pytest.approx(scipy.spearmanr(a, b)[0])
    fixed = [(100.0, 1.0), (200.0, 0.5), (400.0, 0.1)]
    assert rr.front_loss(fixed, 200.0) == pytest.approx(0.5)
    assert rr.front_loss(fixed, 283.0) == pytest.approx((0.5 * 0.1) ** 0.5, rel=1e-2)
    ok, ratio, dom = rr.check_point(fixed, 250.0, 0.2)  # below the front, nothing dominates
    assert ok and ratio < 1 and not dom
    ok, ratio, dom = rr.check_point(fixed, 250.0, 0.6)  # rank "200" is smaller and better
    assert not ok and dom
