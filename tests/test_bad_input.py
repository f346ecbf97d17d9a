"""Bad input → a clear error naming the culprit and the fix, and nothing half-written.

Each case builds its input in an empty folder, runs one user-facing operation, and checks the
outcome: either an error whose message matches (culprit and fix), or success with the noted
warning. Afterwards the output folder must hold no partial or temporary file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora2_engine import AdapterConfig, ExportConfig, TrainConfig, attach, preset
from lora2_engine.cli import main as cli
from lora2_engine.config import ConfigError
from lora2_engine.data import SubjectDataError, load_subject
from lora2_engine.formats import LoraFileError, read_lora
from lora2_engine.formats.io import OutsideFolderError, resolve_inside, safe_output_path
from lora2_engine.formats.lora_file import check_family, export_adapters
from lora2_engine.merge import PadRankError, pad_lora
from tests.conftest import activate_slots

DOG = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog" / "00.jpg"


def _img(path: Path, mode="RGB", size=(96, 80), fmt=None, **save_kw) -> Path:
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode == "CMYK":
        im = im.convert("CMYK")
    elif mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **save_kw)
    return path


def _lora(path: Path, family="sdxl", meta=True, **kw) -> Path:
    """A small valid LoRA file (ours, with metadata) for the file cases."""
    from tests.conftest import TinyAttnNet

    net = TinyAttnNet()
    ad = attach(net, AdapterConfig(r_target=2, init_rank=3, r_max=16, slot_init="random"))
    for layer in ad.layers.values():
        activate_slots(layer, None)
        layer.B.data.normal_()
    from lora2_engine.formats.keys import UNetLayout

    p = export_adapters(ad, path, layout=UNetLayout(family, (1,)), **kw)
    if not meta:
        t = load_file(str(p))
        p.unlink()
        save_file(t, str(p))
    return p


def _subject(folder: Path):
    return load_subject(folder, "a photo of sks dog", 64)


@dataclass
class Case:
    id: str
    setup: Callable[[Path], object]  # builds input in tmp, returns the argument for run
    run: Callable[[object, Path], object]  # (arg, out_dir) → result
    error: type[BaseException] | None  # expected exception, or None for success
    match: str  # regex on the message (error) or on the warnings/result (success)


def _warn(result) -> str:
    return " | ".join(result.warnings()) + f" | n={len(result.images)}"


def _corrupt(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    return p


def _truncate(src: Path, dest: Path, keep=0.4) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    return dest


def _png_bytes(mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (64, 64)).save(buf, "PNG")
    return buf.getvalue()


def _pickle_bomb(path: Path, marker: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    return path


def _exif_rotated(folder: Path) -> Path:
    # a wide 120x64 image with EXIF orientation 6 (rotate 90° CW on display) → tall
    arr = np.zeros((64, 120, 3), dtype=np.uint8)
    arr[:, :10] = 255  # a white band at the stored left edge → the displayed top
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    folder.mkdir(parents=True, exist_ok=True)
    im.save(folder / "r.jpg", exif=exif.tobytes(), quality=95)
    return folder


def _exif_check(folder: Path, _out: Path):
    from lora2_engine.data import load_image

    t = load_image(folder / "r.jpg", 128, "bucket")
    return "tall" if t.shape[1] > t.shape[2] and t[:, :4].mean() > 0.8 else "wrong"


def _mixed(folder: Path) -> Path:
    shutil.copy(DOG, folder / "good.jpg")
    _corrupt(folder / "bad.jpg")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    return folder


def _cli(*args):
    """Run the CLI; a non-zero exit becomes ``SystemExit`` (its message is on stderr)."""
    rc = cli([str(a) for a in args])
    if rc != 0:
        raise SystemExit(rc)
    return rc


def _train_cli(folder, out, *extra):
    return _cli("train", folder, "--out", out, "--steps", "1", "--resolution", "64",
                "--model", "tiny-sd15", *extra)


def _bad_loss(_arg, _out):
    from lora2_engine.trainer import Trainer
    from tests.conftest import TinyAttnNet

    net = TinyAttnNet()
    ad = attach(net, AdapterConfig(init_rank=2))
    tr = Trainer(ad, lambda b, g: net(b["x"], b["c"]).pow(2).sum() * float("inf"),
                 [{"x": torch.randn(3, 16), "c": torch.randn(4, 12)}], TrainConfig(steps=3))
    return tr.run()


_NO_FIX = "export it again|re-export|convert it|choose|use |give|pick|downscale|add "

CASES = [
    # -- subject folders and images
    Case("empty-folder", lambda d: d, lambda a, o: _subject(a), SubjectDataError,
         r"no usable image \(the folder is empty\).*Add \.jpg"),
    Case("missing-folder", lambda d: d / "nope", lambda a, o: _subject(a), SubjectDataError,
         r"nope: no such folder"),
    Case("only-non-images", lambda d: (d / "a.pdf").write_bytes(b"%PDF") and d,
         lambda a, o: _subject(a), SubjectDataError, r"a\.pdf: not an image file \(\.pdf\)"),
    Case("corrupt-jpeg-only", lambda d: _corrupt(d / "c.jpg").parent, lambda a, o: _subject(a),
         SubjectDataError, r"c\.jpg: (not an image|corrupt).*(Add|re-export)"),
    Case("truncated-jpeg", lambda d: _truncate(DOG, d / "t.jpg").parent,
         lambda a, o: _subject(a), SubjectDataError, r"t\.jpg: corrupt or truncated.*re-export"),
    Case("truncated-png", lambda d: (d / "t.png").write_bytes(_png_bytes()[:40]) and d,
         lambda a, o: _subject(a), SubjectDataError, r"t\.png: (corrupt|not an image)"),
    Case("cmyk", lambda d: _img(d / "c.jpg", "CMYK").parent, lambda a, o: _warn(_subject(a)),
         None, r"n=1"),
    Case("16-bit", lambda d: _img(d / "g.png", "I;16").parent, lambda a, o: _warn(_subject(a)),
         None, r"n=1"),
    Case("palette", lambda d: _img(d / "p.png", "P").parent, lambda a, o: _warn(_subject(a)),
         None, r"n=1"),
    Case("rgba", lambda d: _img(d / "a.png", "RGBA").parent, lambda a, o: _warn(_subject(a)),
         None, r"n=1"),
    Case("grayscale", lambda d: _img(d / "l.jpg", "L").parent, lambda a, o: _warn(_subject(a)),
         None, r"n=1"),
    Case("exif-rotated", _exif_rotated, _exif_check, None, r"^tall$"),
    Case("1x1-image", lambda d: _img(d / "tiny.png", size=(1, 1)).parent,
         lambda a, o: _subject(a), SubjectDataError, r"tiny\.png: 1x1 is too small.*larger"),
    Case("huge-image", lambda d: Image.new("1", (12000, 10000)).save(d / "big.png") or d,
         lambda a, o: _subject(a), SubjectDataError, r"big\.png: 12000x10000 is too large.*"
         r"downscale"),
    Case("caption-without-image", lambda d: (shutil.copy(DOG, d / "a.jpg"),
                                             (d / "b.txt").write_text("x"), d)[-1],
         lambda a, o: _warn(_subject(a)), None, r"caption b\.txt has no image.*n=1"),
    Case("image-without-caption-uses-prompt", lambda d: (shutil.copy(DOG, d / "a.jpg"), d)[-1],
         lambda a, o: _subject(a).images[0].caption, None, r"^a photo of sks dog$"),
    Case("caption-overrides", lambda d: (shutil.copy(DOG, d / "a.jpg"),
                                         (d / "a.txt").write_text(" sks dog\n on grass "), d)[-1],
         lambda a, o: _subject(a).images[0].caption, None, r"^sks dog on grass$"),
    Case("non-ascii-path", lambda d: (_img(d / "фото ç" / "狗.jpg"), d / "фото ç")[-1],
         lambda a, o: _warn(_subject(a)), None, r"n=1"),
    Case("one-bad-image-loses-nothing", _mixed, lambda a, o: _warn(_subject(a)), None,
         r"skipped bad\.jpg.*skipped notes\.pdf.*n=1"),
    Case("bad-resolution", lambda d: d, lambda a, o: load_subject(a, "x", 100 + 1),
         SubjectDataError, r"resolution=101: use a multiple of 8"),
    # -- LoRA files
    Case("corrupt-lora", lambda d: (d / "x.safetensors").write_bytes(b"garbage" * 9) and d,
         lambda a, o: read_lora(a / "x.safetensors"), LoraFileError,
         r"x\.safetensors: not a readable \.safetensors file.*export it again"),
    Case("truncated-lora", lambda d: _truncate(_lora(d / "f.safetensors"), d / "t.safetensors",
                                                0.6),
         lambda a, o: read_lora(a), LoraFileError, r"t\.safetensors: not a readable.*truncated"),
    Case("not-a-lora", lambda d: save_file({"model.w": torch.zeros(2)}, str(d / "m.safetensors"))
         or d / "m.safetensors", lambda a, o: read_lora(a), LoraFileError,
         r"m\.safetensors: no LoRA modules.*not a LoRA file"),
    Case("missing-up", lambda d: save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)},
                                           str(d / "h.safetensors")) or d / "h.safetensors",
         lambda a, o: read_lora(a), LoraFileError, r"module 'lora_unet_x' has no up matrix"),
    Case("rank-mismatch", lambda d: save_file({"m.lora_down.weight": torch.zeros(2, 3),
                                               "m.lora_up.weight": torch.zeros(4, 5)},
                                              str(d / "r.safetensors")) or d / "r.safetensors",
         lambda a, o: read_lora(a), LoraFileError, r"'m' has down \(2, 3\) and up \(4, 5\)"),
    Case("sd15-lora-on-sdxl", lambda d: _lora(d / "s.safetensors", family="sd15"),
         lambda a, o: check_family(read_lora(a), "sdxl"), LoraFileError,
         r"s\.safetensors was made for SD1\.5 but the model is SDXL: pick a LoRA trained for SDXL"),
    Case("lora-without-our-metadata", lambda d: _lora(d / "n.safetensors", meta=False),
         lambda a, o: _cli("report", a), None, r"^0$"),
    Case("malformed-metadata-json", lambda d: save_file(
        {"m.lora_down.weight": torch.zeros(2, 3), "m.lora_up.weight": torch.zeros(4, 2)},
        str(d / "j.safetensors"), metadata={"lora2.modules": "{not json"}) or d / "j.safetensors",
         lambda a, o: _cli("report", a), SystemExit,
         r"j\.safetensors: metadata field 'lora2\.modules' is not valid JSON"),
    Case("ckpt-pickle-refused", lambda d: _pickle_bomb(d / "m.ckpt", d / "PWNED"),
         lambda a, o: read_lora(a), LoraFileError, r"m\.ckpt: pickle-based files.*never opened"),
    Case("pt-pickle-refused", lambda d: _pickle_bomb(d / "m.pt", d / "PWNED"),
         lambda a, o: _cli("report", a), SystemExit,
         r"m\.pt: pickle-based.*convert it to \.safetensors"),
    Case("pad-below-largest", lambda d: _lora(d / "p.safetensors"),
         lambda a, o: pad_lora(read_lora(a), 2), PadRankError,
         r"rank=2 is below the largest rank in the file \(3.*use --rank 3"),
    Case("pad-rank-zero", lambda d: _lora(d / "p.safetensors"),
         lambda a, o: pad_lora(read_lora(a), 0), PadRankError, r"rank=0 is below"),
    # -- output names
    Case("name-dotdot", lambda d: "../escape", lambda a, o: safe_output_path(o, a), ValueError,
         r"'\.\./escape' may not contain '\.\.'.*inside the output folder"),
    Case("name-absolute", lambda d: "/etc/lora", lambda a, o: safe_output_path(o, a),
         ValueError, r"'/etc/lora' must be a plain relative name"),
    Case("name-nested-dotdot", lambda d: "a/../../b", lambda a, o: safe_output_path(o, a),
         ValueError, r"may not contain '\.\.'"),
    Case("name-backslash", lambda d: "..\\b", lambda a, o: safe_output_path(o, a), ValueError,
         r"plain relative name"),
    Case("name-empty", lambda d: "  ", lambda a, o: safe_output_path(o, a), ValueError,
         r"empty: give a file name"),
    Case("cli-name-escape", lambda d: (shutil.copy(DOG, d / "a.jpg"), d)[-1],
         lambda a, o: _train_cli(a, o, "--name", "../../x"), SystemExit,
         r"output name '\.\./\.\./x' may not contain '\.\.'"),
    # -- ranges
    Case("steps-zero", lambda d: None, lambda a, o: TrainConfig(steps=0), ConfigError,
         r"steps=0 is invalid: use an integer between 1"),
    Case("lr-negative", lambda d: None, lambda a, o: TrainConfig(lr=-1e-4), ConfigError,
         r"lr=-0\.0001 is invalid: use a positive learning rate"),
    Case("lr-nan", lambda d: None, lambda a, o: TrainConfig(nu_lr=float("nan")), ConfigError,
         r"nu_lr=nan is invalid"),
    Case("r-target-above-r-max", lambda d: None,
         lambda a, o: AdapterConfig(r_target=600, r_max=512), ConfigError,
         r"r_target=600 is invalid: use a rank in \(0, r_max=512\]"),
    Case("init-rank-zero", lambda d: None, lambda a, o: AdapterConfig(init_rank=0), ConfigError,
         r"init_rank=0 is invalid"),
    Case("q-one", lambda d: None, lambda a, o: AdapterConfig(q=1.0), ConfigError,
         r"q=1\.0 is invalid: use a probability"),
    Case("unknown-preset", lambda d: None, lambda a, o: preset("turbo"), ConfigError,
         r"preset='turbo' is unknown: choose one of"),
    Case("unknown-option", lambda d: None, lambda a, o: preset("spread", rnak=3), ConfigError,
         r"rnak=3 is not an option"),
    Case("bad-key-style", lambda d: None, lambda a, o: ExportConfig(key_style="a1111"),
         ConfigError, r"key_style='a1111' is invalid: choose one of"),
    Case("nan-loss-stops", lambda d: None, _bad_loss, RuntimeError,
         r"loss became inf at step 1.*lower the learning rate"),
]


def _elsewhere(d: Path) -> Path:
    """A folder outside ``d`` (beside it) holding a file with a distinctive name."""
    out = d.parent / "elsewhere"
    out.mkdir(exist_ok=True)
    _img(out / "secret_x9.png")
    return out


def _linked_out(d: Path) -> Path:
    (d / "photos").symlink_to(_elsewhere(d), target_is_directory=True)
    return d


def _file_linked_out(d: Path) -> Path:
    shutil.copy(DOG, d / "good.jpg")
    (d / "a.png").symlink_to(_elsewhere(d) / "secret_x9.png")
    return d


def _loop_and_fifo(d: Path) -> Path:
    import os

    (d / "loop.jpg").symlink_to(d / "loop2.jpg")
    (d / "loop2.jpg").symlink_to(d / "loop.jpg")
    os.mkfifo(d / "pipe.png")
    (d / "gone.png").symlink_to(d / "missing.png")
    return d


_OUTSIDE = r"is outside the folder this server allows: stay.*LORA2_ALLOW_ANY_FOLDER=1"
CASES += [
    # -- confinement of paths typed into a node (a ComfyUI server may face the network)
    Case("folder-dotdot", lambda d: d, lambda a, o: resolve_inside(a, "../../etc", "folder",
                                                                   "stay"),
         OutsideFolderError, r"folder '\.\./\.\./etc' " + _OUTSIDE),
    Case("folder-absolute", lambda d: d, lambda a, o: resolve_inside(a, "/etc", "folder",
                                                                     "stay"),
         OutsideFolderError, r"folder '/etc' " + _OUTSIDE),
    Case("folder-home", lambda d: d, lambda a, o: resolve_inside(a, "~", "folder", "stay"),
         OutsideFolderError, r"folder '~' " + _OUTSIDE),
    Case("folder-symlinked-outside", _linked_out,
         lambda a, o: resolve_inside(a, "photos", "folder", "stay"), OutsideFolderError,
         r"folder 'photos' " + _OUTSIDE),
    Case("folder-inside-with-dotdot", lambda d: (d / "a").mkdir() or d,
         lambda a, o: resolve_inside(a, "a/../a", "folder", "stay").relative_to(a.resolve()),
         None, r"^a$"),
    Case("folder-outside-allowed-by-owner", lambda d: d,
         lambda a, o: resolve_inside(a, "/etc", "folder", "stay", allow_outside=True), None,
         r"^/etc$"),
    Case("file-linked-outside-skipped", _file_linked_out,
         lambda a, o: _warn(load_subject(a, "p", 64, within=a)), None,
         r"^skipped a\.png: links outside the allowed folder; not read \| n=1$"),
    Case("symlink-loop-fifo-dangling", _loop_and_fifo, lambda a, o: _subject(a),
         SubjectDataError, r"gone\.png: a broken symbolic link: remove or fix it; loop\.jpg: a "
         r"symbolic link loop.*pipe\.png: not a regular file \(FIFO, socket or device\)"),
]


# ------------------------------------------------------------------ second pass (issue #13)
def _photos(d: Path, n: int = 1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(DOG.with_name(f"0{i}.jpg"), d / f"p{i}.jpg")
    return d


def _early(fn):
    """``fn`` with model loading forbidden: the refusal must come before any work."""
    def run(a, o):
        import lora2_engine.models.loader as loader

        def no(*_a, **_k):
            raise AssertionError("the model was loaded before the input was refused")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loader, "load_model", no)
            return fn(a, o)
    return run


_STATES: dict[str, Path] = {}


def _base_state() -> Path:
    """A real state: 2 photos, --steps 4, Ctrl-C after step 2 (built once per session)."""
    if "base" not in _STATES:
        import os
        import signal
        import tempfile

        import lora2_engine.cli as climod

        root = Path(tempfile.mkdtemp(prefix="lora2-state-"))
        real = climod._progress

        def progress(total, start=0):
            bar, on_step = real(total, start)

            def step(tr, rec):
                on_step(tr, rec)
                if tr.step >= 2:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as a user would
            return bar, step

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(climod, "_progress", progress)
            rc = cli(["train", str(_photos(root / "photos", 2)), "--out", str(root / "out"),
                      "--steps", "4", "--resolution", "64", "--model", "tiny-sd15",
                      "--name", "run"])
        assert rc == 130
        _STATES["base"] = root
    return _STATES["base"]


def _state(d: Path, drop=(), meta: dict | None = None, n_photos: int = 2) -> Path:
    """The base state copied into ``d`` (edited: tensors dropped, metadata replaced), with
    ``n_photos`` photos in ``d / "photos"``; returns ``d``."""
    from safetensors import safe_open

    src = _base_state() / "out" / "run.state.safetensors"
    with safe_open(str(src), "pt") as fh:
        m = dict(fh.metadata())
    t = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    save_file(t, str(d / "run.state.safetensors"), metadata={**m, **(meta or {})})
    _photos(d / "photos", n_photos)
    return d


def _resume_cli(a: Path, o: Path, *extra):
    return _cli("train", a / "photos", "--out", o, "--steps", "4", "--resolution", "64",
                "--model", "tiny-sd15", "--resume", a / "run.state.safetensors", *extra)


def _raw_lora(d: Path, tensors: dict, meta: dict | None = None,
              name: str = "x.safetensors") -> Path:
    save_file(tensors, str(d / name), metadata=meta)
    return d / name


def _kohya(rank=2, down=None, **extra) -> dict:
    t = {"m.lora_down.weight": torch.randn(rank, 4) if down is None else down,
         "m.lora_up.weight": torch.randn(4, rank)}
    t.update(extra)
    return t


def _peft(meta: dict) -> dict:
    return {"tensors": {"unet.m.lora_A.weight": torch.randn(2, 4),
                        "unet.m.lora_B.weight": torch.randn(4, 2)},
            "meta": {"lora_adapter_metadata": json.dumps(meta)}}


def _nan_lora(d: Path) -> Path:
    down = torch.randn(2, 4)
    down[0, 0] = float("nan")
    return _raw_lora(d, _kohya(down=down))


def _captions(d: Path, files: dict[str, bytes]) -> Path:
    _photos(d, 2)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _captions_of(a: Path) -> str:
    data = load_subject(a, "PROMPT", 64)
    return " | ".join(f"{i.path.name}={i.caption}" for i in data.images) + " | " + \
        " | ".join(data.warnings())


def _strip(d: Path) -> Path:
    Image.new("1", (32, 3_000_000)).save(d / "strip.png")
    return d


def _byte_ff(d: Path, photos: int) -> Path:
    import os

    folder = Path(os.fsdecode(bytes(d) + b"/ph\xff"))
    folder.mkdir()
    return _photos(folder, photos) if photos else folder


def _overwrite_a_folder(a: Path, o: Path):
    (o / "lora2.safetensors").mkdir()
    try:
        _train_cli(a, o, "--overwrite")
    finally:
        (o / "lora2.safetensors").rmdir()  # still there, untouched (rmdir fails otherwise)


def _two_names(a: Path, o: Path) -> str:
    """Run ``first`` then ``second`` into one folder: the first run's files are untouched."""
    _train_cli(a, o, "--name", "first")
    before = {p.name: p.read_bytes() for p in o.iterdir()}
    _train_cli(a, o, "--name", "second")
    assert {p.name: p.read_bytes() for p in o.iterdir() if p.name in before} == before
    return " ".join(sorted(p.name for p in o.iterdir()))


def _fresh_run_keeps_state(a: Path, o: Path):
    shutil.copy(a / "run.state.safetensors", o / "lora2.state.safetensors")
    before = (o / "lora2.state.safetensors").read_bytes()
    try:
        _train_cli(a / "photos", o)
    finally:
        assert (o / "lora2.state.safetensors").read_bytes() == before
        (o / "lora2.state.safetensors").unlink()  # (the listing check expects an empty out)


def _finished_run_leaves_stale_state(a: Path, o: Path) -> str:
    """A kill between writing the adapter and removing the state; the next run cleans it."""
    import lora2_engine.runfiles as rf

    real = rf.RunFiles.publish

    def publish_then_die(self, adapter, side):
        kept = self.state.read_bytes()
        out = real(self, adapter, side)
        self.state.write_bytes(kept)  # as if killed before the unlink
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf.RunFiles, "publish", publish_then_die)
        _cli("train", a, "--out", o, "--steps", "2", "--checkpoint-every", "1",
             "--resolution", "64", "--model", "tiny-sd15")
    assert (o / "lora2.state.safetensors").exists()
    _train_cli(a, o, "--steps", "2", "--checkpoint-every", "1", "--overwrite")
    return " ".join(sorted(p.name for p in o.iterdir()))


_SET = ("lora2.config.json lora2.loss.png lora2.rank_report.json lora2.rank_report.png "
        "lora2.safetensors")
_RESUME_FORCE = r"or force the new ones with --resume-force"

CASES += [
    # -- output folder and names: refused before the model loads
    Case("out-below-a-file", lambda d: (_photos(d / "ph"), (d / "f").write_bytes(b"x"), d)[-1],
         _early(lambda a, o: _train_cli(a / "ph", a / "f" / "sub")), SystemExit,
         r"cannot write into .*f/sub \(in .*/f\): a part of the path is a file, not a folder: "
         r"choose another folder"),
    Case("out-is-a-file", lambda d: (_photos(d / "ph"), (d / "f").write_bytes(b"x"), d)[-1],
         _early(lambda a, o: _train_cli(a / "ph", a / "f")), SystemExit,
         r"cannot write into .*/f: it is a file, not a folder: choose another folder"),
    Case("name-240-bytes", _photos, _early(lambda a, o: _train_cli(a, o, "--name", "n" * 240)),
         SystemExit, r"n{240}\.state\.safetensors: the name is 258 bytes, over the file "
         r"system's 255: shorten the name by at least 3 bytes"),
    Case("name-235-bytes-fits", _photos,
         lambda a, o: (_train_cli(a, o, "--name", "n" * 235), sorted(o.iterdir())[-1].name)[-1],
         None, r"^n{235}\.safetensors$"),
    Case("overwrite-target-is-a-folder", _photos, _early(_overwrite_a_folder), SystemExit,
         r"lora2\.safetensors is a folder, where the run writes a file: choose another name"),
    Case("bad-model-index-json", lambda d: (_photos(d / "ph"), (d / "pipe").mkdir(),
                                            (d / "pipe" / "model_index.json").write_text("{x"),
                                            d)[-1],
         lambda a, o: _train_cli(a / "ph", o, "--model", a / "pipe"), SystemExit,
         r"model_index\.json: not valid JSON .*restore it"),
    Case("seed-2-pow-64", _photos, _early(lambda a, o: _train_cli(a, o, "--seed", 2**64)),
         SystemExit, r"seed=18446744073709551616 is invalid: use an integer between 0 and "
         r"2\*\*64 - 1"),
    Case("lambda-e-1e308", _photos, _early(lambda a, o: _train_cli(a, o, "--lambda-e",
                                                                   "1e308")),
         SystemExit, r"lambda_e=1e\+308 is invalid: use a weight in \[0, 1000\]"),
    Case("folder-name-byte-0xff-empty", lambda d: _byte_ff(d, 0),
         lambda a, o: _train_cli(a, o, "--class-noun", "dog"), SystemExit,
         r"ph\\xff: no usable image"),
    Case("folder-name-byte-0xff-as-class-noun", lambda d: _byte_ff(d, 1),
         _early(lambda a, o: _train_cli(a, o)), SystemExit, r"the folder name 'ph\\xff' is "
         r"not UTF-8 text, so it cannot be the class noun: pass --class-noun"),
    Case("folder-name-byte-0xff-trains", lambda d: _byte_ff(d, 1),
         lambda a, o: (_train_cli(a, o, "--class-noun", "dog"), "ok")[-1], None, r"^ok$"),
    Case("name-byte-0xff", _photos, _early(lambda a, o: _train_cli(
        a, o, "--name", os.fsdecode(b"x\xff"))), SystemExit, r"output name 'x\\udcff' has "
         r"bytes that are not UTF-8 text"),
    Case("class-table-not-utf8", lambda d: (_photos(d / "dog"), (d / "prompts_and_classes.txt")
                                            .write_bytes(b"dog,\xff\xfe"), d / "dog")[-1],
         _early(lambda a, o: _train_cli(a, o)), SystemExit,
         r"prompts_and_classes\.txt: byte 0xff at offset 4 is not UTF-8 text: save it as UTF-8"),
    # -- several runs, one folder: nothing of another run replaced or deleted
    Case("second-name-keeps-first-runs-files", _photos, _two_names, None,
         r"^first\.config\.json first\.loss\.png .* first\.safetensors second\.config\.json"),
    Case("fresh-run-keeps-unfinished-state", _state, _early(_fresh_run_keeps_state),
         SystemExit, r"lora2\.state\.safetensors holds an unfinished run named 'lora2' "
         r"\(step 2 of 4\): continue it with --resume .*or choose another name"),
    Case("stale-state-of-a-finished-run-is-removed", _photos, _finished_run_leaves_stale_state,
         None, "^" + _SET + "$"),
    # -- resuming: the state is checked, and so is the run that continues it
    Case("state-missing-rng-generator", lambda d: _state(d, drop=("rng.generator",)),
         _resume_cli, SystemExit, r"run\.state\.safetensors: the state's tensor "
         r"'rng\.generator' is missing; .*resume from another state"),
    Case("state-step-abc", lambda d: _state(d, meta={"step": "abc"}), _early(_resume_cli),
         SystemExit, r"the state's 'step' is 'abc', not a count"),
    Case("state-on-fewer-photos", lambda d: _state(d, n_photos=1), _resume_cli, SystemExit,
         r"was trained on 2 examples, this run has 1: resume with the same photos, or force "
         r"it with --resume-force"),
    Case("resume-other-lr-seed-rmax", _state,
         lambda a, o: _resume_cli(a, o, "--lr", "1e-3", "--seed", "3", "--r-max", "64"),
         SystemExit, r"trained with other settings \(lr: 0\.0001 in the state, 0\.001 now; "
         r"seed: 0 in the state, 3 now; r_max: 512 in the state, 64 now\): .*" + _RESUME_FORCE),
    Case("resume-steps-below-the-state", _state, lambda a, o: _cli(
        "train", a / "photos", "--out", o, "--steps", "1", "--resolution", "64", "--model",
        "tiny-sd15", "--resume", a / "run.state.safetensors"), SystemExit,
         r"is at step 2, beyond steps=1: resume with --steps 2 or more"),
    Case("resume-force-continues-with-new-lr", _state,
         lambda a, o: (_resume_cli(a, o, "--lr", "1e-3", "--resume-force"),
                       json.loads(read_lora(o / "lora2.safetensors").metadata[
                           "lora2.train_config"])["lr"])[-1], None, r"^0\.001$"),
    Case("resume-given-a-lora-file", lambda d: _lora(d / "f.safetensors"),
         _early(lambda a, o: _train_cli(DOG.parent, o, "--resume", a)), SystemExit,
         r"f\.safetensors is an exported LoRA file, not a training state: --resume takes the "
         r"<name>\.state\.safetensors file"),
    # -- LoRA files: every field checked
    Case("lora-rank-0", lambda d: _raw_lora(d, _kohya(0)), lambda a, o: _cli("pad", a),
         SystemExit, r"module 'm' has rank 0 \(empty matrices\); the file is damaged"),
    Case("lora-1d-down", lambda d: _raw_lora(d, _kohya(down=torch.randn(2))),
         lambda a, o: _cli("report", a), SystemExit, r"down \(2,\) and up \(4, 2\) are not "
         r"2-D"),
    Case("lora-int-down", lambda d: _raw_lora(d, _kohya(down=torch.ones(2, 4, dtype=torch.int32))),
         lambda a, o: _cli("report", a), SystemExit, r"not floating point"),
    Case("lora-alpha-two-values", lambda d: _raw_lora(d, _kohya(**{"m.alpha": torch.ones(2)})),
         lambda a, o: _cli("report", a), SystemExit, r"an alpha of shape \(2,\) \(a single "
         r"finite number is expected\)"),
    Case("lora-nan", _nan_lora, lambda a, o: _cli("report", a), SystemExit,
         r"1 of 1 modules hold NaN or inf \(e\.g\. 'm'\).*train it again"),
    Case("modules-metadata-a-list", lambda d: _raw_lora(d, _kohya(), {"lora2.modules": "[1]"}),
         lambda a, o: _cli("report", a), SystemExit,
         r"metadata field 'lora2\.modules' is not a JSON dict; .*export it again"),
    Case("modules-metadata-nu-abc", lambda d: _raw_lora(d, _kohya(), {"lora2.modules": json.dumps(
        {"x": {"key": "m", "rank": 2, "nu": "abc"}})}), lambda a, o: _cli("report", a),
         SystemExit, r"'lora2\.modules' is not a valid record for 'x' \(key, rank, nu\)"),
    Case("peft-r-zero", lambda d: _raw_lora(d, **_peft({"unet.r": 0})),
         lambda a, o: _cli("report", a), SystemExit, r"its r must be a rank > 0"),
    Case("peft-alpha-pattern-list", lambda d: _raw_lora(d, **_peft({"unet.alpha_pattern": [1]})),
         lambda a, o: _cli("report", a), SystemExit, r"its alpha_pattern must map module names"),
    Case("pad-rank-ten-million", lambda d: _lora(d / "p.safetensors"),
         lambda a, o: _cli("pad", a, "--rank", 10_000_000), SystemExit,
         r"rank=10000000 is above 4096.*use --rank 3\.\.4096"),
    # -- captions and photos as people make them
    Case("caption-utf16-bom", lambda d: _captions(d, {"p0.txt": "sks dog ü".encode("utf-16")}),
         lambda a, o: _captions_of(a), None, r"p0\.jpg=sks dog ü \| p1\.jpg=PROMPT"),
    Case("caption-utf8-bom", lambda d: _captions(d, {"p0.txt": "\ufeffsks dog".encode()}),
         lambda a, o: _captions_of(a), None, r"p0\.jpg=sks dog \|"),
    Case("caption-upper-case-TXT", lambda d: _captions(d, {"p1.TXT": b"sks dog up"}),
         lambda a, o: _captions_of(a), None, r"p1\.jpg=sks dog up"),
    Case("caption-invalid-utf8", lambda d: _captions(d, {"p0.txt": b"sks \xff dog"}),
         lambda a, o: _captions_of(a), None, r"^p1\.jpg=PROMPT \| skipped p0\.jpg: p0\.txt: "
         r"byte 0xff at offset 4 is not UTF-8 text: save it as UTF-8$"),
    Case("caption-utf16-without-bom", lambda d: _captions(d, {"p0.txt": "sks".encode("utf-16-le")}),
         lambda a, o: _captions_of(a), None, r"skipped p0\.jpg: p0\.txt: contains NUL "
         r"characters \(UTF-16 without a byte order mark\?\)"),
    Case("caption-two-files-one-image", lambda d: _captions(d, {"p0.txt": b"a", "p0.TXT": b"b"}),
         lambda a, o: _captions_of(a), None, r"skipped p0\.jpg: has 2 captions \(p0\.TXT, "
         r"p0\.txt\): keep one"),
    Case("strip-32x3000000", _strip, lambda a, o: _subject(a), SubjectDataError,
         r"strip\.png: 32x3000000 is a 93750:1 strip \(over 16:1\).*crop it"),
]


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    arg = case.setup(src)
    if case.error is None:
        result = case.run(arg, out)
        assert re.search(case.match, str(result)), result
    else:
        with pytest.raises(case.error) as exc:
            case.run(arg, out)
        msg = str(exc.value)
        if isinstance(exc.value, SystemExit):  # the CLI prints the message on stderr
            msg = capsys.readouterr().err
            assert exc.value.code == 2 and "error: " in msg, msg
        assert re.search(case.match, msg, re.S), msg
        assert "Traceback" not in msg
        assert _listing(out) == [], f"partial output left behind: {_listing(out)}"
    assert not (src / "PWNED").exists(), "a pickle was unpickled"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
    assert not list(tmp_path.rglob("*.lora2-lock")), "a run's lock was left behind"
    assert not list(out.rglob("*.state.safetensors")), "a state was left behind"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 90 and len({c.id for c in CASES}) == len(CASES)


def test_report_on_foreign_lora_says_so(tmp_path, capsys):
    p = _lora(tmp_path / "n.safetensors", meta=False)
    assert cli(["report", str(p)]) == 0
    assert "not a LoRA2 file (no lora2 metadata)" in capsys.readouterr().out


def test_export_under_disk_full_leaves_previous_file(tmp_path, monkeypatch):
    p = _lora(tmp_path / "a.safetensors")
    before = p.read_bytes()
    import os

    def full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        _lora(p, export=ExportConfig(overwrite=True))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize("value,allowed", [("1", True), ("yes", True), ("0", False),
                                           ("", False)])
def test_the_owner_allows_any_folder_with_an_environment_variable(tmp_path, monkeypatch,
                                                                  value, allowed):
    monkeypatch.setenv("LORA2_ALLOW_ANY_FOLDER", value)
    if allowed:
        assert resolve_inside(tmp_path, "/etc", "folder", "stay") == Path("/etc")
    else:
        with pytest.raises(OutsideFolderError, match="LORA2_ALLOW_ANY_FOLDER=1"):
            resolve_inside(tmp_path, "/etc", "folder", "stay")


# ------------------------------------------------------------------ the CLI's error boundary
def _raise_in(monkeypatch, where: str, exc: BaseException) -> None:
    """Make one stage of a CLI run raise ``exc`` (what a user or the system would cause)."""
    import lora2_engine.data as data
    import lora2_engine.diffusion as diffusion
    import lora2_engine.models.loader as loader

    def boom(*_a, **_k):
        raise exc

    target = {"load_subject": (data, "load_subject"), "load_model": (loader, "load_model"),
              "train": (diffusion, "train_diffusion")}[where]
    monkeypatch.setattr(*target, boom)


@pytest.mark.parametrize("where", ["load_subject", "load_model", "train"])
@pytest.mark.parametrize("exc,code,line", [
    (KeyboardInterrupt(), 130, "interrupted by Ctrl-C; no file was left half-written"),
    (None, 143, "interrupted by SIGTERM; no file was left half-written"),
    (RuntimeError("boom"), 1, "error: unexpected RuntimeError: boom. This is a bug in LoRA2: "
                              "please report it with the command you ran"),
])
def test_any_moment_is_one_line_and_an_exit_code(tmp_path, monkeypatch, capsys, where, exc,
                                                 code, line):
    from lora2_engine.cli import Terminated

    monkeypatch.delenv("LORA2_DEBUG", raising=False)
    _raise_in(monkeypatch, where, exc if exc is not None else Terminated())
    rc = cli(["train", str(_photos(tmp_path / "in")), "--out", str(tmp_path / "out"),
              "--model", "tiny-sd15", "--steps", "1", "--resolution", "64"])
    err = capsys.readouterr().err
    assert rc == code and line in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or _listing(tmp_path / "out") == []


def test_lora2_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA2_DEBUG", "1")
    _raise_in(monkeypatch, "load_model", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cli(["train", str(_photos(tmp_path / "in")), "--out", str(tmp_path / "out"),
             "--model", "tiny-sd15"])


@pytest.mark.parametrize("code,says", [
    (errno.ENOSPC, "No space left on the device: free some space or write to another disk"),
    (errno.EROFS, "the file system is read-only: choose a folder on a writable disk"),
    (errno.EACCES, "permission denied: choose a folder you can write to"),
    (errno.ENAMETOOLONG, "the name is too long for the file system: choose a shorter name"),
    (errno.ENOTDIR, "a part of the path is a file, not a folder: choose another folder"),
    (errno.EISDIR, "it is a folder: choose another name"),
    (errno.EIO, "an input/output error (failing disk or network drive): check the disk"),
])
def test_every_oserror_is_one_line_with_the_path_and_the_fix(tmp_path, monkeypatch, capsys,
                                                             code, says):
    monkeypatch.delenv("LORA2_DEBUG", raising=False)
    _raise_in(monkeypatch, "train", OSError(code, os.strerror(code), "/some/where/x.bin"))
    rc = cli(["train", str(_photos(tmp_path / "in")), "--out", str(tmp_path / "out"),
              "--model", "tiny-sd15", "--steps", "1", "--resolution", "64"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after the progress bar)
    assert rc == 2 and last.startswith(f"error: cannot use /some/where/x.bin: {says}"), err
    assert "Traceback" not in err


# ------------------------------------------------------------------ real full / read-only disks
@pytest.fixture
def disk(tmp_path):
    """``disk(kind, size)``: a folder on a fresh tmpfs, full or read-only (skips when mounting
    is not allowed, e.g. not root)."""
    import subprocess

    mounts = []

    def make(kind: str, size: str = "64k") -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                            capture_output=True).returncode == 0
        if not ok:
            pytest.skip("cannot mount a tmpfs here (needs root): the monkeypatched cases "
                        "cover the same messages")
        mounts.append(point)
        if kind == "full":
            (point / "filler").write_bytes(b"\0" * 60_000)
        if kind == "ro":
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _pad_to(lora: Path, dest: Path):
    return cli(["pad", str(lora), "--rank", "8", "--out", str(dest)])


def _png_to(lora: Path, dest: Path):
    return cli(["report", str(lora), "--png", str(dest)])


def _train_to(_lora: Path, dest: Path):
    return cli(["train", str(DOG.parent), "--out", str(dest.parent), "--name", dest.stem,
                "--model", "tiny-sd15", "--steps", "1", "--resolution", "64"])


@pytest.mark.parametrize("kind,says", [
    ("full", r"(No space left on the device|not enough space in).*(free some space)"),
    ("ro", r"the file system is read-only: choose a folder on a writable disk"),
])
@pytest.mark.parametrize("command", [_pad_to, _png_to, _train_to])
def test_full_and_read_only_disks(tmp_path, disk, capsys, kind, says, command):
    lora = _lora(tmp_path / "a.safetensors")
    folder = disk(kind)
    before = sorted(p.name for p in folder.iterdir())
    rc = command(lora, folder / "out.safetensors")
    err = capsys.readouterr().err
    assert rc == 2 and re.search(says, err) and str(folder) in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing partial, no temp


def test_disk_full_at_the_final_write_keeps_the_trained_state(tmp_path, monkeypatch, capsys):
    """ENOSPC while the adapter is written: the run is kept as a state and finishes with
    --resume without training again; an adapter never appears without its report."""
    import lora2_engine.runfiles as rf

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    photos, out = _photos(tmp_path / "in"), tmp_path / "out"
    args = ["train", str(photos), "--out", str(out), "--model", "tiny-sd15", "--steps", "2",
            "--resolution", "64"]
    monkeypatch.setattr(rf, "publish", full)
    assert cli(args) == 2
    err = capsys.readouterr().err
    state = out / "lora2.state.safetensors"
    assert re.search(r"No space left on the device: free some space.*The trained state is "
                     rf"kept in {re.escape(str(state))}: once that is fixed, finish with "
                     r"--resume", err), err
    assert state.is_file() and not (out / "lora2.safetensors").exists()
    assert not list(out.glob(".*"))  # no temp, no lock
    monkeypatch.undo()
    from lora2_engine.trainer import Trainer

    steps = []
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps.append(1) or real(self))
    assert cli([*args, "--resume", str(state)]) == 0
    assert steps == []  # finished from the kept state: no step trained again
    assert sorted(p.name for p in out.iterdir()) == _SET.split()
    assert read_lora(out / "lora2.safetensors").metadata["lora2.steps"] == "2"
