"""Safe file I/O: atomic writes, no silent overwrite, safetensors only, defensive metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# The server's owner sets this to let nodes read folders outside ComfyUI's own folders.
ALLOW_ANY_FOLDER_ENV = "LORA2_ALLOW_ANY_FOLDER"


class LoraFileError(ValueError):
    """A file cannot be used; the message names the file and what to do."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename.

    A failure at any point (disk full, kill) leaves no file at ``path`` and any previous file
    intact. An existing file is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another name or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Atomically write a ``.safetensors`` file (contiguous CPU copies, string metadata)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(flat, metadata=metadata), overwrite=overwrite)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file; pickles are refused unread, damage is a clear error."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{path}: pickle-based files ({path.suffix}) can run code when loaded and are never "
            "opened here; convert it to .safetensors with a tool you trust")
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file; check the name and folder")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise LoraFileError(
            f"{path}: not a readable .safetensors file ({exc}); it may be truncated or "
            "corrupt: download or export it again") from None
    return tensors, dict(meta)


def parse_json_metadata(meta: dict[str, str], key: str, path: Any = "file") -> Any:
    """Parse one JSON metadata field; malformed JSON is a message, not a crash."""
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as exc:
        raise LoraFileError(
            f"{path}: metadata field {key!r} is not valid JSON ({exc}); the file was edited "
            "or damaged: export it again") from None


class OutsideFolderError(ValueError):
    """A path given to a node leaves the folder it is confined to."""


def allow_any_folder() -> bool:
    """True when the server's owner set ``LORA2_ALLOW_ANY_FOLDER=1`` (or true/yes/on)."""
    return os.environ.get(ALLOW_ANY_FOLDER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_inside(root: str | os.PathLike, user_path: str, what: str, fix: str,
                   allow_outside: bool | None = None) -> Path:
    """``user_path`` (relative to ``root``) resolved, refused unless it stays inside ``root``.

    A ComfyUI server may be reachable by anyone on the network, so a path typed into a node
    must not read or list the server's other folders. Symlinks are resolved before the check,
    and the check runs before anything is opened: a refusal reveals nothing about what exists
    outside. Absolute and outside paths pass only when ``allow_outside`` (default: the
    ``LORA2_ALLOW_ANY_FOLDER`` environment variable) is set. ``fix`` says how to stay inside.
    """
    allow = allow_any_folder() if allow_outside is None else allow_outside
    raw = user_path.strip() if isinstance(user_path, str) else ""
    if not raw or "\x00" in raw:
        raise OutsideFolderError(f"{what} {user_path!r} is empty or has a NUL byte: {fix}")
    if allow:
        path = Path(raw).expanduser()
        return path if path.is_absolute() else Path(root) / path
    refusal = OutsideFolderError(
        f"{what} {raw!r} is outside the folder this server allows: {fix}. (To allow any "
        f"folder, the server's owner can start ComfyUI with {ALLOW_ANY_FOLDER_ENV}=1.)")
    if raw.startswith("~") or Path(raw).is_absolute() or os.path.splitdrive(raw)[0]:
        raise refusal
    base = Path(root).resolve()
    try:
        real = (base / raw).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise refusal from None
    if real != base and not real.is_relative_to(base):
        raise refusal
    return real


def safe_output_path(folder: str | os.PathLike, name: str,
                     suffix: str = ".safetensors") -> Path:
    """Resolve a user-given output ``name`` inside ``folder``, never outside it.

    Sub-folders written with ``/`` are allowed (``"subject/v1"``); absolute paths, ``..``,
    backslashes, drive letters and control characters are refused with the reason.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"output name {name!r} is empty: give a file name such as 'my_lora'")
    raw = name.strip()
    bad = [c for c in raw if ord(c) < 32 or c in '\\:*?"<>|']
    if raw.startswith(("/", "~")) or bad:
        raise ValueError(f"output name {name!r} must be a plain relative name (no absolute path, "
                         "'~', backslash or any of :*?\"<>|): e.g. 'my_lora' or 'subject/v1'")
    parts = raw.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"output name {name!r} may not contain '..', '.' or empty folder parts: "
                         "it must stay inside the output folder")
    root = Path(folder).resolve()
    path = root.joinpath(*parts)
    if suffix and path.suffix.lower() != suffix:
        path = path.with_name(path.name + suffix)
    if not path.resolve().is_relative_to(root):  # e.g. through a symlinked sub-folder
        raise ValueError(f"output name {name!r} resolves outside {root}: choose another name")
    return path
