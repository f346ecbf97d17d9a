"""A run killed with SIGKILL, or stopped with Ctrl-C or SIGTERM, resumes to the very same adapter.

All three runs are CLI subprocesses with one thread each (same arithmetic), on the tiny
SD1.5-shaped UNet at 64 px. Comparison: bit-identical tensors (torch.equal), CPU, fixed seed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "assets" / "dreambooth" / "dog"
STEPS = 12


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora2_engine", "train", str(SUBJECT), "--out", str(out),
            "--model", "tiny-sd15", "--resolution", "64", "--steps", str(STEPS),
            "--checkpoint-every", "3", "--name", "run", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _checkpoint_step(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as fh:
            return int(fh.metadata()["step"])
    except Exception:
        return -1


def _interrupt(out: Path, sig: int, after_step: int) -> subprocess.CompletedProcess | int:
    state = out / "run.state.safetensors"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _checkpoint_step(state) < after_step:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint at step {after_step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(out), cwd=ROOT, env=_env(), check=True, capture_output=True)
    return load_file(str(out / "run.safetensors"))


def _resume_and_compare(out: Path, reference: dict[str, torch.Tensor]) -> None:
    state = out / "run.state.safetensors"
    assert state.exists() and not (out / "run.safetensors").exists()
    done = subprocess.run(_cmd(out, "--resume", str(state)), cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = load_file(str(out / "run.safetensors"))
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k  # bit-identical


def test_sigkill_then_resume_gives_the_same_adapter(tmp_path, reference):
    rc, _ = _interrupt(tmp_path, signal.SIGKILL, after_step=6)
    assert rc == -signal.SIGKILL
    assert 6 <= _checkpoint_step(tmp_path / "run.state.safetensors") < STEPS
    _resume_and_compare(tmp_path, reference)


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, reference):
    rc, err = _interrupt(tmp_path, signal.SIGINT, after_step=3)
    assert rc == 130, err[-2000:]
    assert "Resume with: --resume" in err
    assert not list(tmp_path.glob("*.tmp"))
    _resume_and_compare(tmp_path, reference)


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, reference):
    """docker stop, systemd and job schedulers send SIGTERM: treated as Ctrl-C."""
    rc, err = _interrupt(tmp_path, signal.SIGTERM, after_step=3)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "training cancelled by SIGTERM at step" in err and "Resume with: --resume" in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    _resume_and_compare(tmp_path, reference)


@pytest.mark.parametrize("after_import", ["torch", "lora2_engine.models.tiny"])
def test_ctrl_c_in_the_first_seconds_is_one_line(tmp_path, after_import):
    """Ctrl-C while Python imports torch, or while the model is built: one line and exit 130
    (the line depends on where it lands: before training, or a cancelled first step).
    ``-X importtime`` reports each import as it finishes, so the signal is sent at a known
    point, not after a guessed delay."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", *_cmd(tmp_path)[1:]],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:
        err.append(line)
        if re.search(rf"\|\s+{re.escape(after_import)}(\.|$)", line.rstrip()):
            break  # (for torch: its first submodule, so torch is still loading)
    proc.send_signal(signal.SIGINT)
    err = "".join(err) + proc.stderr.read()
    proc.wait(120)
    err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("import time:"))
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert re.search(r"interrupted by Ctrl-C; no file was left half-written|training "
                     r"cancelled by Ctrl-C at step", err), err[-2000:]
    assert not (tmp_path / "run.safetensors").exists() and not list(tmp_path.glob(".*"))
