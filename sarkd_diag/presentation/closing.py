"""Closing a run directory: summary.json, the parquet files, report.md, the figures, report.html and the
TensorBoard export, built from config.json and the .jsonl logs alone.

So a finished run, an interrupted one and one that died mid-step are closed the same way: the training
loop and `Probes` call `finalize_run` at the end, `sarkd-diag report` on any run directory, compare-precision
on a mode whose process died.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contract.rundir import (
    SCHEMA_VERSION,
    STATUSES,
    built_then_moved,
    final_figures,
    load_activations,
    load_events,
    load_metrics,
    status_from_logs,
    write_json_atomic,
)


def run_error(events) -> dict | None:
    """The exception that ended the run, as its `run_error` event recorded it (the first: under torchrun, the rank
    where it happened first), or None: what a failed run's reader needs first, and no numerical cause tells."""
    errors = events[events["kind"] == "run_error"]
    if not len(errors):
        return None
    first = errors.iloc[0]
    return {"message": " ".join(str(first["message"]).split()), "step": int(first["step"]), "phase": first["phase"]}


def finalize_run(run_dir: str | Path, status: str | None = None) -> dict:
    """Write summary.json, metrics.parquet, events.parquet, report.md, the figures, report.html and (when the
    options ask for it) the TensorBoard export from the run's own logs; without a `status`, the one the logs
    prove (`status_from_logs`). All are built in a hidden directory of the run and moved into place once every
    one is (`built_then_moved`), so closing that fails (a bug in a renderer, a full disk) leaves the run directory
    as it was. The renderers are imported here, when a run closes, so that importing the training loop does not
    load matplotlib."""
    from ..analysis.diagnose import diagnose
    from .plots import RUN_FIGURES, write_run_plots
    from .report import write_html_report, write_report
    from .tensorboard_export import export_tensorboard

    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} not in {STATUSES}")
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics, events = load_metrics(run_dir), load_events(run_dir)
    status = status or status_from_logs(run_dir, config, metrics, events)
    train = metrics[metrics["split"] == "train"]
    diagnosis = diagnose(events, metrics, config)
    with built_then_moved(run_dir) as staging:
        metrics.to_parquet(staging / "metrics.parquet", index=False)
        events.to_parquet(staging / "events.parquet", index=False)
        summary = {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "steps_completed": int(train["step"].max()) if len(train) else 0,
            "precision": config["precision"],
            "final": final_figures(metrics),
            "event_counts": {k: int(v) for k, v in events["kind"].value_counts().items()},
            "diagnosis": diagnosis,
            "findings": diagnosis.findings,
            "error": run_error(events),
            "run_dir": str(run_dir),
        }
        write_json_atomic(staging / "summary.json", summary)
        write_report(run_dir, summary, config, metrics, events, into=staging)
        drawn = write_run_plots(run_dir, metrics, label=(config.get("precision") or {}).get("mode") or "run",
                                activations=load_activations(run_dir), into=staging)
        write_html_report(run_dir, summary, metrics, events, into=staging)
        if (config.get("options") or {}).get("report_to") == "tensorboard":
            export_tensorboard(run_dir, summary, into=staging)
    for stale in set(RUN_FIGURES) - {path.name for path in drawn}:  # an earlier closing's, of what the logs no
        (run_dir / stale).unlink(missing_ok=True)  # longer hold: the directory's figures are those its report shows
    return summary
