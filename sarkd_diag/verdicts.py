"""compare-precision's verdicts, and the thresholds behind them — in this one place (the README quotes them).

A verdict is read from what a run recorded, in this order: the process failed → `failed (reason)`; a
weight turned non-finite → `corrupted@STEP (cause)`; most intended updates were lost to rounding (or
skipped by the loss scaler) → `stagnant (cause)`; some were lost, or the final perplexity is far from
fp32's → `drifting (cause)`; otherwise `stable`. Stagnation is judged from lost updates, never from slow
loss progress: a slow but exact fp32 run at a tiny learning rate is `stable`.
"""

from __future__ import annotations

import math

STAGNANT_LOST_UPDATES = 0.50  # median lost-update fraction above this: the weights barely move
DRIFTING_LOST_UPDATES = 0.10  # above this (and up to the stagnant threshold): trains, but not as fp32 does
DRIFT_VS_FP32 = 0.05  # final validation perplexity more than 5% (relative) away from the fp32 run's
STAGNANT_SKIPPED_FRACTION = 0.50  # more than half of the optimizer steps skipped by the loss scaler

THRESHOLDS = {
    "stagnant_lost_update_fraction": STAGNANT_LOST_UPDATES,
    "drifting_lost_update_fraction": DRIFTING_LOST_UPDATES,
    "drifting_eval_ppl_vs_fp32": DRIFT_VS_FP32,
    "stagnant_skipped_step_fraction": STAGNANT_SKIPPED_FRACTION,
}


def _number(value) -> float | None:
    """A figure, or None when it was not measured (None, NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def verdict(row: dict, causes: list[str], failure: str | None = None) -> str:
    """The verdict of one mode from its comparison row, its diagnosed cause codes (most important first) and,
    when its process failed, the reason."""
    if failure:
        return f"failed ({failure})"
    top = causes[0] if causes else None
    first_bad = _number(row.get("first_nonfinite_step"))
    if first_bad is not None:
        return f"corrupted@{int(first_bad)} ({top or 'nonfinite weights'})"
    lost = _number(row.get("lost_update_fraction")) or 0.0
    steps = row.get("steps_completed") or 0
    skipped = (row.get("skipped_steps") or 0) / steps if steps else 0.0
    if lost > STAGNANT_LOST_UPDATES:
        return "stagnant (update_underflow)"
    if skipped > STAGNANT_SKIPPED_FRACTION:
        return f"stagnant ({'loss_scale_collapse' if 'loss_scale_collapse' in causes else top or 'skipped steps'})"
    if lost > DRIFTING_LOST_UPDATES:
        return "drifting (update_underflow)"
    drift, ppl = _number(row.get("drift_vs_fp32")), _number(row.get("final_eval_ppl"))
    if drift is not None and abs(drift) > DRIFT_VS_FP32:
        return f"drifting ({top or f'eval ppl {drift:+.1%} vs fp32'})"
    if ppl is not None and not math.isfinite(ppl):
        return f"drifting ({top or 'non-finite eval ppl'})"
    return "stable"
