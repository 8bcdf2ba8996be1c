"""PNG plots a person opens: the training loss and the loss scale over steps, one line per run or mode.

The same two functions draw a single run (`write_run_plots`, called when a run is closed) and a
comparison (one series per mode). Non-finite points cannot sit on a log axis, so they are marked with a
red × along the top edge at their step instead of silently vanishing from the line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

SIZE_INCHES, DPI = (10, 6), 100  # 1000 × 600 pixels


def _train_rows(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in metrics or "split" not in metrics:
        return metrics.iloc[0:0]
    rows = metrics[metrics["split"] == "train"]
    return rows[["step", column]].dropna(subset=["step"])


def _plot(series: dict[str, pd.DataFrame], column: str, title: str, ylabel: str, path: Path, empty_note: str,
          marks: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    drawn = False
    for label, metrics in series.items():
        rows = _train_rows(metrics, column)
        values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
        steps = rows["step"].to_numpy(dtype=float)
        good = np.isfinite(values) & (values > 0)
        if not len(values):
            continue
        line, = ax.plot(steps[good], values[good], label=label, linewidth=1.5, marker="o", markersize=3)
        drawn = True
        bad = ~np.isfinite(values)
        if bad.any():  # y in axes coordinates: the top edge, whatever the data's range
            ax.plot(steps[bad], np.full(bad.sum(), 0.97), "x", color="red", markersize=8,
                    transform=ax.get_xaxis_transform(), label=f"{label}: non-finite")
        if marks and marks in metrics:
            flagged = metrics.loc[(metrics["split"] == "train") & (pd.to_numeric(metrics[marks], errors="coerce")
                                                                   > 0), ["step", column]]
            if len(flagged):
                ax.plot(flagged["step"], flagged[column], "v", color=line.get_color(), markersize=7,
                        label=f"{label}: skipped step")
    if drawn and ax.has_data():
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 10.6, not 1.06×10¹, when the range is narrow
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def plot_loss_curves(series: dict[str, pd.DataFrame], path: str | Path, title: str = "training loss") -> Path:
    """Training loss per step of each metrics frame in `series` (label → metrics), log scale."""
    return _plot(series, "loss", title, "training loss (log scale)", Path(path), "no training steps recorded")


def plot_loss_scale(series: dict[str, pd.DataFrame], path: str | Path, title: str = "dynamic loss scale") -> Path:
    """The loss scaler's scale per step (skipped steps marked); a note when no run used loss scaling."""
    scaled = {label: metrics for label, metrics in series.items() if has_loss_scale(metrics)}
    return _plot(scaled, "loss_scale", title, "loss scale (log scale)", Path(path),
                 "no loss scaling: only `mixed` (fp16 autocast) uses a dynamic loss scale", marks="skipped")


def has_loss_scale(metrics: pd.DataFrame) -> bool:
    return "loss_scale" in metrics and pd.to_numeric(metrics["loss_scale"], errors="coerce").notna().any()


def write_run_plots(run_dir: str | Path, metrics: pd.DataFrame, label: str = "run") -> list[Path]:
    """A run's own plots: loss_curves.png always, loss_scale.png when the run used loss scaling."""
    run_dir = Path(run_dir)
    paths = [plot_loss_curves({label: metrics}, run_dir / "loss_curves.png", f"training loss — {label}")]
    if has_loss_scale(metrics):
        paths.append(plot_loss_scale({label: metrics}, run_dir / "loss_scale.png", f"loss scale — {label}"))
    return paths
