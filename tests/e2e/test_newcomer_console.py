"""The console of a run as a newcomer read it (issue 14): decisions and warnings as one-line notices when they
happen, a log line every N steps without a terminal, the final panel's counts and wording."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from sarkd_diag.presentation.ui import TrainingDisplay, default_log_every


def _display(log_every=None, terminal=False) -> tuple[TrainingDisplay, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=terminal, color_system=None, highlight=False)
    return TrainingDisplay(console=console, log_every=log_every), out


def _event(kind, severity="info", message="", step=0, phase="setup", model=None, module=None, tensor=None,
           code=None):
    return SimpleNamespace(kind=kind, severity=severity, message=message, step=step, phase=phase, model=model,
                           module=module, tensor=tensor, code=code or kind)


def _summary(steps=4, diagnosis=(), counts=None, status="completed", first=500.0, last=300.0, skipped=0,
             scaling=False):
    return {"status": status, "steps_completed": steps, "precision": {"mode": "fp32", "loss_scaling": scaling},
            "final": {"first_eval_ppl": first, "eval_ppl": last, "skipped_steps": skipped},
            "event_counts": counts or {}, "diagnosis": list(diagnosis), "run_dir": "runs/x"}


def test_setup_warnings_and_decisions_are_one_line_notices():
    display, out = _display()
    display.alert(_event("precision_setup", message="precision fp32"))  # plain info: not a notice
    display.alert(_event("no_router", "warning", "teacher t has no MoE router: plain KD", model="teacher"))
    display.alert(_event("setup_note", "warning", "--on-nonfinite rollback without --save-steps: no checkpoint"))
    display.alert(_event("dual_tokenizer", message="teacher and student tokenize differently"))
    display.alert(_event("setup_note", message="resumed from checkpoints/step-00000030 at step 30 of 60", step=30,
                         code="resumed"))
    lines = out.getvalue().splitlines()
    assert lines == [
        "warning: no_router in teacher: teacher t has no MoE router: plain KD",
        "warning: setup_note: --on-nonfinite rollback without --save-steps: no checkpoint",
        "note: dual_tokenizer: teacher and student tokenize differently",
        "note: step 30 setup_note: resumed from checkpoints/step-00000030 at step 30 of 60",
    ]


def test_policy_skips_are_told_and_counted_in_the_panel():
    display, out = _display()
    for step in range(1, 6):
        display.alert(_event("policy_skip", "warning", f"gradient norm inf at step {step}: the step was skipped "
                             "before the optimizer ran", step=step, phase="policy"))
    display.summary(_summary(steps=5, counts={"policy_skip": 5}, skipped=5))
    text = out.getvalue()
    assert text.count("warning: step ") == 5 and "policy_skip" in text
    assert "5 steps skipped (non-finite gradients)" in text and "(of 5 steps)" in text
    assert "no numerical problems found" not in text and "no cause diagnosed, but steps were left out" in text


def test_restored_and_rolled_back_steps_are_counted_apart():
    display, out = _display()
    display.alert(_event("policy_skip", "warning", "the step's update was taken back", step=2, phase="policy",
                         code="skip_undone_update"))  # the code decides, not the wording
    display.alert(_event("policy_rollback", "warning", "rolled back to step-00000002", step=4, phase="policy"))
    display.summary(_summary(steps=6, skipped=1))
    text = out.getvalue()
    assert "1 step undone (weights restored from the pre-step copy)" in text
    assert "rolled back 1 time to a checkpoint" in text and "skipped (non-finite" not in text


def test_many_notices_of_one_kind_are_capped_with_a_pointer():
    display, out = _display()
    for step in range(1, 31):
        display.alert(_event("policy_skip", "warning", "the step was skipped", step=step, phase="policy"))
    text = out.getvalue()
    assert text.count("the step was skipped") == 10 and "further policy_skip events are not printed" in text
    assert display.actions["skipped"] == 30


def test_a_training_warning_is_told_once_per_kind():
    display, out = _display()
    for step in (5, 10, 15):
        display.alert(_event("lost_updates", "warning", "40% of updates lost", step=step, phase="optimizer"))
    assert out.getvalue().count("lost_updates") == 1


def test_a_warning_found_while_training_is_told_after_a_setup_warning_of_another_check_of_its_kind():
    """`setup_note` holds several checks: an unused option's warning at setup silenced the dual-tokenizer run's
    `kd_targets_few` at step 1 (the KD term over few tokens), and a resumed run's note silenced every later one."""
    display, out = _display()
    display.alert(_event("setup_note", "warning", "--jsd-beta 0.3 has no effect without --kd-loss jsd"))
    display.alert(_event("setup_note", message="resumed from step-00000002", step=2, code="resumed"))
    for step in (3, 4):
        display.alert(_event("setup_note", "warning", "the KD term covered 6 of 32 target tokens", step=step,
                             phase="loss", code="kd_targets_few"))
    text = out.getvalue()
    assert "--jsd-beta" in text and text.count("the KD term covered") == 1


def test_the_critical_line_and_the_panel_say_model_and_module_once():
    """README's pure-fp16 output: `in student:`, not `in student/student: student:`; the panel `in student`."""
    display, out = _display()
    display.alert(_event("optimizer_preflight", "critical", "student: optimizer eps=1e-08 is 0.0 in float16",
                         step=1, phase="optimizer", model="student", tensor="student"))
    display.summary(_summary(steps=1, status="stopped", diagnosis=[
        {"cause": "optimizer_eps_underflow", "severity": "critical", "model": "student", "module": "student",
         "first_step": 1, "fix": "train in `mixed`"}]))
    text = out.getvalue()
    assert "CRITICAL step 1 optimizer_preflight in student: optimizer eps=1e-08 is 0.0 in float16" in text
    assert "student/student" not in text and "student: student" not in text
    assert re.search(r"critical optimizer_eps_underflow at step 1 in student\s+│", text), text
    assert "after 1 step " in text and "1 steps" not in text


def test_a_diagnosis_with_missing_keys_still_renders():
    display, out = _display()
    display.summary(_summary(diagnosis=[{"cause": "divergence"}]))
    assert "divergence" in out.getvalue()


def test_no_evaluation_after_step_0_is_said_so():
    display, out = _display()
    display.eval_line(0, 522.162, 6.258)
    display.summary(_summary(steps=40, status="interrupted", first=522.162, last=522.162))
    text = out.getvalue()
    assert "522.162 → 522.162" not in text and "no evaluation after step 0" in text


def test_a_run_interrupted_before_its_first_step_reports_its_step_0_evaluation_only(tiny_world, tmp_path):
    """Ctrl-C during step 0's evaluation: the panel and report.md said 'validation perplexity: 522.154 → 522.154',
    a second evaluation that never happened."""
    import os
    import signal

    from sarkd_diag.contract.config import DistillConfig
    from sarkd_diag.train.loop import Trainer

    class InterruptedAtStep0(TrainingDisplay):
        def eval_line(self, step, ppl, loss):
            super().eval_line(step, ppl, loss)
            os.kill(os.getpid(), signal.SIGINT)

    out = io.StringIO()
    display = InterruptedAtStep0(console=Console(file=out, width=200, color_system=None, highlight=False))
    config = DistillConfig(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                           train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                           block_size=16, per_device_batch_size=2, train_steps=4, precision="fp32", probes="off",
                           output_dir=str(tmp_path / "run")).validate()
    result = Trainer(config, display).train()
    assert (result.status, result.summary["steps_completed"]) == ("interrupted", 0)
    first = f"{result.summary['final']['first_eval_ppl']:.3f}"
    said = f"validation perplexity: {first} at step 0; no evaluation after step 0 (the run ended before its first step)"
    assert said in out.getvalue() and f"{first} → {first}" not in out.getvalue(), out.getvalue()
    assert f"- {said}\n" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_log_lines_without_a_terminal():
    display, out = _display(log_every=2)
    display.start(5, 0, "runs/x")
    for step in range(1, 6):
        display.update(step, {"loss": 3.0, "lr": 1e-3, "tokens": 256})
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2nd step and the last
    assert all("loss 3" in line and "lr 1.00e-03" in line and "tok/s" in line and "ETA 0:00:0" in line
               for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


def test_default_log_lines_only_without_a_terminal():
    assert default_log_every(120) == 12 and default_log_every(5) == 1 and default_log_every(100_000) == 50
    quiet_terminal, out = _display(terminal=True)
    quiet_terminal.start(4, 0, "runs/x")
    quiet_terminal.update(1, {"loss": 3.0, "lr": 1e-3, "tokens": 8})
    quiet_terminal.stop()
    assert "step 1/4  loss" not in out.getvalue()
    piped, out = _display()
    piped.start(4, 0, "runs/x")
    for step in range(1, 5):
        piped.update(step, {"loss": 3.0, "lr": 1e-3, "tokens": 8})
    assert out.getvalue().count("\nstep ") == 4
    off, out = _display(log_every=0)
    off.start(4, 0, "runs/x")
    off.update(4, {"loss": 3.0, "lr": 1e-3, "tokens": 8})
    assert "step 4/4" not in out.getvalue()


# ------------------------------------------------------------------------------------- end to end
def test_a_run_tells_its_setup_warnings_and_logs_every_n_steps(cli, tiny_args, tiny_world):
    """A dense teacher (no_router), --on-nonfinite rollback without --save-steps, no terminal, --log-every 1."""
    args = [*tiny_args, "--teacher-model", tiny_world["dense_teacher"], "--train-steps", "2", "--eval-steps", "2",
            "--probes", "off", "--precision", "fp32", "--on-nonfinite", "rollback", "--log-every", "1"]
    code, out, err = cli("train", *args)
    assert code == 0, err
    assert "warning: no_router in teacher:" in out
    assert "warning: setup_note: --on-nonfinite rollback without --save-steps" in out
    assert "step 1/2  loss" in out and "step 2/2  loss" in out and "tok/s" in out
    config = json.loads((Path(tiny_args[-1]) / "config.json").read_text())
    assert config["options"]["log_every"] == 1


def test_a_resumed_run_says_so(cli, tiny_args):
    args = [*tiny_args, "--train-steps", "2", "--eval-steps", "2", "--probes", "off", "--precision", "fp32"]
    assert cli("train", *args)[0] == 0
    code, out, err = cli("train", *args[:-2], "--output-dir", tiny_args[-1], "--train-steps", "3", "--resume")
    assert code == 0, err
    assert "note: step 2 setup_note: resumed from" in out


def test_a_run_whose_steps_the_policy_undoes_says_so_as_it_happens_and_counts_them(cli, tiny_args):
    """pure-fp16 with eps=1e-8 (0 in fp16) makes every update non-finite; --on-nonfinite skip undoes each."""
    args = [*tiny_args, "--train-steps", "3", "--eval-steps", "3", "--precision", "pure-fp16",
            "--on-nonfinite", "skip"]
    code, out, err = cli("train", *args)
    assert code == 1, err  # the diagnosis is critical
    assert [f"warning: step {n} policy_skip" in out for n in (1, 2, 3)] == [True] * 3
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", out).split())  # the panel wraps at the console's width
    assert "3 steps undone (weights restored from the pre-step copy) (of 3 steps)" in text
    assert "critical optimizer_eps_underflow at step 1 in student" in text


@pytest.mark.parametrize("value", ["-1", "x"])
def test_log_every_is_validated(cli, tiny_args, value):
    code, _, err = cli("train", *tiny_args, "--log-every", value)
    assert code == 2 and "--log-every" in err and err.count("\n") == 1


def test_each_record_is_one_line_at_a_log_files_width():
    """Without a terminal the console is 80 columns wide: a log line with five-digit tokens/s or a critical event
    was folded over two lines (`ETA` / `0:00:16`), against the README's 'one line each'."""
    out = io.StringIO()
    display = TrainingDisplay(console=Console(file=out, width=80, color_system=None, highlight=False), log_every=1)
    display.start(400, 0, "runs/" + "x" * 90)
    display._started -= 1.0  # one second in: a rate and an ETA to print
    display.update(10, {"loss": 9.212, "lr": 2e-3, "tokens": 12_201})
    display.eval_line(10, 522.154, 6.258)
    display.alert(_event("optimizer_preflight", "critical", "optimizer eps=1e-08 is 0.0 in float16: any entry whose "
                         "squared gradient also rounds to 0 divides by zero and fills the weights with Inf/NaN",
                         step=1, phase="optimizer", model="student"))
    display.alert(_event("optimizer_state_underflow", "warning", "98.1% of second-moment entries are 0 although "
                         "their gradient is not: the squared gradient flushed to zero", step=1, phase="optimizer",
                         model="student", module="transformer.wte"))
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["sarkd-diag", "step", "eval", "CRITICAL", "warning:"], lines
    assert lines[1].startswith("step 10/400  loss 9.212") and re.search(r"ETA \d+:\d\d:\d\d$", lines[1])
    assert lines[3].endswith("fills the weights with Inf/NaN") and max(map(len, lines)) > 80
