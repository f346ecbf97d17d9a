"""Start a real ComfyUI with this pack and drive it over HTTP (tests, browser test, benchmark).

ComfyUI comes from ``COMFYUI_PATH`` (run by ``COMFYUI_PYTHON``) and is never modified: the
server runs with ``--base-directory`` set to a scratch folder, so models, custom_nodes, input,
output, temp and user data all live there; ``custom_nodes/comfyui-lora2`` is a symlink to this
repository. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-lora2"
ENGINE_DEPS = ("torch", "safetensors", "numpy", "PIL", "matplotlib", "tqdm")


def find_testbed() -> tuple[Path, str] | None:
    """``(COMFYUI_PATH, COMFYUI_PYTHON)`` or ``None`` when no ComfyUI is configured."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    return Path(path), os.environ.get("COMFYUI_PYTHON", sys.executable)


def skip_reason() -> str | None:
    """Why the ComfyUI tests cannot run here, or ``None`` when they can."""
    tb = find_testbed()
    if tb is None:
        return "COMFYUI_PATH not set: no ComfyUI to test the nodes in"
    path, python = tb
    if not (path / "main.py").is_file():
        return f"COMFYUI_PATH={path} has no main.py"
    missing = missing_deps(python)
    if missing:
        return (f"COMFYUI_PYTHON={python} lacks {', '.join(missing)}: run "
                f"'{python} -m pip install -r {REPO / 'requirements.txt'}'")
    return None


def missing_deps(python: str) -> list[str]:
    code = ("import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] "
            "if u.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code, *ENGINE_DEPS], capture_output=True, text=True,
                         timeout=120)
    if out.returncode:
        return [f"a working interpreter ({out.stderr.strip()[-200:]})"]
    return [{"PIL": "pillow"}.get(m, m) for m in out.stdout.split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(base: Path) -> Path:
    """A scratch ComfyUI base directory with the pack linked into ``custom_nodes``."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/diffusion_models",
                "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


class PromptError(RuntimeError):
    """A prompt was rejected or failed; the message carries ComfyUI's own error."""


@dataclass
class ComfyServer:
    url: str
    base: Path
    proc: subprocess.Popen
    log_path: Path

    # -- HTTP ----------------------------------------------------------------------------
    def request(self, path: str, data=None, method: str | None = None, timeout: float = 60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise PromptError(f"{path}: HTTP {exc.code}: {exc.read().decode()[:4000]}") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def object_info(self) -> dict:
        return self.request("/object_info")

    def queue(self, api: dict) -> str:
        return self.request("/prompt", {"prompt": api, "client_id": "lora2-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a finished prompt; raises with ComfyUI's message on error."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise PromptError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            hist = self.request(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = json.dumps(msgs[-1][1], indent=1)[:6000] if msgs else status
                    raise PromptError(f"prompt failed: {detail}")
                return entry
            time.sleep(0.2)
        raise PromptError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, api: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(api), timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- lifetime --------------------------------------------------------------------------
    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(base: Path, timeout: float = 240, extra_args: tuple[str, ...] = (),
                 env: dict | None = None) -> ComfyServer:
    """Start ComfyUI on a free loopback port with ``base`` as its base directory."""
    tb = find_testbed()
    if tb is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    comfy, python = tb
    make_base(base)
    port = free_port()
    log_path = base / f"comfyui-{port}.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", *extra_args]
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", **(env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT,
                                env=run_env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, proc, log_path)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited at start:\n{server.log()[-4000:]}")
        try:
            server.request("/system_stats", timeout=5)
            return server
        except (OSError, PromptError):
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"ComfyUI did not answer in {timeout} s:\n{server.log()[-4000:]}")
