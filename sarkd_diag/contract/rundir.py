"""The run directory contract (docs/run-directory.md): where each file lives, how it is written and read.

The bottom layer every other one reads and writes through; closing a run (summary, reports, figures)
is presentation/closing.py's, one layer up, since it needs the diagnosis and the renderers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from .config import resume_option
from .errors import BadInput
from .events import events_frame, read_jsonl
from .numerics import number_or_none, reading_or_none
from .wording import shell_command
from .writers import LOCK_FILE, RunClaim, claim_run_dir, lock_holder, run_logs, writing_processes

# summary.json's layout: 2 since findings (the project's codes beyond the contract's nine) moved from `diagnosis` to
# `findings`
SCHEMA_VERSION = 2
# compare-precision's table (comparison.csv/.parquet/.md/.html), in this order
COMPARISON_COLUMNS = ["mode", "verdict", "top_cause", "steps_completed", "first_nonfinite_step",
                      "nonfinite_param_events", "skipped_steps", "final_eval_ppl", "best_eval_ppl", "drift_vs_fp32",
                      "lost_update_fraction", "tokens_per_s", "peak_memory_mb"]

STATUSES = ("completed", "stopped", "interrupted", "failed", "crashed")
# Options that may differ when a run is continued: they change how long, where, or how memory is spent,
# not what is trained (after an out-of-memory error a run resumes with --gradient-checkpointing, say).
RESUMABLE_OPTIONS = {"train_steps", "resume", "resume_from", "overwrite", "eval_steps", "save_steps",
                     "save_total_limit", "probes", "probe_every", "on_nonfinite", "max_rollbacks", "output_dir",
                     "eval_max_batches", "device", "gradient_checkpointing", "offload_teacher_to_cpu",
                     "clear_cache_every_step", "log_every", "report_to"}


def causes_and_findings(summary: dict) -> list[dict]:
    """summary.json's causes, then its findings: what a reader that weighs every conclusion reads (whether any is
    critical, which names a run that has no numerical cause)."""
    return [*(summary.get("diagnosis") or []), *(summary.get("findings") or [])]


def default_run_dir(mode: str) -> Path:
    """A new runs/<date-time>-<mode>/, created here: runs started in the same second (a sweep launched with `&`)
    each get their own, where a name found free and created later let both write one directory. Where it cannot
    be created, the name alone (check_output_dir then says why)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        path = Path("runs") / (f"{stamp}-{mode}" if n == 1 else f"{stamp}-{mode}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
        except OSError:
            return path


@contextmanager
def built_then_moved(directory: Path) -> Iterator[Path]:
    """A hidden directory inside `directory` to build a set of outputs in; when the block ends without an error each
    is moved into `directory`, one rename each (a directory replaces its namesake), and the hidden one goes either
    way — so a build that fails half-way (a renderer's bug, a full disk) leaves `directory` as it was."""
    remove_abandoned(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{_owner_tag()}-", dir=directory))
    try:
        yield staging
        for built in sorted(staging.iterdir()):
            target = directory / built.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


LEFTOVER_PREFIXES = (".building-", ".tmp-")  # the hidden names a write in progress has in a run directory


def _owner_tag() -> str:
    """`PID@HOST`, put in the hidden names a write in progress uses, so a later one can tell a write whose process
    was killed (its leftover, removable) from one a live process is making now."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _abandoned(name: str) -> bool:
    """Whether a hidden `.building-*` / `.tmp-*` entry was left by a process that is gone: one of this machine whose
    id no process holds, or a `.building-*` of an older sarkd-diag that named no owner (a `.tmp-*` without one may be
    anyone's: it stays). Another machine's (a shared disk) stays too."""
    kind, _, tag = name.partition("-")
    pid, at, rest = tag.partition("@")
    if not at or not pid.isdigit():
        return kind == ".building"
    if not rest.startswith(f"{socket.gethostname()}-"):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def remove_abandoned(directory: Path) -> None:
    """Remove what a process killed while writing into `directory` left behind (a closing's `.building-*` directory,
    an atomic write's `.tmp-*` file): never a finished file — those have their own names — nor a live write."""
    for entry in Path(directory).glob(".*"):
        if entry.name.startswith(LEFTOVER_PREFIXES) and _abandoned(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON through a temporary file and rename (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file.

    The file is created like any other (0666 less the umask: 0644 usually), not mkstemp's private 0600."""
    path = Path(path)
    while True:
        tmp = path.parent / f".tmp-{_owner_tag()}-{os.urandom(6).hex()}-{path.name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def drop_steps_after(path: Path, step: int) -> None:
    """Cut a run's JSON-lines log (metrics, events, activations) back to a checkpoint of `step` that a framework's
    loop resumed from: the records of later steps — redone now, or lost with the process that wrote them — go, so
    each step appears once, as `--resume` cuts its own logs; records of no step stay, a torn last line goes."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [row for row in read_jsonl(path) if row.get("step") is None or row["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def differing_options(previous: dict, options: dict) -> list[str]:
    """Options that change what is trained and differ from a recorded run's (a resume must not change them)."""
    return sorted(k for k in options if k not in RESUMABLE_OPTIONS and k in previous and previous[k] != options[k])


COMPARE_OPTIONS = "compare_options.json"  # written first by compare-precision: what marks its directory


def is_compare_dir(path: Path) -> bool:
    return (Path(path) / COMPARE_OPTIONS).is_file()


def recorded_run(path: Path) -> dict | None:
    """The options of the sarkd-diag run recorded in `path`/config.json; None when it holds none."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("options"), dict) or \
            not isinstance(config.get("precision"), dict):
        return None
    return config["options"]


def _writable(directory: Path) -> bool:
    """Whether a file can be created here (asked of the filesystem: root passes os.access, not a read-only mount)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def resume_command(run_dir: str | Path) -> str | None:
    """The command that continues the run in `run_dir` from its newest checkpoint (what an interrupted run's panel
    and `check` tell); None when it has no checkpoint to continue from."""
    if not any(Path(run_dir).glob("checkpoints/step-*")):
        return None
    return shell_command("train", "--output-dir", run_dir, "--resume")


def _being_written(named: str, path: Path, pids: list[int]) -> BadInput:
    by = f"process {', '.join(map(str, pids))}" if any(pids) else "another process"
    return BadInput(f"{named} {path} is still being written by {by}, a run training now: let it end (or stop it "
                    "with Ctrl-C) first, or give another --output-dir")


def claim_output_dir(path: Path, named: str = "--output-dir") -> RunClaim:
    """Claim a run directory that `check_output_dir` passed, creating it if needed, for as long as this process
    writes it: a second process checking it meanwhile is refused (its setup would have found it free, and both would
    have written one metrics.jsonl). The loser of two that passed the check at once is refused here."""
    return claim_run_dir(Path(path), lambda pid: _being_written(named, Path(path), [pid]))


def _holds_anything(path: Path) -> bool:
    """Whether a directory holds an entry besides the lock file of a claim (left empty by a run killed in setup)."""
    return any(entry.name != LOCK_FILE for entry in path.iterdir())


def check_output_dir(path: Path, options: dict, overwrite: bool, resume: bool, named: str = "--output-dir",
                     besides: Iterable[int] = ()) -> None:
    """Refuse, before touching anything, a directory that holds a different run, a file, or one we cannot write,
    or that another process has claimed (a run in its setup or training: `claim_output_dir`).

    --overwrite replaces a sarkd-diag run only: a directory of other files is never cleared (its config.json
    may be a model's). --resume needs the run to be there, with the same options (RESUMABLE_OPTIONS aside).
    `named`: where the directory was given, as the refusals name it (a --config file's output_dir, say).
    `besides`: the processes of this one's own job (rank 0 of its torchrun job, which claims the directory for all).
    """
    path = Path(path)
    asked = resume_option(options)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{named} {path} is a file, not a directory")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise BadInput(f"{named} {path} cannot be created: {parent} is a file")
    if not _writable(parent):
        raise BadInput(f"{named} {path} is not writable")
    holder = lock_holder(path, besides) if path.is_dir() else None
    if holder is not None:  # a run still in its setup has no logs open yet: its claim says it is there
        raise _being_written(named, path, [holder])
    if not path.is_dir() or not _holds_anything(path):
        if resume:
            raise BadInput(f"{asked}: nothing to resume, {path} holds no run")
        return
    if is_compare_dir(path):  # "holds no sarkd-diag run" sent its owner looking for what else was in it
        raise BadInput(f"{named} {path} holds a compare-precision comparison ({COMPARE_OPTIONS}, runs/<mode>/), "
                       "not a run; give train another directory (to continue one mode's run: "
                       f"{shell_command('train', '--output-dir', path / 'runs' / '<mode>', '--resume')})")
    recorded = recorded_run(path)
    writers = writing_processes(run_logs(path), besides=besides) if recorded is not None else []
    if writers:  # replaced or resumed now, the live run's logs would be deleted under it or written by two
        raise _being_written(named, path, writers)
    probes_run = f"{path} holds the run a training loop's Probes wrote, not a `train` run"  # no options recorded
    if resume:
        if recorded is None:
            raise BadInput(f"{asked}: nothing to resume, {path} holds no sarkd-diag run (no readable config.json)")
        if not recorded:
            raise BadInput(f"{asked}: nothing to resume, {probes_run}; give another --output-dir for a new run")
        differing = differing_options(recorded, options)
        if differing:
            shown = ", ".join(f"{k} {recorded[k]!r} -> {options[k]!r}" for k in differing[:4])
            raise BadInput(f"{asked}: the run in {path} was trained with other options ({shown}); resume with "
                           f"its own options ({shell_command('train', '--config', path / 'config.json', '--resume')}) "
                           "or start a new run")
        return
    if recorded is None:
        if (path / "config.json").exists():
            raise BadInput(f"{named} {path} holds a config.json that is not a sarkd-diag run's; choose another "
                           "directory (--overwrite only replaces a sarkd-diag run)")
        raise BadInput(f"{named} {path} is not empty and holds no sarkd-diag run; choose another directory "
                       "(--overwrite only replaces a sarkd-diag run)")
    if overwrite:
        return
    if not recorded:
        raise BadInput(f"{named} {probes_run}; give another --output-dir for a new run, or --overwrite to replace it")
    differing = differing_options(recorded, options)
    if differing:  # --resume alone would be refused for those very options: continuing takes the run's own
        raise BadInput(f"{named} {path} holds a different run (options differ: {', '.join(differing[:4])}); give "
                       "another --output-dir for a new run, --overwrite to replace it, or continue it with its own "
                       f"options: {shell_command('train', '--config', path / 'config.json', '--resume')}")
    raise BadInput(f"{named} {path} holds a run already; pass --resume to continue it, --overwrite to replace it, "
                   "or another --output-dir for a new run")


def probes_run_dir_problem(path: Path, besides: list[int]) -> str | None:
    """Why a `Probes` may not write `path`, or None: a file; a comparison; a directory of other files — a model's (its
    config.json is no run's: the probes appended their logs beside it and failed at close on it) or the working
    directory; a run another process still writes (appended to, its steps were numbered twice and its run closed
    under it); a `train` run (its options recorded: a Probes run records none). `besides`: the processes of the
    caller's own job (torchrun ranks), which write the run together."""
    named = f"run_dir={str(path)!r}"  # as the caller wrote it: a keyword argument
    if path.exists() and not path.is_dir():
        return f"{named} is a file, not a directory"
    if is_compare_dir(path):
        return f"{named} is a compare-precision directory: give the probes a directory of their own"
    recorded = recorded_run(path) if path.is_dir() else None
    if path.is_dir() and _holds_anything(path) and recorded is None:
        held = "a config.json that is not a sarkd-diag run's" if (path / "config.json").exists() else \
            "files and no sarkd-diag run"
        return f"{named} holds {held}: give a new or empty directory (or a run directory to continue)"
    writers = writing_processes(run_logs(path), besides=besides)
    if writers:
        return (f"{named} is still being written by process {', '.join(map(str, writers))}: let that run end "
                "first, or give another run_dir")
    if recorded:  # a `train` run's options: continued, its config.json was replaced by the probes' own
        return (f"{named} holds a `sarkd-diag train` run, which the probes of a loop cannot continue (their "
                "config.json would replace its own): give a new or empty directory (or a Probes run to continue)")
    return None


def load_metrics(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    frame = pd.DataFrame(rows)
    for col in ("step", "split", "loss", "kd_loss", "ce_loss", "router_loss", "lr", "grad_norm", "loss_scale",
                "tokens", "tokens_per_s", "eval_ppl", "eval_set"):
        if col not in frame.columns:
            frame[col] = None
    for col in frame.columns:
        if col not in TEXT_METRICS:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


TEXT_METRICS = ("split", "eval_set")  # the metrics columns that hold names, not numbers


def primary_evaluations(evals: pd.DataFrame) -> pd.DataFrame:
    """The eval rows of the run's first evaluation set: where a run evaluates on several (`eval_set`), the summary's
    perplexities follow one of them — a mix would read a harder set as a regression."""
    if not len(evals):
        return evals
    first = evals["eval_set"].iloc[0]
    return evals[evals["eval_set"].isna()] if pd.isna(first) else evals[evals["eval_set"] == first]


def load_activations(run_dir: Path) -> pd.DataFrame:
    """Each module's largest output per statistics step (activations.jsonl): step, model, module, dtype, amax.

    A resumed run may have recorded a step twice (the steps after its checkpoint ran again): the later
    reading of each (step, model, module) is kept."""
    path = Path(run_dir) / "activations.jsonl"
    frame = pd.DataFrame(read_jsonl(path) if path.is_file() else [],
                         columns=["step", "model", "module", "dtype", "amax"])
    frame["amax"] = pd.to_numeric(frame["amax"], errors="coerce").astype("float64")
    return frame.drop_duplicates(["step", "model", "module"], keep="last").reset_index(drop=True)


def load_events(run_dir: Path) -> pd.DataFrame:
    rows: list[dict] = []
    for path in sorted(Path(run_dir).glob("events*.jsonl")):
        rows.extend(read_jsonl(path))
    return events_frame(rows).sort_values(["step", "time"], kind="stable").reset_index(drop=True)


def load_run(run_dir: str | Path) -> dict:
    """Events, metrics (pandas) and summary/config (dicts) of a run directory, for notebooks."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise BadInput(f"{run_dir} is not a sarkd-diag run directory (no config.json)")
    summary_path = run_dir / "summary.json"
    return {
        "config": json.loads((run_dir / "config.json").read_text()),
        "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        "metrics": load_metrics(run_dir),
        "events": load_events(run_dir),
    }


# what a run records as it decides its own end, before it closes: a process that died while closing still said it
ENDING_EVENTS = {"run_error": "failed", "out_of_memory": "failed", "policy_stop": "stopped",
                 "interrupted": "interrupted"}


def status_from_logs(run_dir: Path, config: dict, metrics: pd.DataFrame, events: pd.DataFrame) -> str:
    """The status of a run closed by someone other than its own process, as far as its directory proves it: the end
    the run recorded deciding (since its last resume or continuation: the logs before it tell of an earlier end), or
    `completed` where a `train` run evaluated after its last step and then saved its student (`student/` appears
    whole, after the run's last start: a process killed before it saved completed nothing), else `crashed`."""
    starts = events.index[events["code"].isin(("resumed", "run_continued"))]
    since = events.loc[starts[-1]:] if len(starts) else events
    ended = since[since["kind"].isin(ENDING_EVENTS)]
    if len(ended):
        return ENDING_EVENTS[ended["kind"].iloc[-1]]
    last_step = (config.get("options") or {}).get("train_steps")
    evaluated = metrics["step"][metrics["split"] == "eval"]
    trained = metrics["step"][metrics["split"] == "train"]
    started = since["time"].iloc[0] if len(starts) else 0.0
    if last_step and (evaluated == last_step).any() and (trained == last_step).any() \
            and _saved_since(Path(run_dir) / STUDENT, started):
        return "completed"
    return "crashed"


STUDENT = "student"  # where `train` saves the trained student, moved into place whole once saved


def _saved_since(path: Path, started: float) -> bool:
    """Whether `path` exists and was written after `started` (a resumed run's student/ may be its interruption's)."""
    try:
        return path.stat().st_mtime >= started
    except OSError:
        return False


def scaler_warmup_skips(metrics: pd.DataFrame, events: pd.DataFrame) -> int:
    """The steps the loss scaler skipped while finding its scale, as its probe told them from overflows: the first
    step's skip (which records no event) and each `scaler_skip_warmup` — the scaler working, not steps lost."""
    train = metrics[metrics["split"] == "train"]
    first = train.iloc[0] if len(train) and "skipped" in train else None
    first_skipped = first is not None and number_or_none(first["skipped"]) == 1 \
        and number_or_none(first["loss_scale"]) is not None
    return int(first_skipped) + int((events["code"] == "scaler_skip_warmup").sum())


def final_figures(metrics: pd.DataFrame) -> dict:
    train = metrics[metrics["split"] == "train"]
    evals = primary_evaluations(metrics[metrics["split"] == "eval"])
    # the evaluations that measured a perplexity, a NaN one (of a NaN loss) too — the last is NaN, not the finite one
    # before it — but not one that wrote none (a distillation objective's loss, whose exp is no perplexity)
    losses = evals["eval_loss"] if "eval_loss" in evals else pd.Series(math.nan, index=evals.index)
    evals = evals[evals["eval_ppl"].notna() | losses.isna()]
    last = train.iloc[-1] if len(train) else None
    return {
        "loss": number_or_none(last["loss"]) if last is not None else None,
        "kd_loss": number_or_none(last["kd_loss"]) if last is not None else None,
        "ce_loss": number_or_none(last["ce_loss"]) if last is not None else None,
        "eval_ppl": reading_or_none(evals["eval_ppl"].iloc[-1]) if len(evals) else None,
        "first_eval_ppl": reading_or_none(evals["eval_ppl"].iloc[0]) if len(evals) else None,
        "best_eval_ppl": number_or_none(evals["eval_ppl"].min()) if len(evals) else None,
        "tokens_per_s": number_or_none(train["tokens_per_s"].median()) if len(train) else None,
        "skipped_steps": int(train["skipped"].fillna(0).sum()) if "skipped" in train else 0,
        "peak_memory_mb": number_or_none(train["peak_memory_mb"].max()) if "peak_memory_mb" in train else None,
        "lost_update_fraction": number_or_none(train["lost_update_fraction"].median())
        if "lost_update_fraction" in train else None,
    }
