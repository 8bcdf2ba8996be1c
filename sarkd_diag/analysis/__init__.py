"""Analysis: from a run's events and metrics to causes (diagnose) and a comparison row to a verdict (verdicts).

Layers: docs/architecture.md."""
