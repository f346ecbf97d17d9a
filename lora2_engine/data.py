"""Subject images and captions → tensors, with every bad input named and nothing lost.

One unreadable image never loses the others: it is skipped and reported. A folder with no
usable image at all is an error that names the folder and each file's problem.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MIN_SIDE = 32  # smaller images carry no usable detail at any training resolution
MAX_PIXELS = 100_000_000  # above this PIL's decompression-bomb guard would trigger anyway
MAX_ASPECT = 16  # a 32x3,000,000 strip cropped to 512 px would be upscaled to 3.6 GB


class SubjectDataError(ValueError):
    """The subject folder cannot be used; the message names the folder/files and the fix."""


@dataclass
class SubjectImage:
    path: Path | None
    pixels: torch.Tensor  # (3, H, W) float in [0, 1]
    caption: str


@dataclass
class SubjectData:
    images: list[SubjectImage]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    orphan_captions: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        out = [f"skipped {f}: {why}" for f, why in self.skipped]
        out += [f"caption {c} has no image with the same name; it is ignored"
                for c in self.orphan_captions]
        return out


def instance_prompt(token: str, class_noun: str, template: str = "a photo of {token} {cls}"):
    """The DreamBooth instance prompt, e.g. ``"a photo of sks dog"``."""
    return " ".join(template.format(token=token, cls=class_noun).split())


def to_rgb(img):
    """Any PIL mode (CMYK, 16-bit, palette, RGBA, grayscale) → 8-bit RGB, EXIF rotation applied.

    Transparent pixels are composited on white, as an artist would see them.
    """
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def resize_center_crop(img, size: int):
    """Scale the short side to ``size`` and crop the center square."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_bucket(img, size: int, step: int = 64):
    """Keep the aspect ratio at about ``size``² pixels, sides multiple of ``step`` (kohya)."""
    from PIL import Image

    w, h = img.size
    scale = (size * size / (w * h)) ** 0.5
    bw, bh = max(step, round(w * scale / step) * step), max(step, round(h * scale / step) * step)
    s = max(bw / w, bh / h)
    img = img.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - bw) // 2, (h - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def load_image(path: str | os.PathLike, resolution: int, mode: str = "crop") -> torch.Tensor:
    """Open, validate and resize one image → (3, H, W) in [0, 1]; raises ``ValueError`` why."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():  # we refuse huge images ourselves, with a reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} is too large (over {MAX_PIXELS:,} "
                                 "pixels): downscale it first")
            ratio = max(im.width, im.height) / max(min(im.width, im.height), 1)
            if ratio > MAX_ASPECT:
                raise ValueError(f"{im.width}x{im.height} is a {ratio:.0f}:1 strip (over "
                                 f"{MAX_ASPECT}:1); resizing it would take huge memory: crop "
                                 "it to the subject first")
            im.load()
            rgb = to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large to open safely ({exc}): downscale it first") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt or truncated image ({exc}): re-export it") from None
    if min(rgb.size) < MIN_SIDE:
        raise ValueError(f"{rgb.width}x{rgb.height} is too small (shorter side under "
                         f"{MIN_SIDE} px): use a larger photo")
    rgb = resize_bucket(rgb, resolution) if mode == "bucket" else resize_center_crop(rgb,
                                                                                   resolution)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_subject(folder: str | os.PathLike, prompt: str, resolution: int = 512,
                 mode: str = "crop", within: str | os.PathLike | None = None) -> SubjectData:
    """Read every image of ``folder``; a ``name.txt`` beside ``name.jpg`` overrides ``prompt``.

    With ``within``, a file whose real path (symlinks resolved) leaves that folder is skipped
    unopened, and its target is not named.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SubjectDataError(f"{folder}: no such folder; give a folder of subject photos")
    if mode not in ("crop", "bucket"):
        raise SubjectDataError(f"mode={mode!r}: choose 'crop' or 'bucket'")
    if not isinstance(resolution, int) or not 64 <= resolution <= 4096 or resolution % 8:
        raise SubjectDataError(f"resolution={resolution!r}: use a multiple of 8 in [64, 4096]")
    files, skipped = _regular_files(folder, within)
    captions = _captions_by_stem(files)
    images = []
    stems = set()
    for p in files:
        if p.suffix.lower() == ".txt":
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((p.name, f"not an image file ({p.suffix or 'no extension'})"))
            continue
        try:
            caption = _caption_for(p, captions) or prompt
            pixels = load_image(p, resolution, mode)
        except ValueError as exc:
            skipped.append((p.name, str(exc)))
            continue
        images.append(SubjectImage(p, pixels, caption))
        stems.add(p.stem)
    orphans = [p.name for p in files if p.suffix.lower() == ".txt" and p.stem not in stems
               and not any(q.stem == p.stem and q.suffix.lower() in IMAGE_SUFFIXES
                           for q in files)]
    if not images:
        detail = "; ".join(f"{f}: {why}" for f, why in skipped) or "the folder is empty"
        raise SubjectDataError(f"{folder}: no usable image ({detail}). Add .jpg/.png/.webp "
                               "photos of the subject")
    return SubjectData(images, skipped, orphans)


def _regular_files(folder: Path, within) -> tuple[list[Path], list[tuple[str, str]]]:
    """The folder's regular files, sorted; links that loop, dangle or leave ``within``, FIFOs,
    sockets and devices are skipped with the reason (and never opened: a FIFO would block)."""
    import stat

    root = Path(within).resolve() if within is not None else None
    files, skipped = [], []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            if root is not None and not path.resolve().is_relative_to(root):
                skipped.append((entry.name, "links outside the allowed folder; not read"))
                continue
            mode = os.stat(path).st_mode
        except RuntimeError:  # Python < 3.13: resolve() on a symlink loop
            skipped.append((entry.name, "a symbolic link loop: remove or fix it"))
            continue
        except OSError as exc:
            why = {errno.ELOOP: "a symbolic link loop", errno.ENOENT: "a broken symbolic link"}
            skipped.append((entry.name, why.get(exc.errno, f"cannot be read ({exc.strerror})")
                            + ": remove or fix it"))
            continue
        if stat.S_ISREG(mode):
            files.append(path)
        elif not stat.S_ISDIR(mode):
            skipped.append((entry.name, "not a regular file (FIFO, socket or device); not read"))
    return files, skipped


def read_text_file(path: str | os.PathLike) -> str:
    """A text file decoded as people write them: UTF-8 (with or without a BOM), UTF-16 and
    UTF-32 with a BOM (Windows Notepad's "Unicode"). Anything else is a ``ValueError`` naming
    the file and the first bad byte, never mojibake."""
    import codecs

    data = Path(path).read_bytes()
    boms = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before 16
            (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"))
    enc = next((e for bom, e in boms if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(enc)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{Path(path).name}: byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start} is not {enc.upper().replace('-SIG', '')} text: save it "
                         "as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{Path(path).name}: contains NUL characters (UTF-16 without a byte "
                         "order mark?): save it as UTF-8")
    return text


def _captions_by_stem(files: list[Path]) -> dict[str, list[Path]]:
    """Caption files by stem; ``.txt``, ``.TXT`` and ``.Txt`` are all captions."""
    out: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() == ".txt":
            out.setdefault(p.stem, []).append(p)
    return out


def _caption_for(image_path: Path, captions: dict[str, list[Path]]) -> str | None:
    """The caption beside an image (``None``: use the prompt); ``ValueError`` if unreadable."""
    found = captions.get(image_path.stem, [])
    if len(found) > 1:
        raise ValueError(f"has {len(found)} captions ({', '.join(p.name for p in found)}): "
                         "keep one")
    if not found:
        return None
    text = read_text_file(found[0])
    return " ".join(text.split()) or None
