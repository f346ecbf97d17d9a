"""Compressing LoRA files to a budget: bytes on disk, the written Delta W against a dense SVD of
the source (both read with plain safetensors), identity cases, and bad input that writes
nothing."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora2_engine.budget import Budget, BudgetError
from lora2_engine.cli import main
from lora2_engine.compress import compress, serialize
from lora2_engine.formats import read_lora, write_lora
from lora2_engine.formats.lora_file import LoraFile, ModuleWeights

BLOCK = "input_blocks_4_1_transformer_blocks_0_"
# (name, down shape, up shape): attention, feed-forward, a 1x1 conv, a LoCon 3x3, small ones
MODULES = [
    (BLOCK + "attn1_to_q", (32, 320), (320, 32)),
    (BLOCK + "attn1_to_k", (16, 320), (320, 16)),
    (BLOCK + "attn2_to_k", (8, 2048), (320, 8)),
    (BLOCK + "attn2_to_v", (8, 2048), (320, 8)),
    (BLOCK + "ff_net_0_proj", (32, 320), (2560, 32)),
    (BLOCK + "ff_net_2", (32, 1280), (320, 32)),
    ("input_blocks_4_1_proj_in", (16, 320, 1, 1), (320, 16, 1, 1)),
    ("input_blocks_4_0_in_layers_2", (16, 320, 3, 3), (320, 16, 1, 1)),
] + [(f"output_blocks_8_1_transformer_blocks_{i}_attn1_to_out_0", (8, 64), (64, 8))
     for i in range(6)]
PREFIX = {"kohya": "lora_unet_", "comfy": "diffusion_model.", "diffusers": "unet."}


def make_lora(seed: int = 0, style: str = "kohya", dtype=torch.float16,
              family: str = "sdxl", modules=MODULES) -> LoraFile:
    """A LoRA with decaying, module-specific spectra and alpha = rank / 2 (scale 0.5)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, (name, down_shape, up_shape) in enumerate(modules):
        r = down_shape[0]
        decay = torch.logspace(0, -1.5 - (i % 3), r) * (1 + i % 4)
        up = torch.randn(up_shape, generator=g) * decay.view(1, r, *[1] * (len(up_shape) - 2))
        down = torch.randn(down_shape, generator=g) / down_shape[1] ** 0.5
        key = PREFIX[style] + (name if style == "kohya" else name.replace("_", "."))
        mods[key] = ModuleWeights(down.to(dtype), up.to(dtype), r / 2)
    return LoraFile(mods, style, {"lora2.family": family, "ss_network_dim": "32"})


def plain_deltas(path) -> dict[str, torch.Tensor]:
    """Delta W per module from a file read with plain safetensors and the stock rule."""
    t = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    peft = json.loads(meta.get("lora_adapter_metadata", "{}"))
    out = {}
    for k in t:
        for down_s, up_s in ((".lora_down.weight", ".lora_up.weight"),
                             (".lora_A.weight", ".lora_B.weight")):
            if k.endswith(down_s):
                p = k[: -len(down_s)]
                d, u = t[k].double().flatten(1), t[p + up_s].double().flatten(1)
                r = d.shape[0]
                if p + ".alpha" in t:
                    alpha = float(t[p + ".alpha"])
                else:  # diffusers: alpha from the packed PEFT config
                    name = p.removeprefix("unet.")
                    alpha = peft.get("unet.alpha_pattern", {}).get(name,
                                                                   peft.get("unet.lora_alpha", r))
                out[p] = u @ d * (alpha / r)
    return out


@pytest.fixture
def source(tmp_path):
    lora = make_lora()
    return read_lora(write_lora(lora, tmp_path / "src.safetensors"))


@pytest.mark.parametrize("style", ["kohya", "comfy", "diffusers"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_file_on_disk_lands_in_the_budget(tmp_path, style, dtype, fraction):
    src = read_lora(write_lora(make_lora(style=style), tmp_path / "src.safetensors"))
    budget = int(fraction * os.path.getsize(src.path))
    result = compress(src, Budget.of_bytes(budget), dtype)
    path = result.write(tmp_path / "out.safetensors")
    size = os.path.getsize(path)
    assert size == result.file_bytes
    assert 0.98 * budget <= size <= budget, (size, budget)
    with safe_open(str(path), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys() if k.endswith(".weight")} == {
            getattr(torch, dtype)}


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_written_delta_is_the_best_rank_r_approximation(tmp_path, source, dtype, tol):
    """Per module: ||dW_src - dW_file||_F equals the dense-SVD tail (Eckart-Young) and the error
    the file reports; total error likewise."""
    result = compress(source, Budget.of_bytes(os.path.getsize(source.path) // 3), dtype)
    path = result.write(tmp_path / "out.safetensors")
    before, after = plain_deltas(source.path), plain_deltas(path)
    assert set(before) == set(after)
    meta_errors = json.loads(safe_open(str(path), "pt").metadata()["lora2.compression"])[
        "rel_error"]
    rows = {r.key: r for r in result.rows}
    lost = total = 0.0
    for key, dw in before.items():
        got = after[key]
        s = torch.linalg.svdvals(dw)
        r = rows[key].rank
        assert got.shape == dw.shape
        tail = float(s[r:].square().sum().sqrt()) / float(s.square().sum().sqrt())
        measured = float(torch.linalg.matrix_norm(got - dw) / torch.linalg.matrix_norm(dw))
        assert measured == pytest.approx(tail, abs=tol), key
        assert rows[key].rel_error == pytest.approx(tail, abs=1e-6)
        assert meta_errors[key] == pytest.approx(tail, rel=1e-3, abs=1e-6)
        lost += float(torch.linalg.matrix_norm(got - dw)) ** 2
        total += float(torch.linalg.matrix_norm(dw)) ** 2
    assert (lost / total) ** 0.5 == pytest.approx(result.total_rel_error, abs=tol)
    assert len({r.rank for r in result.rows}) > 1  # ranks differ per module


def test_locon_3x3_keeps_its_kernel_shape(tmp_path, source):
    result = compress(source, Budget.of_bytes(os.path.getsize(source.path) // 2))
    t = load_file(str(result.write(tmp_path / "out.safetensors")))
    down = t["lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight"]
    up = t["lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight"]
    assert down.shape[1:] == (320, 3, 3) and up.shape == (320, down.shape[0], 1, 1)
    assert t["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].dim() == 4


@pytest.mark.parametrize("budget", ["own", "more", "params"])
def test_budget_at_or_above_own_size_returns_it_unchanged(tmp_path, source, budget):
    own = os.path.getsize(source.path)
    b = {"own": Budget.of_bytes(own), "more": Budget.megabytes(100),
         "params": Budget.of_params(10**9)}[budget]
    result = compress(source, b)
    assert result.unchanged and result.total_rel_error == 0
    out = load_file(str(result.write(tmp_path / "out.safetensors")))
    src = load_file(str(source.path))
    assert out.keys() == src.keys()
    assert all(torch.equal(out[k], src[k]) for k in src)


def test_params_budget_and_error_tolerance(source):
    params = sum(w.rank * (w.up.shape[0] + w.down.flatten(1).shape[1])
                 for w in source.modules.values())
    res = compress(source, Budget.of_params(params // 4))
    assert 0.98 * (params // 4) <= res.params <= params // 4
    res = compress(source, Budget.of_error(0.05))
    assert res.total_rel_error <= 0.05
    assert res.file_bytes < os.path.getsize(source.path)


def test_exact_result_below_budget_says_so(tmp_path):
    """A zero-padded LoRA: its true ranks fit easily; the note says why the file is small."""
    from lora2_engine.merge import pad_lora

    lora = pad_lora(make_lora(modules=MODULES[:3]), 64)
    res = compress(lora, Budget.of_bytes(len(serialize(lora)) - 1))
    assert [r.rank for r in res.rows] == [32, 16, 8]
    assert res.total_rel_error == 0 and "every direction is kept" in res.notes[-1]


def test_report_shows_budget_bytes_and_errors(tmp_path, source):
    from lora2_engine.report import report_from_file

    result = compress(source, Budget.megabytes(0.2))
    table = result.report().table()
    assert "budget 0.2 MB (200,000 bytes)" in table and "rel.error" in table
    assert f"file {result.file_bytes:,} bytes" in table
    rep = report_from_file(read_lora(result.write(tmp_path / "c.safetensors")))
    assert rep.budget == "0.2 MB (200,000 bytes)" and rep.file_bytes == result.file_bytes
    assert [r.rel_error for r in rep.rows] == [pytest.approx(r.rel_error, rel=1e-3, abs=1e-6)
                                               for r in result.rows]
    j = rep.to_json()
    assert j["total_rel_error"] == pytest.approx(result.total_rel_error, rel=1e-3)


def test_lora2_record_keeps_names_with_new_ranks(tmp_path, attn_net):
    from lora2_engine.formats.lora_file import export_adapters
    from tests.test_formats import _trained

    src = read_lora(export_adapters(_trained(attn_net), tmp_path / "a.safetensors"))
    res = compress(src, Budget.of_params(800))
    rec = read_lora(res.write(tmp_path / "b.safetensors")).lora2_modules()
    assert set(rec) == set(src.lora2_modules())
    assert {v["key"]: v["rank"] for v in rec.values()} == {r.key: r.rank for r in res.rows}
    assert all("nu" not in v for v in rec.values())


# -- the CLI and bad input -------------------------------------------------------------------
def test_cli_compress_writes_within_budget(tmp_path, source, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["compress", str(source.path), "--size-mb", "0.15", "--out", str(out)]) == 0
    assert 0.98 * 150_000 <= os.path.getsize(out) <= 150_000
    assert "total relative error" in capsys.readouterr().out
    assert main(["compress", str(source.path), "--size-mb", "0.15", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _dora(tmp_path):
    t = load_file(str(write_lora(make_lora(modules=MODULES[:2]), tmp_path / "d.safetensors")))
    t["lora_unet_" + MODULES[0][0] + ".dora_scale"] = torch.ones(1, 320)
    save_file(t, str(tmp_path / "dora.safetensors"))
    return tmp_path / "dora.safetensors"


def _oft(tmp_path):
    save_file({"lora_unet_x.oft_blocks": torch.zeros(4, 8, 8), "lora_unet_x.alpha":
               torch.tensor(1.0)}, str(tmp_path / "oft.safetensors"))
    return tmp_path / "oft.safetensors"


@pytest.mark.parametrize("args, message", [
    (["--size-mb", "0"], "must be positive"),
    (["--size-mb", "-3"], "must be positive"),
    (["--params", "0"], "must be positive"),
    (["--error", "1.5"], "must be in \\[0, 1\\)"),
    (["--size-mb", "0.001"], "below the smallest file these 14 modules fit in"),
    (["--params", "100"], "below the smallest possible result: rank 1 for each of 14 modules"),
])
def test_bad_budget_writes_nothing(tmp_path, source, capsys, args, message):
    before = sorted(os.listdir(tmp_path))
    assert main(["compress", str(source.path), "--out", str(tmp_path / "o.safetensors"),
                 *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("make, message", [
    (_dora, "is DoRA \\(its update depends on the base model's weight norms\\); it cannot be "
            "converted exactly"),
    (_oft, "is OFT"),
])
def test_unconvertible_lycoris_is_refused_and_writes_nothing(tmp_path, capsys, make, message):
    path = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["compress", str(path), "--size-mb", "1"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == before


def test_compress_refuses_an_empty_budget_in_the_api(source):
    with pytest.raises(BudgetError, match="below the smallest file"):
        compress(source, Budget.of_bytes(1000))


def test_readme_budget_example_runs(tmp_path, monkeypatch):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "Budget.of_bytes" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)  # makes the LoRA file `path`
    exec(compile(example, "README.md", "exec"), ns)
    budget = int(re.search(r"Budget.of_bytes\((\d+)\)", example).group(1))
    assert os.path.getsize(ns["path"]) > budget  # the example really compresses
    small = os.path.getsize(ns["path"].with_name("mine_small.safetensors"))
    assert 0.98 * budget <= small <= budget
