"""The diagnosis on crafted event logs: each rule reads codes (never messages), and `rank` picks the root
cause, orders the rest and folds symptoms into the root — the one place where that choice is made."""

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from sarkd_diag.analysis.diagnose import BF16_FIXES, CAUSES, FIXES, PHRASES, Cause, diagnose, rank
from sarkd_diag.contract.events import CODES, Event, events_frame


def log(*events: dict) -> pd.DataFrame:
    return events_frame(Event(**e, time=i + 1.0).__dict__ for i, e in enumerate(events))


def config(mode="mixed", caller=None, **extra):
    return {"precision": {"mode": mode}, **({"caller": caller} if caller else {}), **extra}


def causes(frame, metrics=None, **cfg):
    return diagnose(frame, metrics, config(**cfg))


def test_every_event_carries_a_code_from_the_closed_vocabulary():
    assert Event("nonfinite_param").code == "nonfinite_param"
    with pytest.raises(ValueError, match="code"):
        Event("optimizer_preflight")  # several checks: it must say which
    with pytest.raises(ValueError, match="code"):
        Event("nonfinite_param", code="made_up")
    with pytest.raises(ValueError, match="code"):
        Event("nonfinite_param", code="lost_updates")  # another kind's own code


def test_rules_read_codes_not_messages():
    eps = {"kind": "optimizer_preflight", "severity": "critical", "code": "eps_zero", "value": 1e-8,
           "dtype": "float16", "model": "student", "tensor": "student", "step": 1}
    reworded = log({**eps, "message": "completely different words"})
    assert causes(reworded)[0]["cause"] == "optimizer_eps_underflow"
    wrong_code = log({**eps, "code": "eps_subnormal", "message": "optimizer eps=1e-08 is 0.0 in float16"})
    assert causes(wrong_code).ranked == []


def test_the_earliest_critical_cause_is_the_root_and_later_overflows_are_its_symptoms():
    frame = log(
        {"kind": "extreme_update", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
         "module": "h.0.attn", "tensor": "h.0.attn.weight", "value": 50.0},
        {"kind": "nonfinite_activation", "severity": "critical", "step": 2, "phase": "forward", "model": "student",
         "module": "h.0.attn.c_attn", "value": math.inf},
        {"kind": "scale_below_one", "severity": "critical", "step": 19, "phase": "optimizer", "value": 0.5},
    )
    (root,) = causes(frame).ranked
    assert (root["cause"], root["first_step"], root["tensor"]) == ("divergence", 1, "h.0.attn.weight")
    assert "activation_overflow@2" in root["evidence"]["followed_by"]
    assert "loss_scale_collapse@19" in root["evidence"]["followed_by"]
    assert root["evidence"]["update_ratio"] == 50.0


def test_findings_are_listed_apart_from_the_contracts_causes_and_a_findings_failure_stays_a_cause():
    """A loop that never clears its gradients under a loss scaler: the weights turn NaN at step 3 and the scale
    collapses by step 12. The uncleared gradients are a finding — the loop's fault, not precision's — listed apart
    (`findings`), and the root (`ranked` first). The run's failure still shows among the contract's causes: its first
    numerical symptom (the divergence at step 3) stays there, explained by the finding and with its fix; a later one
    (the scale's collapse) is folded into the finding as before."""
    frame = log(
        {"kind": "setup_note", "severity": "warning", "code": "gradients_not_cleared", "step": 2, "phase": "backward",
         "probe": "gradients", "model": "student"},
        {"kind": "nonfinite_param", "severity": "critical", "step": 3, "phase": "optimizer", "model": "student",
         "tensor": "w"},
        {"kind": "scale_below_one", "severity": "critical", "step": 12, "phase": "optimizer", "value": 0.5},
    )
    diagnosis = causes(frame, caller="loop", precision={"mode": "mixed", "loss_scaling": True})
    assert diagnosis and all(c["cause"] in CAUSES for c in diagnosis)
    assert diagnosis.findings and all(c["cause"] not in CAUSES for c in diagnosis.findings)
    root = diagnosis.findings[0]
    (symptom,) = diagnosis
    assert diagnosis.ranked == [root, symptom]
    assert (root["cause"], root["severity"], root["first_step"]) == ("gradients_not_cleared", "critical", 2)
    assert (symptom["cause"], symptom["severity"], symptom["first_step"]) == ("divergence", "critical", 3)
    assert symptom["evidence"]["explained_by"].startswith("gradients_not_cleared@2") and symptom["fix"] == root["fix"]
    assert root["evidence"]["followed_by"] == "loss_scale_collapse@12"  # the second symptom: folded
    text = repr(diagnosis)
    assert text.startswith("Diagnosis:\n1. divergence (critical) at step 3 in student w")
    assert "\nFindings (the loop or the setup):\n1. gradients_not_cleared (critical) at step 2" in text


def test_rank_keeps_a_findings_first_numerical_symptom_explained_by_it_and_folds_the_rest():
    """`rank` on its own: a finding at the root keeps its first symptom with a contract code (a finding among the
    symptoms does not count, and folds) — named by the root (`explained_by`), with the root's fix; later symptoms
    fold into the root's `followed_by`. A contract cause at the root folds its symptoms, findings or not, as ever."""
    root = Cause("gradients_not_cleared", "critical", 2, phase="backward", model="student", fix="call zero_grad()")
    kept = rank([Cause("loss_scale_collapse", "critical", 12, fix="lower the loss weights"),
                 Cause("divergence", "critical", 3, model="student", tensor="w", fix="lower the lr"),
                 Cause("no_gradients", "critical", 2, model="student", module="ln_f", fix="do not detach"), root])
    assert [c.cause for c in kept] == ["gradients_not_cleared", "divergence"]
    assert kept[1].evidence["explained_by"] == "gradients_not_cleared@2 (student)" and kept[1].fix == "call zero_grad()"
    assert root.evidence["followed_by"] == "no_gradients@2 (student ln_f); loss_scale_collapse@12"
    assert root.fix == "call zero_grad()" and "explained_by" not in root.evidence

    overflow = Cause("activation_overflow", "critical", 1, phase="forward", model="student", module="h.0",
                     fix="keep h.0 in fp32")
    kept = rank([Cause("lr_zero", "warning", 5, fix="fix the schedule"),
                 Cause("no_gradients", "warning", 2, model="student", module="ln_f", fix="do not detach"),
                 Cause("divergence", "critical", 3, model="student", tensor="w", fix="lower the lr"), overflow])
    assert [c.cause for c in kept] == ["activation_overflow", "lr_zero"]
    assert overflow.evidence["followed_by"] == "divergence@3 (student w); no_gradients@2 (student ln_f)"
    assert not any("explained_by" in c.evidence for c in kept) and kept[1].fix == "fix the schedule"


def test_an_extreme_update_with_nothing_wrong_yet_is_a_warning():
    frame = log({"kind": "extreme_update", "severity": "warning", "step": 3, "phase": "optimizer",
                 "model": "student", "tensor": "w", "value": 4.0})
    (cause,) = causes(frame).ranked
    assert (cause["cause"], cause["severity"]) == ("divergence", "warning")


@pytest.mark.parametrize("caller, lr_word, lr", [("cli", "`--router-lr`", 2e4),
                                                 ("loop", "the teacher's parameter group", None)])
def test_a_teachers_extreme_update_names_the_lr_its_tensors_train_at(caller, lr_word, lr):
    """The routers `train` trains sit in a parameter group of their own, at `--router-lr` (scheduled like the
    student's, whose lr the rows record): a router's blow-up names that option and its scheduled lr, not the
    student's. Where no record says a teacher group's lr, none is quoted."""
    frame = log({"kind": "extreme_update", "severity": "warning", "step": 2, "phase": "optimizer", "model": "teacher",
                 "module": "layers.0.mlp.gate", "tensor": "layers.0.mlp.gate.weight", "value": 7e4})
    metrics = pd.DataFrame({"step": [1, 2], "split": "train", "lr": [2e-3, 1e-3], "loss": [10.0, 8e8]})
    (cause,) = causes(frame, metrics, caller=caller, mode="fp32",
                      options={"student_lr": 2e-3, "router_lr": 4e4}).ranked
    assert (cause["cause"], cause["model"], cause["severity"]) == ("divergence", "teacher", "critical")
    assert lr_word in cause["fix"] and "student" not in cause["fix"] and cause["evidence"].get("lr") == lr
    assert (f"at lr {lr:.3g}" in cause["fix"]) if lr else ("at lr" not in cause["fix"])


def test_an_extreme_step_of_an_optimizer_whose_state_flushed_to_zero_is_no_lr_problem():
    """In a float16 optimizer state, second moments flushed to 0 leave Adam dividing by eps alone: the step that
    follows is extreme because of precision. That step is the state underflow's evidence (critical), not a second
    cause whose fix says "lower the lr; precision is not the cause"."""
    frame = log({"kind": "optimizer_state_underflow", "severity": "warning", "step": 1, "phase": "optimizer",
                 "model": "student", "tensor": "wte.weight", "dtype": "float16", "value": 0.4},
                {"kind": "extreme_update", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
                 "module": "h.0.mlp.c_proj", "tensor": "h.0.mlp.c_proj.weight", "value": 1.16})
    (cause,) = causes(frame, mode="pure-fp16").ranked
    assert (cause["cause"], cause["severity"], cause["evidence"]["extreme_updates"]) == (
        "optimizer_state_underflow", "critical", 1)
    assert "precision is not the cause" not in cause["fix"]


def test_a_second_moment_that_cannot_decay_is_the_state_underflowing_and_one_cause_beside_a_flush():
    """Adam's exp_avg_sq × β2 that rounds back in a bfloat16 state is its decrement underflowing: the contract's
    `optimizer_state_underflow` (a warning, evidence `decay_lost`), whose fix names β2. Beside entries flushed to zero
    in the same state it is that cause's evidence, not a second cause with the same fix."""
    where = {"step": 1, "phase": "optimizer", "model": "student", "tensor": "group 0"}
    decay = {"kind": "optimizer_preflight", "code": "second_moment_decay_zero", "severity": "warning",
             "value": 0.999, "dtype": "bfloat16", **where}
    (alone,) = causes(log(decay), mode="pure-bf16").ranked
    assert (alone["cause"], alone["severity"], alone["tensor"]) == ("optimizer_state_underflow", "warning", "group 0")
    assert alone["evidence"]["decay_lost"] is True and alone["evidence"]["beta2"] == 0.999 and "β2" in alone["fix"]
    flush = {"kind": "optimizer_state_underflow", "severity": "warning", "value": 0.4, "dtype": "bfloat16",
             **where, "tensor": "wte.weight"}
    (both,) = causes(log(decay, flush), mode="pure-bf16").ranked
    assert (both["cause"], both["tensor"], both["evidence"]["zeroed_fraction"]) == (
        "optimizer_state_underflow", "wte.weight", 0.4)
    assert both["evidence"]["decay_lost"] is True and both["evidence"]["beta2"] == 0.999


@pytest.mark.parametrize("losses, severity", [([4, 3.8, 3.7, 15, 3.6, 3.5, 3.4, 3.3], "warning"),
                                               ([4, 3.8, 3.7, 15, 14, 13, 12, 12.5], "critical"),
                                               ([4, 3.8, 3.7, 3.6, 3.5, 3.4, 3.3, 15], "critical")])
def test_a_finite_loss_spike_that_training_came_back_from_is_no_divergence(losses, severity):
    """One outlier batch makes the loss jump 4× for a step; the next steps are back below where it was before: a
    transient spike, a warning that points at that step — not a critical divergence. A loss that stays up, or whose
    jump is the run's last step, still is one."""
    metrics = pd.DataFrame({"step": range(1, 9), "split": "train", "loss": losses, "lr": 1e-3})
    (cause,) = causes(log(), metrics, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("divergence", severity, losses.index(15) + 1)
    assert cause["evidence"].get("recovered", False) is (severity == "warning")
    assert ("transient spike" in cause["fix"]) is (severity == "warning")


@pytest.mark.parametrize("continued", [False, True])
def test_a_later_training_runs_first_loss_is_judged_against_its_own_start(continued):
    """Two training runs in one directory (a second `train()`: a search trial whose model starts from a larger
    loss). Without a boundary the second run's losses are 4x the first run's first: a blow-up. With the
    `run_continued` note at its first step each run is judged against its own first loss: both fall, nothing is
    wrong. A blow-up within the second run is still one, judged against that run's start."""
    losses = [4, 3.8, 3.7, 3.6, 16, 15.5, 15, 14.8]
    note = {"kind": "setup_note", "code": "run_continued", "severity": "info", "step": 5, "phase": "setup"}
    metrics = pd.DataFrame({"step": range(1, 9), "split": "train", "loss": losses, "lr": 1e-3})
    frame = log(note) if continued else log()
    assert bool(causes(frame, metrics, mode="fp32", caller="loop").ranked) is not continued
    blown = pd.DataFrame({"step": range(1, 11), "split": "train", "loss": [*losses, 60, 62], "lr": 1e-3})
    (cause,) = causes(log(note), blown, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["first_step"], cause["evidence"]["first_loss"]) == ("divergence", 9, 16)


@pytest.mark.parametrize("losses, severity", [([4.0, 4.2, 3.9, 4.1, 15.0, 3.8, 4.2, 3.9, 4.1, 4.15], "warning"),
                                               ([4.0, 4.2, 3.9, 4.1, 15.0, 14.0, 14.5, 13.8, 14.2, 14.1], "critical")])
def test_a_spike_on_a_noisy_plateau_came_back_though_its_last_loss_is_above_the_one_before_it(losses, severity):
    """A plateau whose losses stray ~5% from step to step: after the 4× spike the loss is back where it was, its last
    value (4.15) a little above the one before the spike (4.1) — as likely as below it. Back within the run's own
    scatter is back: a transient spike, not a divergence. A loss that stays near the spike still is one."""
    metrics = pd.DataFrame({"step": range(1, 11), "split": "train", "loss": losses, "lr": 1e-3})
    (cause,) = causes(log(), metrics, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("divergence", severity, 5)
    assert ("transient spike" in cause["fix"]) is (severity == "warning")

@pytest.mark.parametrize("shift, severity", [(1, None), (300, "critical")])
def test_a_blow_up_must_stand_out_of_the_scatter_of_a_runs_losses(shift, severity):
    """Losses that scatter tenfold from batch to batch (a few samples each; here one is 13× the first): three times
    the first is no blow-up there. A loss that leaves that scatter — up 300-fold from step 13 on — still is."""
    scatter = np.random.default_rng(8).lognormal(0.0, 0.8, 20) * 0.01
    losses = np.concatenate([scatter[:12], scatter[12:] * shift])
    metrics = pd.DataFrame({"step": range(1, 21), "split": "train", "loss": losses, "lr": 1e-3})
    found = [(c["cause"], c["severity"], c["first_step"])
             for c in causes(log(), metrics, mode="fp32", caller="loop").ranked]
    assert found == ([("divergence", severity, 13)] if severity else [])


@pytest.mark.parametrize("losses, blown_at", [([0.82, 1.37, 2.13, 1.32, 3.57], None),
                                               ([0.39, 1.69, 1.12, 0.83, 1.57], None), ([0.39, 1.69, 1.12], None),
                                               ([4.0, 4.1, 3.9, 13.0], 4), ([4.0, 6.0, 13.0, 20.0], 3),
                                               ([4.0, 7.0, 13.0], 3)])
def test_a_short_runs_blow_up_is_judged_against_the_scatter_of_its_few_losses(losses, blown_at):
    """Five steps of a pretrained tiny GPT-2 fine-tuned at batch 1 on 8-token windows (the losses measured so): one
    window is easy, another four times harder — the first happened to be easy. Four step-to-step changes measure
    that scatter (a blow-up is one change, which their median leaves out): no blow-up; nor in the first three steps
    alone, whose two changes read a lone jump as scatter. A loss that jumps out of steady values, or climbs step after
    step — in three steps too —, still is one."""
    metrics = pd.DataFrame({"step": range(1, len(losses) + 1), "split": "train", "loss": losses, "lr": 1e-3})
    found = [(c["cause"], c["severity"], c["first_step"])
             for c in causes(log(), metrics, mode="fp32", caller="loop").ranked]
    assert found == ([("divergence", "critical", blown_at)] if blown_at else [])

def test_warnings_no_rule_reads_are_the_diagnosis_notes_printed_after_its_causes():
    """A loop's misuse of the probes (`step()` before `optimizer.step()`) is a warning and no numerical cause: the
    diagnosis said "no numerical problems found", and a loop's `print(probes.diagnosis())` hid it. Notes a rule read
    (whether or not it made them a cause) and info notes are not repeated; one line per check."""
    def note(code, severity="warning", step=1):
        return {"kind": "setup_note", "severity": severity, "code": code, "step": step, "model": "student",
                "message": f"{code} said"}

    diagnosis = causes(log(note("step_order", step=2), note("step_order", step=5), note("loss_unseen", step=3),
                           note("optimizer_stepped_twice"), note("resumed", "info")))
    assert diagnosis == [] and [c["cause"] for c in diagnosis.findings] == ["optimizer_stepped_twice"]
    assert diagnosis.notes == [{"step": 2, "code": "step_order", "message": "step_order said"},
                               {"step": 3, "code": "loss_unseen", "message": "loss_unseen said"}]
    text = repr(diagnosis)
    assert text.endswith("Warnings (no numerical cause):\n- step 2 step_order: step_order said\n"
                         "- step 3 loss_unseen: loss_unseen said")
    assert text.index("Findings (the loop or the setup):\n1. optimizer_stepped_twice") \
        < text.index("Warnings")  # the rule's finding is listed with the findings, the notes after it
    assert repr(causes(log(note("resumed", "info")))) == "Diagnosis: no numerical problems found"


def test_the_roots_own_cause_found_again_at_its_own_place_is_folded_into_it():
    """A LayerNorm gain loaded beyond fp16 overflows under mixed: the critical cause at `ln_2` and the warning that its
    fp32 output exceeds fp16's range, at `ln_2` too, were two entries of one problem in the panel. The same cause
    elsewhere, or another cause at that place, is another finding and stays."""
    def cause(code, severity, module, step=1, phase="forward"):
        return Cause(code, severity, step, phase=phase, model="student", module=module)

    root = cause("activation_overflow", "critical", "h.0.ln_2")
    kept = rank([cause("activation_overflow", "warning", "h.0.ln_2"), root,
                 cause("activation_overflow", "warning", "h.1.mlp.c_fc"),
                 cause("update_underflow", "warning", "h.0.ln_2", phase="optimizer")])
    assert [(c.cause, c.module) for c in kept] == [("activation_overflow", "h.0.ln_2"),
                                                   ("activation_overflow", "h.1.mlp.c_fc"),
                                                   ("update_underflow", "h.0.ln_2")]
    assert kept[0].evidence["followed_by"] == "activation_overflow@1 (student h.0.ln_2)"


def test_a_forward_overflow_before_the_step_that_blew_up_is_not_its_symptom():
    """Step 1's forward runs before step 1's update: a headroom warning there is no symptom of it."""
    frame = log(
        {"kind": "fp16_overflow_risk", "severity": "warning", "step": 1, "phase": "forward", "model": "student",
         "module": "mlp", "value": 1e5},
        {"kind": "extreme_update", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
         "tensor": "w", "value": 5.0},
        {"kind": "nonfinite_param", "severity": "critical", "step": 2, "phase": "optimizer", "model": "student",
         "tensor": "w"},
    )
    assert [(c["cause"], c["severity"]) for c in causes(frame).ranked] == [("divergence", "critical"),
                                                                            ("activation_overflow", "warning")]


def test_state_underflow_is_critical_once_the_weights_grow_and_then_no_update_underflow_is_claimed():
    frame = log(
        {"kind": "optimizer_state_underflow", "severity": "warning", "step": 1, "model": "student",
         "tensor": "wte.weight", "value": 0.78, "dtype": "float16"},
        {"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student", "tensor": "ln.weight",
         "value": 0.4, "dtype": "float16"},
    )
    growing = pd.DataFrame({"step": [1, 2, 3, 4], "split": "train", "param_amax": [1.0, 3.0, 40.0, 213.0]})
    (cause,) = causes(frame, growing, mode="pure-fp16").ranked
    assert (cause["cause"], cause["severity"], cause["tensor"]) == ("optimizer_state_underflow", "critical",
                                                                    "wte.weight")
    assert cause["evidence"]["weight_growth"] == 213.0
    assert "raise" not in cause["fix"]
    steady = growing.assign(param_amax=1.0)
    assert [c["cause"] for c in causes(frame, steady, mode="pure-fp16")] == ["optimizer_state_underflow",
                                                                             "update_underflow"]
    assert causes(frame, steady, mode="pure-fp16")[0]["severity"] == "warning"


def test_loss_scale_collapse_is_placed_where_gradients_overflowed_when_the_scale_fell():
    """The scaler's first skips overflow at the output end while it finds its scale; the module that
    overflows for good is the one still non-finite when the scale collapses."""
    grad = {"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "phase": "backward",
            "model": "student"}
    frame = log({**grad, "step": 1, "module": "lm_head", "tensor": "lm_head.weight"},
                {**grad, "step": 4, "module": "mid", "tensor": "mid.weight"},
                {"kind": "scale_below_one", "severity": "critical", "step": 17, "value": 0.5})
    (cause,) = causes(frame, caller="loop").ranked
    assert (cause["cause"], cause["model"], cause["module"], cause["first_step"]) == (
        "loss_scale_collapse", "student", "mid", 17)
    assert "mid" in cause["fix"] and "--" not in cause["fix"]


@pytest.mark.parametrize(("caller", "loss", "summed"), [("loop", 68046.0, True), ("loop", 5.5, False),
                                                       ("cli", 68046.0, False)])
def test_a_loss_scale_collapse_under_a_loss_summed_over_the_tokens_says_to_divide_by_them(caller, loss, summed):
    """A loop's KD loss summed over the vocabulary and the tokens (~68,000 where a per-token KL is ~1): the scaler
    backs off to 128 and below. The fix said to lower the loss's weights or the lr; the loss's own size says it is a
    sum — divide by the target tokens. Not for a per-token loss, nor for `train`'s, a mean by construction (a loss
    that large there is a weight: `--alpha-kd`)."""
    frame = log({"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 1,
                 "phase": "backward", "model": "student", "module": "lm_head", "tensor": "lm_head.weight"},
                {"kind": "scaler_backoff", "severity": "warning", "code": "warmup_scale_low", "step": 9,
                 "value": 128.0})
    metrics = pd.DataFrame({"step": range(1, 11), "split": "train", "loss": [loss] * 10})
    (cause,) = causes(frame, metrics, caller=caller).ranked
    assert (cause["cause"], cause["module"], cause["first_step"]) == ("loss_scale_collapse", "lm_head", 9)
    assert ("divide it by the number of target tokens" in cause["fix"]) == summed, cause["fix"]
    assert (cause["evidence"].get("largest_finite_loss") == loss) == summed


@pytest.mark.parametrize(("ratios", "claimed"), [([4e-8] * 8, True), ([3e-6] * 8, False), ([0.0] * 8, False),
                                                 ([4e-8] * 2, False)])
def test_updates_far_too_small_to_train_are_named_per_model_with_the_lr(ratios, claimed):
    """An lr typed 1e-9: every step moves the student by ~4e-8 of its weights, nothing non-finite, nothing lost in
    fp32, and the loss stays flat — the run said "no numerical problems". Not an lr of 1e-7 chosen on purpose (a
    ratio of ~3e-6), not steps that moved nothing (no gradients: other causes), not two steps (too few to judge)."""
    metrics = pd.DataFrame({"step": range(1, len(ratios) + 1), "split": "train", "loss": 2.8, "lr": 1e-9,
                            "update_ratio": 2e-4, "update_ratio_student": ratios, "update_ratio_teacher": 2e-3})
    found = [c for c in causes(log(), metrics).findings if c["cause"] == "updates_too_small"]
    assert bool(found) == claimed
    if claimed:
        (cause,) = found
        assert (cause["severity"], cause["model"], cause["first_step"]) == ("warning", "student", 1)
        assert "`--student-lr` (now 1e-09)" in cause["fix"] and cause["evidence"]["update_ratio"] == 4e-8


@pytest.mark.parametrize(("outputs", "targets", "names_outputs", "names_sum"), [
    (57152.0, 30, True, False), (30.0, 30, False, True), (57152.0, 4096, True, True), (57152.0, None, True, True)])
def test_a_loss_scale_collapse_under_a_large_loss_names_what_the_evidence_allows(outputs, targets, names_outputs,
                                                                                names_sum):
    """A loop's loss of ~29,000 over 30 target tokens whose model outputs reach 57,152 — new embedding rows initialised
    at 3e3 after `resize_token_embeddings`: a per-token cross-entropy is up to the spread of its logits, so the loss is
    as large as its outputs make it, and as a sum it would put ~967 on each token, which no sane per-token loss is —
    dividing by the tokens fixes nothing, yet the fix said "a sum over the tokens". Outputs of 30 cannot make it: a
    sum. Over 4096 targets (~7 each), or an unknown count, both fit, and both are named."""
    frame = log({"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 1,
                 "phase": "backward", "model": "student", "module": "lm_head", "tensor": "lm_head.weight"},
                {"kind": "scaler_backoff", "severity": "warning", "code": "warmup_scale_low", "step": 9,
                 "value": 128.0})
    metrics = pd.DataFrame({"step": range(1, 11), "split": "train", "loss": [29007.0] * 10,
                            "act_amax_student": [outputs] + [None] * 9, "loss_targets": targets})
    (cause,) = causes(frame, metrics, caller="loop").ranked
    assert ("divide it by the number of target tokens" in cause["fix"]) == names_sum, cause["fix"]
    assert ("outputs reach 5.72e+04" in cause["fix"]) == names_outputs, cause["fix"]
    assert cause["evidence"].get("largest_output") == (outputs if names_outputs else None)


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer"])
def test_a_loss_scale_collapse_from_a_teachers_router_names_what_trains_the_teacher(caller):
    """SAR's router terms weighted 1e6: the teacher's router gradients overflow fp16 from 2**16 down to a scale of
    128 (`warmup_scale_low`). Its gradients come from the router terms and the KD term, at the teacher's lr — the
    student's CE weight and lr do not reach it."""
    frame = log({"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 1,
                 "model": "teacher", "module": "model.layers.1.mlp.gate", "tensor": "model.layers.1.mlp.gate.weight"},
                {"kind": "scaler_backoff", "severity": "warning", "code": "warmup_scale_low", "step": 9,
                 "value": 128.0})
    (cause,) = causes(frame, caller=caller).ranked
    assert (cause["cause"], cause["severity"], cause["model"], cause["module"]) == (
        "loss_scale_collapse", "warning", "teacher", "model.layers.1.mlp.gate")
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    assert words["teacher_loss_weights"] in cause["fix"] and words["teacher_lr"] in cause["fix"], cause["fix"]
    if caller == "cli":
        assert "--alpha-ce" not in cause["fix"] and "--student-lr" not in cause["fix"], cause["fix"]
    student = causes(frame.assign(model="student", module="lm_head", tensor="lm_head.weight"), caller=caller)
    assert words["loss_weights"] in student[0]["fix"] and words["lr"] in student[0]["fix"]


def test_gradients_a_scaler_skipped_are_no_gradient_overflow():
    frame = log({"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 1,
                 "model": "student", "module": "lm_head"})
    assert causes(frame).ranked == []


def test_an_empty_batch_whose_loss_is_nonfinite_is_bad_data_and_explains_what_follows():
    frame = log(
        {"kind": "empty_targets", "severity": "warning", "step": 2, "phase": "loss", "model": "student"},
        {"kind": "nonfinite_loss", "severity": "critical", "code": "loss_nonfinite", "step": 2, "phase": "loss",
         "model": "student", "tensor": "loss", "value": math.nan},
        {"kind": "nonfinite_grad", "severity": "critical", "code": "grad_nonfinite_applied", "step": 2,
         "phase": "backward", "model": "student", "module": "ln_f"},
        {"kind": "nonfinite_param", "severity": "critical", "step": 2, "model": "student", "tensor": "w"},
    )
    (cause,) = causes(frame, mode="fp32").ranked
    assert (cause["cause"], cause["severity"], cause["model"], cause["first_step"]) == (
        "nonfinite_input", "critical", "student", 2)
    assert "gradient_overflow@2" in cause["evidence"]["followed_by"]


def test_an_overflowing_teacher_router_gets_the_router_fix():
    """`train` runs the teacher's checkpoint as it is: its fix is the precision flags alone, while a caller who writes
    the model's code is also offered the router computed in fp32 (the advice `train` cannot follow)."""
    act = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "teacher",
           "dtype": "float16", "value": math.inf}
    (router,) = causes(log({**act, "module": "model.layers.0.mlp.gate"}), mode="pure-fp16").ranked
    assert "MoE router" in router["fix"] and "--precision bf16-mixed" in router["fix"]
    assert "autocast" not in router["fix"] and "router in fp32" not in router["fix"]
    (router,) = causes(log({**act, "module": "model.layers.0.mlp.gate"}), caller="loop").ranked
    assert "the teacher loaded in bfloat16" in router["fix"] and "router in fp32" in router["fix"]
    (expert,) = causes(log({**act, "module": "model.layers.0.mlp.experts.1.gate_proj"})).ranked
    assert "router" not in expert["fix"]



@pytest.mark.parametrize("loaded, act_amax, undefined", [(4.1, 3.8, True), (None, 3.8, False), (4.1, 1e20, False)])
def test_a_teacher_nan_from_small_values_is_an_undefined_operation_where_its_weights_were_read(loaded, act_amax,
                                                                                              undefined):
    """A float32 teacher whose attention NaNs on a left-padded row (a causal mask over padding leaves the softmax
    nothing to attend to) from values nowhere near float32's range: the teacher's outputs are non-finite
    (`teacher_overflow`), but the fix is the mask — "hold the teacher in a wider dtype" is no fix for float32. Only
    where its weights were read (as loaded) and every output measured was small: unread, an Inf weight is as
    likely; near the range, an overflow is — of values out of scale, which no dtype wider than float32 holds: the fix
    is never a wider teacher there."""
    act = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "teacher",
           "module": "attn", "dtype": "float32", "value": math.nan}
    metrics = pd.DataFrame({"step": [1], "split": "train", "act_amax_teacher": [act_amax], "act_amax_student": [3.7],
                            **({"loaded_amax_teacher": [loaded]} if loaded is not None else {})})
    (cause,) = causes(log(act, {**NAN_LOSS, "step": 1}), metrics, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["model"], cause["module"], cause["first_step"]) == ("teacher_overflow", "teacher",
                                                                                      "attn", 1)
    assert ("undefined on its inputs" in cause["fix"]) == undefined == cause["evidence"].get("undefined_operation",
                                                                                             False)
    assert ("out of scale" in cause["fix"]) != undefined and "hold the teacher in a wider" not in cause["fix"]


def test_a_float16_teachers_nan_that_float32_makes_too_beside_an_fp32_student_is_an_undefined_operation():
    """A teacher loaded in float16 beside an fp32 student (the run computes nothing else in float16): its module's
    NaN/Inf, run again in float32 on the same finite inputs, was non-finite there too — no float16 overflow, so
    "load the teacher wider" would not help; the fix is the operation's."""
    act = {"kind": "nonfinite_activation", "severity": "critical", "step": 2, "phase": "forward", "model": "teacher",
           "module": "h.1.mlp", "dtype": "float16", "value": math.inf}
    replay = {"kind": "wide_replay", "severity": "info", "step": 2, "phase": "forward", "model": "teacher",
              "module": "h.1.mlp", "dtype": "float32", "value": math.inf}
    metrics = pd.DataFrame({"step": [1, 2], "split": "train", "act_amax_teacher": [3.3, None],
                            "loaded_amax_teacher": [1.0, None]})
    frame = log(replay, act, {**NAN_LOSS, "step": 2})
    (cause,) = causes(frame, metrics, mode="fp32", caller="trainer").ranked
    assert (cause["cause"], cause["module"], cause["first_step"]) == ("teacher_overflow", "h.1.mlp", 2)
    assert cause["evidence"]["float32_replay"] == "Inf" and "undefined on its inputs" in cause["fix"]
    finite = {**replay, "value": 7e4}  # float32 holds it: float16's range, the teacher loaded wider is the fix
    (cause,) = causes(log(finite, act, {**NAN_LOSS, "step": 2}), metrics, mode="fp32", caller="trainer").ranked
    assert "wider dtype" in cause["fix"] and "undefined" not in cause["fix"]


def test_a_loop_bug_that_inflates_updates_is_not_blamed_for_a_fault_no_update_makes():
    """Summed micro-batches double each update: a blow-up after them is theirs — but not a frozen teacher's overflow,
    bad data or a weight the loop wrote, which no update's size makes. Those stay their own causes and the loop
    bug a warning; what went wrong before them is still blamed on it."""
    summed = {"kind": "setup_note", "code": "micro_batches_summed", "severity": "warning", "step": 1,
              "phase": "loss", "model": "student", "value": 2.0}
    teacher = {"kind": "nonfinite_activation", "severity": "critical", "step": 3, "phase": "forward",
               "model": "teacher", "module": "h.1.mlp", "dtype": "float16", "value": math.inf}
    diagnosis = causes(log(summed, teacher, {**NAN_LOSS, "step": 3}), mode="fp32", caller="loop")
    assert [(c["cause"], c["severity"]) for c in diagnosis.findings] == [("micro_batches_summed", "warning")]
    assert diagnosis[0]["cause"] == "teacher_overflow"
    extreme = {"kind": "extreme_update", "severity": "warning", "step": 2, "phase": "optimizer", "model": "student",
               "tensor": "w", "value": 4.0}
    diagnosis = causes(log(summed, extreme, teacher, {**NAN_LOSS, "step": 3}), mode="fp32", caller="loop")
    (finding,) = diagnosis.findings
    assert finding["severity"] == "critical" and finding["evidence"]["then"] == "extreme_update@2"

def test_an_overflowing_student_router_gets_the_router_fix():
    """An MoE student (Qwen2-MoE, OLMoE trained in a caller's loop) whose router logits leave float16: the fix is the
    router's — its logits in fp32 — as for a teacher's router, not the generic op advice; an expert's gate_proj is no
    router."""
    act = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "student",
           "dtype": "float16", "value": math.inf}
    for module in ("model.layers.1.mlp.gate", "encoder.block.1.layer.1.mlp.router.classifier"):  # Switch's: a layer
        (router,) = causes(log({**act, "module": module}), caller="loop").ranked
        assert router["cause"] == "activation_overflow" and router["evidence"]["router"] is True
        assert "MoE router" in router["fix"] and "router in fp32" in router["fix"]
    for module in ("model.layers.1.mlp.experts.1.gate_proj", "model.layers.1.mlp.shared_expert_gate"):
        (expert,) = causes(log({**act, "module": module}), caller="loop").ranked
        assert "router" not in expert["fix"] and expert["evidence"]["router"] is False


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer", "accelerate"])
def test_every_fix_is_written_in_its_callers_terms(caller):
    """No fix names an option its caller does not have: CLI flags only for the CLI."""
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    for name, template in [*FIXES.items(), *BF16_FIXES.items()]:
        values = {**words, "module": "m", "dtype": "float16", "eps": "1e-08", "tensor": "t", "ratio": "50",
                  "term": "loss", "amax": "3"}
        text = template.format_map(defaultdict(lambda: "x", values))  # any other figure: a placeholder
        if caller != "cli":
            assert "--" not in text, (name, text)
        if caller == "trainer":
            assert "Probes(" not in text, (name, text)


def test_a_bf16_fix_advises_no_fp16_and_bf16_mixed_only_for_what_bf16_weights_lose():
    """A run that computes in bfloat16 already has bf16 (and fp32's range); fp16 would narrow it. Only rounding in
    bfloat16-held weights or optimizer state — which bf16-mixed's fp32 master weights and state cannot have — is
    fixed by bf16-mixed; every other bf16 fix names the step's size, not a precision."""
    assert set(BF16_FIXES) <= set(FIXES)
    rounding = {"update_underflow", "update_underflow_whole_tensors", "optimizer_state_underflow",
                "optimizer_state_underflow_warning", "weight_decay_lost"}
    for name, template in BF16_FIXES.items():
        assert "{mixed}" not in template, name
        assert ("{bf16_mixed}" in template) == (name in rounding), name


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer"])
def test_weight_decay_that_rounds_away_is_a_warning_fixed_by_the_dtype_it_rounds_in(caller):
    """AdamW's usual lr × weight_decay (1e-5) is below half a bf16 ulp: in pure bf16 the decay does nothing, and fp32
    master weights under the bf16 compute keep it; in fp16 either mixed mode does; in fp32 weights only a mistyped
    weight_decay is that small. A finding, not `update_underflow`: the updates themselves may be intact."""
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    event = {"kind": "optimizer_preflight", "severity": "warning", "code": "weight_decay_zero", "step": 1,
             "phase": "optimizer", "model": "student", "tensor": "student: 28 tensors", "value": 1e-5,
             "dtype": "bfloat16"}
    diagnosis = causes(log(event), mode="pure-bf16", caller=caller)
    (bf16,) = diagnosis.findings
    assert diagnosis == []
    assert (bf16["cause"], bf16["severity"], bf16["model"], bf16["tensor"], bf16["first_step"]) == (
        "weight_decay_lost", "warning", "student", "student: 28 tensors", 1)
    assert bf16["evidence"] == {"lr_times_weight_decay": 1e-5, "dtype": "bfloat16"}
    assert words["bf16_mixed"] in bf16["fix"] and words["mixed"] not in bf16["fix"] and "0.99999" in bf16["fix"]
    (fp16,) = causes(log({**event, "dtype": "float16"}), mode="pure-fp16", caller=caller).ranked
    assert fp16["cause"] == "weight_decay_lost"
    assert words["mixed"] in fp16["fix"] and words["bf16_mixed"] in fp16["fix"]
    (fp32,) = causes(log({**event, "value": 1e-45, "dtype": "float32"}), mode="fp32", caller=caller).ranked
    assert fp32["cause"] == "weight_decay_lost"
    assert words["weight_decay"] in fp32["fix"] and "precision is not the cause" in fp32["fix"]
    assert words["mixed"] not in fp32["fix"] and words["bf16_mixed"] not in fp32["fix"]
    lost = {"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student", "tensor": "h.0.w",
            "value": 0.9, "dtype": "float32"}  # an lr of 1e-10: the decay goes with the updates, the lr is the cause
    (both,) = causes(log({**event, "value": 1e-12, "dtype": "float32"}, lost), mode="fp32", caller=caller).ranked
    assert both["cause"] == "update_underflow"  # the lost updates' own: the decay goes with them


def test_rank_orders_by_severity_then_time_then_cause_order():
    warning = Cause("update_underflow", "warning", first_step=1)
    late = Cause("teacher_overflow", "critical", first_step=5, phase="forward")
    early = Cause("optimizer_eps_underflow", "critical", first_step=5, phase="optimizer")
    assert [c.cause for c in rank([warning, early, late])] == ["teacher_overflow", "optimizer_eps_underflow",
                                                               "update_underflow"]


def test_the_code_vocabulary_is_documented():
    assert all(isinstance(text, str) and len(text) > 10 for text in CODES.values())


def test_a_diagnosis_prints_readably_and_holds_plain_numbers():
    frame = log({"kind": "lost_updates", "severity": "warning", "step": 3, "model": "student", "tensor": "h.0.w",
                 "value": 0.9, "dtype": "bfloat16"})
    diagnosis = causes(frame, mode="pure-bf16", caller="loop")
    (cause,) = diagnosis
    assert type(cause["evidence"]["lost_update_fraction"]) is float  # not np.float64
    text = repr(diagnosis)
    assert "update_underflow (warning) at step 3 in student h.0.w" in text and "np." not in text
    assert "lost_update_fraction=0.9" in text and "fix:" in text
    assert repr(causes(log())) == "Diagnosis: no numerical problems found"


def test_slow_weight_growth_over_a_long_run_is_not_inflation():
    """A weight that doubles over hundreds of healthy steps is training; doubling within ten steps is not."""
    frame = log({"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student", "tensor": "w",
                 "value": 0.4, "dtype": "bfloat16"})
    steps = list(range(1, 301))
    slow = pd.DataFrame({"step": steps, "split": "train", "param_amax": [1.0 + s / 100 for s in steps]})  # ×4
    assert [c["cause"] for c in causes(frame, slow, mode="pure-bf16")] == ["update_underflow"]
    fast = slow.assign(param_amax=[1.0] * 150 + [3.0] * 150)
    assert causes(frame, fast, mode="pure-bf16").ranked == []  # inflated: no lost-update claim


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer"])
def test_updates_lost_in_fp32_weights_are_a_step_size_problem_not_a_precision_one(caller):
    """fp32 weights are what mixed precision's master weights are: there is no wider dtype to advise. An update
    below half an fp32 ulp (~6e-8 of the weight) is the learning rate, its schedule or the clipping."""
    lost = {"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student", "tensor": "h.0.w",
            "value": 0.9}
    (fp32,) = causes(log({**lost, "dtype": "float32"}), mode="fp32", caller=caller).ranked
    assert fp32["cause"] == "update_underflow" and fp32["evidence"]["dtype"] == "float32"
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    assert words["lr"] in fp32["fix"] and words["clip"] in fp32["fix"] and "schedule" in fp32["fix"]
    assert words["mixed"] not in fp32["fix"] and words["bf16_mixed"] not in fp32["fix"] and "6e-08" in fp32["fix"]
    (bf16,) = causes(log({**lost, "dtype": "bfloat16"}), mode="pure-bf16", caller=caller).ranked
    assert words["bf16_mixed"] in bf16["fix"] and words["lr"] in bf16["fix"]  # low-precision weights: master weights
    # unless the lr is below half an ulp of those bf16 weights even held in fp32: master weights would lose them too
    below_fp32 = {"kind": "optimizer_preflight", "code": "update_below_fp32_half_ulp", "severity": "warning",
                  "step": 1, "phase": "optimizer", "model": "student", "tensor": "student", "dtype": "float32",
                  "value": 0.96}
    (tiny,) = causes(log(below_fp32, {**lost, "dtype": "bfloat16"}), mode="pure-bf16", caller=caller).ranked
    assert words["lr"] in tiny["fix"] and "96%" in tiny["fix"] and tiny["evidence"]["lost_in_float32_too"] == 0.96
    assert words["bf16_mixed"] not in tiny["fix"] and words["mixed"] not in tiny["fix"], tiny["fix"]
    (router,) = causes(log({**below_fp32, "model": "teacher"}, {**lost, "dtype": "bfloat16"}), mode="pure-bf16",
                       caller=caller).ranked
    assert words["bf16_mixed"] in router["fix"]  # another model's lr too small says nothing of this one's


@pytest.mark.parametrize("caller", ["cli", "loop"])
def test_gradients_whose_squares_are_0_even_in_fp32_are_a_step_size_problem_not_the_states_precision(caller):
    """Pure bf16 under a loss weighted 1e-30 (or a clip of 1e-20): the second moments flush in the bf16 state, and
    (1 − beta2)·g² would be 0 in float32 too (`gradients_below_fp32`); fp32 state and master weights lose them as
    well, so neither fix names a precision: the loss weights, the clipping (the option, not 'it clips already') and
    the lr do."""
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    where = {"step": 1, "phase": "optimizer", "model": "student", "module": "wte", "tensor": "wte.weight"}
    state = {"kind": "optimizer_state_underflow", "severity": "warning", "value": 0.98, "dtype": "bfloat16", **where}
    lost = {"kind": "lost_updates", "severity": "warning", "value": 0.95, "dtype": "bfloat16", **where}
    note = {"kind": "setup_note", "code": "gradients_below_fp32", "severity": "warning", "value": 1.0,
            "dtype": "float32", **where}
    metrics = pd.DataFrame({"step": [1, 2], "split": "train", "loss": [9.7, 9.7], "clip_max_norm": 1e-20})
    found = causes(log(state, note, lost), metrics, mode="pure-bf16", caller=caller, options={"max_grad_norm": 1e-20})
    assert [c["cause"] for c in found] == ["optimizer_state_underflow", "update_underflow"]
    for cause in found:
        assert words["loss_weights"] in cause["fix"] and words["clip"] in cause["fix"], cause["fix"]
        assert words["bf16_mixed"] not in cause["fix"] and "already" not in cause["fix"], cause["fix"]
    assert found[0]["evidence"]["zeroed_in_float32_too"] == 1.0
    (alone,) = causes(log(state), mode="pure-bf16", caller=caller)  # no note: the state's dtype is the fix
    assert words["bf16_mixed"] in alone["fix"]


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer"])
def test_whole_tensors_that_never_train_while_the_run_does_are_fixed_with_master_weights_not_a_higher_lr(caller):
    """bf16 RMSNorm gains at 1.0 lose every update while the run loses few (`lost_updates_whole_tensors`): the fix
    does not say the tensor "loses most" of a run that loses few, nor offer a higher lr as an equal answer — Adam's
    step is about the lr, and moving a value of 1.0 in bfloat16 needs one above half its ulp (~4e-3), far above what
    trains the rest. fp32 master weights keep such tensors; the threshold is said for the dtype held."""
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    whole = {"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student",
             "tensor": "model.norm.weight", "value": 1.0, "code": "lost_updates_whole_tensors"}
    (bf16,) = causes(log({**whole, "dtype": "bfloat16"}), mode="pure-bf16", caller=caller).ranked
    assert bf16["cause"] == "update_underflow" and bf16["tensor"] == "model.norm.weight"
    assert "loses most" not in bf16["fix"] and "raise" not in bf16["fix"] and "4e-03" in bf16["fix"]
    assert words["bf16_mixed"] in bf16["fix"] and words["mixed"] not in bf16["fix"], bf16["fix"]
    (fp16,) = causes(log({**whole, "dtype": "float16"}), mode="pure-fp16", caller=caller).ranked
    assert "loses most" not in fp16["fix"] and "5e-04" in fp16["fix"] and words["mixed"] in fp16["fix"]


@pytest.mark.parametrize("caller", ["cli", "loop", "trainer"])
def test_a_bf16_runs_rounding_losses_are_fixed_with_fp32_master_weights_under_its_bf16_not_with_fp16(caller):
    """Pure bf16 (the Trainer's `bf16=True` over a model loaded in bfloat16, AdamW's state in bf16 with it) loses
    updates or flushes Adam's state: fp32 master weights under the same bf16 compute keep both. Advising fp16 AMP
    (`TrainingArguments(fp16=True)`) would trade bf16's range for a loss scaler the run does not need."""
    words = {concept: phrases[caller] for concept, phrases in PHRASES.items()}
    lost = log({"kind": "lost_updates", "severity": "warning", "step": 1, "model": "student", "tensor": "h.0.w",
                "value": 0.8, "dtype": "bfloat16"})
    state = log({"kind": "optimizer_state_underflow", "severity": "warning", "step": 1, "model": "student",
                 "tensor": "h.0.w", "value": 0.5, "dtype": "bfloat16"})
    for frame in (lost, state):
        (root,) = causes(frame, mode="pure-bf16", caller=caller).ranked
        assert words["bf16_mixed"] in root["fix"] and words["mixed"] not in root["fix"], root["fix"]
        (fp16,) = causes(frame.assign(dtype="float16"), mode="pure-fp16", caller=caller).ranked
        assert words["mixed"] in fp16["fix"]  # fp16 weights: fp16 AMP stays an answer


ZERO_GRADIENTS = {"kind": "zero_gradients", "severity": "warning", "step": 1, "phase": "backward", "model": "student",
                  "module": "ln_f", "tensor": "ln_f.bias", "value": 1.0}


def test_no_gradients_after_a_critical_failure_are_its_symptom():
    """A loop that guards its loss (`if not torch.isfinite(loss): return None`, Lightning's skip) steps with no
    gradients once a teacher's overflow poisons every batch: that is the overflow's doing, not a loss "cut off from
    the weights" with a fix about detached logits."""
    overflow = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward",
                "model": "teacher", "module": "h.1.mlp.c_proj", "dtype": "float16", "value": math.inf}
    (root,) = causes(log(overflow, {**ZERO_GRADIENTS, "phase": "optimizer", "dtype": "float32"}), mode="fp32",
                     caller="lightning").ranked
    assert root["cause"] == "teacher_overflow" and "no_gradients@1" in root["evidence"]["followed_by"]


def test_gradients_flushed_to_zero_by_an_unscaled_fp16_backward_are_update_underflow_with_the_scaler_fix():
    frame = log({**ZERO_GRADIENTS, "dtype": "float16"})
    (cause,) = diagnose(frame, None, {"precision": {"mode": "mixed", "loss_scaling": False}, "caller": "loop"})
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "update_underflow", "warning", "ln_f.bias", 1)
    assert "GradScaler" in cause["fix"] and cause["evidence"]["zero_gradient_tensor_fraction"] == 1.0


ZERO_NORM = {"kind": "zero_activation", "severity": "info", "step": 1, "phase": "forward", "model": "student",
             "module": "norm", "dtype": "float16", "value": 0.0}


@pytest.mark.parametrize("float32_value, expected", [(5.66, "activation_overflow"), (0.0, "no_gradients")])
def test_a_float16_output_zeroed_everywhere_is_read_off_its_float32_replay(float32_value, expected):
    """A float16 norm whose output is 0 everywhere, and most gradients 0 behind it, in an unscaled float16 run: the
    forward explains the zero gradients, not a backward's flush. Run again in float32 on the same inputs and weights
    (`wide_replay`) it is non-zero: float16 zeroed it (mean(x²) Inf, x · rsqrt(Inf) = 0) — an overflow of an
    intermediate, at the norm, with an fp32 fix; 0 there too, the code zeroes it (`no_gradients`), no precision fix."""
    replay = {"kind": "wide_replay", "severity": "info", "step": 2, "phase": "forward", "model": "student",
              "module": "norm", "dtype": "float32", "value": float32_value}
    frame = log(ZERO_NORM, replay, {**ZERO_GRADIENTS, "module": "head", "tensor": "head.weight", "dtype": "float16"})
    found = diagnose(frame, None, {"precision": {"mode": "pure-fp16", "loss_scaling": False}, "caller": "loop"})
    root = found.ranked[0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (expected, "student", "norm", 1)
    assert "update_underflow" not in [c["cause"] for c in found.ranked]
    if expected == "activation_overflow":
        assert root["evidence"]["float32_replay"] == 5.66 and "fp32" in root["fix"] and "Dropout" not in root["fix"]
        assert found[0] == root and "no_gradients" not in [c["cause"] for c in found.findings]
    else:  # the code's doing: a finding, not a numerical cause
        assert found.findings[0] == root and "Dropout" in root["fix"] and "float16" not in root["fix"]


@pytest.mark.parametrize("dtype, loss_scaling", [("float16", True), ("float32", False), ("bfloat16", False)])
def test_zero_gradients_that_no_fp16_flush_explains_are_no_precision_cause(dtype, loss_scaling):
    """A loss scaler keeps fp16 gradients above the flush; fp32 and bf16 have fp32's range: zeros there are
    structural — nothing reaches the weights (logits detached, gradients cleared before the step) — which precision
    does not explain: named as such, with no precision fix."""
    frame = log({**ZERO_GRADIENTS, "dtype": dtype})
    diagnosis = diagnose(frame, None, {"precision": {"mode": "mixed", "loss_scaling": loss_scaling}, "caller": "loop"})
    (cause,) = diagnosis.findings
    assert diagnosis == []  # no numerical cause: a finding about the loop
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("no_gradients", "warning", 1)
    assert "detach" in cause["fix"] and "zero_grad" in cause["fix"] and "GradScaler" not in cause["fix"]


@pytest.mark.parametrize("dtype, loss_scaling", [("float32", False), ("float16", False), ("float16", True)])
def test_zero_gradients_of_a_loss_at_exactly_0_are_its_minimum_not_a_cut_off_or_a_flush(dtype, loss_scaling):
    """A student identical to its teacher trained on KD alone: the KD term is exactly 0 and so is every gradient.
    Nothing was cut off (no `.detach()`) nor flushed by float16 (no GradScaler needed): the loss sits at its minimum.
    Said as information, with what makes a loss 0 — never as a warning with the wrong remedy."""
    frame = log({**ZERO_GRADIENTS, "dtype": dtype})
    metrics = pd.DataFrame({"step": [1, 2, 3], "split": "train", "loss": [0.0, 0.0, 0.0]})
    config = {"precision": {"mode": "mixed", "loss_scaling": loss_scaling}, "caller": "loop"}
    diagnosis = diagnose(frame, metrics, config)
    (cause,) = diagnosis.findings
    assert diagnosis == []  # no numerical cause: a finding, said as information
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("no_gradients", "info", 1)
    assert cause["evidence"]["loss_zero"] is True and cause["evidence"]["steps_at_zero_loss"] == 3
    assert "identical to its teacher" in cause["fix"] and "detach" not in cause["fix"]
    assert "GradScaler" not in cause["fix"]
    # a loss that is not 0 on the step keeps the structural reading
    (cut,) = diagnose(frame, metrics.assign(loss=[2.5, 2.5, 2.5]), config).ranked
    assert cut["severity"] == "warning" and cut["cause"] in ("no_gradients", "update_underflow")


@pytest.mark.parametrize("caller", ["loop", "trainer", "accelerate", "lightning"])
def test_a_loss_cut_off_from_the_weights_is_named_in_the_code_the_caller_writes(caller):
    """Under the Trainer the user writes no backward and no `zero_grad()`: what cuts the loss off is their
    `compute_loss` (or a callback), so the fix names that, not a loop's `zero_grad()` before `step()`."""
    diagnosis = causes(log({**ZERO_GRADIENTS, "dtype": "float32"}), mode="fp32", caller=caller)
    (cause,) = diagnosis.findings
    assert diagnosis == [] and cause["cause"] == "no_gradients" and PHRASES["loss_cut_off"][caller] in cause["fix"]
    if caller == "trainer":
        assert "`compute_loss`" in cause["fix"] and "before `step()`" not in cause["fix"], cause["fix"]
    if caller == "lightning":
        assert "`training_step`" in cause["fix"], cause["fix"]


NAN_LOSS = {"kind": "nonfinite_loss", "severity": "critical", "code": "loss_nonfinite", "step": 1, "phase": "loss",
            "model": "student", "tensor": "loss", "value": math.nan, "dtype": "float32"}
AFTER_IT = ({"kind": "nonfinite_grad", "severity": "critical", "code": "grad_nonfinite_applied", "step": 1,
             "phase": "backward", "model": "student", "module": "ln_f", "tensor": "ln_f.weight"},
            {"kind": "nonfinite_param", "severity": "critical", "step": 1, "model": "student", "tensor": "ln_f.weight"})
MEASURED = pd.DataFrame({"step": [1], "split": "train", "act_amax_student": [3.5], "act_amax_teacher": [7.0]})


def test_a_loss_that_is_the_first_nonfinite_value_from_measured_finite_outputs_is_the_loss_computation():
    (cause,) = causes(log(NAN_LOSS, *AFTER_IT), MEASURED, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "divergence", "critical", "loss", 1)
    assert cause["fix"].startswith("check the loss computation") and "7" in cause["fix"]
    assert cause["evidence"]["act_amax_teacher"] == 7.0 and "gradient_overflow@1" in cause["evidence"]["followed_by"]
    (low,) = causes(log({**NAN_LOSS, "dtype": "float16"}, *AFTER_IT), MEASURED, mode="pure-fp16", caller="loop").ranked
    assert low["fix"].startswith("compute the loss in fp32")


@pytest.mark.parametrize("losses, fix", [([math.inf, 63072.0, math.inf, math.inf], "take the mean"),
                                         ([math.inf, 5.1, 5.0, 4.9], "compute the loss in fp32")])
def test_a_float16_loss_that_overflowed_before_an_extreme_update_is_the_root_and_a_sum_is_named(losses, fix):
    """A float16 loss summed over 15,000 tokens is Inf at step 1 while every module output is ~4: its gradient is
    finite (the sum's), and 15,000× a mean's — SGD's step 3 is as large as the weights. The extreme update's
    warning ('the lr is far too high; precision is not the cause') was the whole diagnosis, the Inf loss at step 1
    claimed by nothing. It is the root, at step 1, and a loss whose finite values reach 63072 is named a sum."""
    frame = log({**NAN_LOSS, "value": math.inf, "dtype": "float16"},
                {"kind": "extreme_update", "severity": "warning", "step": 3, "phase": "optimizer", "model": "student",
                 "module": "wte", "tensor": "wte.weight", "value": 1.36})
    metrics = pd.DataFrame({"step": [1, 2, 3, 4], "split": "train", "loss": losses,
                            "act_amax_student": [4.3, None, None, None]})
    (cause,) = causes(frame, metrics, mode="pure-fp16", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "divergence", "critical", "loss", 1)
    assert fix in cause["fix"] and cause["evidence"]["then"] == "extreme_update@3"
    assert ("largest_finite_loss" in cause["evidence"]) is (fix == "take the mean")


@pytest.mark.parametrize("before", [
    {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "teacher",
     "module": "h.0", "value": math.inf},  # the same step's forward came first: the teacher explains it
    {"kind": "nonfinite_param", "severity": "critical", "step": 0, "model": "student", "tensor": "w"},
    {"kind": "extreme_update", "severity": "warning", "step": 0, "phase": "optimizer", "model": "student",
     "tensor": "w", "value": 50.0},
])
def test_the_loss_computation_is_not_blamed_when_something_went_wrong_before_the_loss(before):
    diagnosis = causes(log(before, {**NAN_LOSS, "step": 1}), MEASURED, mode="fp32", caller="loop")
    assert not any(c["fix"].startswith("check the loss computation") for c in diagnosis.ranked)


@pytest.mark.parametrize("caller, unplaced", [("loop", True), ("accelerate", True), ("lightning", True),
                                              ("cli", False), ("trainer", False)])
def test_a_nonfinite_loss_on_a_step_without_module_statistics_is_unplaced_divergence(caller, unplaced):
    """A KD temperature annealed to 0 on a step between statistics steps: the loss is the run's first non-finite
    value and nothing measured the modules. The fix says it is unplaced and how to place it, and what can reach 0
    in a loss — not only "lower the lr". `train` and the Trainer's callback replay such a step with statistics on:
    there the missing statistics are not the reason."""
    unmeasured = MEASURED.assign(act_amax_student=[None], act_amax_teacher=[None])
    (cause,) = causes(log(NAN_LOSS), unmeasured, mode="fp32", caller=caller).ranked
    assert cause["cause"] == "divergence" and not cause["fix"].startswith("check the loss computation")
    assert ("no module statistics" in cause["fix"] and "temperature" in cause["fix"]) is unplaced
    assert cause["evidence"].get("unplaced", False) is unplaced
    if unplaced:
        assert cause["tensor"] == "loss" and "level=\"full\")`" in cause["fix"]


TRIPLED = pd.DataFrame({"step": [1, 2, 3, 4], "split": "train", "loss": [4.0, 6.0, 13.0, 20.0]})


@pytest.mark.parametrize("mode, master, blown", [("fp32", None, True), ("mixed", "float32", True),
                                                 ("bf16-mixed", None, True), ("external", "float32", True),
                                                 ("pure-bf16", "bfloat16", False), ("pure-fp16", None, False)])
def test_a_finite_loss_that_triples_is_divergence_where_the_updated_weights_are_fp32(mode, master, blown):
    """Trainer(bf16=True) or a GradScaler loop keeps fp32 master weights: a loss that triples with nothing
    non-finite is a step too large there as in fp32. In bf16 or fp16 weights precision may have inflated the
    updates: the precision rules speak, not this one."""
    precision = {"mode": mode, **({"master_dtype": master} if master else {})}
    found = diagnose(log(), TRIPLED, {"precision": precision, "caller": "trainer"}).ranked
    assert [(c["cause"], c["severity"], c["first_step"]) for c in found] == (
        [("divergence", "critical", 3)] if blown else [])
    if blown:  # no module, weight or update measured it: said so, with the loss code among the checks
        assert found[0]["evidence"]["unplaced"] is True and "from 4 to 20" in found[0]["fix"]
        assert "loss code" in found[0]["fix"] and "`learning_rate`" in found[0]["fix"]


KD_CONFIG = {"objective": {"kind": "logit-kd"}, "options": {"alpha_kd": 0.5, "alpha_ce": 0.0}}


@pytest.mark.parametrize("loss, ce, caller, blown_at", [
    ([1e-7, 1.1e-3, 3e-4, 3.5e-4, 3.3e-4], [5.56, 5.6, 5.57, 5.58, 5.55], "cli", None),  # at its floor
    ([1e-7, 1.1e-3, 3e-4, 3.5e-4, 3.3e-4], [5.56, 5.6, 5.57, 5.58, 5.55], "loop", 2),  # no scale known
    ([0.01, 0.02, 2.5, 4.0, 4.2], [0.03, 0.05, 6.0, 8.0, 8.5], "cli", 3)])  # a fitted student blowing up
def test_a_kd_loss_grown_from_its_rounding_floor_is_judged_against_the_students_cross_entropy(loss, ce, caller,
                                                                                              blown_at):
    """A student distilled from its own copy in mixed precision: KD starts at fp16 rounding's ~1e-7, and the first
    lr-sized steps take it to ~1e-3 nats per token — ten thousand times its first value, a millionth of what the
    student's cross-entropy (5.6 nats) could show. Where the objective's terms are known (`train`'s logit KD) the
    rise must also be a tenth of that scale; a well-fitted student whose loss leaves 0.01 for 4 still blows up."""
    metrics = pd.DataFrame({"step": range(1, 6), "split": "train", "loss": loss, "ce_loss": ce, "lr": 1e-3})
    found = [(c["cause"], c["severity"], c["first_step"]) for c in
             diagnose(log(), metrics, {"precision": {"mode": "mixed"}, "caller": caller, **KD_CONFIG}).ranked]
    assert found == ([("divergence", "critical", blown_at)] if blown_at else [])


def test_a_negative_loss_is_not_above_three_times_itself():
    """A loss may be negative (a log-density, a term subtracted): 3 × a negative first loss is below it, so every
    such loss read as a blow-up from step 1."""
    negative = pd.DataFrame({"step": [1, 2, 3], "split": "train", "loss": [-2.0, -2.5, -2.4]})
    assert causes(log(), negative, mode="fp32", caller="loop").ranked == []


SKIPPED_NAN = ({**NAN_LOSS, "step": 5},
               {"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 5,
                "phase": "backward", "model": "student", "module": "ln_f", "tensor": "ln_f.weight"},
               {"kind": "scaler_skip", "severity": "info", "code": "scaler_skip_overflow", "step": 5,
                "phase": "optimizer"})
BETWEEN_STATISTICS = pd.DataFrame({"step": [1, 5], "split": "train", "act_amax_student": [3.5, None]})


def test_a_nonfinite_loss_under_fp16_compute_between_statistics_steps_is_an_unplaced_forward_overflow():
    """Mixed precision, a batch whose forward overflows fp16 on a step without module statistics: the scaler
    skipped it and the weights are intact — a contained fp16 overflow, not a blow-up precision does not explain."""
    (cause,) = causes(log(*SKIPPED_NAN), BETWEEN_STATISTICS, mode="mixed", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("activation_overflow", "warning", 5)
    assert cause["evidence"]["loss_scaler_skipped"] is True and 'level="full"' in cause["fix"]
    ruined = log(*SKIPPED_NAN, {"kind": "nonfinite_param", "severity": "critical", "step": 5, "model": "student",
                                "tensor": "w"})
    (root,) = causes(ruined, BETWEEN_STATISTICS, mode="pure-fp16", caller="loop").ranked
    assert (root["cause"], root["severity"]) == ("activation_overflow", "critical")
    assert "divergence@5" in root["evidence"]["followed_by"]


def _overflow_from_step_4_named_at_step_10(model: str, recovered_at: int | None = None):
    """An AMP loop at `standard` (statistics on steps 1 and 10): from step 4 on every batch's forward overflows
    float16 in `h.0.mlp.c_fc` of `model`; the scaler skips each step (the scale halves to below 1 by step 12), and
    step 10's statistics name the module. `recovered_at`: a step in between whose loss was finite."""
    skips = [{"kind": "scaler_skip", "severity": "info", "code": "scaler_skip_overflow", "step": s,
              "phase": "optimizer", "value": 2.0 ** (8 - s + 3)} for s in range(4, 13) if s != recovered_at]
    frame = log({**NAN_LOSS, "step": 4},
                {"kind": "nonfinite_grad", "severity": "info", "code": "grad_nonfinite_skipped", "step": 4,
                 "phase": "backward", "model": "student", "module": "ln_f", "tensor": "ln_f.bias"},
                *skips[:6],
                {"kind": "scaler_backoff", "severity": "warning", "code": "skip_streak", "step": 9,
                 "phase": "optimizer", "value": 4.0},
                {"kind": "nonfinite_activation", "severity": "critical", "step": 10, "phase": "forward",
                 "model": model, "module": "h.0.mlp.c_fc", "value": math.inf, "dtype": "float16"},
                *skips[6:],
                {"kind": "scale_below_one", "severity": "critical", "step": 12, "phase": "optimizer", "value": 0.5})
    steps = list(range(1, 13))
    loss = [5.5, 5.4, 5.3] + [5.2 if s == recovered_at else math.nan for s in range(4, 13)]
    metrics = pd.DataFrame({"step": steps, "split": "train", "loss": loss,
                            f"act_amax_{model}": [3.5 if s in (1, 10) else None for s in steps]})
    return frame, metrics


@pytest.mark.parametrize("model, cause", [("student", "activation_overflow"), ("teacher", "teacher_overflow")])
def test_a_forward_overflow_named_at_a_later_statistics_step_began_at_the_first_of_the_steps_that_failed_alike(
        model, cause):
    """A user's loop does not replay a step: a forward that overflows from step 4 on is named at step 10, the next
    statistics step. Every step in between had a non-finite loss and was skipped — the same weights, failing alike —
    so the overflow began at step 4, and the loss scale that collapsed under it (every skipped step halves it) is its
    symptom, not the root (it was: `loss_scale_collapse` at the streak's step 9, the overflow at step 10 folded in)."""
    root, *rest = causes(*_overflow_from_step_4_named_at_step_10(model), mode="mixed", caller="loop")
    assert (root["cause"], root["severity"], root["model"], root["module"], root["first_step"]) == (
        cause, "critical", model, "h.0.mlp.c_fc", 4)
    assert root["evidence"]["module_named_at_step"] == 10 and root["evidence"]["loss_nonfinite_since"] == 4
    assert "loss_scale_collapse" in root["evidence"]["followed_by"]
    assert not [c for c in rest if c["cause"] == "activation_overflow"]  # not said a second time, unplaced


def test_a_forward_overflow_after_a_finite_step_began_at_the_first_step_after_it():
    """A finite loss in between (step 7): the steps before it failed for a reason of their own, said apart (an
    unplaced overflow at step 4) — the overflow named at step 10 began at step 8, not back at step 4."""
    frame, metrics = _overflow_from_step_4_named_at_step_10("student", recovered_at=7)
    root, *rest = causes(frame, metrics, mode="mixed", caller="loop")
    assert (root["cause"], root["module"], root["first_step"]) == ("activation_overflow", "h.0.mlp.c_fc", 8)
    assert root["evidence"]["module_named_at_step"] == 10 and root["evidence"]["loss_nonfinite_since"] == 8
    assert [(c["cause"], c["module"], c["first_step"]) for c in rest] == [("activation_overflow", None, 4)]


def test_the_same_loss_in_fp32_or_with_the_modules_measured_is_not_called_an_fp16_overflow():
    (fp32,) = causes(log(*SKIPPED_NAN), BETWEEN_STATISTICS, mode="fp32", caller="loop").ranked
    assert fp32["cause"] == "divergence"
    measured = BETWEEN_STATISTICS.assign(act_amax_student=[3.5, 4.0])
    (computed,) = causes(log(*SKIPPED_NAN), measured, mode="mixed", caller="loop").ranked
    assert computed["cause"] == "divergence" and computed["fix"].startswith("check the loss computation")


NAN_OUTPUT = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward",
              "model": "student", "module": "attn", "value": math.nan, "dtype": "float32"}
THEN_RUINED = ({**NAN_LOSS, "step": 1}, *AFTER_IT)
SMALL_VALUES = pd.DataFrame({"step": [1], "split": "train", "act_amax_student": [12.0], "param_amax": [math.nan]})


@pytest.mark.parametrize("model, dtype, mode", [("student", "float32", "fp32"), ("student", "bfloat16", "bf16-mixed"),
                                                ("projection", "float32", "fp32")])
def test_a_nan_made_from_small_values_without_fp16_is_an_undefined_operation_not_an_overflow(model, dtype, mode):
    """fp32 (or bf16: fp32's range) compute, values of ~10, then NaN: no dtype overflowed — an operation undefined
    on its inputs made it (a softmax over a fully masked row is 0/0). Named at its module, the fix in those terms,
    never a precision change (the old answer: `activation_overflow`, "train with --precision bf16-mixed")."""
    frame = log({**NAN_OUTPUT, "model": model, "dtype": dtype}, *THEN_RUINED)
    (cause,) = causes(frame, SMALL_VALUES.rename(columns={"act_amax_student": f"act_amax_{model}"}), mode=mode).ranked
    assert (cause["cause"], cause["severity"], cause["model"], cause["module"], cause["first_step"]) == (
        "divergence", "critical", model, "attn", 1)
    assert "mask" in cause["fix"] and "log" in cause["fix"] and "--precision" not in cause["fix"]
    assert cause["evidence"]["holds"] == "NaN" and cause["evidence"]["largest_measured_before"] == 12.0
    assert "gradient_overflow@1" in cause["evidence"]["followed_by"]


@pytest.mark.parametrize("change", [
    {"mode": "mixed", "event": {"dtype": "float16"}},  # float16 compute: an overflow is the likelier cause
    {"metrics": {"act_amax_student": [1e30]}},  # magnitudes beyond fp32's √max before: an overflow can explain it
    {"metrics": {"act_amax_student": [None]}},  # nothing measured: nothing proves the values were small
    {"before": {"kind": "nonfinite_batch", "severity": "critical", "step": 1, "phase": "forward", "model": "student",
                "tensor": "inputs_embeds"}},  # bad data came first
    {"event": {"model": "teacher"}, "metrics": {"act_amax_teacher": [12.0]}},  # frozen weights nobody read: Inf ones?
])
def test_an_undefined_operation_is_not_claimed_where_an_overflow_or_bad_data_can_explain_the_nan(change):
    frame = log(*[change["before"]] if "before" in change else [], {**NAN_OUTPUT, **change.get("event", {})},
                *THEN_RUINED)
    metrics = SMALL_VALUES.assign(**change.get("metrics", {}))
    diagnosis = causes(frame, metrics, mode=change.get("mode", "fp32"))
    assert not any("guard the mask" in c["fix"] for c in diagnosis.ranked)  # the undefined operation's fix


NAN_WEIGHTS = {"kind": "nonfinite_param", "severity": "critical", "step": 3, "model": "student", "module": "mid",
               "tensor": "mid.weight", "nan_count": 64, "value": math.nan}


def test_nan_weights_after_a_step_with_finite_gradients_are_the_optimizers_own_numbers():
    """Every gradient of step 3 measured finite, the weights NaN after it: the update's arithmetic made the NaN
    (a NaN lr, eps 0 over a zero second moment, a bad state) — not the data, the model or a learning rate to lower."""
    finite_grads = pd.DataFrame({"step": [2, 3], "split": "train", "nonfinite_grad_tensors": [0, 0],
                                 "grad_amax": [0.5, 0.4], "lr": [1e-3, math.nan]})
    diagnosis = causes(log(NAN_WEIGHTS), finite_grads, mode="fp32", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # a finding (the optimizer's arithmetic), not a numerical cause to fix with precision
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "optimizer_nonfinite", "critical", "mid.weight", 3)
    assert cause["evidence"]["gradients_finite"] is True and cause["evidence"]["grad_amax"] == 0.4
    assert "eps > 0" in cause["fix"] and "lower" not in cause["fix"]


@pytest.mark.parametrize("metrics", [
    pd.DataFrame({"step": [3], "split": "train", "nonfinite_grad_tensors": [2]}),  # the gradients were not finite
    pd.DataFrame({"step": [2], "split": "train", "nonfinite_grad_tensors": [0]}),  # step 3's were not measured
])
def test_nan_weights_are_not_blamed_on_the_optimizer_unless_the_gradients_were_measured_finite(metrics):
    assert [c["cause"] for c in causes(log(NAN_WEIGHTS), metrics, mode="fp32").ranked] == ["divergence"]


@pytest.mark.parametrize("caller, teacher, named", [("loop", ["float16"], True), ("trainer", ["float16"], True),
                                                    ("loop", ["float32"], False), ("cli", ["float16"], False)])
def test_a_nan_loss_from_a_float16_teachers_finite_outputs_names_the_teacher(caller, teacher, named):
    """A user's KD term over a float16 teacher: softmax of fp16 logits underflows to 0, log(0) is -inf, 0 × -inf
    is NaN — the teacher's dtype, not the loss's arithmetic in general. sarkd-diag's own loss (cli) computes the KD
    term in fp32 whatever the teacher holds, and an fp32 teacher has no such limit: the loss computation then."""
    cfg = {"precision": {"mode": "fp32", "model_dtypes": {"student": ["float32"], "teacher": teacher}},
           "caller": caller}
    (cause,) = diagnose(log(NAN_LOSS, *AFTER_IT), MEASURED, cfg)
    if named:
        assert (cause["cause"], cause["model"], cause["first_step"]) == ("teacher_overflow", "teacher", 1)
        assert ".float()" in cause["fix"] and "log_softmax" in cause["fix"] and "7" in cause["fix"]
        assert cause["evidence"]["teacher_dtype"] == "float16"
    else:
        assert cause["cause"] == "divergence" and cause["fix"].startswith("check the loss computation")


LOADED_NAN = {"kind": "nonfinite_at_load", "severity": "critical", "step": 1, "phase": "setup", "model": "teacher",
              "module": "h.0.mlp.c_fc", "tensor": "h.0.mlp.c_fc.weight", "dtype": "float32", "value": math.nan,
              "nan_count": 1, "numel": 4096}
TEACHER_NAN = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward",
               "model": "teacher", "module": "h.0.mlp.c_fc", "value": math.nan, "dtype": "float32"}


def test_a_teacher_whose_weights_were_nan_as_loaded_is_a_corrupt_checkpoint_not_an_overflow():
    """The frozen teacher's NaN output comes from its loaded weights: no wider dtype fixes that (the old answer,
    `teacher_overflow` "hold the teacher in a wider dtype", in an fp32 run) — the checkpoint does."""
    diagnosis = causes(log(LOADED_NAN, TEACHER_NAN, {**NAN_LOSS, "tensor": "kd"}, *AFTER_IT), MEASURED, mode="fp32")
    root = diagnosis[0]
    assert (root["cause"], root["severity"], root["model"], root["tensor"], root["first_step"]) == (
        "nonfinite_input", "critical", "teacher", "h.0.mlp.c_fc.weight", 1)
    assert root["evidence"]["holds"] == "NaN" and root["evidence"]["nonfinite_before_first_step"] is True
    assert "checkpoint" in root["fix"] and "--precision" not in root["fix"]
    assert [c["cause"] for c in diagnosis.ranked] == ["nonfinite_input"]  # no teacher_overflow, the rest its symptoms


def test_a_weight_nan_as_loaded_that_reached_nothing_is_a_warning_and_critical_once_it_does():
    """NaN rows of a frozen embedding for tokens the data never holds: every loss finite over the run's steps — the
    checkpoint is corrupt (named, with the re-export), but nothing was harmed yet: a warning, not a critical failure.
    The same event followed by a NaN loss (a batch that reached them) is critical, as before; so is one with no loss
    measured at all."""
    finite = pd.DataFrame({"step": [1, 2, 3], "split": "train", "loss": [4.5, 4.4, 4.4]})
    (cause,) = causes(log(LOADED_NAN), finite, mode="fp32", caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["tensor"]) == ("nonfinite_input", "warning",
                                                                    "h.0.mlp.c_fc.weight")
    assert cause["evidence"]["reached_nothing_in_steps"] == 3
    assert "no batch reached so far" in cause["fix"] and "re-export" in cause["fix"]
    nan_at_3 = finite.assign(loss=[4.5, 4.4, math.nan])
    for frame, metrics in ((log(LOADED_NAN, {**NAN_LOSS, "step": 3}), nan_at_3), (log(LOADED_NAN), None)):
        root = causes(frame, metrics, mode="fp32", caller="loop")[0]
        assert (root["cause"], root["severity"]) == ("nonfinite_input", "critical")
        assert "reached_nothing_in_steps" not in root["evidence"]


BEYOND_FP16 = {"kind": "weight_beyond_fp16", "severity": "warning", "step": 1, "phase": "setup", "model": "student",
               "module": "h.0.mlp.c_fc", "tensor": "h.0.mlp.c_fc.weight", "dtype": "float32", "value": 1e5}
FP16_OVERFLOW = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward",
                 "model": "student", "module": "h.0.mlp.c_fc", "value": math.inf, "dtype": "float16"}


@pytest.mark.parametrize("caller, wide", [("cli", "`--precision bf16-mixed` or `--precision fp32`"),
                                          ("loop", "no float16 autocast")])
def test_a_float16_overflow_of_a_weight_beyond_fp16_as_loaded_is_placed_at_the_weight_not_fixed_by_mixed(caller,
                                                                                                         wide):
    """fp32 master weights under fp16 autocast (`mixed`, an AMP loop): a weight of 1e5 in the checkpoint is cast to
    Inf at every matmul — `mixed` is the failing setup, not the fix. The cause is placed at the loaded tensor."""
    (cause,) = causes(log(BEYOND_FP16, FP16_OVERFLOW), mode="mixed", caller=caller).ranked
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "activation_overflow", "critical", "h.0.mlp.c_fc.weight", 1)
    assert cause["evidence"]["loaded_weight_amax"] == 1e5 and "checkpoint holds values" in cause["fix"]
    assert wide in cause["fix"] and "GradScaler" not in cause["fix"] and "--precision mixed" not in cause["fix"]
    teacher = causes(log({**BEYOND_FP16, "model": "teacher"}, {**FP16_OVERFLOW, "model": "teacher"}), mode="mixed")
    assert (teacher[0]["cause"], teacher[0]["tensor"]) == ("teacher_overflow", "h.0.mlp.c_fc.weight")
    (elsewhere,) = causes(log({**BEYOND_FP16, "model": "teacher"}, FP16_OVERFLOW), mode="mixed")  # another model's
    assert (elsewhere["cause"], elsewhere["module"], elsewhere["tensor"]) == ("activation_overflow", "h.0.mlp.c_fc",
                                                                               None)


def test_nan_weights_after_step_one_that_were_nan_as_loaded_are_not_the_optimizers_doing():
    finite_grads = pd.DataFrame({"step": [1], "split": "train", "nonfinite_grad_tensors": [0], "grad_amax": [0.4]})
    loaded = {**LOADED_NAN, "model": "student", "module": "wte", "tensor": "wte.weight"}
    diagnosis = causes(log(loaded, {**NAN_WEIGHTS, "step": 1, "tensor": "wte.weight"}), finite_grads, mode="fp32")
    assert [(c["cause"], c["tensor"]) for c in diagnosis.ranked] == [("nonfinite_input", "wte.weight")]


GRAD_NAN = {"kind": "nonfinite_grad", "severity": "critical", "code": "grad_nonfinite_applied", "step": 1,
            "phase": "backward", "model": "student", "module": "h.0.mlp.c_proj", "tensor": "h.0.mlp.c_proj.bias",
            "dtype": "float32", "value": math.nan, "nan_count": 32, "numel": 32}
NAN_AFTER = {"kind": "nonfinite_param", "severity": "critical", "step": 1, "phase": "optimizer", "model": "student",
             "tensor": "wte.weight"}
SMALL_GRADS = pd.DataFrame({"step": [1], "split": "train", "grad_amax": [0.6], "act_amax_student": [3.7],
                            "act_amax_teacher": [3.9], "nonfinite_grad_tensors": [14]})


@pytest.mark.parametrize("mode, dtype", [("fp32", "float32"), ("bf16-mixed", "float32"), ("pure-bf16", "bfloat16")])
def test_a_nan_gradient_from_a_finite_loss_and_small_values_is_an_undefined_derivative(mode, dtype):
    """sqrt(mse(a, b)) with a == b: d√x/dx at 0 is inf, times the 0 of the difference: NaN gradients, a finite loss,
    nothing large anywhere — no backward product overflowed (the old answer: `gradient_overflow`, "train with a
    loss scaler"). Named where the NaN first reached a weight, the fix an eps, not a precision change."""
    (cause,) = causes(log({**GRAD_NAN, "dtype": dtype}, NAN_AFTER), SMALL_GRADS, mode=mode, caller="loop").ranked
    assert (cause["cause"], cause["severity"], cause["module"], cause["first_step"]) == (
        "divergence", "critical", "h.0.mlp.c_proj", 1)
    assert cause["evidence"]["in_backward"] is True and cause["evidence"]["largest_measured"] == 3.9
    assert "derivative" in cause["fix"] and "eps" in cause["fix"] and "autocast" not in cause["fix"]
    assert "lowering the optimizer's `lr` will not help" in cause["fix"]  # the caller's words read as a sentence


@pytest.mark.parametrize("change", [
    {"mode": "mixed"},  # float16 compute: a backward overflow is likely
    {"metrics": {"act_amax_student": [1e30]}},  # values beyond fp32's √max: a product of them overflows
    {"metrics": {"grad_amax": [math.nan]}},  # no finite gradient of the step measured
    {"before": NAN_LOSS},  # the loss was non-finite: the gradient follows from it
    {"before": {**NAN_OUTPUT, "model": "student"}},  # a forward NaN came first
])
def test_a_nan_gradient_is_an_overflow_where_large_values_fp16_or_an_earlier_nan_can_explain_it(change):
    frame = log(*[change["before"]] if "before" in change else [], GRAD_NAN, NAN_AFTER)
    diagnosis = causes(frame, SMALL_GRADS.assign(**change.get("metrics", {})), mode=change.get("mode", "fp32"))
    assert not any("derivative" in c["fix"] for c in diagnosis.ranked)
    if change.get("mode") == "mixed" or "metrics" in change:
        assert diagnosis[0]["cause"] == "gradient_overflow"


def test_a_gradient_overflow_among_large_values_in_bf16_keeps_the_bf16_wording():
    (cause,) = causes(log(GRAD_NAN, NAN_AFTER), SMALL_GRADS.assign(grad_amax=[1e25]), mode="bf16-mixed").ranked
    assert cause["cause"] == "gradient_overflow" and "no precision setting" in cause["fix"]


def test_every_group_at_lr_0_is_named_with_how_long():
    zero = {"kind": "zero_lr", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
            "tensor": "student: 28 tensors", "value": 0.0}
    metrics = pd.DataFrame({"step": [1, 2, 3, 4], "split": "train", "lr": [0.0, 0.0, 0.0, 0.0]})
    diagnosis = causes(log(zero), metrics, mode="fp32", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # the schedule's doing: a finding, no numerical cause
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "lr_zero", "warning", "student: 28 tensors", 1)
    assert cause["evidence"]["steps_at_lr_0"] == 4 and "schedule" in cause["fix"]


NEGATIVE_LR = {"kind": "negative_lr", "severity": "warning", "step": 5, "phase": "optimizer", "model": "student",
               "tensor": "student: 28 tensors", "value": -3e-4}


def test_a_negative_learning_rate_explains_a_loss_that_climbs_in_fp32_weights():
    """A loss that triples in fp32 weights is a blow-up — unless the lr went negative before it: then the optimizer
    climbed the loss as told, and the schedule is the fix, not a lower lr or clipping."""
    metrics = pd.DataFrame({"step": range(1, 9), "split": "train", "lr": [1e-3, 7e-4, 3e-4, 0, -3e-4, -7e-4, -1e-3,
                                                                           -1.3e-3],
                            "loss": [5.5, 5.4, 5.3, 5.3, 5.3, 8.0, 14.0, 20.0]})
    diagnosis = causes(log(NEGATIVE_LR), metrics, mode="fp32", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # the schedule's doing: a finding, and no divergence beside it
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "lr_negative", "warning", "student: 28 tensors", 5)
    assert cause["evidence"]["steps_at_negative_lr"] == 4 and cause["evidence"]["last_loss"] == 20.0
    assert "max(0.0" in cause["fix"] and "the optimizer's `lr`" in cause["fix"]
    assert causes(log(), metrics, mode="fp32", caller="loop")[0]["cause"] == "divergence"  # without the event


DECAY = {"kind": "optimizer_preflight", "severity": "warning", "code": "weight_decay_large", "step": 1,
         "phase": "optimizer", "model": "student", "tensor": "student: 28 tensors", "value": 0.1}


def _amax(*values):
    return pd.DataFrame({"step": range(1, len(values) + 1), "split": "train", "param_amax": values})


def test_weights_halving_within_the_window_under_large_decay_collapse_at_that_group():
    diagnosis = causes(log(DECAY), _amax(0.9, 0.81, 0.73, 0.66, 0.59, 0.53, 0.48, 0.43), mode="fp32", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # the weight decay's doing: a finding, no numerical cause
    assert (cause["cause"], cause["severity"], cause["tensor"], cause["first_step"]) == (
        "weight_collapse", "warning", "student: 28 tensors", 8)
    assert cause["evidence"]["lr_times_weight_decay"] == 0.1 and "0.9" in cause["fix"]
    assert "`weight_decay`" in cause["fix"]


@pytest.mark.parametrize("events, amax", [
    ((), (0.9, 0.89, 0.88, 0.87, 0.86, 0.85, 0.84)),  # a slow drift: no collapse
    ((DECAY,), (0.9, 0.9, 0.91)),  # predicted, not measured: nothing claimed
    (({"kind": "extreme_update", "severity": "warning", "step": 2, "model": "student", "tensor": "w",
       "value": 3.0},), (1.0, 0.2, 0.1)),  # a step as large as the weights: divergence's
    (({**NAN_WEIGHTS, "step": 3},), (1.0, 0.9, 0.1)),  # the largest finite weight after one turned NaN says nothing
])
def test_no_collapse_is_claimed_without_a_measured_halving_before_anything_extreme(events, amax):
    assert "weight_collapse" not in [c["cause"] for c in causes(log(*events), _amax(*amax), mode="fp32").findings]


def test_measured_collapse_without_a_multiplicative_decay_still_names_weight_decay():
    diagnosis = causes(log(), _amax(0.5, 0.4, 0.3, 0.2), mode="fp32", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []
    assert (cause["cause"], cause["model"], cause["first_step"]) == ("weight_collapse", "student", 4)
    assert "weight decay" in cause["fix"]


def test_fp16_activation_fix_names_an_eps_that_is_zero_in_fp16():
    (cause,) = causes(log({**NAN_OUTPUT, "dtype": "float16"}), SMALL_VALUES, mode="pure-fp16", caller="loop").ranked
    assert cause["cause"] == "activation_overflow" and "1e-12" in cause["fix"]


FP16_NAN = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "student",
            "module": "attn", "value": math.nan, "dtype": "float16"}


@pytest.mark.parametrize("act_amax, loaded_amax, constant", [(4.1, 0.3, True), (4.1, 900.0, False),
                                                             (300.0, 0.3, False)])
def test_a_float16_nan_from_small_values_names_the_constant_float16_cannot_hold(act_amax, loaded_amax, constant):
    """A mask filled with -1e9 (or float32's min) is -inf in float16 and a fully masked row's softmax 0/0: NaN from
    scores of order 1. The fix names the fill value and what to write instead — not only "overflows float16". Large
    outputs or weights (as loaded) measured before it leave it an overflow."""
    metrics = pd.DataFrame({"step": [1], "split": "train", "act_amax_student": [act_amax],
                            "loaded_amax_student": [loaded_amax]})
    cause = causes(log(FP16_NAN), metrics, mode="pure-fp16", caller="loop")[0]
    assert (cause["cause"], cause["severity"], cause["module"]) == ("activation_overflow", "critical", "attn")
    assert ("torch.finfo(scores.dtype).min" in cause["fix"] and "-1e9" in cause["fix"]) is constant
    assert ("largest_measured" in cause["evidence"]) is constant


def test_the_loss_computation_fix_names_an_exp_that_overflows_at_its_dtypes_limit():
    """A softmax written as exp()/sum() overflows where e^x leaves the dtype (x ≈ 88.7 in fp32), sooner at a small
    temperature: one of the few ways a loss turns NaN from finite, modest outputs."""
    (cause,) = causes(log(NAN_LOSS, *AFTER_IT), MEASURED, mode="fp32", caller="loop").ranked
    assert "exp()/sum()" in cause["fix"] and "88.7 in float32" in cause["fix"] and "temperature" in cause["fix"]


def test_a_float32_loss_of_a_float16_run_turned_nonfinite_by_the_loss_names_its_float16_inputs():
    """A KD term at T = 1e-3 under float16 autocast: the logits reach the loss as float16 and logits / T is Inf there
    (7 / 1e-3 > 65504), though the loss ends in float32. The fix named a temperature of 0 and float32's exp limit;
    it names the float16 inputs, the temperature below which they overflow, and `.float()` before dividing."""
    (cause,) = causes(log(NAN_LOSS, *AFTER_IT), MEASURED, mode="mixed", caller="loop").ranked
    assert (cause["cause"], cause["tensor"], cause["first_step"]) == ("divergence", "loss", 1)
    assert "float16" in cause["fix"] and "below 0.00011" in cause["fix"] and "`.float()` first" in cause["fix"]


@pytest.mark.parametrize("module, router", [("model.layers.0.mlp.gate", True), ("model.layers.0.mlp.up", False)])
def test_teacher_weights_that_float16_made_inf_at_load_are_the_teachers_dtype_not_a_corrupt_checkpoint(module, router):
    """+Inf and no NaN, in a teacher this run holds in float16 (its router kept fp32 masters afterwards): a weight
    beyond 65504 cast to float16 at load. The checkpoint may be sound: the remedy is the dtype, as for an overflow."""
    loaded = {**LOADED_NAN, "module": module, "tensor": module + ".weight", "nan_count": 0, "posinf_count": 3}
    cfg = {"precision": {"mode": "mixed", "param_dtypes": {"teacher": {"frozen": {"float16": 10},
                                                                       "trainable": {"float32": 2}}}}}
    root = diagnose(log(loaded, TEACHER_NAN), None, cfg)[0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == ("teacher_overflow", "teacher",
                                                                                  module, 1)
    assert root["evidence"]["weights_beyond_float16"] is True and "corrupt" not in root["fix"]
    assert ("router" in root["fix"]) is router and "--precision bf16-mixed" in root["fix"]


def test_student_weights_inf_in_float16_at_load_name_the_dtype_and_fp32_range_not_fp16_autocast():
    """A checkpoint value beyond 65504 that the cast to float16 made Inf: fp32 weights under fp16 autocast (the old
    advice, `mixed`) are cast again at each matmul and overflow the same way; fp32's range or a rescale fixes it."""
    loaded = {**LOADED_NAN, "model": "student", "dtype": "float16", "nan_count": 0, "posinf_count": 1}
    (cause,) = causes(log(loaded), mode="pure-fp16", caller="loop").ranked
    assert cause["cause"] == "nonfinite_input" and cause["evidence"]["cast_to_float16"] is True
    assert "beyond float16's 65504" in cause["fix"] and "rescale" in cause["fix"] and "corrupt" not in cause["fix"]
    assert "GradScaler" not in cause["fix"]


def _losses(values) -> pd.DataFrame:
    return pd.DataFrame({"step": range(1, len(values) + 1), "split": "train", "loss": list(values)})


@pytest.mark.parametrize("caller", ["loop", "cli"])
def test_a_loss_that_climbs_steadily_below_the_blow_up_is_an_unplaced_warning(caller):
    """Finite, less than 3× its first value, yet rising step after step well beyond its noise: a warning that
    says so (unplaced: nothing measured locates it), from the window where the climb was judged."""
    climbing = [2.0 + 0.05 * i + 0.01 * (-1) ** i for i in range(12)]
    (cause,) = causes(log(), _losses(climbing), mode="fp32", caller=caller).ranked
    assert (cause["cause"], cause["severity"], cause["module"], cause["first_step"]) == (
        "divergence", "warning", None, 1)
    assert cause["evidence"]["unplaced"] is True and cause["evidence"]["slope_standard_errors"] > 5
    assert "climbs steadily from step 1 to 12" in cause["fix"]
    fell_then_climbed = [3.0 - 0.2 * i for i in range(8)] + [1.6 + 0.1 * i + 0.02 * (-1) ** i for i in range(8)]
    (cause,) = causes(log(), _losses(fell_then_climbed), mode="fp32", caller=caller).ranked
    assert cause["first_step"] == 9 and cause["evidence"]["window"] == "9-16"


@pytest.mark.parametrize("caller", ["loop", "cli", "trainer"])
def test_a_loss_that_started_positive_and_falls_steadily_far_below_zero_is_unbounded_below(caller):
    """A KD term with its sign flipped: the loss starts at a CE's 3.5 and falls without bound, every value finite —
    no CE, KL or squared error goes below 0, so the loss is being maximised somewhere: a warning naming the sign,
    not the lr or the precision. A loss that falls to a floor above 0, an RL surrogate wandering around 0 from 0, and
    one that dips below 0 by less than it began above are not."""
    import numpy as np

    noise = np.random.default_rng(0).normal(0, 0.2, 16)
    unbounded = [3.5 - 1.5 * i + n for i, n in enumerate(noise)]
    (cause,) = causes(log(), _losses(unbounded), mode="mixed", caller=caller).ranked
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("divergence", "warning", 1)
    assert cause["evidence"]["unbounded_below"] is True and cause["evidence"]["slope_standard_errors"] < -5
    assert "below 0" in cause["fix"] and "sign" in cause["fix"] and f"from {unbounded[0]:.4g} (step 1)" in cause["fix"]
    falling_to_a_floor = [3.5 * math.exp(-i / 4) + 0.5 + n / 10 for i, n in enumerate(noise)]
    wandering = [0.0, *(0.05 * n for n in noise[1:])]
    shallow = [1.0 - 0.1 * i + n / 100 for i, n in enumerate(noise)]  # ends at -0.5: less below 0 than it began
    for values in (falling_to_a_floor, wandering, shallow):
        assert causes(log(), _losses(values), mode="mixed", caller=caller).ranked == []


@pytest.mark.parametrize("caller", ["loop", "trainer"])
def test_a_wholly_negated_loss_that_falls_from_below_zero_to_three_times_its_start_is_unbounded_below(caller):
    """`-(ce + kd)`: the loss starts at minus a CE's 4.8 and falls, every value finite, to nine times that — the
    mirror of a blow-up. Named as a loss unbounded below from step 1, as a sign flipped midway is. A negative loss
    that falls by less than twice its start (a log-density settling) and one wandering below 0 are not."""
    import numpy as np

    noise = np.random.default_rng(1).normal(0, 0.2, 12)
    negated = [-4.8 - 0.3 * i * i + n for i, n in enumerate(noise)]
    (cause,) = causes(log(), _losses(negated), mode="fp32", caller=caller).ranked
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("divergence", "warning", 1)
    assert cause["evidence"]["unbounded_below"] is True and cause["evidence"]["last_loss"] == negated[-1]
    assert f"from {negated[0]:.4g} (step 1)" in cause["fix"] and "sign" in cause["fix"]
    settling = [-1.0 - 1.5 * (1 - math.exp(-i / 3)) + n / 20 for i, n in enumerate(noise)]  # -1 to about -2.4
    wandering = [-0.5 + 0.1 * n for n in noise]
    for values in (settling, wandering):
        assert causes(log(), _losses(values), mode="fp32", caller=caller).ranked == []


@pytest.mark.parametrize("seed", range(40))
def test_noisy_healthy_losses_read_no_climb(seed):
    """Small-batch noise (10% of the loss, step to step) around a loss that falls, or has levelled off, or a run too
    short to judge: no trend is claimed. A slope stands out of that noise only when it is steady."""
    import numpy as np

    noise = np.random.default_rng(seed).normal(0, 0.1, 40)
    falling = [3.0 * math.exp(-i / 10) + 1.0 + n for i, n in enumerate(noise)]
    flat = [1.0 + n for n in noise]
    for values in (falling, flat, falling[:7]):
        assert causes(log(), _losses(values), mode="fp32", caller="loop").ranked == []


def test_a_climb_that_is_small_against_the_loss_or_follows_a_negative_lr_is_not_this_warning():
    """A rise of 5% over the run stands out of tiny noise but is a plateau's drift, not a climb; a loss that reaches
    0 (an RL surrogate) is no objective falling toward a floor; a climb after the lr went negative is the ascent the
    lr asked for (`lr_negative`)."""
    drift = [5.0 + 0.02 * i for i in range(12)]
    assert causes(log(), _losses(drift), mode="fp32", caller="loop").ranked == []
    policy = [0.0] + [0.002 * i + 0.001 * (-1) ** i for i in range(1, 12)]  # an RL surrogate (GRPO's): 0 at step 1
    assert causes(log(), _losses(policy), mode="fp32", caller="trainer").ranked == []
    climbing = _losses([2.0 + 0.1 * i for i in range(12)]).assign(lr=[1e-3] * 4 + [-1e-4] * 8)
    negative = {**NEGATIVE_LR, "step": 5}
    assert [c["cause"] for c in causes(log(negative), climbing.iloc[:, :4], mode="fp32", caller="loop").ranked] == [
        "lr_negative"]


EDITED_NAN = {"kind": "nonfinite_between_steps", "severity": "critical", "step": 4, "phase": "forward",
              "model": "student", "module": "h.0.mlp", "tensor": "h.0.mlp.weight", "value": math.nan,
              "dtype": "float32", "nan_count": None, "posinf_count": None, "neginf_count": None}
UPDATED = pd.DataFrame({"step": [1, 2, 3, 4], "split": "train", "param_amax": [2.0, 2.0, 2.0, math.nan],
                        "act_amax_student": [9.0, None, None, 9.0]})


def test_a_weight_written_nonfinite_between_steps_is_the_root_at_the_edit_and_what_follows_its_symptoms():
    """The NaN a loop's own code wrote after step 3's update is the first non-finite value: the NaN activation,
    loss, gradients and weights of step 4 follow from it — not an undefined operation (values were small), not
    the loss computation, not an overflow (a module that multiplies by a NaN weight makes NaN in any range). The edit is
    a finding (the loop's), the root; the blow-up it began stays among the causes as `divergence` at the written
    weight and the step that read it, explained by the edit and with its fix."""
    frame = log(EDITED_NAN, {**NAN_OUTPUT, "step": 4, "module": "h.0.mlp"}, *({**e, "step": 4} for e in THEN_RUINED))
    diagnosis = causes(frame, UPDATED, mode="fp32", caller="loop")
    (root,) = diagnosis.findings
    (symptom,) = diagnosis
    assert diagnosis.ranked == [root, symptom]
    assert (root["cause"], root["severity"], root["tensor"], root["first_step"]) == (
        "weights_edited", "critical", "h.0.mlp.weight", 4)
    assert root["evidence"]["finite_after_optimizer_step"] == 3 and root["evidence"]["holds"] == "NaN"
    assert "after optimizer step 3" in root["fix"]
    assert (symptom["cause"], symptom["severity"], symptom["tensor"], symptom["first_step"]) == (
        "divergence", "critical", "h.0.mlp.weight", 4)
    assert symptom["evidence"]["weight_written_between_steps"] and "activation_overflow" not in str(diagnosis.ranked)
    assert symptom["evidence"]["explained_by"].startswith("weights_edited@4") and symptom["fix"] == root["fix"]


@pytest.mark.parametrize("severity, then, found", [("warning", (), [("weights_edited", "warning")]),
                                                   ("warning", ({**NAN_LOSS, "step": 4},),
                                                    [("weights_edited", "critical"), ("divergence", "critical")]),
                                                   ("info", (), [])])
def test_a_finite_edit_is_a_warning_when_it_rescales_critical_when_a_blow_up_follows_and_else_nothing(severity, then,
                                                                                                     found):
    """The edit is a finding (the loop's); the blow-up that follows it is the run's failure, among the causes,
    explained by the edit and fixed by its fix."""
    edit = {"kind": "weights_edited", "severity": severity, "step": 4, "phase": "forward", "model": "student",
            "module": "h.0.mlp", "tensor": "h.0.mlp.weight", "value": 1e6 if severity == "warning" else 1.001}
    diagnosis = causes(log(edit, *then), UPDATED.assign(param_amax=2.0), mode="fp32", caller="loop")
    assert [(c["cause"], c["severity"]) for c in diagnosis.ranked] == found
    assert [c["cause"] for c in diagnosis.findings] == (["weights_edited"] if found else [])
    if then:
        (symptom,) = diagnosis
        assert symptom["evidence"]["explained_by"].startswith("weights_edited@4")
        assert symptom["fix"] == diagnosis.findings[0]["fix"]


def test_a_finite_loss_blow_up_from_a_rescaling_edit_on_is_the_edits_not_an_unplaced_divergence():
    """An embedding multiplied by 1e5 between steps 3 and 4: the loss jumps from 4 to 6e4 at step 4, every value
    finite. That blow-up read as an unplaced divergence ("lower the lr and clip"), the edit a warning beside it; the
    edit at the step the loss blew up is the root now, critical, and the divergence its symptom: the run's failure,
    among the causes, explained by the edit and with the edit's fix, not the lr's."""
    edit = {"kind": "weights_edited", "severity": "warning", "step": 4, "phase": "forward", "model": "student",
            "module": "wte", "tensor": "wte.weight", "value": 1e5}
    losses = UPDATED.assign(param_amax=2.0, loss=[4.2, 4.1, 4.0, 5.8e4])
    diagnosis = causes(log(edit), losses, mode="fp32", caller="loop")
    root, *rest = diagnosis.ranked
    assert (root["cause"], root["severity"], root["first_step"]) == ("weights_edited", "critical", 4)
    assert diagnosis.findings == [root] and rest == list(diagnosis)
    assert [(c["cause"], c["severity"], c["first_step"]) for c in rest] == [("divergence", "critical", 4)]
    assert root["evidence"]["then"] == "loss_blow_up@4" and "followed_by" not in root["evidence"]
    assert rest[0]["evidence"]["explained_by"].startswith("weights_edited@4") and rest[0]["fix"] == root["fix"]
    before = causes(log({**edit, "step": 5}), losses.assign(step=[1, 2, 3, 4]), mode="fp32", caller="loop")
    assert [(c["cause"], c["severity"]) for c in before.ranked] == [("divergence", "critical"),
                                                                    ("weights_edited", "warning")]
    assert "explained_by" not in before[0]["evidence"]  # an edit after the blow-up explains nothing


@pytest.mark.parametrize(("rows", "severity"), [(0, "critical"), (2, "warning")])
def test_a_loss_scaler_over_fp16_weights_is_the_crash_it_predicts_and_a_warning_where_steps_completed(rows, severity):
    """GradScaler refuses float16 gradients at the first unscale: a run that completed no step after the note died of
    it (critical: nothing else in its logs explains the crash); one that completed steps had a scaler that took them."""
    note = {"kind": "setup_note", "severity": "warning", "code": "scaler_fp16_weights", "step": 1, "phase": "setup",
            "probe": "precision", "model": "student", "tensor": "h.0.weight", "numel": 4, "dtype": "float16"}
    metrics = pd.DataFrame({"split": ["train"] * rows, "step": list(range(1, rows + 1)), "loss": [1.0] * rows})
    diagnosis = causes(log(note), metrics, mode="pure-fp16", caller="trainer")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # the setup's doing: a finding, no numerical cause
    assert (cause["cause"], cause["severity"], cause["tensor"]) == ("scaler_fp16_weights", severity, "h.0.weight")
    assert "h.0.weight and 3 more" in cause["fix"]
    assert "`TrainingArguments(fp16=True)` with the model loaded in fp32" in cause["fix"]


def test_updates_shrunk_by_clipping_scaled_gradients_are_that_loop_order_not_a_step_size_problem():
    """Lost updates in fp32 weights read as a step too small (the lr, the clip threshold) — unless the loop clipped
    the gradients before unscaling them: then the scale shrank every update, and the fix is the order."""
    note = {"kind": "setup_note", "severity": "warning", "code": "clip_before_unscale", "step": 1,
            "phase": "backward", "probe": "gradients", "value": 65536.0}
    lost = {"kind": "lost_updates", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
            "module": "h.0", "tensor": "h.0.weight", "value": 0.4, "dtype": "float32"}
    assert [c["cause"] for c in causes(log(lost), mode="mixed", caller="loop")] == ["update_underflow"]
    diagnosis = causes(log(note, lost), mode="mixed", caller="loop")
    (cause,) = diagnosis.findings
    assert diagnosis == []  # the loop order's doing: no update_underflow beside it
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("clip_before_unscale", "warning", 1)
    assert "`scaler.unscale_(optimizer)` right before" in cause["fix"] and cause["evidence"]["loss_scale"] == 65536.0


def test_a_nonfinite_loss_from_finite_outputs_beyond_fp16_names_the_cast_and_the_model_that_made_them():
    """The teacher's fp32 hidden states reach 1e5 (finite, beyond float16's 65504) and the loss turns Inf: a cast to
    float16 on the way to the loss (`.half()` to save memory) is the likeliest maker — placed at the teacher's first
    module beyond fp16's range, the fix says to keep them in float32. Below 65504 the loss computation reads as
    before."""
    risk = {"kind": "fp16_overflow_risk", "severity": "warning", "step": 1, "phase": "forward", "model": "teacher",
            "module": "h.0.mlp", "value": 1e5, "dtype": "float32"}
    (root, *_) = causes(log(risk, NAN_LOSS, *AFTER_IT), MEASURED.assign(act_amax_teacher=1e5), mode="fp32",
                        caller="loop")
    assert (root["cause"], root["severity"], root["model"], root["module"], root["first_step"]) == (
        "divergence", "critical", "teacher", "h.0.mlp", 1)
    assert ".half()" in root["fix"] and "1e+05" in root["fix"] and root["evidence"]["beyond_float16"] is True
    (plain, *_) = causes(log(NAN_LOSS, *AFTER_IT), MEASURED, mode="fp32", caller="loop")
    assert plain["fix"].startswith("check the loss computation") and plain["model"] == "student"


@pytest.mark.parametrize("nonfinite_after, severity", [(False, "warning"), (True, "critical")])
def test_an_optimizer_stepped_twice_is_a_warning_until_the_weights_turn_nonfinite_then_the_root(nonfinite_after,
                                                                                               severity):
    """Applying each gradient twice is a warning; under a scaler the extra step applies the gradients it skipped,
    and the NaN weights that follow are its doing — not a divergence to fix with the lr: the divergence is the run's
    failure, among the causes, explained by the double step and with its fix."""
    note = {"kind": "setup_note", "severity": "warning", "code": "optimizer_stepped_twice", "step": 1,
            "phase": "optimizer", "probe": "scaler"}
    after = ({"kind": "nonfinite_param", "severity": "critical", "step": 1, "phase": "optimizer", "model": "student",
              "tensor": "w"},) \
        if nonfinite_after else ()
    diagnosis = causes(log(note, *after), mode="mixed", caller="loop",
                       precision={"mode": "mixed", "loss_scaling": True})
    (cause,) = diagnosis.findings
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("optimizer_stepped_twice", severity, 1)
    assert "`scaler.step(optimizer)` alone" in cause["fix"]
    assert diagnosis.ranked[0] == cause and "followed_by" not in cause["evidence"]
    assert [(c["cause"], c["first_step"]) for c in diagnosis] == ([("divergence", 1)] if nonfinite_after else [])
    if nonfinite_after:
        assert diagnosis[0]["evidence"]["explained_by"].startswith("optimizer_stepped_twice@1")
        assert diagnosis[0]["fix"] == cause["fix"]


@pytest.mark.parametrize("caller, options, note, says", [
    ("cli", {"max_grad_norm": 1.0}, None, "clips at 1 already"),
    ("cli", {"max_grad_norm": 0.0}, None, None),
    ("loop", {}, 0.5, "clips at 0.5 already"),
    ("loop", {}, None, None)])
def test_a_fix_that_says_to_clip_knows_the_run_clips_already(caller, options, note, says):
    """'Lower the lr and clip' to a run that clips at 1 (train's default, or the loop's clip_grad_norm_) names
    the threshold it already has and what a lower one cannot do; a run that does not clip is told to, as before."""
    rows = [{"kind": "extreme_update", "severity": "warning", "step": 1, "phase": "optimizer", "model": "student",
             "module": "h.0.mlp.c_proj", "tensor": "h.0.mlp.c_proj.weight", "value": 50.0},
            {"kind": "nonfinite_param", "severity": "critical", "step": 2, "phase": "optimizer", "model": "student",
             "tensor": "h.0.mlp.c_proj.weight"}]
    metrics = pd.DataFrame({"step": [1, 2], "split": "train", "lr": 1.0, "loss": [4.0, math.nan]})
    if note is not None:
        metrics["clip_max_norm"] = note
    (cause,) = causes(log(*rows), metrics, caller=caller, mode="fp32", options=options).ranked
    assert cause["cause"] == "divergence" and "clip with" in cause["fix"]
    assert (says in cause["fix"]) if says else ("already" not in cause["fix"])


@pytest.mark.parametrize("module", ["transformer.h.1.mlp.c_proj", "model.layers.0.mlp.gate"])
def test_a_forward_overflow_offers_a_code_change_only_where_the_caller_writes_the_code(module):
    """`train` runs checkpoints as they are: its fix for a float16 forward overflow is a precision flag, never
    'keep this op in fp32 under autocast'. A caller's own loop gets both."""
    act = {"kind": "nonfinite_activation", "severity": "critical", "step": 1, "phase": "forward", "model": "student",
           "module": module, "dtype": "float16", "value": math.inf}
    (cli,) = causes(log(act), caller="cli").ranked
    (loop,) = causes(log(act), caller="loop").ranked
    assert "--precision bf16-mixed" in cli["fix"] and "autocast" not in cli["fix"]
    assert "in fp32" in loop["fix"] and "autocast" in loop["fix"]


@pytest.mark.parametrize("losses, severity", [([0.4, 1.7], "warning"), ([4.0, 13.0], "warning"),
                                              ([0.4, 1.7, 1.2], None), ([4.0, 13.0, 45.0], "critical")])
def test_a_two_step_runs_rise_cannot_be_judged_a_blow_up(losses, severity):
    """A two-step smoke run at batch 1 whose second batch is four times harder than its first: one step-to-step change
    holds no scatter to judge it by, so a rise beyond 3× is said (a warning: run more steps to tell), never a critical
    divergence — iid batch-1 losses made that one run in ten. From three losses the scatter is measured again: a lone
    jump reads as scatter, a steady climb is critical."""
    metrics = pd.DataFrame({"step": range(1, len(losses) + 1), "split": "train", "loss": losses, "lr": 1e-3})
    found = [(c["cause"], c["severity"]) for c in causes(log(), metrics, mode="fp32", caller="loop").ranked]
    assert found == ([("divergence", severity)] if severity else [])
    if severity == "warning":
        (cause,) = causes(log(), metrics, mode="fp32", caller="loop").ranked
        assert cause["evidence"]["scatter_measured"] is False and "run more steps" in cause["fix"]
