"""The run contract and the foundation it stands on: options, events and their codes, the run directory, numeric
conventions and thresholds, the loss scaler's adapter, precision mode names, bad input, the version.

Layers: docs/architecture.md."""
