"""report.html (a run's and a comparison's) is one self-contained page: the diagnosis, every figure embedded as a
data: URI, and a table with one row per event. `--report-to tensorboard` writes the logs with TensorBoard's own
writer, from the run directory, so `report` rebuilds it."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

from sarkd_diag import Probes
from sarkd_diag.contract.rundir import load_events
from sarkd_diag.presentation.closing import finalize_run


class Page(HTMLParser):
    """The text, the <img> sources and the rows of each table of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.images, self.tables, self._cell = [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("src", ""), attrs.get("alt", "")))
        elif tag == "table":
            self.tables.append({"class": attrs.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def event_rows(page: Page) -> list[list[str]]:
    (table,) = [t for t in page.tables if t["class"] == "events"]
    return table["rows"][1:]  # less the header


def assert_embedded_pngs(page: Page, count: int) -> None:
    assert len(page.images) == count
    for src, _ in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def user_loop(run_dir: Path, bad_step: int | None = 3, steps: int = 4) -> Path:
    """A user's loop under Probes; an Inf input at `bad_step` gives events and a diagnosis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Probes(model, optimizer=optimizer, run_dir=run_dir, level="full") as probes:
        for step in range(1, steps + 1):
            x = torch.randn(4, 8)
            if step == bad_step:
                x[0, 0] = float("inf")
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            probes.step(loss=loss)
            optimizer.zero_grad()
    return run_dir


def test_a_run_report_html_holds_the_diagnosis_the_figures_and_every_event(tmp_path):
    run = user_loop(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diagnosis"], "the Inf input gives a diagnosis"
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    for cause in summary["diagnosis"]:
        assert cause["cause"] in page.all_text
    assert "Diagnosis" in page.all_text and f"sarkd-diag run: {summary['status']}" in page.all_text
    assert_embedded_pngs(page, 2)  # the run's figure and the fp16 headroom map (the run recorded activations)
    assert {alt.split(":")[0] for _, alt in page.images} >= {"fp16 headroom"}
    events = load_events(run)
    rows = event_rows(page)
    assert len(events) > 0 and len(rows) == len(events)
    assert [r[2] for r in rows] == list(events["kind"])  # step, severity, kind, …: in the events' order
    assert "src='" not in (run / "report.html").read_text() and ".png\"" not in (run / "report.html").read_text()


def test_a_healthy_run_says_so_and_a_rebuilt_one_matches(tmp_path):
    run = user_loop(tmp_path / "run", bad_step=None, steps=2)
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    assert "No numerical problem was found" in page.all_text
    first = event_rows(page) if any(t["class"] == "events" for t in page.tables) else []
    finalize_run(run, "completed")  # `sarkd-diag report`: the same page from the logs
    again = Page((run / "report.html").read_text(encoding="utf-8"))
    assert (event_rows(again) if first else []) == first and len(again.images) == len(page.images)


def _files(directory: Path) -> dict[str, bytes | None]:
    """Every entry of `directory`, hidden ones too, with a file's bytes (None for a directory)."""
    return {p.name: None if p.is_dir() else p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("closed", [True, False], ids=["closed-before", "never-closed"])
def test_a_report_that_fails_leaves_the_run_directory_as_it_was(cli, tmp_path, monkeypatch, closed):
    """`sarkd-diag report` wrote summary.json and the parquet files before building report.md, the figures and
    report.html: one failing left new files beside old ones (a summary of this closing, a page of the last). Closing
    now builds every file first and moves them into place together, so a failure leaves the directory as it was."""
    import sarkd_diag.presentation.report as report

    run = user_loop(tmp_path / "run")
    if not closed:  # as a run killed before it closed leaves its directory
        for name in ("summary.json", "metrics.parquet", "events.parquet", "report.md", "report.html",
                     "loss_curves.png", "fp16_headroom.png"):
            (run / name).unlink()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 5, "split": "train"}\n')
    before = _files(run)

    def broken(*args, **kwargs):
        raise RuntimeError("a renderer's bug")

    monkeypatch.setattr(report, "write_html_report", broken)
    monkeypatch.chdir(tmp_path)  # where an internal error leaves its traceback
    code, _, err = cli("report", run)
    assert code == 3 and "a renderer's bug" in err
    assert _files(run) == before


def test_closing_again_removes_a_figure_the_logs_no_longer_give(tmp_path):
    """The fp16 headroom map of an earlier closing stays only while the run has activations to draw it from."""
    run = user_loop(tmp_path / "run")
    assert (run / "fp16_headroom.png").is_file()
    (run / "activations.jsonl").unlink()
    finalize_run(run, "completed")
    assert not (run / "fp16_headroom.png").exists() and (run / "loss_curves.png").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nothing of the closing stays behind


def test_a_comparison_report_html_holds_the_table_figures_diagnoses_and_events(tmp_path):
    from sarkd_diag.compare import ModeRun, _summary, comparison_table, write_outputs

    out = tmp_path / "compare"
    results = [ModeRun("fp32", user_loop(out / "runs" / "fp32", bad_step=None, steps=2), 0, 1.0),
               ModeRun("pure-fp16", user_loop(out / "runs" / "pure-fp16"), 0, 1.0)]
    table, verdicts, _ = comparison = comparison_table(results)
    options = {"train_steps": 4, "student_lr": 1e-3, "seed": 0, "probe_every": 1}
    summary = _summary(out, comparison, results, options, {"type": "cpu", "name": "cpu"})
    written = write_outputs(out, table, verdicts, summary, results)
    assert "report.html" in written
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    modes = [row[0] for row in page.tables[0]["rows"][1:]]
    assert modes == ["fp32", "pure-fp16"]
    assert_embedded_pngs(page, 1)  # training loss per mode; nothing scaled the loss, so no loss-scale figure
    bad = json.loads((out / "runs" / "pure-fp16" / "summary.json").read_text())["diagnosis"]
    assert bad and bad[0]["cause"] in page.all_text
    rows = event_rows(page)
    assert len(rows) == sum(len(load_events(r.run_dir)) for r in results)
    assert {r[0] for r in rows} <= {"fp32", "pure-fp16"}


# ------------------------------------------------------------------------------------ --report-to tensorboard
def test_report_to_tensorboard_writes_metrics_and_events_with_tensorboards_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = user_loop(tmp_path / "run")
    assert not (run / "tensorboard").exists()  # not asked for
    config = json.loads((run / "config.json").read_text())
    config["options"] = {"report_to": "tensorboard"}
    (run / "config.json").write_text(json.dumps(config))
    finalize_run(run, "completed")  # what `sarkd-diag report RUN_DIR` does
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    finalize_run(run, "completed")  # rebuilt whole, never appended: one file, each step once
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    assert [(e.step, pytest.approx(e.value, nan_ok=True)) for e in acc.Scalars("train/loss")] == losses
    assert "train/grad_norm" not in acc.Tags()["scalars"]  # never measured in a user's loop: not written
    events = load_events(run)
    texts = acc.Tensors("events/text_summary")
    assert sorted({int(s) for s in events["step"]}) == [t.step for t in texts]
    shown = b"".join(t.tensor_proto.string_val[0] for t in texts).decode()
    assert all(kind in shown for kind in events["kind"])
    assert "diagnosis/text_summary" in acc.Tags()["tensors"]


def test_report_to_accepts_none_and_tensorboard_and_refuses_anything_else(cli, tiny_args, tmp_path):
    from sarkd_diag.contract.config import DistillConfig

    assert DistillConfig().report_to is None
    assert DistillConfig(report_to="none").validate().report_to == "none"
    code, out, err = cli("train", *tiny_args, "--report-to", "wandb")
    assert code == 2 and err.count("\n") == 1 and "--report-to" in err and "tensorboard" in err, err
    assert not (tmp_path / "run").exists()
    code, out, _ = cli("train", "-h")
    assert code == 0 and "--report-to" in out
