"""The command line: a thin Typer layer over the Python API.

`train`'s options are generated from DistillConfig's fields (dashes and underscores both accepted,
every boolean with its --no- form), so the CLI, --config files and a run's config.json stay one list:
CONFIG_OPTIONS maps each field, by its real type, to how it reads on the command line (made once, at
import), and a ConfigCommand adds the ones it takes after its own parameters.
Errors in what the user typed end as one line on stderr and exit 2.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import traceback
from collections.abc import Iterable
from dataclasses import Field, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, NoReturn, get_args, get_origin

import typer
from typer.models import ParamMeta

from .contract.config import (
    COMPARE_DEFAULTS,
    FIELD_TYPES,
    OTHER_TOOLS_NAMES,
    OTHER_TOOLS_SETTINGS,
    SET_BY_COMPARE,
    DistillConfig,
    build_config,
    empty_value,
    value_type,
    whole_number,
)
from .contract.errors import BadInput, no_space_left
from .contract.wording import closest, counted, did_you_mean, shell_command

# Plain (click) help: rich's renderer puts a `<bool>` after every flag (even --help) and costs an import.
# `-h` works for every command; torch, transformers and pandas are imported inside the commands that need them,
# so --help, --version and `env` stay quick.
HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings=HELP,
                  help="Precision debugging for knowledge distillation of causal language models.")


def _version(value: bool) -> None:
    if value:
        from .contract.version import __version__

        typer.echo(f"sarkd-diag {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Precision debugging for knowledge distillation of causal language models."""


# ------------------------------------------------------------------- DistillConfig's fields as options
@dataclass(frozen=True)
class ConfigOption:
    """How one DistillConfig field reads on the command line: `--train-steps N` (and `--train_steps`, the
    original scripts' spelling, accepted but not shown), `--use-scheduler / --no-use-scheduler` for a boolean.
    Every option defaults to None, 'not given', so that a --config file or a resumed run can fill it."""

    name: str
    value_type: Any  # the field's type without `| None`: what a value given here is parsed as
    text: str
    default: str  # as --help shows it
    metavar: str | None

    @property
    def help(self) -> str:
        return f"{self.text} [default: {self.default}]"

    @property
    def is_flag(self) -> bool:
        return self.value_type is bool

    @property
    def declarations(self) -> list[str]:
        dash = self.name.replace("_", "-")
        spellings = [(dash, "no-")] + ([(self.name, "no_")] if "_" in self.name else [])
        if self.is_flag:
            return [f"--{name}/--{no}{name}" for name, no in spellings]
        return [f"--{name}" for name, _ in spellings]

    @property
    def flags(self) -> set[str]:
        """Every spelling of a boolean option, --no- forms included."""
        return {opt for decl in self.declarations for opt in decl.split("/")} if self.is_flag else set()

    def parameter(self, hidden: bool = False):
        """A new Typer option (each command gets its own; nothing built here is shared or changed later)."""
        info = typer.Option(None, *self.declarations, help=self.help, show_default=False, metavar=self.metavar,
                            hidden=hidden, parser=whole_number if self.value_type is int else None)
        return _typer_parameter(ParamMeta(name=self.name, default=info, annotation=self.value_type | None))


METAVARS = {int: "N", float: "X", str: "TEXT"}


def config_option(f: Field, hint: Any) -> ConfigOption:
    """The option of config field `f` of type `hint` (a real type: `int | None`, `list[str] | None`, ...)."""
    kind = value_type(hint)
    if kind is bool:
        default = "on" if f.default else "off"
    else:
        default = f.metadata.get("default_text", "none" if f.default is None else f.default)
    item = (get_args(kind) or (kind,))[0] if get_origin(kind) is list else kind
    metavar = None if kind is bool else f.metadata.get("metavar", METAVARS.get(item))
    return ConfigOption(f.name, kind, f.metadata["help"], str(default), metavar)


CONFIG_OPTIONS: dict[str, ConfigOption] = {f.name: config_option(f, FIELD_TYPES[f.name]) for f in fields(DistillConfig)}


def _typer_parameter(meta: ParamMeta):
    """The Typer option a command-function parameter `meta` would become: Typer's own builder, so that these
    options parse exactly as a hand-written `name: int | None = typer.Option(None, ...)` does."""
    return typer.main._get_param(meta)


class Command(typer.core.TyperCommand):
    """Every command's help as a reader types it: an argument is `RUN_DIR` in the usage line (typer writes
    `{RUN_DIR}`, as if braces were to be typed) and has no type placeholder beside it (`RUN_DIR <path>`), as
    options show only their metavar; the underscore aliases of options (`--train_steps`, the original scripts'
    spelling) parse but are not shown."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
                for piece in super().collect_usage_pieces(ctx)]

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        _refuse_empty_values(self, args)
        return super().parse_args(ctx, args)

    def format_options(self, ctx: typer.Context, formatter) -> None:
        shown = copy.copy(self)
        shown.params = [_as_shown(p) for p in self.params]
        super(Command, shown).format_options(ctx, formatter)


def _refuse_empty_values(command, args: list[str]) -> None:
    """An option given nothing (`--modes "$MODES"`, `--kind ''`, `--expect ,`) would parse as left out: every mode
    compared, every event listed, one expectation fewer checked — so it is refused, as typed. A repeatable option
    is empty when no comma-separated item has text."""
    takes_value = {opt: p for p in command.params if p.param_type_name == "option" and not p.is_flag
                   for opt in [*p.opts, *p.secondary_opts]}
    for i, arg in enumerate(args):
        if arg == "--":
            return
        typed, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if typed not in takes_value or (not equals and i + 1 == len(args)):
            continue
        value = value if equals else args[i + 1]
        items = value.split(",") if takes_value[typed].multiple else [value]
        if not any(item.strip() for item in items):
            raise BadInput(empty_value(typed, value))


def _as_shown(param):
    """`param` as help shows it: without underscore aliases; an argument without its type."""
    shown = _without_aliases(param)
    if param.param_type_name == "argument":
        shown = copy.copy(shown)
        shown.display_type_rich = lambda ctx: None
    return shown


class ConfigCommand(Command):
    """A command that takes DistillConfig's options (`options`) after its own parameters.

    `hidden` ones are parsed but not shown: a command that sets them itself refuses them with a clear message.
    The command function reads what was given with `given_options(ctx)` (None: not given) and `given_args(ctx)`.
    """

    options: ClassVar[tuple[str, ...]] = ()
    hidden: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {}
    texts: ClassVar[dict[str, str]] = {}

    def __init__(self, *args: Any, params: list | None = None, **kwargs: Any) -> None:
        shown = {name: CONFIG_OPTIONS[name] for name in self.options}
        shown.update({name: replace(shown[name], default=str(value)) for name, value in self.defaults.items()})
        shown.update({name: replace(shown[name], text=text) for name, text in self.texts.items()})
        config = [option.parameter(hidden=name in self.hidden) for name, option in shown.items()]
        super().__init__(*args, params=[*(params or []), *config], **kwargs)

    @classmethod
    def taking(cls, options: Iterable[str], hidden: Iterable[str] = (), defaults: dict[str, Any] | None = None,
               texts: dict[str, str] | None = None) -> type[ConfigCommand]:
        """The command class for a command taking these options (shown in the config's order); `defaults`: the
        command's own defaults of some, shown in its help instead of the config's; `texts`: its own help of some
        (an option that means something else here)."""
        wanted, hidden, defaults, texts = set(options), frozenset(hidden), dict(defaults or {}), dict(texts or {})
        unknown = (wanted | hidden | set(defaults) | set(texts)) - set(CONFIG_OPTIONS)
        assert not unknown and hidden <= wanted and set(defaults) | set(texts) <= wanted, \
            f"not DistillConfig options: {sorted(unknown)}"
        chosen = tuple(name for name in CONFIG_OPTIONS if name in wanted)
        return type("ConfigCommand", (cls,), {"options": chosen, "hidden": hidden, "defaults": defaults,
                                              "texts": texts})

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)  # as typed: `train --nproc N` hands them to torchrun
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        # the command function declares only its own parameters: the config's options travel beside them
        ctx.meta[_OPTIONS] = {name: _as_given(ctx.params.pop(name, None)) for name in self.options}
        return super().invoke(ctx)


_ARGS, _OPTIONS = "sarkd_diag.args", "sarkd_diag.options"


def given_options(ctx: typer.Context) -> dict[str, Any]:
    """The config options a ConfigCommand was given; None for each one that was not."""
    return dict(ctx.meta[_OPTIONS])


def given_args(ctx: typer.Context) -> list[str]:
    """A ConfigCommand's own command line, after the command's name."""
    return list(ctx.meta[_ARGS])


def _as_given(value: Any) -> Any:
    """A repeated option's values as a list; none given is None (not given), as for every other option."""
    if isinstance(value, tuple):
        return list(value) or None
    return value


def _without_aliases(param):
    if not any(_is_alias(o) for o in [*param.opts, *param.secondary_opts]):
        return param
    shown = copy.copy(param)
    shown.opts = [o for o in param.opts if not _is_alias(o)] or param.opts
    shown.secondary_opts = [o for o in param.secondary_opts if not _is_alias(o)] or param.secondary_opts
    return shown


def _is_alias(opt: str) -> bool:
    return opt.startswith("--") and "_" in opt


CONFIG_FILE = typer.Option(None, "--config", metavar="FILE",
                           help="YAML or JSON file of options (a run's config.json works too).")


@app.command(cls=ConfigCommand.taking(CONFIG_OPTIONS), short_help="Distil the teacher into the student.")
def train(ctx: typer.Context, config: Path | None = CONFIG_FILE) -> int:
    """Distil the teacher into the student (the production path; --precision auto by default)."""
    if config is not None and given_options(ctx).get("precision") is None:
        _refuse_comparison_options(config)
    cfg = build_config(given_options(ctx), config)
    if config is not None and given_options(ctx).get("output_dir") is None and cfg.output_dir and not cfg.resume_from:
        from .contract.rundir import check_output_dir  # a run's config.json names its own directory: say so

        check_output_dir(Path(cfg.output_dir), cfg.to_dict(), cfg.overwrite, resume=cfg.resume,
                         named=f"--config {config}'s output_dir")
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: launch it
        return _launch_torchrun(cfg.nproc, given_args(ctx))
    _check_resumable(cfg)
    from .presentation.ui import TrainingDisplay
    from .train.loop import distill

    result = distill(cfg, display=TrainingDisplay(log_every=cfg.log_every))
    return result.exit_code


def _refuse_comparison_options(config: Path) -> None:
    """A compare-precision directory's compare_options.json holds the options of several modes: `train` alone would
    have run them once, in `auto`, and dropped the modes without a word. Training one of them takes --precision."""
    from .contract.config import comparison_modes

    modes = comparison_modes(config)
    if modes:
        raise BadInput(f"--config {config} holds a comparison's options (modes {', '.join(modes)}): compare them "
                       f"with `{shell_command('compare-precision', '--config', config)}`, or train one mode with "
                       f"`{shell_command('train', '--config', config, '--precision', modes[0])}`")


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
    if not isinstance(recorded, dict) or not recorded:  # a Probes run records no options: check_output_dir says so
        return
    from .contract.rundir import differing_options

    if differing_options(recorded, cfg.to_dict()):
        return  # trained with other options: that is what to say first (the run directory's check)
    every, closed = recorded.get("save_steps"), _closed_as(run)
    if closed is not None:  # it ended its own way and would have saved its last step: that step was not saveable
        why = (f"it was {closed[0]} after {counted(closed[1], 'step')}, and no checkpoint is written of step 0 or "
               "of non-finite weights. Start it again (--overwrite)")
    elif every == 0:
        why = ("it ran with --save-steps 0 (the default), which writes a checkpoint only when a run ends or is "
               "interrupted (Ctrl-C, SIGTERM); after kill -9 or a crash there is none. Start it again (--overwrite), "
               "with --save-steps N to be able to resume it")
    else:
        why = (f"it was stopped before its first checkpoint (--save-steps {every}). Start it again (--overwrite), "
               "with --save-steps N to be able to resume it")
    raise BadInput(f"--resume: nothing to resume, {run} has no checkpoint yet: {why}")


def _closed_as(run: Path) -> tuple[str, int] | None:
    """(status, steps completed) of a run that closed itself — interrupted, stopped or completed, each of which
    checkpoints its last step when it can — from its summary.json; None for a run that did not (killed, failed)."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        status, steps = summary["status"], int(summary["steps_completed"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return (status, steps) if status in ("interrupted", "stopped", "completed") else None


def _launch_torchrun(nproc: int, args: list[str]) -> int:
    """`train --nproc N`: the same command (`args`, after `train`) under torchrun (`python -m
    torch.distributed.run`), its exit code."""
    import subprocess

    from .train.distributed import launch_command

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


@app.command(cls=Command, short_help="The device, its precision modes and what auto picks.")
def env(as_json: bool = typer.Option(False, "--json", help="Print JSON for programs.")) -> int:
    """The device, the modes it runs, what `auto` picks and why, embedded models and versions."""
    from .presentation.environment import environment_report, print_environment

    report = environment_report()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_environment(report)
    return 0


@app.command(cls=Command, short_help="Rebuild a run's reports and plots, a crashed one too.")
def report(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory, finished or not, or a "
                                          "compare-precision directory.")) -> int:
    """Rebuild summary.json, the parquet files, report.md and plots of any run, even one that crashed."""
    from .compare import OUTPUTS, is_compare_dir, rebuild_comparison
    from .presentation.query import refuse_while_written, report_refusal, run_directory

    run_dir = run_directory(run_dir)  # as events and check read it: a file points back to its directory
    refused = report_refusal(run_dir)  # a model's config.json (a run's student/) is not a run's
    if refused:
        raise refused
    comparison = is_compare_dir(run_dir)
    refuse_while_written(run_dir)
    if comparison:
        for mode_dir in sorted((run_dir / "runs").glob("*/config.json")):
            _rebuild_run(mode_dir.parent)
        result = rebuild_comparison(run_dir)
        written = [name for name in OUTPUTS if (run_dir / name).exists()]
        not_run = result.summary["not_run"]  # asked for and never run (the comparison was stopped): said, not hidden
        typer.echo(f"{run_dir}: {counted(len(result.table), 'mode')} compared; wrote {', '.join(written)}"
                   + (f"; not run: {', '.join(not_run)} (asked for; the comparison stopped before "
                      f"{'it' if len(not_run) == 1 else 'them'})" if not_run else ""))
        return 0
    _rebuild_run(run_dir)
    return 0


def _rebuild_run(run_dir: Path) -> dict:
    from .contract.rundir import STATUSES
    from .presentation.closing import finalize_run
    from .presentation.report import continuation

    status = None  # no summary, or a damaged one: the status the logs prove
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text()).get("status")
        except (ValueError, AttributeError):
            previous = None
        status = previous if previous in STATUSES else None
    before = _modified(run_dir)
    summary = finalize_run(run_dir, status)
    after = _modified(run_dir)
    written = [name for name in after if after[name] != before.get(name)]  # what closing wrote, as it wrote it
    steps = summary["steps_completed"]
    typer.echo(f"{run_dir}: {summary['status']}, {counted(steps, 'step')}, "
               f"{counted(len(summary['diagnosis']), 'cause')}, {counted(len(summary['findings']), 'finding')}; "
               f"wrote {', '.join(written)}")
    resume = continuation(run_dir, summary)
    if resume:
        typer.echo(f"continue it: {resume}")
    return summary


def _modified(directory: Path) -> dict[str, int]:
    """Each entry of `directory` (a folder with a trailing /) and when it last changed, in name order."""
    return {p.name + ("/" if p.is_dir() else ""): p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------- compare, query, check, memory
MEMORY_OPTIONS = ("teacher_model", "student_model", "trust_remote_code", "block_size", "per_device_batch_size",
                  "gradient_checkpointing", "offload_teacher_to_cpu", "fused_loss", "router_patterns", "nproc",
                  "shard_teacher")


# the comparison's own directory, not one run's (each mode's run is OUT/runs/MODE)
COMPARE_TEXTS = {"output_dir": "Comparison directory, each mode's run in its runs/MODE/ (default: a new "
                               "runs/<date-time>-compare/).",
                 "overwrite": "Replace an existing comparison directory."}


@app.command("compare-precision", cls=ConfigCommand.taking(CONFIG_OPTIONS, hidden=SET_BY_COMPARE,
                                                            defaults=COMPARE_DEFAULTS, texts=COMPARE_TEXTS),
             short_help="One distillation in several precision modes, compared.")
def compare_precision_command(
    ctx: typer.Context,
    config: Path | None = CONFIG_FILE,
    modes: list[str] | None = typer.Option(None, "--modes", metavar="MODES", help="Precision modes, comma-separated "
                                           "or repeated (default: every mode this device runs)."),
    steps: int | None = typer.Option(None, "--steps", metavar="N", parser=whole_number,
                                     help="Optimizer steps per mode (an alias of --train-steps; wins over --config)."),
) -> int:
    """Run the same distillation in several precision modes from the same start; one table, a verdict per mode."""
    from .compare import compare_precision
    from .contract.config import comparison_modes, read_config_file

    options = given_options(ctx)
    given = read_config_file(config) if config else {}
    if config and modes is None:  # a comparison's own options file: its modes too
        modes = comparison_modes(config)
    for name in SET_BY_COMPARE:  # a run's config.json names its own mode: here the comparison sets it
        given.pop(name, None)
    if steps is not None and options.get("train_steps") is None:
        given.pop("train_steps", None)  # --steps on the command line wins over the file's train_steps
    given.update({k: v for k, v in options.items() if v is not None})
    return compare_precision(modes, steps=steps, **given).exit_code


@app.command(cls=Command, short_help="Query a run's recorded events: the grep replacement.")
def events(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory (a crashed one too) or a compare-precision directory."),
    kind: list[str] | None = typer.Option(None, "--kind", metavar="KINDS",
                                          help="Event kinds, comma-separated or repeated."),
    severity: str | None = typer.Option(None, "--severity", metavar="LEVEL",
                                        help="This level and above: info | warning | critical."),
    model: str | None = typer.Option(None, "--model", metavar="MODEL",
                                     help="student | teacher | projection (or a model your own loop named)."),
    rank: int | None = typer.Option(None, "--rank", metavar="N", parser=whole_number,
                                    help="Events of this process only (torchrun runs)."),
    module: str | None = typer.Option(None, "--module", metavar="REGEX",
                                      help="Regex searched in module and tensor names, in any case."),
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
    from .presentation.query import (
        FORMATS,
        EventFilter,
        RunEnded,
        follow_events,
        last_step,
        print_events,
        query_events,
    )

    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r}{did_you_mean(fmt, FORMATS)}: choose one of {', '.join(FORMATS)}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise BadInput(f"--idle-timeout must be > 0 seconds, got {idle_timeout}")
    if idle_timeout is not None and not follow:
        raise BadInput("--idle-timeout only applies with --follow (it ends following after that long without a write)")
    flt = EventFilter(kinds=kind or [], severity=severity, model=model, rank=rank, module=module, steps=step,
                      grep=grep)
    if follow:
        query_events(run_dir, flt)  # the directory, --model and --rank checked before following
        try:
            follow_events(run_dir, flt, fmt, idle_timeout=idle_timeout)
        except RunEnded as exc:
            print(f"sarkd-diag: {_one_line(exc)}", file=sys.stderr)
            return 1
        return 0
    everything = query_events(run_dir)
    flt.check_against(everything)
    why_none = flt.past_the_end(last_step(run_dir)) or flt.unmatched_module(everything)
    print_events(flt.apply(everything), fmt, total=len(everything), why_none=why_none)
    return 0


@app.command(cls=Command, short_help="Assert expectations of recorded runs: a gate for CI.")
def check(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory or a compare-precision directory (every run)."),
    expect: list[str] | None = typer.Option(None, "--expect", metavar="NAMES", help="master-fp32 | "
                                            "no-nonfinite-params | no-critical | completed; comma-separated or "
                                            "repeated."),
    max_skipped_steps: int | None = typer.Option(None, "--max-skipped-steps", metavar="N", parser=whole_number,
                                                 help="At most N skipped steps."),
    max_eval_ppl: float | None = typer.Option(None, "--max-eval-ppl", metavar="X",
                                              help="Final validation perplexity at most X."),
) -> int:
    """Assert expectations of recorded runs: exit 0 when all hold, 1 with one line per failed expectation."""
    from .presentation.query import check_runs, expectations, find_runs, modes_not_run, run_directory

    find_runs(run_dir)  # a wrong RUN_DIR is said first: it is the first thing typed
    checks = expectations(expect or [], max_skipped_steps, max_eval_ppl)
    failures, runs = check_runs(run_dir, checks)
    for line in failures:
        typer.echo(line)
    if not failures:
        missing = modes_not_run(run_directory(run_dir))  # of a comparison: asked for, never run, said beside the ok
        typer.echo(f"{run_dir}: ok — {', '.join(checks)} {'holds' if len(checks) == 1 else 'hold'} for "
                   f"{counted(runs, 'run')}" + (f" ({', '.join(missing)}, asked for, did not run)" if missing else ""))
    return 1 if failures else 0


@app.command("estimate-memory", cls=ConfigCommand.taking(MEMORY_OPTIONS),
             short_help="Device memory per precision mode, before a run.")
def estimate_memory_command(
    ctx: typer.Context,
    config: Path | None = CONFIG_FILE,
    modes: list[str] | None = typer.Option(None, "--modes", metavar="MODES", help="Precision modes, comma-separated "
                                           "or repeated (default: all five)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (bytes) for programs."),
) -> int:
    """Device memory per precision mode — weights, gradients, masters, optimizer state, activations — before a run."""
    from .contract.config import comparison_modes
    from .presentation.terminal import Console
    from .train.memory import breakdown_table, estimate_memory

    if config and modes is None:  # a comparison's own options file: its modes too
        modes = comparison_modes(config)
    report = estimate_memory(build_config(given_options(ctx), config), modes=modes)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return 0
    console = Console()
    for shape in (report.teacher, report.student):
        params = counted(shape.params, "parameter", number=f"{shape.params:,}")
        console.print(f"{shape.name}: {params} ({shape.router_params:,} in routers), "
                      f"{counted(shape.layers, 'layer')}, hidden {shape.hidden}, vocab {shape.vocab}")
    per_gpu = f", per GPU of {report.ranks}" if report.ranks > 1 else ""
    console.print(breakdown_table(report.estimates, title=f"estimated device memory, batch {report.batch} × "
                                                          f"block {report.block}{per_gpu}"))
    for note in report.notes:
        console.print(note)
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is_usage_error(exc: Exception) -> bool:
    """A command-line usage error (unknown option, bad value): click's, or the copy of click typer vendors."""
    return "UsageError" in _kinds(exc) and hasattr(exc, "format_message")


def _kinds(exc: Exception) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


# ------------------------------------------------------------------------------------ usage errors
# Names other tools give these options (transformers' TrainingArguments, most training scripts): an unknown
# option that is one of them is answered with this tool's own.
KNOWN_ELSEWHERE = {
    **{f"--{name.replace('_', '-')}": f"--{meant.replace('_', '-')}" for name, meant in OTHER_TOOLS_NAMES.items()},
    **{f"--{name.replace('_', '-')}": setting.replace("`", "") for name, setting in OTHER_TOOLS_SETTINGS.items()},
    "--precisions": "--modes", "--mode": "--modes", "--model": "--student-model and --teacher-model",
    "--precision": "--modes",  # estimate-memory takes the modes to estimate
    "--json": "--format json", "--format": "--json",  # events has --format; env and estimate-memory have --json
}


def usage_message(exc: Exception, args: list[str]) -> str:
    """click's usage error `exc` (of the command line `args`) as the one line this tool prints for bad input: what
    was wrong, named as the user typed it, and what to type instead — click's own words say neither
    ("Invalid value for '--train-steps' / '--train_steps': Input should be a valid integer, ...")."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        command = ctx.command
        name = ctx.info_name if ctx.parent is not None else None  # None: sarkd-diag itself
    else:  # click leaves some errors without their context: the command is the first word that names one
        group = typer.main.get_command(app)
        name = next((a for a in args if a in group.commands), None)
        command = group.commands[name] if name else group
    where = f"`sarkd-diag {name} -h`" if name else "`sarkd-diag -h`"
    kinds = _kinds(exc)
    message = _one_line(getattr(exc, "message", "") or exc.format_message())
    if "NoSuchOption" in kinds and command is not None:
        return _no_such_option(exc.option_name, command, name, where, args)
    if "MissingParameter" in kinds and getattr(exc, "param", None) is not None and name:
        param = exc.param
        what = _help_of(param)
        return f"{name} needs {_shown_name(param)}" + (f": {what}" if what else f" ({where})")
    if "BadOptionUsage" in kinds and message.endswith("requires an argument."):
        param = _param_of(command, exc.option_name)
        what = _help_of(param) if param is not None else ""
        return f"{exc.option_name} needs a value" + (f": {what}" if what else f" ({where})")
    if "BadParameter" in kinds and getattr(exc, "param", None) is not None:
        return _bad_value(exc.param, args, message)
    if message.startswith("No such command") and command is not None:
        typed = message.split("'")[1] if message.count("'") >= 2 else ""
        return _no_such_command(typed, list(getattr(command, "commands", {})))
    if message.startswith("Got unexpected extra argument") and command is not None:
        extra = message[message.rfind(" (") + 2:message.rfind(")")]  # click's "... argument(s) (x y)"
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if not arguments:
            if name and Path(extra).expanduser().is_dir() and "--output-dir" in _shown_options(command):
                return (f"{name} takes options only, no argument: {extra!r} is not an option; a run directory is given "
                        f"as --output-dir {extra} ({where})")
            return f"{name or 'sarkd-diag'} takes options only, no argument: {extra!r} is not an option ({where})"
        return f"{name} takes one {_shown_name(arguments[0])}, not also {extra!r} (a path with spaces needs quotes)"
    return f"{message} ({where})"


def _no_such_option(typed: str, command, name: str | None, where: str, args: list[str]) -> str:
    spelled = "--" + typed[2:].replace("_", "-") if typed.startswith("--") else typed
    here = _shown_options(command)
    if spelled in here:  # the underscore spelling of an option that has none (`check --max_eval_ppl`)
        return f"{typed}: write {spelled} ({where})"
    config = {opt for option in CONFIG_OPTIONS.values() for opt in _dashed(option.declarations)}
    owner = f"{name or 'sarkd-diag'} has no option {typed}"
    elsewhere = KNOWN_ELSEWHERE.get(spelled)
    if elsewhere is not None and elsewhere.split()[0] in here:
        return f"{owner}: write {elsewhere}"
    argument = next((p for p in command.params if p.param_type_name == "argument"), None)
    given = _given_as_option(typed, args)
    if argument is not None and given is not None and name in args and Path(given[1]).expanduser().exists():
        # `report --output-dir RUN`, `check --run RUN ...`: the run directory typed as an option
        fixed = [*args[:args.index(name) + 1], given[1], *(a for i, a in enumerate(args)
                                                         if i > args.index(name) and i not in given[0])]
        return f"{owner}: {name} takes the {_shown_name(argument)} as its argument (`{shell_command(*fixed)}`)"
    if spelled in config and name:  # one of train's options that this command does not take
        return f"{owner} (a `train` option; {where} lists its own)"
    takers = [] if name else [n for n, c in command.commands.items() if spelled in _shown_options(c)]
    if takers:  # `sarkd-diag --precision fp32 train`: a command's option, typed before the command (not --version)
        meant = next((a for a in args if a in takers), takers[0])
        return f"{owner}: options of a command go after it (`sarkd-diag {meant} {typed} ...`)"
    close = closest(spelled[2:], sorted(option[2:] for option in here))  # the shared `--` is no likeness
    if close:
        return f"{owner}: did you mean --{close}?"
    return f"{owner} ({where} lists them)"


def _given_as_option(option: str, args: list[str]) -> tuple[set[int], str] | None:
    """Where `option` and its value were typed (`--run-dir RUN` or `--run-dir=RUN`: their places in `args`) and the
    value; None when it came without one."""
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return {i, i + 1}, args[i + 1]
        if arg.startswith(option + "="):
            return {i}, arg[len(option) + 1:]
    return None


def _no_such_command(typed: str, commands: list[str]) -> str:
    close = closest(typed, commands)
    hint = f"did you mean {close}?" if close else f"the commands are {', '.join(commands)}"
    return f"sarkd-diag has no command {typed!r}: {hint}"


def _bad_value(param, args: list[str], message: str) -> str:
    """A value that does not parse as its option's type: `--max-eval-ppl 'abc': not a number`."""
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    typed, value = names[0], None
    for i, arg in enumerate(args):
        for opt in names:
            if arg == opt and i + 1 < len(args):
                typed, value = opt, args[i + 1]
            elif arg.startswith(opt + "="):
                typed, value = opt, arg[len(opt) + 1:]
    kind = value_type(getattr(getattr(param, "type_descriptor", None), "annotation", None))
    kind = (get_args(kind) or (kind,))[0] if get_origin(kind) is list else kind
    expected = {int: "not a whole number", float: "not a number"}.get(kind)
    if param.param_type_name == "argument":
        return f"{_shown_name(param)} {value!r}: {message}"
    if expected is None:
        return f"{typed} {value!r}: {message}" if value is not None else f"{typed}: {message}"
    return f"{typed} {value!r}: {expected}" + (f" ({param.metavar})" if param.metavar else "")


def _shown_options(command) -> set[str]:
    """Every option `command` takes, as its help shows them (dashed; --no- forms of flags included)."""
    return {opt for p in command.params if p.param_type_name == "option"
            for opt in [*p.opts, *p.secondary_opts] if opt.startswith("--") and not _is_alias(opt)}


def _dashed(declarations: list[str]) -> set[str]:
    return {opt for decl in declarations for opt in decl.split("/") if not _is_alias(opt)}


def _param_of(command, option: str):
    return next((p for p in getattr(command, "params", []) if option in [*p.opts, *p.secondary_opts]), None)


def _help_of(param) -> str:
    """An option's or argument's help, without its `[default: ...]` and final stop, to follow a colon."""
    text = _one_line(getattr(param, "help", None) or "")
    text = text.split(" [default:")[0].rstrip(".")
    return text[:1].lower() + text[1:] if len(text) > 1 and not text[1].isupper() else text  # not `YAML`


def _shown_name(param) -> str:
    return param.metavar or param.name.upper()


BOOLEAN_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _check_flag_values(args: list[str]) -> None:
    """`--use-scheduler true`: a flag takes no value; say so rather than 'unexpected extra argument (true)'. And an
    empty argument where a command takes its RUN_DIR (`sarkd-diag report "$RUN"` with RUN unset): click reads '' as
    the current directory, which is no run the user meant."""
    flags = set().union(*(option.flags for option in CONFIG_OPTIONS.values()))
    for flag, value in zip(args, args[1:], strict=False):
        if flag in flags and value.lower() in BOOLEAN_VALUES:
            positive = flag.replace("--no-", "--").replace("--no_", "--").replace("_", "-")
            raise BadInput(f"{flag} is a flag and takes no value ({value!r}): write {positive} to turn it on, "
                           f"--no-{positive[2:]} to turn it off")
    commanded = bool(args) and args[0] in RUN_DIR_COMMANDS
    empty = next((arg for arg in _positionals(args) if not arg.strip()), None) if commanded else None
    if empty is not None:  # wherever it stands: `check --expect completed "$RUN"` checked the current directory
        raise BadInput(f"an empty argument ({empty!r}: an unset shell variable?) where {args[0]} takes RUN_DIR; "
                       "give a run directory")
    _check_forgotten_values(args)


def _positionals(args: list[str]) -> list[str]:
    """The arguments of the command line `args` (its command first) that are no option nor an option's value, as
    click reads them: after `--` every word is one."""
    command = typer.main.get_command(app).commands.get(args[0]) if args else None
    if command is None:
        return []
    takes_value = {opt for p in command.params if p.param_type_name == "option" and not p.is_flag
                   for opt in [*p.opts, *p.secondary_opts]}
    positionals, words = [], iter(args[1:])
    for word in words:
        if word == "--":
            positionals += list(words)
        elif word.startswith("-") and len(word) > 1:
            if word in takes_value:
                next(words, None)  # its value (`--severity ''` is that option's, refused as an empty option)
        else:
            positionals.append(word)
    return positionals


def _check_forgotten_values(args: list[str]) -> None:
    """`train --output-dir --train-steps 3`: click takes the next option as the value (a run directory named
    `--train-steps`) and then calls `3` an argument train does not take. An option followed by one of its command's
    options had its value left out: say that."""
    command = typer.main.get_command(app).commands.get(args[0]) if args else None
    if command is None:
        return
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in [*p.opts, *p.secondary_opts]}
    for typed, following in zip(args, args[1:], strict=False):
        param = options.get(typed)
        if param is not None and not param.is_flag and following in options:
            what = _help_of(param)
            raise BadInput(f"{typed} needs a value, and the next word is the option {following}"
                           + (f" ({typed}: {what})" if what else ""))


RUN_DIR_COMMANDS = ("report", "events", "check")  # the commands whose first argument is a run directory


def _invoke(args: list[str]) -> Any:
    """Run the command line: the command's return value, or the code of an exit it asked for (--help, --version).

    Typer's own runner is left out on purpose: it ends a broken pipe (`sarkd-diag events RUN | head`) with a silent
    exit 1, where `main` ends it quietly with 141, whichever command was printing."""
    command = typer.main.get_command(app)
    try:
        with command.make_context("sarkd-diag", args) as ctx:
            return command.invoke(ctx)
    except typer.Exit as exc:
        return exc.exit_code
    except EOFError:  # a prompt's input ended
        raise typer.Abort() from None


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0/1 from the command (1 too for a full disk), 2 for bad input, 3 for an internal error,
    130/143 interrupted, 141 when the reader of the output went away (`| head`: quietly, as a Unix tool ends on
    SIGPIPE)."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]  # the bare command: its help
    try:
        _check_flag_values(args)
        code = _invoke(args)
        sys.stdout.flush()  # what is still buffered goes now: a closed pipe shows here, not in Python's exit
    except BadInput as exc:
        print(f"sarkd-diag: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("sarkd-diag: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError as exc:
        from .presentation.terminal import PIPE_CLOSED, discard_output, output_closed

        if not output_closed():  # a pipe of something else broke: that is an error, not the reader leaving
            _internal_error(exc)
        discard_output()
        sys.exit(PIPE_CLOSED)
    except Exception as exc:
        if _is_usage_error(exc):
            print(f"sarkd-diag: error: {usage_message(exc, args)}", file=sys.stderr)
            sys.exit(2)
        if no_space_left(exc):  # `report` of a run on a full disk: no bug, and nothing a traceback file could hold
            print(f"sarkd-diag: no space left on device: {type(exc).__name__}: {_one_line(exc)} — free space, then run "
                  "the command again", file=sys.stderr)
            sys.exit(1)
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(exc: Exception) -> NoReturn:
    """An internal error: one line here, the traceback in a file, exit 3."""
    path = Path.cwd() / "sarkd-diag-error.txt"
    try:
        path.write_text(traceback.format_exc())
        where = f" (traceback in {path})"
    except OSError:
        where = ""
    print(f"sarkd-diag: internal error: {type(exc).__name__}: {_one_line(exc)}{where}", file=sys.stderr)
    sys.exit(3)
