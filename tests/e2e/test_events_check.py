"""`events` (the grep replacement), `check` (the CI gate) and `report` on recorded runs: a clean fp32 run, a
corrupted pure-fp16 run, a mixed run, a comparison directory holding runs, and a run that crashed."""

import json
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
from contract import assert_conforms
from images import png_size

from sarkd_diag.presentation.ui import TrainingDisplay


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    from sarkd_diag.train.loop import distill

    root = tmp_path_factory.mktemp("recorded")
    options = dict(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                   train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]), block_size=32,
                   per_device_batch_size=4, train_steps=4, eval_steps=2, student_lr=3e-3, probe_every=2,
                   on_nonfinite="continue")
    paths = {}
    for mode in ("fp32", "pure-fp16", "mixed"):
        paths[mode] = root / mode
        distill(display=TrainingDisplay(quiet=True), precision=mode, output_dir=str(paths[mode]), **options)
    compare = root / "cmp"
    for mode in ("fp32", "pure-fp16"):
        shutil.copytree(paths[mode], compare / "runs" / mode)
    config = json.loads((paths["fp32"] / "config.json").read_text())  # what makes it a comparison, as written
    (compare / "compare_options.json").write_text(json.dumps({"options": config["options"],
                                                              "modes": ["fp32", "pure-fp16"]}))
    paths["compare"] = compare
    return paths


def crashed_copy(run, dest, keep=("config.json", "events.jsonl", "metrics.jsonl")):
    """A run as a crash after its last step leaves it: the .jsonl logs (the last line torn), not the final evaluation
    (a completed run's), no summary, no parquet, no plots."""
    dest.mkdir()
    for name in keep:
        shutil.copy(run / name, dest / name)
    if "metrics.jsonl" in keep:
        rows = (dest / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["split"] == "eval"
        (dest / "metrics.jsonl").write_text("".join(row + "\n" for row in rows[:-1]))
    with open(dest / "events.jsonl", "a") as f:
        f.write('{"kind": "nonfinite_par')
    return dest


# ------------------------------------------------------------------------------------------ events
def test_events_table_is_the_default(cli, runs):
    code, out, err = cli("events", runs["pure-fp16"])
    assert code == 0, err
    assert "nonfinite_param" in out and "precision_setup" in out and "events" in out


def test_kind_filter_as_json_for_programs(cli, runs):
    code, out, _ = cli("events", runs["pure-fp16"], "--kind", "nonfinite_param", "--format", "json")
    rows = json.loads(out, parse_constant=pytest.fail)  # strict JSON: non-finite values as "inf" / null
    assert code == 0 and rows and {r["kind"] for r in rows} == {"nonfinite_param"}
    assert all(r["severity"] == "critical" and r["step"] >= 1 for r in rows)
    code, out, _ = cli("events", runs["pure-fp16"], "--kind", "nonfinite_param,precision_setup", "--format", "json")
    assert {r["kind"] for r in json.loads(out)} == {"nonfinite_param", "precision_setup"}


def test_severity_means_that_level_and_above(cli, runs):
    everything = json.loads(cli("events", runs["pure-fp16"], "--format", "json")[1])
    warnings = json.loads(cli("events", runs["pure-fp16"], "--severity", "warning", "--format", "json")[1])
    critical = json.loads(cli("events", runs["pure-fp16"], "--severity", "critical", "--format", "json")[1])
    assert {r["severity"] for r in warnings} == {"warning", "critical"}
    assert {r["severity"] for r in critical} == {"critical"}
    assert len(everything) > len(warnings) > len(critical) > 0


def test_model_module_step_and_grep_filters(cli, runs):
    def query(*args):
        code, out, err = cli("events", runs["pure-fp16"], "--format", "json", *args)
        assert code == 0, err
        return json.loads(out)

    assert {r["model"] for r in query("--model", "teacher")} == {"teacher"}
    lm = query("--module", r"transformer\.h\.0\.")
    assert lm and all("transformer.h.0." in (r["module"] or "") + " " + (r["tensor"] or "") for r in lm)
    assert {r["step"] for r in query("--step", ":0")} == {0}
    assert {r["step"] for r in query("--step", "1:1")} == {1}
    assert all(r["step"] >= 2 for r in query("--step", "2:"))
    assert {r["step"] for r in query("--step", "1")} == {1}
    hits = query("--grep", "eps=.* is 0")
    assert hits and all("eps=" in r["message"] for r in hits)


def test_csv_output(cli, runs, tmp_path):
    code, out, _ = cli("events", runs["fp32"], "--format", "csv")
    path = tmp_path / "events.csv"
    path.write_text(out)
    frame = pd.read_csv(path)
    assert code == 0 and {"step", "kind", "severity", "message"} <= set(frame.columns)
    assert "precision_setup" in set(frame["kind"])


def test_a_comparison_directory_adds_a_mode_column(cli, runs):
    code, out, _ = cli("events", runs["compare"], "--severity", "critical", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and {r["mode"] for r in rows} == {"pure-fp16"}
    code, out, _ = cli("events", runs["compare"], "--kind", "precision_setup")
    assert code == 0 and "fp32" in out and "pure-fp16" in out and "mode" in out


def test_a_crashed_run_with_events_only(cli, runs, tmp_path):
    crashed = crashed_copy(runs["pure-fp16"], tmp_path / "crashed", keep=("events.jsonl",))
    code, out, err = cli("events", crashed, "--kind", "nonfinite_param", "--format", "json")
    assert code == 0, err
    assert len(json.loads(out)) == sum(1 for line in (runs["pure-fp16"] / "events.jsonl").read_text().splitlines()
                                       if '"nonfinite_param"' in line)


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "nonfinite"], "not an event kind"),
    (["--severity", "error"], "--severity"),
    (["--step", "a:b"], "--step"),
    (["--module", "("], "regular expression"),
    (["--format", "xml"], "--format"),
])
def test_bad_filters_exit_2_with_one_line(cli, runs, args, message):
    code, _, err = cli("events", runs["fp32"], *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_not_a_run_directory(cli, tmp_path):
    code, _, err = cli("events", tmp_path)
    assert code == 2 and "neither a sarkd-diag run directory" in err
    code, _, err = cli("events", tmp_path / "missing")
    assert code == 2 and "no such directory" in err


def test_follow_tails_a_run_until_it_closes(runs, tmp_path):
    """Lines appear while `events --follow` runs; it prints each matching one and ends when summary.json lands."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(runs["fp32"] / "config.json", live / "config.json")
    lines = (runs["pure-fp16"] / "events.jsonl").read_text().splitlines(keepends=True)
    (live / "events.jsonl").write_text("".join(lines[:2]))
    follow = subprocess.Popen([sys.executable, "-m", "sarkd_diag", "events", str(live), "--follow", "--format",
                               "json", "--kind", "nonfinite_param,precision_setup"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    with open(live / "events.jsonl", "a") as f:
        for line in lines[2:]:
            f.write(line)
            f.flush()
    time.sleep(1.0)
    assert follow.poll() is None  # still following: the run has not closed
    shutil.copy(runs["pure-fp16"] / "summary.json", live / "summary.json")
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    expected = [json.loads(line)["kind"] for line in lines
                if '"nonfinite_param"' in line or '"precision_setup"' in line]
    assert [r["kind"] for r in rows] == expected


# ------------------------------------------------------------------------------------------- check
def test_check_passes_a_clean_run(cli, runs):
    code, out, _ = cli("check", runs["fp32"], "--expect", "master-fp32", "--expect", "no-nonfinite-params",
                       "--expect", "no-critical,completed", "--max-skipped-steps", "0", "--max-eval-ppl", "1e6")
    assert code == 0 and out.count("\n") == 1 and "ok" in out


def test_mixed_holds_fp32_master_weights(cli, runs):
    """The replacement for grep "Converting student parameters to FP32"."""
    code, out, _ = cli("check", runs["mixed"], "--expect", "master-fp32", "--expect", "no-nonfinite-params")
    assert code == 0, out


def test_check_fails_a_corrupted_run_one_line_per_expectation(cli, runs):
    code, out, _ = cli("check", runs["pure-fp16"], "--expect", "master-fp32", "--expect", "no-nonfinite-params",
                       "--expect", "no-critical", "--max-skipped-steps", "0", "--max-eval-ppl", "1e6")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 4, out
    assert any("master-fp32" in line and "float16" in line for line in lines)
    assert any("no-nonfinite-params" in line and "step 1" in line for line in lines)
    assert any("no-critical" in line for line in lines)
    # its weights are NaN, so is the last evaluation's loss: a NaN perplexity, not an infinite one
    assert any("max-eval-ppl" in line and "is NaN" in line for line in lines)


def test_check_on_a_comparison_checks_every_run(cli, runs):
    code, out, _ = cli("check", runs["compare"], "--expect", "no-critical", "--expect", "master-fp32")
    lines = out.splitlines()
    assert code == 1 and lines and all(line.startswith("pure-fp16: ") for line in lines)


def test_check_on_a_crashed_run(cli, runs, tmp_path):
    crashed = crashed_copy(runs["pure-fp16"], tmp_path / "crashed")
    code, out, _ = cli("check", crashed, "--expect", "no-nonfinite-params,completed")
    assert code == 1 and "no-nonfinite-params" in out and "completed" in out


@pytest.mark.parametrize(("args", "message"), [
    ([], "at least one expectation"),
    (["--expect", "no-nans"], "unknown"),
    (["--max-skipped-steps", "-1"], "≥ 0"),
])
def test_check_bad_input_exits_2(cli, runs, args, message):
    code, _, err = cli("check", runs["fp32"], *args)
    assert code == 2 and message in err


# ------------------------------------------------------------------------------------------ report
def test_report_rebuilds_a_crashed_run_with_plots(cli, runs, tmp_path):
    crashed = crashed_copy(runs["pure-fp16"], tmp_path / "crashed")
    code, out, err = cli("report", crashed)
    assert code == 0, err
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["steps_completed"] == 4
    for name in ("metrics.parquet", "events.parquet", "report.md"):
        assert (crashed / name).is_file()
    width, height = png_size(crashed / "loss_curves.png")
    assert width >= 640 and height >= 400
    assert_conforms(crashed)
