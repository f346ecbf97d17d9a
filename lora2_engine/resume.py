"""Checks a training state before it is resumed: the file, and that the run still matches it.

A state file is trusted with nothing: every key the trainer reads must be present with the
right type, shape and finite values, and every metadata field must parse to the right JSON
type, so a damaged or foreign file is one clear message instead of a traceback halfway through
restoring. Then the run being resumed is compared with the one recorded in the state, field by
field over whatever fields the configs have: a change is refused with the list of differences
unless the caller allows it (``--resume-force`` / ``allow_changes=True``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from .formats.io import LoraFileError

# TrainConfig fields that do not change what the run computes (only how often it saves, or how
# it trades memory for time); ``steps`` may grow (it is checked on its own).
HARMLESS_FIELDS = frozenset({"steps", "checkpoint_every", "grad_checkpointing"})
GLOBAL_BATCH = "batch_size x processes"
RESUME_HELP = ("--resume takes the <name>.state.safetensors file a run writes on Ctrl-C / "
               "Cancel and every --checkpoint-every steps")


class ResumeMismatch(ValueError):
    """The state was made by a run with other settings or data; the message lists them."""


def state_metadata(meta: dict[str, str], path) -> dict[str, Any]:
    """The state's metadata parsed and type-checked (``step``, ``data.pos``, ``ranks``...)."""
    if meta.get("lora2.checkpoint") != "1":
        kind = ("an exported LoRA file, not a training state"
                if "lora2.format_version" in meta or "ss_network_module" in meta
                else "not a LoRA2 training state")
        raise LoraFileError(f"{path} is {kind}: {RESUME_HELP}; a finished LoRA cannot be "
                            "resumed (start a new run)")
    out: dict[str, Any] = {}
    for key, kind, default in (("step", int, None), ("data.pos", int, None),
                               ("data.size", int, -1), ("data.processes", int, 1),
                               ("ranks", dict, None),
                               ("history", list, []), ("train_config", dict, None),
                               ("adapter_config", dict, {}), ("pending", dict, {}),
                               ("stats", dict, {})):
        raw = meta.get(key)
        if raw is None:
            if default is None:
                raise LoraFileError(f"{path}: the state has no {key!r} field; it is damaged "
                                    "or from another tool: resume from another state")
            out[key] = default
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is int and value < 0):
            raise LoraFileError(f"{path}: the state's {key!r} is {raw[:60]!r}, not "
                                f"{'a count' if kind is int else 'a JSON ' + kind.__name__}; "
                                "the file was edited or damaged: resume from another state")
        out[key] = value
    bad = [k for k, v in (*out["ranks"].items(), *out["pending"].items())
           if not isinstance(v, int) or v < 0]
    bad += [k for k, v in out["stats"].items()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise LoraFileError(f"{path}: the state's rank of {bad[0]!r} is not a count; the file "
                            "is damaged: resume from another state")
    return out


def check_state_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path,
                        layers: dict) -> None:
    """Every tensor the trainer restores exists with the shape and type it needs."""
    def need(key: str, *, dtype=None, ndim=None, numel=None) -> torch.Tensor:
        t = tensors.get(key)
        what = None
        if t is None:
            what = "is missing"
        elif dtype is not None and t.dtype != dtype:
            what = f"has dtype {t.dtype}, not {dtype}"
        elif ndim is not None and t.ndim != ndim:
            what = f"has {t.ndim} dimensions, not {ndim}"
        elif numel is not None and t.numel() != numel:
            what = f"has {t.numel()} values, not {numel}"
        if what:
            raise LoraFileError(f"{path}: the state's tensor {key!r} {what}; the file is "
                                "damaged or from another version: resume from another state")
        return t

    need("rng.generator", dtype=torch.uint8, numel=torch.Generator().get_state().numel())
    need("rng.torch", dtype=torch.uint8, numel=torch.get_rng_state().numel())
    order = need("data.order", dtype=torch.int64, ndim=1)
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= max(order.numel(), 1)):
        raise LoraFileError(f"{path}: the state's data order is not a permutation; the file is "
                            "damaged: resume from another state")
    for name, layer in layers.items():
        a = need(f"adapter.{name}.A", ndim=2)
        b = need(f"adapter.{name}.B", ndim=2)
        rank = meta["ranks"][name]
        if a.shape[1] != layer.n or b.shape[0] != layer.m or a.shape[0] != b.shape[1] or \
                rank > a.shape[0] or not a.is_floating_point() or not b.is_floating_point():
            raise LoraFileError(
                f"{path}: module {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)} and rank "
                f"{rank}, which do not fit a ({layer.m} x {layer.n}) layer: the state is from "
                "another model or damaged: resume with the same model")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraFileError(f"{path}: module {name!r} holds NaN or inf: the run had "
                                "diverged; resume from an earlier state or start again with a "
                                "lower learning rate")
        if hasattr(layer, "nu_param"):
            need(f"adapter.{name}.nu_param", numel=layer.nu_param.numel())


def global_batch(train: dict[str, Any], processes: int) -> dict[str, Any]:
    """``train`` with the per-process ``batch_size`` replaced by the global batch: a state
    resumes with any process count that keeps the global batch (the data order is global)."""
    out = dict(train)
    out[GLOBAL_BATCH] = out.pop("batch_size", 1) * max(processes, 1)
    return out


def check_data_size(meta: dict[str, Any], order: torch.Tensor, n_examples: int, path,
                    allow_changes: bool) -> bool:
    """True when the data order can be kept; False when it must restart (forced change)."""
    recorded = meta["data.size"] if meta["data.size"] >= 0 else order.numel()
    if not recorded or recorded == n_examples:
        return True
    if allow_changes:
        return False
    raise ResumeMismatch(
        f"{path} was trained on {recorded} examples, this run has {n_examples}: resume with the "
        "same photos, or force it with --resume-force (allow_changes=True), which starts a new "
        "pass over the new photos")


def config_changes(recorded: dict[str, Any], current: dict[str, Any],
                   ignore=frozenset()) -> list[str]:
    """``"field: old → new"`` for every field whose value differs (fields of either side)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key in ignore:
            continue
        old, new = recorded.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(new, list):
            new = tuple(new)
        if isinstance(old, float) and isinstance(new, float) and math.isclose(old, new,
                                                                              rel_tol=1e-12):
            continue
        if old != new:
            out.append(f"{key}: {old!r} in the state, {new!r} now")
    return out


def check_settings(meta: dict[str, Any], train: dict[str, Any], adapter: dict[str, Any] | None,
                   path, allow_changes: bool) -> list[str]:
    """Refuse a resume whose settings differ from the state's (unless allowed); and always
    refuse one whose ``steps`` is below the state's step. Returns the allowed changes."""
    if meta["step"] > train.get("steps", meta["step"]):
        raise ResumeMismatch(f"{path} is at step {meta['step']}, beyond steps={train['steps']}: "
                             f"resume with --steps {meta['step']} or more")
    changes = config_changes(meta["train_config"], train, HARMLESS_FIELDS)
    if adapter is not None and meta["adapter_config"]:
        changes += config_changes(meta["adapter_config"], adapter)
    if changes and not allow_changes:
        raise ResumeMismatch(
            f"{path} was trained with other settings ({'; '.join(changes)}): resume with the "
            "state's settings, or force the new ones with --resume-force "
            "(allow_changes=True)")
    return changes
