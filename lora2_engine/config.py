"""Configuration as data: one dataclass per concern, validated once in ``__post_init__``.

The dataclass defaults are the ``"spread"`` preset, chosen on the rank-recovery benchmark's
development tasks (README: "Does the rank learning work?"); the paper's literal settings are
the ``"paper"`` preset, so ``attach(model, AdapterConfig())`` and ``preset()`` build the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
KEY_STYLES: tuple[str, ...] = ("kohya", "comfy", "diffusers")
INITS: tuple[str, ...] = ("kaiming", "paper")
SLOT_INITS: tuple[str, ...] = ("gradient", "random")
MAX_LAMBDA = 1e3  # regulariser weights above this only drown the task loss (or overflow it)


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")


@dataclass
class AdapterConfig:
    """How each adaptive component is shaped and initialised (method.md §1)."""

    r_target: float = field(default=1, metadata={"help": "rank the regulariser pulls toward"})
    init_rank: int = field(default=8, metadata={"help": "rank at step 0 (nu_init)"})
    r_max: int = field(default=512, metadata={"help": "largest rank a component may grow to"})
    q: float = field(default=0.9, metadata={"help": "mass of f kept by the D active slots"})
    renormalize: bool = field(default=True, metadata={"help": "f sums to 1 over D slots (AWN)"})
    init: str = field(default="kaiming", metadata={"help": "'kaiming' (default) or 'paper'"})
    random_new_b: bool = field(default=False, metadata={"help": "paper: new B columns random"})
    slot_init: str = field(default="gradient", metadata={
        "help": "'gradient': a new slot's A row is the leading unused singular direction of "
                "dL/dDeltaW (B stays 0); 'random': Gaussian A (the paper, PEFT)"})
    slot_norm: str = field(default="first", metadata={
        "help": "norm of gradient-initialised A rows: 'first' (every row as a random row, the "
                "first slot's Lambda-weighted row at Kaiming scale) or 'each' (every slot's: "
                "faster at low learning rates, but ranks then grow less; see README)"})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": "name suffixes"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "name substrings to skip"})

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.exclude = tuple(self.exclude)
        _check(isinstance(self.r_max, int) and 1 <= self.r_max <= 4096, "r_max", self.r_max,
               "use an integer between 1 and 4096")
        _check(0 < self.r_target <= self.r_max, "r_target", self.r_target,
               f"use a rank in (0, r_max={self.r_max}]")
        _check(isinstance(self.init_rank, int) and 1 <= self.init_rank <= self.r_max,
               "init_rank", self.init_rank, f"use an integer in [1, r_max={self.r_max}]")
        _check(0 < self.q < 1, "q", self.q, "use a probability strictly between 0 and 1")
        _check(self.init in INITS, "init", self.init, f"choose one of {INITS}")
        _check(self.slot_init in SLOT_INITS, "slot_init", self.slot_init,
               f"choose one of {SLOT_INITS}")
        _check(not (self.random_new_b and self.slot_init == "gradient"), "random_new_b",
               self.random_new_b, "random new B columns need slot_init='random'")
        _check(len(self.targets) > 0, "targets", self.targets, "name at least one module suffix")


@dataclass
class TrainConfig:
    """The training loop and the objective's weights (method.md §2, Eq. 11-14)."""

    steps: int = 500
    lr: float = 1e-4
    nu_lr: float = field(default=1e-2, metadata={"help": "nu's own Adam learning rate"})
    lambda_r: float = field(default=1.0, metadata={
        "help": "weight of sum |nu - nu_target|; with nu_signal='normalized' in units of the "
                "fit's typical pull on nu (so 1 = as strong as an average component's need)"})
    lambda_e: float = field(default=1e-4, metadata={"help": "weight of cross-attn entropy"})
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    grad_checkpointing: bool = False
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'"})
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints"})
    task_norm: str = field(default="initial", metadata={
        "help": "'initial': divide the task loss by its mean over the first steps, so lambda_r "
                "does not depend on the loss's units; 'none': the paper's raw loss"})
    nu_signal: str = field(default="normalized", metadata={
        "help": "'normalized': the task part of nu's gradient is divided by its running RMS "
                "over all components before lambda_r's pull is added; 'raw': the paper"})

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, int) and 1 <= self.steps <= 1_000_000, "steps", self.steps,
               "use an integer between 1 and 1,000,000")
        for name in ("lr", "nu_lr"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1, name, v,
                   "use a positive learning rate no larger than 1 (e.g. 5e-5 / 1e-2)")
        for name in ("lambda_r", "lambda_e", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, v,
                   "use a finite value >= 0")
        for name in ("lambda_r", "lambda_e"):  # larger weights overflow the loss to inf
            _check(getattr(self, name) <= MAX_LAMBDA, name, getattr(self, name),
                   f"use a weight in [0, {MAX_LAMBDA:g}] (the paper uses 1e-4)")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool)
               and 0 <= self.seed < 2**64, "seed", self.seed,
               "use an integer between 0 and 2**64 - 1")
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            _check(isinstance(v, int) and 1 <= v <= 4096, name, v, "use an integer >= 1")
        _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
               "checkpoint_every", self.checkpoint_every, "use 0 (off) or a positive integer")
        _check(self.task_norm in ("none", "initial"), "task_norm", self.task_norm,
               "choose 'none' or 'initial'")
        _check(self.nu_signal in ("raw", "normalized"), "nu_signal", self.nu_signal,
               "choose 'raw' or 'normalized'")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision",
               self.mixed_precision, "choose 'no', 'bf16' or 'fp16'")


@dataclass
class ExportConfig:
    """How an adapter becomes a file (method.md §4)."""

    key_style: str = field(default="kohya", metadata={"help": "'kohya', 'comfy' or 'diffusers'"})
    dtype: str = field(default="float32", metadata={"help": "'float32', 'float16', 'bfloat16'"})
    overwrite: bool = False
    rank_tol: float = field(default=0.03, metadata={
        "help": "export each module at the smallest rank whose relative Frobenius error is at "
                "most this (its numerical rank: the SVD of B Lambda A); 0 = the trained rank D"})

    def __post_init__(self) -> None:
        _check(isinstance(self.rank_tol, (int, float)) and 0 <= self.rank_tol < 1, "rank_tol",
               self.rank_tol, "use a relative error in [0, 1), e.g. 0.03")
        _check(self.key_style in KEY_STYLES, "key_style", self.key_style,
               f"choose one of {KEY_STYLES}")
        _check(self.dtype in ("float32", "float16", "bfloat16"), "dtype", self.dtype,
               "choose 'float32', 'float16' or 'bfloat16'")


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The defaults of AdapterConfig / TrainConfig, chosen on the rank-recovery benchmark's
    # development tasks (README: "Does the rank learning work?").
    "spread": {"adapter": {}, "train": {}},
    # The paper's SDXL settings as written (raw nu gradient, random new slots); r_target and
    # init_rank are method.md's defaults, nu's own learning rate is ours (method.md §2).
    "paper": {"adapter": {"r_target": 64, "init_rank": 64, "r_max": 512, "init": "kaiming",
                          "slot_init": "random"},
              "train": {"lr": 5e-5, "nu_lr": 1e-2, "lambda_r": 1e-4, "lambda_e": 1e-4,
                        "nu_signal": "raw", "task_norm": "none"}},
}
DEFAULT_PRESET = "spread"


def preset(name: str = DEFAULT_PRESET, **overrides: Any) -> tuple[AdapterConfig, TrainConfig]:
    """Build validated configs from a named preset; ``overrides`` go to whichever has the field."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: choose one of {sorted(PRESETS)}")
    a_kw, t_kw = dict(PRESETS[name]["adapter"]), dict(PRESETS[name]["train"])
    a_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    t_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in overrides.items():
        if k in a_fields:
            a_kw[k] = v
        elif k in t_fields:
            t_kw[k] = v
        else:
            raise ConfigError(f"{k}={v!r} is not an option: see AdapterConfig / TrainConfig")
    return AdapterConfig(**a_kw), TrainConfig(**t_kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-friendly view of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
