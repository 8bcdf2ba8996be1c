"""compare-precision's verdicts, and the thresholds behind them — in this one place (the README quotes them).

A verdict is read from what a run recorded, in this order: the process failed → `failed (reason)`; a
weight turned non-finite → `corrupted@STEP (cause)`; most intended updates were lost to rounding (or
skipped by the loss scaler) → `stagnant (cause)`; some were lost, or the final perplexity is far from
fp32's → `drifting (cause)`; otherwise `stable`. Stagnation is judged from lost updates, never from slow
loss progress: a slow but exact fp32 run at a tiny learning rate is `stable`. A verdict is a value (kind,
step, cause), written as that text by `str()`: what reads one uses its fields, not the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..contract.numerics import number_or_none, reading_or_none

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


@dataclass(frozen=True)
class Verdict:
    """One mode's verdict: its `kind` (one of KINDS), the first step a weight turned non-finite (`corrupted`
    only) and why (a cause code, or a few words). `str()` is how the tables and files write it:
    `stable`, `stagnant (update_underflow)`, `corrupted@3 (optimizer_eps_underflow)`."""

    kind: str
    step: int | None = None
    cause: str | None = None

    def __str__(self) -> str:
        text = self.kind if self.step is None else f"{self.kind}@{self.step}"
        return text if self.cause is None else f"{text} ({self.cause})"


KINDS = ("stable", "drifting", "stagnant", "corrupted", "failed")  # from good to bad


def verdict(row: dict, causes: list[str], failure: str | None = None) -> Verdict:
    """The verdict of one mode from its comparison row, its diagnosed cause codes (most important first) and,
    when its process failed, the reason."""
    if failure:
        return Verdict("failed", cause=failure)
    top = causes[0] if causes else None
    first_bad = number_or_none(row.get("first_nonfinite_step"))
    if first_bad is not None:
        return Verdict("corrupted", int(first_bad), top or "nonfinite weights")
    lost = number_or_none(row.get("lost_update_fraction")) or 0.0
    steps = row.get("steps_completed") or 0
    skipped = (row.get("skipped_steps") or 0) / steps if steps else 0.0
    if lost > STAGNANT_LOST_UPDATES:
        return Verdict("stagnant", cause="update_underflow")
    if skipped > STAGNANT_SKIPPED_FRACTION:
        return Verdict("stagnant", cause="loss_scale_collapse" if "loss_scale_collapse" in causes
                       else top or "skipped steps")
    if lost > DRIFTING_LOST_UPDATES:
        return Verdict("drifting", cause="update_underflow")
    drift, ppl = number_or_none(row.get("drift_vs_fp32")), reading_or_none(row.get("final_eval_ppl"))  # NaN counts
    if drift is not None and abs(drift) > DRIFT_VS_FP32:
        return Verdict("drifting", cause=top or f"eval ppl {drift:+.1%} vs fp32")
    if ppl is not None and not math.isfinite(ppl):
        return Verdict("drifting", cause=top or "non-finite eval ppl")
    return Verdict("stable")
