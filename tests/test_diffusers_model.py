"""A diffusers SD1.x pipeline folder trains from the CLI, and diffusers itself loads the file.

The pipeline is built in the test (random weights, tiny sizes, a hand-written tokenizer
vocabulary); its files are written with ``save_pretrained`` and read back by the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is optional")
transformers = pytest.importorskip("transformers", reason="transformers is optional")

from lora2_engine.cli import main as cli  # noqa: E402
from lora2_engine.formats import read_lora  # noqa: E402

DOG = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog"


def _tokenizer(folder: Path):
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd15_pipe")
    torch.manual_seed(0)
    tok = _tokenizer(d)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
        attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                             scheduler=sched, safety_checker=None,
                                             feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(str(d / "pipe"))
    return d / "pipe"


def _train(pipeline_dir: Path, out: Path, style: str) -> Path:
    # three steps of the default preset leave every module at one rank; the paper preset's raw
    # nu signal moves ranks at once, which gives the mixed ranks diffusers' rank_pattern needs
    rc = cli(["train", str(DOG), "--model", str(pipeline_dir), "--out", str(out), "--steps", "3",
              "--resolution", "64", "--init-rank", "4", "--name", style, "--lr", "1e-2",
              "--key-style", style, "--preset", "paper", "--rank-tol", "0"])
    assert rc == 0
    return out / f"{style}.safetensors"


def _diffusers_deltas(pipeline_dir: Path, file: Path) -> dict[str, torch.Tensor]:
    """Load ``file`` with diffusers itself, fuse it, and return W_after - W_before per weight."""
    pytest.importorskip("peft", reason="diffusers needs peft to load LoRA files")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    return {k: after[k] - before[k] for k in before}


def _compare(lora, deltas) -> int:
    checked = 0
    for key, w in lora.modules.items():
        name = key.removeprefix("lora_unet_").removeprefix("unet.").replace(".", "_")
        hits = [k for k in deltas if k.replace(".", "_") == name + "_weight"]
        assert len(hits) == 1, key
        assert w.delta().abs().max() > 1e-4  # a real update, far above the tolerance
        assert torch.allclose(deltas[hits[0]], w.delta(), atol=1e-6), (key, w.rank)
        checked += 1
    return checked


def test_cli_trains_a_diffusers_folder(pipeline_dir, tmp_path):
    lora = read_lora(_train(pipeline_dir, tmp_path, "kohya"))
    assert lora.family() == "sd15" and lora.style == "kohya"
    prefixes = ("lora_unet_down_blocks_0_attentions_0_", "lora_unet_mid_block_attentions_0_",
                "lora_unet_up_blocks_1_attentions_")
    assert all(k.startswith(prefixes) for k in lora.modules)
    assert len(lora.modules) == 4 * 2 * (1 + 1 + 2)  # q,k,v,out x attn1/2 x transformers


def test_diffusers_loads_our_diffusers_style_file_exactly(pipeline_dir, tmp_path):
    lora = read_lora(_train(pipeline_dir, tmp_path, "diffusers"))
    assert lora.style == "diffusers" and len(set(lora.ranks().values())) > 1
    assert _compare(lora, _diffusers_deltas(pipeline_dir, lora.path)) == len(lora.modules)


@pytest.mark.xfail(strict=True, reason="diffusers 0.42 bug: for kohya files its alpha_pattern "
                   "keys keep '.processor.*_lora.down.weight', so a module whose rank differs "
                   "from the most common one gets the common alpha (scale off by r0/r)")
def test_diffusers_loads_our_kohya_style_file_exactly(pipeline_dir, tmp_path):
    lora = read_lora(_train(pipeline_dir, tmp_path, "kohya"))
    assert len(set(lora.ranks().values())) > 1
    _compare(lora, _diffusers_deltas(pipeline_dir, lora.path))
