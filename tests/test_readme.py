"""The README's promises: its Python examples run, its two commands are the real ones."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_blocks(tmp_path: Path, *blocks: str) -> dict:
    """Run README code as a script file (``runpy``, as ``python file.py`` would): the globals
    it leaves."""
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    return runpy.run_path(str(script), run_name="__main__")


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    ns = run_blocks(tmp_path, blocks[0])
    assert ns["adapters"].layers == {}  # detached at the end
    assert Path(ns["path"]).is_file()


def test_readme_first_screen_has_the_two_commands():
    """A fresh machine needs two commands: the demo end to end, and the tests as CI runs them
    (CI runs .ci/run, which installs only from the configured package index)."""
    first = "\n".join(README.read_text().splitlines()[:30])
    block = re.search(r"```bash\n(.*?)```", first, re.S)
    assert block, "no command block on the README's first screen"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m lora2_engine demo"), commands[0]
    assert commands[1] == ".ci/run"
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(r"^python -m pytest -q$", ci, re.M)
    assert not re.search(r"https?://|index-url|find-links|--trusted-host|\bcurl\b|\bwget\b",
                         ci), "CI must install only through the configured package index"


def test_readme_preset_table_is_the_engine_presets():
    """The table under 'The method, and our defaults' is what config.preset() builds."""
    from lora2_engine.config import PRESETS, preset

    text = README.read_text()
    header = re.search(r"^\| preset \|(.*)\|$", text, re.M)
    cols = [c.strip() for c in header.group(1).split("|")]
    rows = re.findall(r"^\| `(\w+)`(?: \([^)]*\))? \|(.*)\|$", text[header.end():], re.M)
    table = {name: dict(zip(cols, (c.strip() for c in cells.split("|"))))
             for name, cells in rows if name in PRESETS}
    assert sorted(table) == sorted(PRESETS)
    numbers = {"r_target": ("adapter", "r_target"), "init rank": ("adapter", "init_rank"),
               "r_max": ("adapter", "r_max"), "lr": ("train", "lr"),
               "ν lr": ("train", "nu_lr"), "λ_r": ("train", "lambda_r"),
               "λ_e": ("train", "lambda_e")}
    for name, row in table.items():
        cfg = dict(zip(("adapter", "train"), preset(name)))
        for col, (part, field) in numbers.items():
            assert float(row[col]) == getattr(cfg[part], field), (name, col)
        assert row["new slots"].split()[0] == cfg["adapter"].slot_init, name
        signal = {"normalised": "normalized"}.get(row["ν signal"], row["ν signal"])
        assert signal == cfg["train"].nu_signal, name
