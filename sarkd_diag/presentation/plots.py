"""PNG figures a person opens: a run's panels, the fp16 headroom map, and the comparison's curves per mode.

`write_run_plots` (called when a run is closed) draws the run's figure, `loss_curves.png`: training and
evaluation loss, learning rate, gradient norm, loss scale (only when the run scaled the loss), lost-update
fraction and the update-to-weight ratio, one panel each, and the `fp16_headroom.png` map from
activations.jsonl. `plot_loss_curves` and `plot_loss_scale` draw one line per mode for compare-precision.

A value can be missing (not measured at that step: absent or null in metrics.jsonl) or measured as
non-finite (NaN or Infinity). A missing value is simply not drawn; a non-finite one cannot sit on a log
axis, so it is marked with a red × along the top edge of its panel at its step instead of silently
vanishing from the line.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from ..contract.numerics import EXTREME_UPDATE_RATIO, FP16_MAX, reading_or_none  # noqa: E402

SIZE_INCHES, DPI = (10, 6), 100  # 1000 × 600 pixels
RUN_FIGURE = "loss_curves.png"
LOSS_SCALE_FIGURE = "loss_scale.png"
HEADROOM_FIGURE = "fp16_headroom.png"
RUN_FIGURES = (RUN_FIGURE, LOSS_SCALE_FIGURE, HEADROOM_FIGURE)  # all a run's figures; each closing draws some
NONFINITE_COLOUR, OVERFLOW_COLOUR, MISSING_COLOUR = "black", "#e8168b", "#f2f2f2"
MAX_LABELS = 40  # axis labels of the headroom map: beyond this, every k-th
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 10.6, not 1.06×10¹, when the range is narrow


def _grid_in_inches(fig, rows: int, columns: int, *, left: float, right: float, top: float, bottom: float,
                    row_gap: float = 0.0, column_gap: float = 0.0, height_ratios: list[float] | None = None):
    """A grid of panels with its margins and gaps in inches, room measured once for the labels the panels carry
    (tick labels, axis labels, titles). `tight_layout` measures it again on every figure by drawing the figure an
    extra time: a third of the time a run spends writing its figures when it closes."""
    width, height = fig.get_size_inches()
    panel_width = (width - left - right - column_gap * (columns - 1)) / columns
    panel_height = (height - top - bottom - row_gap * (rows - 1)) / rows
    return fig.add_gridspec(rows, columns, height_ratios=height_ratios, left=left / width, right=1 - right / width,
                            top=1 - top / height, bottom=bottom / height, wspace=column_gap / panel_width,
                            hspace=row_gap / panel_height)


# ------------------------------------------------------------------------------ comparison (one line per mode)
def _train_rows(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in metrics or "split" not in metrics:
        return metrics.iloc[0:0]
    rows = metrics[metrics["split"] == "train"]
    return rows[["step", column]].dropna(subset=["step"])


def _plot(series: dict[str, pd.DataFrame], column: str, title: str, ylabel: str, path: Path, empty_note: str,
          marks: str | None = None) -> Path:
    fig = plt.figure(figsize=SIZE_INCHES, dpi=DPI)
    ax = fig.add_subplot(_grid_in_inches(fig, 1, 1, left=0.9, right=0.25, top=0.45, bottom=0.6)[0, 0])
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
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
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


# -------------------------------------------------------------------------------------- a run's figure
def _series(rows: list[dict], column: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of the rows of `split` that recorded `column` (measured NaN/Inf included, missing left out)."""
    steps, values = [], []
    for row in rows:
        if row.get("split") != split or row.get("step") is None:
            continue
        value = reading_or_none(row.get(column))
        if value is not None:
            steps.append(float(row["step"]))
            values.append(value)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _rows_of(metrics: pd.DataFrame) -> list[dict]:
    """Rows of a metrics frame with what is NaN in the frame taken as missing (a frame cannot tell them apart)."""
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in metrics.astype(object).to_dict("records")]


def _draw(ax, steps: np.ndarray, values: np.ndarray, label: str, log: bool, colour=None, row: int = 0,
          **style) -> bool:
    """The finite points as a line; non-finite ones as red × on the top edge (a second series of the panel,
    `row` 1, a little lower as a bold ✕); on a log axis, values ≤ 0 as a grey ▾ on the bottom edge. Whether
    anything was recorded."""
    finite = np.isfinite(values)
    drawable = finite & (values > 0) if log else finite
    if drawable.any():
        ax.plot(steps[drawable], values[drawable], label=label, color=colour, linewidth=1.4,
                marker="o" if drawable.sum() <= 60 else None, markersize=3, **style)
    bad = ~finite
    if bad.any():  # y in axes coordinates: the top edge, whatever the data's range
        ax.plot(steps[bad], np.full(bad.sum(), 0.96 - 0.08 * row), "xX"[row], color="red", markersize=8, mew=2,
                transform=ax.get_xaxis_transform(), label=f"{label}: non-finite", clip_on=False)
    zero = finite & (values <= 0) if log else np.zeros_like(finite)
    if zero.any():
        ax.plot(steps[zero], np.full(zero.sum(), 0.03), "v", color="grey", markersize=6,
                transform=ax.get_xaxis_transform(), label=f"{label}: 0")
    return bool(len(values))


def _threshold(ax, value: float, text: str) -> None:
    ax.axhline(value, color="tab:red", linestyle="--", linewidth=1)
    ax.text(0.99, value, f" {text}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            color="tab:red", fontsize="small")


def _log_axis(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PLAIN)


def _panel_loss(ax, rows: list[dict]) -> bool:
    drawn = _draw(ax, *_series(rows, "loss"), "training loss", log=True, colour="tab:blue")
    sets = list(dict.fromkeys(row.get("eval_set") for row in rows if row.get("split") == "eval"))
    colours = itertools.cycle(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"])
    for name, colour in zip(sets, colours, strict=False):  # one line per evaluation set: theirs are not one curve
        of_set = [row for row in rows if row.get("eval_set") == name]
        drawn |= _draw(ax, *_series(of_set, "eval_loss", "eval"),
                       "evaluation loss" + (f" ({name})" if name is not None else ""), log=True, colour=colour,
                       row=1, linestyle="--")
    _log_axis(ax)
    ax.yaxis.set_minor_formatter(_PLAIN)
    ax.set(title="training and evaluation loss", ylabel="loss (log)")
    return drawn


def _panel_lr(ax, rows: list[dict]) -> bool:
    drawn = _draw(ax, *_series(rows, "lr"), "learning rate", log=False, colour="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set(title="learning rate", ylabel="lr")
    return drawn


def _panel_grad_norm(ax, rows: list[dict]) -> bool:
    drawn = _draw(ax, *_series(rows, "grad_norm"), "gradient norm", log=True, colour="tab:purple")
    _log_axis(ax)
    ax.set(title="gradient norm (unscaled, before clipping)", ylabel="‖g‖ (log)")
    return drawn


def _panel_loss_scale(ax, rows: list[dict]) -> bool:
    steps, values = _series(rows, "loss_scale")
    drawn = _draw(ax, steps, values, "loss scale", log=True, colour="tab:brown")
    skipped = [float(r["step"]) for r in rows
               if r.get("split") == "train" and (reading_or_none(r.get("skipped")) or 0) > 0]
    if skipped:
        ax.plot(skipped, np.full(len(skipped), 0.03), "v", color="tab:red", markersize=6,
                transform=ax.get_xaxis_transform(), label="skipped step")
    _log_axis(ax)
    ax.set(title="dynamic loss scale", ylabel="scale (log)")
    return drawn


def _panel_lost_updates(ax, rows: list[dict]) -> bool:
    from ..contract.numerics import LOST_UPDATE_WARNING

    drawn = _draw(ax, *_series(rows, "lost_update_fraction"), "lost-update fraction", log=False, colour="tab:cyan")
    _threshold(ax, LOST_UPDATE_WARNING, f"warning {LOST_UPDATE_WARNING:.0%}")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set(title="lost updates (intended changes rounded away; statistics steps)", ylabel="fraction")
    return drawn


def _panel_update_ratio(ax, rows: list[dict]) -> bool:
    drawn = _draw(ax, *_series(rows, "update_ratio"), "‖Δw‖/‖w‖", log=True, colour="tab:olive")
    _threshold(ax, EXTREME_UPDATE_RATIO, f"extreme ({EXTREME_UPDATE_RATIO:g})")
    _log_axis(ax)
    ax.set(title="update-to-weight ratio ‖Δw‖/‖w‖ (healthy ≈ 1e-3)", ylabel="ratio (log)")
    return drawn


def _has_finite(rows: list[dict], column: str) -> bool:
    return any((v := reading_or_none(r.get(column))) is not None and math.isfinite(v) for r in rows)


def run_figure(rows: list[dict], title: str = "run"):
    """The run's panels from its metrics rows (metrics.jsonl's records); a matplotlib Figure."""
    panels = [_panel_lr, _panel_grad_norm]
    if _has_finite(rows, "loss_scale"):
        panels.append(_panel_loss_scale)
    panels += [_panel_lost_updates, _panel_update_ratio]
    pairs = math.ceil(len(panels) / 2)
    fig = plt.figure(figsize=(13, 3.6 + 3.0 * pairs), dpi=DPI)
    grid = _grid_in_inches(fig, 1 + pairs, 2, height_ratios=[1.25] + [1] * pairs, left=0.95, right=0.2, top=0.75,
                           bottom=0.55, row_gap=0.85, column_gap=1.05)
    axes = [fig.add_subplot(grid[0, :])]
    for i in range(len(panels)):
        last_alone = i == len(panels) - 1 and len(panels) % 2
        axes.append(fig.add_subplot(grid[1 + i // 2, :] if last_alone else grid[1 + i // 2, i % 2], sharex=axes[0]))
    for ax, panel in zip(axes, [_panel_loss, *panels], strict=True):
        if not panel(ax, rows):
            ax.text(0.5, 0.5, "not recorded by this run", ha="center", va="center", transform=ax.transAxes,
                    color="grey", fontsize=11)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=14, y=1 - 0.1 / fig.get_figheight(), va="top")
    return fig


def _metrics_rows(run_dir: Path, metrics: pd.DataFrame | None) -> list[dict]:
    from ..contract.events import read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        return read_jsonl(path)
    return _rows_of(metrics) if metrics is not None else []


# ---------------------------------------------------------------------------------- the fp16 headroom map
def _forward_order(frame: pd.DataFrame) -> list[str]:
    """Modules in the order the file lists them for a step (the forward order), modules first seen later after."""
    order: dict[str, None] = {}
    for _, group in frame.groupby("step", sort=True):
        for name in group["module"]:
            order.setdefault(name, None)
    return list(order)


def _common_prefix(names: Iterable[str]) -> str:
    """The longest dotted prefix nearly all names share (`model.`, `transformer.`: at least 90% of them)."""
    names = list(names)
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    shared = [p for p, n in counts.items() if n >= max(2, math.ceil(0.9 * len(names)))]
    return max(shared, key=len, default="")


def short_module_names(names: list[str], width: int = 38) -> tuple[list[str], str]:
    """Labels for module names: the common prefix dropped (returned too), and middles of long names cut with …."""
    prefix = _common_prefix(names)
    out = []
    for name in names:
        label = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if len(label) > width:
            keep = width - 1
            label = label[: keep // 2] + "…" + label[-(keep - keep // 2):]
        out.append(label)
    return out, prefix


def _every(n: int, limit: int = MAX_LABELS) -> int:
    return max(1, math.ceil(n / limit))


def _grid(part: pd.DataFrame) -> tuple[list[str], list, np.ndarray, np.ndarray]:
    """Modules (forward order), steps, the fractions (module × step; NaN where not recorded or not finite) and
    which cells were recorded."""
    modules = _forward_order(part)
    steps = sorted(part["step"].unique())
    index = {(m, s): v for m, s, v in zip(part["module"], part["step"], part["fraction"], strict=True)}
    values = np.array([[index.get((m, s), np.nan) for s in steps] for m in modules], dtype=float)
    recorded = np.array([[(m, s) in index for s in steps] for m in modules], dtype=bool)
    return modules, steps, values, recorded


def headroom_figure(activations: pd.DataFrame, title: str = "fp16 headroom"):
    """Module × statistics step, each cell the module's largest output over fp16's largest value, log colour;
    one panel per model (student first). Cells beyond 1 (an fp16 overflow), non-finite cells and cells not
    recorded are coloured apart. The layout is in inches: module labels get the room they need."""
    frame = activations.dropna(subset=["step"]).copy()
    frame["fraction"] = pd.to_numeric(frame["amax"], errors="coerce").astype(float) / FP16_MAX
    models = sorted(frame["model"].dropna().unique(), key=lambda m: ({"student": 0, "teacher": 1}.get(m, 2), str(m)))
    finite = frame["fraction"][np.isfinite(frame["fraction"]) & (frame["fraction"] > 0)]
    low = min(10 ** math.floor(math.log10(finite.min())), 1e-3) if len(finite) else 1e-6
    norm = LogNorm(vmin=low, vmax=1.0)
    cmap = plt.get_cmap("viridis").with_extremes(over=OVERFLOW_COLOUR, bad=MISSING_COLOUR)
    panels = []
    for model in models:
        part = frame[frame["model"] == model]
        modules, steps, values, recorded = _grid(part)
        labels, prefix = short_module_names(modules)
        panels.append((model, part, modules, steps, values, recorded, labels, prefix))
    rows = max((len(p[2]) for p in panels), default=1)
    label_in = [0.75 + 0.066 * max((len(x) for x in p[6]), default=4) for p in panels] or [1.0]
    panel_in, bar_in, top_in, bottom_in = 6.0 if len(panels) > 1 else 7.0, 1.3, 1.2, 0.75
    height = min(16.0, max(5.0, 0.2 * rows + top_in + bottom_in))
    width = sum(label_in) + panel_in * max(1, len(panels)) + bar_in + 0.2
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    x, image = 0.0, None
    for (model, part, modules, steps, values, recorded, labels, prefix), left in zip(panels, label_in, strict=False):
        x += left
        ax = fig.add_axes([x / width, bottom_in / height, panel_in / width, 1 - (top_in + bottom_in) / height])
        x += panel_in
        nonfinite = recorded & ~np.isfinite(values)
        shown = np.where(np.isfinite(values), np.maximum(values, low), np.nan)  # 0 sits at the floor
        image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        if nonfinite.any():
            ax.imshow(np.ma.masked_where(~nonfinite, np.ones_like(values)), aspect="auto", interpolation="nearest",
                      cmap=matplotlib.colors.ListedColormap([NONFINITE_COLOUR]), vmin=0, vmax=1)
            ys, xs = np.nonzero(nonfinite)
            if len(xs) <= 400:
                ax.plot(xs, ys, "x", color="white", markersize=4, mew=1)
        k = _every(len(modules))
        ax.set_yticks(range(0, len(modules), k), labels[::k], fontsize=8, family="monospace")
        kx = _every(len(steps), 12)
        ax.set_xticks(range(0, len(steps), kx), [str(int(s)) for s in steps[::kx]], fontsize=8)
        if len(steps) <= 60 and len(modules) <= 80:  # cell borders, while cells are large enough to need them
            # two line collections, not minor ticks: a tick per border is an artist of its own, half of the
            # time a run's closing spent drawing
            ax.hlines(np.arange(0.5, len(modules) - 1), -0.5, len(steps) - 0.5, color="white", linewidth=0.4)
            ax.vlines(np.arange(0.5, len(steps) - 1), -0.5, len(modules) - 0.5, color="white", linewidth=0.4)
        dtypes = ", ".join(sorted(str(d) for d in part["dtype"].dropna().unique())) or "?"
        peak = part["fraction"][np.isfinite(part["fraction"])].max()
        notes = [f"peak {peak:.2g}" if math.isfinite(peak) else "no finite reading"]
        over = part[np.isfinite(part["fraction"]) & (part["fraction"] > 1)]
        if len(over):
            notes.append(f"beyond fp16 from step {int(over['step'].min())}")
        if nonfinite.any():
            notes.append(f"non-finite from step {int(steps[int(np.nonzero(nonfinite.any(axis=0))[0][0])])}")
        ax.set_title(f"{model} ({dtypes}): " + "; ".join(notes), fontsize=10)
        ax.set_xlabel("statistics step")
        ax.set_ylabel("module, forward order" + (f" ('{prefix}' dropped)" if prefix else "")
                      + (f"; every {k}th labelled" if k > 1 else ""), fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, extend="max", cax=fig.add_axes(
            [(x + 0.3) / width, bottom_in / height, 0.18 / width, 1 - (top_in + bottom_in) / height]))
        bar.set_label(f"largest |output| / fp16 max ({FP16_MAX:g}), log scale")
    else:
        fig.text(0.5, 0.5, "no activations recorded", ha="center", va="center", fontsize=12)
    legend = [Patch(color=OVERFLOW_COLOUR, label="> 1: overflows fp16"),
              Patch(color=NONFINITE_COLOUR, label="NaN / Inf"),
              Patch(facecolor=MISSING_COLOUR, edgecolor="grey", label="not recorded")]
    fig.text(0.1 / width, 1 - 0.1 / height, title, fontsize=12, va="top")
    fig.legend(handles=legend, loc="upper left", bbox_to_anchor=(0.05 / width, 1 - 0.38 / height), ncol=3,
               fontsize="small", frameon=False)
    return fig


def plot_fp16_headroom(activations: pd.DataFrame, path: str | Path, title: str = "fp16 headroom") -> Path:
    fig = headroom_figure(activations, title)
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------ a run's files
def write_run_plots(run_dir: str | Path, metrics: pd.DataFrame | None = None, label: str = "run",
                    activations: pd.DataFrame | None = None, into: str | Path | None = None) -> list[Path]:
    """A run's own figures, drawn into `into` (default: the run directory): loss_curves.png (the run's panels)
    always; loss_scale.png when the run scaled the loss; fp16_headroom.png when it recorded activations."""
    run_dir = Path(run_dir)
    into = Path(into or run_dir)
    rows = _metrics_rows(run_dir, metrics)
    fig = run_figure(rows, label if run_dir.name == label else f"{label} — {run_dir.name}")
    fig.savefig(into / RUN_FIGURE, format="png")
    plt.close(fig)
    paths = [into / RUN_FIGURE]
    if metrics is not None and has_loss_scale(metrics):
        paths.append(plot_loss_scale({label: metrics}, into / LOSS_SCALE_FIGURE, f"loss scale — {label}"))
    if activations is not None and len(activations):
        paths.append(plot_fp16_headroom(activations, into / HEADROOM_FIGURE, "fp16 headroom: each module's largest "
                                        f"output as a fraction of fp16's range — {label}"))
    return paths
