"""The dynamic loss scaler: its scale each step, skipped steps, backoffs and growths.

GradScaler skips a step exactly when it backs off, so a fall of the scale is a skipped step. The
consecutive skips of the first steps, while the scaler finds its scale, are it working (info); after
that more than MAX_SKIP_STREAK skips in a row, or over MAX_SKIP_FRACTION of the steps, is a warning,
and a scale below 1 is critical (gradients are being shrunk, not protected).
"""

from __future__ import annotations

import torch

from .base import Probe

MAX_SKIP_STREAK = 5
MAX_SKIP_FRACTION = 0.10
MIN_STEPS_FOR_FRACTION = 20


class ScalerProbe(Probe):
    name = "scaler"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._previous: float | None = None
        self._warming_up = True
        self._streak = self._skips = self._steps = 0
        self._warned_streak = self._warned_fraction = self._below_one = False

    def take_readings(self) -> dict[str, torch.Tensor]:
        scale = self.ctx.loss_scaler.scale()
        return {} if scale is None else {"loss_scale": scale}

    def record(self, host: dict) -> dict:
        scale = host.get("loss_scale")
        if scale is None:
            return {}
        skipped = self._previous is not None and scale < self._previous
        grew = self._previous is not None and scale > self._previous
        first_reading = self._previous is None
        self._previous = scale
        if first_reading:
            return {"loss_scale": scale}  # the scale before any update: nothing to compare yet
        self._steps += 1
        self._warming_up = self._warming_up and skipped
        if skipped:
            self._skips += 1
            self._streak += 1
            phase = "while finding its scale" if self._warming_up else "after an overflow"
            self.ctx.events.record("scaler_skip", "info",
                                   f"loss scaler skipped step {self.ctx.step} {phase}; scale now {scale:g}",
                                   step=self.ctx.step, phase="optimizer", probe=self.name, value=scale,
                                   code="scaler_skip_warmup" if self._warming_up else "scaler_skip_overflow")
        else:
            self._streak = 0
        if not self._warming_up and self._streak > MAX_SKIP_STREAK and not self._warned_streak:
            self._warned_streak = True
            self._backoff(f"{self._streak} skipped steps in a row", scale, "skip_streak")
        fraction = self._skips / self._steps
        if (self._steps >= MIN_STEPS_FOR_FRACTION and fraction > MAX_SKIP_FRACTION and not self._warned_fraction
                and not self._warming_up):
            self._warned_fraction = True
            self._backoff(f"{fraction:.0%} of {self._steps} steps skipped", scale, "skip_fraction")
        if scale < 1 and not self._below_one:
            self._below_one = True
            self.ctx.events.record("scale_below_one", "critical",
                                   f"loss scale fell to {scale:g} at step {self.ctx.step}: gradients overflow "
                                   "even unscaled", step=self.ctx.step, phase="optimizer", probe=self.name,
                                   value=scale)
        return {"loss_scale": scale, "scaler_grew": int(grew)}

    def _backoff(self, what: str, scale: float, code: str) -> None:
        self.ctx.events.record("scaler_backoff", "warning",
                               f"loss scale keeps falling: {what} (scale {scale:g} at step {self.ctx.step})",
                               step=self.ctx.step, phase="optimizer", probe=self.name, value=scale, code=code)
