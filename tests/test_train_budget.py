"""Train to a size (``lora2_engine.sizing``): the file fits the budget, the ranks stay learned,
bad budgets are refused before any training, and the CLI and node glue reach it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora2_engine import preset
from lora2_engine.budget import BudgetError
from lora2_engine.cli import main
from lora2_engine.config import ConfigError, ExportConfig
from lora2_engine.diffusion import train_diffusion
from lora2_engine.inject import attach, find_targets
from lora2_engine.models.loader import load_model
from lora2_engine.sizing import CAPACITY, capacity_config, check_budget, export_to_budget
from lora2_engine.trainer import Callbacks, Trainer
from tests.test_rank_recovery import one_thread  # noqa: F401  (autouse: one thread here too)

BENCH = Path(__file__).resolve().parents[1] / "bench"
BPP = {"float32": 4, "float16": 2, "bfloat16": 2}


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny-sd15")


def _examples(bundle, n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return bundle.encode([torch.rand(3, size, size, generator=g) for _ in range(n)],
                         ["a photo of sks dog"] * n)


def _rank_cost(model, a_cfg) -> int:
    """sum (m + n) over the modules the config targets, from the model's own Linear shapes."""
    total = 0
    for name in find_targets(model, a_cfg.targets, a_cfg.exclude):
        lin = model.get_submodule(name)
        total += lin.in_features + lin.out_features
    return total


@pytest.fixture(scope="module")
def trained():
    """One short run on its own tiny SD1.5 UNet, adapters kept attached (detached at the end)."""
    bundle = load_model("tiny-sd15")
    a_cfg, t_cfg = preset("spread", steps=3, init_rank=8, lr=1e-3, lambda_e=0.0)
    module = bundle.denoiser.module
    from lora2_engine.schedule import denoising_loss

    ad = attach(module, a_cfg, seed=0)
    Trainer(ad, denoising_loss(bundle.denoiser), _examples(bundle), t_cfg).run()
    yield ad, bundle.layout
    ad.detach()


def _learned_delta(layer) -> torch.Tensor:
    """B diag(Lambda) A of a trained layer, directly (float64)."""
    with torch.no_grad():
        lam = layer.slot_scale().double()
        return layer.B[:, : layer.rank].double() @ (lam[:, None]
                                                    * layer.A[: layer.rank].double())


# ------------------------------------------------------------------ the file fits the budget
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_file_bytes_on_disk_are_within_two_percent_below_the_budget(trained, tmp_path, dtype,
                                                                    fraction):
    ad, layout = trained
    tensors = BPP[dtype] * sum(la.rank * (la.m + la.n) for la in ad.layers.values())
    export = ExportConfig(dtype=dtype, size_mb=fraction * tensors / 1e6)
    res = export_to_budget(ad, export, layout)
    path = res.write(tmp_path / "sized.safetensors")
    size = os.path.getsize(path)
    budget = int(fraction * tensors)
    assert 0.98 * budget <= size <= budget, (size, budget)
    assert size == res.file_bytes
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys() if not k.endswith(".alpha")}
    assert dtypes == {getattr(torch, dtype)}
    comp = json.loads(meta["lora2.compression"])
    assert comp["budget"] == {"kind": "bytes", "value": budget}
    assert comp["method"] == "train-to-budget" and comp["learned_bytes"] > budget
    ranks = sorted(res.lora.ranks().values())
    assert ranks[0] < ranks[-1]  # not one rank for every module


def test_the_file_keeps_each_learned_update_truncated_where_its_spectrum_is_weakest(trained):
    """Every module of the file is the best rank-r approximation of its learned B Lambda A
    (checked against a dense SVD), and the recorded errors are those of the file."""
    ad, layout = trained
    tensors = 4 * sum(la.rank * (la.m + la.n) for la in ad.layers.values())
    res = export_to_budget(ad, ExportConfig(size_mb=0.4 * tensors / 1e6), layout)
    record = res.lora.lora2_modules()
    errors = json.loads(res.lora.metadata["lora2.compression"])["rel_error"]
    report = {r.name: r for r in res.report().rows}
    assert set(report) == set(record) == set(ad.layers)
    for name, layer in ad.layers.items():
        key, r = record[name]["key"], record[name]["rank"]
        full = _learned_delta(layer)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        got = res.lora.modules[key].delta().double()
        assert got.shape == full.shape and r == res.lora.modules[key].rank
        assert torch.allclose(got, best, atol=1e-5 * float(s[0]), rtol=0)
        err = float((full - got).norm() / full.norm())
        assert errors[key] == pytest.approx(err, rel=1e-3, abs=1e-6)
        assert report[name].rel_error == pytest.approx(err, rel=1e-3, abs=1e-6)
        assert record[name]["nu"] == pytest.approx(float(layer.nu.detach()))  # the learned nu kept


def test_params_budget_counts_factor_parameters(trained):
    ad, layout = trained
    learned = sum(la.rank * (la.m + la.n) for la in ad.layers.values())
    res = export_to_budget(ad, ExportConfig(params=learned // 3), layout)
    params = sum(w.rank * (w.up.shape[0] + w.down.shape[1]) for w in res.lora.modules.values())
    assert 0.98 * (learned // 3) <= params <= learned // 3


def test_a_learned_adapter_smaller_than_the_budget_is_not_padded(trained):
    ad, layout = trained
    tensors = 4 * sum(la.rank * (la.m + la.n) for la in ad.layers.values())
    with pytest.warns(UserWarning, match="smaller than the budget.*nothing is padded"):
        res = export_to_budget(ad, ExportConfig(size_mb=3 * tensors / 1e6), layout)
    learned = {r["key"]: int(torch.linalg.matrix_rank(_learned_delta(ad.layers[n])))
               for n, r in res.lora.lora2_modules().items()}  # a slot added last is still 0
    assert res.lora.ranks() == learned
    assert res.file_bytes < 0.5 * 3 * tensors
    assert any("nothing is padded" in n for n in res.notes)


@pytest.mark.parametrize("budget", [125_000, 180_000])
@pytest.mark.parametrize("style", ["kohya", "comfy", "diffusers"])
def test_modules_left_out_still_fill_the_budget(style, budget):
    """min_rank 0 (what the trained export uses): modules whose update is zero get no bytes,
    and the header they no longer need is spent on the others (within 2% below)."""
    from lora2_engine import AdapterConfig
    from lora2_engine.budget import Budget
    from lora2_engine.compress import compress
    from lora2_engine.formats.keys import SD15
    from lora2_engine.formats.lora_file import adapters_to_lora
    from lora2_engine.models.tiny import build_unet
    from tests.conftest import activate_slots

    ad = attach(build_unet("sd15", seed=0), AdapterConfig(init_rank=4, r_max=64), fixed_rank=4)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(ad.layers.values()):
        activate_slots(layer, g)
        layer.B.data = torch.randn(layer.B.shape, generator=g) * (1e-2 if i % 2 else 0.0)
    lora = adapters_to_lora(ad, ExportConfig(rank_tol=0, key_style=style), SD15)
    ad.detach()
    # (one 320x320 direction with its header is 2% of 150 kB: a budget far above the
    # granularity of one direction, as any real LoRA's is, is met within 2%)
    res = compress(lora, Budget.of_bytes(budget), torch.float32, min_rank=0)
    assert 0.98 * budget <= res.file_bytes <= budget
    zero = [k for k, w in lora.modules.items() if not w.up.any()]
    assert len(zero) == len(lora.modules) // 2 and not set(zero) & set(res.lora.modules)


# ------------------------------------------------------------------ capacity from the budget
@pytest.mark.parametrize("size_mb,dtype", [(0.2, "float32"), (0.2, "float16"), (2.0, "float32")])
def test_r_target_is_the_budgets_uniform_rank_with_room(bundle, size_mb, dtype):
    a_cfg, _ = preset("spread", init_rank=4)
    module = bundle.denoiser.module
    got = capacity_config(module, a_cfg, ExportConfig(size_mb=size_mb, dtype=dtype))
    uniform = size_mb * 1e6 / (BPP[dtype] * _rank_cost(module, a_cfg))
    assert got.r_target == math.ceil(CAPACITY * uniform)
    assert got.init_rank == max(4, got.r_target)
    assert capacity_config(module, a_cfg, ExportConfig()) is a_cfg  # no budget: unchanged


def test_train_diffusion_writes_the_budget_file(bundle, tmp_path):
    a_cfg, t_cfg = preset("spread", steps=2, init_rank=2, lr=1e-3)
    cost = _rank_cost(bundle.denoiser.module, a_cfg)
    budget = int(2 * 5 * cost)  # fp16, about rank 5 for every module
    out = tmp_path / "a.safetensors"
    res = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                          ExportConfig(dtype="float16", size_mb=budget / 1e6),
                          layout=bundle.layout, out_file=out)
    assert res.lora.path == out and 0.98 * budget <= os.path.getsize(out) <= budget
    assert res.sized is not None and res.sized.file_bytes == os.path.getsize(out)
    assert out.read_bytes() == res.sized.data
    trained = [r["trained_rank"] for r in res.lora.lora2_modules().values()]
    assert min(trained) >= math.ceil(CAPACITY * 5)  # the capacity it trained with
    assert res.ranks == {n: r["rank"] for n, r in res.lora.lora2_modules().items()}


def test_a_cancelled_sized_run_resumes_with_the_same_capacity(bundle, tmp_path):
    """r_target comes from the budget, so the same budget resumes the state exactly; the
    resumed run ends in a file of that size."""
    from lora2_engine.trainer import TrainingInterrupted

    a_cfg, t_cfg = preset("spread", steps=3, init_rank=2, lr=1e-3)
    export = ExportConfig(size_mb=0.3)
    state = tmp_path / "run.state.safetensors"
    asked = []

    def stop_after_one() -> bool:  # asked before every step: stop before the second
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(TrainingInterrupted):
        train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg, export,
                        layout=bundle.layout, checkpoint_path=state,
                        callbacks=Callbacks(should_stop=stop_after_one))
    assert state.is_file()
    res = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                          export, layout=bundle.layout, resume=state)
    assert res.steps == 3 and [h["step"] for h in res.history] == [1, 2, 3]
    assert 0.98 * 300_000 <= res.sized.file_bytes <= 300_000


# ------------------------------------------------------------------ ranks stay learned
@pytest.fixture(scope="module")
def recovery_tasks():
    spec = importlib.util.spec_from_file_location("recovery_tasks", BENCH / "recovery_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recovery_tasks", mod)
    spec.loader.exec_module(mod)
    return mod


def _spearman(a, b) -> float:
    scipy = pytest.importorskip("scipy.stats")
    return float(scipy.spearmanr(a, b)[0])


def test_ranks_follow_the_planted_structure(recovery_tasks):
    """8 frozen 32x32 layers with planted updates of rank 0..16 (decaying spectra); a budget of
    about a third of the planted directions' bytes: the file's ranks follow the planted ones."""
    planted = (0, 0, 1, 2, 4, 8, 12, 16)
    task = recovery_tasks.LayersTask(seed=0, steps=300, lr=3e-3, dim=32, ranks=planted,
                                     spectrum="decay")
    model = task.model()
    a_cfg, t_cfg = preset("spread", steps=task.steps, lr=task.lr, targets=task.targets,
                          r_max=32)
    budget = 4 * 64 * 15 + 6000  # fp32: 15 ranks of 32x32 layers + the header
    export = ExportConfig(size_mb=budget / 1e6)
    a_cfg = capacity_config(model, a_cfg, export)
    ad = attach(model, a_cfg)
    try:
        check_budget(ad, export, train_cfg=t_cfg)
        Trainer(ad, task.make_loss(model), task.dataset(), t_cfg).run()
        res = export_to_budget(ad, export, train_cfg=t_cfg)
        names = {r["key"]: n for n, r in res.lora.lora2_modules().items()}
    finally:
        ad.detach()
    assert 0.98 * budget <= res.file_bytes <= budget
    ranks = {names[k]: w.rank for k, w in res.lora.modules.items()}
    got = [ranks.get(n, 0) for n in task.targets]
    assert len(set(got)) > 2, got
    assert _spearman(got, task.true_ranks) > 0.8, (got, task.true_ranks)
    zero = [n for n, t in zip(task.targets, task.true_ranks) if t == 0]
    assert zero and all(ranks.get(n, 0) == 0 for n in zero)  # no bytes for nothing learned


# ------------------------------------------------------------------ bad budgets
@pytest.mark.parametrize("kw,match", [
    ({"size_mb": 0}, "size_mb=0 is invalid: give the file size in MB"),
    ({"size_mb": -3.5}, "size_mb=-3.5 is invalid"),
    ({"size_mb": float("nan")}, "size_mb=nan is invalid"),
    ({"size_mb": float("inf")}, "size_mb=inf is invalid"),
    ({"size_mb": True}, "size_mb=True is invalid"),
    ({"params": 0}, "params=0 is invalid: give a positive whole number"),
    ({"params": 2.5}, "params=2.5 is invalid"),
    ({"size_mb": 4.0, "params": 1000}, "give size_mb .* or params, not both"),
])
def test_bad_budgets_are_refused_with_the_value_and_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExportConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"size_mb": 0.01}, r"size_mb=0.01 .* rank 1 for each of its 32 modules.*give at least "
                        r"size_mb=0\.\d+"),
    ({"params": 1000}, r"params=1000 .* rank 1 for each of its 32 modules.*give at least "
                       r"params=\d+"),
])
def test_a_budget_below_rank_one_per_module_is_refused_before_training(bundle, tmp_path, kw,
                                                                       match):
    a_cfg, t_cfg = preset("spread", steps=2, init_rank=2)
    steps = []
    out = tmp_path / "never.safetensors"
    with pytest.raises(BudgetError, match=match):
        train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                        ExportConfig(**kw), layout=bundle.layout, out_file=out,
                        callbacks=Callbacks(on_step=lambda tr, rec: steps.append(rec)))
    assert steps == [] and not out.exists() and list(tmp_path.iterdir()) == []


def test_the_floor_is_the_smallest_file_that_can_be_written(bundle):
    """Just above the refused value the run trains: the floor is a real file size."""
    a_cfg, t_cfg = preset("spread", steps=1, init_rank=2)
    with pytest.raises(BudgetError, match="give at least size_mb=") as exc:
        train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                        ExportConfig(size_mb=0.01), layout=bundle.layout)
    least = float(str(exc.value).split("give at least size_mb=")[1].split(",")[0])
    res = train_diffusion(bundle.denoiser, _examples(bundle), bundle.family, a_cfg, t_cfg,
                          ExportConfig(size_mb=least), layout=bundle.layout)
    assert res.sized.file_bytes <= least * 1e6
    assert max(res.lora.ranks().values()) <= 3


# ------------------------------------------------------------------ the CLI
def _photos(folder: Path, n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


def test_cli_train_to_a_size(tmp_path, capsys):
    size_mb = 0.2
    rc = main(["train", str(_photos(tmp_path / "dog")), "--model", "tiny-sd15", "--steps", "2",
               "--resolution", "64", "--out", str(tmp_path), "--name", "sized", "--size-mb",
               str(size_mb), "--save-dtype", "float16"])
    assert rc == 0, capsys.readouterr().err
    f = tmp_path / "sized.safetensors"
    assert 0.98 * size_mb * 1e6 <= os.path.getsize(f) <= size_mb * 1e6
    assert "size budget:" in capsys.readouterr().out
    rep = json.loads((tmp_path / "sized.rank_report.json").read_text())
    assert rep["file_bytes"] == os.path.getsize(f) and "0.2 MB" in rep["budget"]
    assert all(c["rel_error"] is not None and c["nu"] is not None for c in rep["components"])
    cfg = json.loads((tmp_path / "sized.config.json").read_text())
    assert cfg["export"]["size_mb"] == size_mb and cfg["export"]["dtype"] == "float16"


@pytest.mark.parametrize("args,match", [
    (["--size-mb", "0"], "size_mb=0.0 is invalid"),
    (["--params", "-4"], "params=-4 is invalid"),
    (["--size-mb", "1", "--rank-tol", "0.1"], "--rank-tol and a size budget are both given"),
])
def test_cli_refuses_bad_budgets_before_loading_anything(tmp_path, capsys, args, match):
    rc = main(["train", str(tmp_path), "--model", "tiny-sd15", "--out", str(tmp_path / "o"),
               *args])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_budget_and_r_target_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path), "--size-mb", "5",
              "--r-target", "4"])
    assert "not allowed with argument" in capsys.readouterr().err
