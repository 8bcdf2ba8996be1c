"""compare-precision: the same run in several precision modes, side by side, with a verdict per mode.

Every mode trains in its own process (`python -m sarkd_diag train ... --precision MODE --on-nonfinite
continue`) from the same options — so the same initial weights, data order and seed — and writes a full
run directory under OUT/runs/MODE/. A process per mode keeps peak memory apart (the CPU's peak resident
set, or CUDA's max_memory_allocated, of that process alone) and means a mode that crashes is recorded
as `failed (reason)` while the others still run. The table is read back from each run's summary.json and
events; verdicts and the recommendation across them come from analysis/verdicts.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from rich.markup import escape

from .analysis.verdicts import THRESHOLDS, Recommendation, Verdict, recommend, verdict
from .contract.config import COMPARE_DEFAULTS, SET_BY_COMPARE, DistillConfig, refuse_unknown_options
from .contract.errors import BadInput
from .contract.modes import MODE_NAMES, MODEL_DTYPE_FAMILY, detect_capabilities, parse_modes, resolve_mode
from .contract.numerics import number_or_none
from .contract.rundir import (
    COMPARE_OPTIONS,
    SCHEMA_VERSION,
    built_then_moved,
    causes_and_findings,
    default_run_dir,
    is_compare_dir,
    load_events,
    load_metrics,
    recorded_run,
    remove_abandoned,
    scaler_warmup_skips,
    write_json_atomic,
)
from .contract.rundir import COMPARISON_COLUMNS as COLUMNS
from .contract.wording import counted, shell_command
from .contract.writers import run_logs, writing_processes
from .presentation.closing import finalize_run
from .presentation.report import rich_table
from .presentation.terminal import Console

MAX_FAILURE_CHARS = 200  # a failed mode's reason, as its table row and summary.json hold it
INTERRUPT_GRACE_S = 60  # how long an interrupted mode may take to save its state before it is killed
REFUSED_MESSAGES = {  # why each option of SET_BY_COMPARE cannot be given here
    "precision": "compare-precision sets --precision itself, one mode per run: choose the modes with --modes "
                 "(e.g. `--modes fp32,mixed`)",
    "on_nonfinite": "compare-precision runs every mode with `--on-nonfinite continue`, so each mode's failure is "
                    "recorded rather than acted on; --on-nonfinite cannot be changed here",
    "resume": "compare-precision cannot --resume: every mode starts from the same initial weights; to continue "
              "one mode's run, `sarkd-diag train --output-dir OUT/runs/MODE --resume`, then `sarkd-diag report OUT`",
    "resume_from": "compare-precision cannot --resume-from: every mode starts from the same initial weights; to "
                   "continue one mode's run, `sarkd-diag train --resume-from CHECKPOINT`",
}
OUTPUTS = ("comparison.csv", "comparison.parquet", "comparison.md", "comparison.html", "loss_curves.png",
           "loss_scale.png", "report.html", "summary.json")


@dataclass
class ModeRun:
    """What happened to one mode's process: its run directory, exit code, wall time, if it failed, why, and the share
    of the machine's CPU time other processes took meanwhile (None where /proc/stat cannot tell)."""

    mode: str
    run_dir: Path
    returncode: int
    seconds: float
    failure: str | None = None
    other_load: float | None = None


class CpuTime:
    """The share of this machine's CPU time that processes other than the comparison's took over a stretch of wall
    time: the modes run one after another, so a load that comes and goes between them moves their tokens/s (fp32
    at 671 tokens/s beside a test suite, 11,251 alone). Linux's /proc/stat counts every process's time; the
    comparison's own — its finished child, the mode's run — is subtracted."""

    def __init__(self):
        self.start = self._readings()

    @staticmethod
    def _readings() -> tuple[float, float, float] | None:
        try:
            import resource  # POSIX only, as /proc/stat is Linux only

            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
            ticks = os.sysconf("SC_CLK_TCK")
        except (ImportError, OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
        usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        own = sum(u.ru_utime + u.ru_stime for u in usage)
        return (user + nice + system + irq + softirq + steal) / ticks, own, time.monotonic()

    def others_share(self) -> float | None:
        end = self._readings()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))


@dataclass
class CompareResult:
    """The comparison: its directory, the table (as comparison.csv/.parquet hold it, verdicts as text), the
    summary, the exit code, each mode's verdict as a value, in the table's order, and the recommendation."""

    output_dir: Path
    table: pd.DataFrame
    summary: dict
    exit_code: int = 0
    verdicts: list[Verdict] = field(default_factory=list)
    recommendation: Recommendation | None = None


def resolve_modes(requested: Sequence[str] | str | None, model_dtype: str | None, caps) -> list[str]:
    """Canonical mode names in the order given (comma-separated allowed); by default every mode the device
    runs (within --model-dtype's family when given). A mode the device cannot run is bad input."""
    modes = parse_modes(requested)
    if not modes:
        family = MODEL_DTYPE_FAMILY.get(model_dtype, tuple(MODE_NAMES))
        return [m for m in MODE_NAMES if m in caps.runnable_modes and m in family]
    for mode in modes:
        try:
            resolve_mode(mode, model_dtype, caps)  # raises for a mode the device cannot run or a --model-dtype clash
        except BadInput as exc:  # train/precision.py speaks of --precision: here the user typed --modes
            text = str(exc).replace("--precision ", "--modes ")
            raise BadInput(text if "--modes" in text else f"--modes {mode}: {text}") from None
    return modes


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a directory holding something else, even with --overwrite: clearing a comparison deletes its runs/,
    and a project's own runs/ of `train` runs, or a run's summary.json and report, are no comparison's to replace.
    With --overwrite, clear a previous comparison's outputs (it is one when it holds compare_options.json)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--output-dir {out} is a file, not a directory")
    previous = out.is_dir() and is_compare_dir(out)
    if previous and not overwrite:
        raise BadInput(f"--output-dir {out} holds a comparison already; pass --overwrite to replace it, another "
                       f"--output-dir for a new one, or `{shell_command('report', out)}` to rebuild its table from the "
                       "modes that ran")
    if out.is_dir() and not previous and any(out.iterdir()):
        what = "holds a `train` run" if recorded_run(out) is not None else "is not empty and holds no comparison"
        raise BadInput(f"--output-dir {out} {what}; choose another directory (--overwrite only replaces a "
                       "comparison)")
    if previous:
        _refuse_while_running(out)
        _clear_comparison(out)
    out.mkdir(parents=True, exist_ok=True)


def _clear_comparison(out: Path) -> None:
    """Remove what a comparison writes into `out` (a killed closing's leftovers too), and nothing else."""
    remove_abandoned(out)
    shutil.rmtree(out / "runs", ignore_errors=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    for name in (*OUTPUTS, COMPARE_OPTIONS):
        (out / name).unlink(missing_ok=True)


def _take_back(out: Path, made: list[Path]) -> None:
    """Undo a comparison that no mode ran in: its files go, and the directories it made (deepest first; one that
    holds anything else stays), so the same command, its input fixed, runs again (it said `holds a comparison
    already; pass --overwrite`)."""
    _clear_comparison(out)
    with contextlib.suppress(OSError):  # rmdir removes only an empty directory
        for directory in made:
            directory.rmdir()


def _refuse_while_running(out: Path) -> None:
    """A comparison whose logs another process still writes is not cleared: its running modes would lose their
    runs under them."""
    writers = writing_processes([*out.glob("logs/*.log"), *(f for run in out.glob("runs/*") for f in run_logs(run))])
    if writers:
        raise BadInput(f"--output-dir {out} is still being written by process {', '.join(map(str, writers))}, a "
                       "comparison running now: let it end (or stop it with Ctrl-C) first, or give another "
                       "--output-dir")


def _train_command(mode: str, config_file: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sarkd_diag", "train", "--config", str(config_file), "--precision", mode,
            "--on-nonfinite", "continue", "--output-dir", str(run_dir)]


def _last_error_line(log: Path) -> str:
    """The mode's last error line, without the program's `sarkd-diag: error:` (the comparison's own line says it)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or ["no output"])[-1]
    return text.removeprefix("sarkd-diag: ").removeprefix("error: ")


def run_mode(mode: str, config_file: Path, out: Path) -> ModeRun:
    """Train one mode in its own process; a run whose process died is closed as its logs show, and recorded."""
    run_dir, log = out / "runs" / mode, out / "logs" / f"{mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), CpuTime()
    with open(log, "w", encoding="utf-8") as f:
        process = subprocess.Popen(_train_command(mode, config_file, run_dir), stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the run too: let it save its state and close, then stop
            try:
                process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    seconds, other_load = time.perf_counter() - started, cpu.others_share()
    if code == 2:  # the same options go to every mode, so bad input would fail them all: stop here
        raise BadInput(f"{mode}: {_last_error_line(log)}")
    failure = None
    if code < 0:
        failure = f"killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    elif code not in (0, 1):
        failure = f"exit {code}: {textwrap.shorten(_last_error_line(log), MAX_FAILURE_CHARS, placeholder=' …')}"
    if (run_dir / "config.json").is_file() and not (run_dir / "summary.json").is_file():
        finalize_run(run_dir)  # what `sarkd-diag report` does for a run that died: the status its logs prove
    if failure is None and not (run_dir / "summary.json").is_file():
        failure = "no summary.json was written"
    return ModeRun(mode, run_dir, code, seconds, failure, other_load)


def _figure(value) -> float:
    """A figure of the table: NaN where nothing was measured (the table's, and pandas', missing value)."""
    number = number_or_none(value)
    return math.nan if number is None else number


def comparison_row(result: ModeRun) -> tuple[dict, list[str], str | None, str | None]:
    """One mode's row (without verdict and drift, which need the other modes), its cause codes, its
    failure, if any (the process failed, or the run closed as failed or crashed), and its root cause's fix."""
    summary_path = result.run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    final = summary.get("final") or {}
    events = load_events(result.run_dir) if result.run_dir.is_dir() else None
    params = events[events["kind"] == "nonfinite_param"] if events is not None else pd.DataFrame({"step": []})
    warmup = scaler_warmup_skips(load_metrics(result.run_dir), events) if events is not None else 0
    diagnosis = causes_and_findings(summary)
    causes = [d["cause"] for d in diagnosis]
    status = summary.get("status")
    failure = result.failure or (f"run {status}" if status in ("failed", "crashed") else None)
    row = {
        "mode": result.mode,
        "top_cause": causes[0] if causes else None,
        "steps_completed": int(summary.get("steps_completed", 0)),
        "first_nonfinite_step": int(params["step"].min()) if len(params) else None,
        "nonfinite_param_events": int(len(params)),
        "skipped_steps": int(final.get("skipped_steps") or 0),
        "scaler_warmup_skips": warmup,  # for the verdict; not a column of the table
        "final_eval_ppl": _figure(final.get("eval_ppl")),
        "best_eval_ppl": _figure(final.get("best_eval_ppl")),
        "lost_update_fraction": _figure(final.get("lost_update_fraction")),
        "tokens_per_s": _figure(final.get("tokens_per_s")),
        "peak_memory_mb": _figure(final.get("peak_memory_mb")),
        "other_load": result.other_load,  # for the recommendation; not a column of the table
    }
    return row, causes, failure, diagnosis[0].get("fix") if diagnosis else None


class Comparison(NamedTuple):
    """The table (docs/run-directory.md's columns, verdicts as text), each mode's verdict, and the recommendation."""

    table: pd.DataFrame
    verdicts: list[Verdict]
    recommendation: Recommendation


def comparison_table(results: list[ModeRun]) -> Comparison:
    """docs/run-directory.md's columns, one row per mode, each mode's verdict (the table holds it as its text)
    and the recommendation across them. drift_vs_fp32 is NaN (shown `n/a`) when fp32 did not run."""
    rows = [comparison_row(r) for r in results]
    reference = next((row["final_eval_ppl"] for row, *_ in rows if row["mode"] == "fp32"), math.nan)
    verdicts = []
    for row, causes, failure, _ in rows:
        ppl = row["final_eval_ppl"]
        finite_reference = math.isfinite(reference) and reference > 0
        row["drift_vs_fp32"] = (ppl - reference) / reference if finite_reference and not math.isnan(ppl) else math.nan
        verdicts.append(verdict(row, causes, failure))
        row["verdict"] = str(verdicts[-1])
    frame = pd.DataFrame([row for row, *_ in rows], columns=COLUMNS)
    fp32_fix = next((fix for row, *_, fix in rows if row["mode"] == "fp32"), None)
    recommendation = recommend([row for row, *_ in rows], verdicts, fp32_fix)
    return Comparison(frame.astype({"first_nonfinite_step": "Int64"}), verdicts, recommendation)


def write_outputs(out: Path, table: pd.DataFrame, verdicts: list[Verdict], summary: dict,
                  results: list[ModeRun]) -> list[str]:
    """comparison.csv/.parquet/.md/.html, the plots and summary.json, from the table and the runs, all built before
    any is moved into `out` (`built_then_moved`: one that fails leaves the comparison's files as they were); the
    names written."""
    from .presentation.plots import has_loss_scale, plot_loss_curves, plot_loss_scale
    from .presentation.report import cell, write_comparison_html, write_comparison_markdown, write_comparison_report

    with built_then_moved(out) as staging:
        table.to_parquet(staging / "comparison.parquet", index=False)
        table.assign(drift_vs_fp32=[cell("drift_vs_fp32", v) if pd.isna(v) else v for v in table["drift_vs_fp32"]]) \
            .to_csv(staging / "comparison.csv", index=False)
        metrics = {r.mode: load_metrics(r.run_dir) for r in results if r.run_dir.is_dir()}
        scaled = any(has_loss_scale(m) for m in metrics.values())
        write_comparison_markdown(table, summary, staging / "comparison.md", loss_scale=scaled)
        write_comparison_html(table, verdicts, summary, staging / "comparison.html", loss_scale=scaled)
        plot_loss_curves(metrics, staging / "loss_curves.png", "training loss per precision mode")
        # the contract (docs/run-directory.md, A compare-precision directory) keeps loss_scale.png in every
        # comparison: without a scaled mode it says so in words, and the .md and .html leave it out rather than
        # show a figure without data
        plot_loss_scale(metrics, staging / "loss_scale.png", "dynamic loss scale per precision mode")
        write_comparison_report(staging, table, verdicts, summary, {r.mode: r.run_dir for r in results}, scaled)
        write_json_atomic(staging / "summary.json", summary)
        written = [name for name in OUTPUTS if (staging / name).exists()]
    return written


def _summary(out: Path, comparison: Comparison, results: list[ModeRun], options: dict, device: dict,
             requested: Sequence[str] | None = None) -> dict:
    """`requested`: the modes the comparison was asked for (compare_options.json's), those of `results` when None;
    those that did not run are `not_run`, which the table's files name."""
    rows = []
    for row in comparison.table.astype(object).to_dict("records"):
        clean = {k: (None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v)
                 for k, v in row.items()}
        clean["drift_vs_fp32"] = "n/a" if clean["drift_vs_fp32"] is None else clean["drift_vs_fp32"]
        rows.append(clean)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "compare-precision",
        "modes": [r.mode for r in results],
        "requested_modes": list(requested) if requested is not None else [r.mode for r in results],
        "not_run": [m for m in (requested or []) if m not in {r.mode for r in results}],
        "fp32_reference": any(r.mode == "fp32" for r in results),
        "device": device,
        "options": options,
        "thresholds": THRESHOLDS,
        "rows": rows,
        "recommendation": {"mode": comparison.recommendation.mode, "text": comparison.recommendation.text},
        "runs": {r.mode: {"run_dir": str(r.run_dir), "exit_code": r.returncode, "seconds": round(r.seconds, 2),
                          "failure": r.failure,
                          "other_load": None if r.other_load is None else round(r.other_load, 3)} for r in results},
        "output_dir": str(out),
    }


def compare_precision(modes: Sequence[str] | str | None = None, *, config: DistillConfig | None = None,
                      steps: int | None = None, console: Console | None = None, quiet: bool = False,
                      wording: Callable[[str], str] = str, **options) -> CompareResult:
    """Run the same distillation in several precision modes and write a side-by-side comparison.

    `options` are DistillConfig's fields (as for `distill`), except precision, on_nonfinite and resume,
    which the comparison sets itself. Returns the table (pandas), the summary and the output directory.
    `wording`: how the console words the options it names (the recommendation's `--precision mixed`); the Python
    API's caller reads them as keyword arguments.
    """
    refuse_unknown_options(options, "compare_precision()")
    given = {k: v for k, v in (config.to_dict() if config else {}).items() if k not in SET_BY_COMPARE}
    for name in SET_BY_COMPARE:
        if options.get(name) not in (None, False):
            raise BadInput(REFUSED_MESSAGES[name])
    given.update({k: v for k, v in options.items() if k not in SET_BY_COMPARE})
    if steps is not None:  # wins over a config's train_steps; an explicit, different train_steps is a conflict
        if isinstance(steps, numbers.Real) and steps < 1:  # named as typed: validate() would name --train-steps
            raise BadInput(f"--steps must be ≥ 1, got {steps}")
        if options.get("train_steps") not in (None, steps):
            raise BadInput(f"--steps {steps} and --train-steps {options['train_steps']} disagree; give one")
        given["train_steps"] = steps
    for name, value in COMPARE_DEFAULTS.items():
        given.setdefault(name, value)
    try:
        base = DistillConfig(**given).validate()
    except TypeError as exc:
        raise BadInput(f"invalid options: {exc}") from None
    from .train.loop import resolve_device
    from .train.models import resolve_model_source

    caps = detect_capabilities(resolve_device(base.device))
    chosen = resolve_modes(modes, base.model_dtype, caps)
    for name in (base.teacher_model, base.student_model):
        resolve_model_source(name)  # a missing local model is bad input before any mode starts
    out = Path(base.output_dir) if base.output_dir else default_run_dir("compare")
    # the directories this comparison makes, deepest first: default_run_dir has made runs/<date-time>-compare/ (and
    # runs/, when new); _prepare_output makes a missing --output-dir and its missing parents
    made = [out, out.parent] if not base.output_dir else [p for p in (out, *out.parents) if not p.exists()]
    _prepare_output(out, base.overwrite)
    run_options = {k: v for k, v in base.to_dict().items() if k not in SET_BY_COMPARE}
    run_options.update(output_dir=None, overwrite=False)  # each mode's --output-dir is OUT/runs/MODE
    config_file = out / COMPARE_OPTIONS
    write_json_atomic(config_file, {"options": run_options, "modes": chosen})

    console = console or Console(quiet=quiet)
    console.print(f"[bold]sarkd-diag compare-precision[/]: {', '.join(chosen)} × {counted(base.train_steps, 'step')} "
                  f"→ {out}")
    results = []
    for i, mode in enumerate(chosen, 1):
        with console.status(f"[{i}/{len(chosen)}] {mode} …"):
            try:
                result = run_mode(mode, config_file, out)
            except BadInput:
                if not results:  # bad input, found before any mode ran: leave nothing that refuses the rerun
                    _take_back(out, made)
                raise
            except KeyboardInterrupt:
                console.print(wording(_after_interrupt(out, mode)))
                raise
        results.append(result)
        console.print(f"[{i}/{len(chosen)}] {mode}: {'failed: ' + result.failure if result.failure else 'done'} "
                      f"({result.seconds:.0f} s)")
    table, verdicts, recommendation = comparison = comparison_table(results)
    summary = _summary(out, comparison, results, run_options, {"type": caps.device_type, "name": caps.name}, chosen)
    written = write_outputs(out, table, verdicts, summary, results)
    console.print(rich_table(table, verdicts))
    console.print(f"[bold]recommendation[/]: {escape(wording(recommendation.text))}")
    others = [n.removeprefix("comparison") for n in written if n not in ("comparison.md", "summary.json")]
    console.print(f"comparison: {out / 'comparison.md'} (also {', '.join(others)})")
    return CompareResult(out, table, summary, 0, verdicts, recommendation)


def _after_interrupt(out: Path, mode: str) -> str:
    """What a comparison stopped during `mode` leaves, and the command that reads it: `report` compares the modes
    whose runs closed (the interrupted one too, when it saved its state), which the interrupt alone does not say."""
    closed = [p.parent.name for p in sorted((out / "runs").glob("*/summary.json"))]
    if not closed:
        return f"interrupted during {mode}, before any mode closed: `--overwrite` starts the comparison again"
    return (f"interrupted during {mode}; closed: {', '.join(closed)} — `{shell_command('report', out)}` compares them, "
            "`--overwrite` starts the comparison again")


def rebuild_comparison(out: str | Path) -> CompareResult:
    """Write a comparison's table, plots and summary again from its runs — after `report` rebuilt them, or
    for a comparison that was interrupted (the modes that ran are compared; those asked for that did not are the
    summary's `not_run`, and the table's files name them)."""
    out = Path(out)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    started = json.loads((out / COMPARE_OPTIONS).read_text())
    ran = [m for m in started["modes"] if (out / "runs" / m / "summary.json").is_file()]
    if not ran:
        raise BadInput(f"{out}: no mode of this comparison has a run directory with a summary.json yet")
    known = previous.get("runs", {})
    results = [ModeRun(m, out / "runs" / m, known.get(m, {}).get("exit_code", 0), known.get(m, {}).get("seconds", 0.0),
                       known.get(m, {}).get("failure"), known.get(m, {}).get("other_load")) for m in ran]
    table, verdicts, recommendation = comparison = comparison_table(results)
    device = previous.get("device") or json.loads((out / "runs" / ran[0] / "config.json").read_text())["device"]
    summary = _summary(out, comparison, results, started["options"], device, started["modes"])
    write_outputs(out, table, verdicts, summary, results)
    return CompareResult(out, table, summary, 0, verdicts, recommendation)
