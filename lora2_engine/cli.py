"""``python -m lora2_engine demo | train | sweep | report | pad | compress | merge``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config as cfgmod

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "dreambooth"
SWEEP_CHECKPOINT_EVERY = 50


def _progress(total: int, start: int = 0):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def on_step(trainer, rec):
        bar.update(1)
        bar.set_postfix(loss=f"{rec['task']:.4f}", mean_rank=f"{rec['mean_rank']:.1f}")
    return bar, on_step


def _subject_folder(subject: str) -> Path:
    p = Path(subject)
    if p.is_dir():
        return p
    for root in (ASSETS, SHARED):
        if (root / subject).is_dir():
            return root / subject
    raise SystemExit(f"subject {subject!r}: not a folder, and not in {ASSETS} or {SHARED}")


def _text(name: str) -> str:
    """A folder name used as a word of the prompt must be real text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ValueError(f"the folder name '{shown}' is not UTF-8 text, so it cannot be the "
                         "class noun: pass --class-noun (e.g. --class-noun dog), or rename the "
                         "folder") from None
    return name


def _class_noun(folder: Path, default: str) -> str:
    from .data import read_text_file

    table = folder.parent / "prompts_and_classes.txt"
    if table.is_file():
        for line in read_text_file(table).splitlines():
            parts = line.strip().split(",")
            if len(parts) == 2 and parts[0] == folder.name:
                return parts[1]
    return default


def _configs(args):
    """The validated configs of the command line (refused before any work)."""
    overrides = {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size}
    for k in ("lr", "nu_lr", "lambda_r", "lambda_e", "r_target", "init_rank", "r_max",
              "checkpoint_every"):
        if getattr(args, k, None) is not None:
            overrides[k] = getattr(args, k)
    adapter_cfg, train_cfg = cfgmod.preset(args.preset, **overrides)
    export = cfgmod.ExportConfig(key_style=args.key_style, overwrite=args.overwrite,
                                 **({} if args.rank_tol is None else {"rank_tol": args.rank_tol}))
    return adapter_cfg, train_cfg, export


def _device(args, parallel):
    """``--device``: auto is this process's GPU when there is one, else the CPU."""
    import torch

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process; use "
                         "--device cpu (or auto)")
    return parallel.device or torch.device("cuda", torch.cuda.current_device())


def _subject_run(args, folder: Path, out_dir: Path, get_model, parallel, *, name: str,
                 resume=None, say=None, run=None):
    """Plan (unless ``run`` is given), read and train one subject folder into
    ``out_dir/<name>.*``; returns ``(TrainResult, RunFiles)``. The model is asked for
    (``get_model()``) only once the files and photos are known to be fine. Exceptions are the
    caller's: the CLI reports them, the sweep records them."""
    import dataclasses

    from .data import instance_prompt, load_subject
    from .diffusion import train_diffusion
    from .precision import PrecisionConfig
    from .runfiles import RunFiles
    from .trainer import Callbacks

    say = say or (lambda *_a: None)
    adapter_cfg, train_cfg, export = _configs(args)
    # every file the run will write, checked before any work (name, folder, resume file)
    run = run or RunFiles.plan(out_dir, name, overwrite=args.overwrite, resume=resume)
    noun = args.class_noun or _class_noun(folder, _text(folder.name).rstrip("0123456789_"))
    prompt = instance_prompt(args.token, noun)
    data = load_subject(folder, prompt, args.resolution)
    for w in data.warnings():
        say(f"warning: {w}")
    model = get_model()
    adapter_cfg = dataclasses.replace(adapter_cfg,
                                      targets=model.family.resolve_targets(args.targets))
    train_cfg = dataclasses.replace(train_cfg, grad_checkpointing=model.family.grad_checkpointing)
    device = _device(args, parallel)
    model.denoiser.module.to(device)
    examples = [{k: v.to(device) if hasattr(v, "to") else v for k, v in ex.items()}
                for ex in model.encode([i.pixels for i in data.images],
                                       [i.caption for i in data.images])]
    procs = f", {parallel.world} processes" if parallel.active else ""
    say(f"{len(examples)} photos of '{prompt}' from {folder} → {out_dir}  "
        f"(model {args.model}, preset {args.preset}{procs})", sys.stdout)
    bar, on_step = _progress(train_cfg.steps) if say is _say else (None, None)
    try:
        return train_diffusion(model.denoiser, examples, model.family, adapter_cfg, train_cfg,
                               export, layout=model.layout,
                               callbacks=Callbacks(on_step=on_step), resume=resume,
                               resume_force=args.resume_force, run=run, parallel=parallel,
                               precision=PrecisionConfig(args.training_dtype,
                                                         args.adapter_dtype),
                               extra_metadata={"lora2.name": name, "ss_output_name": name}), run
    finally:
        if bar is not None:
            bar.close()


def _train(args, folder: Path, out_dir: Path) -> int:
    from .models.loader import load_model
    from .parallel import Parallel
    from .trainer import NonFiniteLoss, TrainingInterrupted

    _configs(args)  # bad settings are refused before the processes meet or the model loads
    parallel = Parallel.from_env(fsdp=args.fsdp)
    if parallel.fsdp and parallel.is_main:
        _say(f"the model's weights are sharded over {parallel.world} processes (FSDP); "
             "the adapters are replicated", sys.stdout)
    say = _say if parallel.is_main else (lambda *_a: None)  # one process speaks
    t0 = time.perf_counter()
    try:
        out, run = _subject_run(args, folder, out_dir, lambda: load_model(args.model),
                                parallel, name=args.name, resume=args.resume, say=say)
    except TrainingInterrupted as exc:
        say(f"\n{exc}. Resume with: --resume {exc.checkpoint}")
        return 128 + (exc.signal or 2)
    except NonFiniteLoss as exc:
        say(f"\nerror: {exc}")
        return 1
    ranks = list(out.ranks.values())
    say(f"done in {time.perf_counter() - t0:.1f} s: {len(ranks)} components, ranks "
        f"{min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}), loss "
        f"{out.history[0]['task']:.4f} → {out.history[-1]['task']:.4f}", sys.stdout)
    for p in run.outputs():
        say(f"wrote {p}", sys.stdout)
    return 0


def cmd_demo(args) -> int:
    folder = _subject_folder(args.subject)
    out_dir = Path(args.out) if args.out else Path("lora2-output") / time.strftime(
        "demo-%Y%m%d-%H%M%S")
    return _train(args, folder, out_dir)


def cmd_train(args) -> int:
    folder = _subject_folder(args.images)
    return _train(args, folder, Path(args.out))


def cmd_sweep(args) -> int:
    """One adapter per subject folder, spread over the processes of a launch (or several
    sweeps started by hand): see ``sweep.py``."""
    import functools
    import os

    from .models.loader import load_model
    from .parallel import Parallel
    from .sweep import Sweep, markdown
    from .trainer import TrainingInterrupted

    if args.fsdp:
        raise ValueError("--fsdp shards one run over the processes; a sweep gives each "
                         "process subjects of its own: use train --fsdp per subject")
    if args.overwrite or args.resume:
        raise ValueError("sweep never replaces a finished adapter and resumes half-done "
                         "subjects by itself: drop --overwrite/--resume (delete a subject's "
                         "adapter to train it again)")
    if args.checkpoint_every is None:  # a killed sweep loses at most this many steps
        args.checkpoint_every = SWEEP_CHECKPOINT_EVERY
    _configs(args)  # bad settings are refused before any work
    rank = int(os.environ.get("RANK", "0") or 0)  # torchrun / accelerate launch worker index
    single = Parallel(local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))
    if _device(args, single).type == "cuda":  # each worker trains on its own GPU
        import torch

        torch.cuda.set_device(single.local_rank % torch.cuda.device_count())
    model = functools.cache(lambda: load_model(args.model))  # loaded once, when first needed
    out = Path(args.out)
    tag = f"[{rank}] " if "WORLD_SIZE" in os.environ else ""

    def say(msg: str) -> None:
        _say(tag + msg, sys.stdout)

    def train_one(folder: Path, run) -> None:
        _subject_run(args, folder, out, model, single, name=run.name, resume=run.resume,
                     run=run)

    # in a launch, process 0 reports (a worker's non-zero exit would make torchrun stop the
    # others); sweeps started by hand each report
    reports = rank == 0 or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
    sweep = Sweep(args.subjects, out, train_one, rank=rank, say=say)
    try:
        rows = sweep.run(summary=reports)
    except TrainingInterrupted as exc:
        if reports:
            sweep.write_summary()
        say(f"{exc}; run the same sweep again to resume")
        return 128 + (exc.signal or 2)
    if not reports:
        return 0
    _say(markdown(rows), sys.stdout)
    _say(f"wrote {out / 'sweep_summary.md'}, .csv and sweep_rank_maps.png", sys.stdout)
    return 1 if any(r.status == "failed" for r in rows) else 0


def cmd_report(args) -> int:
    from .formats import read_lora
    from .report import rank_map_figure, report_from_file, save_figure

    lora = read_lora(args.file)
    rep = report_from_file(lora)
    _say(f"{args.file}: style {lora.style}, family {lora.family() or 'unknown'}, "
         f"{'LoRA2' if lora.lora2_modules() else 'not a LoRA2 file (no lora2 metadata)'}",
         sys.stdout)
    _say(rep.table(), sys.stdout)
    if args.png:
        save_figure(rank_map_figure(rep, Path(args.file).name), args.png, overwrite=False)
        _say(f"wrote {args.png}", sys.stdout)
    return 0


def cmd_pad(args) -> int:
    from .formats import read_lora, write_lora
    from .merge import pad_lora

    src = Path(args.file)
    lora = read_lora(src)
    padded = pad_lora(lora, args.rank)
    rank = next(iter(padded.modules.values())).rank
    dest = Path(args.out) if args.out else src.with_name(f"{src.stem}_r{rank}.safetensors")
    write_lora(padded, dest, overwrite=args.overwrite)
    _say(f"padded {len(padded.modules)} modules to rank {rank} (alpha rescaled) → {dest}",
         sys.stdout)
    return 0


def _budget(args):
    from .budget import Budget

    if args.size_mb is not None:
        return Budget.megabytes(args.size_mb)
    if args.params is not None:
        return Budget.of_params(args.params)
    return Budget.of_error(args.error)


def _write_result(result, dest: Path, overwrite: bool) -> int:
    result.write(dest, overwrite=overwrite)
    print(result.report().table())
    print(result.summary())
    print("wrote", dest)
    return 0


def cmd_compress(args) -> int:
    from .compress import compress
    from .lycoris import read_any

    budget = _budget(args)  # a bad budget is refused before the file is read
    src = Path(args.file)
    dest = Path(args.out) if args.out else src.with_name(f"{src.stem}_compressed.safetensors")
    if dest.exists() and not args.overwrite:
        raise FileExistsError(f"{dest} already exists: choose another --out or pass --overwrite")
    result = compress(read_any(src), budget, args.dtype)
    return _write_result(result, dest, args.overwrite)


def cmd_merge(args) -> int:
    from .lycoris import read_any
    from .merging import check_inputs, merge_loras

    budget = _budget(args)
    weights = args.weights or [1.0] * len(args.files)
    check_inputs(args.files, weights, args.method, args.density)
    dest = Path(args.out) if args.out else Path(args.files[0]).with_name(
        f"merged_{args.method}.safetensors")
    if dest.exists() and not args.overwrite:
        raise FileExistsError(f"{dest} already exists: choose another --out or pass --overwrite")
    loras = [read_any(f) for f in args.files]
    result = merge_loras(loras, weights, args.method, budget, density=args.density,
                         seed=args.seed, dtype=args.dtype)
    return _write_result(result, dest, args.overwrite)


def cmd_extract(args) -> int:
    from .compress import SAVE_DTYPES
    from .extract import extract_files
    from .formats.keys import KNOWN_LAYOUTS, OTHER

    budget = _budget(args)
    tuned = Path(args.tuned)
    dest = Path(args.out) if args.out else tuned.with_name(f"{tuned.stem}_lora.safetensors")
    if dest.exists() and not args.overwrite:
        raise FileExistsError(f"{dest} already exists: choose another --out or pass --overwrite")
    result = extract_files(args.base, tuned, budget, style=args.key_style,
                           layout=KNOWN_LAYOUTS.get(args.family, OTHER),
                           dtype=SAVE_DTYPES[args.dtype or "float16"])
    return _write_result(result, dest, args.overwrite)


def _budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size-mb", type=float, help="file size on disk in MB (10^6 bytes), "
                   "header and metadata included; the file lands within 2%% below it")
    g.add_argument("--params", type=int, help="factor parameters, sum of r (m + n)")
    g.add_argument("--error", type=float, help="relative Frobenius error of Delta W over the "
                   "whole file, e.g. 0.05: the smallest file within it")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="save dtype (default: the input's)")
    p.add_argument("--out", default=None, help="output file (never overwritten without "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true")


def _train_args(p: argparse.ArgumentParser, demo: bool) -> None:
    p.add_argument("--model", default="tiny-sdxl",
                   help="tiny-sdxl (default), tiny-sd15, tiny-flux, or a diffusers SD1.x/SDXL "
                        "folder")
    p.add_argument("--training-dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--adapter-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--targets", default="attention",
                   help="attention (default), attention+mlp, or comma-separated module name "
                        "suffixes")
    p.add_argument("--token", default="sks", help="instance token (DreamBooth)")
    p.add_argument("--class-noun", default=None, help="class noun, e.g. dog")
    p.add_argument("--preset", default=cfgmod.DEFAULT_PRESET, choices=sorted(cfgmod.PRESETS))
    p.add_argument("--steps", type=int, default=100 if demo else 500)
    p.add_argument("--resolution", type=int, default=256 if demo else 512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per step and process (torchrun / accelerate launch: the "
                        "global batch is this times the number of processes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: this process's GPU when there is one, else the CPU")
    p.add_argument("--fsdp", action="store_true",
                   help="torchrun / accelerate launch: shard the frozen model's weights over "
                        "the processes (FSDP) for models too large for one device "
                        "(accelerate's --use_fsdp does the same)")
    p.add_argument("--name", default="lora2_demo" if demo else "lora2")
    p.add_argument("--key-style", default="kohya", choices=cfgmod.KEY_STYLES)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--rank-tol", type=float, default=None,
                   help="write each module at the smallest rank within this relative error of "
                        "its trained update (default 0.03; 0 = the trained rank, exactly)")
    p.add_argument("--resume", default=None, help="a .state.safetensors checkpoint")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even though settings or photos differ from the state's")
    for k, t in (("lr", float), ("nu-lr", float), ("lambda-r", float), ("lambda-e", float),
                 ("r-target", float), ("init-rank", int), ("r-max", int),
                 ("checkpoint-every", int)):
        p.add_argument(f"--{k}", type=t, default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora2_engine",
                                 description="LoRA2: adaptive-rank LoRA training and tools")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train on bundled DreamBooth photos with a tiny SDXL UNet")
    p.add_argument("--subject", default="dog", help="bundled/shared subject name or a folder")
    p.add_argument("--out", default=None, help="output folder (default: a new timestamped one)")
    _train_args(p, demo=True)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("train", help="train on a folder of subject photos")
    p.add_argument("images")
    p.add_argument("--out", required=True, help="output folder")
    _train_args(p, demo=False)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sweep", help="train one adapter per subject folder (resumable; "
                       "spread over the processes of torchrun / accelerate launch)")
    p.add_argument("subjects", help="a folder with one folder of photos per subject")
    p.add_argument("--out", required=True, help="output folder: <subject>.safetensors and "
                   "its report files, sweep_summary.md/.csv, sweep_rank_maps.png")
    _train_args(p, demo=False)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="per-component ranks and sizes of a LoRA file")
    p.add_argument("file")
    p.add_argument("--png", default=None, help="also write a rank map picture")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("pad", help="zero-pad every module to one rank for merge tools")
    p.add_argument("file")
    p.add_argument("--rank", type=int, default=None,
                   help="target rank (default: the largest; at most 4096)")
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pad)
    p = sub.add_parser("compress", help="shrink a LoRA (kohya, ComfyUI, diffusers, LoCon, "
                       "LoHa, LoKr) to a size budget, ranks chosen jointly over the file")
    p.add_argument("file")
    _budget_args(p)
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("merge", help="merge LoRAs (linear, TIES, DARE) into one "
                       "adaptive-rank LoRA under a size budget")
    p.add_argument("files", nargs="+")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per file (default 1 each)")
    p.add_argument("--method", default="linear", choices=("linear", "ties", "dare"))
    p.add_argument("--density", type=float, default=0.5,
                   help="TIES/DARE: fraction of each update's entries kept (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="DARE's random drop")
    _budget_args(p)
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("extract", help="extract an adaptive-rank LoRA from a fine-tuned model "
                       "(tuned - base) under a size budget")
    p.add_argument("base", help="the base model (.safetensors)")
    p.add_argument("tuned", help="the fine-tuned model (.safetensors, same architecture)")
    p.add_argument("--family", default="other", choices=("sd15", "sdxl", "other"),
                   help="names the modules the way loaders expect for this family")
    p.add_argument("--key-style", default="comfy", choices=cfgmod.KEY_STYLES,
                   help="comfy (default: ComfyUI maps every module), kohya or diffusers")
    _budget_args(p)
    p.set_defaults(func=cmd_extract)
    return ap


def _say(msg: str, stream=None) -> None:
    """Print one line that survives any name: undecodable bytes are shown as ``\\xff``."""
    stream = stream or sys.stderr
    enc = getattr(stream, "encoding", None) or "utf-8"
    raw = msg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    print(raw.encode(enc, "backslashreplace").decode(enc), file=stream, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training: handled like Ctrl-C (training handles both itself)."""


def _on_sigterm(_sig, _frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command. The one error boundary of the CLI: every failure is one line that
    names the culprit and the fix, never a traceback (``LORA2_DEBUG=1`` shows them). Nothing
    heavy is imported before the ``try``, so even a Ctrl-C while torch loads is caught."""
    import os
    import signal
    import threading
    import warnings

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    debug = os.environ.get("LORA2_DEBUG", "") not in ("", "0")
    formatwarning = warnings.formatwarning  # engine warnings as one "warning: ..." line
    warnings.formatwarning = lambda msg, *_a, **_k: f"warning: {msg}\n"
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ValueError as exc:  # the pack's errors (ConfigError, LoraFileError...) are these
        if debug:
            raise
        _say(f"error: {exc}")
        return 2
    except OSError as exc:  # disk full, read-only, name too long, a file where a folder goes...
        if debug:
            raise
        from .formats.io import explain_oserror  # (imported here: torch loads with it)

        _say(f"error: {explain_oserror(exc)}")
        return 2
    except KeyboardInterrupt as exc:  # before or after training (training handles its own)
        if debug:
            raise
        how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        _say(f"\ninterrupted by {how}; no file was left half-written")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug: one line, and where to report it
        if debug:
            raise
        from .parallel import PeerFailed

        if isinstance(exc, PeerFailed):  # another process of the launch said why
            return 1
        _say(f"error: unexpected {type(exc).__name__}: {exc}. This is a bug in LoRA2: please "
             "report it with the command you ran (LORA2_DEBUG=1 shows the traceback)")
        return 1
    finally:
        warnings.formatwarning = formatwarning
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
