"""LyCORIS LoHa / LoKr modules converted exactly to ``Delta W``, and everything else refused.

A LoHa or LoKr update is not a product of two thin factors, but its ``Delta W`` is exact and
small enough to form per module; its SVD (at its numerical rank) is then an exact plain-LoRA
factorisation that the compressor can truncate. The rules match ComfyUI's loader
(``comfy/weight_adapter/loha.py``, ``lokr.py``), which is how these files are applied:

- LoHa: ``(w1a @ w1b) * (w2a @ w2b) * alpha / rank`` (rank = ``w1b.shape[0]``); with Tucker
  cores ``t1``/``t2`` each factor is ``einsum('ijkl,jr,ip->prkl', t, wb, wa)``.
- LoKr: ``kron(w1, w2) * alpha / dim``; ``w1``/``w2`` given whole or as ``a @ b`` (``w2`` also
  Tucker); ``dim`` is the rank of the decomposed factor (w2's if both are); scale 1 when both
  are whole or there is no alpha.

Types whose update depends on the base weight (DoRA, OFT/BOFT) or that this pack does not
model (GLoRA, LoCon's Tucker ``lora_mid``, norm/full weights) are refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .formats.io import LoraFileError, load_tensors
from .formats.lora_file import LoraFile, ModuleWeights, read_lora
from .spectrum import Spectrum

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
UNSUPPORTED = {  # key suffix -> what it is and why it cannot become a plain LoRA here
    "dora_scale": "DoRA (its update depends on the base model's weight norms)",
    "oft_blocks": "OFT (a rotation of the base weight, not an additive update)",
    "oft_R": "OFT (a rotation of the base weight, not an additive update)",
    "oft_diag": "OFT/BOFT (a rotation of the base weight, not an additive update)",
    "a1.weight": "GLoRA (its update depends on the base weight)",
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid)",
    "w_norm": "LyCORIS norm-layer weights",
    "b_norm": "LyCORIS norm-layer weights",
}
_SUFFIXES = tuple(f".{s}" for s in LOHA + LOKR)


def _part(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return None


def check_supported(keys, path) -> None:
    """Refuse a file holding a module type that has no exact plain-LoRA form here."""
    for key in keys:
        for suffix, what in UNSUPPORTED.items():
            if key.endswith("." + suffix):
                raise LoraFileError(
                    f"{path}: module {key[: -len(suffix) - 1]!r} is {what}; it cannot be "
                    "converted exactly to a plain LoRA, so it is not compressed or merged. "
                    "Use the file as it is, or re-export it as a plain LoRA/LoCon, LoHa or LoKr")


def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)  # (out, in, kh, kw)


def loha_delta(p: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """``Delta W`` of a LoHa module (float64; 4-D with Tucker cores, else 2-D)."""
    w = {k: v.double() for k, v in p.items()}
    if "hada_t1" in w:
        m1 = _tucker(w["hada_t1"], w["hada_w1_b"], w["hada_w1_a"])
        m2 = _tucker(w["hada_t2"], w["hada_w2_b"], w["hada_w2_a"])
    else:
        m1 = w["hada_w1_a"] @ w["hada_w1_b"]
        m2 = w["hada_w2_a"] @ w["hada_w2_b"]
    scale = 1.0 if alpha is None else alpha / p["hada_w1_b"].shape[0]
    return m1 * m2 * scale


def lokr_delta(p: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """``Delta W`` of a LoKr module (float64; 4-D when ``w2`` is a conv kernel, else 2-D)."""
    w = {k: v.double() for k, v in p.items()}
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        w1, dim = w["lokr_w1_a"] @ w["lokr_w1_b"], p["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2, dim = _tucker(w["lokr_t2"], w["lokr_w2_b"], w["lokr_w2_a"]), p["lokr_w2_b"].shape[0]
    else:
        w2, dim = w["lokr_w2_a"] @ w["lokr_w2_b"], p["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


def _required(kind: str, p: dict) -> list[str]:
    if kind == "loha":
        return ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    need = [] if "lokr_w1" in p else ["lokr_w1_a", "lokr_w1_b"]
    if "lokr_w2" not in p:
        need += ["lokr_w2_a", "lokr_w2_b"]
    return need


def exact_module(delta: torch.Tensor) -> ModuleWeights:
    """A plain-LoRA module with exactly ``delta`` (SVD at its numerical rank, alpha = rank).

    A 4-D ``delta`` (out, in, kh, kw) becomes a LoCon module: down (r, in, kh, kw), up
    (out, r, 1, 1); a 2-D one a linear module (a conv whose kernel the file does not record
    stays 2-D: ComfyUI reshapes it to the weight as it does the LyCORIS original).
    """
    tail = tuple(delta.shape[1:])
    up_tail = (1, 1) if delta.dim() == 4 else ()
    spec = Spectrum.from_dense(lambda: delta.flatten(1), tail, up_tail)
    return spec.module(max(spec.numerical_rank, 1))


def read_lycoris(path: str | os.PathLike) -> LoraFile:
    """Read a LyCORIS file: LoHa/LoKr modules converted exactly, plain LoRA modules kept."""
    path = Path(path)
    tensors, meta = load_tensors(path)
    check_supported(tensors, path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors:
        hit = _part(key)
        if hit:
            parts.setdefault(hit[0], {})[hit[1]] = tensors[key]
    modules: dict[str, ModuleWeights] = {}
    for prefix, p in parts.items():
        kind = "loha" if any(k.startswith("hada_") for k in p) else "lokr"
        missing = [k for k in _required(kind, p) if k not in p]
        if missing:
            raise LoraFileError(f"{path}: {kind} module {prefix!r} lacks {', '.join(missing)}; "
                                "the file is incomplete: export it again")
        a = tensors.get(prefix + ".alpha")
        alpha = None if a is None else float(a)
        delta = loha_delta(p, alpha) if kind == "loha" else lokr_delta(p, alpha)
        modules[prefix] = exact_module(delta)
    used = {k for k in tensors if _part(k)} | {p + ".alpha" for p in parts}
    rest = {k: v for k, v in tensors.items() if k not in used}
    if any(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in rest):
        plain = read_lora(path)  # the plain modules of a mixed file, read the usual way
        modules.update({k: w for k, w in plain.modules.items() if k not in modules})
        rest = {k: v for k, v in plain.extra.items() if k not in used}
    style = "comfy" if all(k.startswith("diffusion_model.") for k in modules) else "kohya"
    meta = dict(meta)
    meta["lora2.converted_from"] = "lycoris"
    dtypes = {str(t.dtype).removeprefix("torch.") for k, t in tensors.items() if _part(k)}
    if len(dtypes) == 1:  # converted factors are float32; save as the file was by default
        meta["lora2.source_dtype"] = dtypes.pop()
    return LoraFile(modules, style, meta, rest, path)


def is_lycoris(keys) -> bool:
    return any(_part(k) for k in keys)


def read_any(path: str | os.PathLike) -> LoraFile:
    """Any LoRA this pack reads, plus LyCORIS LoHa/LoKr (exactly converted); else a refusal."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:  # let the pack's reader produce its message (pickle, missing, damaged)
        return read_lora(path)
    check_supported(keys, path)
    return read_lycoris(path) if is_lycoris(keys) else read_lora(path)
