"""Plots are real PNG images a person can open, at least 640 × 400, whatever the data looks like."""

import math

import pandas as pd
from images import png_size

from sarkd_diag.presentation.plots import plot_loss_curves, plot_loss_scale, write_run_plots


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


# ------------------------------------------------------------------------------------ a run's figure
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sarkd_diag.contract.numerics import EXTREME_UPDATE_RATIO, FP16_MAX  # noqa: E402
from sarkd_diag.contract.rundir import load_activations, load_metrics  # noqa: E402
from sarkd_diag.presentation.plots import headroom_figure, run_figure, short_module_names  # noqa: E402


def panel(fig, title_start):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


def marks(ax, label):
    return [list(line.get_xdata()) for line in ax.get_lines() if line.get_label() == label]


ROWS = [  # step 2: loss not measured (null) and absent columns; step 3: loss measured NaN; step 4: Infinity
    {"step": 0, "split": "eval", "eval_loss": 3.0, "eval_ppl": 20.0},
    {"step": 1, "split": "train", "loss": 3.2, "lr": 1e-3, "grad_norm": 1.5, "update_ratio": 2e-3,
     "lost_update_fraction": 0.0},
    {"step": 2, "split": "train", "loss": None, "lr": 1e-3},
    {"step": 3, "split": "train", "loss": math.nan, "lr": 1e-3, "grad_norm": math.inf, "update_ratio": 1e-3},
    {"step": 4, "split": "train", "loss": math.inf, "lr": 1e-3, "grad_norm": 1.2, "update_ratio": 3.0,
     "lost_update_fraction": 0.4},
    {"step": 4, "split": "eval", "eval_loss": math.nan, "eval_ppl": math.nan},
]


def test_run_figure_draws_a_missing_value_as_missing_and_a_non_finite_one_as_a_red_x():
    fig = run_figure(ROWS, "t")
    loss = panel(fig, "training and evaluation loss")
    assert marks(loss, "training loss: non-finite") == [[3.0, 4.0]]  # not step 2: it was not measured
    assert marks(loss, "evaluation loss: non-finite") == [[4.0]]
    assert marks(loss, "training loss") == [[1.0]]
    assert marks(panel(fig, "gradient norm"), "gradient norm: non-finite") == [[3.0]]
    titles = [ax.get_title() for ax in fig.axes]
    assert not any(t.startswith("dynamic loss scale") for t in titles)  # nothing scaled the loss
    assert any(t.startswith("learning rate") for t in titles) and any(t.startswith("lost updates") for t in titles)
    ratio = panel(fig, "update-to-weight ratio")
    assert ratio.get_yscale() == "log"
    assert [0.0 + EXTREME_UPDATE_RATIO] in [list(set(line.get_ydata())) for line in ratio.get_lines()]
    assert marks(ratio, "‖Δw‖/‖w‖") == [[1.0, 3.0, 4.0]]


def test_run_figure_adds_the_loss_scale_panel_only_when_the_run_scaled_the_loss():
    scaled = [dict(r, loss_scale=65536.0, skipped=int(r["step"] == 3)) if r["split"] == "train" else r for r in ROWS]
    fig = run_figure(scaled, "t")
    scale = panel(fig, "dynamic loss scale")
    assert marks(scale, "skipped step") == [[3.0]]
    empty = run_figure([], "nothing")  # a run that died before its first step still gets a figure
    assert "not recorded by this run" in [t.get_text() for ax in empty.axes for t in ax.texts]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_write_run_plots_reads_what_was_measured_from_metrics_jsonl(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", ROWS)
    activations = [{"step": s, "model": m, "module": mod, "dtype": "float16", "amax": a}
                   for s in (1, 3) for m in ("student", "teacher")
                   for mod, a in (("transformer.wte", 0.5), ("transformer.h.0.mlp", 7.0 * s), ("lm_head", 30.0))]
    write_jsonl(tmp_path / "activations.jsonl", activations)
    paths = write_run_plots(tmp_path, load_metrics(tmp_path), "fp32", load_activations(tmp_path))
    assert [p.name for p in paths] == ["loss_curves.png", "fp16_headroom.png"]
    for p in paths:
        width, height = png_size(p)
        assert width >= 640 and height >= 400
    (tmp_path / "activations.jsonl").unlink()  # no activations, no map (closing removes an earlier one)
    assert [p.name for p in write_run_plots(tmp_path, load_metrics(tmp_path), "fp32", load_activations(tmp_path))] \
        == ["loss_curves.png"]


# ------------------------------------------------------------------------------------ the headroom map
def activations_frame(modules, steps, amax):
    return pd.DataFrame([{"step": s, "model": model, "module": m, "dtype": "float16", "amax": amax(model, m, s)}
                         for s in steps for model in ("teacher", "student") for m in modules])


def test_headroom_map_one_panel_per_model_in_forward_order_with_overflow_and_non_finite_apart():
    modules = ["model.embed_tokens", *(f"model.layers.{i}{part}" for i in range(4) for part in (".mlp", "")),
               "model.norm", "lm_head"]

    def amax(model, module, step):
        if model == "student" and module == "model.layers.0.mlp" and step == 3:
            return 2 * FP16_MAX  # beyond fp16: overflow
        if model == "student" and module == "model.norm" and step == 3:
            return math.nan
        return 1.0 * (1 + modules.index(module))

    frame = activations_frame(modules, [1, 2, 3], amax)
    frame = frame[~((frame["model"] == "teacher") & (frame["module"] == "lm_head") & (frame["step"] == 2))]
    fig = headroom_figure(frame)
    student, teacher = (ax for ax in fig.axes if ax.get_title().startswith(("student", "teacher")))
    assert student.get_title().startswith("student") and teacher.get_title().startswith("teacher")
    assert "beyond fp16 from step 3" in student.get_title() and "non-finite from step 3" in student.get_title()
    assert [t.get_text() for t in student.get_yticklabels()] == [  # forward order, `model.` dropped
        "embed_tokens", "layers.0.mlp", "layers.0", "layers.1.mlp", "layers.1", "layers.2.mlp", "layers.2",
        "layers.3.mlp", "layers.3", "norm", "lm_head"]
    heat, nonfinite = student.get_images()
    data = heat.get_array()
    assert data[1, 2] == pytest.approx(2.0) and heat.norm(data[1, 2]) > 1  # drawn in the colormap's `over` colour
    assert tuple(heat.cmap.get_over()[:3]) != tuple(heat.cmap(1.0)[:3])
    assert np.ma.getmaskarray(data)[9, 2] and not np.ma.getmaskarray(nonfinite.get_array())[9, 2]
    assert data[0, 0] == pytest.approx(1.0 / FP16_MAX)  # a fraction of fp16's range
    teacher_heat = teacher.get_images()[0].get_array()
    assert np.ma.getmaskarray(teacher_heat)[10, 1] and len(teacher.get_images()) == 1  # not recorded ≠ non-finite
    assert heat.norm.vmax == 1.0 and type(heat.norm).__name__ == "LogNorm"


def test_headroom_map_labels_every_kth_of_many_modules_and_shortens_long_names(tmp_path):
    modules = [f"model.decoder.layers.{i}.self_attention.query_key_value_projection_{i}" for i in range(120)]
    frame = activations_frame(modules, range(1, 200, 10), lambda model, m, s: 1.0 + s)
    fig = headroom_figure(frame[frame["model"] == "student"])
    (ax,) = (a for a in fig.axes if a.get_title().startswith("student"))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 20 <= len(labels) <= 40 and "every 3th labelled" in ax.get_ylabel()
    assert all(len(x) <= 38 for x in labels) and labels[0].startswith("0.self")
    short, prefix = short_module_names(["a.b.c", "a.b.d", "z"])
    assert (short, prefix) == (["a.b.c", "a.b.d", "z"], "")  # 2 of 3 share `a.b.`: below 90%, nothing dropped
    from sarkd_diag.presentation.plots import plot_fp16_headroom

    assert min(png_size(plot_fp16_headroom(frame, tmp_path / "h.png"))) >= 400
