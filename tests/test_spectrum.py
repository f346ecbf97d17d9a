"""Module spectra from thin QR of the factors equal the dense SVD; refactoring keeps shapes."""

import pytest
import torch

from lora2_engine.formats.lora_file import ModuleWeights
from lora2_engine.spectrum import Spectrum


@pytest.mark.parametrize("down_shape, up_shape", [
    ((6, 40), (30, 6)),  # linear
    ((6, 12, 1, 1), (30, 6, 1, 1)),  # 1x1 conv
    ((6, 12, 3, 3), (30, 6, 1, 1)),  # LoCon 3x3: kernel flattened into n
    ((9, 5), (7, 9)),  # rank above min(m, n)
])
def test_qr_spectrum_equals_dense_svd_and_refactor_is_eckart_young(down_shape, up_shape):
    g = torch.Generator().manual_seed(0)
    w = ModuleWeights(torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g),
                      alpha=2.0)
    dense = w.up.flatten(1).double() @ w.down.flatten(1).double() * w.scale
    spec = Spectrum.from_module(w)
    want = torch.linalg.svdvals(dense)
    k = spec.numerical_rank
    assert torch.allclose(spec.s[:k], want[:k], rtol=1e-10)
    assert spec.rank_cost == dense.shape[0] + dense.shape[1]
    for r in range(1, k + 1):
        mod = spec.module(r, torch.float64)
        assert mod.down.shape == (r, *down_shape[1:]) and mod.up.shape == (up_shape[0], r,
                                                                           *up_shape[2:])
        assert mod.alpha == r  # scale 1
        got = mod.up.flatten(1).double() @ mod.down.flatten(1).double()  # alpha/rank = 1
        err = torch.linalg.matrix_norm(got - dense)
        tail = float(want[r:].square().sum().sqrt())  # vectors are kept in float32
        assert float(err) == pytest.approx(tail, abs=1e-5 * float(want[0]))


def test_zero_padded_module_has_its_true_rank():
    g = torch.Generator().manual_seed(1)
    down = torch.cat([torch.randn(3, 20, generator=g), torch.zeros(5, 20)])
    up = torch.cat([torch.randn(16, 3, generator=g), torch.zeros(16, 5)], 1)
    spec = Spectrum.from_factors(up, down)
    assert spec.numerical_rank == 3 and spec.max_rank == 3


@pytest.mark.parametrize("m, n, cap", [(4, 4, 1), (10, 10, 4), (320, 320, 159), (64, 1, 1)])
def test_dense_cap_is_the_last_rank_cheaper_than_dense(m, n, cap):
    spec = Spectrum(torch.ones(min(m, n), dtype=torch.float64), m, n, (n,), ())
    assert spec.dense_cap == cap
    assert cap * (m + n) < m * n or cap == 1
    assert (cap + 1) * (m + n) >= m * n


def test_dense_spectrum_recomputes_vectors():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, 9, generator=g)
    spec = Spectrum.from_dense(lambda: a, (9,))
    assert torch.allclose(spec.s, torch.linalg.svdvals(a.double()), rtol=1e-5)
    full = spec.module(9, torch.float64).delta()
    assert torch.allclose(full.float(), a, atol=1e-5)
