"""Rank reports: per-component rank, parameters and bytes, and pictures of them."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .formats.io import atomic_write_bytes, parse_json_metadata
from .formats.lora_file import LoraFile


@dataclass
class ComponentRow:
    name: str
    rank: int
    params: int
    nu: float | None = None
    rel_error: float | None = None  # ||dW - dW'||_F / ||dW||_F after compression or merging


@dataclass
class RankReport:
    rows: list[ComponentRow]
    bytes_per_param: int = 4
    budget: str | None = None  # the size budget a compressed or merged file was made for
    file_bytes: int | None = None  # the file's size on disk (header and metadata included)
    total_rel_error: float | None = None  # relative Delta W error over the whole file

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def uniform_rank(self) -> float:
        """The single rank that would cost the same number of parameters."""
        per_unit = sum(r.params / max(r.rank, 1) for r in self.rows)
        return self.total_params / per_unit if per_unit else 0.0

    def to_json(self) -> dict:
        ranks = [r.rank for r in self.rows]
        return {"components": [asdict(r) for r in self.rows],
                "total_params": self.total_params,
                "megabytes": self.total_params * self.bytes_per_param / 1e6,
                "mean_rank": sum(ranks) / len(ranks), "min_rank": min(ranks),
                "max_rank": max(ranks), "uniform_rank_same_size": self.uniform_rank,
                "budget": self.budget, "file_bytes": self.file_bytes,
                "total_rel_error": self.total_rel_error}

    @classmethod
    def from_json(cls, data: dict) -> RankReport:
        """The report a ``.rank_report.json`` holds (see :meth:`to_json`)."""
        return cls([ComponentRow(**c) for c in data["components"]],
                   budget=data.get("budget"), file_bytes=data.get("file_bytes"),
                   total_rel_error=data.get("total_rel_error"))

    def summary(self) -> str:
        """The totals (and for compressed or merged files the budget line), a few lines."""
        j = self.to_json()
        lines = [f"total: {len(self.rows)} components, {j['total_params']:,} params, "
                 f"{j['megabytes']:.2f} MB, ranks {j['min_rank']}..{j['max_rank']} "
                 f"(mean {j['mean_rank']:.1f}); same size as uniform rank "
                 f"{j['uniform_rank_same_size']:.1f}"]
        if self.budget is not None or self.total_rel_error is not None:  # compressed/merged
            size = "" if self.file_bytes is None else f"file {self.file_bytes:,} bytes"
            budget = "" if self.budget is None else f"budget {self.budget}"
            err = ("" if self.total_rel_error is None
                   else f"total relative Delta W error {self.total_rel_error:.4f}")
            lines.append("; ".join(x for x in (size, budget, err) if x))
        return "\n".join(lines)

    def table(self, totals: bool = True) -> str:
        """A plain-text table, one line per component, then (``totals``) the summary."""
        w = max(len(r.name) for r in self.rows)
        errors = any(r.rel_error is not None for r in self.rows)
        lines = [f"{'component':<{w}}  rank  {'params':>10}  {'MB':>8}  "
                 + ("rel.error  " if errors else "") + "nu"]
        for r in self.rows:
            nu = "" if r.nu is None else f"{r.nu:.4f}"
            mb = r.params * self.bytes_per_param / 1e6
            err = "" if not errors else ("-" if r.rel_error is None else f"{r.rel_error:.4f}")
            lines.append(f"{r.name:<{w}}  {r.rank:>4}  {r.params:>10,}  {mb:>8.3f}  "
                         + (f"{err:>9}  " if errors else "") + nu)
        return "\n".join(lines + ([self.summary()] if totals else []))


def report_from_file(lora: LoraFile) -> RankReport:
    ours = lora.lora2_modules() or {}
    by_key = {rec.get("key"): (name, rec) for name, rec in ours.items()
              if isinstance(rec, dict)}
    comp = parse_json_metadata(lora.metadata, "lora2.compression", lora.path or "file")
    comp = comp if isinstance(comp, dict) else {}
    errors = comp.get("rel_error") if isinstance(comp.get("rel_error"), dict) else {}
    parts = {k for rec in ours.values() if isinstance(rec, dict)
             and isinstance(rec.get("split"), list) for k, *_ in rec["split"][1:]}
    rows = []
    for key, w in lora.modules.items():
        if key in parts:  # a later part of a fused module stored split: one component
            continue
        name, rec = by_key.get(key, (key, {}))
        m, n = w.up.shape[0], w.down.flatten(1).shape[1]
        if key in by_key and rec.get("split"):
            m = int(rec.get("m", m))  # the fused module's rows (the parts share A)
        rows.append(ComponentRow(name, w.rank, w.rank * (m + n), rec.get("nu"), errors.get(key)))
    # components trained by LoRA2 whose update was zero are not in the file: rank 0, no bytes
    rows += [ComponentRow(name, 0, 0, rec.get("nu")) for name, rec in ours.items()
             if isinstance(rec, dict) and rec.get("rank") == 0 and rec.get("key") not in
             lora.modules]
    bpp = next(iter(lora.modules.values())).down.element_size()
    size = lora.path.stat().st_size if lora.path and Path(lora.path).is_file() else None
    total = comp.get("total_rel_error")
    return RankReport(rows, bpp, _budget_text(comp.get("budget")), size,
                      float(total) if isinstance(total, (int, float)) else None)


def _budget_text(raw) -> str | None:
    from .budget import Budget, BudgetError

    try:
        return Budget(raw["kind"], raw["value"]).describe() if isinstance(raw, dict) else None
    except (BudgetError, KeyError, TypeError):
        return None


def report_bytes(report: RankReport) -> bytes:
    """The report as the JSON file holds it."""
    return json.dumps(report.to_json(), indent=1).encode()


def save_json(report: RankReport, path: str | os.PathLike, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, report_bytes(report), overwrite=overwrite)


# Where a module sits, for any naming (kohya underscores, ComfyUI/LDM, diffusers/PEFT, DiT):
# patterns on the name with every "." turned into "_", first match wins -> (block, rest).
_PREFIXES = re.compile(r"^(lora_unet_|lora_te\d?_|base_model_model_|model_diffusion_model_|"
                       r"diffusion_model_|unet_|transformer_|text_encoder(_2)?_)")
_BLOCKS = [
    (r"(input|output)_blocks_(\d+)_(\d+)_transformer_blocks_(\d+)", "{0}{1}.{2} tb{3}"),
    (r"middle_block_(\d+)_transformer_blocks_(\d+)", "mid.{0} tb{1}"),
    (r"(down|up)_blocks_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)", "{0}{1}.{2} tb{3}"),
    (r"mid_block_attentions_(\d+)_transformer_blocks_(\d+)", "mid.{0} tb{1}"),
    (r"(input|output)_blocks_(\d+)_(\d+)", "{0}{1}.{2}"),
    (r"middle_block_(\d+)", "mid.{0}"),
    (r"(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)",
     "{0}{1} {2}{3}"),
    (r"mid_block_(attentions|resnets)_(\d+)", "mid {0}{1}"),
    (r"text_model_encoder_layers_(\d+)", "te layer {0}"),
    (r"(double_blocks|single_blocks|joint_blocks|single_transformer_blocks|"
     r"transformer_blocks|layers|blocks)_(\d+)", "{0} {1}"),
]
_BLOCKS_RE = [(re.compile("^" + p + "_(.+)$"), f) for p, f in _BLOCKS]
_SHORT = {"input": "in", "output": "out", "double_blocks": "double", "single_blocks": "single",
          "joint_blocks": "joint", "single_transformer_blocks": "single",
          "transformer_blocks": "block", "resnets": "res", "attentions": "attn"}
_KINDS = [("to_out_0", "out"), ("ff_net_0_proj", "ff in"), ("ff_net_2", "ff out"),
          ("attn1_", "self "), ("attn2_", "cross "), ("to_", ""), ("processor_", "")]
_ORDER = ["self q", "self k", "self v", "self out", "cross q", "cross k", "cross v",
          "cross out", "ff in", "ff out"]
MAX_COLUMNS = 24  # kinds beyond these (rare ones) share an "other" column: the map stays small


def block_and_kind(name: str) -> tuple[str, str]:
    """``(block, module kind)`` of a module name in any key style, e.g.
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0`` and
    ``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0`` both give
    ``("in4.1 tb0", "self out")``; Flux ``double_blocks.3.img_attn.qkv`` gives
    ``("double 3", "img attn qkv")``."""
    flat = name.replace(".", "_")
    te = re.match(r"^(lora_te\d?_|text_encoder(_2)?_)", flat)
    flat = _PREFIXES.sub("", flat)
    block, rest = "", flat
    for pattern, fmt in _BLOCKS_RE:
        m = pattern.match(flat)
        if m:
            parts = [_SHORT.get(g, g) for g in m.groups()[:-1]]
            block, rest = fmt.format(*parts), m.groups()[-1]
            break
    else:  # unknown naming: the block is everything up to the last index
        m = re.match(r"^(.*_\d+)_(.+)$", flat)
        block, rest = (m[1].replace("_", "."), m[2]) if m else ("other", flat)
    for old, new in _KINDS:
        rest = rest.replace(old, new)
    kind = rest.replace("_", " ").strip()
    return (f"te {block}" if te and not block.startswith("te") else block), kind


def _natural(text: str) -> list:
    """Sort key: numbers by value (in 10 after in 4), UNet input/down before middle/up."""
    group = {"te": 0, "in": 1, "down": 1, "mid": 2, "out": 3, "up": 3}
    head = re.match(r"^[a-z]+", text)
    return [group.get(head[0] if head else "", 4)] + [
        (0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|\D+", text)]


def rank_map_grid(report: RankReport) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (blocks, in model order), columns (module kinds) and the rank of each cell
    (NaN where a block has no such module; the largest rank where kinds were merged)."""
    cells: dict[str, dict[str, int]] = {}
    count: dict[str, int] = {}
    for r in report.rows:
        block, kind = block_and_kind(r.name)
        cells.setdefault(block, {})
        cells[block][kind] = max(cells[block].get(kind, 0), r.rank)
        count[kind] = count.get(kind, 0) + 1
    kinds = sorted(count, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER),
                                         -count[k], _natural(k)))
    if len(kinds) > MAX_COLUMNS:  # the rarest kinds share one column
        rare = set(kinds[MAX_COLUMNS - 1:])
        kinds = kinds[:MAX_COLUMNS - 1] + ["other"]
        for row in cells.values():
            merged = [row.pop(k) for k in list(row) if k in rare]
            if merged:
                row["other"] = max(merged)
    rows = sorted(cells, key=_natural)
    nan = float("nan")
    return rows, kinds, [[cells[b].get(k, nan) for k in kinds] for b in rows]


def _draw_rank_map(ax, grid: tuple, title: str, max_font: float = 8.0):
    """Draw a :func:`rank_map_grid` on ``ax`` (ranks written in the cells while they stay
    legible); returns the image (for a colour bar)."""
    import numpy as np

    rows, cols, values = grid
    grid = np.array(values, dtype=float).reshape(len(rows), len(cols))
    height = ax.figure.get_size_inches()[1] * ax.get_position().height
    font = max(4.0, min(max_font, 72 * height / max(len(rows), 1) * 0.55))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if len(rows) * len(cols) <= 2000:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="w",
                            fontsize=font)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=min(8.0, max_font))
    ax.set_yticks(range(len(rows)), rows, fontsize=font)
    ax.set_title(title, fontsize=max_font + 2)
    return im


def rank_map_figure(report: RankReport, title: str = "learned rank per component"):
    """A heat map: rows = blocks in model order, columns = module kinds (any LoRA naming);
    the picture stays within 14 x 20 inches however many modules the file has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = rank_map_grid(report)
    rows, cols, _ = grid
    width = min(3.0 + 0.62 * len(cols), 14.0)
    height = min(1.6 + 0.24 * len(rows), 20.0)
    fig, ax = plt.subplots(figsize=(width, height))
    im = _draw_rank_map(ax, grid, title)
    fig.colorbar(im, ax=ax, label="rank", fraction=0.04)
    fig.tight_layout()
    return fig


def contact_sheet_figure(reports: dict[str, RankReport], title: str = "learned ranks",
                         columns: int = 4):
    """The rank maps of several adapters side by side (one panel per adapter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(reports), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    grids = [rank_map_grid(r) for r in reports.values()]
    shape = max(((len(g[0]), len(g[1])) for g in grids), default=(4, 8))
    width = min(cols * (1.0 + 0.5 * shape[1]), 24.0)  # bounded like rank_map_figure
    height = min(rows * (1.4 + 0.2 * shape[0]), 30.0)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width, height))
    for ax, name, grid in zip(axes.flat, reports, grids):
        im = _draw_rank_map(ax, grid, name, max_font=6.0)
        fig.colorbar(im, ax=ax, fraction=0.05)
    for ax in list(axes.flat)[len(reports):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_figure(history: list[dict], title: str = "training loss"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    task = [h.get("task", h["loss"]) for h in history]  # what the CLI prints, without the
    ax.plot(steps, task, lw=0.8, alpha=0.5, label="task loss")  # regulariser terms
    if len(history) >= 5:
        k = max(len(history) // 20, 2)
        ema, sm = None, []
        for v in task:
            ema = v if ema is None else ema + (v - ema) / k
            sm.append(ema)
        ax.plot(steps, sm, lw=1.5, label="smoothed")
    ax2 = ax.twinx()
    ax2.plot(steps, [h.get("mean_rank", 0) for h in history], color="C3", lw=1, label="mean rank")
    ax2.set_ylabel("mean rank", color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("task loss (MSE)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, figure_png(fig), overwrite=overwrite)
