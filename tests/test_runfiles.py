"""The files a run writes (``lora2_engine/runfiles.py``) and the write primitives under them:
races for one name, a run's lock across processes, stale temp files, the umask, and the end of
a run as one unit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora2_engine.formats import io as fio
from lora2_engine.runfiles import RunFiles, RunFilesError, RunInUseError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ create without replace
def test_two_writers_of_one_new_name_one_wins_and_nothing_is_replaced(tmp_path, monkeypatch):
    """Both writers pass the exists check and hold a finished temp file, then both publish at
    once: the kernel lets exactly one create the name; the other gets FileExistsError."""
    target = tmp_path / "same.safetensors"
    both_ready = threading.Barrier(2)
    real = fio.publish

    def publish_together(tmp, path, overwrite=False):
        both_ready.wait(timeout=30)  # both are past the exists check, temps written
        return real(tmp, path, overwrite)

    monkeypatch.setattr(fio, "publish", publish_together)
    results: dict[str, object] = {}

    def write(label: str) -> None:
        try:
            fio.atomic_write_bytes(target, label.encode() * 1000)
            results[label] = "won"
        except FileExistsError as exc:
            results[label] = exc

    threads = [threading.Thread(target=write, args=(x,)) for x in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [k for k, v in results.items() if v == "won"]
    losers = [v for v in results.values() if v != "won"]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "same.safetensors: it already exists: choose another name" in str(losers[0])
    assert target.read_bytes() == winners[0].encode() * 1000  # the winner's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors"]  # no temp left


_HOLDER = """
import sys, time
from lora2_engine.runfiles import RunFiles
run = RunFiles.plan(sys.argv[1], "dog")
run.reserve()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_of_one_name_is_refused_at_once_until_the_first_dies(tmp_path):
    """Another process holds the name: refused before any work (not after training); when
    that process is killed (SIGKILL: no cleanup code runs), the OS frees the name."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        run = RunFiles.plan(tmp_path, "dog")
        with pytest.raises(RunInUseError, match=r"another run named 'dog' is writing into .* "
                                                r"right now .*: wait for it to finish, or "
                                                r"choose another name"):
            run.reserve()
        RunFiles.plan(tmp_path, "cat").reserve()  # another name is free
    finally:
        holder.kill()
        holder.wait(30)
    with RunFiles.plan(tmp_path, "dog").reserved() as run:
        assert run.lock.exists()
    assert not run.lock.exists()  # released and removed


def test_a_finished_run_of_the_same_name_is_seen_under_the_lock(tmp_path):
    first, second = RunFiles.plan(tmp_path, "dog"), RunFiles.plan(tmp_path, "dog")
    with first.reserved():
        first.publish(b"adapter", {first.report_json: b"{}"})
    with pytest.raises(RunFilesError, match="dog.safetensors already exists"):
        second.reserve()  # planned before the first finished: checked again when reserving
    assert first.adapter.read_bytes() == b"adapter" and not first.lock.exists()


# ------------------------------------------------------------------ leftovers
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name,age_s,removed", [
    (lambda host: f".lora2-{host}-{_dead_pid()}-0123abcd.tmp", 0, True),  # killed here
    (lambda host: f".lora2-{host}-{os.getpid()}-0123abcd.tmp", 0, False),  # still writing
    (lambda host: f".lora2-ffffffff-{_dead_pid()}-0123abcd.tmp", 0, False),  # other host
    (lambda host: f".lora2-ffffffff-{_dead_pid()}-0123abcd.tmp", 2 * 86400, True),  # a day old
    (lambda host: f".model.safetensors.{_dead_pid()}.tmp", 2 * 86400, False),  # not ours
    (lambda host: "notes.tmp", 2 * 86400, False),
])
def test_stale_temp_files_are_removed_and_nothing_else(tmp_path, name, age_s, removed):
    path = tmp_path / name(fio._host_tag())
    path.write_bytes(b"partial")
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    assert fio.clean_stale_temps(tmp_path) == ([path.name] if removed else [])
    assert path.exists() != removed


def test_a_killed_runs_temp_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".lora2-{fio._host_tag()}-{_dead_pid()}-0123abcd.tmp"
    stale.write_bytes(b"half an adapter")
    fio.atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = fio.atomic_write_bytes(tmp_path / "x.safetensors", b"data")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode  # mkstemp would give 0600 whatever the umask


# ------------------------------------------------------------------ planning
def test_plan_names_every_file_after_the_run(tmp_path):
    run = RunFiles.plan(tmp_path / "out", "sub/dog")
    assert [p.name for p in run.outputs()] == [
        "dog.safetensors", "dog.rank_report.json", "dog.rank_report.png", "dog.loss.png",
        "dog.config.json"]
    assert run.state.name == "dog.state.safetensors" and run.lock.name == ".dog.lora2-lock"
    assert all(p.parent == tmp_path / "out" / "sub" for p in run.outputs())
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_space_is_checked_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 10**6, 10**6))
    run = RunFiles.plan(tmp_path, "dog")
    with pytest.raises(OSError, match=r"not enough space in .*: 1\.0 MB free, the run needs at "
                                      r"least 5\.2 MB \(adapter and resumable state\): free "
                                      r"some space"):
        run.check_space(5_200_000)
    run.check_space(900_000)


def test_the_end_of_a_run_holds_ctrl_c_until_the_set_is_complete(tmp_path):
    run = RunFiles.plan(tmp_path, "dog")
    with pytest.raises(KeyboardInterrupt):
        with run.reserved(), run.finishing():
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the files are being written
            run.publish(b"adapter", {run.report_json: b"{}", run.loss_plot: b"png"})
    assert run.adapter.read_bytes() == b"adapter" and run.report_json.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dog.loss.png", "dog.rank_report.json", "dog.safetensors"]


def test_side_files_without_their_adapter_are_replaced_by_the_next_run(tmp_path):
    """A kill after the side files but before the adapter (the commit point) leaves side files
    of an unfinished run; the next run of that name replaces them."""
    run = RunFiles.plan(tmp_path, "dog")
    run.report_json.write_bytes(b"old, from a killed finish")
    with RunFiles.plan(tmp_path, "dog").reserved() as again:
        again.publish(b"adapter", {again.report_json: b"new"})
    assert run.report_json.read_bytes() == b"new"
