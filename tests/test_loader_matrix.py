"""One file that every loader scales right: the pack's files against kohya/A1111's rule,
diffusers' ``load_lora_weights`` and PEFT, on a mixed-rank LoRA (ComfyUI's stock loader:
tests/comfyui/test_inprocess.py). The old conventions are measured too, so the README's
matrix is what these tests see (``python -m tests.loader_matrix`` prints it)."""

import pytest

pytest.importorskip("diffusers", reason="diffusers is optional")
pytest.importorskip("peft", reason="peft is optional")

from tests import loader_matrix as lm  # noqa: E402

# (convention, loader) pairs that do NOT apply every module at scale 1
OFF = {("alpha = rank", "diffusers"), ("alpha = rank", "peft"), ("no alpha", "peft")}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return lm.python_matrix(tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("loader", ["kohya", "diffusers", "peft"])
@pytest.mark.parametrize("convention", lm.CONVENTIONS)
def test_loader_matrix(matrix, convention, loader):
    res = matrix[convention][loader]
    assert res["modules"] == 32
    if (convention, loader) in OFF:
        assert res["off"] > 0 and res["max_rel_error"] > 0.4, res
    else:
        assert res["off"] == 0 and res["max_rel_error"] < lm.EXACT, res


def test_the_pack_writes_the_convention_every_loader_reads(tmp_path):
    """What the pack exports today is the 'one alpha' row (kohya, ComfyUI) or 'diffusers'."""
    from lora2_engine.formats import read_lora

    unet = lm.load_unet(lm.tiny_sd15_pipeline(tmp_path / "p"))
    ad = lm.mixed_adapters(unet)
    files = lm.write_conventions(ad, lm.PIPELINE_LAYOUT, tmp_path / "f")
    ours = read_lora(files["one alpha"])
    assert {w.alpha for w in ours.modules.values()} == {1.0}
    assert len(set(ours.ranks().values())) == len(set(lm.RANKS))
    assert ours.metadata["ss_network_alpha"] == "1"
    assert ours.metadata["ss_network_dim"] == str(max(lm.RANKS))
