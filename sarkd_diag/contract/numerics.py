"""Numeric facts and conventions the whole project shares: dtype names, fp16's range, missing values."""

from __future__ import annotations

import math

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max, written out so this module needs no torch
FP16_TINY = 2.0**-24  # float16's smallest subnormal: a value below it is 0 in float16
# An optimizer step that changes the weight matrices by as much as their own size (‖Δw‖/‖w‖ = 1) is a
# blow-up, not training: healthy steps are ~1e-3 (see probes/updates.py for where that comes from).
EXTREME_UPDATE_RATIO = 1.0
# A model whose steps change its weight matrices by less than this (‖Δw‖/‖w‖, the median over its steps) does not
# train: ten thousand such steps move the weights as far as one healthy step (~1e-3). The smallest learning rates
# chosen on purpose — Adam at 1e-7 to 5e-7 in RLHF/DPO fine-tuning — move weights of ~0.02 by ~1e-6..1e-5 a step,
# ten times above it and more; Adam's step is about the lr whatever the gradient, so a converged run stays above too.
TINY_UPDATE_RATIO = 1e-7
HEALTHY_UPDATE_RATIO = 1e-3  # the rule of thumb the tiny and extreme bars are read against
# A group's lr below this fraction of its scheduler's base lr (or, where no base is known, of the run's largest lr):
# a warm-up's start, an annealing tail — steps meant to move the weights by almost nothing.
SCHEDULED_LR_FLOOR = 0.01
# More than this fraction of intended weight updates lost to rounding (measured, or predicted before the first
# step from lr against the weights' ulp) is a warning: the weights train noticeably less than fp32's would.
LOST_UPDATE_WARNING = 0.10
# Weight decay that alone halves every weight within this many steps outpaces training: each step multiplies the
# weights by 1 − lr × weight_decay (AdamW's decoupled decay; SGD's), so lr × weight_decay ≥ 1 − 0.5 ** (1 / N)
# (0.067 for N = 10) collapses them toward zero. Healthy AdamW: lr × weight_decay ~1e-5, a half-life of ~70,000 steps.
# The diagnosis measures the same thing after the fact: the largest weight halving within as many steps.
WEIGHT_HALVING_STEPS = 10
# Weights that changed between an optimizer step and the next training forward were changed by code outside the
# optimizer (an in-place rescale, a copy, an average written back): an edit that multiplies or divides a tensor's
# largest absolute value by more than this is a warning (`weights_edited`); a smaller one — a clamp, an EMA swap,
# tied weights copied — is recorded as information.
WEIGHT_EDIT_FACTOR = 2.0
# A dual-tokenizer KD term covering under this fraction of a step's target tokens (`kd_targets_few`): its kd_loss, a
# mean over every target token, reads small, and the tokens it misses learn from the cross-entropy alone.
KD_TARGETS_WARNING = 0.5
# Logit KD is T² · D(teacher ‖ student) at logits / T, whose gradient per logit is T · (p_student − p_teacher) at T:
# below this temperature the KD term's gradient is under this fraction of its size at T = 1, and the teacher's softmax
# at T is one-hot wherever its top logits differ by more than ~0.1 (`kd_temperature_low`): next to a cross-entropy
# term the student learns from that alone, and the KD term matches the teacher's argmax, not its distribution.
KD_TEMPERATURE_FLOOR = 0.01
# Loss terms named so are a divergence and a cross-entropy, never below 0 (`loss_term_negative`): sarkd-diag's loop
# names its own so, a caller's loop by `Probes.step(terms=...)`. A KL of near-equal distributions may round a hair
# below 0; below −NEGATIVE_TERM_SLACK a term computed in float32 or wider is no such thing (a sign flipped, log p and
# log q swapped) — one computed in 16 bits is not judged: its rounding alone takes a KL of near-equal distributions
# further below 0.
NONNEGATIVE_TERMS = {"kd": "divergence (KL, JSD) or squared error", "ce": "cross-entropy"}
NEGATIVE_TERM_SLACK = 1e-3


def dtype_name(dtype) -> str:
    """'float16' for torch.float16: how dtypes are written in events, config.json and messages."""
    return str(dtype).removeprefix("torch.")


def perplexity(loss: float) -> float:
    """exp of a per-token cross-entropy: Infinity above a loss of 700 (exp overflows a float there), and NaN for a
    NaN loss — an evaluation that computed NaN is not one whose perplexity is merely too large to write."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def number_or_none(value) -> float | None:
    """A measured figure as a float, or None where nothing was measured (None, NaN, pandas NA).

    Inf stays Inf: an infinite reading is a measurement, a missing one is not."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def reading_or_none(value) -> float | None:
    """A recorded reading as a float, NaN and ±Inf kept (they were measured: a figure draws them as
    non-finite); None only where nothing was recorded."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
