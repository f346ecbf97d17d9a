"""Registry-ready: the pyproject fields the Comfy Registry reads, the icon it points at, the
frontend range the JS needs, and ``comfy node validate`` (when comfy-cli is installed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMFY = PYPROJECT["tool"]["comfy"]


def test_icon_is_a_small_image_in_the_repository():
    from PIL import Image

    url = COMFY["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert url.startswith(prefix), url
    with Image.open(ROOT / url.removeprefix(prefix)) as im:
        assert im.format == "PNG" and max(im.size) <= 400


def test_comfyui_and_frontend_ranges_are_declared():
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"])
    frontend = [d for d in PYPROJECT["project"]["dependencies"]
                if d.startswith("comfyui-frontend-package")]
    assert frontend == ["comfyui-frontend-package>=1.25.0"]
    js = (ROOT / "web" / "lora2.js").read_text()
    assert re.findall(r'^import .* from "(.*)";', js, re.M) == ["../../scripts/app.js"]
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    assert all(Path(ROOT / p).is_dir() for p in COMFY["includes"])


def test_no_exec_or_eval_anywhere():
    """The registry's scan flags exec/eval (S102/S307), tests included."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py") if ".git" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"(?<![\w.])(exec|eval)\(", line)]
    assert hits == []


def test_comfy_node_validate_is_clean():
    comfy = os.environ.get("LORA2_COMFY_CLI") or shutil.which("comfy")
    if not comfy:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli; or set LORA2_COMFY_CLI)")
    out = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "All validation checks passed" in text, text[-3000:]
    assert "Warning" not in text and "S102" not in text, text[-3000:]
