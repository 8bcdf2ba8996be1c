"""A second newcomer session at the command line: counts worded for one (`1 step`, never `1 steps`), a closed
pipe (`events RUN | head`), the option a user typed named in its error, click's usage errors in the project's
one-line form, help that shows what to type, and the messages of empty, wrong and interrupted run directories."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
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
    assert f"{one_step}: completed, 1 step, 0 causes, 0 findings; wrote " in out


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


def test_compare_precision_header_says_1_step_and_a_second_run_what_to_do(cli, tiny_world, tmp_path, monkeypatch):
    """The header is printed before the first mode starts: an interrupted first mode is enough to read it."""
    import sarkd_diag.compare as compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_mode", interrupted)
    code, out, _ = cli("compare-precision", "--teacher-model", tiny_world["teacher"], "--student-model",
                       tiny_world["student"], "--modes", "fp32", "--steps", "1", "--output-dir", tmp_path / "cmp")
    assert code == 130
    assert "fp32 × 1 step →" in out and "1 steps" not in out
    code, _, err = cli("compare-precision", "--modes", "fp32", "--output-dir", tmp_path / "cmp")
    assert code == 2 and err == (f"sarkd-diag: error: --output-dir {tmp_path / 'cmp'} holds a comparison already; pass "
                                 "--overwrite to replace it, another --output-dir for a new one, or `sarkd-diag report "
                                 f"{tmp_path / 'cmp'}` to rebuild its table from the modes that ran\n")


def test_an_interrupted_comparison_says_what_it_left_and_how_to_read_it(cli, tiny_world, tmp_path, monkeypatch):
    """Ctrl-C during compare-precision printed only `sarkd-diag: interrupted`: which modes had closed, and that
    `report` compares them, the user learnt only from the refusal of the next run."""
    import sarkd_diag.compare as compare

    def fp32_done_then_ctrl_c(mode, config_file, out):
        if mode == "bf16-mixed":
            raise KeyboardInterrupt
        (out / "runs" / mode).mkdir(parents=True)
        (out / "runs" / mode / "summary.json").write_text("{}")  # as a mode that closed leaves its run
        return compare.ModeRun(mode, out / "runs" / mode, 0, 1.0)

    monkeypatch.setattr(compare, "run_mode", fp32_done_then_ctrl_c)
    args = ["compare-precision", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
            "--steps", "1"]
    code, out, err = cli(*args, "--modes", "bf16-mixed", "--output-dir", tmp_path / "none")
    assert (code, err) == (130, "sarkd-diag: interrupted\n")
    assert "interrupted during bf16-mixed, before any mode closed: `--overwrite` starts the comparison again" \
        in " ".join(out.split())
    code, out, err = cli(*args, "--modes", "fp32,bf16-mixed", "--output-dir", tmp_path / "cmp")
    assert code == 130
    said = " ".join(out.split())
    assert (f"interrupted during bf16-mixed; closed: fp32 — `sarkd-diag report {tmp_path / 'cmp'}` compares them, "
            "`--overwrite` starts the comparison again") in said


def test_counted_agrees_with_its_number():
    from sarkd_diag.contract.wording import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert counted(1, "process") == "1 process" and counted(2, "process") == "2 processes"
    assert counted(1, "critical event") == "1 critical event" and counted(3, "critical event") == "3 critical events"
    assert counted(1234, "parameter", number="1,234") == "1,234 parameters"


# ------------------------------------------------------------------------------ a closed pipe
def _reader_gone(args: list, cwd: Path) -> tuple[int, str]:
    """Run the real CLI with its standard output a pipe whose reader has already gone (`... | head -0`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sarkd_diag", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=cwd, env=env)
    process.stdout.close()  # before the command has printed anything
    err = process.stderr.read().decode()
    return process.wait(timeout=300), err


@pytest.mark.parametrize("args", [["-h"], ["train", "-h"], ["--version"], ["env"], ["events", "RUN"],
                                  ["events", "RUN", "--format", "csv"], ["check", "RUN", "--expect", "completed"],
                                  ["estimate-memory"]], ids=lambda a: " ".join(a))
def test_a_closed_pipe_ends_the_command_quietly_with_141(one_step, tmp_path, args):
    """`sarkd-diag events RUN | head`: exit 141 (128 + SIGPIPE, as a shell reports a Unix tool killed by it), nothing
    on stderr — it was a silent exit 1 (rich, click) or Python's 'Exception ignored ... BrokenPipeError'."""
    code, err = _reader_gone([one_step if a == "RUN" else a for a in args], tmp_path)
    assert (code, err) == (141, "")
    assert not (tmp_path / "sarkd-diag-error.txt").exists()


def test_train_into_a_closed_pipe_stops_after_its_step_with_the_run_closed(tiny_world, tmp_path):
    """`sarkd-diag train | head`: the run is not killed mid-step; it stops as on SIGINT (state saved, summary
    written, status interrupted), says so on stderr and exits 141."""
    run = tmp_path / "run"
    args = ["train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
            "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"], "--block-size", "16",
            "--per-device-batch-size", "2", "--train-steps", "50", "--precision", "fp32", "--output-dir", run]
    code, err = _reader_gone(args, tmp_path)
    assert code == 141, err
    assert err == "sarkd-diag: the output was closed (SIGPIPE): stopping after this step, saving state\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_completed"] < 50
    stops = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["message"].split(":")[0] for e in stops if e["kind"] == "interrupted"] == ["SIGPIPE"]


def test_a_broken_pipe_that_is_not_the_output_stays_an_internal_error(cli, tmp_path, monkeypatch):
    import sarkd_diag.presentation.environment as environment

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(environment, "environment_report", broken)
    code, _, err = cli("env")
    assert code == 3 and err.startswith("sarkd-diag: internal error: BrokenPipeError")


# ------------------------------------------------------------------------- --resume-from's errors
@pytest.mark.parametrize(("extra", "says"), [
    ([], "is at step 1 and --train-steps is 1; raise --train-steps"),
    (["--temperature", "3"], "was trained with other options (temperature 2.0 -> 3.0)"),
    (["--train-steps", "3", "--overwrite"], "--overwrite would delete the run that --resume-from continues"),
    (["--train-steps", "3", "--output-dir", "NEW", "--temperature", "3"], "was trained with other options"),
], ids=["at its last step", "other options in place", "with --overwrite", "other options elsewhere"])
def test_resume_from_errors_name_resume_from(cli, one_step, tmp_path, extra, says):
    """`--resume-from CHECKPOINT` was told `--resume: ...`, an option the user had not typed."""
    checkpoint = one_step / "checkpoints" / "step-00000001"
    before = sorted(p.name for p in one_step.rglob("*"))
    code, _, err = cli("train", "--resume-from", checkpoint, *[tmp_path / "new" if a == "NEW" else a for a in extra])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "--resume:" not in lines[0], lines
    assert lines[0].startswith("sarkd-diag: error: --resume-from") or "--resume-from continues" in lines[0]
    assert sorted(p.name for p in one_step.rglob("*")) == before and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------- usage errors
# (command line, the whole of stderr after `sarkd-diag: error: `): click's own words named the option twice
# ('--train-steps' / '--train_steps'), said "Input should be a valid integer, unable to parse string as an
# integer", and offered aliases help does not show; a `train` option given to estimate-memory was just
# "No such option".
USAGE_ERRORS = [
    (["check", "RUN", "--max-eval-ppl", "abc"], "--max-eval-ppl 'abc': not a number (X)"),
    (["check", "RUN", "--max-skipped-steps", "1.5"], "--max-skipped-steps '1.5': not a whole number (N)"),
    (["events", "RUN", "--idle-timeout=soon"], "--idle-timeout 'soon': not a number (SECONDS)"),
    (["train", "--train-steps", "ten"], "--train-steps 'ten': not a whole number (N)"),
    (["train", "--train_steps", "ten"], "--train_steps 'ten': not a whole number (N)"),
    (["estimate-memory", "--block-size", "big"], "--block-size 'big': not a whole number (N)"),
    (["compare-precision", "--steps", "x"], "--steps 'x': not a whole number (N)"),
    (["estimate-memory", "--train-steps", "3"],
     "estimate-memory has no option --train-steps (a `train` option; `sarkd-diag estimate-memory -h` lists its own)"),
    (["estimate-memory", "--student_lr", "3"],
     "estimate-memory has no option --student_lr (a `train` option; `sarkd-diag estimate-memory -h` lists its own)"),
    (["estimate-memory", "--precision", "mixed"], "estimate-memory has no option --precision: write --modes"),
    (["estimate-memory", "--block-siz", "3"], "estimate-memory has no option --block-siz: did you mean --block-size?"),
    (["estimate-memory", "--bogus"],
     "estimate-memory has no option --bogus (`sarkd-diag estimate-memory -h` lists them)"),
    (["estimate-memory", "extra"],
     "estimate-memory takes options only, no argument: 'extra' is not an option (`sarkd-diag estimate-memory -h`)"),
    (["train", "--learning-rate", "1e-3"], "train has no option --learning-rate: write --student-lr"),
    (["train", "--steps", "30"], "train has no option --steps: write --train-steps"),
    (["train", "--fp16"], "train has no option --fp16: write --precision mixed"),
    # other tools' names, each answered with this tool's (`--amp` was `did you mean --adam-eps?`)
    (["train", "--amp"], "train has no option --amp: write --precision mixed"),
    (["train", "--half"], "train has no option --half: write --precision mixed (fp16 compute, fp32 master weights; "
                          "--precision pure-fp16 is the model.half() run)"),
    (["train", "--gpu"], "train has no option --gpu: write --device cuda"),
    (["train", "--epochs", "3"],  # it said `did you mean --nproc?`
     "train has no option --epochs: write --train-steps N: a run counts optimizer steps, not passes over the data"),
    (["train", "--grad_clip", "1"], "train has no option --grad_clip: write --max-grad-norm"),
    # a near miss is measured without the `--` every option shares: `--bs` is not `--probes`, `--tokenizer` not
    # `--block-size`
    (["train", "--bs", "8"], "train has no option --bs: write --per-device-batch-size"),
    (["train", "--tokenizer", "gpt2"], "train has no option --tokenizer (`sarkd-diag train -h` lists them)"),
    (["train", "--no-eval"], "train has no option --no-eval (`sarkd-diag train -h` lists them)"),
    (["check", "RUN", "--max_eval_ppl", "3"], "--max_eval_ppl: write --max-eval-ppl (`sarkd-diag check -h`)"),
    (["events", "RUN", "--kin", "x"], "events has no option --kin: did you mean --kind?"),
    (["events", "RUN", "--json"], "events has no option --json: write --format json"),
    (["estimate-memory", "--format", "json"], "estimate-memory has no option --format: write --json"),
    (["--verson"], "sarkd-diag has no option --verson: did you mean --version?"),
    (["--train-steps", "3", "train"],
     "sarkd-diag has no option --train-steps: options of a command go after it (`sarkd-diag train --train-steps ...`)"),
    (["--precision", "fp32", "train"],  # not `did you mean --version?`: a command's option, before the command
     "sarkd-diag has no option --precision: options of a command go after it (`sarkd-diag train --precision ...`)"),
    (["--kind", "nonfinite_param", "events", "RUN"],
     "sarkd-diag has no option --kind: options of a command go after it (`sarkd-diag events --kind ...`)"),
    (["--modes", "fp32", "estimate-memory"],  # the command typed, of those that take it
     "sarkd-diag has no option --modes: options of a command go after it (`sarkd-diag estimate-memory --modes ...`)"),
    (["train", "--output-dir", "--train-steps", "3"],  # it said `'3' is not an option`, --train-steps the run dir
     "--output-dir needs a value, and the next word is the option --train-steps (--output-dir: run directory "
     "(default: a new runs/<date-time>-<mode>/))"),
    (["events", "RUN", "--kind", "--severity", "warning"],
     "--kind needs a value, and the next word is the option --severity (--kind: event kinds, comma-separated or "
     "repeated)"),
    (["evnts"], "sarkd-diag has no command 'evnts': did you mean events?"),
    (["events"], "events needs RUN_DIR: a run directory (a crashed one too) or a compare-precision directory"),
    (["events", "RUN", "RUN"], "events takes one RUN_DIR, not also 'RUN' (a path with spaces needs quotes)"),
    (["train", "--precision"],
     "--precision needs a value: fp32 | mixed | bf16-mixed | pure-fp16 | pure-bf16 | auto (or an alias)"),
    (["check", "RUN", "--max-eval-ppl"], "--max-eval-ppl needs a value: final validation perplexity at most X"),
]


@pytest.mark.parametrize(("args", "line"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_a_usage_error_is_one_line_that_names_the_option_and_what_it_takes(cli, one_step, tmp_path, monkeypatch,
                                                                           args, line):
    monkeypatch.chdir(tmp_path)
    run = str(one_step)
    code, out, err = cli(*[run if a == "RUN" else a for a in args])
    assert (code, out) == (2, "")
    assert err == f"sarkd-diag: error: {line.replace(chr(39) + 'RUN' + chr(39), repr(run))}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "line"), [
    (["report", "--output-dir", "{run}"],
     "report has no option --output-dir: report takes the RUN_DIR as its argument (`sarkd-diag report {run}`)"),
    (["check", "--run={run}", "--expect", "completed"],
     "check has no option --run: check takes the RUN_DIR as its argument (`sarkd-diag check {run} --expect "
     "completed`)"),
    (["train", "{run}", "--resume"],
     "train takes options only, no argument: '{run}' is not an option; a run directory is given as --output-dir {run} "
     "(`sarkd-diag train -h`)"),
], ids=["report --output-dir RUN", "check --run=RUN", "train RUN"])
def test_a_run_directory_typed_in_the_wrong_form_is_answered_with_the_right_one(cli, one_step, args, line):
    """`report --output-dir RUN` said it was `a train option`, `check --run RUN` only `no option --run`, and
    `train RUN --resume` that RUN `is not an option`: the directory was right there, the form to give it in was not."""
    code, out, err = cli(*[a.format(run=one_step) for a in args])
    assert (code, out) == (2, "")
    assert err == f"sarkd-diag: error: {line.format(run=one_step)}\n"


# -------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["events", "check", "report"])
def test_help_shows_an_argument_as_it_is_typed(cli, command):
    """typer wrote `Usage: sarkd-diag events [OPTIONS] {RUN_DIR}` — braces to type? — and `RUN_DIR <path>`."""
    code, out, _ = cli(command, "-h")
    assert code == 0
    assert out.startswith(f"Usage: sarkd-diag {command} [OPTIONS] RUN_DIR\n")
    assert "{" not in out and "<path>" not in out
    assert any(line.startswith("  RUN_DIR  A run directory") for line in out.splitlines())


def test_the_command_list_is_not_cut_off(cli):
    """The bare command's first screen: each command's summary whole at 80 columns, not 'Device memory per
    precision mode — weights,...'."""
    code, out, _ = cli("-h")
    commands = out.split("Commands:\n", 1)[1].splitlines()
    assert code == 0 and len(commands) == 7
    assert all(len(line) <= 80 and not line.endswith("...") for line in commands), commands


def test_help_of_router_patterns_states_one_default(cli):
    """It said '(default: gate, router). [default: none]'."""
    code, out, _ = cli("train", "-h")
    text = " ".join(out.split())
    assert "[default: gate, router]" in text and "[default: none]" not in text.split("--router-patterns")[1][:150]


# ------------------------------------------------------------------------------ run directories
@pytest.mark.parametrize("command", ["events", "report", "check"])
@pytest.mark.parametrize("content", ["nothing", "a model"])
def test_a_directory_that_holds_no_run_says_what_to_give(cli, tiny_world, tmp_path, command, content):
    folder = tmp_path / "folder"
    if content == "a model":
        shutil.copytree(tiny_world["student"], folder)
    else:
        folder.mkdir()
    code, out, err = cli(command, folder, *(["--expect", "completed"] if command == "check" else []))
    assert (code, out) == (2, "")
    why = "it is empty" if content == "nothing" else "its config.json is not a run's: a model's?"
    assert err == (f"sarkd-diag: error: {folder} is neither a sarkd-diag run directory nor a compare-precision "
                   f"directory ({why}); give the directory `sarkd-diag train` wrote (its --output-dir, by default "
                   "runs/<date-time>-<mode>/)\n")


def test_a_run_whose_config_json_is_damaged_is_said_so_not_called_a_model(cli, one_step, tmp_path):
    """A run's config.json cut short or mis-edited: `report` called the run `not a run's: a model's?` while `events`
    read it and `check` sent the user to `report` to close it."""
    run = Path(shutil.copytree(one_step, tmp_path / "run"))
    (run / "summary.json").unlink()
    (run / "config.json").write_text('{"options": {\n')
    code, out, err = cli("report", run)
    assert (code, out) == (2, "")
    assert err == (f"sarkd-diag: error: {run}/config.json is not valid JSON (Expecting property name enclosed in "
                   "double quotes: line 2 column 1 (char 14)): a run directory is read through it; restore it whole, "
                   "or give another directory\n")


def test_a_command_offered_for_a_run_whose_path_has_spaces_runs_as_printed(cli, one_step, tmp_path):
    """A run in `my runs/a b`: report and check offered `sarkd-diag train --output-dir my runs/a b --resume`, which a
    shell splits into three words; every command a message offers now quotes such a path."""
    import shlex

    (tmp_path / "my runs").mkdir()
    run = _unclosed_copy(one_step, tmp_path / "my runs", "a b")
    code, said, _ = cli("check", run, "--expect", "completed")
    assert code == 1 and f"(`sarkd-diag report '{run}'` closes it)" in said
    code, out, err = cli("report", run)
    assert code == 0, err
    offered = out.splitlines()[-1].removeprefix("continue it: ")
    assert shlex.split(offered) == ["sarkd-diag", "train", "--output-dir", str(run), "--resume"]
    assert f"- continue it: `{offered}`" in (run / "report.md").read_text()


def test_check_names_a_wrong_run_directory_before_missing_expectations(cli, tmp_path):
    """`check runs/typo` said 'give at least one expectation'; fixed that, the user then learnt the path was wrong."""
    code, _, err = cli("check", tmp_path / "typo")
    assert code == 2 and err == f"sarkd-diag: error: {tmp_path / 'typo'}: no such directory\n"


def test_an_interrupted_run_says_how_to_continue_it(cli, tiny_world, tmp_path):
    """Ctrl-C: the panel said 'status: interrupted after N steps' and `check` 'status is interrupted', neither
    what to type next. Both now give the command, and that command continues the run."""
    run = tmp_path / "run"
    args = ["train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
            "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"], "--block-size", "16",
            "--per-device-batch-size", "2", "--train-steps", "400", "--precision", "fp32", "--log-every", "1",
            "--output-dir", run]
    process = subprocess.Popen([sys.executable, "-m", "sarkd_diag", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step "):  # training has begun: Ctrl-C
            process.send_signal(signal.SIGINT)
            break
    out = process.stdout.read()
    assert process.wait(timeout=300) == 130, process.stderr.read()
    resume = f"sarkd-diag train --output-dir {run} --resume"
    panel = " ".join(part.strip("│ ") for part in out.splitlines())
    assert f"continue it: {resume}" in panel, out
    code, out, _ = cli("check", run, "--expect", "completed")
    assert code == 1 and out == f"{run}: completed: status is interrupted; `{resume}` continues it\n"
    steps = json.loads((run / "summary.json").read_text())["steps_completed"]
    code, out, err = cli(*resume.split()[1:], "--train-steps", steps + 1)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps_completed"] == steps + 1


def test_ctrl_c_before_the_first_step_does_not_claim_a_saved_state(cli, tiny_args, monkeypatch):
    """Ctrl-C during the evaluation before step 1 said `stopped after step 0; state saved`, and `--resume` then
    answered that the run had no checkpoint: none is written of step 0."""
    from sarkd_diag.train import loop

    evaluate = loop.Trainer._evaluate

    def evaluate_then_ctrl_c(self):
        evaluate(self)
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGINT)  # the handler `train` installed takes it, as from a terminal

    monkeypatch.setattr(loop.Trainer, "_evaluate", evaluate_then_ctrl_c)
    code, out, err = cli("train", *tiny_args, "--precision", "fp32")
    assert code == 130, err
    run = Path(tiny_args[-1])
    interrupted = [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
                   if e["kind"] == "interrupted"]
    assert [e["message"] for e in interrupted] == ["SIGINT: stopped after step 0; no checkpoint (none is written of "
                                                   "step 0 or of non-finite weights)"]
    assert not (run / "checkpoints").exists() and "state saved" not in out


@contextlib.contextmanager
def _held_open(path: Path, mode: str):
    """Another process holding `path` open in `mode` ('a': a run's writer; 'r': a reader, as `tail -f` is) until
    the block ends; yields its pid."""
    code = f"import sys; f = open({str(path)!r}, {mode!r}); print('open', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "open\n"
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def _unclosed_copy(run: Path, tmp_path: Path, name: str = "live") -> Path:
    """The run as it stands while it trains (or after kill -9): its logs without summary.json, and without the final
    evaluation only a completed run has."""
    copy = Path(shutil.copytree(run, tmp_path / name))
    (copy / "summary.json").unlink()
    rows = (copy / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["split"] == "eval"
    (copy / "metrics.jsonl").write_text("".join(row + "\n" for row in rows[:-1]))
    return copy


def test_report_refuses_a_run_another_process_is_still_writing(cli, one_step, tmp_path):
    """`report` of a run still training in another terminal closed it as crashed: summary.json said so, `check
    --expect completed` failed it and `events --follow` stopped following a run that went on."""
    run = _unclosed_copy(one_step, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with _held_open(run / "events.jsonl", "a") as pid:
        code, out, err = cli("report", run)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"sarkd-diag: error: {run} is still being written by process "
                                                    f"{pid}: `sarkd-diag events {run} --follow` shows it"), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    code, out, err = cli("report", run)  # its process gone: closed as crashed
    assert code == 0 and out.startswith(f"{run}: crashed, 1 step"), err


@pytest.mark.parametrize("extra", [["--overwrite"], ["--resume", "--train-steps", "2"], []],
                         ids=["overwrite", "resume", "same options"])
def test_train_refuses_an_output_dir_another_process_is_still_writing(cli, one_step, tmp_path, extra):
    """`train --output-dir RUN --overwrite` while RUN still trained in another terminal deleted the live run's logs
    under it; `--resume` would have had two processes append to them."""
    run = _unclosed_copy(one_step, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with _held_open(run / "metrics.jsonl", "a") as pid:
        code, out, err = cli("train", "--config", one_step / "config.json", "--output-dir", run, *extra)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sarkd-diag: error: --output-dir {run} is still being written by process {pid}"), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("held", ["metrics.jsonl", "events.jsonl"])
def test_probes_refuse_a_run_dir_another_process_is_still_writing(one_step, tmp_path, held):
    """`Probes(model, run_dir=RUN)` while RUN still trained (or another script's probes wrote it) appended to the live
    logs: steps numbered twice, and its close() wrote summary.json of a run still going. Refused, with the pid,
    before a hook is placed; once the writer is gone the directory is continued as before."""
    import torch

    from sarkd_diag import Probes
    from sarkd_diag.contract.errors import BadInput

    run = _unclosed_copy(one_step, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "options": {}}))  # the probes' run, no train run's
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    model = torch.nn.Linear(2, 2)
    with _held_open(run / held, "a") as pid, pytest.raises(BadInput) as refused:
        Probes(model, run_dir=run)
    assert str(refused.value) == (f"run_dir={str(run)!r} is still being written by process {pid}: let that run end "
                                  "first, or give another run_dir")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not model._forward_hooks and not model._forward_pre_hooks
    with Probes(model, run_dir=run) as probes:
        assert probes.first_step == 2  # the writer gone: continued after the run's last step


def _model_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def _notes_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine\n")
    return path


def _a_file(path: Path) -> Path:
    path.write_text("x")
    return path


def _train_run(path: Path) -> Path:
    """What `sarkd-diag train` leaves: its config.json (every option, the precision) and its logs."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"options": {"train_steps": 6, "student_lr": 3e-3},
                                                  "precision": {"mode": "fp32"}}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n")
    return path


def _comparison(path: Path) -> Path:
    path.mkdir()
    (path / "compare_options.json").write_text('{"options": {}, "modes": ["fp32"]}')
    return path


@pytest.mark.parametrize(("make", "says"), [
    (_model_dir, "holds a config.json that is not a sarkd-diag run's: give a new or empty directory (or a run "
                 "directory to continue)"),
    (_notes_dir, "holds files and no sarkd-diag run: give a new or empty directory (or a run directory to continue)"),
    (_a_file, "is a file, not a directory"),
    (_comparison, "is a compare-precision directory: give the probes a directory of their own"),
    (_train_run, "holds a `sarkd-diag train` run, which the probes of a loop cannot continue (their config.json would "
                 "replace its own): give a new or empty directory (or a Probes run to continue)"),
], ids=["model directory", "other files", "file", "comparison", "train run"])
def test_probes_refuse_a_run_dir_that_holds_something_else(tmp_path, make, says):
    """`SarkdDiagCallback.attach(trainer, trainer.args.output_dir)` after a save, or `Probes(model, run_dir=".")`:
    the probes wrote their logs and parquet files among a model's files and then failed at close with KeyError
    'precision' on the model's config.json; a file was FileExistsError. Refused, as train's --output-dir is."""
    import torch

    from sarkd_diag import Probes
    from sarkd_diag.contract.errors import BadInput

    path = make(tmp_path / "target")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(BadInput) as refused:
        Probes(torch.nn.Linear(2, 2), run_dir=path)
    assert str(refused.value) == f"run_dir={str(path)!r} {says}"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_probes_left_open_in_this_process_is_closed_by_the_next_on_its_run_dir(tmp_path):
    """A notebook cell `probes = Probes(model, run_dir=RUN)` run again after its loop raised (never closed): the first
    probes' hooks stayed on the model and recorded every event a second time into the same logs. The new one closes it
    as interrupted, removes its hooks and continues the run."""
    import torch

    from sarkd_diag import Probes, load_run

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(probes):
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        optimizer.step()
        probes.step(loss=loss)
        optimizer.zero_grad()

    first = Probes(model, optimizer, run_dir=tmp_path / "run")
    train_step(first)
    with Probes(model, optimizer, run_dir=tmp_path / "run") as second:
        assert first._closed and second.first_step == 2
        train_step(second)
    assert not (model._forward_hooks or model._forward_pre_hooks or optimizer._optimizer_step_pre_hooks
                or optimizer._optimizer_step_post_hooks)  # the first's went with it
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == [1, 2] and run["summary"]["status"] == "completed"
    (note,) = run["events"].query("code == 'stale_probes_closed'").to_dict("records")
    assert note["step"] == 2 and "still open after step 1" in note["message"]
    assert run["events"]["code"].value_counts().max() == 1  # nothing recorded twice


def test_an_error_inside_the_probes_recording_is_the_error_the_loop_sees(tmp_path, monkeypatch):
    """A probe's own recording that raised inside `probes.step()` (a full disk as its events are written, a bug) was
    followed at close by a second error — the step's readings taken again from an empty stack — which the notebook
    saw in place of the first. Now the first is what the `with` block raises, and the run reads as failed by it."""
    import errno

    import torch

    from sarkd_diag import Probes, load_run
    from sarkd_diag.probes.gradients import GradientProbe

    def full_disk(self, host):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GradientProbe, "record", full_disk)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(OSError, match="No space left on device") as raised, \
            Probes(model, optimizer, run_dir=tmp_path / "run") as probes:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        probes.step(loss=loss)
    assert raised.value.__context__ is None  # the first error itself, no second one raised while closing
    summary = load_run(tmp_path / "run")["summary"]
    assert summary["status"] == "failed"
    assert summary["error"]["message"] == "OSError: [Errno 28] No space left on device"


def test_a_probes_that_failed_to_build_is_not_taken_for_one_left_open(tmp_path, monkeypatch):
    """A Probes whose construction raised after its run directory opened was registered as open: the next one on the
    directory 'closed' the half-built object — a summary written for it and a stale_probes_closed note for a run
    that never was. It left its hooks on the model and torch's clipping function replaced, too."""
    import torch

    import sarkd_diag.probes as probes_module
    from sarkd_diag import Probes, load_run

    def broken(self, step):
        raise RuntimeError("setup failed")

    model = torch.nn.Linear(2, 2)
    clipping = torch.nn.utils.clip_grads_with_norm_
    with monkeypatch.context() as patched:
        patched.setattr(probes_module.Probes, "_check_scaler_dtypes", broken)
        with pytest.raises(RuntimeError, match="setup failed"):
            Probes(model, run_dir=tmp_path / "run")
    assert not (model._forward_hooks or model._forward_pre_hooks)  # and torch's clipping is its own again:
    assert torch.nn.utils.clip_grads_with_norm_ is clipping  # a failed Probes left both in place
    with Probes(model, run_dir=tmp_path / "run"):
        pass
    assert "stale_probes_closed" not in load_run(tmp_path / "run")["events"]["code"].tolist()


def test_check_of_a_run_still_training_says_so_rather_than_offer_report(cli, one_step, tmp_path):
    """`check --expect completed` said `still running, or it crashed (sarkd-diag report RUN closes it)` of a run
    whose process was plainly alive, and `report` refuses such a run."""
    run = _unclosed_copy(one_step, tmp_path)
    with _held_open(run / "events.jsonl", "a") as pid:
        code, out, err = cli("check", run, "--expect", "completed")
    assert (code, err) == (1, "")
    assert out == f"{run}: completed: no summary.json yet: the run is still training (process {pid} writes it)\n"


def test_compare_precision_overwrite_refuses_a_comparison_still_running(cli, one_step, tmp_path):
    """`compare-precision --overwrite --output-dir OUT` while OUT's comparison still ran removed its runs/ and logs/
    under the running modes."""
    out = tmp_path / "cmp"
    shutil.copytree(one_step, out / "runs" / "fp32")
    (out / "logs").mkdir()
    (out / "logs" / "fp32.log").write_text("")
    (out / "compare_options.json").write_text(json.dumps({"options": {}, "modes": ["fp32"]}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with _held_open(out / "logs" / "fp32.log", "a") as pid:
        code, _, err = cli("compare-precision", "--modes", "fp32", "--output-dir", out, "--overwrite")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sarkd-diag: error: --output-dir {out} is still being written by process {pid}"), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_process_that_only_reads_the_logs_is_no_live_run(cli, one_step, tmp_path):
    """`tail -f events.jsonl` in another terminal made a killed run look alive: `events --follow` waited for it."""
    from sarkd_diag.presentation.query import holds_open

    run = _unclosed_copy(one_step, tmp_path)
    with _held_open(run / "events.jsonl", "r"):
        assert holds_open([run / "events.jsonl"]) is False
        code, out, err = cli("report", run)
    assert code == 0 and out.startswith(f"{run}: crashed, 1 step"), err


def test_a_runs_config_as_a_template_says_a_new_run_needs_another_output_dir(cli, one_step, tmp_path):
    """`train --config RUN/config.json` (README: a run's config.json works) reuses the run's --output-dir: the error
    offered --resume or --overwrite only, neither of them a new run from the same options; and it named an
    --output-dir the user never typed, not the config file it came from."""
    code, _, err = cli("train", "--config", one_step / "config.json")
    assert code == 2
    assert err == (f"sarkd-diag: error: --config {one_step / 'config.json'}'s output_dir {one_step} holds a run "
                   "already; pass --resume to continue it, --overwrite to replace it, or another --output-dir for a "
                   "new run\n")


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch):
    """A sweep launched with `&` and the default --output-dir: each run found runs/<date-time>-<mode>/ free, and
    created it only once its models had loaded, so runs started in the same second wrote one directory."""
    import datetime

    from sarkd_diag.contract import rundir

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 5, 8, 31, 59)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first, second = rundir.default_run_dir("fp32"), rundir.default_run_dir("fp32")
    assert (first, second) == (Path("runs/20261205-083159-fp32"), Path("runs/20261205-083159-fp32-2"))
    assert first.is_dir() and second.is_dir()


def test_bad_input_found_after_the_default_directory_was_made_leaves_none(cli, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
                       "--train-file", tmp_path / "typo.txt")
    assert code == 2 and "no such file" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- data options
def test_dataset_config_name_without_dataset_name_is_refused(cli, tmp_path, monkeypatch):
    """It was silently ignored: a whole run on the embedded corpus, not the wikitext the user asked for."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--dataset-config-name", "wikitext-2-raw-v1")
    assert (code, out) == (2, "")
    assert err == ("sarkd-diag: error: --dataset-config-name wikitext-2-raw-v1 configures a --dataset-name, and none "
                   "is given (e.g. --dataset-name 'wikitext' --dataset-config-name 'wikitext-2-raw-v1')\n")
    assert list(tmp_path.iterdir()) == []


def test_a_validation_file_is_read_with_a_hub_dataset(cli, tiny_world, tmp_path, monkeypatch):
    """--dataset-name with --validation-file: the file was silently ignored (the set's split, or a held-out 5%)."""
    import sarkd_diag.train.data as data

    train_text = data.read_text_file(str(tiny_world["train"]))
    monkeypatch.setattr(data, "_load_hub_corpus", lambda name, config: data.Corpus(train_text, None, f"hub:{name}"))
    run = tmp_path / "run"
    code, _, err = cli("train", "--dataset-name", "some/set", "--validation-file", tiny_world["valid"],
                       "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
                       "--block-size", "16", "--per-device-batch-size", "2", "--train-steps", "1", "--precision",
                       "fp32", "--output-dir", run)
    assert code == 0, err
    recorded = json.loads((run / "config.json").read_text())["data"]
    assert (recorded["source"], recorded["validation"]) == ("hub:some/set", "given")


def test_options_this_run_will_not_read_are_said_at_setup(cli, tiny_world, tmp_path):
    """`--warmup-steps 5` without `--use-scheduler` trained without warmup, in silence."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
                         "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"],
                         "--block-size", "16", "--per-device-batch-size", "2", "--train-steps", "1", "--precision",
                         "fp32", "--output-dir", run, "--warmup-steps", "5", "--jsd-beta", "0.3")
    assert code == 0, err
    assert "warning: setup_note: --warmup-steps 5 has no effect without --use-scheduler\n" in out
    assert "warning: setup_note: --jsd-beta 0.3 has no effect without --kd-loss jsd\n" in out
    notes = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum("has no effect without" in e["message"] for e in notes if e["kind"] == "setup_note") == 2


def test_a_warm_up_as_long_as_the_run_is_said_at_setup(cli, tiny_world, tmp_path):
    """`--use-scheduler --warmup-steps 5 --train-steps 2` trained at 0 and then 40% of --student-lr, in silence: a
    warm-up the run never finishes (a typo of 500 for 50 does the same to a long run)."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
                         "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"],
                         "--block-size", "16", "--per-device-batch-size", "2", "--train-steps", "2", "--precision",
                         "fp32", "--probes", "off", "--output-dir", run, "--use-scheduler", "--warmup-steps", "5")
    assert code == 0, err
    said = ("--warmup-steps 5 is not below --train-steps 2: the learning rate rises for the whole run and never "
            "reaches --student-lr 0.002")
    assert f"warning: setup_note: {said}\n" in out
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert lrs == pytest.approx([0.0, 0.002 * 1 / 5])  # what the note says: the warm-up was still rising


def test_idle_timeout_without_follow_is_refused(cli, one_step):
    code, out, err = cli("events", one_step, "--idle-timeout", "5")
    assert (code, out) == (2, "")
    assert err == ("sarkd-diag: error: --idle-timeout only applies with --follow (it ends following after that long "
                   "without a write)\n")


def test_events_that_match_nothing_say_so_in_one_line(cli, one_step):
    """It printed a table title and column headers over no rows."""
    code, out, err = cli("events", one_step, "--severity", "critical")
    total = len((one_step / "events.jsonl").read_text().splitlines())
    assert code == 0, err
    assert out == f"no event matches these filters (of {total} events recorded)\n"


# ------------------------------------------------------------------------------------ --config
def test_a_yaml_config_is_read_as_meant(cli, tiny_world, tmp_path):
    """PyYAML reads `1e-3` as a string (refused: 'expected a number, got '1e-3''), `probes: off` as False
    (refused: 'got False'); a quoted 'no' for a flag was a true value (the scheduler ran); a single router pattern
    became one regex per character."""
    config = tmp_path / "run.yaml"
    config.write_text("student_lr: 1e-3\nprobes: off\nuse_scheduler: 'no'\nrouter_patterns: gate\ntrain_steps: 1\n"
                      f"teacher_model: {tiny_world['teacher']}\nstudent_model: {tiny_world['student']}\n"
                      f"train_file: {tiny_world['train']}\nvalidation_file: {tiny_world['valid']}\n"
                      "block_size: 16\nper_device_batch_size: 2\nprecision: fp32\n")
    run = tmp_path / "run"
    code, _, err = cli("train", "--config", config, "--output-dir", run)
    assert code == 0, err
    options = json.loads((run / "config.json").read_text())["options"]
    assert (options["student_lr"], options["probes"], options["use_scheduler"], options["router_patterns"]) == \
        (1e-3, "off", False, ["gate"])


@pytest.mark.parametrize(("line", "says"), [
    ("use_scheduler: maybe", "use_scheduler: 'maybe' is not true or false"),
    ("train_steps: 1.5", "train_steps: 1.5 is not a whole number"),
    ("student_lr: fast", "student_lr: 'fast' is not a number"),
    ("router_patterns: [1]", "router_patterns: [1] is not a list of strings"),
])
def test_a_config_value_of_the_wrong_kind_names_the_file_and_option(cli, tmp_path, monkeypatch, line, says):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(line + "\n")
    code, out, err = cli("train", "--config", config)
    assert (code, out) == (2, "")
    assert err == f"sarkd-diag: error: --config {config}: {says}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_a_run_that_raises_says_what_failed_and_where_the_details_are(cli, tiny_args, monkeypatch):
    """An exception in training (exit 3) ended in a panel of `status: failed` and `no numerical problems found`:
    nothing said what failed. Now the panel, report.md, summary.json and `events` carry the exception's line, the
    step and phase it was raised in, and the file that holds its traceback; the console says it once (stderr)."""
    from sarkd_diag.train.loop import Trainer

    real = Trainer._forward_backward

    def fails_at_step_2(self, *args, **kwargs):
        if self.step == 2:
            raise RuntimeError("expected scalar type Float but found\nHalf")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_forward_backward", fails_at_step_2)
    code, out, err = cli("train", *tiny_args, "--precision", "fp32")
    run = Path(tiny_args[-1])
    said = "RuntimeError: expected scalar type Float but found Half; traceback in traceback.txt"
    assert code == 3 and err.count("\n") == 1 and "expected scalar type Float" in err
    panel = " ".join(out[out.index("diagnosis"):].replace("│", " ").split())
    assert f"error at step 2 (forward): {said}" in panel and "no numerical problems found" not in panel
    assert "no numerical cause: what was measured stayed finite up to step 1" in panel
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == {"message": said, "step": 2, "phase": "forward"}
    assert said in " ".join((run / "report.md").read_text().split()) and (run / "traceback.txt").is_file()
    code, out, _ = cli("events", run, "--kind", "run_error", "--format", "json")
    assert code == 0 and [(e["step"], e["message"]) for e in json.loads(out)] == [(2, said)]
    code, out, _ = cli("check", run, "--expect", "no-critical")
    assert (code, out) == (1, f"{run}: no-critical: 1 critical event (run_error 1), first at step 2: {said}\n")


def test_check_says_one_line_per_failed_expectation_whatever_the_event_message(cli, tmp_path):
    """An event message of several lines (an exception's, a user loop's) made `check` print a line that was not one
    of its own."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    event = {"kind": "nonfinite_param", "severity": "critical", "message": "NaN in\n  the weights", "step": 3,
             "micro_step": 0, "rank": 0, "phase": "optimizer", "probe": "loop", "model": "student", "time": 1.0}
    (run / "events.jsonl").write_text(json.dumps(event) + "\n")
    code, out, _ = cli("check", run, "--expect", "no-critical")
    assert (code, out) == (1, f"{run}: no-critical: 1 critical event (nonfinite_param 1), first at step 3 in student: "
                              "NaN in the weights\n")


@pytest.mark.parametrize("status", [None, "interrupted", "completed"])
def test_report_of_a_run_that_stopped_short_says_how_to_continue_it(cli, one_step, tmp_path, status):
    """A run killed (closed as crashed by `report`) or interrupted, with a checkpoint: its panel and `check` gave the
    command that continues it, `report` and report.md/.html did not — what to do next was in neither."""
    run = _unclosed_copy(one_step, tmp_path, "run")
    if status:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    code, out, _ = cli("report", run)
    said = f"continue it: sarkd-diag train --output-dir {run} --resume"
    assert code == 0 and (said in out.splitlines()) == (status != "completed"), out
    assert (f"- {said.replace(': ', ': `', 1)}`" in (run / "report.md").read_text()) == (status != "completed")
    assert (said.replace(": ", ": <code>", 1) in (run / "report.html").read_text()) == (status != "completed")


@pytest.mark.parametrize("evaluated", [(0,), (0, 3)], ids=["at step 0 only", "at steps 0 and 3"])
def test_max_eval_ppl_is_not_met_by_the_perplexity_before_training(cli, tmp_path, evaluated):
    """A run that stopped after its first step (pure fp16's NaN weights) has one evaluation, step 0's: `check
    --max-eval-ppl` passed it on the untrained student's perplexity, as if training had reached it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    rows = [{"step": s, "split": "eval", "eval_loss": 5.0, "eval_ppl": 148.4} for s in evaluated]
    rows += [{"step": s, "split": "train", "loss": 5.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    code, out, _ = cli("check", run, "--max-eval-ppl", "1000")
    if evaluated == (0,):
        assert (code, out) == (1, f"{run}: max-eval-ppl: no evaluation after step 0: its one perplexity, 148.4 at "
                                  "step 0, is the student's before training (the run ended before it evaluated "
                                  "again)\n")
    else:
        assert (code, out) == (0, f"{run}: ok — max-eval-ppl holds for 1 run\n")


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_report_names_a_causes_rank_only_in_a_run_of_several(cli, tmp_path, ranks):
    """report.md and report.html said `First seen at step 2 in student (rank 0).` of every one-process run: a rank the
    reader never set, read as something to look into."""
    run = tmp_path / "run"
    run.mkdir()
    precision = {"mode": "fp32", "requested": "fp32", "reason": "requested", "master_dtype": "float32"}
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": precision}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n"
                                               for s in (1, 2)))
    base = {"severity": "critical", "step": 2, "micro_step": 0, "phase": "optimizer", "probe": "parameters",
            "model": "student", "tensor": "w", "time": 1.0, "kind": "nonfinite_param", "message": "NaN in w"}
    (run / "events.jsonl").write_text(json.dumps({**base, "rank": 0}) + "\n")
    if ranks == 2:
        (run / "events.rank1.jsonl").write_text(json.dumps({**base, "rank": 1, "step": 3}) + "\n")
    code, _, err = cli("report", run)
    assert code == 0, err
    said = "First seen at step 2 in student / w" + (" (rank 0)." if ranks == 2 else ".")
    assert said in (run / "report.md").read_text() and said in (run / "report.html").read_text()
