"""The command line: a thin Typer layer over the Python API.

`train`'s options are generated from DistillConfig's fields (dashes and underscores both accepted,
every boolean with its --no- form), so the CLI, --config files and a run's config.json stay one list.
Errors in what the user typed end as one line on stderr and exit 2.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from dataclasses import fields
from pathlib import Path

import click
import typer

from .config import DistillConfig, build_config
from .errors import BadInput

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Precision debugging for knowledge distillation of causal language models.")

_TYPES = {"bool": bool | None, "int": int | None, "float": float | None, "str": str | None,
          "str | None": str | None, "list[str] | None": list[str] | None}


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
        default = f.default if f.default is not None else "none"
        option = typer.Option(None, *decls, help=f"{f.metadata['help']} [default: {default}]",
                              show_default=False)
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


CONFIG_FILE = typer.Option(None, "--config", help="YAML or JSON file of options (a run's config.json works too).")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@_with_config_options()
def train(config: Path | None = CONFIG_FILE, **options) -> int:
    """Distil the teacher into the student (the production path; --precision auto by default)."""
    from .train.loop import distill

    cfg = build_config(options, config)
    if cfg.nproc > 1:
        raise BadInput("--nproc above 1 (torchrun) is not supported yet")
    result = distill(cfg)
    return result.exit_code


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
def report(run_dir: Path = typer.Argument(..., help="A run directory, finished or not.")) -> int:
    """Rebuild summary.json, the parquet files and report.md of any run, even one that crashed."""
    from .rundir import STATUSES, finalize_run

    if not (run_dir / "config.json").is_file():
        raise BadInput(f"{run_dir} is not a sarkd-diag run directory (no config.json)")
    status = "crashed"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text()).get("status")
        except ValueError:
            previous = None
        status = previous if previous in STATUSES else "crashed"
    summary = finalize_run(run_dir, status)
    typer.echo(f"{run_dir}: {summary['status']}, {summary['steps_completed']} steps, "
               f"{len(summary['diagnosis'])} cause(s); wrote summary.json, metrics.parquet, events.parquet, "
               "report.md")
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0/1 from the command, 2 for bad input, 3 for an internal error, 130/143 interrupted."""
    try:
        code = app(args=argv, prog_name="sarkd-diag", standalone_mode=False)
    except BadInput as exc:
        print(f"sarkd-diag: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.UsageError as exc:
        print(f"sarkd-diag: error: {_one_line(exc.format_message())}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("sarkd-diag: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # an internal error: one line here, the traceback in a file
        path = Path.cwd() / "sarkd-diag-error.txt"
        try:
            path.write_text(traceback.format_exc())
            where = f" (traceback in {path})"
        except OSError:
            where = ""
        print(f"sarkd-diag: internal error: {type(exc).__name__}: {_one_line(exc)}{where}", file=sys.stderr)
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)
