"""Bad input → a clear error naming the culprit and the fix, and nothing half-written.

Each case builds its input in an empty folder, runs one user-facing operation, and checks the
outcome: either an error whose message matches (culprit and fix), or success with the noted
warning. Afterwards the output folder must hold no partial or temporary file.
"""

from __future__ import annotations

import io
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
    ad = attach(net, AdapterConfig(r_target=2, init_rank=3, r_max=16))
    for layer in ad.layers.values():
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
    assert _listing(out) == [], f"partial output left behind: {_listing(out)}"
    assert not (src / "PWNED").exists(), "a pickle was unpickled"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


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
