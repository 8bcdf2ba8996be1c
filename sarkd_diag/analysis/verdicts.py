"""compare-precision's verdicts, and the thresholds behind them — in this one place (the README quotes them).

A verdict is read from what a run recorded, in this order: the process failed → `failed (reason)`; a
weight turned non-finite → `corrupted@STEP (cause)`; most intended updates were lost to rounding (or
skipped by the loss scaler after its warm-up) → `stagnant (cause)`; some were lost, or the final perplexity is far from
fp32's → `drifting (cause)`; otherwise `stable`. Stagnation is judged from lost updates, never from slow
loss progress: a slow but exact fp32 run at a tiny learning rate is `stable`. A verdict is a value (kind,
step, cause), written as that text by `str()`: what reads one uses its fields, not the text.

Across the modes, `recommend` answers the question a comparison is run for — which mode to train in — or
says why none can be named: when fp32 itself fails, no precision is the fix, and the run's own fix is
given instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..contract.numerics import number_or_none, reading_or_none

STAGNANT_LOST_UPDATES = 0.50  # median lost-update fraction above this: the weights barely move
DRIFTING_LOST_UPDATES = 0.10  # above this (and up to the stagnant threshold): trains, but not as fp32 does
DRIFT_VS_FP32 = 0.05  # final validation perplexity more than 5% (relative) away from the fp32 run's
STAGNANT_SKIPPED_FRACTION = 0.50  # more than half of the optimizer steps after the loss scaler's warm-up skipped
SPEED_TIE = 0.10  # stable modes within this fraction of the fastest one's tokens/s count as fast as it (a short
#                   comparison's speeds scatter about this much on a shared machine): the least memory decides
MEMORY_TIE = 0.05  # stable modes within this fraction of the least peak memory count as light as it (a process's peak
#                    moves a few MB from run to run): the faster of them is recommended
LOAD_TIE = 0.25  # the share of the machine's CPU time other processes took while each mode ran (one after another)
#                  differing by more than this between stable modes: their tokens/s measure the load as much as the
#                  mode (fp32 ran at 671 tokens/s in a comparison beside a test suite, 11,251 alone): not ranked

THRESHOLDS = {
    "stagnant_lost_update_fraction": STAGNANT_LOST_UPDATES,
    "drifting_lost_update_fraction": DRIFTING_LOST_UPDATES,
    "drifting_eval_ppl_vs_fp32": DRIFT_VS_FP32,
    "stagnant_skipped_step_fraction": STAGNANT_SKIPPED_FRACTION,
    "recommend_speed_tie": SPEED_TIE,
    "recommend_memory_tie": MEMORY_TIE,
    "recommend_load_tie": LOAD_TIE,
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
    skipped = _skipped_fraction(row)
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


def _skipped_fraction(row: dict) -> float:
    """The fraction of the steps after the loss scaler's warm-up that were skipped, as the scaler probe judges its
    `skip_fraction`: the warm-up's skips (`scaler_warmup_skips`) are it finding its scale, which a short run spends
    most of its steps on. A run that never left its warm-up applied no update: every step skipped (1.0)."""
    steps, warmup = row.get("steps_completed") or 0, row.get("scaler_warmup_skips") or 0
    if steps <= warmup:
        return 1.0 if warmup else 0.0
    return ((row.get("skipped_steps") or 0) - warmup) / (steps - warmup)


@dataclass(frozen=True)
class Recommendation:
    """The comparison's answer: the mode to train in (None when none can be named) and why, one or two
    sentences (markdown code spans), as comparison.md, the .html files, summary.json and the terminal give it."""

    mode: str | None
    text: str


def recommend(rows: list[dict], verdicts: list[Verdict], fp32_fix: str | None = None) -> Recommendation:
    """Which mode to train in, from the table's rows (`mode`, `tokens_per_s`, `peak_memory_mb`, `other_load`),
    their verdicts, and the fix of fp32's root cause when fp32 has one.

    fp32 is the reference: when it is not stable for a numerical reason, no precision can fix the run (a
    lower one only rounds more), so none is recommended and fp32's fix is given. Otherwise the fastest stable
    mode is recommended (the least memory among those within SPEED_TIE of it, the faster among those within
    MEMORY_TIE of that), with its cost against fp32 and the trade-off of every other stable mode — unless the load
    of other processes differed between the stable modes' runs by more than LOAD_TIE: then their speeds are not
    compared, and the least memory decides. A stable mode whose own diagnosis claims a cause (`top_cause`: a
    warning below the verdicts' thresholds — a group that loses most of its updates, a second moment that never
    decays) is recommended only where every stable mode's does: its own report's fix is to leave it.
    """
    judged = {row["mode"]: v for row, v in zip(rows, verdicts, strict=True)}
    unstable = [f"`{mode}` is `{v}`" for mode, v in judged.items() if v.kind != "stable"]
    fp32 = judged.get("fp32")
    if fp32 is not None and fp32.kind not in ("stable", "failed"):
        every = len(judged) > 1 and all(v.kind != "stable" and v.cause == fp32.cause for v in judged.values())
        return Recommendation(None, f"fp32 itself is `{fp32}`{', as is every mode' if every else ''}: no "
                                    "precision mode fixes this run, so none is recommended — fix the run first: "
                                    + (fp32_fix or "see runs/fp32/report.md"))
    stable = [row for row in rows if judged[row["mode"]].kind == "stable"]
    if not stable:
        why = ("run fp32 too (add it to --modes) to tell whether precision is the cause" if fp32 is None else
               f"fp32 failed as well ({fp32.cause}), so whether precision is the cause is not known")
        return Recommendation(None, f"no mode is stable ({'; '.join(unstable)}): {why}")
    loads = _uneven_load(stable)
    columns = SPEED_AND_MEMORY if loads is None else SPEED_AND_MEMORY[1:]
    candidates = [row for row in stable if not row.get("top_cause")] or stable
    best = _fastest(candidates) if loads is None else _least_memory(candidates, by_speed=False)
    sentences = [f"train in `{best['mode']}` (`--precision {best['mode']}`): {_cost(best, rows, len(stable), columns)}"
                 + _warned(best)]
    if len(stable) > 1:
        sentences.append("Also stable: " + ", ".join(f"`{row['mode']}`" + _trade_off(row, best, columns)
                                                     for row in stable if row is not best))
    if loads is not None:
        sentences.append(f"Their speeds are not compared: other processes took {loads[0]:.0%} to {loads[1]:.0%} of "
                         "this machine's CPU time while the modes ran, one after another, so their tokens/s measure "
                         "the load as much as the mode — the least peak memory decided; on a quiet machine the "
                         "comparison ranks them by speed")
    if unstable:
        sentences.append("; ".join(unstable))
    if fp32 is None or fp32.kind == "failed":
        sentences.append("fp32 " + ("was not among the modes" if fp32 is None else f"failed ({fp32.cause})")
                         + ": drift from full precision was not measured")
    return Recommendation(best["mode"], ". ".join(sentences) + ".")


SPEED_AND_MEMORY = (("tokens_per_s", "tokens/s"), ("peak_memory_mb", "peak memory"))
MEASURE_NAMES = {"tokens_per_s": "speed", "peak_memory_mb": "peak memory"}  # what a column measures, in a sentence


def _uneven_load(stable: list[dict]) -> tuple[float, float] | None:
    """The least and the most of the machine's CPU time other processes took while a stable mode ran (`other_load`,
    a fraction), when they differ by more than LOAD_TIE; None when they do not or were not measured."""
    loads = [load for row in stable if (load := number_or_none(row.get("other_load"))) is not None]
    if len(loads) < 2 or max(loads) - min(loads) <= LOAD_TIE:
        return None
    return min(loads), max(loads)


def _fastest(stable: list[dict]) -> dict:
    """The fastest row (tokens/s), or among the rows within SPEED_TIE of it the one with the least peak memory;
    the first row when nothing was measured."""
    speeds = [_figure(row, "tokens_per_s") or 0.0 for row in stable]
    return _least_memory([row for row, speed in zip(stable, speeds, strict=True)
                          if speed >= (1 - SPEED_TIE) * max(speeds)])


def _least_memory(rows: list[dict], by_speed: bool = True) -> dict:
    """The row with the least peak memory — among those within MEMORY_TIE of it, the fastest (`by_speed`; else the
    first: speeds not to be compared); the first row when nothing was measured."""
    memory = [_figure(row, "peak_memory_mb") or math.inf for row in rows]
    tied = [row for row, used in zip(rows, memory, strict=True) if used <= min(memory) * (1 + MEMORY_TIE)] or rows
    return max(tied, key=lambda row: _figure(row, "tokens_per_s") or 0.0) if by_speed else tied[0]


def _warned(row: dict) -> str:
    """What the row's own diagnosis claims, where it claims anything: said beside the mode."""
    return f" (its diagnosis warns: `{row['top_cause']}` — see its report)" if row.get("top_cause") else ""


def _trade_off(row: dict, best: dict, columns=SPEED_AND_MEMORY) -> str:
    """Another stable mode's figures against the recommended one's (a figure within a few percent of it left out:
    `1×` says nothing), and what its own diagnosis claims."""
    ratios = [f"{r:.2g}× its {label}" for r, label in _ratios(row, best, columns) if f"{r:.2g}" != "1"]
    warned = [f"its diagnosis warns: `{row['top_cause']}`"] if row.get("top_cause") else []
    return f" ({', '.join(ratios + warned)})" if ratios or warned else ""


def _cost(best: dict, rows: list[dict], n_stable: int, columns=SPEED_AND_MEMORY) -> str:
    fp32 = next((row for row in rows if row["mode"] == "fp32"), None)
    if best["mode"] == "fp32":
        if n_stable == 1:
            return "the only stable mode"
        deciding = columns[0][0]  # the speed, or the peak memory where speeds were not compared
        if _figure(best, deciding) is None:  # first of the stable modes, by nothing measured: no claim made
            return f"stable ({MEASURE_NAMES[deciding]} not measured)"
        return f"stable, and the {'fastest' if columns == SPEED_AND_MEMORY else 'least memory of any'} stable mode here"
    if fp32 is None:
        return "stable"
    return f"stable, at {_against(best, fp32, columns)}"


def _against(row: dict, reference: dict, columns=SPEED_AND_MEMORY) -> str:
    """`1.6× the tokens/s and 0.7× the peak memory of `fp32``, leaving out what either did not measure."""
    ratios = _ratios(row, reference, columns)
    if not ratios:  # what was compared, named: `a peak memory not measured` where only memory decided
        return "a " + " and ".join(MEASURE_NAMES[column] for column, _ in columns) + " not measured"
    return " and ".join(f"{r:.2g}× the {label}" for r, label in ratios) + f" of `{reference['mode']}`"


def _ratios(row: dict, reference: dict, columns=SPEED_AND_MEMORY) -> list[tuple[float, str]]:
    """The row's figures of `columns` (tokens/s, peak memory) as multiples of the reference's, those both measured."""
    return [(ratio, label) for column, label in columns if (ratio := _ratio(row, reference, column)) is not None]


def _ratio(row: dict, reference: dict, column: str) -> float | None:
    a, b = _figure(row, column), _figure(reference, column)
    return a / b if a is not None and b else None


def _figure(row: dict, column: str) -> float | None:
    value = number_or_none(row.get(column))
    return value if value is not None and math.isfinite(value) and value > 0 else None
