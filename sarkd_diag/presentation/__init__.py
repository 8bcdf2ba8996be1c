"""Presentation: closing a run, report.md/.html, the figures, the events queries, the console, TensorBoard, env.

Layers: docs/architecture.md."""
