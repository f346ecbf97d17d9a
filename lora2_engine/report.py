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
        return cls([ComponentRow(**c) for c in data["components"]])

    def table(self) -> str:
        """A plain-text table, one line per component, then totals."""
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
        j = self.to_json()
        lines.append(f"total: {len(self.rows)} components, {j['total_params']:,} params, "
                     f"{j['megabytes']:.2f} MB, ranks {j['min_rank']}..{j['max_rank']} "
                     f"(mean {j['mean_rank']:.1f}); same size as uniform rank "
                     f"{j['uniform_rank_same_size']:.1f}")
        if self.budget is not None or self.total_rel_error is not None:  # compressed/merged
            size = "" if self.file_bytes is None else f"file {self.file_bytes:,} bytes"
            budget = "" if self.budget is None else f"budget {self.budget}"
            err = ("" if self.total_rel_error is None
                   else f"total relative Delta W error {self.total_rel_error:.4f}")
            lines.append("; ".join(x for x in (size, budget, err) if x))
        return "\n".join(lines)


def report_from_file(lora: LoraFile) -> RankReport:
    ours = lora.lora2_modules() or {}
    by_key = {rec.get("key"): (name, rec) for name, rec in ours.items()
              if isinstance(rec, dict)}
    comp = parse_json_metadata(lora.metadata, "lora2.compression", lora.path or "file")
    comp = comp if isinstance(comp, dict) else {}
    errors = comp.get("rel_error") if isinstance(comp.get("rel_error"), dict) else {}
    rows = []
    for key, w in lora.modules.items():
        name, rec = by_key.get(key, (key, {}))
        m, n = w.up.shape[0], w.down.flatten(1).shape[1]
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


_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks)"
                    r"[._](\d+)?.*?transformer_blocks[._](\d+)[._](attn[12])[._](to_\w+)")


def _rank_grid(report: RankReport):
    """Rows = transformer blocks, columns = q/k/v/out of self- and cross-attn (NaN: none)."""
    import numpy as np

    cols = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")]
    blocks: dict[str, dict[str, int]] = {}
    for r in report.rows:
        m = _BLOCK.search(r.name)
        block = f"{m[1]}.{m[2] or 0} tb{m[3]}" if m else r.name.rsplit(".", 2)[0]
        col = f"{m[4]}.{m[5]}" if m else r.name.rsplit(".", 1)[-1]
        blocks.setdefault(block, {})[col] = r.rank
        if col not in cols:
            cols.append(col)
    names = list(blocks)
    grid = np.full((len(names), len(cols)), np.nan)
    for i, b in enumerate(names):
        for j, c in enumerate(cols):
            grid[i, j] = blocks[b].get(c, np.nan)
    return names, cols, grid


def _draw_rank_map(ax, report: RankReport, title: str, small: bool = False):
    import numpy as np

    names, cols, grid = _rank_grid(report)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i in range(len(names)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="w",
                        fontsize=5 if small else 7)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=6 if small else 8)
    ax.set_yticks(range(len(names)), names, fontsize=5 if small else 7)
    ax.set_title(title, fontsize=9 if small else 10)
    return im, len(names), len(cols)


def rank_map_figure(report: RankReport, title: str = "learned rank per component"):
    """A heat map: rows = transformer blocks, columns = q/k/v/out of self- and cross-attn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, cols, _ = _rank_grid(report)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.2 + 0.32 * len(names)))
    im, _, _ = _draw_rank_map(ax, report, title)
    fig.colorbar(im, ax=ax, label="rank")
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
    shape = max((_rank_grid(r)[2].shape for r in reports.values()), default=(4, 8))
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(cols * (1.0 + 0.6 * shape[1]),
                                      rows * (1.4 + 0.25 * shape[0])))
    for ax, (name, rep) in zip(axes.flat, reports.items()):
        im, _, _ = _draw_rank_map(ax, rep, name, small=True)
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
    ax.plot(steps, [h["loss"] for h in history], lw=0.8, alpha=0.5, label="loss")
    if len(history) >= 5:
        k = max(len(history) // 20, 2)
        ema, sm = None, []
        for h in history:
            ema = h["loss"] if ema is None else ema + (h["loss"] - ema) / k
            sm.append(ema)
        ax.plot(steps, sm, lw=1.5, label="smoothed")
    ax2 = ax.twinx()
    ax2.plot(steps, [h.get("mean_rank", 0) for h in history], color="C3", lw=1, label="mean rank")
    ax2.set_ylabel("mean rank", color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
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
