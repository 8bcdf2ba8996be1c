"""The human report of a run: report.md, written from the summary, config, metrics and events."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _fmt(value, spec: str = ".4g") -> str:
    return "—" if value is None or (isinstance(value, float) and pd.isna(value)) else format(value, spec)


def _perplexity_line(final: dict, metrics: pd.DataFrame, steps: int) -> str:
    evals = metrics[metrics["split"] == "eval"] if len(metrics) and "split" in metrics else metrics.iloc[0:0]
    if steps > 0 and len(evals) and "step" in evals and not (evals["step"] > 0).any():
        return (f"- validation perplexity: {_fmt(final.get('first_eval_ppl'), '.3f')} at step 0; no evaluation "
                "after step 0 (the run ended before its first --eval-steps evaluation)")
    first, last, best = (_fmt(final.get(k), ".3f") for k in ("first_eval_ppl", "eval_ppl", "best_eval_ppl"))
    return f"- validation perplexity: {first} → {last} (best {best})"


def _where(d: dict) -> str:
    parts = []
    for part in (d.get("model"), d.get("module") or d.get("tensor")):
        if part and str(part) not in parts:
            parts.append(str(part))
    return " / ".join(parts)


def write_report(run_dir: Path, summary: dict, config: dict, metrics: pd.DataFrame, events: pd.DataFrame) -> Path:
    precision = summary["precision"]
    final = summary["final"]
    lines = [
        f"# sarkd-diag run: {summary['status']}",
        "",
        f"- run directory: `{run_dir}`",
        f"- precision: **{precision['mode']}** (requested `{precision['requested']}`: {precision['reason']})",
        f"- trainable weights held in: {precision['master_dtype']}",
        f"- steps completed: {summary['steps_completed']}",
        _perplexity_line(final, metrics, summary["steps_completed"]),
        f"- final training loss: {_fmt(final.get('loss'))}; median tokens/s: {_fmt(final.get('tokens_per_s'), '.0f')}",
        "",
        "## Diagnosis",
        "",
    ]
    if not summary["diagnosis"]:
        lines.append("No numerical problem was found: weights, gradients, activations and the loss stayed finite, "
                     "and no update was lost to rounding beyond the warning threshold.")
    for i, d in enumerate(summary["diagnosis"], 1):  # read with .get: the diagnosis' keys are still growing
        where = _where(d)
        evidence = d.get("evidence") or {}
        rank = f" (rank {d['rank']})" if d.get("rank") is not None else ""
        lines += [
            f"### {i}. `{d.get('cause')}` ({d.get('severity')})",
            "",
            f"First seen at step {d.get('first_step')}" + (f" in {where}" if where else "") + f"{rank}.",
            "",
        ]
        if evidence:
            lines += ["Evidence: " + (", ".join(f"{k} = {v}" for k, v in evidence.items()) if isinstance(
                evidence, dict) else str(evidence)) + ".", ""]
        if d.get("fix"):
            lines += [f"**Fix:** {str(d['fix']).rstrip('.')}.", ""]
    lines += ["", "## Events", ""]
    if len(events):
        counts = events.groupby(["kind", "severity"]).size().reset_index(name="count")
        lines += ["| kind | severity | count |", "|---|---|---:|"]
        lines += [f"| {r.kind} | {r.severity} | {r.count} |" for r in counts.itertuples()]
        first = events[events["severity"] != "info"].head(10)
        if len(first):
            lines += ["", "First warnings and critical events:", ""]
            for _, e in first.iterrows():
                lines.append(f"- step {e['step']} [{e['severity']}] {e['kind']}: {e['message']}")
    else:
        lines.append("No events were recorded.")
    evals = metrics[metrics["split"] == "eval"] if len(metrics) else metrics
    if len(evals):
        lines += ["", "## Evaluations", "", "| step | validation perplexity |", "|---:|---:|"]
        lines += [f"| {int(r.step)} | {_fmt(r.eval_ppl, '.3f')} |" for r in evals.itertuples()]
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

