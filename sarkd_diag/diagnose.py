"""From events to causes: the root cause first, each with where, when, the evidence and the fix.

Rules read the event log (and, for divergence, the training loss). Critical causes come first, then
warnings; within each, the earliest step first and, on the same step, `CAUSE_ORDER` puts root causes
ahead of the symptoms they produce — an eps that is 0 in fp16 comes before the non-finite weights it
causes. Activations that turn non-finite after the weights did are symptoms and make no cause.
"""

from __future__ import annotations

import math

import pandas as pd

CAUSE_ORDER = (
    "nonfinite_input", "teacher_overflow", "optimizer_eps_underflow", "activation_overflow",
    "gradient_overflow", "optimizer_state_underflow", "loss_scale_collapse", "update_underflow", "divergence",
)
DIVERGENCE_FACTOR = 3.0  # a training loss above 3x its first value is a blow-up

FIXES = {
    "optimizer_eps_underflow": "train in `mixed`: fp32 master weights and optimizer state keep eps={eps} "
                               "representable (in pure fp16 an eps of 1e-4 avoids the NaNs but updates stagnate)",
    "optimizer_state_underflow": "keep the optimizer state in fp32 — `mixed` or `bf16-mixed` hold fp32 master "
                                 "weights and fp32 Adam moments",
    "activation_overflow": "{module} overflows {dtype}: train in `bf16-mixed` (fp32's range), or keep this op "
                           "in fp32 under autocast; in `mixed` the loss scaler cannot fix a forward overflow",
    "fp16_risk": "{module} exceeds fp16's range in {dtype}: prefer `bf16-mixed` over `mixed`/`pure-fp16` for "
                 "this model",
    "gradient_overflow": "use `mixed` (dynamic loss scaling skips overflowing steps) or `bf16-mixed`; lower "
                         "the learning rate or --max-grad-norm if it persists",
    "loss_scale_collapse": "gradients overflow fp16 every few steps: switch to `bf16-mixed`, lower the learning "
                           "rate, or find the overflowing module with --probes full",
    "update_underflow": "updates are below half an ulp of the {dtype} weights: train in `mixed` or "
                        "`bf16-mixed` (fp32 master weights), or raise the learning rate",
    "teacher_overflow": "the teacher's outputs are non-finite in {dtype}: hold the teacher in bf16 or fp32 "
                        "(`bf16-mixed`, or `fp32`)",
    "nonfinite_input": "fix the data: every batch needs target tokens and finite inputs",
    "divergence": "the loss blows up without a precision cause: lower --student-lr, enable --max-grad-norm, "
                  "or check the data",
}


def _first(frame: pd.DataFrame) -> pd.Series:
    return frame.sort_values(["step", "time"], kind="stable").iloc[0]


def _clean(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _cause(cause: str, severity: str, row: pd.Series | None, evidence: dict, **fmt) -> dict:
    fields = {"module": None, "dtype": None, "eps": None}
    if row is not None:
        fields.update(module=_clean(row.get("module")) or _clean(row.get("tensor")), dtype=_clean(row.get("dtype")))
    fields.update(fmt)
    return {
        "cause": cause,
        "severity": severity,
        "model": _clean(row.get("model")) if row is not None else None,
        "module": fields["module"],
        "rank": int(row["rank"]) if row is not None else 0,
        "first_step": int(row["step"]) if row is not None else None,
        "evidence": {k: v for k, v in evidence.items() if v is not None},
        "fix": FIXES[cause].format(**{k: v if v is not None else "?" for k, v in fields.items()}),
    }


def diagnose(events: pd.DataFrame, metrics: pd.DataFrame | None, config: dict) -> list[dict]:
    """Causes, most important first, as dicts {cause, severity, model, module, rank, first_step, evidence, fix}."""
    mode = (config.get("precision") or {}).get("mode")
    if events is None or len(events) == 0:
        events = pd.DataFrame(columns=["kind", "severity", "model", "module", "tensor", "step", "rank", "time",
                                       "message", "value", "dtype"])
    of = {kind: events[events["kind"] == kind] for kind in events["kind"].unique()}
    empty = events.iloc[0:0]

    def kind(name: str) -> pd.DataFrame:
        return of.get(name, empty)

    causes: list[dict] = []
    params, grads, losses = kind("nonfinite_param"), kind("nonfinite_grad"), kind("nonfinite_loss")
    symptoms = {"nonfinite_param_events": len(params), "nonfinite_grad_events": len(grads),
                "nonfinite_loss_events": len(losses),
                "first_nonfinite_param_step": int(params["step"].min()) if len(params) else None}
    explained = False

    empty_targets = kind("empty_targets")
    if len(empty_targets):
        causes.append(_cause("nonfinite_input", "critical" if len(losses) else "warning", _first(empty_targets),
                             {"empty_target_batches": len(empty_targets), **symptoms}))
        explained = True

    activations = kind("nonfinite_activation")
    if len(params):  # once weights are non-finite every later activation is too: a symptom, not a cause
        activations = activations[activations["step"] <= symptoms["first_nonfinite_param_step"]]
    teacher_acts = activations[activations["model"] == "teacher"]
    if len(teacher_acts):
        causes.append(_cause("teacher_overflow", "critical", _first(teacher_acts),
                             {"teacher_nonfinite_modules": len(teacher_acts), **symptoms}))
        explained = True

    preflight = kind("optimizer_preflight")
    eps_zero = preflight[(preflight["severity"] == "critical") & preflight["message"].str.contains("eps")]
    if len(eps_zero):
        row = _first(eps_zero)
        causes.append(_cause("optimizer_eps_underflow", "critical", row,
                             {"eps": row["value"], "dtype": row["dtype"], **symptoms}, eps=f"{row['value']:g}",
                             module=row.get("tensor")))
        if len(params):
            causes[-1]["first_step"] = symptoms["first_nonfinite_param_step"]
        explained = True

    student_acts = activations[activations["model"] != "teacher"]
    if len(student_acts):
        causes.append(_cause("activation_overflow", "critical", _first(student_acts),
                             {"nonfinite_modules": len(student_acts), **symptoms}))
        explained = True
    risk = kind("fp16_overflow_risk")
    if len(risk):
        row = _first(risk)
        cause = _cause("activation_overflow", "warning", row, {"modules_beyond_fp16": len(risk),
                                                               "max_value": float(risk["value"].max())})
        cause["fix"] = FIXES["fp16_risk"].format(module=row.get("module"), dtype=row.get("dtype"))
        causes.append(cause)

    if len(grads) and not explained:
        causes.append(_cause("gradient_overflow", "critical", _first(grads), {**symptoms}))
        explained = True

    state = kind("optimizer_state_underflow")
    if len(state):
        row = _first(state)
        causes.append(_cause("optimizer_state_underflow", "critical" if len(params) and not explained
                             else "warning", row, {"zeroed_fraction": row["value"]}))
        explained = explained or bool(len(params))

    collapse = pd.concat([kind("scale_below_one"), kind("scaler_backoff")])
    if len(collapse):
        below = kind("scale_below_one")
        causes.append(_cause("loss_scale_collapse", "critical" if len(below) else "warning", _first(collapse),
                             {"backoff_warnings": len(kind("scaler_backoff")),
                              "skipped_steps": len(kind("scaler_skip")),
                              "min_scale": float(collapse["value"].min())}))

    lost = kind("lost_updates")
    stagnation = preflight[(preflight["severity"] == "warning") & preflight["message"].str.contains("ulp")]
    if len(lost):
        row = _first(lost)
        causes.append(_cause("update_underflow", "warning", row,
                             {"lost_update_fraction": row["value"],
                              "predicted_fraction": float(stagnation["value"].iloc[0]) if len(stagnation) else None}))
    elif len(stagnation) and mode in ("pure-fp16", "pure-bf16"):
        row = _first(stagnation)
        causes.append(_cause("update_underflow", "warning", row, {"predicted_fraction": row["value"]}))

    if not explained:
        divergence = _divergence(params, losses, metrics, mode)
        if divergence is not None:
            causes.append(divergence)
    rank = {cause: i for i, cause in enumerate(CAUSE_ORDER)}
    return sorted(causes, key=lambda c: (c["severity"] != "critical", c["first_step"] if c["first_step"] is not None
                                         else math.inf, rank[c["cause"]]))


def _divergence(params: pd.DataFrame, losses: pd.DataFrame, metrics: pd.DataFrame | None, mode: str | None):
    blowups = pd.concat([params, losses])
    if len(blowups):
        return _cause("divergence", "critical", _first(blowups),
                      {"mode": mode, "nonfinite_param_events": len(params), "nonfinite_loss_events": len(losses)})
    if metrics is None or mode != "fp32" or "loss" not in metrics:
        return None
    train = metrics[(metrics["split"] == "train")].dropna(subset=["loss"])
    if len(train) < 2:
        return None
    first = float(train["loss"].iloc[0])
    above = train[train["loss"] > DIVERGENCE_FACTOR * first]
    if not len(above):
        return None
    row = pd.Series({"step": int(above["step"].iloc[0]), "rank": 0, "model": "student", "module": None,
                     "tensor": None, "dtype": "float32"})
    return _cause("divergence", "critical", row, {"first_loss": first, "max_loss": float(train["loss"].max()),
                                                  "factor": DIVERGENCE_FACTOR})
