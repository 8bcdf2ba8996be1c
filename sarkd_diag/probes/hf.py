"""Probes for Hugging Face Trainer and TRL users: one callback, the same events and diagnosis."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from . import Probes


class SarkdDiagCallback(TrainerCallback):
    """`Trainer(..., callbacks=[SarkdDiagCallback("runs/hf")])`: records events into a run directory.

    The probes attach to the model and the (unwrapped) optimizer when training begins; each optimizer
    step of the Trainer is one probe step. `callback.probes.diagnosis()` and `sarkd-diag report` work
    on the directory afterwards.
    """

    def __init__(self, run_dir: str | Path, level: str = "standard", every: int = 10):
        self.run_dir, self.level, self.every = Path(run_dir), level, every
        self.probes: Probes | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        scaler = getattr(kwargs.get("accelerator"), "scaler", None)
        self.probes = Probes(model, optimizer=optimizer, scaler=scaler, run_dir=self.run_dir, level=self.level,
                             every=self.every)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probes is not None:
            self.probes.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.probes is not None:
            self.probes.close()
