"""A path typed into a node never reads or lists a folder outside ComfyUI's own folders.

The server may be reachable by anyone on the network (``--listen``); the prompts below are what
such a client could POST. Each must fail with a message that says how to stay inside and how
the server's owner can allow other folders, and that names no file of the folder it aimed at
(before the fix, LoadSubjectImages' error listed every file of ``/etc``).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from .conftest import CHECKPOINT

SECRET = ("secret_a1.png", "secret_b2.txt", "secret_c3.jpg")


def _outside(tmp_path_factory) -> Path:
    """A folder outside the server's base with distinctive file names."""
    folder = tmp_path_factory.mktemp("outside")
    for name in SECRET:
        (folder / name).write_bytes(b"not a photo")
    return folder


def _load_subject(folder: str) -> dict:
    return {"1": {"class_type": "LoRA2_LoadSubjectImages", "inputs": {
                "folder": folder, "instance_token": "sks", "class_noun": "dog",
                "resolution": 64, "mode": "crop"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


def _resume(name: str) -> dict:
    """Training from LATENT + CONDITIONING (no LoadSubjectImages: its cached output would hide
    its UI text from the later workflow test) with ``resume`` set."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "sks"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "4": {"class_type": "LoRA2_TrainAdaptiveLoRA", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0], "preset": "spread",
            "steps": 2, "seed": 0, "filename": "",
            "resume": name}}}


def _error_text(server, api: dict) -> str:
    """The failed prompt's status as the client sees it (message and traceback)."""
    prompt_id = server.queue(api)
    for _ in range(3000):
        hist = server.request(f"/history/{prompt_id}")
        if prompt_id in hist:
            status = hist[prompt_id]["status"]
            assert status["status_str"] == "error", status
            return json.dumps(status)
        time.sleep(0.1)
    raise AssertionError("prompt did not finish")


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[\w.\-]+", text.replace("\\n", " ")))


def _leaked(text: str, names, typed: str = "") -> set[str]:
    """Names of ``names`` in ``text`` other than those the client typed itself."""
    return (_tokens(text) & set(names)) - _tokens(typed)


@pytest.fixture(scope="module")
def outside(tmp_path_factory, server):
    folder = _outside(tmp_path_factory)
    link = server.base / "input" / "linked_out"
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    inner = server.base / "input" / "mixed"  # a real folder holding one file linked outside
    inner.mkdir(exist_ok=True)
    if not (inner / "a.png").exists():
        (inner / "a.png").symlink_to(folder / SECRET[0])
    return folder


@pytest.mark.parametrize("folder", ["../../../../etc", "/etc", "~", "linked_out",
                                    "subject/../../../../../etc"])
def test_subject_folder_outside_input_is_refused_without_a_listing(server, outside, folder):
    text = _error_text(server, _load_subject(folder))
    assert "is outside the folder this server allows" in text, text
    assert "LORA2_ALLOW_ANY_FOLDER=1" in text and "sub-folder of ComfyUI/input" in text, text
    names = set(os.listdir("/etc")) | set(SECRET) | set(os.listdir(outside))
    assert _leaked(text, names, folder) == set(), text


def test_a_file_linked_outside_is_skipped_unread_and_unnamed(server, outside):
    text = _error_text(server, _load_subject("mixed"))
    assert "a.png: links outside the allowed folder; not read" in text, text
    assert _leaked(text, SECRET) == set() and str(outside) not in text, text


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../../etc/passwd",
                                  "../../input/subject/img0.png"])
def test_resume_outside_the_checkpoint_folder_is_refused(server, name):
    text = _error_text(server, _resume(name))
    assert "resume" in text and "is outside the folder this server allows" in text, text
    assert "LORA2_ALLOW_ANY_FOLDER=1" in text, text
    assert _leaked(text, os.listdir("/etc"), name) == set(), text
