"""`events` and `check`: questions asked of recorded runs instead of grep over logs.

Both read the append-only .jsonl files, so they work on a finished run, one in progress, one that
crashed (events.jsonl alone is enough for `events`), and a compare-precision directory (every run under
runs/, with a `mode` column). `check` turns named expectations into an exit code for CI.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
from rich import box
from rich.table import Table

from ..contract.config import user_path
from ..contract.errors import BadInput
from ..contract.events import KINDS, SEVERITIES, events_frame
from ..contract.modes import MODE_NAMES
from ..contract.numerics import number_or_none
from ..contract.rundir import (
    COMPARE_OPTIONS,
    causes_and_findings,
    final_figures,
    is_compare_dir,
    load_events,
    load_metrics,
    recorded_run,
    resume_command,
    status_from_logs,
)
from ..contract.rundir import load_run as read_run
from ..contract.wording import counted, did_you_mean, shell_command
from ..contract.writers import holds_open, run_logs, writing_processes
from .terminal import Console

SEVERITY_STYLE = {"info": "dim", "warning": "yellow", "critical": "bold red"}
FORMATS = ("table", "json", "csv")


# ------------------------------------------------------------------------------------------ runs
def is_run_dir(path: Path) -> bool:
    """A sarkd-diag run's directory: its config.json (not a model's, as in its student/) or its events logs."""
    return recorded_run(path) is not None or any(path.glob("events*.jsonl"))


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
        """The run's summary.json; one cut short (a full disk, an edit) or holding no object (`[]`) is refused with
        how to write it again."""
        path = self.path / "summary.json"
        damaged = _invalid_json(path)
        summary = self._json("summary.json") if damaged is None else None
        why = f"is not valid JSON ({damaged})" if damaged else None
        if summary is not None and not isinstance(summary, dict):
            why = f"holds a JSON {type(summary).__name__}, where a run's summary is an object"
        if why:
            raise BadInput(f"{path} {why}: `{shell_command('report', self.path)}` writes it again from the run's logs")
        return summary

    @cached_property
    def events(self) -> pd.DataFrame:
        return load_events(self.path)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return load_metrics(self.path)

    @cached_property
    def final(self) -> dict:
        return final_figures(self.metrics)


def find_runs(path: str | Path) -> list[Run]:
    """The run at `path`, or every run of the compare-precision directory at `path` (in mode order). Only a
    comparison (its compare_options.json) is read as one: a project's runs/ that `train` fills is not (`check .`
    said `ok` of whichever run lay there, where `report .` refused the directory)."""
    path = run_directory(path)
    if is_run_dir(path):
        return [Run(path)]
    if not is_compare_dir(path):
        raise not_a_run(path)
    runs = _comparison_runs(path)
    if not runs:
        asked = requested_modes(path)
        raise BadInput(f"{path} is a compare-precision directory whose modes have not run yet (no run under "
                       f"{path / 'runs'}" + (f"; it asked for {', '.join(asked)}" if asked else "") + ")")
    return [Run(p, p.name) for p in runs]


def _comparison_runs(path: Path) -> list[Path]:
    """The run directories of the compare-precision directory at `path`, in mode order ([] for any other)."""
    if not is_compare_dir(path):
        return []
    order = {mode: i for i, mode in enumerate(MODE_NAMES)}
    return sorted((p for p in (path / "runs").glob("*") if p.is_dir() and is_run_dir(p)),
                  key=lambda p: (order.get(p.name, len(order)), p.name))


def requested_modes(path: Path) -> list[str]:
    """The modes the comparison at `path` was asked for, as its compare_options.json records them ([] where it
    records none, or cannot be read)."""
    try:
        modes = json.loads((path / COMPARE_OPTIONS).read_text(encoding="utf-8")).get("modes")
    except (OSError, ValueError, AttributeError):
        return []
    return [m for m in modes if isinstance(m, str)] if isinstance(modes, list) else []


def modes_not_run(path: Path) -> list[str]:
    """The modes the comparison at `path` asked for that have no run under runs/ (a comparison stopped before
    them): the table compares the others, and `check --expect completed` fails for them."""
    ran = {p.name for p in _comparison_runs(path)}
    return [m for m in requested_modes(path) if m not in ran]


def _invalid_json(path: Path) -> str | None:
    """Why the file at `path` is not JSON (`Expecting value: line 2 column 1`), or None: valid, or no file."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return None
    except ValueError as exc:
        return str(exc)
    return None


def damaged_config(path: Path) -> BadInput | None:
    """The error for a directory whose config.json is a run's, damaged — edited or cut short: not valid JSON, or a
    precision that is no mapping (`"precision": "fp32"`, written by hand as the option is) — None otherwise."""
    config_file = path / "config.json"
    damaged = _invalid_json(config_file)
    if damaged is not None:
        return BadInput(f"{config_file} is not valid JSON ({damaged}): a run directory is read through it; "
                        "restore it whole, or give another directory")
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    if not (isinstance(config, dict) and isinstance(config.get("options"), dict)) or "precision" not in config \
            or isinstance(config["precision"], dict):
        return None
    return BadInput(f"{config_file}: its precision is {config['precision']!r}, where a run records a mapping of "
                    "what ran ({\"mode\": ...}; the option asked for is options.precision); restore it, or give "
                    "another directory")


def report_refusal(path: Path) -> BadInput | None:
    """Why `report` cannot rebuild the directory at `path`, or None when it can (a comparison, or a recorded run):
    what `check` offers to run is what `report` accepts."""
    return None if is_compare_dir(path) or recorded_run(path) is not None else not_a_run(path)


def not_a_run(path: Path) -> BadInput:
    """The error for a directory that is neither a run nor a comparison: it names the run it lies in (a run's
    student/, a comparison's runs/), or the newest of the runs it holds (the `runs/` that `train` fills)."""
    holder = _enclosing_run(path)
    if holder is not None:
        return BadInput(f"{path} is inside the {_what(holder)} {holder}, not one itself: give {holder}")
    held = [p for p in path.iterdir() if p.is_dir() and (is_run_dir(p) or is_compare_dir(p))]
    damaged = damaged_config(path)
    if damaged:  # a run's, edited or cut short: "a model's?" sent its owner looking elsewhere
        return damaged
    if any(path.glob("events*.jsonl")):  # a run's logs: `events` and `check` read them as the run they are
        what = "a config.json that is no run's" if (path / "config.json").is_file() else "no config.json"
        return BadInput(f"{path} holds a run's logs but {what}: closing or loading a run reads its precision and "
                        "options there; copy the run's config.json back beside its logs "
                        f"(`{shell_command('events', path)}` reads the events alone)")
    under_runs = [p for p in (path / "runs").glob("*") if p.is_dir() and (is_run_dir(p) or is_compare_dir(p))]
    if not held and under_runs:  # a project's runs/ of `train` runs: no comparison (it holds no compare_options.json)
        newest = max(under_runs, key=lambda p: (p.stat().st_mtime, p.name))
        n = len(under_runs)
        held_text = counted(n, "run") if all(is_run_dir(p) for p in under_runs) else \
            f"{n} run or comparison director{'y' if n == 1 else 'ies'}"
        return BadInput(f"{path} is not a run or comparison directory; it holds {held_text} "
                        f"under runs/: give one, e.g. {newest} (the newest)")
    if not held:
        what = ("it is empty" if not any(path.iterdir()) else "its config.json is not a run's: a model's?"
                if (path / "config.json").is_file() else "it holds no config.json")
        return BadInput(f"{path} is neither a sarkd-diag run directory nor a compare-precision directory ({what}); "
                        f"give the directory `sarkd-diag train` wrote (its --output-dir, by default "
                        f"runs/<date-time>-<mode>/)")
    newest = max(held, key=lambda p: (p.stat().st_mtime, p.name))
    return BadInput(f"{path} is not a run directory but holds {len(held)}: give one of them, e.g. {newest} "
                    "(the newest)")


def load_run(path: str | Path) -> dict:
    """`sarkd_diag.load_run`: a run's config and summary (dicts), metrics and events (DataFrames), its directory
    checked as the commands check it — a run's student/ (a model's config.json) read as an empty run, and a file
    of the run was 'not a run directory (no config.json)'."""
    path = run_directory(path)
    if is_compare_dir(path):
        runs = _comparison_runs(path)
        raise BadInput(f"{path} is a compare-precision directory: load one of its runs" +
                       (f", e.g. {runs[0]}" if runs else "") + f" (the comparison itself: {path}/comparison.parquet)")
    if recorded_run(path) is None:
        raise not_a_run(path)
    return read_run(path)


def _enclosing_run(path: Path) -> Path | None:
    """The nearest run or comparison directory above `path`, if any."""
    return next((p for p in path.parents if is_run_dir(p) or is_compare_dir(p)), None)


def _what(path: Path) -> str:
    return "run directory" if is_run_dir(path) else "compare-precision directory"


def run_directory(path: str | Path) -> Path:
    """The directory a user named (`~` expanded); a file in a run directory (summary.json, events.jsonl) is pointed
    back to it. An empty path is refused, not read as the current directory (`load_run(os.environ.get("RUN", ""))`
    with RUN unset, as the commands refuse an empty RUN_DIR)."""
    if not str(path).strip():
        raise BadInput(f"an empty run directory ({str(path)!r}: an unset variable?); give the run's directory")
    path = user_path(path)
    if path.is_file():
        holder = _enclosing_run(path)
        if holder is None:
            raise BadInput(f"{path} is a file, not a sarkd-diag run directory")
        raise BadInput(f"{path} is a file; give the {_what(holder)} that holds it: {holder}")
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    return path


# ---------------------------------------------------------------------------------------- events
MODELS = ("student", "teacher", "projection")  # the models sarkd-diag's own runs record events of


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
    if any(b is not None and b < 0 for b in bounds):
        raise BadInput(f"--step {text!r}: steps count from 0 (the evaluation before the first step); a negative step "
                       "is none")
    if None not in bounds and bounds[0] > bounds[1]:
        raise BadInput(f"--step {text!r}: no step is in it ({bounds[0]} is after {bounds[1]}); write A:B with A ≤ B, "
                       f"e.g. {bounds[1]}:{bounds[0]}")
    return bounds[0], bounds[1]


def _regex(text: str | None, option: str, flags: int = 0) -> re.Pattern | None:
    if text is None:
        return None
    try:
        return re.compile(text, flags)
    except re.error as exc:
        raise BadInput(f"{option} {text!r} is not a valid regular expression: {exc}") from None


LISTED_MODULES = 8  # modules named when a --module regex matches none


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

    def __post_init__(self) -> None:  # names are case-insensitive, like --precision
        self.kinds = [k.strip().lower() for item in self.kinds for k in item.split(",") if k.strip()]
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            hint = did_you_mean(unknown[0], KINDS) if len(unknown) == 1 else ""
            raise BadInput(f"--kind {', '.join(unknown)}: not an event kind{hint}; kinds: {', '.join(KINDS)}")
        if self.severity is not None:
            self.severity = self.severity.strip().lower()
            if self.severity not in SEVERITIES:
                raise BadInput(f"--severity {self.severity!r}{did_you_mean(self.severity, SEVERITIES)}: choose one of "
                               f"{', '.join(SEVERITIES)}")
        if self.model is not None:
            self.model = self.model.strip().lower()
        self._step_range = parse_steps(self.steps)
        self._module = _regex(self.module, "--module", re.IGNORECASE)  # a name, as --model is
        self._grep = _regex(self.grep, "--grep")

    def apply(self, events: pd.DataFrame) -> pd.DataFrame:
        keep = pd.Series(True, index=events.index)
        if self.kinds:
            keep &= events["kind"].isin(self.kinds)
        if self.severity:
            keep &= events["severity"].map(SEVERITIES.index) >= SEVERITIES.index(self.severity)
        if self.model:
            keep &= events["model"].fillna("").str.lower() == self.model
        if self.rank is not None:
            keep &= events["rank"] == self.rank
        start, end = self._step_range
        if start is not None:
            keep &= events["step"] >= start
        if end is not None:
            keep &= events["step"] <= end
        if self._module is not None:
            keep &= self._module_matches(events)
        if self._grep is not None:
            keep &= events["message"].fillna("").map(lambda s: bool(self._grep.search(s)))
        return events[keep]


    def _module_matches(self, events: pd.DataFrame) -> pd.Series:
        where = events["module"].fillna("") + " " + events["tensor"].fillna("")
        return where.map(lambda s: bool(self._module.search(s)))

    def unmatched_module(self, events: pd.DataFrame) -> str | None:
        """Why nothing can match a --module regex that no event of the run matches (a typo, another model's naming):
        the modules its events do name, to write it against; None when it matches some event."""
        if self._module is None or self._module_matches(events).any():
            return None
        modules = [m for m in dict.fromkeys(events["module"].dropna()) if m]
        if not modules:
            return f"--module {self.module!r}: no event of this run names a module"
        shown = ", ".join(modules[:LISTED_MODULES]) + \
            (f" and {len(modules) - LISTED_MODULES} more" if len(modules) > LISTED_MODULES else "")
        return f"--module {self.module!r} matches no module; the events name {counted(len(modules), 'module')}: {shown}"

    def past_the_end(self, last_step: int | None) -> str | None:
        """Why nothing can match a --step range that begins after the last step recorded (a run that ended earlier
        than the user thought); None when it does not."""
        start = self._step_range[0]
        if start is None or last_step is None or start <= last_step:
            return None
        return f"--step {self.steps!r} begins after step {last_step}, the last step recorded"

    def check_against(self, events: pd.DataFrame) -> None:
        """--model names a model of these runs (sarkd-diag's own, or one a user's loop recorded events of), --rank
        one of their processes: a name or number they do not have would only print an empty table."""
        if self.model is not None:
            known = list(dict.fromkeys([*MODELS, *(m.lower() for m in events["model"].dropna().unique())]))
            if self.model not in known:
                raise BadInput(f"--model {self.model!r}: not a model of this run; choose one of {', '.join(known)}")
        if self.rank is not None:
            ranks = sorted({0, *(int(r) for r in events["rank"].dropna().unique())})
            if self.rank not in ranks:
                processes = "one process" if ranks == [0] else counted(len(ranks), "process")
                raise BadInput(f"--rank {self.rank}: not a rank of this run ({processes}); choose one of "
                               f"{', '.join(map(str, ranks))}")


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
    flt = flt or EventFilter()
    flt.check_against(frame)
    return flt.apply(frame)


def last_step(path: str | Path) -> int | None:
    """The largest step the run at `path` (or any run of a comparison) recorded, in its metrics or events; None when
    it recorded none."""
    steps = [frame["step"].max() for run in find_runs(path) for frame in (load_metrics(run.path), run.events)
             if len(frame)]
    steps = [int(s) for s in steps if pd.notna(s)]
    return max(steps) if steps else None


def _plain(value):
    """A JSON value programs can read: NaN → null, ±Inf → "inf"/"-inf", numpy scalars → Python."""
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, float):
        return value
    value = number_or_none(value)  # the project's missing value: None
    return "inf" if value == math.inf else "-inf" if value == -math.inf else value


def _records(events: pd.DataFrame) -> list[dict]:
    events = events.astype(object).where(events.notna(), None)
    return [{k: _plain(v) for k, v in row.items()} for row in events.to_dict("records")]


def _where(row) -> str:
    """`model/module` (or tensor), a part said once: an optimizer group named like its model is `student`."""
    parts: list[str] = []
    for part in (row.get("model"), row.get("module") or row.get("tensor")):
        if part and str(part) not in parts:
            parts.append(str(part))
    return "/".join(parts)


def fold_identifier(text: str, width: int) -> str:
    """A dotted name in lines of at most `width`, broken only after a `.` or `/` (a segment longer than a line is
    the one thing cut), so `transformer.h.0.mlp.c_fc.bias` never loses the `bias` that says which tensor."""
    if width <= 0 or len(text) <= width:
        return text
    lines, line = [], ""
    for segment in re.findall(r"[^./]+[./]?|[./]", text):
        if line and len(line) + len(segment) > width:
            lines.append(line)
            line = ""
        while len(segment) > width:
            lines.append(segment[:width])
            segment = segment[width:]
        line += segment
    return "\n".join(lines + ([line] if line else []))


MESSAGE_MIN_WIDTH = 24


def events_table(events: pd.DataFrame, title: str | None = None, width: int = 80) -> Table:
    """Events for a person: one row each (where under the kind), coloured by severity.

    Made for `width` columns: the kind / where column takes what its longest name needs and the message the
    rest; where that does not fit, names are folded at their dots, never mid-identifier.
    """
    records = _records(events)
    table = Table(title=title, box=box.SIMPLE_HEAD)
    with_mode = "mode" in events
    if with_mode:
        table.add_column("mode", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    fixed = [max([len("mode")] + [len(str(r.get("mode"))) for r in records])] if with_mode else []
    fixed += [max([4] + [len(str(r["step"])) for r in records]), len("severity")]
    columns = len(fixed) + 2
    padding = 2 * columns + columns + 1  # one space each side of every column, and the box's edges and dividers
    longest = max([len("kind / where")] + [max(len(r["kind"]), len(_where(r))) for r in records])
    where_width = max(16, min(longest, width - sum(fixed) - padding - MESSAGE_MIN_WIDTH))
    table.add_column("kind / where", no_wrap=True, width=where_width)
    table.add_column("message", ratio=1, overflow="fold")  # no minimum: one rich could not meet was cropped away
    for row in records:
        where = fold_identifier(_where(row), where_width)
        table.add_row(*([row["mode"]] if with_mode else []), str(row["step"]), row["severity"],
                      fold_identifier(row["kind"], where_width) + (f"\n[dim]{where}[/]" if where else ""),
                      row["message"] or "", style=SEVERITY_STYLE.get(row["severity"]))
    return table


def print_events(events: pd.DataFrame, fmt: str, total: int, console: Console | None = None,
                 why_none: str | None = None) -> None:
    """All matching events at once: a rich table (with a count), one JSON array, or CSV. An empty table is one line,
    with `why_none` when a filter is known to match nothing."""
    if fmt == "json":
        sys.stdout.write(json.dumps(_records(events), indent=1, allow_nan=False) + "\n")
    elif fmt == "csv":
        events.to_csv(sys.stdout, index=False)
    else:
        console = console or Console()
        if not len(events):  # one line, not a table of headers over nothing
            console.print((f"no event matches these filters (of {counted(total, 'event')} recorded)" if total
                           else "this run recorded no events") + (f": {why_none}" if why_none else ""))
            return
        console.print(events_table(events, title=f"{len(events)} of {counted(total, 'event')}", width=console.width))


def _line(row: dict) -> str:
    where = _where(row)
    mode = f"[{row['mode']}] " if row.get("mode") else ""
    style = SEVERITY_STYLE.get(row["severity"], "")
    return (f"{mode}step {row['step']} [{style}]{row['severity']}[/] {row['kind']}"
            + (f" {where}" if where else "") + f": {row['message']}")


DEAD_AFTER_S = 10.0  # no write for this long and no process holding the run's logs open: the run is dead


class RunEnded(Exception):
    """--follow stopped because the run died without closing (killed): the message says what is known."""


def follow_events(path: str | Path, flt: EventFilter, fmt: str, console: Console | None = None,
                  poll_s: float = 0.5, idle_timeout: float | None = None, dead_after_s: float = DEAD_AFTER_S) -> None:
    """Print the events a run (or a comparison) holds, then those it appends, until it is closed or Ctrl-C.

    A run is closed when its summary.json is newer than every events file (a resumed run appends after
    its old summary, so it keeps being followed); a comparison when its own summary.json is written.
    A run killed with `kill -9` never closes: following ends (RunEnded) once nothing in the directory has
    changed for `dead_after_s` and no process on this machine holds its logs open (a live run keeps its
    events file open; read from /proc). Where that cannot be known (no /proc, a run on another machine
    writing to a shared disk), `idle_timeout` seconds without a write end it.
    """
    path = run_directory(path)
    console = console or Console(highlight=False)
    offsets: dict[Path, int] = {}
    header = fmt == "csv"
    next_check = 0.0
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
                        console.print(_line(row), soft_wrap=True)  # one event, one line, as grep reads it
                sys.stdout.flush()
            if closed:
                return
            idle = time.time() - _last_write(path)
            if idle >= dead_after_s and time.monotonic() >= next_check:
                next_check = time.monotonic() + dead_after_s  # /proc is read at most this often
                held = holds_open(_log_files(path))
                if held is False:
                    report = shell_command("report", path)
                    raise RunEnded(f"{path}: {_not_closed(path)}, nothing in it has changed for {idle:.0f} s and no "
                                   f"process holds its logs open: {_how_it_ended(path)}; `{report}` closes it")
                if held is None and idle_timeout is not None and idle >= idle_timeout:
                    raise RunEnded(f"{path}: nothing written for {idle:.0f} s (--idle-timeout) and "
                                   f"{_not_closed(path)}; stopped following")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return


def _how_it_ended(path: Path) -> str:
    """The end of a run that is no longer written and was not closed, as its logs prove it: the one it recorded
    deciding (a second Ctrl-C: interrupted), else dead — killed, or a comparison whose process was."""
    if is_compare_dir(path):
        return "the comparison is dead (killed?)"
    run = read_run(path)
    ended = status_from_logs(path, run["config"], run["metrics"], run["events"])
    return "the run is dead (killed?)" if ended == "crashed" else \
        f"the run ended {ended}, its logs say, and was not closed"


def _log_files(path: Path) -> list[Path]:
    """The files a live run (or comparison) holds open: its events logs, and a comparison's per-mode logs."""
    return [f for _, f in _event_files(path)] + sorted(path.glob("logs/*.log")) + sorted(path.glob("metrics.jsonl"))


def _last_write(path: Path) -> float:
    """When anything in the run (or comparison) directory last changed, as a time.time()."""
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):  # checkpoints and student/ included: a run writes them while closing
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:  # removed meanwhile (a checkpoint rotated away)
                continue
    return newest


def refuse_while_written(path: Path) -> None:
    """Refuse to close a run (or comparison) that another process is still writing: `report` would declare a live
    run crashed, and `--follow` and `check` would then read it as closed."""
    pids = writing_processes(_log_files(path))
    if pids:
        raise BadInput(f"{path} is still being written by process {', '.join(map(str, pids))}: "
                       f"`{shell_command('events', path, '--follow')}` shows it as it goes; report it once that "
                       "process has ended (a notebook whose loop stopped: close its probes first)")


def _event_files(path: Path) -> Iterator[tuple[str | None, Path]]:
    if is_run_dir(path):
        yield from ((None, f) for f in sorted(path.glob("events*.jsonl")))
    else:
        yield from ((f.parent.name, f) for f in sorted(path.glob("runs/*/events*.jsonl")))


def _not_closed(path: Path) -> str:
    """Why `_closed` says no, in words: a summary.json older than the events is not the same as none."""
    if not (path / "summary.json").is_file():
        return "no summary.json"
    return ("its summary.json is older than its events (written before a later run appended to them, or the "
            "directory was copied without its files' times)")


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
        return "no config.json, which records how the run held its weights"
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
    message = " ".join(str(row["message"]).split())  # `check` says one line per failed expectation
    return f"first at step {row['step']}" + (f" in {where}" if where else "") + f": {message}"


def _no_nonfinite_params(run: Run) -> str | None:
    bad = run.events[run.events["kind"] == "nonfinite_param"]
    return f"{counted(len(bad), 'nonfinite_param event')}, {_first(bad)}" if len(bad) else None


def _no_critical(run: Run) -> str | None:
    bad = run.events[run.events["severity"] == "critical"]
    causes = [d["cause"] for d in causes_and_findings(run.summary or {}) if d.get("severity") == "critical"]
    if not len(bad) and not causes:
        return None
    counts = ", ".join(f"{k} {n}" for k, n in bad["kind"].value_counts().items())
    parts = [f"{counted(len(bad), 'critical event')} ({counts}), {_first(bad)}"] if len(bad) else []
    if causes:
        parts.append(f"critical diagnosis: {', '.join(causes)}")
    return "; ".join(parts)


def _completed(run: Run) -> str | None:
    if run.summary is None:
        writers = writing_processes(run_logs(run.path))
        if writers:  # `report` would refuse it: say what is known instead of offering it
            return f"no summary.json yet: the run is still training (process {', '.join(map(str, writers))} writes it)"
        refused = report_refusal(run.path)
        if refused:  # offering `report` sent the user to a command that refuses the directory
            return f"no summary.json, and `sarkd-diag report` cannot write one: {refused}"
        ended = status_from_logs(run.path, run.config, run.metrics, run.events)
        report = shell_command("report", run.path)
        if ended != "crashed":
            return f"no summary.json, though its logs show how the run ended: {ended} (`{report}` writes it)"
        return f"no summary.json: the run is still running, or it crashed (`{report}` closes it)"
    status = run.summary.get("status")
    if status == "completed":
        return None
    resume = resume_command(run.path) if status in ("interrupted", "crashed") else None
    return f"status is {status}" + (f"; `{resume}` continues it" if resume else "")


EXPECTATIONS: dict[str, Callable[[Run], str | None]] = {
    "master-fp32": _master_fp32,
    "no-nonfinite-params": _no_nonfinite_params,
    "no-critical": _no_critical,
    "completed": _completed,
}


def _max_skipped(limit: int) -> Callable[[Run], str | None]:
    def check(run: Run) -> str | None:
        skipped = run.final["skipped_steps"]
        return f"{counted(skipped, 'skipped step')} > {limit}" if skipped > limit else None
    return check


def _max_eval_ppl(limit: float) -> Callable[[Run], str | None]:
    def check(run: Run) -> str | None:
        ppl = run.final["eval_ppl"]
        if ppl is None:
            return "no evaluation was recorded"
        splits = run.metrics["split"]
        if (splits == "train").any() and not (run.metrics["step"][splits == "eval"] > 0).any():
            return (f"no evaluation after step 0: its one perplexity, {ppl:.4g} at step 0, is the student's before "
                    "training (the run ended before it evaluated again)")
        if math.isnan(ppl):
            return "final eval perplexity is NaN: the last evaluation computed a NaN loss"
        return None if ppl <= limit else f"final eval perplexity {ppl:.4g} > {limit:g}"
    return check


def expectations(expect: list[str], max_skipped_steps: int | None = None,
                 max_eval_ppl: float | None = None) -> dict[str, Callable[[Run], str | None]]:
    """Named checks from `--expect NAME` (repeatable, or comma-separated) and the numeric limits."""
    names = [n.strip().lower() for item in expect for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPECTATIONS]
    if unknown:
        hint = did_you_mean(unknown[0], EXPECTATIONS) if len(unknown) == 1 else ""
        raise BadInput(f"--expect {', '.join(unknown)}: unknown{hint}; expectations: {', '.join(EXPECTATIONS)}")
    checks = {name: EXPECTATIONS[name] for name in names}
    if max_skipped_steps is not None:
        if max_skipped_steps < 0:
            raise BadInput(f"--max-skipped-steps must be ≥ 0, got {max_skipped_steps}")
        checks["max-skipped-steps"] = _max_skipped(max_skipped_steps)
    if max_eval_ppl is not None:
        if not 0 < max_eval_ppl < math.inf:  # inf would pass every run, a diverged one's infinite perplexity too
            raise BadInput(f"--max-eval-ppl must be a finite number > 0, got {max_eval_ppl}")
        checks["max-eval-ppl"] = _max_eval_ppl(max_eval_ppl)
    if not checks:
        raise BadInput("give at least one expectation: --expect " + "|".join(EXPECTATIONS)
                       + ", --max-skipped-steps N or --max-eval-ppl X")
    return checks


def check_runs(path: str | Path, checks: dict[str, Callable[[Run], str | None]]) -> tuple[list[str], int]:
    """Every check on every run at `path`: the failure lines (`RUN: NAME: why`) and how many runs were checked. Of a
    comparison, `completed` fails too for each mode it asked for that has no run (it was stopped before them)."""
    path = run_directory(path)
    runs = find_runs(path)
    damaged = next(filter(None, (damaged_config(run.path) for run in runs)), None)
    if damaged:  # the checks read a run through its config.json, as `report` does: refused in report's words
        raise damaged
    failures = [f"{run.label}: {name}: {why}" for run in runs for name, check in checks.items()
                if (why := check(run)) is not None]
    if "completed" in checks and is_compare_dir(path):  # a mode the comparison asked for and never ran
        asked = requested_modes(path)
        for mode in modes_not_run(path):
            failures.append(f"{mode}: completed: did not run — the comparison asked for {', '.join(asked)}, and "
                            f"{path / 'runs' / mode} holds no run (the comparison was stopped before it?)")
    return failures, len(runs)
