"""LyCORIS LoHa / LoKr converted exactly to plain LoRA: against index-level formulas written here
(not the module's code path), through compression, and refusals."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from lora2_engine.budget import Budget
from lora2_engine.cli import main
from lora2_engine.compress import compress
from lora2_engine.formats import LoraFileError
from lora2_engine.lycoris import read_any
from tests.test_compress import plain_deltas

OUT, IN, R = 24, 20, 4


def lycoris_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One module of every supported kind, and each one's Delta W by explicit index sums."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t, want = {}, {}
    # LoHa, linear: dW[o, c] = sum_ij w1a[o,i] w1b[i,c] w2a[o,j] w2b[j,c] * alpha / r
    a1, b1, a2, b2 = rnd(OUT, R), rnd(R, IN), rnd(OUT, R), rnd(R, IN)
    t.update({"lora_unet_loha.hada_w1_a": a1, "lora_unet_loha.hada_w1_b": b1,
              "lora_unet_loha.hada_w2_a": a2, "lora_unet_loha.hada_w2_b": b2,
              "lora_unet_loha.alpha": torch.tensor(2.0)})
    want["lora_unet_loha"] = torch.einsum("oi,ic,oj,jc->oc", a1, b1, a2, b2) * 2.0 / R
    # LoHa with Tucker cores (3x3 conv): m[p, r, k, l] = (wa^T t[:, :, k, l] wb)[p, r]
    k = 3
    t1, t2 = rnd(R, R, k, k), rnd(R, R, k, k)
    wa1, wb1, wa2, wb2 = rnd(R, OUT), rnd(R, IN), rnd(R, OUT), rnd(R, IN)
    t.update({"lora_unet_tucker.hada_t1": t1, "lora_unet_tucker.hada_t2": t2,
              "lora_unet_tucker.hada_w1_a": wa1, "lora_unet_tucker.hada_w1_b": wb1,
              "lora_unet_tucker.hada_w2_a": wa2, "lora_unet_tucker.hada_w2_b": wb2})
    m1, m2 = torch.zeros(OUT, IN, k, k, dtype=torch.float64), torch.zeros(OUT, IN, k, k,
                                                                           dtype=torch.float64)
    for y in range(k):
        for x in range(k):
            m1[:, :, y, x] = wa1.T @ t1[:, :, y, x] @ wb1
            m2[:, :, y, x] = wa2.T @ t2[:, :, y, x] @ wb2
    want["lora_unet_tucker"] = m1 * m2  # no alpha: scale 1
    # LoKr, w1 whole and w2 = a @ b: dW[i1*o2 + i2, j1*c2 + j2] = w1[i1,j1] w2[i2,j2] alpha/r2
    w1, w2a, w2b = rnd(4, 5), rnd(6, 2), rnd(2, 4)
    t.update({"lora_unet_lokr.lokr_w1": w1, "lora_unet_lokr.lokr_w2_a": w2a,
              "lora_unet_lokr.lokr_w2_b": w2b, "lora_unet_lokr.alpha": torch.tensor(1.0)})
    w2 = w2a @ w2b
    want["lora_unet_lokr"] = torch.einsum("ab,cd->acbd", w1, w2).reshape(24, 20) * 1.0 / 2
    # LoKr, both whole: scale 1 even with an alpha
    v1, v2 = rnd(3, 2), rnd(8, 10)
    t.update({"lora_unet_lokr_full.lokr_w1": v1, "lora_unet_lokr_full.lokr_w2": v2,
              "lora_unet_lokr_full.alpha": torch.tensor(7.0)})
    want["lora_unet_lokr_full"] = torch.einsum("ab,cd->acbd", v1, v2).reshape(24, 20)
    # LoKr on a conv: w2 a (o2, c2, 3, 3) kernel, w1 = a @ b
    u1a, u1b, u2 = rnd(2, 1), rnd(1, 2), rnd(12, 10, 3, 3)
    t.update({"lora_unet_lokr_conv.lokr_w1_a": u1a, "lora_unet_lokr_conv.lokr_w1_b": u1b,
              "lora_unet_lokr_conv.lokr_w2": u2, "lora_unet_lokr_conv.alpha": torch.tensor(3.0)})
    want["lora_unet_lokr_conv"] = (torch.einsum("ab,cdyx->acbdyx", u1a @ u1b, u2)
                                   .reshape(24, 20, 3, 3) * 3.0 / 1)
    return {k: v.float() for k, v in t.items()}, want


@pytest.fixture
def lycoris_file(tmp_path):
    tensors, want = lycoris_tensors()
    path = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(path))
    return path, want


def test_every_module_converts_exactly(lycoris_file):
    path, want = lycoris_file
    lora = read_any(path)
    assert set(lora.modules) == set(want) and lora.style == "kohya"
    for key, dw in want.items():
        w = lora.modules[key]
        got = w.up.flatten(1).double() @ w.down.flatten(1).double() * w.scale
        assert torch.allclose(got, dw.flatten(1), atol=1e-4 * float(dw.abs().max())), key
    conv = lora.modules["lora_unet_lokr_conv"]
    assert conv.down.shape[1:] == (20, 3, 3) and conv.up.shape[2:] == (1, 1)
    assert lora.modules["lora_unet_tucker"].down.shape[1:] == (IN, 3, 3)


def test_compressed_lycoris_file_is_a_plain_lora_with_the_optimal_error(lycoris_file, tmp_path):
    path, want = lycoris_file
    out = tmp_path / "plain.safetensors"
    assert main(["compress", str(path), "--error", "0.2", "--out", str(out)]) == 0
    got = plain_deltas(out)
    lost = total = 0.0
    for key, dw in want.items():
        d = dw.flatten(1)
        lost += float(torch.linalg.matrix_norm(got[key] - d)) ** 2
        total += float(torch.linalg.matrix_norm(d)) ** 2
    assert 0.1 < (lost / total) ** 0.5 <= 0.2 + 1e-4
    big = compress(read_any(path), Budget.megabytes(10))  # everything fits: exact
    assert big.total_rel_error == pytest.approx(0, abs=1e-6)


def test_incomplete_lycoris_module_is_refused(tmp_path):
    tensors, _ = lycoris_tensors()
    del tensors["lora_unet_loha.hada_w2_b"]
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraFileError, match="loha module 'lora_unet_loha' lacks hada_w2_b"):
        read_any(path)


@pytest.mark.parametrize("suffix, what", [
    ("lora_mid.weight", "LoCon with a Tucker core"),
    ("oft_diag", "OFT/BOFT"),
    ("a1.weight", "GLoRA"),
    ("w_norm", "norm-layer"),
])
def test_other_types_are_refused_by_name(tmp_path, capsys, suffix, what):
    tensors, _ = lycoris_tensors()
    tensors[f"lora_unet_extra.{suffix}"] = torch.zeros(2, 2)
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    before = sorted(os.listdir(tmp_path))
    assert main(["compress", str(path), "--size-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert "lora_unet_extra" in err and what in err and re.search("cannot be converted", err)
    assert sorted(os.listdir(tmp_path)) == before


def test_fp16_lycoris_is_saved_in_fp16_by_default(tmp_path):
    from safetensors.torch import load_file

    tensors, _ = lycoris_tensors()
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in tensors.items()}, str(path))
    result = compress(read_any(path), Budget.megabytes(10))
    out = load_file(str(result.write(tmp_path / "out.safetensors")))
    assert {v.dtype for k, v in out.items() if k.endswith(".weight")} == {torch.float16}
    assert "lora2.source_dtype" not in result.lora.metadata
