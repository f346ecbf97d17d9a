"""Configuration as data: one dataclass per concern, validated once in ``__post_init__``.

Defaults follow ``method.md``; the paper's own settings are the ``"paper"`` preset and the
benchmark-backed ``"spread"`` preset lets ranks differ more (see README, rank recovery).
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
MAX_LAMBDA = 1e3  # regulariser weights above this only drown the task loss (or overflow it)


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")


@dataclass
class AdapterConfig:
    """How each adaptive component is shaped and initialised (method.md §1)."""

    r_target: float = field(default=64, metadata={"help": "rank the regulariser pulls toward"})
    init_rank: int = field(default=64, metadata={"help": "rank at step 0 (nu_init)"})
    r_max: int = field(default=512, metadata={"help": "largest rank a component may grow to"})
    q: float = field(default=0.9, metadata={"help": "mass of f kept by the D active slots"})
    renormalize: bool = field(default=True, metadata={"help": "f sums to 1 over D slots (AWN)"})
    init: str = field(default="kaiming", metadata={"help": "'kaiming' (default) or 'paper'"})
    random_new_b: bool = field(default=False, metadata={"help": "paper: new B columns random"})
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
        _check(len(self.targets) > 0, "targets", self.targets, "name at least one module suffix")


@dataclass
class TrainConfig:
    """The training loop and the objective's weights (method.md §2, Eq. 11-14)."""

    steps: int = 500
    lr: float = 5e-5
    nu_lr: float = field(default=1e-2, metadata={"help": "nu's own Adam learning rate"})
    lambda_r: float = field(default=1e-4, metadata={"help": "weight of sum |nu - nu_target|"})
    lambda_e: float = field(default=1e-4, metadata={"help": "weight of cross-attn entropy"})
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    grad_checkpointing: bool = False
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'"})
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints"})

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
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision",
               self.mixed_precision, "choose 'no', 'bf16' or 'fp16'")


@dataclass
class ExportConfig:
    """How an adapter becomes a file (method.md §4)."""

    key_style: str = field(default="kohya", metadata={"help": "'kohya', 'comfy' or 'diffusers'"})
    dtype: str = field(default="float32", metadata={"help": "'float32', 'float16', 'bfloat16'"})
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.key_style in KEY_STYLES, "key_style", self.key_style,
               f"choose one of {KEY_STYLES}")
        _check(self.dtype in ("float32", "float16", "bfloat16"), "dtype", self.dtype,
               "choose 'float32', 'float16' or 'bfloat16'")


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's SDXL settings; r_target/init_rank/r_max are method.md's defaults.
    "paper": {"adapter": {"r_target": 64, "init_rank": 64, "r_max": 512, "init": "kaiming"},
              "train": {"lr": 5e-5, "nu_lr": 1e-2, "lambda_r": 1e-4, "lambda_e": 1e-4}},
    # Low r_target with a moderate lambda_r lets ranks spread (method.md §1, bench/).
    "spread": {"adapter": {"r_target": 1, "init_rank": 8, "r_max": 512, "init": "kaiming"},
               "train": {"lr": 1e-4, "nu_lr": 1e-2, "lambda_r": 3e-4, "lambda_e": 1e-4}},
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
