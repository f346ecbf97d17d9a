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
    first = "\n".join(README.read_text().splitlines()[:30])
    assert "python -m lora2_engine demo" in first
    assert "python -m pytest -q" in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
