import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora2_engine.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--steps", "3", "--resolution", "64", "--out", str(out), "--no-planted"])
    assert rc == 0
    return out


def test_demo_writes_adapter_report_and_plots(demo_run):
    for name in ("lora2_demo.safetensors", "lora2_demo.rank_report.json",
                 "lora2_demo.rank_report.png", "lora2_demo.loss.png", "lora2_demo.config.json"):
        assert (demo_run / name).stat().st_size > 0, name
    assert not (demo_run / "lora2_demo.state.safetensors").exists()  # removed after export
    rep = json.loads((demo_run / "lora2_demo.rank_report.json").read_text())
    sd = load_file(str(demo_run / "lora2_demo.safetensors"))
    downs = {k: v for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert len(rep["components"]) == 168  # tiny SDXL: 42 attention modules x 4
    # the report describes the file: zero updates are left out of it at rank 0
    assert len(downs) == sum(r["rank"] > 0 for r in rep["components"])
    assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_")
               for k in downs)
    assert sum(r["params"] for r in rep["components"]) == sum(
        v.shape[0] * (v.shape[1] + sd[k.replace("lora_down", "lora_up")].shape[0])
        for k, v in downs.items())


def test_demo_refuses_to_overwrite(demo_run, capsys):
    rc = main(["demo", "--steps", "1", "--resolution", "64", "--out", str(demo_run)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err


def test_report_and_pad_commands(demo_run, capsys):
    f = demo_run / "lora2_demo.safetensors"
    assert main(["report", str(f)]) == 0
    out = capsys.readouterr().out
    assert "style kohya, family sdxl, LoRA2" in out and "uniform rank" in out
    assert main(["pad", str(f), "--rank", "1"]) == 2
    assert "below the largest rank" in capsys.readouterr().err
    assert main(["pad", str(f), "--rank", "40"]) == 0
    padded = load_file(str(demo_run / "lora2_demo_r40.safetensors"))
    src = load_file(str(f))
    for k in src:
        if k.endswith("lora_down.weight"):
            p = k[: -len(".lora_down.weight")]
            d0 = src[f"{p}.lora_up.weight"] @ src[k] * (src[f"{p}.alpha"] / src[k].shape[0])
            d1 = padded[f"{p}.lora_up.weight"] @ padded[k] * (padded[f"{p}.alpha"] / 40)
            assert torch.allclose(d0, d1, atol=1e-6)


def test_report_png_refuses_to_overwrite_before_printing(demo_run, capsys):
    f, png = demo_run / "lora2_demo.safetensors", demo_run / "map.png"
    png.write_bytes(b"mine")
    assert main(["report", str(f), "--png", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"error: {png} already exists: choose another --png "
                                         "or pass --overwrite")
    assert png.read_bytes() == b"mine"
    assert main(["report", str(f), "--png", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SUBCOMMANDS = ["demo", "train", "report", "pad", "compress", "merge", "extract"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help_and_its_default(command):
    """--help explains every option; an option with a default shows it."""
    from lora2_engine.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    p = sub.choices[command]
    text = p.format_help()
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, (command, action.dest)
        if action.option_strings and action.default not in (None, False):
            assert "default" in p._get_formatter()._get_help_string(action), action.dest
    assert command == "report" or "(default: " in text  # report has no option with one


def test_help_does_not_import_torch():
    """--help answers before the engine's heavy imports (torch, matplotlib)."""
    import subprocess
    import sys

    code = ("import sys\nfrom lora2_engine.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['demo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'matplotlib', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]), timeout=120).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"


def test_progress_continues_from_the_resumed_step(tmp_path):
    from safetensors.torch import save_file

    from lora2_engine.cli import _progress, _resumed_step

    state = tmp_path / "s.state.safetensors"
    save_file({"x": torch.zeros(1)}, str(state), {"step": "7"})
    (tmp_path / "bad.state.safetensors").write_bytes(b"not a state")
    assert _resumed_step(str(state)) == 7
    assert _resumed_step(str(tmp_path / "bad.state.safetensors")) == 0  # reported later
    assert _resumed_step(None) == 0
    bar, on_step = _progress(10, _resumed_step(str(state)))
    assert bar.n == 7

    class Trainer:
        step = 8

    on_step(Trainer, {"task": 0.1, "mean_rank": 2.0})
    assert bar.n == 8
    Trainer.step = 10
    on_step(Trainer, {"task": 0.1, "mean_rank": 2.0})
    assert bar.n == bar.total == 10
    bar.close()


def test_help_lists_the_registry_stand_ins():
    """--help reads stand-in names from the families folder (no torch); the registry agrees."""
    from lora2_engine.cli import stand_in_names
    from lora2_engine.models.loader import tiny_names

    assert stand_in_names() == sorted(tiny_names())
