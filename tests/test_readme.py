"""The README's promises: its Python example runs, its two commands are the real ones."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["adapters"].layers == {}  # detached at the end
    assert Path(ns["path"]).is_file()


def test_readme_first_screen_has_the_two_commands():
    first = "\n".join(README.read_text().splitlines()[:30])
    assert "python -m lora2_engine demo" in first
    assert "python -m pytest -q" in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
