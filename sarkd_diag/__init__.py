"""sarkd-diag: precision debugging for knowledge distillation of causal language models."""

__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402
from .probes import Probes  # noqa: E402
from .rundir import load_run  # noqa: E402


def distill(config=None, **options):
    """Run knowledge distillation (see sarkd_diag.train.loop.distill)."""
    from .train.loop import distill as _distill

    return _distill(config, **options)


def compare_precision(modes=None, **options):
    """Run the same distillation in several precision modes, side by side (see sarkd_diag.compare)."""
    from .compare import compare_precision as _compare

    return _compare(modes, **options)


__all__ = ["DistillConfig", "Probes", "compare_precision", "distill", "load_run", "__version__"]
