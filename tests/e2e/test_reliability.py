"""No lost work: exact resume, interrupts that save, kill -9 that `report` and `--resume` recover from, the
non-finite policies, out-of-memory handling, internal errors, and what a run may and may not write."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from contract import assert_conforms

from sarkd_diag import load_run
from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.presentation.closing import finalize_run
from sarkd_diag.presentation.ui import TrainingDisplay
from sarkd_diag.train import checkpoint as ckpt
from sarkd_diag.train.loop import Trainer
from sarkd_diag.train.objective import LogitKD

COMPARED = ("loss", "kd_loss", "ce_loss", "router_loss", "grad_norm", "lr", "loss_scale", "eval_loss")


def _config(world, out, **over) -> DistillConfig:
    base = dict(teacher_model=str(world["teacher"]), student_model=str(world["student"]),
                train_file=str(world["train"]), validation_file=str(world["valid"]), block_size=16,
                per_device_batch_size=2, train_steps=6, eval_steps=3, student_lr=3e-3, output_dir=str(out),
                precision="fp32", probes="off")
    return DistillConfig(**{**base, **over}).validate()


def _args(world, out, *extra) -> list[str]:
    return ["train", "--teacher-model", world["teacher"], "--student-model", world["student"], "--train-file",
            world["train"], "--validation-file", world["valid"], "--block-size", "16", "--per-device-batch-size",
            "2", "--eval-steps", "1000", "--precision", "fp32", "--probes", "off", "--output-dir", out, *extra]


def _rows(run_dir, split="train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _events(run_dir, kind=None) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]
    return [e for e in rows if kind is None or e["kind"] == kind]


def _summary(run_dir) -> dict:
    """The run directory conforms to docs/run-directory.md's contract; its summary."""
    assert_conforms(run_dir)
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _numbers(rows) -> list[tuple]:
    return [(r["step"],) + tuple(r.get(k) for k in COMPARED) for r in rows]


class SignalAt(TrainingDisplay):
    """A quiet display that sends this process a real signal once a given step is logged."""

    def __init__(self, step: int, sig: int = signal.SIGTERM):
        super().__init__(quiet=True)
        self.at, self.sig = step, sig

    def update(self, step, row):
        if step == self.at:
            os.kill(os.getpid(), self.sig)


# --------------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def dropout_student(tiny_world, tmp_path_factory) -> Path:
    """The tiny student with dropout on, so that a resume must restore the RNG to be exact."""
    path = tmp_path_factory.mktemp("dropout") / "student"
    shutil.copytree(tiny_world["student"], path)
    config = json.loads((path / "config.json").read_text())
    config.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed"])
def test_an_interrupted_run_resumes_bit_for_bit(tiny_world, dropout_student, tmp_path, mode):
    over = dict(train_steps=20, eval_steps=5, precision=mode, use_scheduler=True, warmup_steps=3, probes="standard",
                probe_every=4, student_model=str(dropout_student))
    whole = Trainer(_config(tiny_world, tmp_path / "whole", **over), TrainingDisplay(quiet=True)).train()
    assert whole.status == "completed"

    cut = Trainer(_config(tiny_world, tmp_path / "cut", **over), SignalAt(10)).train()
    assert (cut.status, cut.exit_code, cut.summary["steps_completed"]) == ("interrupted", 143, 10)
    assert [p.name for p in ckpt.list_checkpoints(cut.run_dir)] == ["step-00000010"]
    resumed = Trainer(_config(tiny_world, tmp_path / "cut", resume=True, **over), TrainingDisplay(quiet=True)).train()
    assert resumed.status == "completed"

    for split in ("train", "eval"):
        assert _numbers(_rows(cut.run_dir, split)) == _numbers(_rows(whole.run_dir, split)), split
    assert [r["step"] for r in _rows(cut.run_dir)] == list(range(1, 21))
    assert len(_events(cut.run_dir, "interrupted")) == 1
    assert any("resumed from" in e["message"] for e in _events(cut.run_dir, "setup_note"))
    _summary(cut.run_dir)


def test_train_steps_may_be_raised_on_resume_and_the_cli_needs_no_other_option(cli, tiny_world, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "4", "--overwrite"))
    assert code == 0, err
    code, _, err = cli("train", "--output-dir", out, "--resume")  # the recorded options come back
    assert code == 2 and "raise --train-steps" in err
    code, _, err = cli("train", "--config", out / "config.json", "--resume", "--train-steps", "7")
    assert code == 0, err
    assert [r["step"] for r in _rows(out)] == list(range(1, 8))
    assert json.loads((out / "config.json").read_text())["options"]["train_steps"] == 7
    assert _summary(out)["status"] == "completed"


def test_resume_from_an_older_checkpoint_into_a_new_directory(cli, tiny_world, tmp_path):
    src = tmp_path / "src"
    code, _, err = cli(*_args(tiny_world, src, "--train-steps", "6", "--save-steps", "2", "--save-total-limit", "5"))
    assert code == 0, err
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    fork = tmp_path / "fork"
    code, _, err = cli("train", "--resume-from", src / "checkpoints" / "step-00000002", "--output-dir", fork)
    assert code == 0, err
    assert [r["step"] for r in _rows(fork)] == list(range(1, 7))
    assert _numbers(_rows(fork)) == _numbers(_rows(src))  # the same steps again, exactly
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # the source run is untouched


# ------------------------------------------------------------------------------- real signals
def _spawn(world, out, *extra) -> subprocess.Popen:
    """`sarkd-diag train` in a real process (its stderr in a file beside the run, read by `_stderr`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(a) for a in _args(world, out, *extra)]
    err = open(Path(out).parent / "stderr.txt", "w")  # noqa: SIM115 - closed with the process by _finish
    proc = subprocess.Popen([sys.executable, "-m", "sarkd_diag", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=err, text=True)
    proc.err_file = err
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Wait for the process; its stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.err_file.close()
    return Path(proc.err_file.name).read_text()


def _wait_for_rows(proc: subprocess.Popen, out: Path, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and sum('"split": "train"' in line for line in path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {_finish(proc)}")
        time.sleep(0.05)
    proc.kill()
    _finish(proc)
    raise AssertionError(f"no {n} training rows within {timeout} s")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_everything_and_resume_continues(cli, tiny_world, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _spawn(tiny_world, out, "--train-steps", "100000")
    _wait_for_rows(proc, out, 3)
    proc.send_signal(sig)
    stderr = _finish(proc)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    summary = _summary(out)
    done = summary["steps_completed"]
    assert summary["status"] == "interrupted" and done >= 3
    assert [p.name for p in ckpt.list_checkpoints(out)] == [ckpt.step_dir_name(done)]
    assert (out / "student" / "model.safetensors").is_file()
    assert _events(out, "interrupted")[0]["message"].startswith(signal.Signals(sig).name)
    code, _, err = cli("train", "--output-dir", out, "--resume", "--train-steps", done + 2)
    assert code == 0, err
    assert [r["step"] for r in _rows(out)] == list(range(1, done + 3))


def test_a_run_started_ignoring_sigint_keeps_ignoring_it(tiny_world, tmp_path):
    """A script's `sarkd-diag train ... &` starts with SIGINT ignored (the shell's way of keeping a Ctrl-C meant for
    the script's foreground job away from its background ones, as nohup does for SIGHUP): train put its own handler
    in place, and the Ctrl-C stopped it too. It stays ignored; SIGTERM still stops the run, its state saved."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(a) for a in _args(tiny_world, out, "--train-steps", "100000")]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sarkd_diag", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        proc.err_file = err
        _wait_for_rows(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        done = len(_rows(out))
        _wait_for_rows(proc, out, done + 3)  # it trains on
        proc.send_signal(signal.SIGTERM)
        stderr = _finish(proc)
    assert proc.returncode == 143 and "SIGINT" not in stderr, stderr
    assert _summary(out)["status"] == "interrupted"


def test_a_rank_that_another_ranks_signal_stops_saves_and_says_why(tiny_world, tmp_path, monkeypatch):
    """Under torchrun every rank stops after the same step (an all-reduced flag), some before their own signal has
    arrived: such a rank saves as interrupted and names the other rank's signal (it used to crash on its own)."""
    from sarkd_diag.train.distributed import World

    trainer = Trainer(_config(tiny_world, tmp_path / "run"), TrainingDisplay(quiet=True))
    monkeypatch.setattr(World, "any_host_flag", lambda self, flag: flag or trainer.step >= 2)  # another rank's
    result = trainer.train()
    assert (result.status, result.exit_code, result.summary["steps_completed"]) == ("interrupted", 130, 2)
    (event,) = _events(result.run_dir, "interrupted")
    assert event["message"].startswith("a stop signal on another rank: stopped after step 2")
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step-00000002"]
    _summary(result.run_dir)


class SecondCtrlCAt(TrainingDisplay):
    """A quiet display that stops the run as a second Ctrl-C does (KeyboardInterrupt) once a given step is logged."""

    def __init__(self, step: int):
        super().__init__(quiet=True)
        self.at = step

    def update(self, step, row):
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("save_steps, kept", [(0, "no checkpoint was written yet to resume from"),
                                              (1, "nothing saved since step-00000001")])
def test_a_second_ctrl_c_says_which_step_it_stopped_and_what_a_resume_has(tiny_world, tmp_path, save_steps, kept):
    """A second Ctrl-C after step 2 was logged said "stopped during step 2; nothing saved since the newest checkpoint"
    — of a step whose row was written, and of a run that had no checkpoint at all."""
    trainer = Trainer(_config(tiny_world, tmp_path / "run", save_steps=save_steps), SecondCtrlCAt(2))
    result = trainer.train()
    assert (result.status, result.exit_code, result.summary) == ("interrupted", 130, {})  # closed as it stood
    (event,) = _events(result.run_dir, "interrupted")
    assert event["message"] == f"a second Ctrl-C: stopped after step 2; {kept}; the student was not saved"
    summary = finalize_run(result.run_dir)  # what `sarkd-diag report` writes of it
    assert (summary["status"], summary["steps_completed"]) == ("interrupted", 2)


SLOW_SAVES = {  # a save that has just begun (the marker written) and takes its time, as a real model's does
    "checkpoint": ("from sarkd_diag.train import checkpoint\n"
                   "saving = checkpoint.save\n"
                   "def slow(*args, **kwargs):\n"
                   "    saved = saving(*args, **kwargs)\n"
                   "    open(os.environ['SAVING'], 'w').close()\n"
                   "    time.sleep(120)\n"
                   "    return saved\n"
                   "checkpoint.save = slow\n"),
    "student": ("from transformers import PreTrainedModel\n"
                "def slow(self, path, *args, **kwargs):\n"
                "    os.makedirs(path, exist_ok=True)\n"
                "    open(os.environ['SAVING'], 'w').close()\n"
                "    time.sleep(120)\n"
                "PreTrainedModel.save_pretrained = slow\n"),
}


@pytest.mark.parametrize("during", SLOW_SAVES)
def test_a_second_ctrl_c_stops_at_once_keeps_the_logs_and_says_the_student_was_not_saved(cli, tiny_world, tmp_path,
                                                                                          during):
    """A second Ctrl-C while the first one's checkpoint was written went on to save the student and close the run in
    full (minutes for a real model); one while the student was saved left without a word on what was kept. Now
    either stops at once: the events and metrics stay as written, the run is interrupted, the student is not
    saved, and the line says so and what builds the rest."""
    out, saving = tmp_path / "run", tmp_path / "saving"
    script = "import os, sys, time\n" + SLOW_SAVES[during] + "from sarkd_diag.cli import main\nmain(sys.argv[1:])\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SAVING": str(saving)}
    args = [str(a) for a in _args(tiny_world, out, "--train-steps", "100000")]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        proc.err_file = err
        _wait_for_rows(proc, out, 3)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 120
        while not saving.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saving.exists(), "the save never began"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        stderr = _finish(proc, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - started < 30, stderr
    assert "Traceback" not in stderr and "without saving the student" in stderr, stderr
    assert f"`sarkd-diag report {out}` writes its summary and report" in " ".join(stderr.split()), stderr
    assert not (out / "student").exists() and not (out / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no half-built student left
    done = len(_rows(out))
    assert done >= 3 and [p.name for p in ckpt.list_checkpoints(out)] == [ckpt.step_dir_name(done)]
    assert _events(out, "interrupted")  # marked interrupted in its own log
    code, _, err = cli("report", out)
    assert code == 0, err
    assert (_summary(out)["status"], _summary(out)["steps_completed"]) == ("interrupted", done)


def test_after_kill_9_the_logs_hold_every_step_report_rebuilds_and_resume_continues(cli, tiny_world, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(tiny_world, out, "--train-steps", "100000", "--save-steps", "2")
    _wait_for_rows(proc, out, 5)
    proc.kill()
    _finish(proc)
    steps = [r["step"] for r in _rows(out)]  # every line parses: nothing torn
    assert steps == list(range(1, len(steps) + 1))
    code, _, err = cli("report", out)
    assert code == 0, err
    summary = _summary(out)
    assert summary["status"] == "crashed" and summary["steps_completed"] == steps[-1]
    saved = int(ckpt.list_checkpoints(out)[-1].name.split("-")[1])
    assert saved >= 4 and saved <= steps[-1]
    code, _, err = cli("train", "--output-dir", out, "--resume", "--train-steps", steps[-1] + 2)
    assert code == 0, err
    assert [r["step"] for r in _rows(out)] == list(range(1, steps[-1] + 3))  # redone steps are not duplicated
    assert _summary(out)["status"] == "completed"


def _kill_while_closing(run_dir: Path) -> None:
    """Close `run_dir` in a real process that is killed (SIGKILL) half-way through, as the report is rendered."""
    script = ("import os, signal, sys\n"
              "from sarkd_diag.presentation import closing, report\n"
              "report.write_html_report = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "closing.finalize_run(sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith("."))


def test_a_closing_killed_half_way_leaves_nothing_once_report_or_overwrite_runs(cli, tiny_world, tmp_path):
    """A process killed while closing a run left its hidden `.building-*` folder in the run directory for good: a later
    `report` and `--overwrite` built beside it and kept it. Now each removes what a dead process left, and only that."""
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "2"))
    assert code == 0, err
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _kill_while_closing(out)
    assert [name.split("-")[0] for name in _hidden(out)] == [".building"]  # what the killed closing left
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished  # its finished files intact
    code, _, err = cli("report", out)
    assert code == 0, err
    assert _hidden(out) == []
    assert _summary(out)["status"] == "completed"
    _kill_while_closing(out)
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "2", "--overwrite"))
    assert code == 0, err
    assert _hidden(out) == []


def test_a_run_killed_before_its_student_is_saved_is_not_completed(cli, tiny_world, tmp_path):
    """A `train` run killed after its final evaluation, while saving its student, was closed by `report` as
    `completed` with no student/ to show for it. Now the status is what the directory proves: crashed, and `--resume`
    finishes it (the student saved)."""
    out = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "from transformers import PreTrainedModel\n"
              "from sarkd_diag.cli import main\n"
              "def killed(self, path, *args, **kwargs):\n"
              "    os.makedirs(path, exist_ok=True)\n"
              "    open(os.path.join(path, 'config.json'), 'w').close()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "PreTrainedModel.save_pretrained = killed\n"
              "main(sys.argv[1:])\n")
    args = [str(a) for a in _args(tiny_world, out, "--train-steps", "2")]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert [r["step"] for r in _rows(out, "eval")] == [0, 2]  # killed after its final evaluation
    code, _, err = cli("report", out)
    assert code == 0, err
    assert _summary(out)["status"] == "crashed"
    assert not (out / "student").exists()
    code, _, err = cli("train", "--output-dir", out, "--resume")
    assert code == 0, err
    assert _summary(out)["status"] == "completed"
    assert (out / "student" / "model.safetensors").is_file()
    assert [r["step"] for r in _rows(out, "eval")] == [0, 2]  # its final evaluation not redone
    code, _, err = cli("train", "--output-dir", out, "--resume")  # a completed run has nothing left to do
    assert code == 2 and "raise --train-steps to train further" in err


# ---------------------------------------------------------------------------- non-finite policy
def _poison_weights(trainer: Trainer, at: set[int], once: bool = False):
    """Make the optimizer step of the given steps leave a NaN in the student's weights."""
    seen = set()

    def hook(optimizer, args, kwargs):
        if trainer.step in at and not (once and trainer.step in seen):
            seen.add(trainer.step)
            with torch.no_grad():
                trainer.trainable[0].view(-1)[0] = math.nan

    trainer.optimizer.register_step_post_hook(hook)


def _kinds(run_dir) -> list[str]:
    return [e["kind"] for e in _events(run_dir) if e["kind"].startswith("policy_")]


def test_stop_writes_everything_and_exits_1(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", save_steps=2), TrainingDisplay(quiet=True))
    _poison_weights(trainer, {3})
    result = trainer.train()
    assert (result.status, result.exit_code, result.summary["steps_completed"]) == ("stopped", 1, 3)
    assert _kinds(result.run_dir) == ["policy_stop"]
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step-00000002"]  # never NaN weights
    _summary(result.run_dir)


def test_resume_of_a_run_that_ended_with_nothing_saveable_says_why_there_is_no_checkpoint(cli, tiny_world, tmp_path):
    """A run stopped on NaN weights at step 2 (--save-steps 0) has no checkpoint: --resume said it ran with --save-steps
    0 and that after kill -9 or a crash there is none — neither of which happened. Its summary says what did."""
    trainer = Trainer(_config(tiny_world, tmp_path / "run"), TrainingDisplay(quiet=True))
    _poison_weights(trainer, {2})
    assert trainer.train().status == "stopped"
    code, out, err = cli("train", "--output-dir", tmp_path / "run", "--resume")
    assert (code, out) == (2, "")
    assert err == (f"sarkd-diag: error: --resume: nothing to resume, {tmp_path / 'run'} has no checkpoint yet: it was "
                   "stopped after 2 steps, and no checkpoint is written of step 0 or of non-finite weights. Start it "
                   "again (--overwrite)\n")


def test_skip_puts_back_the_pre_step_weights_and_optimizer_state(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", on_nonfinite="skip"), TrainingDisplay(quiet=True))
    _poison_weights(trainer, {3})
    kept = {}
    trainer.display.update = lambda step, row: kept.update({step: [p.detach().clone() for p in trainer.trainable]})
    result = trainer.train()
    assert result.status == "completed" and result.summary["steps_completed"] == 6
    assert _kinds(result.run_dir) == ["policy_skip"]
    assert all(torch.equal(a, b) for a, b in zip(kept[2], kept[3], strict=True))  # step 3 undone exactly
    assert [r["skipped"] for r in _rows(result.run_dir)] == [0, 0, 1, 0, 0, 0]
    assert all(torch.isfinite(p).all() for p in trainer.trainable)


def test_skip_skips_non_finite_gradients_before_the_optimizer_runs(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", on_nonfinite="skip"), TrainingDisplay(quiet=True))
    weight = trainer.trainable[-1]
    weight.register_hook(lambda g: g * math.inf if trainer.step == 2 else g)
    steps_run = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: steps_run.append(trainer.step))
    result = trainer.train()
    assert result.status == "completed"
    assert steps_run == [1, 3, 4, 5, 6]
    (skip,) = _events(result.run_dir, "policy_skip")
    assert skip["step"] == 2 and "before the optimizer ran" in skip["message"] and skip["tensor"]
    assert [r["skipped"] for r in _rows(result.run_dir)] == [0, 1, 0, 0, 0, 0]


def test_rollback_returns_to_the_newest_good_checkpoint_at_half_the_learning_rate(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", on_nonfinite="rollback", save_steps=2),
                      TrainingDisplay(quiet=True))
    _poison_weights(trainer, {5}, once=True)
    result = trainer.train()
    assert result.status == "completed"
    (event,) = _events(result.run_dir, "policy_rollback")
    assert event["step"] == 5 and "step-00000004" in event["message"] and event["value"] == 0.5
    rows = _rows(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6]  # the bad step stays on record, then is redone
    assert rows[-1]["lr"] == pytest.approx(rows[0]["lr"] / 2)
    newest = ckpt.load(ckpt.list_checkpoints(result.run_dir)[-1])  # persisted: a resume keeps the halved rate
    assert newest["policy"] == {"rollbacks": 1, "lr_factor": 0.5}
    assert newest["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 / 2)


def test_rollback_stops_after_max_rollbacks_and_without_a_checkpoint(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "a", on_nonfinite="rollback", save_steps=2, max_rollbacks=2),
                      TrainingDisplay(quiet=True))
    _poison_weights(trainer, {5})
    result = trainer.train()
    assert (result.status, result.exit_code) == ("stopped", 1)
    assert _kinds(result.run_dir) == ["policy_rollback", "policy_rollback", "policy_stop"]
    assert "--max-rollbacks 2" in _events(result.run_dir, "policy_stop")[0]["message"]

    trainer = Trainer(_config(tiny_world, tmp_path / "b", on_nonfinite="rollback"), TrainingDisplay(quiet=True))
    _poison_weights(trainer, {2})
    result = trainer.train()
    assert result.status == "stopped" and "no good checkpoint" in _events(result.run_dir, "policy_stop")[0]["message"]


def test_continue_only_records(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", on_nonfinite="continue"), TrainingDisplay(quiet=True))
    _poison_weights(trainer, {3})
    result = trainer.train()
    assert result.status == "completed" and result.summary["steps_completed"] == 6
    assert _kinds(result.run_dir) == []
    assert not ckpt.list_checkpoints(result.run_dir)  # non-finite weights are never checkpointed


def test_a_loss_scaler_that_skips_20_steps_in_a_row_stops_the_run(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", precision="mixed", train_steps=30, eval_steps=100,
                              block_size=8), TrainingDisplay(quiet=True))
    trainer.trainable[-1].register_hook(lambda g: g * math.inf if trainer.step > 2 else g)
    result = trainer.train()
    assert (result.status, result.exit_code, result.summary["steps_completed"]) == ("stopped", 1, 22)
    (stop,) = _events(result.run_dir, "policy_stop")
    assert "20 skipped steps in a row" in stop["message"]
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step-00000022"]  # finite: the work is kept


# ------------------------------------------------------------------------------- memory faults
def test_out_of_memory_is_recorded_saves_the_last_good_step_and_exits_1(cli, tiny_world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = LogitKD.__call__

    def flaky(self, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, batch, **kwargs)

    monkeypatch.setattr(LogitKD, "__call__", flaky)
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "6"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "out of memory in the forward of step 3" in err and "--gradient-checkpointing" in err
    (event,) = _events(out, "out_of_memory")
    assert event["severity"] == "critical" and "estimated device memory for fp32" in event["message"]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert _summary(out)["status"] == "failed"
    monkeypatch.undo()
    code, _, err = cli("train", "--output-dir", out, "--resume", "--gradient-checkpointing")
    assert code == 0, err
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))


# ------------------------------------------------------------------------------ errors, security
def test_an_internal_error_exits_3_with_one_line_and_the_traceback_in_the_run_dir(cli, tiny_world, tmp_path,
                                                                                   monkeypatch):
    calls, real = [], LogitKD.__call__

    def broken(self, batch, **kwargs):  # a bug that shows in step 2
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("a bug")
        return real(self, batch, **kwargs)

    monkeypatch.setattr(LogitKD, "__call__", broken)
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "3"))
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "internal error: ZeroDivisionError: a bug" in err
    assert "ZeroDivisionError" in (out / "traceback.txt").read_text()
    assert _summary(out)["status"] == "failed"


def test_a_full_disk_keeps_the_cause_in_the_traceback_and_every_finished_step(cli, tiny_world, tmp_path, monkeypatch):
    """A disk that fills up at the final checkpoint then fails the close too (report.html): the close's traceback
    replaced the checkpoint's in traceback.txt, so the file named the symptom and lost the cause. A full disk is no
    internal error: it fails the run (exit 1, as out of memory does) and says how to bring the run back."""
    import errno

    import sarkd_diag.presentation.report as report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save", full)
    monkeypatch.setattr(report, "write_html_report", full)
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "2"))
    assert code == 1
    where, full = f"(traceback in {out / 'traceback.txt'})", "OSError: [Errno 28] No space left on device"
    advice = f" — free space, then `sarkd-diag report {out}` rebuilds its summary (it has no checkpoint to continue"
    assert err.splitlines() == [f"sarkd-diag: no space left on device: {full} {where}{advice} from)",
                                f"sarkd-diag: closing the run failed too: {full} {where}"]
    first, second = (out / "traceback.txt").read_text().split("Traceback (most recent call last):")[1:]
    assert "_save_checkpoint" in first and "finalize_run" in second
    assert [r["step"] for r in _rows(out) if r["split"] == "train"] == [1, 2]


def test_a_disk_full_only_when_a_completed_run_closes_fails_the_run_and_says_what_is_missing(cli, tiny_world,
                                                                                            tmp_path, monkeypatch):
    """Every step trained and the student saved, then the disk filled as report.html was written: `train` exited 0
    — a script went on without summary.json or a report — and offered a `--resume` that refuses a run at its last
    step. It fails (exit 1) and names what brings the summary and report back."""
    import errno

    import sarkd_diag.presentation.report as report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_html_report", full)
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "2"))
    assert code == 1, err
    assert err.splitlines() == [f"sarkd-diag: no space left on device: OSError: [Errno 28] No space left on device "
                                f"(traceback in {out / 'traceback.txt'}) — free space, then `sarkd-diag report {out}` "
                                "writes its summary and report"]
    assert (out / "student" / "model.safetensors").is_file() and not (out / "summary.json").exists()
    monkeypatch.undo()
    code, _, err = cli("report", out)
    assert code == 0, err
    assert _summary(out)["status"] == "completed"


def test_a_full_disk_as_safetensors_reports_it_is_a_full_disk_and_the_partial_checkpoint_goes(cli, tiny_world,
                                                                                               tmp_path, monkeypatch):
    """On a 400 KB tmpfs the final checkpoint failed in safetensors ('I/O error: No space left on device (os error
    28)', a SafetensorError, no OSError): `train` called it an internal error (exit 3) and left the checkpoint's
    partial files, the space closing then needed; the line offered a --resume of a run with no checkpoint."""
    from safetensors import SafetensorError

    def full(tensors, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "2"))
    assert code == 1, err
    assert err.splitlines() == [f"sarkd-diag: no space left on device: SafetensorError: Error while serializing: I/O "
                                f"error: No space left on device (os error 28) (traceback in {out / 'traceback.txt'}) "
                                f"— free space, then `sarkd-diag report {out}` rebuilds its summary (it has no "
                                "checkpoint to continue from)"]
    assert list((out / "checkpoints").iterdir()) == []  # no partial checkpoint left to hold the space


def test_report_on_a_full_disk_is_a_full_disk_not_an_internal_error(cli, tiny_world, tmp_path, monkeypatch):
    """`sarkd-diag report RUN` of a run on a full disk said `internal error: OSError: [Errno 28] No space left on
    device` (exit 3, a traceback file to send in as a bug) — no bug: one line, exit 1, the run left as it was."""
    import errno

    import sarkd_diag.presentation.report as report

    out = tmp_path / "run"
    code, _, err = cli(*_args(tiny_world, out, "--train-steps", "1"))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_html_report", full)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("report", out)
    assert code == 1
    assert err == ("sarkd-diag: no space left on device: OSError: [Errno 28] No space left on device — free space, "
                   "then run the command again\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (tmp_path / "sarkd-diag-error.txt").exists()


def test_no_secret_is_recorded_nothing_is_written_outside_and_remote_code_is_recorded(cli, tiny_world, tmp_path,
                                                                                      monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    code, _, err = cli(*_args(tiny_world, "run", "--train-steps", "2", "--trust-remote-code"))
    assert code == 0, err
    written = set(tmp_path.rglob("*")) - before
    assert written and all(p == tmp_path / "run" or (tmp_path / "run") in p.parents for p in written)
    for path in written:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["trust_remote_code"] is True
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed"


def test_a_nan_gradient_is_placed_at_its_tensor_although_the_loop_clips(tiny_world, tmp_path):
    """--max-grad-norm (1.0 by default) clips by the total norm, and one tensor's NaN makes it NaN and every gradient
    NaN: read at the optimizer's pre-step hook, the gradients named the backward-first trainable tensor (a teacher
    router). They are read before the clip."""
    trainer = Trainer(_config(tiny_world, tmp_path / "run", probes="standard"), TrainingDisplay(quiet=True))
    names = {id(p): name for name, p in trainer.run.models.student.named_parameters()}
    weight = next(p for p in trainer.trainable if names.get(id(p), "").endswith("h.0.ln_1.bias"))
    weight.register_hook(lambda g: g * math.nan if trainer.step == 2 else g)
    result = trainer.train()
    root = result.summary["diagnosis"][0]
    assert (root["cause"], root["model"], root["tensor"], root["first_step"]) == (
        "divergence", "student", names[id(weight)], 2)  # a NaN among small fp32 values: an undefined derivative


def test_two_runs_started_at_once_into_one_new_directory_one_is_refused(tiny_world, tmp_path):
    """Two `train` started together into the same new directory both found it free (the live-writer check reads the
    logs, opened only after the setup): both ran and exited 0, every step twice in one metrics.jsonl. The directory is
    claimed when it is checked: one runs, the other is refused (exit 2, one line) and the run is untouched."""
    out = tmp_path / "dup"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(a) for a in _args(tiny_world, out, "--train-steps", "3")]
    procs = []
    for name in ("a", "b"):
        err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, "-m", "sarkd_diag", *args], env=env,
                                       stdout=subprocess.DEVNULL, stderr=err, text=True), err))
        time.sleep(0.2)
    codes, errors = [], []
    for proc, err in procs:
        proc.wait(timeout=300)
        err.close()
        codes.append(proc.returncode)
        errors.append(Path(err.name).read_text())
    assert sorted(codes) == [0, 2], errors
    refusal = errors[codes.index(2)]
    assert len(refusal.strip().splitlines()) == 1 and "Traceback" not in refusal, refusal
    assert f"{out} is still being written by process" in refusal
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert _summary(out)["status"] == "completed"
    assert not (out / ".sarkd-diag.lock").exists()  # released when the run closed
