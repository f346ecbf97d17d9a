"""LoRA files: export adapters with Lambda folded, read kohya / ComfyUI / diffusers files.

One file that every loader scales right (README, "One file, every loader"): in kohya and
ComfyUI-style files every module carries the same alpha (:data:`FILE_ALPHA`) and its factors
are pre-scaled so ``up @ down * alpha / rank`` is the trained update. A single alpha is what
diffusers' kohya converter handles (it keeps only the most common of differing alphas).
diffusers-style files hold no alpha keys: scale 1 (alpha = rank), with PEFT's
``rank_pattern``/``alpha_pattern`` in the metadata.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import (
    LoraFileError,
    atomic_write_bytes,
    load_tensors,
    parse_json_metadata,
    tensors_bytes,
)
from .keys import KNOWN_LAYOUTS, OTHER, UNetLayout

FORMAT_VERSION = "1"
_COMPONENTS = ("unet.", "transformer.")  # diffusers' PEFT prefixes
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SUFFIXES = {  # file suffix → (style family, role)
    ".lora_down.weight": ("kohya", "down"), ".lora_up.weight": ("kohya", "up"),
    ".lora_A.weight": ("diffusers", "down"), ".lora_B.weight": ("diffusers", "up"),
    ".lora.down.weight": ("diffusers", "down"), ".lora.up.weight": ("diffusers", "up"),
    ".alpha": (None, "alpha"),
}
FILE_ALPHA = 1.0  # the one alpha of every module in the kohya/ComfyUI-style files we write


@dataclass
class ModuleWeights:
    """One module of a LoRA file: ``delta = up @ down * alpha / rank`` (the stock rule)."""

    down: torch.Tensor  # (r, n) or (r, n, 1, 1)
    up: torch.Tensor  # (m, r) or (m, r, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``Delta W`` (m, n) as ComfyUI, kohya and A1111 compute it."""
        up, down = self.up.flatten(1).float(), self.down.flatten(1).float()
        return up @ down * self.scale

    def with_alpha(self, alpha: float, dtype: torch.dtype | None = None) -> ModuleWeights:
        """The same ``Delta W`` stored with ``alpha``: both factors scaled by
        ``sqrt(scale * rank / alpha)`` (an even split keeps fp16/bf16 in range)."""
        dtype = dtype or self.down.dtype
        gain = self.scale * self.rank / alpha
        if gain == 1.0:
            return ModuleWeights(self.down.to(dtype), self.up.to(dtype), float(alpha))
        root = math.sqrt(abs(gain))
        up = self.up.float() * (root if gain > 0 else -root)  # a negative scale goes to up
        return ModuleWeights((self.down.float() * root).to(dtype), up.to(dtype), float(alpha))


def file_alpha(style: str, rank: int) -> float:
    """The alpha a module is written with: :data:`FILE_ALPHA` for every module of a kohya or
    ComfyUI file; ``rank`` (scale 1, PEFT's default) for diffusers files, which hold no alpha
    keys (ComfyUI and A1111 then apply scale 1; diffusers and PEFT read the metadata)."""
    return float(rank) if style == "diffusers" else FILE_ALPHA


def network_metadata(modules: dict[str, ModuleWeights]) -> dict[str, str | None]:
    """kohya's ``ss_network_dim``/``ss_network_alpha`` as tools read them: the largest rank
    and the file's one alpha (``None``, i.e. removed, when the alphas differ: no single
    number would be true)."""
    alphas = {w.alpha if w.alpha is not None else float(w.rank) for w in modules.values()}
    return {"ss_network_dim": str(max(w.rank for w in modules.values())),
            "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else None}


def set_metadata(meta: dict[str, str], values: dict[str, str | None]) -> dict[str, str]:
    """``meta`` updated in place with ``values``; a ``None`` removes the key."""
    for key, value in values.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


@dataclass
class LoraFile:
    """A LoRA file in memory: modules by key prefix, the key style, metadata, other tensors."""

    modules: dict[str, ModuleWeights]
    style: str
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    def ranks(self) -> dict[str, int]:
        return {k: w.rank for k, w in self.modules.items()}

    def state_dict(self, alphas: bool | None = None) -> dict[str, torch.Tensor]:
        """Key → tensor as the file stores them (what a stock loader is handed).

        ``alphas`` adds a ``.alpha`` per module; by default every style but diffusers gets one
        (diffusers keeps alphas in metadata). ComfyUI reads ``.alpha`` for any naming, so an
        in-memory diffusers-style LoRA handed to it should pass ``alphas=True``.
        """
        alphas = self.style != "diffusers" if alphas is None else alphas
        out: dict[str, torch.Tensor] = dict(self.extra)
        for prefix, w in self.modules.items():
            out[_write_key(prefix, "down", self.style)] = w.down
            out[_write_key(prefix, "up", self.style)] = w.up
            if alphas and w.alpha is not None:
                out[prefix + ".alpha"] = torch.tensor(float(w.alpha))
        return out

    def lora2_modules(self) -> dict[str, dict[str, Any]] | None:
        """Our per-module record (``nu``, rank, shape) or ``None`` for other tools' files."""
        return parse_json_metadata(self.metadata, "lora2.modules", self.path or "file")

    def family(self) -> str | None:
        """The base-model family: from our metadata, kohya's, or the cross-attention width."""
        fam = self.metadata.get("lora2.family")
        if fam:
            return fam
        ver = self.metadata.get("ss_base_model_version", "")
        if ver.startswith("sdxl"):
            return "sdxl"
        if ver.startswith("sd_v1"):
            return "sd15"
        for key, w in self.modules.items():
            if "attn2" in key and ("to_k" in key or "to_v" in key):
                return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(w.down.flatten(1).shape[1])
        from ..families import registry

        for fam in registry().values():  # DiTs: module names no other family uses
            if fam.file_signature and any(sig in k for k in self.modules
                                          for sig in fam.file_signature):
                return fam.name
        return None


def family_names() -> dict[str, str]:
    from ..families import registry

    return {"sd2": "SD2", **{f.name: f.display for f in registry().values()}}


def check_family(lora: LoraFile, family: str) -> None:
    """Refuse a LoRA made for another base-model family (e.g. an SD1.5 file on SDXL)."""
    have = lora.family()
    FAMILY_NAMES = family_names()  # noqa: N806
    if have and family in FAMILY_NAMES and have in FAMILY_NAMES and have != family:
        raise LoraFileError(
            f"{lora.path or 'this LoRA'} was made for {FAMILY_NAMES[have]} but the model is "
            f"{FAMILY_NAMES[family]}: pick a LoRA trained for {FAMILY_NAMES[family]}")


def _write_key(prefix: str, role: str, style: str) -> str:
    if style == "diffusers":
        return prefix + {"down": ".lora_A.weight", "up": ".lora_B.weight"}[role]
    return prefix + {"down": ".lora_down.weight", "up": ".lora_up.weight"}[role]


def lora_contents(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`write_lora` stores (size budgets measure exactly these)."""
    meta = dict(lora.metadata)
    if lora.style == "diffusers":
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(lora))
    return lora.state_dict(), meta


def write_lora(lora: LoraFile, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``lora`` in its own key style, atomically."""
    return atomic_write_bytes(path, lora_bytes(lora), overwrite=overwrite)


def lora_bytes(lora: LoraFile) -> bytes:
    """The ``.safetensors`` file ``write_lora`` writes, as bytes."""
    return tensors_bytes(*lora_contents(lora))


def _peft_config(lora: LoraFile) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: a PEFT LoraConfig packed under the component's
    prefix (``unet.`` for UNets, ``transformer.`` for DiTs).

    One ``r`` (the most common rank) plus ``rank_pattern``/``alpha_pattern`` for the rest, with
    alpha = rank everywhere, so every module gets scale 1 (diffusers uses this config as given).
    """
    from collections import Counter

    component = next(iter(lora.modules)).split(".", 1)[0]
    names = {k.removeprefix(component + "."): w for k, w in lora.modules.items()}
    r0 = Counter(w.rank for w in names.values()).most_common(1)[0][0]
    cfg = {"r": r0, "lora_alpha": r0,
           "target_modules": sorted(names),
           "rank_pattern": {n: w.rank for n, w in names.items() if w.rank != r0},
           "alpha_pattern": {n: w.rank * w.scale for n, w in names.items()
                             if w.rank * w.scale != r0}}
    return {f"{component}.{k}": v for k, v in cfg.items()}


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA written by this pack, kohya sd-scripts, ComfyUI's SaveLoRA or diffusers."""
    path = Path(path)
    tensors, meta = load_tensors(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    styles: set[str] = set()
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        for suffix, (style, role) in _SUFFIXES.items():
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = t
                if style:
                    styles.add(style)
                break
        else:
            extra[key] = t  # e.g. ComfyUI SaveLoRA's .diff / .diff_b: kept, not interpreted
    modules: dict[str, ModuleWeights] = {}
    for prefix, p in parts.items():
        if "down" not in p or "up" not in p:
            if set(p) == {"alpha"}:
                continue
            missing = "up" if "down" in p else "down"
            raise LoraFileError(f"{path}: module {prefix!r} has no {missing} matrix; the file "
                                "is incomplete: export it again")
        modules[prefix] = _module(prefix, p, path)
    _check_finite(modules, path)
    if not modules:
        raise LoraFileError(f"{path}: no LoRA modules (lora_down/lora_up or lora_A/lora_B "
                            "pairs) found: this is not a LoRA file")
    _check_metadata(meta, path)
    if "diffusers" in styles:
        style = "diffusers"
        _apply_peft_alphas(modules, meta, path)
    elif all(k.startswith("diffusion_model.") for k in modules):
        style = "comfy"
    else:
        style = "kohya"
    return LoraFile(modules, style, meta, extra, path)


def _module(prefix: str, p: dict[str, torch.Tensor], path) -> ModuleWeights:
    """One module's tensors checked: float matrices (2-D, or 4-D conv) of one rank > 0, and
    a scalar alpha; the message names the module and what is wrong."""
    down, up, alpha = p["down"], p["up"], p.get("alpha")
    what = None
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        what = f"down {tuple(down.shape)} and up {tuple(up.shape)} are not 2-D (or 4-D) matrices"
    elif not (down.is_floating_point() and up.is_floating_point()):
        what = f"down/up have dtype {down.dtype}/{up.dtype}, not floating point"
    elif down.shape[0] != up.shape[1]:
        what = (f"down {tuple(down.shape)} and up {tuple(up.shape)} have different ranks")
    elif down.shape[0] == 0:
        what = "rank 0 (empty matrices)"
    elif alpha is not None and (alpha.numel() != 1 or not math.isfinite(float(alpha.flatten()[0]))):
        what = f"an alpha of shape {tuple(alpha.shape)} (a single finite number is expected)"
    if what:
        raise LoraFileError(f"{path}: module {prefix!r} has {what}; the file is damaged: "
                            "export it again")
    return ModuleWeights(down, up, None if alpha is None else float(alpha.flatten()[0]))


def _check_finite(modules: dict[str, ModuleWeights], path) -> None:
    """A LoRA with NaN/inf weights would turn every image black: refuse it by name."""
    bad = [k for k, w in modules.items()
           if not (torch.isfinite(w.down).all() and torch.isfinite(w.up).all())]
    if bad:
        raise LoraFileError(f"{path}: {len(bad)} of {len(modules)} modules hold NaN or inf "
                            f"(e.g. {bad[0]!r}): its training diverged or the file is damaged; "
                            "train it again with a lower learning rate")


# Metadata fields this pack reads → the JSON type each must have (other tools' fields are
# passed through untouched).
_META_JSON = {"lora2.modules": dict, "lora2.layout": dict, "lora2.adaptive": bool,
              "lora2.adapter_config": dict, "lora2.train_config": dict,
              "lora2.export_config": dict, "lora2.steps": int, "lora2.padded_to": int,
              "lora2.original_ranks": dict, "lora_adapter_metadata": dict}
_NUMBER = (int, float)


def _check_metadata(meta: dict[str, str], path) -> None:
    """Every metadata field we read parses to its JSON type, down to the per-module records."""
    def bad(key: str, want: str):
        return LoraFileError(f"{path}: metadata field {key!r} is not {want}; the file was "
                             "edited or damaged: export it again (or remove that field)")

    values = {k: parse_json_metadata(meta, k, path) for k in _META_JSON if k in meta}
    for key, value in values.items():
        kind = _META_JSON[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad(key, f"a JSON {kind.__name__}")
    for name, rec in (values.get("lora2.modules") or {}).items():
        if not isinstance(rec, dict) or not isinstance(rec.get("key", ""), str) or \
                not _is_count(rec.get("rank", 0)) or \
                not isinstance(rec.get("nu", 0.0), _NUMBER) or isinstance(rec.get("nu"), bool):
            raise bad("lora2.modules", f"a valid record for {name!r} (key, rank, nu)")
    peft = {k.removeprefix("unet."): v for k, v in
            (values.get("lora_adapter_metadata") or {}).items()}
    if "r" in peft and (not _is_count(peft["r"]) or peft["r"] == 0):
        raise bad("lora_adapter_metadata", "valid: its r must be a rank > 0")
    if "lora_alpha" in peft and not _is_number(peft["lora_alpha"]):
        raise bad("lora_adapter_metadata", "valid: its lora_alpha must be a number")
    for key, check in (("rank_pattern", lambda v: _is_count(v) and v > 0),
                       ("alpha_pattern", _is_number)):
        pattern = peft.get(key)
        if pattern is not None and (not isinstance(pattern, dict)
                                    or not all(check(v) for v in pattern.values())):
            raise bad("lora_adapter_metadata", f"valid: its {key} must map module names "
                      "to numbers")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool) and math.isfinite(v)


def _apply_peft_alphas(modules: dict[str, ModuleWeights], meta: dict[str, str], path) -> None:
    """Alphas from diffusers' packed PEFT config (``unet.r``, ``unet.alpha_pattern``, …)."""
    raw = parse_json_metadata(meta, "lora_adapter_metadata", path)
    if not isinstance(raw, dict):
        return
    cfg = {k.split(".", 1)[1] if k.startswith(_COMPONENTS) else k: v for k, v in raw.items()}
    alphas, ranks = cfg.get("alpha_pattern") or {}, cfg.get("rank_pattern") or {}
    for prefix, w in modules.items():
        if w.alpha is None:  # PEFT: scale = alpha_pattern.get(m, lora_alpha) / rank_pattern...
            name = prefix.split(".", 1)[1] if prefix.startswith(_COMPONENTS) else prefix
            alpha = alphas.get(name, cfg.get("lora_alpha", w.rank))
            w.alpha = float(alpha) * w.rank / float(ranks.get(name, cfg.get("r", w.rank)))


def export_adapters(adapters, path: str | os.PathLike, export=None,
                    layout: UNetLayout = OTHER, train_config=None, steps: int | None = None,
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """Write trained adapters as one standard LoRA file (see :func:`adapters_to_lora`)."""
    lora = adapters_to_lora(adapters, export, layout, train_config, steps, extra_metadata)
    return write_lora(lora, path, overwrite=bool(export and export.overwrite))


def adapters_to_lora(adapters, export=None, layout: UNetLayout = OTHER, train_config=None,
                     steps: int | None = None,
                     extra_metadata: dict[str, str] | None = None) -> LoraFile:
    """Trained adapters as an in-memory LoRA file with Lambda folded (method.md §4).

    ``A' = sqrt(Lambda) A``, ``B' = B sqrt(Lambda)`` at scale 1, then stored with the style's
    :func:`file_alpha`: every loader computes exactly ``B Lambda A`` for every module,
    whatever its rank. Modules are named by the family of ``layout`` in the export's key
    style; a fused module that the style stores as several (diffusers' to_q/to_k/to_v of
    Flux's qkv) gets the same ``A'`` in every part and ``B'`` split by rows, which is exact.
    """
    from ..config import ExportConfig, to_dict

    export = export or ExportConfig()
    dtype = _DTYPES[export.dtype]
    naming = _naming(layout.family)
    modules: dict[str, ModuleWeights] = {}
    record: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, layer in adapters.layers.items():
            s = layer.slot_scale().float().sqrt()
            a = layer.A[: layer.rank].float() * s[:, None]  # (D, n)
            b = layer.B[:, : layer.rank].float() * s[None, :]  # (m, D)
            rank = layer.rank
            if export.rank_tol > 0:  # the update's numerical rank, not the training capacity
                b, a, rank = _numerical_rank(b, a, export.rank_tol)
            parts = naming.file_keys(name, export.key_style, layout, layer.m, layer.n)
            rec = {"key": parts[0][0], "rank": rank, "trained_rank": layer.rank, "m": layer.m,
                   "n": layer.n}
            if len(parts) > 1:
                rec["split"] = [[k, list(r)] for k, r in parts]
            if hasattr(layer, "nu_param"):
                rec["nu"] = float(layer.nu)
            record[name] = rec
            if rank == 0:  # Delta W is exactly zero: nothing to write, the record says so
                continue
            if layer.is_conv:
                a, b = a[:, :, None, None], b[:, :, None, None]
            for key, rows in parts:  # split parts own their tensors (no shared storage)
                up = b if rows is None else b[rows[0]: rows[1]].clone()
                down = a if rows is None else a.clone()
                modules[key] = ModuleWeights(down, up, float(rank)).with_alpha(
                    file_alpha(export.key_style, rank), dtype)
    if not modules:  # a file needs one module: keep the first, at rank 1 with zero factors
        name, layer = next(iter(adapters.layers.items()))
        key = record[name]["key"]
        shape = (1, layer.n, 1, 1) if layer.is_conv else (1, layer.n)
        modules[key] = ModuleWeights(torch.zeros(shape, dtype=dtype),
                                     torch.zeros((layer.m, *shape[:1], *shape[2:]), dtype=dtype),
                                     1.0)
        record[name]["rank"] = 1
    meta = _metadata(adapters, record, layout, train_config, steps, export)
    meta["lora2.export_config"] = json.dumps(to_dict(export))
    set_metadata(meta, network_metadata(modules))
    if any("split" in r for r in record.values()):
        meta["lora2.split"] = ("fused modules are stored split by rows, the same lora_A in "
                               "every part (exact); lora2.modules lists the parts")
    meta.update(extra_metadata or {})
    return LoraFile(modules, export.key_style, meta)


def _naming(family: str):
    """The key naming of ``family``; unknown families get the generic UNet rules."""
    from ..families import find
    from ..families.base import UNetNaming

    fam = find(family)
    return fam.naming if fam is not None else UNetNaming()


def _numerical_rank(up: torch.Tensor, down: torch.Tensor, tol: float
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The smallest-rank factors of ``up @ down`` within relative Frobenius error ``tol``
    (exact SVD through the thin factors); rank 0 when the update is zero."""
    from ..spectrum import Spectrum

    spec = Spectrum.from_factors(up, down)
    rank = next(k for k in range(spec.s.numel() + 1) if spec.rel_error(k) <= tol)
    if rank == 0:
        return up[:, :0], down[:0], 0
    up, down = spec.factors(rank)
    return up, down, rank


def _metadata(adapters, record, layout, train_config, steps, export) -> dict[str, str]:
    from ..config import to_dict

    ranks = [r["rank"] for r in record.values()]
    meta = {
        "lora2.format_version": FORMAT_VERSION,
        "lora2.family": layout.family,
        "lora2.layout": json.dumps({"num_res_blocks": list(layout.num_res_blocks),
                                    "has_middle": layout.has_middle}),
        "lora2.modules": json.dumps(record),
        "lora2.adaptive": json.dumps(adapters.adaptive),
        "ss_network_module": "networks.lora",
        "ss_network_args": json.dumps({"algo": "lora2", "rank": "per-module",
                                       "min_rank": min(ranks), "max_rank": max(ranks)}),
        "ss_training_comment": "LoRA2 adaptive-rank LoRA (arXiv 2603.21884): rank per module, "
                               "one alpha (factors scaled)",
    }
    if adapters.config is not None:
        meta["lora2.adapter_config"] = json.dumps(to_dict(adapters.config))
    if train_config is not None:
        meta["lora2.train_config"] = json.dumps(to_dict(train_config))
        meta["ss_learning_rate"] = str(train_config.lr)
        meta["ss_seed"] = str(train_config.seed)
    if steps is not None:
        meta["lora2.steps"] = str(steps)
        meta["ss_steps"] = str(steps)
        meta["ss_max_train_steps"] = str(steps)
    fam = _family(layout.family)
    if fam is not None and fam.kohya_version and layout != KNOWN_LAYOUTS.get(layout.family,
                                                                               layout):
        # e.g. the tiny stand-ins: SDXL key names, but not SDXL's blocks: claim no base model
        meta["lora2.base_model"] = (
            f"not the {fam.display} base model: a {fam.display}-family UNet with "
            f"{list(layout.num_res_blocks)} res blocks per level (e.g. a tiny test stand-in); "
            "use it only with the model it was trained on")
        meta["lora2.diffusers_component"] = fam.diffusers_component
    elif fam is not None and fam.kohya_version:
        ver, arch = fam.kohya_version
        meta["ss_base_model_version"] = ver
        meta["modelspec.architecture"] = arch
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.implementation"] = "diffusers" if layout.family == "sd15" else "sgm"
        meta["lora2.diffusers_component"] = fam.diffusers_component
    return meta


def _family(name: str):
    from ..families import find

    return find(name)
