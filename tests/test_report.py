"""Rank reports: the rank map places any LoRA's modules (kohya, ComfyUI, diffusers/PEFT names,
non-attention modules, DiT blocks) as blocks x module kinds, in model order, bounded size."""

import math

import pytest

from lora2_engine.formats.keys import SDXL, file_key
from lora2_engine.report import (
    MAX_COLUMNS,
    ComponentRow,
    RankReport,
    block_and_kind,
    rank_map_figure,
    rank_map_grid,
)


@pytest.mark.parametrize("name,want", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0", ("in4.1 tb0", "self out")),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
     ("in4.1 tb0", "self out")),
    ("unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", ("down1.1 tb0", "cross k")),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
     ("down1.0 tb0", "ff in")),
    ("lora_unet_input_blocks_4_1_proj_in", ("in4.1", "proj in")),
    ("lora_unet_input_blocks_4_0_in_layers_2", ("in4.0", "in layers 2")),
    ("lora_unet_down_blocks_1_resnets_0_conv1", ("down1 res0", "conv1")),
    ("diffusion_model.double_blocks.3.img_attn.qkv", ("double 3", "img attn qkv")),
    ("lora_unet_single_blocks_12_linear1", ("single 12", "linear1")),
    ("transformer.single_transformer_blocks.5.attn.to_q", ("single 5", "attn q")),
    ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", ("te layer 3", "self attn q proj")),
    ("some.custom_3.thing", ("some.custom.3", "thing")),
])
def test_block_and_kind_for_every_naming(name, want):
    assert block_and_kind(name) == want


def _report(names, rank=lambda i: 1 + i % 7) -> RankReport:
    return RankReport([ComponentRow(n, rank(i), 10) for i, n in enumerate(names)])


def _sdxl_names():
    """Every attention projection of SDXL's transformer blocks (LDM names) + res blocks."""
    names = []
    for blk, depth in ((4, 2), (5, 2), (7, 10), (8, 10)):
        for t in range(depth):
            names += [f"input_blocks.{blk}.1.transformer_blocks.{t}.{a}.{p}"
                      for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    names += [f"input_blocks.{b}.0.{m}" for b in (1, 2, 4, 5) for m in
              ("in_layers.2", "out_layers.3", "emb_layers.1")]
    return names


@pytest.mark.parametrize("style", ["kohya", "comfy", "diffusers"])
def test_one_model_gives_one_map_in_every_key_style(style):
    """The same modules named by any style: the same rows (model order) and columns."""
    names = _sdxl_names()
    rows, cols, grid = rank_map_grid(_report([file_key(n, style, SDXL) for n in names]))
    ref_rows, ref_cols, ref_grid = rank_map_grid(_report(names))
    assert len(rows) == len(ref_rows) == 24 + 4 and cols == ref_cols
    assert cols[:8] == ["self q", "self k", "self v", "self out",
                        "cross q", "cross k", "cross v", "cross out"]
    assert set(cols[8:]) == {"in layers 2", "out layers 3", "emb layers 1"}
    assert sum(not math.isnan(v) for row in grid for v in row) == len(names)
    def cells(g):  # every row's ranks by column, rows in any order (names differ by style)
        return sorted(tuple(-1 if math.isnan(v) else v for v in r) for r in g)

    assert cells(grid) == cells(ref_grid)


def test_rows_follow_the_model_not_the_alphabet():
    rows = rank_map_grid(_report([f"lora_unet_input_blocks_{b}_1_transformer_blocks_0_attn1_to_q"
                                  for b in (10, 2, 1)] +
                                 ["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
                                  "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q"]))[0]
    assert rows == ["in1.1 tb0", "in2.1 tb0", "in10.1 tb0", "mid.1 tb0", "out0.1 tb0"]


def test_a_flux_dit_lora_is_a_bounded_map():
    names = [f"diffusion_model.double_blocks.{i}.{s}_{m}" for i in range(19)
             for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2",
                                                "mod.lin")]
    names += [f"diffusion_model.single_blocks.{i}.{m}" for i in range(38)
              for m in ("linear1", "linear2", "modulation.lin")]
    rows, cols, _ = rank_map_grid(_report(names))
    assert len(rows) == 57 and len(cols) == 13
    assert rows[0] == "double 0" and rows[19] == "single 0"
    fig = rank_map_figure(_report(names))
    w, h = fig.get_size_inches()
    assert w <= 14 and h <= 20


def test_many_module_kinds_share_an_other_column():
    names = [f"blocks.{i}.kind{k}" for i in range(3) for k in range(40)]
    rows, cols, grid = rank_map_grid(_report(names, rank=lambda i: i % 40 + 1))
    assert len(cols) == MAX_COLUMNS and cols[-1] == "other"
    assert all(row[-1] == max(v for v in row) for row in grid)  # the largest merged rank


def test_the_report_node_text_has_its_summary_first():
    rep = _report(_sdxl_names())
    text = f"{rep.summary()}\n\n{rep.table(totals=False)}"
    assert text.splitlines()[0].startswith(f"total: {len(rep.rows)} components")
    assert rep.table().splitlines()[-1] == rep.summary()


@pytest.mark.parametrize("style", ["kohya", "comfy", "diffusers"])
def test_a_fused_module_stored_split_is_one_component(style):
    """Flux's qkv / linear1 in diffusers names are several file modules (same A, B split by
    rows): the report counts each fused module once, with its own rows, in every style."""
    import torch

    from lora2_engine import AdapterConfig, ExportConfig, attach
    from lora2_engine.formats.lora_file import adapters_to_lora
    from lora2_engine.models.loader import load_model
    from lora2_engine.report import report_from_file

    model = load_model("tiny-flux")
    ad = attach(model.denoiser.module, AdapterConfig(targets=model.family.targets,
                                                     slot_init="random"))
    with torch.no_grad():
        for layer in ad.layers.values():
            layer.B.normal_()
    want = sorted((n, lay.rank, lay.rank * (lay.m + lay.n)) for n, lay in ad.layers.items())
    lora = adapters_to_lora(ad, ExportConfig(key_style=style, rank_tol=0), model.layout)
    ad.detach()
    got = report_from_file(lora)
    assert sorted((r.name, r.rank, r.params) for r in got.rows) == want
    if style == "diffusers":
        assert len(lora.modules) > len(got.rows)  # the split parts are there in the file
    rows, _, _ = rank_map_grid(got)
    assert rows == ["double 0", "single 0"]
