"""`sarkd-diag events` as a newcomer met it (issue 14): validated, case-insensitive filters; a file named
instead of its directory; identifiers kept whole at 80 columns; --follow on a run killed with kill -9."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

import sarkd_diag.presentation.query as query
from sarkd_diag.contract.events import KINDS, events_frame, read_jsonl

LONG_MODULE = "model.layers.11.block_sparse_moe.experts.gate_up_proj"
BIAS = "transformer.h.0.mlp.c_fc.bias"


def _run(tmp_path: Path, summary: bool = True) -> Path:
    """A small run directory: config.json, events.jsonl (one run's worth of kinds) and maybe summary.json."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    rows = [  # written as a run writes them (one JSON object a line), independent of how events are made
        {"kind": "precision_setup", "severity": "info", "message": "precision fp32"},
        {"kind": "no_router", "severity": "warning", "message": "teacher has no MoE router: plain KD",
         "model": "teacher"},
        {"kind": "nonfinite_grad", "severity": "critical", "message": "Inf in a gradient", "step": 3,
         "phase": "backward", "model": "student", "tensor": BIAS},
        {"kind": "nonfinite_activation", "severity": "critical", "message": "NaN in the output", "step": 3,
         "phase": "forward", "model": "teacher", "module": LONG_MODULE},
    ]
    base = {"step": 0, "micro_step": 0, "rank": 0, "phase": "setup", "probe": "loop", "model": None, "module": None,
            "tensor": None, "time": 1.0}
    (run / "events.jsonl").write_text("".join(json.dumps({**base, **row}) + "\n" for row in rows))
    if summary:
        (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    return run


def test_an_unknown_model_is_refused_with_the_choices(cli, tmp_path):
    run = _run(tmp_path)
    code, out, err = cli("events", run, "--model", "students")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--model 'students'" in err and "student, teacher, projection" in err


@pytest.mark.parametrize(("args", "rows"), [
    (["--severity", "CRITICAL"], 2), (["--model", "Student"], 1), (["--kind", "NO_ROUTER"], 1),
    (["--severity", "Warning", "--model", "TEACHER"], 2),
])
def test_filters_are_case_insensitive(cli, tmp_path, args, rows):
    code, out, err = cli("events", _run(tmp_path), *args, "--format", "JSON")
    assert code == 0, err
    assert len(json.loads(out)) == rows


def test_a_file_is_pointed_back_to_its_directory(cli, tmp_path):
    run = _run(tmp_path)
    for command in (["events"], ["check", "--expect", "completed"], ["report"]):
        code, _, err = cli(*command, run / "summary.json")
        assert code == 2 and "no such directory" not in err
        assert f"{run / 'summary.json'} is a file; give the run directory that holds it: {run}" in err


COMMANDS = [["events"], ["check", "--expect", "completed"], ["report"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_the_directory_that_holds_the_runs_names_the_newest_of_them(cli, tmp_path, command):
    """`sarkd-diag events runs` (train's default parent) names a run to give instead, and every command that reads
    a run answers a missing path alike (report said `nonexist is not a sarkd-diag run directory`)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    older = _run(runs)
    newer = older.rename(runs / "20261205-083159-bf16-mixed")
    _run(runs)
    os.utime(runs / "run", (1.0, 1.0))
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    code, out, err = cli(*command, runs)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err == f"sarkd-diag: error: {runs} is not a run directory but holds 2: give one of them, e.g. {newer} " \
                  "(the newest)\n"
    code, _, err = cli(*command, tmp_path / "missing")
    assert code == 2 and err == f"sarkd-diag: error: {tmp_path / 'missing'}: no such directory\n"
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_project_whose_runs_train_wrote_is_no_comparison(cli, tmp_path, monkeypatch, command):
    """After a default `train` in a project (runs/<date-time>-fp32/), `check . --expect completed` said `.: ok —
    completed holds for 1 run` and `events .` listed that run with a mode column, where `report .` refused the
    directory: only a directory holding compare_options.json is a comparison, and all three refuse alike."""
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    run = _run(project / "runs").rename(project / "runs" / "20261208-011735-fp32")
    monkeypatch.chdir(project)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for given, named in ((".", Path("runs") / run.name), (project, run)):
        code, out, err = cli(*command, given)
        assert (code, out) == (2, ""), (out, err)
        assert err == (f"sarkd-diag: error: {given} is not a run or comparison directory; it holds 1 run under "
                       f"runs/: give one, e.g. {named} (the newest)\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_parent_folder_suggests_only_a_real_run_or_comparison(cli, tmp_path, command):
    """In a folder holding a project (its runs/ of `train` runs) and a comparison, the refusal named the project,
    the newest subfolder, as a run to give (`e.g. redteam-cli (the newest)`): it names the comparison."""
    comparison = tmp_path / "cmp"
    (comparison / "runs").mkdir(parents=True)
    (comparison / "compare_options.json").write_text(json.dumps({"modes": ["fp32"]}))
    _run(comparison / "runs").rename(comparison / "runs" / "fp32")
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    _run(project / "runs")
    os.utime(comparison, (1.0, 1.0))  # the project is the newest folder
    code, out, err = cli(*command, tmp_path)
    assert (code, out) == (2, "")
    assert err == f"sarkd-diag: error: {tmp_path} is not a run directory but holds 1: give one of them, e.g. " \
                  f"{comparison} (the newest)\n"


@pytest.mark.parametrize("command", [["check", "--expect", "completed"], ["events", "--severity", "info"]],
                         ids=lambda c: c[0])
def test_an_empty_run_dir_after_the_options_is_not_the_current_directory(cli, tmp_path, monkeypatch, command):
    """`RUN=; sarkd-diag check --expect completed "$RUN"` checked the current directory — a run, here — and said ok;
    only an empty first argument was refused."""
    monkeypatch.chdir(_run(tmp_path))
    code, out, err = cli(*command, "")
    assert (code, out) == (2, "")
    assert err == f"sarkd-diag: error: an empty argument ('': an unset shell variable?) where {command[0]} takes " \
                  "RUN_DIR; give a run directory\n"


def _interrupted_comparison(tmp_path: Path) -> Path:
    """A comparison asked for three modes and stopped during the third: runs/ holds the first two, closed."""
    comparison = tmp_path / "cmp"
    (comparison / "runs").mkdir(parents=True)
    (comparison / "compare_options.json").write_text(json.dumps({"options": {},
                                                                 "modes": ["fp32", "pure-bf16", "bf16-mixed"]}))
    for mode in ("fp32", "pure-bf16"):
        _run(comparison / "runs").rename(comparison / "runs" / mode)
    return comparison


def test_check_completed_of_a_comparison_names_the_mode_that_did_not_run(cli, tmp_path):
    """Ctrl-C during the last of three modes: `check --expect completed` said `ok — completed holds for 2 runs`."""
    comparison = _interrupted_comparison(tmp_path)
    code, out, err = cli("check", comparison, "--expect", "completed")
    assert (code, err) == (1, "")
    assert out == (f"bf16-mixed: completed: did not run — the comparison asked for fp32, pure-bf16, bf16-mixed, and "
                   f"{comparison / 'runs' / 'bf16-mixed'} holds no run (the comparison was stopped before it?)\n")
    code, out, err = cli("check", comparison, "--expect", "no-nonfinite-params")  # of the runs there: said so
    assert (code, err) == (0, "")
    assert out == f"{comparison}: ok — no-nonfinite-params holds for 2 runs (bf16-mixed, asked for, did not run)\n"
    (comparison / "runs" / "bf16-mixed").mkdir()  # a mode whose process died before it wrote anything
    code, out, _ = cli("check", comparison, "--expect", "completed")
    assert code == 1 and out.startswith("bf16-mixed: completed: did not run")
    (comparison / "runs" / "bf16-mixed").rmdir()
    _run(comparison / "runs").rename(comparison / "runs" / "bf16-mixed")
    code, out, _ = cli("check", comparison, "--expect", "completed")
    assert (code, out) == (0, f"{comparison}: ok — completed holds for 3 runs\n")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_directory_inside_a_run_names_the_run_and_is_left_alone(cli, tmp_path, command):
    """A run's student/ holds a model's config.json: it was taken for a run, so events printed `0 of 0 events`,
    check advised `report`, and report wrote parquet files into the model directory, then failed with exit 3."""
    run = _run(tmp_path)
    student = run / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (run / "logs").mkdir()
    (run / "logs" / "x.log").write_text("")
    comparison = tmp_path / "cmp"
    (comparison / "runs").mkdir(parents=True)
    run.rename(comparison / "runs" / "fp32")
    run, student = comparison / "runs" / "fp32", comparison / "runs" / "fp32" / "student"
    (comparison / "compare_options.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for path, message in [
        (student, f"{student} is inside the run directory {run}, not one itself: give {run}"),
        (comparison / "runs", f"{comparison / 'runs'} is inside the compare-precision directory {comparison}, not "
                              f"one itself: give {comparison}"),
        (run / "logs" / "x.log", f"{run / 'logs' / 'x.log'} is a file; give the run directory that holds it: {run}"),
        (student / "config.json", f"{student / 'config.json'} is a file; give the run directory that holds it: {run}"),
    ]:
        code, out, err = cli(*command, path)
        assert (code, out, err) == (2, "", f"sarkd-diag: error: {message}\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "sarkd-diag-error.txt").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--step", "5:2"], "--step '5:2': no step is in it (5 is after 2); write A:B with A ≤ B, e.g. 2:5"),
    (["--rank", "3"], "--rank 3: not a rank of this run (one process); choose one of 0"),
])
def test_a_filter_nothing_can_match_is_refused_not_an_empty_table(cli, tmp_path, args, message):
    """`--step 5:2` and a rank the run does not have printed `0 of 4 events`, as if nothing had gone wrong."""
    run = _run(tmp_path)
    for follow in ([], ["--follow"]):
        code, out, err = cli("events", run, *args, *follow)
        assert (code, out, err) == (2, "", f"sarkd-diag: error: {message}\n")
    code, out, _ = cli("events", run, "--rank", "0", "--step", "3:3", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 2


def test_load_run_checks_its_directory_as_the_commands_do(tmp_path):
    """README's `sarkd_diag.load_run(RUN_DIR)`: a run's student/ (a model's config.json) loaded as a run with no
    metrics and no events, and a file of the run was 'not a sarkd-diag run directory (no config.json)'."""
    from sarkd_diag import load_run
    from sarkd_diag.contract.errors import BadInput

    run = _run(tmp_path)
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    comparison = tmp_path / "cmp"
    (comparison / "runs").mkdir(parents=True)
    (comparison / "compare_options.json").write_text("{}")
    mode_run = _run(comparison / "runs").rename(comparison / "runs" / "fp32")
    for path, message in [
        (run / "student", f"{run / 'student'} is inside the run directory {run}, not one itself: give {run}"),
        (run / "summary.json", f"{run / 'summary.json'} is a file; give the run directory that holds it: {run}"),
        (tmp_path / "missing", f"{tmp_path / 'missing'}: no such directory"),
        (comparison, f"{comparison} is a compare-precision directory: load one of its runs, e.g. {mode_run} (the "
                     f"comparison itself: {comparison}/comparison.parquet)"),
    ]:
        with pytest.raises(BadInput) as refused:
            load_run(path)
        assert str(refused.value) == message
    loaded = load_run(run)
    assert loaded["summary"] == {"status": "completed"} and len(loaded["events"]) == 4


def test_check_completed_of_a_run_without_summary_says_what_to_do(cli, tmp_path):
    """It said `completed: status is no summary.json (crashed?)`."""
    run = _run(tmp_path, summary=False)
    code, out, err = cli("check", run, "--expect", "completed")
    assert (code, err) == (1, "")
    assert out == (f"{run}: completed: no summary.json: the run is still running, or it crashed (`sarkd-diag report "
                   f"{run}` closes it)\n")


def test_report_says_every_file_it_wrote(cli, tiny_args):
    """It listed five files, whatever it wrote: report.html and fp16_headroom.png were left out."""
    code, _, err = cli("train", *tiny_args, "--train-steps", "2", "--precision", "fp32")
    assert code == 0, err
    run = Path(tiny_args[-1])
    closing = {"summary.json", "metrics.parquet", "events.parquet", "report.md", "report.html", "loss_curves.png",
               "fp16_headroom.png"}
    for name in closing:  # as a run killed before it closed leaves its directory
        (run / name).unlink()
    code, out, err = cli("report", run)
    assert code == 0, err
    assert out.startswith(f"{run}: completed, 2 steps, ")
    assert sorted(out.splitlines()[0].split("; wrote ")[1].split(", ")) == sorted(closing)


def _rendered(frame, width: int) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
    console.print(query.events_table(frame, width=width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 60])
def test_identifiers_stay_whole_in_a_narrow_table(tmp_path, width):
    """Names fold at their dots, never mid-identifier: `c_fc.bias` keeps its `bias`, and every segment of a
    long module name is on one line."""
    frame = events_frame(read_jsonl(_run(tmp_path) / "events.jsonl"))
    text = _rendered(frame, width)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    for name in (f"student/{BIAS}", f"teacher/{LONG_MODULE}"):
        for segment in re.split(r"[./]", name):
            assert re.search(rf"(^|[\s./]){re.escape(segment)}([\s./]|$)", text, re.M), (segment, text)


@pytest.mark.parametrize("width", [80, 60])
def test_every_word_of_a_message_is_in_the_table(tmp_path, width):
    """At 80 columns the table came out wider than the terminal and rich cropped it: 'any entry whose squared
    gradient' read 'any entry who' and a line's last characters were gone. The layout now counts the box's edges and
    dividers, and the message column takes what is left."""
    frame = events_frame(read_jsonl(_run(tmp_path) / "events.jsonl"))
    said = ("optimizer eps=1e-08 is 0.0 in float16: any entry whose squared gradient also rounds to 0 divides by "
            "zero and fills the weights with Inf/NaN")
    frame.loc[frame["module"] == LONG_MODULE, "message"] = said
    text = _rendered(frame, width)
    assert max(len(line) for line in text.splitlines()) <= width
    shown = " ".join(text.split())
    assert [word for word in said.split() if word not in shown] == [], text


def test_fold_identifier_breaks_after_dots():
    assert query.fold_identifier("student/transformer.h.0.mlp.c_fc.bias", 16).split("\n") == [
        "student/", "transformer.h.0.", "mlp.c_fc.bias"]
    assert query.fold_identifier("short.name", 40) == "short.name"


def _age(run: Path, seconds: float) -> None:
    """As if nothing in the run had been written for `seconds` (a run killed with kill -9 that long ago)."""
    past = time.time() - seconds
    for p in [*run.rglob("*"), run]:
        os.utime(p, (past, past))


def test_follow_on_a_killed_run_prints_what_exists_and_says_the_run_is_dead(cli, tmp_path):
    run = _run(tmp_path, summary=False)
    _age(run, 120)
    code, out, err = cli("events", run, "--follow")
    assert code == 1
    assert "no_router" in out and "nonfinite_grad" in out  # what the run recorded before it died
    assert err.count("\n") == 1 and "the run is dead" in err and f"sarkd-diag report {run}" in err


def test_follow_on_a_run_stopped_at_once_says_how_it_ended_not_that_it_was_killed(cli, tmp_path):
    """A run stopped by a second Ctrl-C records its end (an `interrupted` event) and writes no summary: --follow
    called it `dead (killed?)`, where `check` said its logs show it was interrupted."""
    run = _run(tmp_path, summary=False)
    with (run / "events.jsonl").open("a") as log:
        log.write(json.dumps({"kind": "interrupted", "severity": "warning", "step": 3, "micro_step": 0, "rank": 0,
                              "phase": "policy", "probe": "loop", "model": None, "module": None, "tensor": None,
                              "time": 2.0, "message": "a second Ctrl-C: stopped during step 3"}) + "\n")
    _age(run, 120)
    code, _, err = cli("events", run, "--follow")
    assert code == 1 and err.count("\n") == 1, err
    assert "the run ended interrupted, its logs say, and was not closed" in err and "killed" not in err, err
    assert f"`sarkd-diag report {run}` closes it" in err, err


def test_follow_on_a_dead_run_with_an_older_summary_does_not_say_it_has_none(cli, tmp_path):
    """A run copied without its files' times (or appended to after it closed) has a summary.json older than its
    events: --follow said `has no summary.json` of a directory that plainly held one."""
    run = _run(tmp_path)
    _age(run, 120)
    past = time.time() - 180
    os.utime(run / "summary.json", (past, past))
    code, _, err = cli("events", run, "--follow")
    assert code == 1 and err.count("\n") == 1 and "no summary.json" not in err
    assert err.startswith(f"sarkd-diag: {run}: its summary.json is older than its events") and "the run is dead" in err


def test_follow_keeps_following_while_a_process_holds_the_log_open(tmp_path, monkeypatch):
    """A run whose process is alive (it holds events.jsonl open) is followed however long it is quiet."""
    run = _run(tmp_path, summary=False)
    _age(run, 120)
    polls = []

    def sleep(_):
        polls.append(1)
        if len(polls) == 3:
            raise KeyboardInterrupt  # how a person ends --follow

    monkeypatch.setattr(query.time, "sleep", sleep)
    with open(run / "events.jsonl", "a"):
        assert query.holds_open([run / "events.jsonl"]) is True
        query.follow_events(run, query.EventFilter(), "json", dead_after_s=0.0)  # returns on Ctrl-C, not RunEnded
    assert len(polls) == 3
    assert query.holds_open([run / "events.jsonl"]) is False
    with pytest.raises(query.RunEnded, match="the run is dead"):
        query.follow_events(run, query.EventFilter(), "json", dead_after_s=0.0)


def test_follow_with_an_idle_timeout_when_the_writer_cannot_be_seen(tmp_path, monkeypatch):
    run = _run(tmp_path, summary=False)
    _age(run, 120)
    monkeypatch.setattr(query, "holds_open", lambda files: None)  # /proc unreadable, or a run on another machine
    with pytest.raises(query.RunEnded, match="--idle-timeout"):
        query.follow_events(run, query.EventFilter(), "json", idle_timeout=60)


def test_follow_ends_normally_on_a_closed_run(cli, tmp_path):
    code, out, _ = cli("events", _run(tmp_path), "--follow", "--format", "json")
    assert code == 0 and len(out.strip().splitlines()) == 4


def test_follow_prints_each_event_on_one_line_at_80_columns(tmp_path):
    """Piped (80 columns), --follow folded a long event over two lines, so `| grep` saw half of it."""
    run = _run(tmp_path)
    out = io.StringIO()
    console = Console(width=80, color_system=None, highlight=False, file=out)
    query.follow_events(run, query.EventFilter(), "table", console=console)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[3].startswith("step 3 critical nonfinite_activation teacher/" + LONG_MODULE)
    assert lines[3].endswith("NaN in the output") and len(lines[3]) > 80


def test_a_module_regex_that_matches_nothing_names_the_modules_there_are(cli, tmp_path):
    """`events --module attn` of a run whose events name other modules said only `no event matches these filters`:
    the user could not tell a typo, or another model's naming, from a module that had no problem."""
    run = _run(tmp_path)
    code, out, err = cli("events", run, "--module", "attn")
    assert code == 0 and err == ""
    assert " ".join(out.split()) == (f"no event matches these filters (of 4 events recorded): --module 'attn' matches "
                                     f"no module; the events name 1 module: {LONG_MODULE}")
    code, out, _ = cli("events", run, "--module", "layers", "--kind", "no_router")  # it matches: other filters empty it
    assert code == 0 and " ".join(out.split()) == "no event matches these filters (of 4 events recorded)"


def test_a_step_range_after_the_last_step_says_where_the_run_ended(cli, tmp_path):
    """`events --step 90:` of a run that ended at step 3 said `no event matches these filters`, as if no event had
    happened there, not that the run never got there."""
    run = _run(tmp_path)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n"
                                               for s in (1, 2, 3, 4)))
    code, out, err = cli("events", run, "--step", "90:")
    assert code == 0 and err == ""
    assert " ".join(out.split()) == ("no event matches these filters (of 4 events recorded): --step '90:' begins "
                                     "after step 4, the last step recorded")
    code, out, _ = cli("events", run, "--step", "4:", "--kind", "no_router")
    assert code == 0 and " ".join(out.split()) == "no event matches these filters (of 4 events recorded)"


def _closed_again(cli, run: Path, summary: str | None) -> str:
    """`report` on `run` after its summary.json was lost (None) or damaged (the text it holds): the status it wrote,
    which `check --expect completed` of the run without a summary said first."""
    (run / "summary.json").unlink()
    code, said, _ = cli("check", run, "--expect", "completed")
    if summary is not None:
        (run / "summary.json").write_text(summary)
    code, out, err = cli("report", run)
    assert code == 0, err
    status = json.loads((run / "summary.json").read_text())["status"]
    assert said == (f"{run}: completed: no summary.json: the run is still running, or it crashed (`sarkd-diag report "
                    f"{run}` closes it)\n" if status == "crashed" else f"{run}: completed: no summary.json, though its "
                    f"logs show how the run ended: {status} (`sarkd-diag report {run}` writes it)\n")
    return status


@pytest.mark.parametrize("summary", [None, '{"status": "compl', "[]"], ids=["lost", "torn", "not-an-object"])
def test_report_of_a_run_without_its_summary_writes_the_status_its_logs_prove(cli, tiny_args, monkeypatch, summary):
    """A run that reached its last step and evaluated, whose summary.json was then lost or damaged, was closed again
    by `report` as `crashed`; so was one that recorded its own Ctrl-C. Each now gets the end its logs recorded,
    only a run whose logs stop short of an ending is crashed, and an end before a resume is not the run's; `check`
    says that end before `report` writes it."""
    import signal

    from sarkd_diag.train import loop

    args = [*tiny_args, "--train-steps", "2", "--eval-steps", "2", "--probes", "off", "--precision", "fp32"]
    run = Path(tiny_args[-1])
    evaluate = loop.Trainer._evaluate

    def ctrl_c_after_step_1(self):
        evaluate(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler `train` installed takes it, as from a terminal

    with monkeypatch.context() as patched:
        patched.setattr(loop.Trainer, "_evaluate", ctrl_c_after_step_1)
        assert cli("train", *args, "--eval-steps", "1")[0] == 130
    assert _closed_again(cli, run, summary) == "interrupted"
    code, _, err = cli("train", *args, "--resume")
    assert code == 0, err
    assert _closed_again(cli, run, summary) == "completed"
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:-1]) + "\n")  # killed before its final evaluation
    assert _closed_again(cli, run, summary) == "crashed"


def test_module_names_match_in_any_case_as_the_other_names_do(cli, tmp_path):
    """`events --model TEACHER` matched, `events --module LAYERS` did not: the one name filter that read case as typed,
    though the help says names are case-insensitive."""
    run = _run(tmp_path)
    _, lower, _ = cli("events", run, "--module", "layers", "--format", "json")
    code, upper, err = cli("events", run, "--module", "LAYERS", "--format", "json")
    assert code == 0 and err == "" and json.loads(upper) == json.loads(lower) != []


def test_a_kind_typed_as_a_part_of_several_names_them_all(cli, tmp_path):
    """`events --kind nonfinite` answered `did you mean nonfinite_lr?` — the nearest name, one of eight kinds that
    hold the word; the user was after the non-finite events, and learned of one kind, the rarest."""
    run = _run(tmp_path)
    code, out, err = cli("events", run, "--kind", "nonfinite")
    assert (code, out) == (2, "")
    holding = ", ".join(kind for kind in KINDS if "nonfinite" in kind)  # every kind that holds the word, in order
    assert f"(did you mean one of {holding}?)" in err and "nonfinite_between_steps" in holding, err
    code, _, err = cli("events", run, "--kind", "nonfinite_gard")  # a near miss: the one meant
    assert code == 2 and "(did you mean nonfinite_grad?)" in err, err
