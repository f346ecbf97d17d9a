"""Merging LoRAs under a budget: linear against PEFT's add_weighted_adapter, TIES against PEFT's
merge_utils, DARE seeded, key styles aligned, identity, and refusals that write nothing."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from lora2_engine.budget import Budget
from lora2_engine.cli import main
from lora2_engine.formats import read_lora, write_lora
from lora2_engine.formats.keys import SD15, SDXL
from lora2_engine.formats.lora_file import LoraFile, ModuleWeights
from lora2_engine.merging import MergeError, canonical_key, dare, merge_loras, ties
from tests.test_compress import plain_deltas

SHAPES = {"m0": (64, 48), "m1": (40, 72), "m2": (56, 56)}


def small_lora(seed: int, rank: int, alpha: float, family: str = "sdxl",
               shapes=SHAPES) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    mods = {f"lora_unet_{k}": ModuleWeights(torch.randn(rank, n, generator=g) / n ** 0.5,
                                            torch.randn(m, rank, generator=g), alpha)
            for k, (m, n) in shapes.items()}
    return LoraFile(mods, "kohya", {"lora2.family": family})


@pytest.fixture
def files(tmp_path):
    return [read_lora(write_lora(small_lora(s, r, a), tmp_path / f"l{s}.safetensors"))
            for s, r, a in ((0, 8, 4.0), (1, 4, 4.0), (2, 6, 3.0))]


def peft_merge(loras, weights, combination, svd_rank, density=None):
    """PEFT's add_weighted_adapter on Linear layers carrying the same adapters."""
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Module()
    net.layers = torch.nn.ModuleDict({k: torch.nn.Linear(n, m, bias=False)
                                      for k, (m, n) in SHAPES.items()})
    model = None
    for i, lora in enumerate(loras):
        w0 = next(iter(lora.modules.values()))
        cfg = LoraConfig(r=w0.rank, lora_alpha=w0.alpha, target_modules=list(SHAPES))
        if model is None:
            model = get_peft_model(net, cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
        for k in SHAPES:
            layer = model.base_model.model.layers[k]
            layer.lora_A[f"a{i}"].weight.data = lora.modules[f"lora_unet_{k}"].down.clone()
            layer.lora_B[f"a{i}"].weight.data = lora.modules[f"lora_unet_{k}"].up.clone()
    model.add_weighted_adapter([f"a{i}" for i in range(len(loras))], list(weights), "merged",
                               combination_type=combination, svd_rank=svd_rank, density=density)
    return {f"lora_unet_{k}": model.base_model.model.layers[k].get_delta_weight("merged")
            .detach().double() for k in SHAPES}


def test_linear_merge_equals_peft_full_rank_svd(tmp_path, files):
    weights = [0.7, -0.4, 1.3]
    result = merge_loras(files, weights, "linear", Budget.megabytes(1))
    got = plain_deltas(result.write(tmp_path / "m.safetensors"))
    want = peft_merge(files, weights, "svd", svd_rank=18)
    for k, dw in want.items():
        assert torch.allclose(got[k], dw, atol=1e-4), k
    assert result.total_rel_error == pytest.approx(0, abs=1e-9)


def test_ties_matches_peft_definition_and_truncates_optimally(tmp_path, files):
    from peft.utils import merge_utils

    weights, density = [1.0, 0.5, 0.8], 0.4
    deltas = {k: [f.modules[k].delta() for f in files] for k in files[0].modules}
    for k, ds in deltas.items():
        ref = merge_utils.ties(ds, torch.tensor(weights), density, "total")
        assert torch.allclose(ties(ds, weights, density), ref, atol=1e-6), k
    result = merge_loras(files, weights, "ties", Budget.of_params(3000), density=density)
    got = plain_deltas(result.write(tmp_path / "t.safetensors"))
    ranks = {r.key: r.rank for r in result.rows}
    for k, ds in deltas.items():
        ref = merge_utils.ties(ds, torch.tensor(weights), density, "total").double()
        s = torch.linalg.svdvals(ref)
        err = float(torch.linalg.matrix_norm(got[k] - ref))
        assert err == pytest.approx(float(s[ranks[k]:].square().sum().sqrt()), rel=1e-3), k
    assert 3000 - 112 < result.params <= 3000  # within one rank of the budget (all cost 112)


def test_dare_is_peft_dare_linear_in_law_and_repeats_with_its_seed(tmp_path, files):
    d = files[0].modules["lora_unet_m0"].delta()
    g = torch.Generator().manual_seed(0)
    out = dare([d], [1.0], 0.3, [g])
    kept = out != 0
    assert 0.25 < kept.float().mean() < 0.35
    assert torch.allclose(out[kept], d[kept] / 0.3)
    a = merge_loras(files, [1, 1, 1], "dare", Budget.of_params(4000), density=0.3, seed=5)
    b = merge_loras(files, [1, 1, 1], "dare", Budget.of_params(4000), density=0.3, seed=5)
    c = merge_loras(files, [1, 1, 1], "dare", Budget.of_params(4000), density=0.3, seed=6)
    sa, sb, sc = (x.lora.state_dict() for x in (a, b, c))  # (metadata order may vary)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].shape == sc[k].shape)


def test_peft_ties_svd_and_ours_at_equal_parameters(files):
    """At PEFT's parameter count (uniform rank 6), our ranks lose no more of the TIES update."""
    from peft.utils import merge_utils

    weights, density = [1.0, 1.0, 1.0], 0.5
    peft = peft_merge(files, weights, "ties_svd", svd_rank=6, density=density)
    params = sum(6 * (m + n) for m, n in SHAPES.values())
    ours = merge_loras(files, weights, "ties", Budget.of_params(params), density=density)
    exact = {k: merge_utils.ties([f.modules[k].delta() for f in files], torch.tensor(weights),
                                 density, "total").double() for k in files[0].modules}
    total = sum(float(e.square().sum()) for e in exact.values())
    peft_err = (sum(float((peft[k] - e).square().sum()) for k, e in exact.items()) / total) ** .5
    assert ours.params <= params
    assert ours.total_rel_error <= peft_err + 1e-6


def test_merging_one_file_with_weight_one_returns_it(tmp_path, files):
    res = merge_loras(files[:1], [1.0], "linear", Budget.megabytes(1))
    assert res.unchanged
    out, src = load_file(str(res.write(tmp_path / "o.safetensors"))), load_file(
        str(files[0].path))
    assert out.keys() == src.keys() and all(torch.equal(out[k], src[k]) for k in src)


def test_key_styles_are_aligned(tmp_path):
    """A kohya SD1.5 file (diffusers block names) + a ComfyUI file (LDM names) of one model."""
    k_sd15 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    comfy = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    diffusers = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert canonical_key(k_sd15, SD15) == canonical_key(comfy, SD15) == canonical_key(
        diffusers, SD15) == "unet:input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    k_sdxl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert canonical_key(k_sdxl, SDXL) == canonical_key(comfy, SDXL)
    g = torch.Generator().manual_seed(0)
    w = ModuleWeights(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 4.0)
    a = LoraFile({k_sd15: w}, "kohya", {"lora2.family": "sd15"})
    b = LoraFile({comfy: w}, "comfy", {"lora2.family": "sd15"})
    res = merge_loras([a, b], [1.0, 1.0], "linear", Budget.megabytes(1))
    assert list(res.lora.modules) == [k_sd15]
    got = plain_deltas(res.write(tmp_path / "m.safetensors"))[k_sd15]
    assert torch.allclose(got, 2 * w.delta().double(), atol=1e-4)


def test_merge_file_within_byte_budget(tmp_path, files):
    res = merge_loras(files, [1, 1, 1], "linear", Budget.of_bytes(8_000), dtype="float16")
    size = os.path.getsize(res.write(tmp_path / "m.safetensors"))
    assert 0.98 * 8_000 <= size <= 8_000


def _sd15(tmp_path):
    return write_lora(small_lora(9, 4, 4.0, family="sd15"), tmp_path / "sd15.safetensors")


def _other_shape(tmp_path):
    return write_lora(small_lora(9, 4, 4.0, shapes={"m0": (64, 50)}), tmp_path / "x.safetensors")


@pytest.mark.parametrize("extra, args, message", [
    (_sd15, [], "different base models \\(l0.safetensors is SDXL, sd15.safetensors is SD1.5\\)"),
    (_other_shape, [], "module 'lora_unet_m0' has Delta W \\(64, 50\\) in x.safetensors but "
                       "\\(64, 48\\) in l0.safetensors"),
    (None, ["--weights", "1", "2", "3"], "3 weight\\(s\\) for 2 LoRAs"),
    (None, ["--density", "0"], "density 0.0 must be in \\(0, 1\\]"),
    (None, ["--size-mb", "0.0001"], "below the smallest file"),
])
def test_bad_merges_are_refused_and_write_nothing(tmp_path, files, capsys, extra, args,
                                                  message):
    second = extra(tmp_path) if extra else files[1].path
    before = sorted(os.listdir(tmp_path))
    argv = ["merge", str(files[0].path), str(second), "--out", str(tmp_path / "m.safetensors")]
    if "--size-mb" not in args:
        argv += ["--size-mb", "1"]
    assert main(argv + args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == before


def test_merge_api_refusals():
    a = small_lora(0, 4, 4.0)
    with pytest.raises(MergeError, match="merge method 'avg': choose one of linear, ties, dare"):
        merge_loras([a, a], [1, 1], "avg", Budget.megabytes(1))
    with pytest.raises(MergeError, match="no LoRAs to merge"):
        merge_loras([], [], "linear", Budget.megabytes(1))


def test_cli_merge_ties(tmp_path, files, capsys):
    out = tmp_path / "ties.safetensors"
    assert main(["merge", *(str(f.path) for f in files), "--weights", "1", "0.5", "0.5",
                 "--method", "ties", "--size-mb", "0.012", "--dtype", "float16", "--out",
                 str(out)]) == 0
    assert 0.98 * 12_000 <= os.path.getsize(out) <= 12_000
    assert "total relative error" in capsys.readouterr().out
