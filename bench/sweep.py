"""Sweep throughput: 4 subjects on 1 process vs 2 processes (1 thread each), one run.

Each configuration is the real command (``python -m lora2_engine sweep`` in one process,
``torchrun --nproc_per_node 2 -m lora2_engine sweep`` for two), timed from start to exit, so
start-up, photo encoding and writing every file count. The two are run alternately
(``--repeats`` rounds: 1, 2, 1, 2, …) so machine load hits both alike; the table gives the
median wall times and the throughput ratio. Target: >= 1.7x with 2 processes on 2 cores.
Run it alone: on a shared machine the ratio is provisional.

    python bench/sweep.py [--steps 40] [--resolution 64] [--repeats 2] [--model tiny-sdxl]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT.parent / "shared" / "dreambooth", ROOT.parent.parent / "shared" / "dreambooth"]
SUBJECTS = ("backpack", "bear_plushie", "can", "candle")
RESULTS = ROOT / "bench" / "results" / "sweep.md"


def _subjects(dest: Path) -> Path:
    """4 subject folders (the shared DreamBooth photos, else copies of the bundled dog)."""
    shared = next((p for p in PHOTOS if (p / SUBJECTS[0]).is_dir()), None)
    for name in SUBJECTS:
        src = shared / name if shared else ROOT / "assets" / "dreambooth" / "dog"
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    return dest


def _run(nproc: int, subjects: Path, out: Path, args) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sweep = ["-m", "lora2_engine", "sweep", str(subjects), "--out", str(out), "--steps",
             str(args.steps), "--resolution", str(args.resolution), "--model", args.model]
    cmd = ([sys.executable, *sweep] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *sweep])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    done = (out / "sweep_summary.csv").read_text().count(",done,")
    if done != len(SUBJECTS):
        sys.exit(f"{nproc} process(es): {done} of {len(SUBJECTS)} subjects done")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny-sdxl")
    ap.add_argument("--write", action="store_true", help=f"also write {RESULTS}")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        subjects = _subjects(Path(tmp) / "subjects")
        for r in range(args.repeats):
            for nproc in (1, 2):
                out = Path(tmp) / f"out{nproc}_{r}"
                times[nproc].append(_run(nproc, subjects, out, args))
                print(f"round {r + 1}: {nproc} process(es) {times[nproc][-1]:.1f} s", flush=True)
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    lines = [
        f"Sweep of {len(SUBJECTS)} subjects ({args.model}, {args.steps} steps, "
        f"{args.resolution} px), 1 thread per process, {args.repeats} alternating rounds; "
        f"1-minute load average {load:.1f} at the start (the machine's other users included).",
        "",
        "| processes | median wall time (s) | runs (s) | throughput vs 1 process |",
        "|---|---|---|---|",
        f"| 1 | {t1:.1f} | {', '.join(f'{t:.1f}' for t in times[1])} | 1.00x |",
        f"| 2 | {t2:.1f} | {', '.join(f'{t:.1f}' for t in times[2])} | {t1 / t2:.2f}x |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
