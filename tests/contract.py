"""The run-directory contract of docs/run-directory.md, as assertions the tests share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

METRIC_COLUMNS = {"step", "split", "loss", "kd_loss", "ce_loss", "lr", "grad_norm", "loss_scale", "tokens_per_s",
                  "eval_ppl"}
EVENT_COLUMNS = {"step", "rank", "phase", "probe", "kind", "severity", "model", "module", "tensor", "dtype", "value",
                 "nan_count", "posinf_count", "neginf_count", "numel", "message"}
SUMMARY_KEYS = {"schema_version", "status", "steps_completed", "precision", "final", "event_counts", "diagnosis",
                "findings"}
# the contract's nine cause codes, as docs/run-directory.md lists them (tests/test_docs.py keeps the two, and the shared
# checker's where it is beside the checkout, equal)
CAUSES = {"optimizer_eps_underflow", "optimizer_state_underflow", "activation_overflow", "gradient_overflow",
          "loss_scale_collapse", "update_underflow", "teacher_overflow", "nonfinite_input", "divergence"}
DIAGNOSIS_KEYS = {"cause", "severity", "model", "module", "rank", "first_step", "evidence", "fix"}
CHECKER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "check_run_dir.py"


def assert_run_dir(path: Path) -> dict:
    path = Path(path)
    for name in ("config.json", "summary.json", "metrics.jsonl", "events.jsonl"):
        assert (path / name).is_file(), f"{name} missing in {path}"
    summary = json.loads((path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert {"mode", "requested", "reason", "master_dtype", "param_dtypes"} <= set(summary["precision"])
    for d in summary["diagnosis"]:
        assert DIAGNOSIS_KEYS <= set(d)
        assert d["cause"] in CAUSES, f"{d['cause']} is a finding, not one of the contract's causes"
    for d in summary["findings"]:
        assert DIAGNOSIS_KEYS <= set(d) and d["cause"] not in CAUSES
    if summary["status"] in ("completed", "stopped", "interrupted"):
        metrics = pd.read_parquet(path / "metrics.parquet")
        assert METRIC_COLUMNS <= set(metrics.columns)
        events = pd.read_parquet(path / "events.parquet")
        assert EVENT_COLUMNS <= set(events.columns)
        assert (path / "report.md").is_file()
    return summary


def assert_conforms(path: Path) -> None:
    """shared/tools/check_run_dir.py (beside the checkout) says `conforms` — of a run or a compare directory;
    where the checkout has no shared/ beside it, there is nothing to run."""
    if not CHECKER.is_file():
        return
    result = subprocess.run([sys.executable, str(CHECKER), str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "conforms" in result.stdout, result.stdout


def nothing_found(summary: dict) -> bool:
    """A summary that names no numerical cause and no finding: a clean run."""
    return summary["diagnosis"] == summary["findings"] == []
