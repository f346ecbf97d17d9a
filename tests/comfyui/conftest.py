"""Fixtures for the node tests: the pack imported as a package, and a real ComfyUI server.

``pack`` needs no ComfyUI (it imports ``nodes/core.py`` the way ComfyUI would, as part of the
pack package). ``server`` needs ``COMFYUI_PATH``/``COMFYUI_PYTHON`` and skips, saying why,
without them; it writes a tiny SD1.5 checkpoint and a small subject folder into a scratch
ComfyUI base directory, starts the server once per session, and stops it at the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from .harness import REPO, skip_reason, start_server
from .tiny_checkpoint import write_tiny_sd15_checkpoint

PACK = "comfyui_lora2"
CHECKPOINT = "tiny_sd15.safetensors"
SUBJECT = "subject"
torch.set_num_threads(1)


def import_pack():
    """The repository imported as one package (what ComfyUI does), without ComfyUI."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


@pytest.fixture(scope="session")
def core():
    import_pack()
    return importlib.import_module(f"{PACK}.nodes.core")


def write_subject(folder: Path, n: int = 3, size: tuple[int, int] = (80, 96)) -> Path:
    """``n`` small photos-to-be (random RGB), one kohya caption and one broken file."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    (folder / "img1.txt").write_text("a photo of sks dog, sitting")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


@pytest.fixture(scope="session")
def comfy_ready():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory, comfy_ready) -> Path:
    return write_tiny_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / CHECKPOINT)


def prepare_base(base: Path, checkpoint: Path) -> Path:
    target = base / "models" / "checkpoints" / CHECKPOINT
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            target.hardlink_to(checkpoint)
        except OSError:
            shutil.copy(checkpoint, target)
    write_subject(base / "input" / SUBJECT)
    return base


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_file):
    base = prepare_base(tmp_path_factory.mktemp("comfy-base"), checkpoint_file)
    srv = start_server(base)
    yield srv
    srv.stop()
