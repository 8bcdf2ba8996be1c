"""`--report-to tensorboard`: a run's metrics and events written with TensorBoard's own `SummaryWriter`.

The export is made from the run directory's logs when the run is closed (`presentation.closing.finalize_run`), so
`sarkd-diag report RUN_DIR` writes it again for any run whose options ask for it. RUN_DIR/tensorboard/ is
rebuilt whole each time: the logs are the truth, and a rebuilt run never shows a step twice.

- every numeric column of metrics.jsonl as a scalar: `train/<column>` and `eval/<column>`, at its step;
  a value that was not measured is not written, a measured NaN or Infinity is (TensorBoard shows it);
- the events of each step as one text entry, `events` (a markdown table), and counts per severity as
  scalars `events/<severity>` (cumulative);
- the diagnosis as text, `diagnosis`, at the last step.

Needs the `tensorboard` package: `pip install 'sarkd-diag[tensorboard]'`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'sarkd-diag[tensorboard]'"


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _cell(value) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def export_tensorboard(run_dir: str | Path, summary: dict | None = None, into: str | Path | None = None) -> Path | None:
    """Write tensorboard/ into `into` (default: RUN_DIR) from the run's metrics.jsonl and events; the directory
    written. Without the tensorboard package (a run closed on another machine by `report`): a warning, and None."""
    if not tensorboard_available():
        import warnings

        warnings.warn(f"--report-to tensorboard: the tensorboard package is not installed ({INSTALL_HINT}); "
                      f"{Path(run_dir) / TENSORBOARD_DIR} was not written", stacklevel=2)
        return None
    from torch.utils.tensorboard import SummaryWriter

    from ..contract.events import read_jsonl
    from ..contract.rundir import causes_and_findings, load_events

    run_dir = Path(run_dir)
    target = Path(into or run_dir) / TENSORBOARD_DIR
    shutil.rmtree(target, ignore_errors=True)
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    events = load_events(run_dir)
    writer = SummaryWriter(log_dir=str(target))
    try:
        last = 0
        for row in rows:
            step, split = row.get("step"), row.get("split") or "train"
            if step is None:
                continue
            last = max(last, int(step))
            for key, value in row.items():
                if key in ("step", "split") or value is None or isinstance(value, str):
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                writer.add_scalar(f"{split}/{key}", number, int(step))
        counts: dict[str, int] = {}
        for step, group in events.groupby("step", sort=True):
            lines = ["| severity | kind | code | where | message |", "|---|---|---|---|---|"]
            for e in group.astype(object).to_dict("records"):
                where = " / ".join(str(e[k]) for k in ("model", "module", "tensor") if e.get(k) not in (None, "")
                                   and not (isinstance(e.get(k), float) and pd.isna(e[k])))
                lines.append("| " + " | ".join(_cell(e.get(k)) for k in ("severity", "kind", "code")) + f" | "
                             f"{_cell(where)} | {_cell(e.get('message'))} |")
                counts[e["severity"]] = counts.get(e["severity"], 0) + 1
            writer.add_text("events", "\n".join(lines), int(step))
            for severity, count in counts.items():
                writer.add_scalar(f"events/{severity}", count, int(step))
            last = max(last, int(step))
        if summary is not None:
            causes = causes_and_findings(summary)
            text = "\n".join(f"{i}. **{d.get('cause')}** ({d.get('severity')}), first at step {d.get('first_step')}"
                             + (f": {d['fix']}" if d.get("fix") else "") for i, d in enumerate(causes, 1))
            writer.add_text("diagnosis", text or "No numerical problem was found.", last)
    finally:
        writer.close()
    return target
