"""`events` and `check`: questions asked of recorded runs instead of grep over logs.

Both read the append-only .jsonl files, so they work on a finished run, one in progress, one that
crashed (events.jsonl alone is enough for `events`), and a compare-precision directory (every run under
runs/, with a `mode` column). `check` turns named expectations into an exit code for CI.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from .errors import BadInput
from .events import KINDS, SEVERITIES, events_frame
from .precision import MODES
from .rundir import final_figures, load_events, load_metrics

SEVERITY_STYLE = {"info": "dim", "warning": "yellow", "critical": "bold red"}
FORMATS = ("table", "json", "csv")


# ------------------------------------------------------------------------------------------ runs
def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or any(path.glob("events*.jsonl"))


@dataclass
class Run:
    """One run directory, its files read on first use; `mode` is set for the runs of a comparison."""

    path: Path
    mode: str | None = None

    @property
    def label(self) -> str:
        return self.mode or str(self.path)

    def _json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    @cached_property
    def config(self) -> dict | None:
        return self._json("config.json")

    @cached_property
    def summary(self) -> dict | None:
        return self._json("summary.json")

    @cached_property
    def events(self) -> pd.DataFrame:
        return load_events(self.path)

    @cached_property
    def final(self) -> dict:
        return final_figures(load_metrics(self.path))


def find_runs(path: str | Path) -> list[Run]:
    """The run at `path`, or every run of the compare-precision directory at `path` (in mode order)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    if is_run_dir(path):
        return [Run(path)]
    order = {mode: i for i, mode in enumerate(MODES)}
    runs = sorted((p for p in (path / "runs").glob("*") if p.is_dir() and is_run_dir(p)),
                  key=lambda p: (order.get(p.name, len(order)), p.name))
    if not runs:
        raise BadInput(f"{path} is neither a sarkd-diag run directory nor a compare-precision directory")
    return [Run(p, p.name) for p in runs]


# ---------------------------------------------------------------------------------------- events
def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """`A:B` inclusive, either end open (`5:`, `:20`); a single number is that step alone."""
    if not text:
        return None, None
    start, sep, end = text.partition(":")
    try:
        bounds = [int(v) if v.strip() else None for v in ((start, end) if sep else (start, start))]
    except ValueError:
        raise BadInput(f"--step {text!r}: expected A:B (inclusive; either end may be left out), e.g. 10:20") \
            from None
    return bounds[0], bounds[1]


def _regex(text: str | None, option: str) -> re.Pattern | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise BadInput(f"{option} {text!r} is not a valid regular expression: {exc}") from None


@dataclass
class EventFilter:
    """Which events to show: kinds, a severity and above, a model, a rank, module and message regexes, a step
    range."""

    kinds: list[str] = field(default_factory=list)
    severity: str | None = None
    model: str | None = None
    rank: int | None = None
    module: str | None = None
    steps: str | None = None
    grep: str | None = None

    def __post_init__(self) -> None:
        self.kinds = [k.strip() for item in self.kinds for k in item.split(",") if k.strip()]
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise BadInput(f"--kind {', '.join(unknown)}: not an event kind; kinds: {', '.join(KINDS)}")
        if self.severity is not None and self.severity not in SEVERITIES:
            raise BadInput(f"--severity {self.severity!r}: choose one of {', '.join(SEVERITIES)}")
        self._step_range = parse_steps(self.steps)
        self._module = _regex(self.module, "--module")
        self._grep = _regex(self.grep, "--grep")

    def apply(self, events: pd.DataFrame) -> pd.DataFrame:
        keep = pd.Series(True, index=events.index)
        if self.kinds:
            keep &= events["kind"].isin(self.kinds)
        if self.severity:
            keep &= events["severity"].map(SEVERITIES.index) >= SEVERITIES.index(self.severity)
        if self.model:
            keep &= events["model"] == self.model
        if self.rank is not None:
            keep &= events["rank"] == self.rank
        start, end = self._step_range
        if start is not None:
            keep &= events["step"] >= start
        if end is not None:
            keep &= events["step"] <= end
        if self._module is not None:
            where = events["module"].fillna("") + " " + events["tensor"].fillna("")
            keep &= where.map(lambda s: bool(self._module.search(s)))
        if self._grep is not None:
            keep &= events["message"].fillna("").map(lambda s: bool(self._grep.search(s)))
        return events[keep]


def query_events(path: str | Path, flt: EventFilter | None = None) -> pd.DataFrame:
    """The events of a run (or of every run of a comparison, with a `mode` column) that pass `flt`."""
    runs = find_runs(path)
    frames = []
    for run in runs:
        events = run.events
        if run.mode is not None:
            events = events.assign(mode=run.mode)
        frames.append(events)
    frame = pd.concat(frames, ignore_index=True) if frames else events_frame([])
    return (flt or EventFilter()).apply(frame)


def _plain(value):
    """A JSON value programs can read: NaN → null, ±Inf → "inf"/"-inf", numpy scalars → Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _records(events: pd.DataFrame) -> list[dict]:
    events = events.astype(object).where(events.notna(), None)
    return [{k: _plain(v) for k, v in row.items()} for row in events.to_dict("records")]


def _where(row) -> str:
    return "/".join(str(x) for x in (row.get("model"), row.get("module") or row.get("tensor")) if x)


def events_table(events: pd.DataFrame, title: str | None = None) -> Table:
    """Events for a person: one row each (where under the kind), coloured by severity."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    if "mode" in events:
        table.add_column("mode", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("severity", no_wrap=True)
    table.add_column("kind / where", max_width=44, overflow="fold")
    table.add_column("message", ratio=1, min_width=20)
    for row in _records(events):
        where = _where(row)
        table.add_row(*([row["mode"]] if "mode" in row else []), str(row["step"]), row["severity"],
                      row["kind"] + (f"\n[dim]{where}[/]" if where else ""), row["message"] or "",
                      style=SEVERITY_STYLE.get(row["severity"]))
    return table


def print_events(events: pd.DataFrame, fmt: str, total: int, console: Console | None = None) -> None:
    """All matching events at once: a rich table (with a count), one JSON array, or CSV."""
    if fmt == "json":
        sys.stdout.write(json.dumps(_records(events), indent=1, allow_nan=False) + "\n")
    elif fmt == "csv":
        events.to_csv(sys.stdout, index=False)
    else:
        console = console or Console()
        console.print(events_table(events, title=f"{len(events)} of {total} events"))


def _line(row: dict) -> str:
    where = _where(row)
    mode = f"[{row['mode']}] " if row.get("mode") else ""
    style = SEVERITY_STYLE.get(row["severity"], "")
    return (f"{mode}step {row['step']} [{style}]{row['severity']}[/] {row['kind']}"
            + (f" {where}" if where else "") + f": {row['message']}")


def follow_events(path: str | Path, flt: EventFilter, fmt: str, console: Console | None = None,
                  poll_s: float = 0.5) -> None:
    """Print matching events as a run (or a comparison) appends them, until it is closed or Ctrl-C.

    A run is closed when its summary.json is newer than every events file (a resumed run appends after
    its old summary, so it keeps being followed); a comparison when its own summary.json is written.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    console = console or Console(highlight=False)
    offsets: dict[Path, int] = {}
    header = fmt == "csv"
    try:
        while True:
            closed = _closed(path)  # decided before reading, so lines written just before closing are read
            for mode, rows in _new_rows(path, offsets):
                frame = events_frame(rows)
                if mode is not None:
                    frame = frame.assign(mode=mode)
                for row in _records(flt.apply(frame)):
                    if fmt == "json":
                        sys.stdout.write(json.dumps(row, allow_nan=False) + "\n")
                    elif fmt == "csv":
                        pd.DataFrame([row]).to_csv(sys.stdout, index=False, header=header)
                        header = False
                    else:
                        console.print(_line(row))
                sys.stdout.flush()
            if closed:
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return


def _event_files(path: Path) -> Iterator[tuple[str | None, Path]]:
    if is_run_dir(path):
        yield from ((None, f) for f in sorted(path.glob("events*.jsonl")))
    else:
        yield from ((f.parent.name, f) for f in sorted(path.glob("runs/*/events*.jsonl")))


def _closed(path: Path) -> bool:
    summary = path / "summary.json"
    if not summary.is_file():
        return False
    newest = max((f.stat().st_mtime for _, f in _event_files(path)), default=0.0)
    return summary.stat().st_mtime >= newest


def _new_rows(path: Path, offsets: dict[Path, int]) -> Iterator[tuple[str | None, list[dict]]]:
    """Complete lines appended to each events file since the last call (a half-written line waits)."""
    for mode, file in _event_files(path):
        with open(file, "rb") as f:
            f.seek(offsets.get(file, 0))
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        offsets[file] = offsets.get(file, 0) + len(complete)
        rows = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
        if rows:
            yield mode, rows


# ----------------------------------------------------------------------------------------- check
def _master_fp32(run: Run) -> str | None:
    if run.config is None:
        return "no config.json: the run did not record how its weights were held"
    dtypes = (run.config.get("precision") or {}).get("param_dtypes")
    if isinstance(dtypes, list):  # a run recorded by Probes in a user's loop: the watched weights' dtypes
        dtypes = {"watched": {"trainable": {d: 0 for d in dtypes}}}
    trainable = {(model, dtype): n for model, roles in (dtypes or {}).items()
                 for dtype, n in (roles.get("trainable") or {}).items()}
    if not trainable:
        return "no trainable parameters were recorded"
    low = [f"{model}: {n:,} in {dtype}" if n else f"{model}: {dtype}"
           for (model, dtype), n in trainable.items() if dtype != "float32"]
    if low:
        return "trainable parameters held without fp32 master weights: " + ", ".join(low)
    return None


def _first(events: pd.DataFrame) -> str:
    row = _records(events.head(1))[0]
    where = _where(row)
    return f"first at step {row['step']}" + (f" in {where}" if where else "") + f": {row['message']}"


def _no_nonfinite_params(run: Run) -> str | None:
    bad = run.events[run.events["kind"] == "nonfinite_param"]
    return f"{len(bad)} nonfinite_param event(s), {_first(bad)}" if len(bad) else None


def _no_critical(run: Run) -> str | None:
    bad = run.events[run.events["severity"] == "critical"]
    causes = [d["cause"] for d in (run.summary or {}).get("diagnosis", []) if d.get("severity") == "critical"]
    if not len(bad) and not causes:
        return None
    counts = ", ".join(f"{k} {n}" for k, n in bad["kind"].value_counts().items())
    parts = [f"{len(bad)} critical event(s) ({counts}), {_first(bad)}"] if len(bad) else []
    if causes:
        parts.append(f"critical diagnosis: {', '.join(causes)}")
    return "; ".join(parts)


def _completed(run: Run) -> str | None:
    status = (run.summary or {}).get("status", "no summary.json (crashed?)")
    return None if status == "completed" else f"status is {status}"


EXPECTATIONS: dict[str, Callable[[Run], str | None]] = {
    "master-fp32": _master_fp32,
    "no-nonfinite-params": _no_nonfinite_params,
    "no-critical": _no_critical,
    "completed": _completed,
}


def _max_skipped(limit: int) -> Callable[[Run], str | None]:
    def check(run: Run) -> str | None:
        skipped = run.final["skipped_steps"]
        return f"{skipped} skipped steps > {limit}" if skipped > limit else None
    return check


def _max_eval_ppl(limit: float) -> Callable[[Run], str | None]:
    def check(run: Run) -> str | None:
        ppl = run.final["eval_ppl"]
        if ppl is None:
            return "no evaluation was recorded"
        return None if ppl <= limit else f"final eval perplexity {ppl:.4g} > {limit:g}"
    return check


def expectations(expect: list[str], max_skipped_steps: int | None = None,
                 max_eval_ppl: float | None = None) -> dict[str, Callable[[Run], str | None]]:
    """Named checks from `--expect NAME` (repeatable, or comma-separated) and the numeric limits."""
    names = [n.strip() for item in expect for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPECTATIONS]
    if unknown:
        raise BadInput(f"--expect {', '.join(unknown)}: unknown; expectations: {', '.join(EXPECTATIONS)}")
    checks = {name: EXPECTATIONS[name] for name in names}
    if max_skipped_steps is not None:
        if max_skipped_steps < 0:
            raise BadInput(f"--max-skipped-steps must be ≥ 0, got {max_skipped_steps}")
        checks["max-skipped-steps"] = _max_skipped(max_skipped_steps)
    if max_eval_ppl is not None:
        if not max_eval_ppl > 0:
            raise BadInput(f"--max-eval-ppl must be > 0, got {max_eval_ppl}")
        checks["max-eval-ppl"] = _max_eval_ppl(max_eval_ppl)
    if not checks:
        raise BadInput("give at least one expectation: --expect " + "|".join(EXPECTATIONS)
                       + ", --max-skipped-steps N or --max-eval-ppl X")
    return checks


def check_runs(path: str | Path, checks: dict[str, Callable[[Run], str | None]]) -> tuple[list[str], int]:
    """Every check on every run at `path`: the failure lines (`RUN: NAME: why`) and how many runs were checked."""
    runs = find_runs(path)
    failures = [f"{run.label}: {name}: {why}" for run in runs for name, check in checks.items()
                if (why := check(run)) is not None]
    return failures, len(runs)
