"""Many subjects, one adapter each: the sweep behind ``python -m lora2_engine sweep``.

Every sub-folder of the subjects folder is one subject, trained as the run ``<out>/<subject>.*``
(``runfiles.py``). Processes share the work without talking to each other: a process claims a
subject by reserving its run (the OS lock ``runfiles`` holds, released if the process dies),
so any number of processes (``torchrun`` / ``accelerate launch`` workers, or sweeps started by
hand on the same folders) each take the next free subject, and a process whose own work is done
takes over what a dead one left. A process ends when every subject is settled, so all end
together with the same exit status.

The files are the sweep's memory, so a killed sweep resumes by running it again: an adapter
means done (never touched again), ``<subject>.failed.json`` a failure with its reason (retried
by the next sweep), a state a half-done run (resumed from it). The summary (Markdown, CSV and
a contact sheet of rank maps) is rebuilt from those files, under a lock, by every process that
finishes, so the last one leaves the complete table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .formats.io import atomic_write_bytes, explain_oserror
from .runfiles import RunFiles, RunFilesError, RunInUseError, describe_state, try_lock

FAILED_SUFFIX = ".failed.json"
SUMMARY_MD, SUMMARY_CSV, CONTACT_SHEET = ("sweep_summary.md", "sweep_summary.csv",
                                          "sweep_rank_maps.png")
SUMMARY_LOCK = ".sweep_summary.lock"
POLL_S = 1.0  # how often a process with nothing left to claim looks at the others' progress

TrainOne = Callable[[Path, RunFiles], None]  # trains a subject folder into a reserved run


@dataclass
class Row:
    """One subject of the summary."""

    subject: str
    status: str  # done, failed, running, interrupted, pending
    steps: int | None = None
    final_loss: float | None = None
    file_mb: float | None = None
    mean_rank: float | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    note: str = ""


def subject_folders(root: str | os.PathLike) -> list[Path]:
    """The subject folders (sorted; hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder; give a folder that holds one folder of "
                         "photos per subject")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise ValueError(f"{root} has no sub-folders: put each subject's photos in a folder of "
                         f"its own (e.g. {root / 'dog' / '01.jpg'})")
    return subs


def failure_reason(exc: BaseException) -> str:
    """One line that says why a subject failed (the pack's errors already name the fix)."""
    if isinstance(exc, OSError):
        text = explain_oserror(exc)
    elif isinstance(exc, ValueError) or type(exc).__module__.startswith("lora2_engine"):
        text = str(exc)  # the pack's errors (NonFiniteLoss...) and bad values
    else:
        text = (f"unexpected {type(exc).__name__}: {exc} (a bug in LoRA2: please report it; "
                "LORA2_DEBUG=1 shows the traceback)")
    return " ".join(text.split())


def _plan(out: Path, name: str) -> RunFiles:
    """The run of subject ``name``, resuming its state when a half-done one is there."""
    state = out / f"{name}.state.safetensors"
    return RunFiles.plan(out, name, overwrite=True, resume=state if state.is_file() else None)


def _held(lock: Path) -> bool:
    """Another live process holds this run's lock (checked without creating anything)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # closing drops the lock this check may have taken


class Sweep:
    """One process's part of a sweep of ``root``'s subjects into ``out``."""

    def __init__(self, root: str | os.PathLike, out: str | os.PathLike, train_one: TrainOne,
                 *, rank: int = 0, say: Callable[[str], None] = print) -> None:
        self.root, self.out = Path(root), Path(out)
        self.folders = subject_folders(self.root)
        self.train_one, self.rank, self.say = train_one, rank, say
        self.started = time.time()
        self.errors: dict[str, str] = {}  # subjects whose run could not even be named

    # -- the work ---------------------------------------------------------------------------
    def run(self, summary: bool = True) -> list[Row]:
        """Train every free subject, wait for the others' subjects, write the summary (or
        only read the rows: the workers of a launch leave it to process 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        n = len(self.folders)
        order = [self.folders[(self.rank + i) % n] for i in range(n)]  # workers start apart
        while True:
            for folder in order:
                self._try(folder)
            if all(self._settled(f) for f in self.folders):
                break
            time.sleep(POLL_S)  # the rest is being trained by other processes
        return self.write_summary() if summary else self.rows()

    def _failure_file(self, name: str) -> Path:
        return self.out / f"{name}{FAILED_SUFFIX}"

    def _settled(self, folder: Path) -> bool:
        """Done, or failed during this sweep (an older failure is tried again)."""
        name = folder.name
        if name in self.errors or (self.out / f"{name}.safetensors").is_file():
            return True
        try:
            return self._failure_file(name).stat().st_mtime >= self.started
        except OSError:
            return False

    def _try(self, folder: Path) -> None:
        """Claim and train ``folder`` unless it is settled or another process has it."""
        from .trainer import TrainingInterrupted

        if self._settled(folder):
            return
        name = folder.name
        try:
            run = _plan(self.out, name)
            run.reserve()
        except RunInUseError:
            return  # another process trains it
        except (RunFilesError, OSError, ValueError) as exc:
            if not (self.out / f"{name}.safetensors").is_file():  # else: finished meanwhile
                self._fail(name, exc)
            return
        try:
            if run.adapter.is_file():  # finished by another process since we looked
                return
            what = f"resuming ({describe_state(run.state)})" if run.resume else "training"
            self.say(f"{name}: {what}")
            try:
                self.train_one(folder, run)
            except TrainingInterrupted:  # Ctrl-C / SIGTERM: the state is kept, stop the sweep
                raise
            except Exception as exc:  # noqa: BLE001 (recorded, and the sweep goes on)
                self._fail(name, exc)
                return
            self._failure_file(name).unlink(missing_ok=True)
            self.say(f"{name}: done")
        finally:
            run.release()

    def _fail(self, name: str, exc: BaseException) -> None:
        reason = failure_reason(exc)
        self.say(f"{name}: failed: {reason}")
        record = json.dumps({"subject": name, "reason": reason, "time": time.time()})
        try:
            atomic_write_bytes(self._failure_file(name), record.encode(), overwrite=True)
        except (OSError, ValueError):
            self.errors[name] = reason  # the name cannot be a file: keep it for the table

    # -- the summary ------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Every subject's row, read from the output folder."""
        return [self._row(f.name) for f in self.folders]

    def _row(self, name: str) -> Row:
        if name in self.errors:
            return Row(name, "failed", note=self.errors[name])
        try:
            run = _plan(self.out, name)
        except (RunFilesError, OSError, ValueError) as exc:
            return Row(name, "failed", note=failure_reason(exc))
        if run.adapter.is_file():
            return _done_row(name, run)
        failed = self._failure_file(name)
        if failed.is_file():
            try:
                note = json.loads(failed.read_text(encoding="utf-8"))["reason"]
            except (OSError, ValueError, KeyError, TypeError):
                note = f"see {failed}"
            return Row(name, "failed", note=note)
        if _held(run.lock):
            return Row(name, "running", note="another process is training it")
        if run.state.is_file():
            return Row(name, "interrupted", note=f"{describe_state(run.state)}: run the sweep "
                       "again to resume it")
        return Row(name, "pending")

    def write_summary(self) -> list[Row]:
        """Write the Markdown and CSV tables and the rank-map contact sheet; returns the rows."""
        with _locked(self.out / SUMMARY_LOCK):
            rows = self.rows()
            atomic_write_bytes(self.out / SUMMARY_MD, markdown(rows).encode(), overwrite=True)
            atomic_write_bytes(self.out / SUMMARY_CSV, csv_text(rows).encode(), overwrite=True)
            reports = _reports(self.out, rows)
            if reports:
                from .report import contact_sheet_figure, figure_png

                png = figure_png(contact_sheet_figure(reports, "learned rank per component"))
                atomic_write_bytes(self.out / CONTACT_SHEET, png, overwrite=True)
        return rows


def _done_row(name: str, run: RunFiles) -> Row:
    """Steps and final loss from the run's config.json, ranks from its rank report."""
    row = Row(name, "done", file_mb=round(run.adapter.stat().st_size / 1e6, 3))
    try:
        result = json.loads(run.config_json.read_text(encoding="utf-8")).get("result", {})
        row.steps, row.final_loss = result.get("steps"), result.get("final_loss")
        rep = json.loads(run.report_json.read_text(encoding="utf-8"))
        row.mean_rank = round(rep["mean_rank"], 2)
        row.min_rank, row.max_rank = rep["min_rank"], rep["max_rank"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        row.note = "its report or config file is missing or damaged"
    return row


def _reports(out: Path, rows: list[Row]) -> dict:
    from .report import RankReport

    reports = {}
    for r in rows:
        if r.status == "done":
            try:
                data = json.loads((out / f"{r.subject}.rank_report.json").read_text("utf-8"))
                reports[r.subject] = RankReport.from_json(data)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return reports


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[Row]) -> str:
    """The summary as a Markdown table, with a count line."""
    head = ["subject", "status", "steps", "final loss", "file MB", "mean rank", "min rank",
            "max rank", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_fmt(v) for v in asdict(r).values()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items())
              + f" of {len(rows)} subjects; final loss = mean task loss of the last steps, "
              "ranks = of each component as written"]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([f.name for f in fields(Row)])
    for r in rows:
        w.writerow(["" if v is None else v for v in asdict(r).values()])
    return buf.getvalue()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` (waiting for it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while not try_lock(fd):
            time.sleep(0.1)
        yield
    finally:
        os.close(fd)
