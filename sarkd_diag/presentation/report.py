"""The human report of a run: report.md, written from the summary, config, metrics and events."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd
from rich import box
from rich.table import Table

from ..analysis.verdicts import Verdict
from ..contract.rundir import COMPARISON_COLUMNS, primary_evaluations, resume_command
from ..contract.wording import counted, evaluated_at_step_0_only


def _fmt(value, spec: str = ".4g") -> str:
    return "—" if value is None or (isinstance(value, float) and pd.isna(value)) else format(value, spec)


def _losses_only(evals: pd.DataFrame) -> bool:
    """The evaluations measured a loss whose exp is no perplexity (a distillation objective, a classifier's or a
    regressor's): none wrote `eval_ppl`, and one loss at least is there to show instead."""
    return (len(evals) > 0 and {"eval_ppl", "eval_loss"} <= set(evals) and evals["eval_ppl"].isna().all()
            and evals["eval_loss"].notna().any())


def _perplexity_line(final: dict, metrics: pd.DataFrame, steps: int) -> str:
    evals = metrics[metrics["split"] == "eval"] if len(metrics) and "split" in metrics else metrics.iloc[0:0]
    if _losses_only(evals):
        losses = primary_evaluations(evals)["eval_loss"]
        first, last, best = (_fmt(v, ".4g") for v in (losses.iloc[0], losses.iloc[-1], losses.min()))
        return f"- validation loss (its exp is no perplexity): {first} → {last} (best {best})"
    if len(evals) and "step" in evals and not (evals["step"] > 0).any():
        return f"- validation perplexity: {_fmt(final.get('first_eval_ppl'), '.3f')} {evaluated_at_step_0_only(steps)}"
    first, last, best = (_fmt(final.get(k), ".3f") for k in ("first_eval_ppl", "eval_ppl", "best_eval_ppl"))
    named = primary_evaluations(evals)["eval_set"] if "eval_set" in evals else evals.iloc[0:0]
    of = f" of {named.iloc[0]}" if len(named) and pd.notna(named.iloc[0]) else ""
    return f"- validation perplexity{of}: {first} → {last} (best {best})"


def continuation(run_dir: Path, summary: dict) -> str | None:
    """The command that continues a run that stopped short of its steps — interrupted, or crashed — from its
    newest checkpoint, as its panel and `check` say it; None for a run that ended on its own, or has none."""
    return resume_command(run_dir) if summary.get("status") in ("interrupted", "crashed") else None


def _where(d: dict) -> str:
    parts = []
    for part in (d.get("model"), d.get("module") or d.get("tensor")):
        if part and str(part) not in parts:
            parts.append(str(part))
    return " / ".join(parts)


def _precision_facts(precision: dict, escape=str, bold: str = "**{}**", code: str = "`{}`") -> list[str]:
    """The report's precision lines, from the fields the config holds: a hand-written or older config.json may
    lack `requested`, `reason` or `master_dtype`, and a field it lacks is left out, not the report."""
    requested, reason, master = (precision.get(k) for k in ("requested", "reason", "master_dtype"))
    detail = ": ".join(part for part in (requested is not None and f"requested {code.format(escape(requested))}",
                                         reason is not None and escape(reason)) if part)
    facts = [f"precision: {bold.format(escape(precision.get('mode')))}" + (f" ({detail})" if detail else "")]
    return facts + ([f"trainable weights held in: {escape(master)}"] if master is not None else [])


def write_report(run_dir: Path, summary: dict, config: dict, metrics: pd.DataFrame, events: pd.DataFrame,
                 into: Path | None = None) -> Path:
    """report.md of the run at `run_dir`, written into `into` (default: the run directory)."""
    precision = summary["precision"]
    final = summary["final"]
    lines = [
        f"# sarkd-diag run: {summary['status']}",
        "",
        f"- run directory: `{run_dir}`",
        *(f"- {fact}" for fact in _precision_facts(precision)),
        f"- steps completed: {summary['steps_completed']}",
        _perplexity_line(final, metrics, summary["steps_completed"]),
        f"- final training loss: {_fmt(final.get('loss'))}; median tokens/s: {_fmt(final.get('tokens_per_s'), '.0f')}",
        *(f"- continue it: `{resume}`" for resume in [continuation(run_dir, summary)] if resume),
        "",
        "## Diagnosis",
        "",
    ]
    if not summary["diagnosis"]:
        lines.append(no_cause_text(summary))
    for i, d in enumerate(summary["diagnosis"], 1):
        lines += _cause_markdown(i, d, events)
    if summary.get("findings"):
        lines += ["", "## Findings", "", FINDINGS_INTRO, ""]
        for i, d in enumerate(summary["findings"], 1):
            lines += _cause_markdown(i, d, events)
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
    shown, spec = ("eval_loss", ".4g") if _losses_only(evals) else ("eval_ppl", ".3f")
    heading = "validation loss" if shown == "eval_loss" else "validation perplexity"
    if len(evals) and evals["eval_set"].notna().any():  # several evaluation sets: each row says which
        lines += ["", "## Evaluations", "", f"| step | evaluation set | {heading} |", "|---:|---|---:|"]
        lines += [f"| {int(r.step)} | {_fmt(r.eval_set, 's')} | {_fmt(getattr(r, shown), spec)} |"
                  for r in evals.itertuples()]
    elif len(evals):
        lines += ["", "## Evaluations", "", f"| step | {heading} |", "|---:|---:|"]
        lines += [f"| {int(r.step)} | {_fmt(getattr(r, shown), spec)} |" for r in evals.itertuples()]
    path = Path(into or run_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path



# ------------------------------------------------------------------------------------------- report.html
HTML_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}"
              "img{max-width:100%;border:1px solid #ddd}.critical{background:#f8d0d0}.warning{background:#fff2c2}"
              ".cause{margin:1em 0;padding:.5em 1em;border-left:4px solid #888}code{background:#f3f3f3}")
EVENT_FIELDS = ("step", "severity", "kind", "code", "model", "module", "tensor", "value", "message")
MAX_EVENT_ROWS = 5000  # a run with more events lists the first ones and says how many were left out


def _e(value) -> str:
    import html

    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    return html.escape(str(value))


def embedded_image(path: Path, alt: str) -> str:
    """An <img> whose PNG is inside the page (a data: URI): the report is one file to mail or attach."""
    import base64

    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption>' \
           "</figure>"


FINDINGS_INTRO = ("What the loop or the setup gets wrong, beside the numerical causes: each explains a failure above "
                  "or makes the figures less than they seem.")


def _cause_markdown(i: int, d: dict, events: pd.DataFrame) -> list[str]:
    """One cause or finding of report.md: where and when, its evidence, its fix (read with .get: the keys grow)."""
    where, evidence = _where(d), d.get("evidence") or {}
    lines = [f"### {i}. `{d.get('cause')}` ({d.get('severity')})", "",
             f"First seen at step {d.get('first_step')}" + (f" in {where}" if where else "")
             + f"{_rank_of(d, events)}.", ""]
    if evidence:
        lines += ["Evidence: " + (", ".join(f"{k} = {v}" for k, v in evidence.items()) if isinstance(
            evidence, dict) else str(evidence)) + ".", ""]
    if d.get("fix"):
        lines += [f"**Fix:** {str(d['fix']).rstrip('.')}.", ""]
    return lines


def no_cause_text(summary: dict) -> str:
    """What an empty diagnosis says. A run that failed or crashed ended on something its logs do not show — "no
    problem was found" would read as a healthy run, and send its reader away from the error that ended it."""
    status, error = summary.get("status"), summary.get("error")
    if error:
        return (f"The run {status} on an error, not on a numerical cause: {error['message']} (at step "
                f"{error.get('step')}, {error.get('phase')}). What was measured stayed finite up to step "
                f"{summary.get('steps_completed', 0)}.")
    if status in ("failed", "crashed"):
        return (f"The run {status} with no numerical cause in its logs: what was measured stayed finite up to step "
                f"{summary.get('steps_completed', 0)}, so what ended it is not there — read the error it raised "
                "(its traceback; `traceback.txt` in this directory when `train` raised it) or what killed it.")
    healthy = ("No numerical problem was found in training: weights, gradients, activations and the loss stayed "
               "finite, and no update was lost to rounding beyond the warning threshold.")
    if summary.get("event_counts", {}).get("nonfinite_eval"):  # evaluation is no training forward: nothing places it
        healthy += (" An evaluation's loss was not finite (`nonfinite_eval`): evaluation computes what training does "
                    "not, and no probe reads its forwards.")
    return healthy


def _rank_of(cause: dict, events: pd.DataFrame) -> str:
    """` (rank N)` where the run had several processes (torchrun): in one process's run the rank says nothing, and
    reads as a setting the reader never made."""
    several = "rank" in events and events["rank"].nunique() > 1
    return f" (rank {cause['rank']})" if several and cause.get("rank") is not None else ""


def _diagnosis_html(summary: dict, events: pd.DataFrame) -> str:
    diagnosis, findings = summary.get("diagnosis") or [], summary.get("findings") or []
    parts = [f"<p>{_e(no_cause_text(summary))}</p>"] if not diagnosis else []
    parts += [_cause_html(i, d, events) for i, d in enumerate(diagnosis, 1)]
    if findings:
        parts += [f"<p><b>Findings.</b> {_e(FINDINGS_INTRO)}</p>"]
        parts += [_cause_html(i, d, events) for i, d in enumerate(findings, 1)]
    return "".join(parts)


def _cause_html(i: int, d: dict, events: pd.DataFrame) -> str:
    where, evidence = _where(d), d.get("evidence") or {}
    body = [f"<h3>{i}. <code>{_e(d.get('cause'))}</code> ({_e(d.get('severity'))})</h3>",
            f"<p>First seen at step {_e(d.get('first_step'))}" + (f" in {_e(where)}" if where else "")
            + f"{_e(_rank_of(d, events))}.</p>"]
    if evidence:
        shown = ", ".join(f"{k} = {v}" for k, v in evidence.items()) if isinstance(evidence, dict) else evidence
        body.append(f"<p>Evidence: {_e(shown)}.</p>")
    if d.get("fix"):
        body.append(f"<p><b>Fix:</b> {_e(str(d['fix']).rstrip('.'))}.</p>")
    return f'<div class="cause {_e(d.get("severity"))}">' + "".join(body) + "</div>"


def events_table_html(events: pd.DataFrame, extra: dict[str, str] | None = None) -> str:
    """One <tr> per event (the first MAX_EVENT_ROWS), in the order given; `extra` columns lead (a comparison's mode)."""
    if not len(events):
        return "<p>No events were recorded.</p>"
    extra = extra or {}
    fields = [f for f in EVENT_FIELDS if f in events.columns]
    head = "".join(f"<th>{_e(f)}</th>" for f in [*extra, *fields])
    rows = []
    for record in events.head(MAX_EVENT_ROWS).astype(object).to_dict("records"):
        cells = [*(record.get(c) for c in extra), *(record.get(f) for f in fields)]
        rows.append(f'<tr class="{_e(record.get("severity"))}">' + "".join(f"<td>{_e(c)}</td>" for c in cells)
                    + "</tr>")
    note = (f"<p>The first {MAX_EVENT_ROWS} of {counted(len(events), 'event')}; all of them are in events.parquet.</p>"
            if len(events) > MAX_EVENT_ROWS else "")
    return f'<table class="events"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{note}'


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{HTML_STYLE}</style>"
            f"</head><body>{body}</body></html>\n")


RUN_FIGURES = (("loss_curves.png", "the run: loss, learning rate, gradient norm, loss scale, lost updates, "
                                   "update-to-weight ratio"),
               ("fp16_headroom.png", "fp16 headroom: each module's largest output as a fraction of fp16's range"))


def write_html_report(run_dir: Path, summary: dict, metrics: pd.DataFrame, events: pd.DataFrame,
                      into: Path | None = None) -> Path:
    """report.html: one self-contained page of the run — the facts, the diagnosis, the figures (embedded) and
    every event. Written into `into` (default: the run directory), after the figures drawn there."""
    run_dir = Path(run_dir)
    into = Path(into or run_dir)
    precision, final = summary["precision"], summary["final"]
    facts = [f"run directory: <code>{_e(run_dir)}</code>",
             *_precision_facts(precision, escape=_e, bold="<b>{}</b>", code="<code>{}</code>"),
             f"steps completed: {_e(summary['steps_completed'])}",
             _e(_perplexity_line(final, metrics, summary["steps_completed"]).removeprefix("- ")),
             f"final training loss: {_e(_fmt(final.get('loss')))}; median tokens/s: "
             f"{_e(_fmt(final.get('tokens_per_s'), '.0f'))}; skipped steps: {_e(final.get('skipped_steps'))}",
             *(f"continue it: <code>{_e(resume)}</code>" for resume in [continuation(run_dir, summary)] if resume)]
    figures = "".join(embedded_image(into / name, alt) for name, alt in RUN_FIGURES if (into / name).is_file())
    title = f"sarkd-diag run: {summary['status']}"
    body = (f"<h1>{_e(title)}</h1><ul>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>"
            f"<h2>Diagnosis</h2>{_diagnosis_html(summary, events)}<h2>Figures</h2>{figures}"
            f"<h2>Events ({len(events)})</h2>{events_table_html(events)}")
    path = into / "report.html"
    path.write_text(_page(title, body), encoding="utf-8")
    return path


def write_comparison_report(out: Path, table: pd.DataFrame, verdicts: list, summary: dict, runs: dict[str, Path],
                            loss_scale: bool) -> Path:
    """A comparison's report.html: the legend and table, the figures (embedded), each mode's diagnosis and
    events — one self-contained page."""
    import json

    from ..contract.rundir import load_events

    out = Path(out)
    head = "".join(f"<th>{_e(c)}</th>" for c in COMPARISON_COLUMNS)
    rows = "".join(f'<tr style="background:{VERDICT_COLOUR.get(judged.kind, "#fff")}">'
                   + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
                   for cells, judged in zip(display_rows(table), verdicts, strict=True))
    names = [("loss_curves.png", "training loss per precision mode")]
    if loss_scale:
        names.append(("loss_scale.png", "dynamic loss scale per precision mode"))
    figures = "".join(embedded_image(out / n, alt) for n, alt in names if (out / n).is_file())
    modes, tables = [], []
    for mode, run_dir in runs.items():
        run_summary = run_dir / "summary.json"
        mode_summary = json.loads(run_summary.read_text()) if run_summary.is_file() else {}
        events = load_events(run_dir) if run_dir.is_dir() else pd.DataFrame()
        modes.append(f"<h3>{_e(mode)}</h3>{_diagnosis_html(mode_summary, events)}")
        tables.append(events.assign(mode=mode) if len(events) else events)
    everything = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) \
        else pd.DataFrame()
    title = "sarkd-diag compare-precision"
    body = (f"<h1>{_e(title)}</h1>" + "".join(f"<p>{html_text(line)}</p>" for line in legend(summary))
            + f"<table><tr>{head}</tr>{rows}</table><h2>Figures</h2>{figures}<h2>Diagnosis per mode</h2>"
            + "".join(modes) + f"<h2>Events ({len(everything)})</h2>"
            + events_table_html(everything, {"mode": "mode"}))
    path = out / "report.html"
    path.write_text(_page(title, body), encoding="utf-8")
    return path


# ------------------------------------------------------------------------- a comparison's table
def cell(column: str, value) -> str:
    """How a person reads a value: percentages for fractions, `n/a` for drift without fp32, `—` when unmeasured."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "n/a" if column == "drift_vs_fp32" else "—"
    if column == "drift_vs_fp32":
        return f"{value:+.1%}"
    if column == "lost_update_fraction":
        return f"{value:.1%}"
    if column in ("final_eval_ppl", "best_eval_ppl"):
        return f"{value:.3f}"
    if column in ("tokens_per_s", "peak_memory_mb"):
        return f"{value:.0f}"
    return str(value)


def display_rows(table: pd.DataFrame) -> list[list[str]]:
    return [[cell(c, row[c]) for c in COMPARISON_COLUMNS] for row in table.astype(object).to_dict("records")]


# by Verdict.kind (verdicts.KINDS)
VERDICT_STYLE = {"stable": "green", "drifting": "yellow", "stagnant": "yellow", "corrupted": "bold red",
                 "failed": "bold red"}
VERDICT_COLOUR = {"stable": "#d8f5d8", "drifting": "#fff2c2", "stagnant": "#fff2c2", "corrupted": "#f8d0d0",
                  "failed": "#f8d0d0"}


TERMINAL_COLUMNS = {"mode": "mode", "verdict": "verdict", "final_eval_ppl": "ppl", "drift_vs_fp32": "Δfp32",
                    "lost_update_fraction": "lost", "tokens_per_s": "tok/s", "peak_memory_mb": "MB"}


def rich_table(table: pd.DataFrame, verdicts: list[Verdict], title: str = "compare-precision") -> Table:
    """The columns a person scans first (the files hold them all), coloured by verdict."""
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column, header in TERMINAL_COLUMNS.items():
        if column == "verdict":
            out.add_column(header, ratio=1, overflow="fold")
        else:
            out.add_column(header, no_wrap=True, justify="left" if column == "mode" else "right")
    for cells, judged in zip(display_rows(table), verdicts, strict=True):
        by_name = dict(zip(COMPARISON_COLUMNS, cells, strict=True))
        out.add_row(*(by_name[c] for c in TERMINAL_COLUMNS), style=VERDICT_STYLE.get(judged.kind))
    return out


def legend(summary: dict) -> list[str]:
    """What a comparison's files say above its table: the recommendation, the setting, the verdicts' meaning."""
    t = summary["thresholds"]
    reference = "the fp32 run" if summary["fp32_reference"] else "n/a: fp32 was not among the modes"
    not_run = summary.get("not_run") or []
    missing = [f"Not run: {', '.join(not_run)} — asked for ({', '.join(summary.get('requested_modes') or [])}), "
               f"but the comparison stopped before {'it' if len(not_run) == 1 else 'them'} (interrupted?): the table "
               "compares the modes that ran."] if not_run else []
    return [
        *missing,
        f"Recommendation: {summary['recommendation']['text']}",
        f"Steps: {summary['options']['train_steps']}; student lr {summary['options']['student_lr']:g}; "
        f"seed {summary['options']['seed']}; probes every {counted(summary['options']['probe_every'], 'step')}; "
        f"drift reference: {reference}.",
        f"Verdicts: `corrupted@STEP` when a weight turned non-finite; `stagnant` when over "
        f"{t['stagnant_lost_update_fraction']:.0%} of intended updates were lost to rounding (median) or over "
        f"{t['stagnant_skipped_step_fraction']:.0%} of the steps after the loss scaler's warm-up were skipped; "
        f"`drifting` when over {t['drifting_lost_update_fraction']:.0%} were lost or the final eval perplexity is "
        f"more than {t['drifting_eval_ppl_vs_fp32']:.0%} from fp32's.",
    ]


def write_comparison_markdown(table: pd.DataFrame, summary: dict, path: Path, loss_scale: bool = True) -> None:
    lines = ["# sarkd-diag compare-precision", ""] + [part for line in legend(summary) for part in (line, "")] + [
             "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in display_rows(table)]
    lines += ["", "Each mode's run directory, report and diagnosis: `runs/<mode>/` (`sarkd-diag events` and "
              "`sarkd-diag check` take this directory too).", "", "![loss curves](loss_curves.png)", ""]
    if loss_scale:
        lines += ["![loss scale](loss_scale.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def html_text(text: str) -> str:
    """Escaped text with the legend's `code` spans as <code> (markdown backticks are not HTML)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def write_comparison_html(table: pd.DataFrame, verdicts: list[Verdict], summary: dict, path: Path,
               loss_scale: bool = True) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COMPARISON_COLUMNS)
    body = "".join(
        f'<tr style="background:{VERDICT_COLOUR.get(judged.kind, "#fff")}">'
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells, judged in zip(display_rows(table), verdicts, strict=True))
    notes = "".join(f"<p>{html_text(line)}</p>" for line in legend(summary))
    scale = "<p><img src='loss_scale.png' alt='loss scale'></p>" if loss_scale else ""
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>sarkd-diag compare-precision</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>sarkd-diag compare-precision</h1>{notes}<table><tr>{head}</tr>{body}</table>"
        f"<p><img src='loss_curves.png' alt='loss curves'></p>{scale}</body></html>\n", encoding="utf-8")
