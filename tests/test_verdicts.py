"""Every verdict kind from crafted comparison rows, and the thresholds at their edges."""

import math

import pytest

from sarkd_diag.analysis.verdicts import (
    DRIFT_VS_FP32,
    DRIFTING_LOST_UPDATES,
    KINDS,
    STAGNANT_LOST_UPDATES,
    THRESHOLDS,
    Verdict,
    verdict,
)


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


def test_stagnant_is_judged_from_lost_updates():
    assert text(row(lost_update_fraction=STAGNANT_LOST_UPDATES + 0.01), []) == "stagnant (update_underflow)"
    assert text(row(lost_update_fraction=STAGNANT_LOST_UPDATES), []) == "drifting (update_underflow)"


def test_slow_loss_progress_alone_is_not_stagnation():
    """A run whose perplexity barely moved but whose updates all landed (fp32 at a tiny lr) is stable."""
    assert text(row(final_eval_ppl=520.0, lost_update_fraction=0.0), []) == "stable"


def test_stagnant_when_the_loss_scaler_skips_most_steps():
    assert text(row(skipped_steps=20), ["loss_scale_collapse"]) == "stagnant (loss_scale_collapse)"


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
