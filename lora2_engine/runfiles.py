"""The set of files one training run writes: planned, checked and reserved before any work.

A run called ``name`` in folder ``out`` writes only files that start with its name, so runs
with different names never touch each other's files::

    <name>.safetensors              the adapter: written last, it is the set's commit point
    <name>.rank_report.json / .png  per-component ranks (table, picture)
    <name>.loss.png                 the loss curve
    <name>.config.json              the settings of the run
    <name>.state.safetensors        resumable state (on cancel / every N steps); removed at the end
    .<name>.lora2-lock              held while the run lives (the OS releases it if killed)

Usage (what the CLI and ``diffusion.train_diffusion`` do)::

    run = RunFiles.plan(out, name, overwrite=False, resume=None)  # refuses early, writes nothing
    with run.reserved():          # or run.reserve() ... finally: run.release()
        run.check_space(run.needed_bytes(params))     # before training, not after
        ...train with checkpoint_path=run.state...
        with run.finishing(save_state=trainer.save_checkpoint):   # Ctrl-C held, state kept
            run.publish(adapter_bytes, {run.report_json: ..., run.loss_plot: ...})

``publish`` writes every file to a temp file first (fsynced); only then are the side files
moved into place, the adapter last, and the run's own state removed. A kill before the adapter
appears leaves the state (resume it); side files without their adapter are leftovers of such a
kill and the next run of that name replaces them. Nothing another run wrote is ever replaced.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .formats.io import (
    check_can_create,
    clean_stale_temps,
    explained,
    fsync_dir,
    os_error,
    publish,
    safe_output_path,
    write_temp,
)

STATE_SUFFIX = ".state.safetensors"
SIDE_SUFFIXES = (".rank_report.json", ".rank_report.png", ".loss.png", ".config.json")
LOCK_SUFFIX = ".lora2-lock"
SPACE_MARGIN = 4 << 20  # plots, reports and file-system slack (bytes)


class RunFilesError(ValueError):
    """The run cannot write its files; the message names the file and the fix."""


class RunInUseError(RunFilesError):
    """Another live run holds the same name in the same folder."""


@dataclass
class RunFiles:
    """Every path a run named ``name`` writes in ``folder`` (see the module docstring)."""

    folder: Path
    name: str
    adapter: Path
    state: Path
    report_json: Path
    rank_map: Path
    loss_plot: Path
    config_json: Path
    lock: Path
    overwrite: bool = False
    resume: Path | None = None
    _lock_fd: int | None = field(default=None, repr=False)

    # -- planning ---------------------------------------------------------------------------
    @classmethod
    def plan(cls, folder: str | os.PathLike, name: str, *, overwrite: bool = False,
             resume: str | os.PathLike | None = None) -> RunFiles:
        """Name every file and check, before any work, that the run can write them all.

        Refuses (with the path and the fix): a bad name, an output folder that is a file or
        not writable, names too long for the file system, an existing adapter (unless
        ``overwrite``), a target that is a folder, and an unfinished run's state of the same
        name that this run would lose (unless it resumes from it). Writes nothing.
        """
        folder = Path(folder)
        adapter = safe_output_path(folder, name)  # validates the name, stays inside
        stem = adapter.name[: -len(".safetensors")]
        base = adapter.parent
        run = cls(folder, name, adapter, base / f"{stem}{STATE_SUFFIX}",
                  *(base / f"{stem}{s}" for s in SIDE_SUFFIXES), base / f".{stem}{LOCK_SUFFIX}",
                  overwrite, Path(resume) if resume else None)
        check_can_create([*run.outputs(), run.state, run.lock])
        run._check_resume()
        run._check_targets()
        return run

    def outputs(self) -> list[Path]:
        """The files a finished run leaves (adapter first)."""
        return [self.adapter, self.report_json, self.rank_map, self.loss_plot, self.config_json]

    def _check_resume(self) -> None:
        """The file to resume from exists and is a training state (its header only)."""
        if self.resume is None:
            return
        from .formats.io import LoraFileError
        from .resume import RESUME_HELP, state_metadata

        if not self.resume.is_file():
            raise LoraFileError(f"{self.resume}: no such file; {RESUME_HELP}")
        meta = _metadata(self.resume)
        if meta is None:
            raise LoraFileError(f"{self.resume}: not a readable .safetensors file; "
                                f"{RESUME_HELP}")
        state_metadata(meta, self.resume)

    def _check_targets(self) -> None:
        for p in (*self.outputs(), self.state):
            if p.is_dir():
                raise RunFilesError(f"{p} is a folder, where the run writes a file: choose "
                                    "another name or move that folder")
        if self.adapter.exists() and not self.overwrite:
            raise RunFilesError(f"{self.adapter} already exists: choose another name or "
                                "folder, or pass --overwrite (overwrite=True) to replace it")
        if self.state.exists() and not self._resumes_own_state() and not self._state_is_done():
            raise RunFilesError(
                f"{self.state} holds an unfinished run named {self.name!r} "
                f"({describe_state(self.state)}): continue it with --resume {self.state}, "
                "or choose another name, or delete that file if you do not need it")

    def _resumes_own_state(self) -> bool:
        return self.resume is not None and _same_file(self.resume, self.state)

    def _state_is_done(self) -> bool:
        """The state belongs to the run that wrote the adapter beside it (killed between
        writing the adapter and removing the state): it holds nothing the adapter lacks."""
        if not self.adapter.is_file():
            return False
        adapter, state = _metadata(self.adapter) or {}, _metadata(self.state) or {}
        try:
            done = int(adapter.get("lora2.steps", -1)) >= int(state.get("step", 1 << 62))
        except ValueError:
            return False
        config = state.get("train_config")
        return done and config is not None and adapter.get("lora2.train_config") == config

    # -- reserving ----------------------------------------------------------------------------
    def reserve(self) -> None:
        """Hold the run's name in its folder until :meth:`release`: a second run of that name
        (another process, now) is refused at once instead of racing this one, and a killed
        run's hold is released by the OS. Stale temp files, and a finished run's leftover
        state, are removed; the targets are checked again (another run may have finished).
        Reserving a run this process already holds only checks again (a sweep claims a
        subject before it reads the photos, then trains it)."""
        try:
            self.adapter.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise explained(exc, self.adapter.parent, "cannot create the output folder") from None
        if self._lock_fd is None:
            self._acquire()
        try:
            clean_stale_temps(self.adapter.parent)
            self._check_targets()
            if self.state.exists() and not self._resumes_own_state() and self._state_is_done():
                self.state.unlink()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another run use the name (safe to call more than once, or without reserve)."""
        self._release()

    @contextmanager
    def reserved(self) -> Iterator[RunFiles]:
        """:meth:`reserve` … :meth:`release` as a ``with`` block."""
        self.reserve()
        try:
            yield self
        finally:
            self.release()

    def _acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise explained(exc, self.lock, "cannot create the run's lock file") from None
            if not try_lock(fd):
                os.close(fd)
                raise RunInUseError(
                    f"another run named {self.name!r} is writing into {self.adapter.parent} "
                    f"right now (it holds {self.lock.name}): wait for it to finish, or choose "
                    "another name")
            try:  # the file we locked must still be the one at the path (see _release)
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock))
            except OSError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        if os.name != "nt":  # unlink while still holding it; a waiter re-checks the inode
            try:
                os.unlink(self.lock)
            except OSError:
                pass
        os.close(fd)
        if os.name == "nt":
            try:
                os.unlink(self.lock)
            except OSError:
                pass

    # -- space and writing ----------------------------------------------------------------------
    @staticmethod
    def needed_bytes(parameters, copies: int = 5) -> int:
        """A lower bound of the bytes a run writes: the adapter, and a state holding the
        factors with two optimizer moments (``copies`` times the trainable tensors)."""
        return copies * sum(p.numel() * p.element_size() for p in parameters) + SPACE_MARGIN

    def check_space(self, needed: int) -> None:
        """Refuse now, not after training, when the disk cannot hold ``needed`` bytes."""
        try:
            free = shutil.disk_usage(self.adapter.parent).free
        except OSError:
            return
        if free < needed:
            raise os_error(errno.ENOSPC, f"not enough space in {self.adapter.parent}: "
                           f"{free / 1e6:.1f} MB free, the run needs at least "
                           f"{needed / 1e6:.1f} MB (adapter and resumable state): free some "
                           "space or choose a folder on another disk", self.adapter.parent)

    @contextmanager
    def finishing(self, save_state: Callable[[], object] | None = None) -> Iterator[None]:
        """The end of a run, from the last step to the last file written, as one unit.

        Ctrl-C / SIGTERM arriving meanwhile are held until the block ends (building the
        plots and writing take a second or two) and then raised, so they never cut the set
        short. If writing fails (disk full...), ``save_state`` (e.g.
        ``trainer.save_checkpoint``) is tried so the trained run is not lost, and the error
        says how to finish it with ``--resume`` without training again.
        """
        with _signals_held():
            try:
                yield
            except OSError as exc:
                raise self._kept(explained(exc, self.adapter.parent), save_state) from None

    def publish(self, adapter: bytes, side_files: Mapping[Path, bytes]) -> list[Path]:
        """Write the side files and then the adapter, each complete or not at all; then
        remove the run's own state. Returns the paths written (adapter first)."""
        temps: dict[Path, Path] = {}
        folder = self.adapter.parent
        try:
            for path, data in (*side_files.items(), (self.adapter, adapter)):
                temps[path] = write_temp(path.parent, data)
            for path in side_files:  # this run's own names: a leftover of a killed finish
                os.replace(temps.pop(path), path)
            publish(temps[self.adapter], self.adapter, self.overwrite)  # the commit
        except OSError as exc:
            raise explained(exc, folder) from None
        finally:
            for tmp in temps.values():  # what is left of the temps after a failure
                tmp.unlink(missing_ok=True)
        fsync_dir(folder)
        self.state.unlink(missing_ok=True)
        fsync_dir(folder)
        return [self.adapter, *side_files]

    def _kept(self, exc: OSError, save_state) -> OSError:
        """``exc``, telling where the trained state was kept (when it could be saved)."""
        if save_state is None:
            return exc
        try:
            save_state()
        except Exception:  # the disk that refused the adapter may refuse the state too
            return exc
        return os_error(exc.errno, f"{exc}. The trained state is kept in {self.state}: once "
                        f"that is fixed, finish with --resume {self.state} (no retraining)",
                        getattr(exc, "path", None), type(exc))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (main thread only) for a short critical section, then re-raise."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.signal(s, lambda sig, _f: got.append(sig)) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if got:
        signal.raise_signal(got[0])


def try_lock(fd: int) -> bool:
    """A non-blocking exclusive lock on the open file ``fd``; released when the process dies."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata (header only), or ``None`` when it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # safetensors raises several types for damaged headers
        return None


def describe_state(path: Path) -> str:
    """A state's progress as "step K of N" (its header only)."""
    meta = _metadata(path) or {}
    try:
        steps = json.loads(meta.get("train_config", "{}")).get("steps")
    except ValueError:
        steps = None
    step = meta.get("step", "?")
    return f"step {step}" + (f" of {steps}" if steps else "")
