"""``python -m lora2_engine demo | train | report FILE | pad FILE --rank R``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config as cfgmod

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "dreambooth"


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


def _class_noun(folder: Path, default: str) -> str:
    table = folder.parent / "prompts_and_classes.txt"
    if table.is_file():
        for line in table.read_text().splitlines():
            parts = line.strip().split(",")
            if len(parts) == 2 and parts[0] == folder.name:
                return parts[1]
    return default


def _train(args, folder: Path, out_dir: Path) -> int:
    from .data import instance_prompt, load_subject
    from .diffusion import train_diffusion
    from .formats.io import safe_output_path
    from .models.loader import load_model
    from .precision import PrecisionConfig
    from .trainer import Callbacks, NonFiniteLoss, TrainingInterrupted

    target = safe_output_path(out_dir, args.name)  # refuse a bad name before any work
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} already exists: choose another --name or --out, or "
                              "pass --overwrite")
    model = load_model(args.model)
    noun = args.class_noun or _class_noun(folder, folder.name.rstrip("0123456789_"))
    prompt = instance_prompt(args.token, noun)
    data = load_subject(folder, prompt, args.resolution)
    for w in data.warnings():
        print("warning:", w, file=sys.stderr)
    overrides = {"steps": args.steps, "seed": args.seed,
                 "targets": model.family.resolve_targets(args.targets),
                 "grad_checkpointing": model.family.grad_checkpointing}
    for k in ("lr", "nu_lr", "lambda_r", "lambda_e", "r_target", "init_rank", "r_max",
              "checkpoint_every"):
        if getattr(args, k, None) is not None:
            overrides[k] = getattr(args, k)
    adapter_cfg, train_cfg = cfgmod.preset(args.preset, **overrides)
    export = cfgmod.ExportConfig(key_style=args.key_style, overwrite=args.overwrite)
    examples = model.encode([i.pixels for i in data.images], [i.caption for i in data.images])
    print(f"{len(examples)} photos of '{prompt}' from {folder} → {out_dir}  "
          f"(model {args.model}, preset {args.preset})")
    out_dir.mkdir(parents=True, exist_ok=True)
    bar, on_step = _progress(train_cfg.steps)
    t0 = time.perf_counter()
    try:
        out = train_diffusion(model.denoiser, examples, model.family, adapter_cfg, train_cfg,
                              export, layout=model.layout, callbacks=Callbacks(on_step=on_step),
                              checkpoint_path=target.with_name(target.stem + ".state.safetensors"),
                              resume=args.resume, out_file=target,
                              precision=PrecisionConfig(args.training_dtype, args.adapter_dtype),
                              extra_metadata={"lora2.name": args.name,
                                              "ss_output_name": args.name})
    except TrainingInterrupted as exc:
        bar.close()
        print(f"\n{exc}. Resume with: --resume {exc.checkpoint}", file=sys.stderr)
        return 130
    except NonFiniteLoss as exc:
        bar.close()
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    paths = _write_reports(out, out_dir, args.name,
                           {"adapter": cfgmod.to_dict(adapter_cfg),
                            "train": cfgmod.to_dict(train_cfg), "export": cfgmod.to_dict(export)})
    ranks = list(out.ranks.values())
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(ranks)} components, ranks "
          f"{min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}), loss "
          f"{out.history[0]['task']:.4f} → {out.history[-1]['task']:.4f}")
    for p in (out.lora.path, *paths):
        print("wrote", p)
    return 0


def _write_reports(result, out_dir: Path, name: str, configs: dict) -> list[Path]:
    """Rank report (json + picture), loss plot and the run's configs beside the adapter."""
    import json

    from .report import loss_figure, rank_map_figure, report_from_file, save_figure, save_json

    report = report_from_file(result.lora)
    paths = [out_dir / "rank_report.json", out_dir / "rank_report.png", out_dir / "loss.png"]
    save_json(report, paths[0], overwrite=True)
    save_figure(rank_map_figure(report, f"{name}: learned rank per component"), paths[1],
                overwrite=True)
    save_figure(loss_figure(result.history, f"{name}: loss"), paths[2], overwrite=True)
    (out_dir / "config.json").write_text(json.dumps(configs, indent=1))
    return paths


def cmd_demo(args) -> int:
    folder = _subject_folder(args.subject)
    out_dir = Path(args.out) if args.out else Path("lora2-output") / time.strftime(
        "demo-%Y%m%d-%H%M%S")
    return _train(args, folder, out_dir)


def cmd_train(args) -> int:
    folder = _subject_folder(args.images)
    return _train(args, folder, Path(args.out))


def cmd_report(args) -> int:
    from .formats import read_lora
    from .report import rank_map_figure, report_from_file, save_figure

    lora = read_lora(args.file)
    rep = report_from_file(lora)
    print(f"{args.file}: style {lora.style}, family {lora.family() or 'unknown'}, "
          f"{'LoRA2' if lora.lora2_modules() else 'not a LoRA2 file (no lora2 metadata)'}")
    print(rep.table())
    if args.png:
        save_figure(rank_map_figure(rep, Path(args.file).name), args.png, overwrite=False)
        print("wrote", args.png)
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
    print(f"padded {len(padded.modules)} modules to rank {rank} (alpha rescaled) → {dest}")
    return 0


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
    p.add_argument("--name", default="lora2_demo" if demo else "lora2")
    p.add_argument("--key-style", default="kohya", choices=cfgmod.KEY_STYLES)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--resume", default=None, help="a .state.safetensors checkpoint")
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
    p = sub.add_parser("report", help="per-component ranks and sizes of a LoRA file")
    p.add_argument("file")
    p.add_argument("--png", default=None, help="also write a rank map picture")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("pad", help="zero-pad every module to one rank for merge tools")
    p.add_argument("file")
    p.add_argument("--rank", type=int, default=None, help="target rank (default: the largest)")
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pad)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data import SubjectDataError
    from .formats.io import LoraFileError
    from .merge import PadRankError

    try:
        return args.func(args)
    except (ConfigError, SubjectDataError, LoraFileError, PadRankError, FileExistsError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
