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
    """A progress bar at the trainer's own step (a resumed run continues from its state's)."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def on_step(trainer, rec):
        bar.update(trainer.step - bar.n)
        bar.set_postfix(loss=f"{rec['task']:.4f}", mean_rank=f"{rec['mean_rank']:.1f}")
    return bar, on_step


def _resumed_step(state: str | None) -> int:
    """The step a ``--resume`` state holds, from its header (0 when unreadable: the trainer
    checks the state properly and says what is wrong)."""
    if not state:
        return 0
    try:
        from safetensors import safe_open

        with safe_open(state, "pt") as fh:
            return max(0, int((fh.metadata() or {}).get("step", 0)))
    except Exception:  # any damage is reported by the trainer's real check
        return 0


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
    adapter_cfg, train_cfg = cfgmod.preset(args.preset, **overrides)  # refused before any work
    if args.rank_tol is not None and (args.size_mb or args.params) is not None:
        raise ValueError("--rank-tol and a size budget are both given: with --size-mb/--params "
                         "the budget decides every rank, so drop --rank-tol")
    export = cfgmod.ExportConfig(key_style=args.key_style, overwrite=args.overwrite,
                                 dtype=args.save_dtype, size_mb=args.size_mb, params=args.params,
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
    bar, on_step = (_progress(train_cfg.steps, _resumed_step(resume)) if say is _say
                    else (None, None))
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
    if out.sized is not None:  # the notes were warned already
        say(f"size budget: {out.sized.summary().splitlines()[0]}", sys.stdout)
    for p in run.outputs():
        say(f"wrote {p}", sys.stdout)
    return 0


def cmd_demo(args) -> int:
    folder = _subject_folder(args.subject)
    out_dir = Path(args.out) if args.out else Path("lora2-output") / time.strftime(
        "demo-%Y%m%d-%H%M%S")
    rc = _train(args, folder, out_dir)
    if rc or args.no_planted:
        return rc
    return _planted(args, out_dir)


def _planted(args, out_dir: Path) -> int:
    """The demo's second part: ranks planted in a teacher UNet, and the ranks LoRA² learns."""
    from .demo import STEPS, run_planted
    from .trainer import TrainingInterrupted

    _say("\nplanted ranks: a teacher copy of the UNet has updates of known rank (1 to 32) on 14 "
         "attention projections (0 on 18 more); LoRA² (preset " + args.preset + ") trains "
         "against it", sys.stdout)
    bar, on_step = _progress(STEPS)
    t0 = time.perf_counter()
    try:
        run = run_planted(out_dir, f"{args.name}_planted", seed=args.seed,
                          overwrite=args.overwrite, on_step=on_step, preset_name=args.preset)
    except TrainingInterrupted as exc:  # nothing of this part written; the photo run's is
        bar.close()
        _say(f"\nplanted part cancelled ({exc}); the photo run's files are complete")
        return 128 + (exc.signal or 2)
    finally:
        bar.close()
    print(f"done in {time.perf_counter() - t0:.1f} s: Spearman(planted, learned rank) "
          f"{run.spearman:.2f}")
    for p in run.files.values():
        _say(f"wrote {p}", sys.stdout)
    return 0


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

    if args.png and Path(args.png).exists() and not args.overwrite:  # before any output
        raise FileExistsError(f"{args.png} already exists: choose another --png or pass "
                              "--overwrite")
    lora = read_lora(args.file)
    rep = report_from_file(lora)
    _say(f"{args.file}: style {lora.style}, family {lora.family() or 'unknown'}, "
         f"{'LoRA2' if lora.lora2_modules() else 'not a LoRA2 file (no lora2 metadata)'}",
         sys.stdout)
    _say(rep.table(), sys.stdout)
    if args.png:
        save_figure(rank_map_figure(rep, Path(args.file).name), args.png,
                    overwrite=args.overwrite)
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show."""

    def _get_help_string(self, action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _preset_default(field: str) -> str:
    """'default: the preset's (paper 5e-05, spread 0.0001)' for a field the presets set."""
    values = []
    for name in sorted(cfgmod.PRESETS):
        adapter, train = cfgmod.preset(name)
        values.append(f"{name} {getattr(adapter, field, getattr(train, field, None)):g}")
    return f"default: the preset's ({', '.join(values)})"


_PRESET_HELP = ("the method's settings: spread (the pack's, chosen on the rank-recovery "
                "benchmark) or paper (the paper's SDXL settings as written)")


def _budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size-mb", type=float, help="file size on disk in MB (10^6 bytes), "
                   "header and metadata included; the file lands within 2%% below it")
    g.add_argument("--params", type=int, help="factor parameters, sum of r (m + n)")
    g.add_argument("--error", type=float, help="relative Frobenius error of Delta W over the "
                   "whole file, e.g. 0.05: the smallest file within it")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="save dtype (default: the input's)")
    p.add_argument("--out", default=None, help="output file (default: beside the input, "
                   "named after it); never overwritten without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


_TRAIN_OPTIONS = (  # (flag, type, config field, help)
    ("lr", float, "lr", "learning rate of the adapters' A and B"),
    ("nu-lr", float, "nu_lr", "learning rate of the rank parameters nu"),
    ("lambda-r", float, "lambda_r", "weight of the rank regulariser (higher: smaller ranks)"),
    ("lambda-e", float, "lambda_e", "weight of the cross-attention entropy term"),
    ("r-target", float, "r_target", "the rank the regulariser pulls every component toward"),
    ("init-rank", int, "init_rank", "every component's rank at step 0"),
    ("r-max", int, "r_max", "the largest rank a component may grow to"),
)


def stand_in_names() -> list[str]:
    """``tiny-<family>`` for every family module, read from the package folder: ``--help``
    must not import torch (the registry's own list, ``models.loader.tiny_names``, does)."""
    import pkgutil

    folder = Path(__file__).resolve().parent / "families"
    return sorted(f"tiny-{m.name}" for m in pkgutil.iter_modules([str(folder)])
                  if m.name != "base")


def _train_args(p: argparse.ArgumentParser, demo: bool) -> None:
    others = ", ".join(n for n in stand_in_names() if n != "tiny-sdxl")
    p.add_argument("--model", default="tiny-sdxl",
                   help=f"tiny-sdxl (default), {others} (built-in random-weight stand-ins: "
                        "they show the method, not a usable LoRA), or a diffusers SD1.x/SDXL "
                        "pipeline folder")
    p.add_argument("--training-dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast dtype of each step (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--adapter-dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the trained A/B matrices")
    p.add_argument("--targets", default="attention",
                   help="modules to adapt: attention (the family's attention projections), "
                        "attention+mlp, or comma-separated module name suffixes")
    p.add_argument("--token", default="sks", help="instance token (DreamBooth): the rare word "
                   "that will mean your subject")
    p.add_argument("--class-noun", default=None, help="what the subject is, e.g. dog (default: "
                   "the folder's name, or its line in prompts_and_classes.txt)")
    p.add_argument("--preset", default=cfgmod.DEFAULT_PRESET, choices=sorted(cfgmod.PRESETS),
                   help=_PRESET_HELP)
    p.add_argument("--steps", type=int, default=100 if demo else 500, help="training steps")
    p.add_argument("--resolution", type=int, default=256 if demo else 512,
                   help="training size in pixels (square crops)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, noise and "
                   "timesteps: the same seed and inputs train the same LoRA")
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per step and process (torchrun / accelerate launch: the "
                        "global batch is this times the number of processes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: this process's GPU when there is one, else the CPU")
    p.add_argument("--fsdp", action="store_true",
                   help="torchrun / accelerate launch: shard the frozen model's weights over "
                        "the processes (FSDP) for models too large for one device "
                        "(accelerate's --use_fsdp does the same)")
    p.add_argument("--name", default="lora2_demo" if demo else "lora2",
                   help="file names: <name>.safetensors and <name>.* side files")
    p.add_argument("--key-style", default="kohya", choices=cfgmod.KEY_STYLES,
                   help="key names: kohya (ComfyUI, A1111/Forge, kohya, diffusers), comfy, "
                        "diffusers (PEFT names)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--rank-tol", type=float, default=None,
                   help="write each module at the smallest rank within this relative error of "
                        "its trained update (default 0.03; 0 = the trained rank, exactly)")
    p.add_argument("--resume", default=None, help="continue from this .state.safetensors "
                   "(written on Ctrl-C, SIGTERM and every --checkpoint-every steps)")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even though settings or photos differ from the state's")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="write a resumable state every N steps (default: only on Ctrl-C)")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the saved file (and of --size-mb)")
    g = p.add_mutually_exclusive_group()
    for flag, kind, field, text in _TRAIN_OPTIONS:
        (g if flag == "r-target" else p).add_argument(
            f"--{flag}", type=kind, default=None, help=f"{text} ({_preset_default(field)})")
    g.add_argument("--size-mb", type=float, default=None,
                   help="train to a file size: MB (10^6 bytes) on disk at --save-dtype, header "
                        "included; the file lands within 2%% below it, ranks still learned")
    g.add_argument("--params", type=int, default=None,
                   help="train to a parameter count, sum of r (m + n) over the file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora2_engine", formatter_class=_Help,
                                 description="LoRA2: adaptive-rank LoRA training and tools")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Help)
        p.set_defaults(func=func)
        return p

    p = cmd("demo", "train on bundled DreamBooth photos with a tiny SDXL-shaped UNet, then "
            "recover planted ranks (under a minute each on a CPU)", cmd_demo)
    p.add_argument("--subject", default="dog", help="bundled/shared subject name or a folder")
    p.add_argument("--out", default=None, help="output folder (default: a new "
                   "lora2-output/demo-<time>/)")
    p.add_argument("--no-planted", action="store_true",
                   help="skip the planted-rank part (the photo run only)")
    _train_args(p, demo=True)
    p = cmd("train", "train on a folder of subject photos", cmd_train)
    p.add_argument("images", help="folder of photos (name.txt beside name.jpg is its caption)")
    p.add_argument("--out", required=True, help="output folder")
    _train_args(p, demo=False)
    p = cmd("sweep", "train one adapter per subject folder (resumable; spread over the "
            "processes of torchrun / accelerate launch)", cmd_sweep)
    p.add_argument("subjects", help="a folder with one folder of photos per subject")
    p.add_argument("--out", required=True, help="output folder: <subject>.safetensors and "
                   "its report files, sweep_summary.md/.csv, sweep_rank_maps.png")
    _train_args(p, demo=False)
    p = cmd("report", "per-component ranks and sizes of a LoRA file", cmd_report)
    p.add_argument("file", help="any LoRA .safetensors (kohya, ComfyUI, diffusers/PEFT)")
    p.add_argument("--png", default=None, help="also write a rank map picture to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --png")
    p = cmd("pad", "zero-pad every module to one rank, for tools that need one rank "
            "(not for merging: see README)", cmd_pad)
    p.add_argument("file", help="a LoRA .safetensors")
    p.add_argument("--rank", type=int, default=None,
                   help="target rank (default: the largest in the file; at most 4096)")
    p.add_argument("--out", default=None, help="output file (default: <file>_r<rank>"
                   ".safetensors beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p = cmd("compress", "shrink a LoRA (kohya, ComfyUI, diffusers, LoCon, LoHa, LoKr) to a "
            "size budget, ranks chosen jointly over the file", cmd_compress)
    p.add_argument("file", help="the LoRA .safetensors to shrink")
    _budget_args(p)
    p = cmd("merge", "merge LoRAs (linear, TIES, DARE) into one adaptive-rank LoRA under a "
            "size budget", cmd_merge)
    p.add_argument("files", nargs="+", help="two or more LoRA .safetensors")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per file (default: 1 each)")
    p.add_argument("--method", default="linear", choices=("linear", "ties", "dare"),
                   help="linear: the exact weighted sum; ties/dare: as PEFT defines them")
    p.add_argument("--density", type=float, default=0.5,
                   help="TIES/DARE: fraction of each update's entries kept")
    p.add_argument("--seed", type=int, default=0, help="DARE's random drop")
    _budget_args(p)
    p = cmd("extract", "extract an adaptive-rank LoRA from a fine-tuned model (tuned - base) "
            "under a size budget", cmd_extract)
    p.add_argument("base", help="the base model (.safetensors)")
    p.add_argument("tuned", help="the fine-tuned model (.safetensors, same architecture)")
    p.add_argument("--family", default="other", choices=("sd15", "sdxl", "other"),
                   help="names the modules the way loaders expect for this family")
    p.add_argument("--key-style", default="comfy", choices=cfgmod.KEY_STYLES,
                   help="comfy (ComfyUI maps every module), kohya or diffusers")
    _budget_args(p)
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
