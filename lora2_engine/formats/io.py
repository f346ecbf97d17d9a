"""Safe file I/O: atomic writes, no silent overwrite, safetensors only, defensive metadata."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# The server's owner sets this to let nodes read folders outside ComfyUI's own folders.
ALLOW_ANY_FOLDER_ENV = "LORA2_ALLOW_ANY_FOLDER"


class LoraFileError(ValueError):
    """A file cannot be used; the message names the file and what to do."""


# Temp files: short fixed-length names (a long final name never makes the temp name too long)
# that say which host and process wrote them, so leftovers of a killed process can be removed.
TEMP_PREFIX, TEMP_SUFFIX = ".lora2-", ".tmp"
_TEMP = re.compile(r"^\.lora2-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}\.tmp$")
STALE_TEMP_SECONDS = 24 * 3600  # any host's temp this old is stale (a crashed writer)
_WHY = {  # errno → (what happened, what to do)
    errno.ENOSPC: ("No space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write to another disk"),
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its "
                   "permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENAMETOOLONG: ("the name is too long for the file system",
                         "choose a shorter name or a shorter folder path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another folder"),
    errno.EISDIR: ("it is a folder", "choose another name"),
    errno.EEXIST: ("it already exists", "choose another name, or pass --overwrite"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EIO: ("an input/output error (failing disk or network drive)",
                "check the disk, or write to another one"),
    errno.EMFILE: ("too many open files", "close other programs or raise the limit (ulimit -n)"),
}


def explain_oserror(exc: OSError, path: str | os.PathLike | None = None,
                    action: str = "cannot use") -> str:
    """One line naming the path, what the system said and the fix (``error: ...`` in the CLI)."""
    if getattr(exc, "explained", False):
        return exc.strerror
    if exc.errno is None and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]  # raised by this pack with its own message (culprit and fix)
    where = path if path is not None else (exc.filename or "a file")
    what, fix = _WHY.get(exc.errno, (exc.strerror or str(exc), "check the path and the disk"))
    return f"{action} {where}: {what}: {fix}"


_EXPLAINED: dict[type, type] = {}


def explained(exc: OSError, path: str | os.PathLike, action: str = "cannot write") -> OSError:
    """The same kind of ``OSError`` (same class and errno, so callers catching
    ``FileExistsError`` still do) whose message is just :func:`explain_oserror`'s line."""
    if getattr(exc, "explained", False):
        return exc
    return os_error(exc.errno, explain_oserror(exc, path, action), path, type(exc))


def os_error(code: int, message: str, path: str | os.PathLike | None = None,
             cls: type[OSError] | None = None) -> OSError:
    """An ``OSError`` of the class ``code`` maps to (``FileExistsError`` for EEXIST...)
    whose ``str()`` is exactly ``message``."""
    cls = cls or type(OSError(code, ""))
    if getattr(cls, "explained", False):
        cls = cls.__mro__[1]
    if cls not in _EXPLAINED:
        _EXPLAINED[cls] = type(cls.__name__, (cls,), {"__str__": lambda self: self.strerror,
                                                       "explained": True})
    new = _EXPLAINED[cls](code, message)
    new.path = None if path is None else str(path)
    return new


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_name() -> str:
    """A fresh temp-file name for this host and process (``.lora2-<host>-<pid>-<rand>.tmp``)."""
    import secrets

    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (unknown counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove this pack's temp files left by killed processes; returns their names.

    A temp file belongs to a dead writer when its process no longer runs on this host, or when
    it is a day old (any host: a network folder). Other files are never touched.
    """
    import time

    removed, host = [], _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m:
            continue
        try:
            old = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            if old or (m[1] == host and not pid_alive(int(m[2]))):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
    return removed


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames, links and unlinks in ``folder`` durable (a no-op where unsupported)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_temp(folder: Path, data: bytes) -> Path:
    """``data`` in a new temp file of ``folder``, fsynced; mode from the umask (0644 usually).

    ``mkstemp`` would make the file 0600, which other users (a web server, a second account
    running ComfyUI) could not read; ``O_CREAT | O_EXCL`` with 0666 lets the umask decide.
    """
    free = _free_bytes(folder)
    if free is not None and free < len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    tmp = folder / temp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK,
                  errno.EXDEV}


def publish(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Move a finished temp file to ``path``: atomically, and never over an existing file
    unless ``overwrite``.

    Without overwrite, a hard link creates ``path`` only if it does not exist (the kernel
    checks, so two writers racing for one name cannot both win: the loser gets
    ``FileExistsError`` and nothing is replaced). File systems without hard links (FAT, some
    network shares) fall back to a rename, which Windows refuses over an existing file too.
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            tmp.unlink(missing_ok=True)
            raise
        if os.name != "nt" and path.exists():
            tmp.unlink(missing_ok=True)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.rename(tmp, path)
        return
    tmp.unlink()


def check_can_create(paths: list[Path]) -> None:
    """Check, before any work, that each of ``paths`` could be created: its folder (or the
    nearest existing parent) is a folder that accepts a new file (probed with a temp file, so a
    read-only disk or missing permission shows now), and every name, temp names included,
    fits the file system's name and path limits. Creates nothing."""
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        existing = next(f for f in (folder, *folder.parents) if f.exists() or f == f.parent)
        if existing == folder and not folder.is_dir():
            raise os_error(errno.ENOTDIR, f"cannot write into {folder}: it is a file, not a "
                           "folder: choose another folder", folder)
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            write_temp(existing, b"").unlink()
        except OSError as exc:
            where = existing if existing == folder else f"{folder} (in {existing})"
            raise explained(exc, where, "cannot write into") from None
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
            path_max = os.pathconf(existing, "PC_PATH_MAX")
        except (OSError, ValueError, AttributeError):  # Windows, or unknown
            name_max, path_max = 255, 4096
        names = [Path(p).name for p in paths if Path(p).parent == folder] + [temp_name()]
        size = {n: len(os.fsencode(n)) for n in names}
        longest = max(names, key=size.get)
        if size[longest] > name_max:
            raise os_error(errno.ENAMETOOLONG, f"cannot write {folder / longest}: the name is "
                           f"{size[longest]} bytes, over the file system's {name_max}: shorten "
                           f"the name by at least {size[longest] - name_max} bytes",
                           folder / longest)
        full = max(len(os.fsencode(str(folder.absolute() / n))) for n in names)
        if full > path_max:
            raise os_error(errno.ENAMETOOLONG, f"cannot write into {folder}: the path is "
                           f"{full} bytes, over the system's {path_max}: choose a shorter "
                           "folder or name", folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and link/rename.

    A failure at any point (disk full, kill) leaves no file at ``path`` and any previous file
    intact; a killed process's temp file is removed by the next write into that folder. An
    existing file is replaced only with ``overwrite=True``, and a race for a new name has one
    winner (:func:`publish`). Every ``OSError`` names the path and the fix.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if path.exists() and not overwrite:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        tmp = write_temp(path.parent, data)
        try:
            publish(tmp, path, overwrite)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise explained(exc, path) from None
    fsync_dir(path.parent)
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Atomically write a ``.safetensors`` file (contiguous CPU copies, string metadata)."""
    return atomic_write_bytes(path, tensors_bytes(tensors, metadata), overwrite=overwrite)


def tensors_bytes(tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> bytes:
    """A ``.safetensors`` file as bytes (contiguous CPU copies, string metadata)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(flat, metadata=metadata)


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
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"output name {name!r} has bytes that are not UTF-8 text (the name is "
                         "also stored inside the file): use a name typed in UTF-8") from None
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
