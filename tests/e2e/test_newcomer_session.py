"""A second newcomer session at the command line: counts worded for one (`1 step`, never `1 steps`), a closed
pipe (`events RUN | head`), the option a user typed named in its error, click's usage errors in the project's
one-line form, help that shows what to type, and the messages of empty, wrong and interrupted run directories."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_step(tiny_world, tmp_path_factory) -> Path:
    """A real run of one step on the tiny world (a checkpoint at its end)."""
    from sarkd_diag.cli import main

    run = tmp_path_factory.mktemp("one_step") / "run"
    args = ["train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
            "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"], "--block-size", "16",
            "--per-device-batch-size", "2", "--train-steps", "1", "--precision", "fp32", "--output-dir", run]
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 0
    return run


# ------------------------------------------------------------------------------------ counts of one
def test_report_of_one_step_says_1_step_and_0_causes(cli, one_step):
    code, out, err = cli("report", one_step)
    assert code == 0, err
    assert f"{one_step}: completed, 1 step, 0 causes; wrote " in out


def test_check_of_one_run_says_1_run(cli, one_step):
    code, out, err = cli("check", one_step, "--expect", "completed")
    assert code == 0, err
    assert out == f"{one_step}: ok — completed holds for 1 run\n"
    code, out, _ = cli("check", one_step, "--expect", "completed,no-critical")
    assert out == f"{one_step}: ok — completed, no-critical hold for 1 run\n"


def test_the_events_table_counts_one_event_as_one(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    (run / "events.jsonl").write_text(json.dumps({"kind": "precision_setup", "severity": "info", "message": "fp32",
                                                  "step": 0, "rank": 0, "phase": "setup", "probe": "loop"}) + "\n")
    code, out, err = cli("events", run)
    assert code == 0, err
    assert "1 of 1 event" in out and "1 of 1 events" not in out


def test_compare_precision_header_says_1_step(cli, tiny_world, tmp_path, monkeypatch):
    """The header is printed before the first mode starts: an interrupted first mode is enough to read it."""
    import sarkd_diag.compare as compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_mode", interrupted)
    code, out, _ = cli("compare-precision", "--teacher-model", tiny_world["teacher"], "--student-model",
                       tiny_world["student"], "--modes", "fp32", "--steps", "1", "--output-dir", tmp_path / "cmp")
    assert code == 130
    assert "fp32 × 1 step →" in out and "1 steps" not in out


def test_counted_agrees_with_its_number():
    from sarkd_diag.contract.wording import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert counted(1, "process") == "1 process" and counted(2, "process") == "2 processes"
    assert counted(1, "critical event") == "1 critical event" and counted(3, "critical event") == "3 critical events"
    assert counted(1234, "parameter", number="1,234") == "1,234 parameters"
