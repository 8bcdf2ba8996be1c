"""Every verdict kind from crafted comparison rows, and the thresholds at their edges."""

import json
import math

import pytest

from sarkd_diag.analysis.verdicts import (
    DRIFT_VS_FP32,
    DRIFTING_LOST_UPDATES,
    KINDS,
    LOAD_TIE,
    SPEED_TIE,
    STAGNANT_LOST_UPDATES,
    THRESHOLDS,
    Verdict,
    recommend,
    verdict,
)
from sarkd_diag.compare import ModeRun, comparison_row


def row(**figures):
    base = {"steps_completed": 30, "first_nonfinite_step": None, "skipped_steps": 0, "lost_update_fraction": 0.0,
            "drift_vs_fp32": 0.0, "final_eval_ppl": 50.0}
    return {**base, **figures}


def text(*args) -> str:
    """The verdict as comparison.csv, .md and .html and the terminal table write it."""
    return str(verdict(*args))


def test_stable_when_nothing_is_wrong():
    assert text(row(), []) == "stable"
    assert text(row(drift_vs_fp32=math.nan), []) == "stable"  # no fp32 reference: drift is n/a


def test_failed_wins_over_everything():
    assert text(row(first_nonfinite_step=1), ["optimizer_eps_underflow"], "exit 3: boom") == "failed (exit 3: boom)"


def test_corrupted_names_the_first_step_and_the_top_cause():
    assert text(row(first_nonfinite_step=4, lost_update_fraction=0.9), ["optimizer_eps_underflow",
                                                                          "update_underflow"]) \
        == "corrupted@4 (optimizer_eps_underflow)"


def test_a_modes_top_cause_is_its_diagnosiss_first_and_a_finding_only_where_there_is_no_cause(tmp_path):
    """A run whose gradients were never cleared diverged: its summary lists the `divergence` (explained by the
    finding, with its fix) among the causes and `gradients_not_cleared` among the findings. The table's top cause
    and the verdict name the contract's code, the fix is the finding's; a run with only a finding names that."""
    finding = {"cause": "gradients_not_cleared", "severity": "critical", "first_step": 2, "fix": "call zero_grad()"}
    failure = {"cause": "divergence", "severity": "critical", "first_step": 3, "fix": "call zero_grad()",
               "evidence": {"explained_by": "gradients_not_cleared@2 (student)"}}
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"status": "completed", "steps_completed": 4, "final": {},
                                   "diagnosis": [failure], "findings": [finding]}))
    figures, causes, failure_text, fix = comparison_row(ModeRun("fp32", tmp_path, 0, 1.0))
    assert (figures["top_cause"], causes, failure_text, fix) == (
        "divergence", ["divergence", "gradients_not_cleared"], None, "call zero_grad()")
    assert text(row(first_nonfinite_step=3), causes) == "corrupted@3 (divergence)"
    summary.write_text(json.dumps({"status": "completed", "steps_completed": 4, "final": {}, "diagnosis": [],
                                   "findings": [{**finding, "cause": "lr_zero", "severity": "warning"}]}))
    assert comparison_row(ModeRun("fp32", tmp_path, 0, 1.0))[0]["top_cause"] == "lr_zero"


def test_stagnant_is_judged_from_lost_updates():
    assert text(row(lost_update_fraction=STAGNANT_LOST_UPDATES + 0.01), []) == "stagnant (update_underflow)"
    assert text(row(lost_update_fraction=STAGNANT_LOST_UPDATES), []) == "drifting (update_underflow)"


def test_slow_loss_progress_alone_is_not_stagnation():
    """A run whose perplexity barely moved but whose updates all landed (fp32 at a tiny lr) is stable."""
    assert text(row(final_eval_ppl=520.0, lost_update_fraction=0.0), []) == "stable"


def test_stagnant_when_the_loss_scaler_skips_most_steps():
    assert text(row(skipped_steps=20), ["loss_scale_collapse"]) == "stagnant (loss_scale_collapse)"


def test_the_loss_scalers_warm_up_is_not_stagnation_unless_it_never_ends():
    """A short comparison's scaler spends most of its steps finding its scale (4 of 5 skipped): those skips are not
    steps lost after it settled, as the scaler probe's own skip fraction judges; one that never settled applied
    no update at all."""
    assert text(row(steps_completed=5, skipped_steps=4, scaler_warmup_skips=4), []) == "stable"
    assert text(row(steps_completed=30, skipped_steps=17, scaler_warmup_skips=4), []) == "stable"  # 13 of 26
    assert text(row(steps_completed=30, skipped_steps=18, scaler_warmup_skips=4), []) == "stagnant (skipped steps)"
    assert text(row(steps_completed=5, skipped_steps=5, scaler_warmup_skips=5), ["no_gradients"]) \
        == "stagnant (no_gradients)"


def test_drifting_from_moderate_lost_updates_or_perplexity_drift():
    assert text(row(lost_update_fraction=DRIFTING_LOST_UPDATES + 0.01), []) == "drifting (update_underflow)"
    assert text(row(lost_update_fraction=DRIFTING_LOST_UPDATES), []) == "stable"
    assert text(row(drift_vs_fp32=DRIFT_VS_FP32 * 2), []) == f"drifting (eval ppl {DRIFT_VS_FP32 * 2:+.1%} vs fp32)"
    assert text(row(drift_vs_fp32=-DRIFT_VS_FP32 * 2), ["activation_overflow"]) == "drifting (activation_overflow)"
    assert text(row(drift_vs_fp32=DRIFT_VS_FP32 / 2), []) == "stable"


def test_non_finite_perplexity_with_finite_weights_drifts_even_without_fp32():
    assert text(row(final_eval_ppl=math.inf, drift_vs_fp32=math.nan), []) == "drifting (non-finite eval ppl)"


def test_a_verdict_is_a_value_whose_fields_say_what_its_text_says():
    corrupted = verdict(row(first_nonfinite_step=4), ["optimizer_eps_underflow"])
    assert corrupted == Verdict("corrupted", 4, "optimizer_eps_underflow")
    assert (corrupted.kind, corrupted.step, corrupted.cause) == ("corrupted", 4, "optimizer_eps_underflow")
    assert verdict(row(), []) == Verdict("stable") and verdict(row(), []).step is None
    assert verdict(row(), [], "killed by SIGKILL") == Verdict("failed", cause="killed by SIGKILL")
    assert str(Verdict("stagnant", cause="update_underflow")) == "stagnant (update_underflow)"
    judged = [verdict(row(**figures), causes, failure) for figures, causes, failure in [
        ({}, [], None), ({"lost_update_fraction": 0.2}, [], None), ({"lost_update_fraction": 0.9}, [], None),
        ({"first_nonfinite_step": 1}, [], None), ({}, [], "exit 3")]]
    assert [v.kind for v in judged] == list(KINDS)
    with pytest.raises(AttributeError):
        judged[0].kind = "drifting"  # frozen: a verdict is read, not edited


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_thresholds_are_fractions(name):
    assert 0 < THRESHOLDS[name] < 1


# ------------------------------------------------------------------------------------ the recommendation
def mode(name: str, tokens_per_s: float = 1000.0, peak_memory_mb: float = 500.0) -> dict:
    return {"mode": name, "tokens_per_s": tokens_per_s, "peak_memory_mb": peak_memory_mb}


STABLE = Verdict("stable")


def test_no_mode_is_recommended_when_fp32_itself_fails_and_its_fix_is_given():
    """Every mode diverges at a huge lr: lower precision only rounds more, so the run's own fix is the answer."""
    divergence = Verdict("drifting", cause="divergence")
    advice = recommend([mode("fp32"), mode("bf16-mixed")], [divergence, divergence], "lower `--student-lr`")
    assert advice.mode is None
    assert advice.text.startswith("fp32 itself is `drifting (divergence)`, as is every mode")
    assert advice.text.endswith("fix the run first: lower `--student-lr`")
    alone = recommend([mode("fp32"), mode("bf16-mixed")], [Verdict("corrupted", 3, "loss_nonfinite"), STABLE])
    assert alone.mode is None and "as is every mode" not in alone.text and "runs/fp32/report.md" in alone.text


def test_the_fastest_stable_mode_is_recommended_with_its_cost_against_fp32():
    rows = [mode("fp32", 600, 583), mode("mixed", 282, 541), mode("bf16-mixed", 1829, 847), mode("pure-fp16", 926)]
    verdicts = [STABLE, STABLE, STABLE, Verdict("corrupted", 1, "optimizer_eps_underflow")]
    advice = recommend(rows, verdicts)
    assert advice.mode == "bf16-mixed"
    assert advice.text.startswith("train in `bf16-mixed` (`--precision bf16-mixed`): stable, at 3× the tokens/s "
                                  "and 1.5× the peak memory of `fp32`.")
    assert "Also stable: `fp32` (0.33× its tokens/s, 0.69× its peak memory), `mixed` (0.15× its tokens/s, 0.64× its " \
           "peak memory)." in advice.text
    assert "`pure-fp16` is `corrupted@1 (optimizer_eps_underflow)`" in advice.text
    assert "drift" not in advice.text  # fp32 ran: drift was measured


def test_within_the_speed_tie_the_least_memory_wins():
    near = 1000 * (1 - SPEED_TIE / 2)
    assert recommend([mode("fp32", 1000, 900), mode("bf16-mixed", near, 600)], [STABLE, STABLE]).mode == "bf16-mixed"
    far = 1000 * (1 - SPEED_TIE * 2)
    fastest = recommend([mode("fp32", 1000, 900), mode("bf16-mixed", far, 600)], [STABLE, STABLE])
    assert fastest.mode == "fp32" and "the fastest stable mode here" in fastest.text
    unmeasured = recommend([mode("fp32", math.nan, math.nan), mode("mixed", math.nan, math.nan)], [STABLE, STABLE])
    assert unmeasured.mode == "fp32" and unmeasured.text.startswith(
        "train in `fp32` (`--precision fp32`): stable (speed not measured). Also stable: `mixed`.")
    partly = recommend([mode("mixed", math.nan, 400), mode("fp32", 1000, 800)], [STABLE, STABLE])
    assert partly.mode == "fp32"  # the only speed measured is the fastest
    assert "Also stable: `mixed` (0.5× its peak memory)." in partly.text


def test_speeds_measured_under_different_loads_are_not_ranked_and_the_least_memory_decides():
    """fp32 measured at 671 tokens/s inside a comparison beside a test suite, 11,251 alone minutes later: the modes
    run one after another, and a load that comes and goes between them decided which was "fastest"."""
    rows = [mode("fp32", 11_251, 900), mode("bf16-mixed", 671, 600), mode("pure-fp16", 300, 400)]
    for row, load in zip(rows, (0.0, LOAD_TIE + 0.25, 0.1), strict=True):
        row["other_load"] = load
    advice = recommend(rows, [STABLE, STABLE, Verdict("corrupted", 1, "optimizer_eps_underflow")])
    assert advice.mode == "bf16-mixed" and "× the tokens/s" not in advice.text and "its tokens/s" not in advice.text
    assert advice.text.startswith("train in `bf16-mixed` (`--precision bf16-mixed`): stable, at 0.67× the peak "
                                  "memory of `fp32`. Also stable: `fp32` (1.5× its peak memory).")
    assert "Their speeds are not compared: other processes took 0% to 50% of this machine's CPU time" in advice.text
    unmeasured = [{**row, "peak_memory_mb": math.nan} for row in rows]  # memory decides, and none was measured
    said = recommend(unmeasured, [STABLE, STABLE, Verdict("corrupted", 1, "optimizer_eps_underflow")]).text
    assert said.startswith("train in `fp32` (`--precision fp32`): stable (peak memory not measured).")
    said = recommend(unmeasured[::-1], [Verdict("corrupted", 1, "optimizer_eps_underflow"), STABLE, STABLE]).text
    assert said.startswith("train in `bf16-mixed` (`--precision bf16-mixed`): stable, at a peak memory not measured.")
    rows[1]["other_load"] = LOAD_TIE - 0.05  # within the tie (the corrupted mode's load never counts): ranked
    ranked = recommend(rows, [STABLE, STABLE, Verdict("corrupted", 1, "optimizer_eps_underflow")])
    assert ranked.mode == "fp32" and "not compared" not in ranked.text and "its tokens/s" in ranked.text


def test_without_a_stable_fp32_the_recommendation_says_what_was_not_measured():
    lost = Verdict("stagnant", cause="update_underflow")
    advice = recommend([mode("mixed"), mode("pure-bf16")], [Verdict("failed", cause="exit 3"), lost])
    assert advice.mode is None and "run fp32 too (add it to --modes)" in advice.text
    oom = recommend([mode("fp32"), mode("bf16-mixed")], [Verdict("failed", cause="killed by SIGKILL"), STABLE])
    assert oom.mode == "bf16-mixed"  # fp32 ran out of memory: that is no numerical failure of the run
    assert oom.text.endswith("fp32 failed (killed by SIGKILL): drift from full precision was not measured.")
    alone = recommend([mode("bf16-mixed")], [STABLE])
    assert alone.text == ("train in `bf16-mixed` (`--precision bf16-mixed`): stable. fp32 was not among the modes: "
                          "drift from full precision was not measured.")
    neither = recommend([mode("fp32"), mode("bf16-mixed")], [Verdict("failed", cause="exit 3"), lost])
    assert neither.mode is None and "fp32 failed as well (exit 3)" in neither.text


def test_a_stable_mode_whose_own_diagnosis_warns_is_not_recommended_over_one_whose_does_not():
    """pure-bf16 ran `stable` — its lost updates below the verdicts' thresholds — while its own diagnosis warned that
    the router lost most of its updates and that Adam's second moment never decays, each fixed by "train in
    bf16-mixed": recommending it because it used 1 MB less contradicted its own report. A warned mode is recommended
    only where every stable mode is warned, and says so."""
    rows = [mode("fp32", 1000, 479), {**mode("pure-bf16", 1500, 476), "top_cause": "update_underflow"},
            mode("bf16-mixed", 1450, 477)]
    advice = recommend(rows, [STABLE, STABLE, STABLE])
    assert advice.mode == "bf16-mixed" and "its diagnosis warns" not in advice.text.split(". Also")[0]
    assert "`pure-bf16` (its diagnosis warns: `update_underflow`)" in advice.text, advice.text
    every = recommend([{**row, "top_cause": "kd_temperature_low"} for row in rows], [STABLE, STABLE, STABLE])
    assert every.mode == "pure-bf16" and "(its diagnosis warns: `kd_temperature_low`" in every.text


def test_within_a_few_percent_of_the_least_memory_the_faster_mode_wins():
    """Peak memory moves a few MB from run to run: 476 against 479 MB decides nothing — the faster one wins, and the
    other's figures read against it leave out a `1×`."""
    advice = recommend([mode("fp32", 1000, 479), mode("bf16-mixed", 1060, 480)], [STABLE, STABLE])
    assert advice.mode == "bf16-mixed"
    assert "Also stable: `fp32` (0.94× its tokens/s)." in advice.text, advice.text
    assert recommend([mode("fp32", 1000, 900), mode("bf16-mixed", 1060, 600)], [STABLE, STABLE]).mode == "bf16-mixed"
    assert recommend([mode("fp32", 1060, 600), mode("bf16-mixed", 1000, 900)], [STABLE, STABLE]).mode == "fp32"
