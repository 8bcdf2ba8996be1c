"""`sarkd-diag train` end to end on tiny models, through the real CLI entry point."""

import json

import pytest
import torch
import typer
from contract import assert_run_dir

from sarkd_diag import load_run
from sarkd_diag.cli import app
from sarkd_diag.contract.config import build_config


def _eval_ppls(run_dir):
    metrics = load_run(run_dir)["metrics"]
    return metrics[metrics["split"] == "eval"]["eval_ppl"].tolist()


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed", "mixed"])
def test_healthy_modes_train_with_finite_weights_and_falling_loss(cli, tiny_args, tmp_path, mode):
    code, out, err = cli("train", *tiny_args, "--precision", mode)
    assert code == 0, err
    run_dir = tmp_path / "run"
    summary = assert_run_dir(run_dir)
    assert summary["status"] == "completed" and summary["steps_completed"] == 6
    assert summary["precision"]["mode"] == mode and summary["precision"]["master_dtype"] == "float32"
    assert not [d for d in summary["diagnosis"] + summary["findings"] if d["severity"] != "info"]
    ppls = _eval_ppls(run_dir)
    assert len(ppls) == 3 and ppls[-1] < 0.8 * ppls[0]  # before the first step, at step 3, at the end
    student = run_dir / "student"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(student)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    assert out.strip().splitlines()[-1].endswith(str(run_dir))  # the last line names the run directory


def test_pure_fp16_reports_nonfinite_weights_and_exits_1(cli, tiny_args, tmp_path):
    args = [a if a != "6" else "3" for a in tiny_args]  # fp16 arithmetic is slow on this CPU: keep it short
    code, out, err = cli("train", *args, "--precision", "pure-fp16")
    assert code == 1
    summary = assert_run_dir(tmp_path / "run")
    assert summary["status"] == "stopped"
    assert summary["steps_completed"] <= 2
    assert summary["event_counts"]["nonfinite_param"] > 0
    assert summary["diagnosis"][0]["cause"] == "optimizer_eps_underflow"
    assert summary["precision"]["master_dtype"] == "float16"


def test_an_evaluation_of_nan_weights_is_nan_not_an_infinite_perplexity(cli, tiny_args, tmp_path):
    """pure-fp16 with `--on-nonfinite continue`: the weights turn NaN at step 1, and the evaluations after it compute
    a NaN loss — their perplexity is NaN too, not Infinity (a finite model whose loss is merely too large)."""
    args = [a if a != "6" else "2" for a in tiny_args]
    code, _, err = cli("train", *args, "--precision", "pure-fp16", "--on-nonfinite", "continue", "--eval-steps", "1")
    assert code == 1, err
    evals = load_run(tmp_path / "run")["metrics"].query("split == 'eval'")
    after = evals[evals["eval_loss"].isna()]
    assert len(after) >= 1 and after["eval_ppl"].isna().all()
    assert "Infinity" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_pure_bf16_runs_to_the_end(cli, tiny_args, tmp_path):
    code, _, err = cli("train", *tiny_args, "--precision", "pure-bf16")
    assert code in (0, 1), err
    summary = assert_run_dir(tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["precision"]["param_dtypes"]["student"]["trainable"] == {"bfloat16": sum(
        summary["precision"]["param_dtypes"]["student"]["trainable"].values())}


ORIGINAL = ("--teacher_model T --student_model S --model_dtype float16 --train_steps 500 --per_device_batch_size 1 "
            "--eval_steps 50 --student_lr 5e-6 --temperature 2.0 --alpha_kd 0.1 --alpha_ce 0.9 --max_grad_norm 0.5 "
            "--output_dir OUT --offload_teacher_to_cpu --use_scheduler --clear_cache_every_step").split()


def _parse(args):
    command = typer.main.get_command(app).commands["train"]
    params = command.make_context("train", list(args)).params
    return build_config({k: v for k, v in params.items() if k != "config"}, params.get("config"))


def test_the_original_command_line_parses_unchanged():
    cfg = _parse(ORIGINAL)
    assert (cfg.teacher_model, cfg.student_model, cfg.model_dtype, cfg.train_steps) == ("T", "S", "float16", 500)
    assert (cfg.per_device_batch_size, cfg.eval_steps, cfg.student_lr, cfg.temperature) == (1, 50, 5e-6, 2.0)
    assert (cfg.alpha_kd, cfg.alpha_ce, cfg.max_grad_norm, cfg.output_dir) == (0.1, 0.9, 0.5, "OUT")
    assert cfg.offload_teacher_to_cpu and cfg.use_scheduler and cfg.clear_cache_every_step


def test_dashes_and_underscores_are_the_same_option_and_booleans_have_no_forms():
    assert _parse(["--train-steps", "3"]).train_steps == _parse(["--train_steps", "3"]).train_steps == 3
    assert _parse(["--use-scheduler", "--no-use-scheduler"]).use_scheduler is False
    assert _parse(["--no_use_scheduler"]).use_scheduler is False
    assert _parse(["--gradient-checkpointing"]).gradient_checkpointing is True


def test_original_flags_run_on_cpu_and_are_recorded(cli, tiny_world, tmp_path):
    out_dir = tmp_path / "orig"
    args = [a for a in ORIGINAL]
    replace = {"T": str(tiny_world["teacher"]), "S": str(tiny_world["student"]), "OUT": str(out_dir), "500": "2",
               "50": "2"}
    args = [replace.get(a, a) for a in args]
    code, _, err = cli("train", *args, "--train-file", tiny_world["train"], "--validation-file", tiny_world["valid"],
                       "--block-size", "16")
    assert code == 0, err
    run = load_run(out_dir)
    assert run["summary"]["precision"]["mode"] == "mixed"
    assert run["config"]["options"]["use_scheduler"] is True
    notes = run["events"][run["events"]["kind"] == "setup_note"]["message"].str.cat(sep=" | ")
    assert "--offload-teacher-to-cpu is a no-op on cpu" in notes
    assert "--clear-cache-every-step is a no-op on cpu" in notes
    lrs = run["metrics"].query("split == 'train'")["lr"].tolist()
    assert lrs[0] == pytest.approx(5e-6) and lrs[1] < lrs[0]  # the cosine schedule runs


def test_gradient_accumulation_matches_one_big_batch(tiny_world, tmp_path):
    from sarkd_diag.contract.config import DistillConfig
    from sarkd_diag.presentation.ui import TrainingDisplay
    from sarkd_diag.train.loop import Trainer

    grads = {}
    for batch, accum in ((8, 1), (2, 4)):
        cfg = DistillConfig(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                            train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                            block_size=16, per_device_batch_size=batch, grad_accum_steps=accum, train_steps=1,
                            precision="fp32", max_grad_norm=0.0, output_dir=str(tmp_path / f"b{batch}"),
                            probes="off").validate()
        trainer = Trainer(cfg, TrainingDisplay(quiet=True))
        captured = {}
        student = trainer.student
        trainer.optimizer.register_step_pre_hook(lambda opt, a, k, c=captured, m=student: c.update(
            {n: p.grad.clone() for n, p in m.named_parameters()}))
        trainer.train()
        grads[accum] = captured
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, rtol=1e-6, atol=1e-6, msg=name)


def test_probes_observe_and_never_steer(cli, tiny_args, tmp_path):
    losses = {}
    for level in ("off", "standard", "full"):
        out_dir = tmp_path / level
        args = [a if a != str(tmp_path / "run") else str(out_dir) for a in tiny_args]
        code, _, err = cli("train", *args, "--precision", "fp32", "--probes", level, "--probe-every", "2")
        assert code == 0, err
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        losses[level] = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses["off"] == losses["standard"] == losses["full"]
