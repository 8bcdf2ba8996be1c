"""sarkd-diag: precision debugging for knowledge distillation of causal language models."""

__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402
from .probes import Probes  # noqa: E402
from .rundir import load_run  # noqa: E402


def distill(config=None, **options):
    """Run knowledge distillation (see sarkd_diag.train.loop.distill)."""
    from .train.loop import distill as _distill

    return _distill(config, **options)


__all__ = ["DistillConfig", "Probes", "distill", "load_run", "__version__"]
