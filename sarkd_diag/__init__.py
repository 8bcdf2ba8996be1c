"""sarkd-diag: precision debugging for knowledge distillation of causal language models."""

from contextlib import contextmanager

from .contract.config import DistillConfig, in_keyword_terms, with_config_options  # light: no torch, no pandas
from .contract.errors import BadInput
from .contract.version import __version__

_LAZY = {"Probes": ("probes", "Probes"), "load_run": ("presentation.query", "load_run")}


def __getattr__(name: str):
    """Probes (torch) and load_run (pandas) are imported on first use, so `sarkd-diag --help` stays quick."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@with_config_options
def distill(config: DistillConfig | None = None, *, quiet: bool = False, **options):
    """Distil a teacher into a student (the embedded default without arguments; a DistillConfig, with options:
    a copy of it with those changed); returns the run's result (run_dir, status, summary, exit_code). `quiet`: no
    console output. A refusal (BadInput, a ValueError) names the keyword arguments, not the CLI's options."""
    from .train.loop import distill as _distill

    with keyword_terms(options):
        return _distill(config, quiet=quiet, **options)


def compare_precision(modes=None, **options):
    """Run the same distillation in several precision modes, side by side (see sarkd_diag.compare)."""
    from .compare import compare_precision as _compare

    given = {"modes": modes, "steps": None, **options}
    with keyword_terms(given):
        return _compare(modes, wording=lambda text: in_keyword_terms(text, given), **options)


@contextmanager
def keyword_terms(given: dict):
    """The refusals of an API call worded for its caller: `student_lr= must be > 0`, `precision='fp16' is
    ambiguous`, where the CLI's own say `--student-lr`, `--precision fp16` (`contract.config.in_keyword_terms`);
    `given`: the call's keyword arguments, its own (compare_precision's `modes`) named even when left out."""
    try:
        yield
    except BadInput as exc:
        raise BadInput(in_keyword_terms(str(exc), given)) from None


__all__ = ["DistillConfig", "Probes", "compare_precision", "distill", "load_run", "__version__"]
