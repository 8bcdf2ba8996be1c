"""Plots are real PNG images a person can open, at least 640 × 400, whatever the data looks like."""

import math

import pandas as pd
from images import png_size

from sarkd_diag.plots import plot_loss_curves, plot_loss_scale, write_run_plots


def metrics(losses, scales=None, skipped=None):
    rows = [{"step": i + 1, "split": "train", "loss": v, "loss_scale": scales[i] if scales else None,
             "skipped": skipped[i] if skipped else 0} for i, v in enumerate(losses)]
    return pd.DataFrame(rows + [{"step": len(losses), "split": "eval", "eval_ppl": 12.0}])


def test_loss_curves_with_non_finite_points(tmp_path):
    series = {"fp32": metrics([5.0, 4.0, 3.5]), "pure-fp16": metrics([5.0, math.nan, math.inf])}
    path = plot_loss_curves(series, tmp_path / "loss.png")
    width, height = png_size(path)
    assert width >= 640 and height >= 400


def test_loss_scale_with_skips_and_without_any_scaler(tmp_path):
    scaled = metrics([5.0, 4.0, 3.0], scales=[65536.0, 32768.0, 32768.0], skipped=[0, 1, 0])
    assert min(png_size(plot_loss_scale({"mixed": scaled}, tmp_path / "a.png"))) >= 400
    assert min(png_size(plot_loss_scale({"fp32": metrics([5.0])}, tmp_path / "b.png"))) >= 400


def test_empty_and_all_non_finite_runs_still_plot(tmp_path):
    empty = pd.DataFrame(columns=["step", "split", "loss"])
    assert min(png_size(plot_loss_curves({"crashed": empty}, tmp_path / "empty.png"))) >= 400
    assert min(png_size(plot_loss_curves({"nan": metrics([math.nan, math.nan])}, tmp_path / "nan.png"))) >= 400


def test_run_plots_add_loss_scale_only_for_scaled_runs(tmp_path):
    assert [p.name for p in write_run_plots(tmp_path, metrics([3.0, 2.0]))] == ["loss_curves.png"]
    scaled = metrics([3.0, 2.0], scales=[1024.0, 1024.0])
    assert [p.name for p in write_run_plots(tmp_path, scaled)] == ["loss_curves.png", "loss_scale.png"]
