"""PNG outputs of a run: reconstruction grids, the loss curve and the evaluation curve."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reconstruction_grid(
    rec: dict[str, torch.Tensor], path: str | Path, title: str = ""
) -> Path:
    """One row per image: original | masked | prediction (visible patches pasted back)."""
    plt = _pyplot()
    cols = [("original", "original"), ("masked", "masked input"), ("pasted", "reconstruction")]
    n = rec["original"].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for r in range(n):
        for c, (key, label) in enumerate(cols):
            img = rec[key][r].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / n if title else 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_loss_curve(metrics_file: str | Path, path: str | Path,
                    lr: Callable[[int], float] | None = None) -> Path | None:  # fmt: skip
    """Training loss (and lr) against the step, from a ``metrics.jsonl``; None if it has none.
    ``lr``: the schedule (step -> lr), drawn at every step (else the records' lr, which each
    give the lr of their last step only)."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r and "lr" in r]
    for r in rows:  # a record of skipped (non-finite) steps only: no loss, a gap in the curve
        r["loss"] = float("nan") if r["loss"] is None else r["loss"]
    if not rows:
        return None
    plt = _pyplot()
    steps = np.array([r["step"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reconstruction loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    # step s (a record's "step": s updates done) was taken at the lr of schedule(s - 1)
    lr_steps = np.arange(1, int(steps[-1]) + 1) if lr is not None else steps
    lrs = [lr(int(s) - 1) for s in lr_steps] if lr is not None else [r["lr"] for r in rows]
    ax2.plot(lr_steps, lrs, color="tab:gray", alpha=0.5, lw=1,
             label="learning rate (right axis)")  # fmt: skip
    ax2.set_ylabel("learning rate", color="tab:gray")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_evaluation_curve(metrics_file: str | Path, out: str | Path,
                          keys: dict[str, str]) -> tuple[Path, Path | None]:  # fmt: skip
    """Every evaluation of a run so far, from its ``metrics.jsonl``: ``evaluation.md`` (a table
    of the metrics ``keys`` names, record key -> label, with the latest training loss recorded
    by that step) and ``evaluation.png`` (each metric against the step, the loss on a second
    axis; None while no metric has a value). Returns both paths."""
    from .checkpoint import write_text_atomic

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    evals = [r for r in rows if any(k in r for k in keys)]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r and "lr" in r}
    out = Path(out)

    def cell(v) -> str:
        return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| step | epoch | " + " | ".join(keys.values()) + " | train loss |",
             "|---" * (len(keys) + 3) + "|"]  # fmt: skip
    loss_steps = sorted(losses)
    for r in evals:
        i = bisect.bisect_right(loss_steps, r["step"])  # the last loss record at or before it
        loss = losses[loss_steps[i - 1]] if i else None
        lines.append(f"| {r['step']} | {r['epoch']:g} | "
                     + " | ".join(cell(r.get(k)) for k in keys)
                     + f" | {'n/a' if loss is None else f'{loss:.4f}'} |")  # fmt: skip
    md = out / "evaluation.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    series = {k: [(r["step"], r[k]) for r in evals if r.get(k) is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return md, None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, label=keys[key])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("evaluation metric")
    ax.grid(alpha=0.3)
    if losses:
        ax2 = ax.twinx()
        steps = sorted(losses)
        ax2.plot(steps, [losses[s] for s in steps], color="tab:gray", alpha=0.5, lw=1,
                 label="train loss (right axis)")  # fmt: skip
        ax2.set_ylabel("train loss", color="tab:gray")
        handles = ax.get_lines() + ax2.get_lines()
    else:
        handles = ax.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    ax.set_title(f"evaluations of {out.name}", fontsize=10)
    fig.tight_layout()
    return md, save_figure_atomic(fig, out / "evaluation.png", dpi=110)


def save_figure_atomic(fig, path: Path, dpi: int) -> Path:
    """Save and close ``fig`` through a temporary file, so a reader (a watcher redrawing after
    every evaluation) never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def distinct_colors(n: int) -> np.ndarray:
    """``n`` RGB colours (uint8) that tell apart on a photo: matplotlib's qualitative maps, the
    strongest first (tab10, Set1, Dark2, then tab20b / tab20c: 56), then repeated."""
    plt = _pyplot()
    maps = ("tab10", "Set1", "Dark2", "tab20b", "tab20c")
    table = np.concatenate([np.asarray(plt.get_cmap(m).colors)[:, :3] for m in maps])
    return (np.asarray(table)[np.arange(n) % len(table)] * 255).round().astype(np.uint8)


def save_panels(path: str | Path, panels: list[tuple[str, np.ndarray]], *, title: str = "",
                legend: list[tuple[str, np.ndarray]] = ()) -> Path:  # fmt: skip
    """Images (H, W, 3 uint8) side by side with their titles, and a legend of colours (a
    class name and its RGB colour) below."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    h, w = panels[0][1].shape[:2]
    size = 4.0 / max(h, w)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * w * size + 0.2, h * size + 0.8 +
                                      0.25 * ((len(legend) + 3) // 4)))  # fmt: skip
    for ax, (label, img) in zip(axes[0], panels, strict=True):
        ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if legend:
        handles = [Patch(color=np.asarray(c) / 255, label=name) for name, c in legend]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                   frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=9)
    rows = (len(legend) + 3) // 4
    fig.tight_layout(rect=(0, 0.06 * rows if legend else 0, 1, 0.95 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
