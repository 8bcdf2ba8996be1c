"""The loop's guard without probes, and the causes that need more than one probe to tell apart."""

import shutil

import pytest
import torch
from contract import assert_conforms
from torch import nn

from sarkd_diag import Probes, load_run


def test_the_guard_stops_pure_fp16_even_with_probes_off(cli, tiny_args, tmp_path):
    args = [a if a != "6" else "3" for a in tiny_args]
    code, _, err = cli("train", *args, "--precision", "pure-fp16", "--probes", "off")
    assert code == 1
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "stopped" and run["summary"]["steps_completed"] == 1
    assert "nonfinite_param" not in run["summary"]["event_counts"]  # no probe ran: the guard alone stopped it
    assert run["summary"]["event_counts"]["policy_stop"] == 1


@pytest.mark.parametrize("temperature", ["1e-3", "2"])
def test_a_temperature_that_scales_the_kd_gradient_away_is_named_and_the_default_is_not(cli, tiny_args, tmp_path,
                                                                                         temperature):
    """`--temperature 1e-3`: T² · KL at logits / T has a gradient of T · (p_s − p_t) per logit, a thousandth of the
    cross-entropy's, so the student trains on the cross-entropy alone while kd_loss reads ~1e-3 — and the summary said
    'no numerical problems'. The default temperature is said nothing."""
    args = [a if a != "6" else "2" for a in tiny_args]
    code, out, err = cli("train", *args, "--precision", "fp32", "--temperature", temperature)
    assert code == 0, err
    run = load_run(tmp_path / "run")
    causes = {c["cause"]: c for c in run["summary"]["findings"]}
    if temperature == "2":
        assert "kd_temperature_low" not in causes and "kd_temperature_low" not in set(run["events"]["code"])
        return
    cause = causes["kd_temperature_low"]
    assert (cause["severity"], cause["model"], cause["first_step"]) == ("warning", "student", 1)
    assert cause["evidence"]["temperature"] == 1e-3 and cause["evidence"]["mean_kd_loss"] < 0.01
    assert "--temperature to 1 or more" in cause["fix"]
    # a finding, not a numerical cause: listed apart everywhere the run is read, and the run directory conforms
    assert run["summary"]["diagnosis"] == [] and "kd_temperature_low (a finding: the loop or the setup)" in out
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Findings" in report and "### 1. `kd_temperature_low` (warning)" in report
    assert_conforms(tmp_path / "run")


def test_dual_mode_refuses_a_tokenizer_without_offsets(cli, tiny_args, tiny_world, tmp_path):
    from transformers import CanineTokenizer

    slow_student = tmp_path / "slow_student"
    shutil.copytree(tiny_world["student"], slow_student)
    for f in slow_student.glob("tokenizer*"):
        f.unlink()
    CanineTokenizer().save_pretrained(slow_student)  # a pure-Python tokenizer: no offset mappings
    args = [str(slow_student) if a == str(tiny_world["student"]) else a for a in tiny_args]
    code, _, err = cli("train", *args)
    assert code == 2
    assert "offset" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_batch_without_targets_is_bad_data(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.full((2, 5), -100)  # no target token: the mean cross-entropy is 0/0
    with Probes(model, optimizer=opt, run_dir=tmp_path / "run") as probes:
        loss = nn.functional.cross_entropy(model(torch.ones(2, 5, 4)).transpose(1, 2), labels)
        loss.backward()
        opt.step()
        probes.step(loss=loss, labels=labels)
    run = load_run(tmp_path / "run")
    assert run["summary"]["event_counts"]["empty_targets"] == 1
    (cause, *_) = run["summary"]["diagnosis"]
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("nonfinite_input", "critical", 1)
    assert [d["cause"] for d in run["summary"]["diagnosis"]] == ["nonfinite_input"]  # the NaN weights: its symptom


def test_the_batch_without_targets_that_made_the_nan_is_the_one_named_not_an_earlier_harmless_one(tmp_path):
    """Step 1's batch has no targets but its loss is a guarded mean (0 over at least 1): 0, harmless. Step 3's has
    none either and its loss is the plain mean, 0/0 = NaN: that batch is the cause of every NaN after it — critical
    at step 3, not a warning at step 1 beside a divergence nothing explains."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with Probes(model, optimizer=opt, run_dir=tmp_path / "run") as probes:
        for step in (1, 2, 3):
            labels = torch.full((2, 5), -100) if step != 2 else torch.randint(0, 3, (2, 5))
            logits = model(torch.randn(2, 5, 4)).transpose(1, 2)
            if step == 1:
                total = nn.functional.cross_entropy(logits, labels, reduction="sum")
                loss = total / (labels != -100).sum().clamp(min=1)
            else:
                loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            probes.step(loss=loss, labels=labels)
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[0] == 0 and torch.tensor(losses[2]).isnan()  # the provocation
    run = load_run(tmp_path / "run")
    (cause, *_) = run["summary"]["diagnosis"]
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("nonfinite_input", "critical", 3)
    assert run["events"].query("kind == 'empty_targets'")["step"].tolist() == [1, 3]


def test_a_loss_that_blows_up_in_fp32_is_divergence(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.9)  # too large: every step overshoots further
    x, y = torch.randn(16, 4) * 2, torch.randn(16, 1)
    with Probes(model, optimizer=opt, run_dir=tmp_path / "run") as probes:
        for _ in range(6):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    run = load_run(tmp_path / "run")
    losses = run["metrics"]["loss"].tolist()
    assert losses[-1] > 3 * losses[0] and all(map(torch.isfinite, torch.tensor(losses)))
    (cause,) = run["summary"]["diagnosis"]
    assert (cause["cause"], cause["severity"]) == ("divergence", "critical")
    assert cause["evidence"]["max_loss"] > 3 * cause["evidence"]["first_loss"]


def test_standard_probes_name_the_module_of_a_nonfinite_loss_on_a_plain_step(tiny_world, tmp_path):
    """Step 3 is no statistics step at --probe-every 10; the replay still names where the overflow began."""
    import math

    from sarkd_diag.contract.config import DistillConfig
    from sarkd_diag.presentation.ui import TrainingDisplay
    from sarkd_diag.train.loop import Trainer

    cfg = DistillConfig(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                        train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                        block_size=16, per_device_batch_size=2, train_steps=4, eval_steps=100, precision="mixed",
                        probes="standard", probe_every=10, output_dir=str(tmp_path / "run")).validate()
    trainer = Trainer(cfg, TrainingDisplay(quiet=True))
    module = trainer.student.get_submodule("transformer.h.1.mlp.c_fc")
    module.register_forward_hook(lambda m, i, out: out * math.inf if trainer.step == 3 else None)  # the fault
    result = trainer.train()
    assert result.status == "completed"  # the loss scaler skipped step 3: weights stayed finite
    events = load_run(result.run_dir)["events"]
    (act,) = events[events["kind"] == "nonfinite_activation"].itertuples()
    assert (act.step, act.model, act.module) == (3, "student", "transformer.h.1.mlp.c_fc")
    assert "replayed" in act.message
    assert "activation_overflow" in [d["cause"] for d in load_run(result.run_dir)["summary"]["diagnosis"]]
