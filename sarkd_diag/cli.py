"""The command line: a thin Typer layer over the Python API.

`train`'s options are generated from DistillConfig's fields (dashes and underscores both accepted,
every boolean with its --no- form), so the CLI, --config files and a run's config.json stay one list.
Errors in what the user typed end as one line on stderr and exit 2.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import traceback
from dataclasses import fields
from pathlib import Path

import typer

from .config import DistillConfig, build_config
from .errors import BadInput

# Plain (click) help: rich's renderer puts a `<bool>` after every flag (even --help) and costs an import.
# `-h` works for every command; torch, transformers and pandas are imported inside the commands that need them,
# so --help, --version and `env` stay quick.
HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings=HELP,
                  help="Precision debugging for knowledge distillation of causal language models.")

_TYPES = {"bool": bool | None, "int": int | None, "float": float | None, "str": str | None,
          "str | None": str | None, "int | None": int | None, "list[str] | None": list[str] | None}
_METAVARS = {"int": "N", "int | None": "N", "float": "X", "str": "TEXT", "str | None": "TEXT",
             "list[str] | None": "REGEX"}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sarkd-diag {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Precision debugging for knowledge distillation of causal language models."""


class _Command(typer.core.TyperCommand):
    """Help without the underscore aliases (`--train_steps` still parses: the original scripts' spelling)."""

    def format_help(self, ctx, formatter) -> None:
        saved = [(p, p.opts, p.secondary_opts) for p in self.params]
        for p in self.params:
            p.opts = [o for o in p.opts if not _is_alias(o)] or p.opts
            p.secondary_opts = [o for o in p.secondary_opts if not _is_alias(o)] or p.secondary_opts
        try:
            super().format_help(ctx, formatter)
        finally:
            for p, opts, secondary in saved:
                p.opts, p.secondary_opts = opts, secondary


def _is_alias(opt: str) -> bool:
    return opt.startswith("--") and "_" in opt


def _config_options(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One Typer option per DistillConfig field; None means 'not given' so --config files can fill it."""
    params = []
    for f in fields(DistillConfig):
        if f.name in exclude:
            continue
        dash = f.name.replace("_", "-")
        if f.type == "bool":
            decls = [f"--{dash}/--no-{dash}"] + ([f"--{f.name}/--no_{f.name}"] if "_" in f.name else [])
        else:
            decls = [f"--{dash}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = f.metadata.get("default_text", f.default if f.default is not None else "none")
        if f.type == "bool":
            default = "on" if f.default else "off"
        option = typer.Option(None, *decls, help=f"{f.metadata['help']} [default: {default}]",
                              show_default=False, metavar=None if f.type == "bool" else _METAVARS[f.type])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_TYPES[f.type]))
    return params


def _with_config_options(exclude: tuple[str, ...] = (), extra: list[inspect.Parameter] = ()):
    """Give a command function DistillConfig's options (plus `extra`) as its signature, for Typer."""
    def decorate(func):
        own = [p for p in inspect.signature(func).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = inspect.Signature(own + list(extra) + _config_options(exclude))
        func.__annotations__ = {p.name: p.annotation for p in func.__signature__.parameters.values()}
        return func
    return decorate


_ARGV: list[str] = []  # the command line main() was given: `train --nproc N` passes it on to torchrun
CONFIG_FILE = typer.Option(None, "--config", metavar="FILE",
                           help="YAML or JSON file of options (a run's config.json works too).")


@app.command(cls=_Command)
@_with_config_options()
def train(config: Path | None = CONFIG_FILE, **options) -> int:
    """Distil the teacher into the student (the production path; --precision auto by default)."""
    cfg = build_config(options, config)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: launch it
        return _launch_torchrun(cfg.nproc)
    _check_resumable(cfg)
    from .train.loop import distill
    from .ui import TrainingDisplay

    result = distill(cfg, display=TrainingDisplay(log_every=cfg.log_every))
    return result.exit_code


def _check_resumable(cfg: DistillConfig) -> None:
    """--resume of a run that has no checkpoint: say why there is none (--save-steps 0 checkpoints only at the
    end) and what to do next time, before any model loads."""
    if not (cfg.resume and cfg.output_dir):
        return
    run = Path(cfg.output_dir)
    if not (run / "config.json").is_file() or any((run / "checkpoints").glob("step-*")):
        return  # nothing there, or something to resume: the run directory's own checks speak
    try:
        recorded = json.loads((run / "config.json").read_text(encoding="utf-8")).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(recorded, dict):
        return
    from .rundir import differing_options

    if differing_options(recorded, cfg.to_dict()):
        return  # trained with other options: that is what to say first (the run directory's check)
    every = recorded.get("save_steps")
    if every == 0:
        why = ("it ran with --save-steps 0 (the default), which writes a checkpoint only when a run ends or is "
               "interrupted (Ctrl-C, SIGTERM); after kill -9 or a crash there is none")
    else:
        why = f"it was stopped before its first checkpoint (--save-steps {every})"
    raise BadInput(f"--resume: nothing to resume, {run} has no checkpoint yet: {why}. Start it again (--overwrite), "
                   "with --save-steps N to be able to resume it")


def _launch_torchrun(nproc: int) -> int:
    """`train --nproc N`: the same command under torchrun (`python -m torch.distributed.run`), its exit code."""
    import subprocess

    from .train.distributed import launch_command

    args = _ARGV[_ARGV.index("train") + 1:]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said once instead of warned per rank
    child = subprocess.Popen(launch_command(nproc, args), env=env)
    received: list[int] = []

    def forward(signum, frame):  # torchrun passes it to the ranks, which stop after the same step and save state
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # torchrun exits 1 whenever a rank exits non-zero: an interrupted run still reads 130 / 143, as in one process
    return 128 + received[0] if received and code != 0 else code


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="Print JSON for programs.")) -> int:
    """The device, the modes it runs, what `auto` picks and why, embedded models and versions."""
    from .environment import environment_report, print_environment

    report = environment_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_environment(report)
    return 0


@app.command()
def report(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory, finished or not, or a "
                                          "compare-precision directory.")) -> int:
    """Rebuild summary.json, the parquet files, report.md and plots of any run, even one that crashed."""
    from .compare import OUTPUTS, is_compare_dir, rebuild_comparison

    if is_compare_dir(run_dir):
        for mode_dir in sorted((run_dir / "runs").glob("*/config.json")):
            _rebuild_run(mode_dir.parent)
        result = rebuild_comparison(run_dir)
        written = [name for name in OUTPUTS if (run_dir / name).exists()]
        typer.echo(f"{run_dir}: {len(result.table)} mode(s) compared; wrote {', '.join(written)}")
        return 0
    if not (run_dir / "config.json").is_file():
        raise BadInput(f"{run_dir} is not a sarkd-diag run directory (no config.json)")
    _rebuild_run(run_dir)
    return 0


def _rebuild_run(run_dir: Path) -> dict:
    from .rundir import STATUSES, finalize_run

    status = "crashed"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text()).get("status")
        except ValueError:
            previous = None
        status = previous if previous in STATUSES else "crashed"
    summary = finalize_run(run_dir, status)
    steps = summary["steps_completed"]
    typer.echo(f"{run_dir}: {summary['status']}, {steps} step{'' if steps == 1 else 's'}, "
               f"{len(summary['diagnosis'])} cause(s); wrote summary.json, metrics.parquet, events.parquet, "
               "report.md, loss_curves.png")
    return summary


# --------------------------------------------------------------------- compare, query, check, memory
REFUSED_BY_COMPARE = ("precision", "on_nonfinite", "resume", "resume_from")
MEMORY_OPTIONS = ("teacher_model", "student_model", "trust_remote_code", "block_size", "per_device_batch_size",
                  "gradient_checkpointing", "offload_teacher_to_cpu", "router_patterns")


def _refused(names: tuple[str, ...]) -> list[inspect.Parameter]:
    """Options a command sets itself: parsed (hidden) only so that giving one is refused with a clear message."""
    params = [p for p in _config_options() if p.name in names]
    for p in params:
        p.default.hidden = True
    return params


@app.command("compare-precision", cls=_Command)
@_with_config_options(exclude=REFUSED_BY_COMPARE, extra=_refused(REFUSED_BY_COMPARE))
def compare_precision_command(
    config: Path | None = CONFIG_FILE,
    modes: list[str] | None = typer.Option(None, "--modes", metavar="MODES", help="Precision modes, comma-separated "
                                           "or repeated (default: every mode this device runs)."),
    steps: int | None = typer.Option(None, "--steps", metavar="N",
                                     help="Optimizer steps per mode (an alias of --train-steps; wins over --config)."),
    **options,
) -> int:
    """Run the same distillation in several precision modes from the same start; one table, a verdict per mode."""
    from .compare import SET_BY_COMPARE, compare_precision
    from .config import read_config_file

    given = read_config_file(config) if config else {}
    for name in SET_BY_COMPARE:  # a run's config.json names its own mode: here the comparison sets it
        given.pop(name, None)
    if steps is not None and options.get("train_steps") is None:
        given.pop("train_steps", None)  # --steps on the command line wins over the file's train_steps
    given.update({k: v for k, v in options.items() if v is not None})
    return compare_precision(modes, steps=steps, **given).exit_code


@app.command()
def events(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory (a crashed one too) or a compare-precision directory."),
    kind: list[str] | None = typer.Option(None, "--kind", metavar="KINDS",
                                          help="Event kinds, comma-separated or repeated."),
    severity: str | None = typer.Option(None, "--severity", metavar="LEVEL",
                                        help="This level and above: info | warning | critical."),
    model: str | None = typer.Option(None, "--model", metavar="MODEL",
                                     help="student | teacher | projection (or a model your own loop named)."),
    rank: int | None = typer.Option(None, "--rank", metavar="N", help="Events of this process only (torchrun runs)."),
    module: str | None = typer.Option(None, "--module", metavar="REGEX",
                                      help="Regex searched in module and tensor names."),
    step: str | None = typer.Option(None, "--step", metavar="A:B", help="A:B inclusive, either end open (10:, :20)."),
    grep: str | None = typer.Option(None, "--grep", metavar="REGEX", help="Regex searched in event messages."),
    fmt: str = typer.Option("table", "--format", metavar="FORMAT", help="table | json (one array) | csv."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Print the events so far, then each as the run "
                                "appends it; ends when the run closes, or (exit 1) when it is evidently dead."),
    idle_timeout: float | None = typer.Option(None, "--idle-timeout", metavar="SECONDS",
                                              help="With --follow: also stop after this long without a write "
                                              "(for a run whose process cannot be seen from here)."),
) -> int:
    """Query recorded events — the grep replacement — of a run or of every run of a comparison.

    Names (kinds, severity, model, format) are case-insensitive.
    """
    from .query import FORMATS, EventFilter, RunEnded, follow_events, print_events, query_events

    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise BadInput(f"--idle-timeout must be > 0 seconds, got {idle_timeout}")
    flt = EventFilter(kinds=kind or [], severity=severity, model=model, rank=rank, module=module, steps=step,
                      grep=grep)
    if follow:
        query_events(run_dir, flt)  # the directory and --model checked before following
        try:
            follow_events(run_dir, flt, fmt, idle_timeout=idle_timeout)
        except RunEnded as exc:
            print(f"sarkd-diag: {_one_line(exc)}", file=sys.stderr)
            return 1
        return 0
    everything = query_events(run_dir)
    flt.check_model(everything)
    print_events(flt.apply(everything), fmt, total=len(everything))
    return 0


@app.command()
def check(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory or a compare-precision directory (every run)."),
    expect: list[str] | None = typer.Option(None, "--expect", metavar="NAMES", help="master-fp32 | "
                                            "no-nonfinite-params | no-critical | completed; comma-separated or "
                                            "repeated."),
    max_skipped_steps: int | None = typer.Option(None, "--max-skipped-steps", metavar="N",
                                                 help="At most N skipped steps."),
    max_eval_ppl: float | None = typer.Option(None, "--max-eval-ppl", metavar="X",
                                              help="Final validation perplexity at most X."),
) -> int:
    """Assert expectations of recorded runs: exit 0 when all hold, 1 with one line per failed expectation."""
    from .query import check_runs, expectations

    checks = expectations(expect or [], max_skipped_steps, max_eval_ppl)
    failures, runs = check_runs(run_dir, checks)
    for line in failures:
        typer.echo(line)
    if not failures:
        typer.echo(f"{run_dir}: ok — {', '.join(checks)} hold for {runs} run(s)")
    return 1 if failures else 0


@app.command("estimate-memory", cls=_Command)
@_with_config_options(exclude=tuple(f.name for f in fields(DistillConfig) if f.name not in MEMORY_OPTIONS))
def estimate_memory_command(
    config: Path | None = CONFIG_FILE,
    modes: list[str] | None = typer.Option(None, "--modes", metavar="MODES", help="Precision modes, comma-separated "
                                           "or repeated (default: all five)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (bytes) for programs."),
    **options,
) -> int:
    """Device memory per precision mode — weights, gradients, masters, optimizer state, activations — before a run."""
    from rich.console import Console

    from .memory import breakdown_table, estimate_memory

    report = estimate_memory(build_config(options, config), modes=modes)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return 0
    console = Console()
    for shape in (report.teacher, report.student):
        console.print(f"{shape.name}: {shape.params:,} parameters ({shape.router_params:,} in routers), "
                      f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}")
    console.print(breakdown_table(report.estimates, title=f"estimated device memory, batch {report.batch} × "
                                                          f"block {report.block}"))
    for note in report.notes:
        console.print(note)
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is_usage_error(exc: Exception) -> bool:
    """A command-line usage error (unknown option, bad value): click's, or the copy of click typer vendors."""
    return any(cls.__name__ == "UsageError" for cls in type(exc).__mro__) and hasattr(exc, "format_message")


BOOLEAN_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _check_flag_values(args: list[str]) -> None:
    """`--use-scheduler true`: a flag takes no value; say so rather than 'unexpected extra argument (true)'."""
    flags = {f"--{prefix}{name}" for f in fields(DistillConfig) if f.type == "bool"
             for name in {f.name, f.name.replace("_", "-")} for prefix in ("", "no-", "no_")}
    for flag, value in zip(args, args[1:], strict=False):
        if flag in flags and value.lower() in BOOLEAN_VALUES:
            positive = flag.replace("--no-", "--").replace("--no_", "--").replace("_", "-")
            raise BadInput(f"{flag} is a flag and takes no value ({value!r}): write {positive} to turn it on, "
                           f"--no-{positive[2:]} to turn it off")


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0/1 from the command, 2 for bad input, 3 for an internal error, 130/143 interrupted."""
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    try:
        if not _ARGV:  # the bare command: its help, as a person asking for it
            _ARGV = ["--help"]
            argv = _ARGV
        _check_flag_values(_ARGV)
        code = app(args=argv, prog_name="sarkd-diag", standalone_mode=False)
    except BadInput as exc:
        print(f"sarkd-diag: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("sarkd-diag: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _is_usage_error(exc):
            print(f"sarkd-diag: error: {_one_line(exc.format_message())}", file=sys.stderr)
            sys.exit(2)
        # an internal error: one line here, the traceback in a file
        path = Path.cwd() / "sarkd-diag-error.txt"
        try:
            path.write_text(traceback.format_exc())
            where = f" (traceback in {path})"
        except OSError:
            where = ""
        print(f"sarkd-diag: internal error: {type(exc).__name__}: {_one_line(exc)}{where}", file=sys.stderr)
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)
