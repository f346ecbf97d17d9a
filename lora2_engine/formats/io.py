"""Safe file I/O: atomic writes, no silent overwrite, safetensors only, defensive metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


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
