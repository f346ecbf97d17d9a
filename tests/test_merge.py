import pytest
import torch
from safetensors.torch import load_file

from lora2_engine import ExportConfig
from lora2_engine.formats import read_lora, write_lora
from lora2_engine.formats.lora_file import export_adapters
from lora2_engine.merge import PadRankError, pad_lora
from tests.test_formats import _plain_delta, _trained


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_padded_file_gives_same_delta(attn_net, tmp_path, style):
    ad = _trained(attn_net)
    src = export_adapters(ad, tmp_path / "a.safetensors", ExportConfig(key_style=style))
    padded = write_lora(pad_lora(read_lora(src), 16), tmp_path / "p.safetensors")
    a, b = load_file(str(src)), load_file(str(padded))
    prefixes = {k.rsplit(".", 2)[0] for k in a if k.endswith("lora_down.weight")}
    for prefix in prefixes:
        assert b[f"{prefix}.lora_down.weight"].shape[0] == 16
        assert torch.allclose(_plain_delta(b, prefix), _plain_delta(a, prefix), atol=1e-6)
        rank = a[f"{prefix}.lora_down.weight"].shape[0]
        assert torch.count_nonzero(b[f"{prefix}.lora_down.weight"][rank:]) == 0
        assert float(b[f"{prefix}.alpha"]) == 1.0  # still one alpha for the whole file


@pytest.mark.parametrize("style,alpha", [("kohya", "1"), ("diffusers", "14")])
def test_pad_keeps_one_alpha_and_true_metadata(attn_net, tmp_path, style, alpha):
    """Padding keeps every module's alpha equal (diffusers' converter needs that) and the
    kohya metadata true: ss_network_dim is the new rank, ss_network_alpha the one alpha."""
    ad = _trained(attn_net)
    lora = read_lora(export_adapters(ad, tmp_path / "a.safetensors", ExportConfig(key_style=style)))
    padded = read_lora(write_lora(pad_lora(lora, 14), tmp_path / "p.safetensors"))
    assert {w.alpha for w in padded.modules.values()} == {float(alpha)}
    assert padded.metadata["ss_network_dim"] == "14"
    assert padded.metadata["ss_network_alpha"] == alpha
    for key, w in padded.modules.items():
        assert torch.allclose(w.delta(), lora.modules[key].delta(), atol=1e-6), key


def test_pad_below_largest_rank_is_refused(attn_net, tmp_path):
    ad = _trained(attn_net)
    lora = read_lora(export_adapters(ad, tmp_path / "a.safetensors"))
    with pytest.raises(PadRankError, match="rank=5 is below the largest rank in the file \\(7"):
        pad_lora(lora, 5)
    assert pad_lora(lora).ranks() == {k: 7 for k in lora.modules}
