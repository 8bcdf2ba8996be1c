"""The dynamic loss scaler: its scale each step, skipped steps, backoffs and growths.

GradScaler skips a step exactly when it backs off, so a fall of the scale is a skipped step. The consecutive skips
of the first steps, while the scaler finds its scale, are it working (info) — unless they bring the scale down to
MIN_WARMUP_SCALE: every scale above it overflowed, so some gradient exceeds float16's largest value over twice that
scale before any scaling (a loss term weighted far too high), and each halving was a step lost — judged on a skip
whose loss was finite (a non-finite loss's gradients are non-finite at any scale: its skip says nothing, but neither
does it unsay the finite ones after it, which overflowed at the scale it left); after
the warm-up more than MAX_SKIP_STREAK skips in a row, or halvings over MAX_SKIP_FRACTION of the steps since it ended
that its growths did not win back (its own skips are the floor's to judge: six halvings are not 30% of a 20-step run
lost), is a warning, and a scale below 1 is critical (gradients are being shrunk, not protected). GradScaler doubles
the scale after `growth_interval` clean steps (2000 by default: a collapse's halvings stand); one that doubles every
step or few (`growth_interval=1`) hovers at its ceiling, each growth overflowing and skipping the step after it — many
steps lost while the scale keeps its level: no fall, the growth interval's doing (a `scaler_growth_too_fast` note).
A run that ends with the warm-up still going — every step
skipped, the scale never low enough — applied no update at all: the scaler started too high for the run's length (a
`scaler_never_settled` note, when the probes close) — unless every step's loss was itself non-finite: gradients of a
NaN loss are non-finite at any scale, and that is the loss's cause, not the scale's.

GradScaler never steps the optimizer on a step it skips: where the one optimizer stepped on such a step (its
pre-step hook ran) someone else called it — `optimizer.step()` left in a loop beside `scaler.step(optimizer)` — and
applied the very gradients the scaler skipped as non-finite (an `optimizer_stepped_twice` note, once).
"""

from __future__ import annotations

import math

import torch

from ..contract.numerics import FP16_MAX
from .base import Probe, optimizers_of

# a warm-up that halves the scale down to this has met gradients above FP16_MAX / (2 × 128) ≈ 256: a healthy loss's
# gradients settle GradScaler within a few halvings of its 2**16 (a KD term weighted 1e3 settles at 8192)
MIN_WARMUP_SCALE = 128.0
MAX_SKIP_STREAK = 5
MAX_SKIP_FRACTION = 0.10
MIN_STEPS_FOR_FRACTION = 20


class ScalerProbe(Probe):
    name = "scaler"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._previous: float | None = None
        self._warming_up = True
        self._streak = self._steps = 0
        self._settled_steps = self._settled_skips = 0  # steps after the warm-up, and those of them skipped
        self._settled_growths = 0  # steps after the warm-up whose scale doubled
        self._warned_growth = False
        self._warned_streak = self._warned_fraction = self._warned_warmup = self._below_one = False
        self._first_skipped = False
        self._skip_beyond_the_loss = False  # a step skipped with its loss finite (or not handed over): for the scale
        self._initial: float | None = None  # the scale the first step started from (once, before it)

    def begin_step(self) -> None:
        if self._initial is None and self._previous is None and self.ctx.loss_scaler.enabled:
            self._initial = float(self.ctx.loss_scaler.factor())

    def take_readings(self) -> dict[str, torch.Tensor]:
        scale = self.ctx.loss_scaler.scale()
        return {} if scale is None else {"loss_scale": scale}

    def record(self, host: dict) -> dict:
        scale = host.get("loss_scale")
        if scale is None:
            return {}
        skipped = scale < (self._previous if self._previous is not None else self._initial or 0.0)
        grew = self._previous is not None and scale > self._previous
        first_reading = self._previous is None
        self._previous = scale
        terms = host.get("loss_terms") or []
        # a non-finite loss makes non-finite gradients at any scale: that skip says nothing of the scale
        loss_finite = all(map(math.isfinite, terms))
        self._skip_beyond_the_loss |= skipped and loss_finite
        if skipped and self.ctx.optimizer_ran and len(optimizers_of(self.ctx.optimizer)) == 1:
            self._stepped_past_skip()
        if first_reading:
            self._first_skipped = skipped
            return {"loss_scale": scale}  # the first step's skip is the scaler finding its scale: no event
        self._steps += 1
        self._warming_up = self._warming_up and skipped
        if not self._warming_up:
            self._settled_steps += 1
            self._settled_skips += int(skipped)
            self._settled_growths += int(grew)
        if skipped:
            self._streak += 1
            phase = "while finding its scale" if self._warming_up else "after an overflow"
            self.ctx.events.record("scaler_skip", "info",
                                   f"loss scaler skipped step {self.ctx.step} {phase}; scale now {scale:g}",
                                   step=self.ctx.step, phase="optimizer", probe=self.name, value=scale,
                                   code="scaler_skip_warmup" if self._warming_up else "scaler_skip_overflow")
        else:
            self._streak = 0
        # the floor's claim — gradients this large before any scaling — stands on a skip the gradients made, one whose
        # loss was finite: it overflowed at twice this scale, however the halvings before it came (a skip of a
        # non-finite loss overflows at any scale and says nothing)
        if self._warming_up and skipped and loss_finite and scale <= MIN_WARMUP_SCALE and not self._warned_warmup:
            self._warned_warmup = True
            self._backoff(f"its warm-up skipped every step up to step {self.ctx.step}, down to a scale of {scale:g} — "
                          f"some gradient exceeds {FP16_MAX / (2 * scale):.3g} before any scaling", scale,
                          "warmup_scale_low")
        if not self._warming_up and self._streak > MAX_SKIP_STREAK and not self._warned_streak:
            self._warned_streak = True
            self._backoff(f"{self._streak} skipped steps in a row", scale, "skip_streak")
        judged = self._settled_steps >= MIN_STEPS_FOR_FRACTION
        lost = self._settled_skips / max(self._settled_steps, 1)
        fell = (self._settled_skips - self._settled_growths) / max(self._settled_steps, 1)  # halvings not won back
        if judged and fell > MAX_SKIP_FRACTION and not self._warned_fraction:
            self._warned_fraction = True
            self._backoff(f"{lost:.0%} of the {self._settled_steps} steps since its warm-up skipped", scale,
                          "skip_fraction")
        elif judged and lost > MAX_SKIP_FRACTION and not self._warned_fraction and not self._warned_growth:
            self._warned_growth = True
            self._growth_too_fast(lost, scale)
        if scale < 1 and not self._below_one:
            self._below_one = True
            self.ctx.events.record("scale_below_one", "critical",
                                   f"loss scale fell to {scale:g} at step {self.ctx.step}: gradients overflow "
                                   "even unscaled", step=self.ctx.step, phase="optimizer", probe=self.name,
                                   value=scale)
        return {"loss_scale": scale, "scaler_grew": int(grew)}

    def conclude(self) -> None:
        """Every step of the run skipped while the scaler was still finding its scale (and no floor or scale below 1
        said why): not one update was applied — the run ended before the scale came down to one that fits. Not where
        the loss itself was non-finite on every step: those skips are the loss's (`nonfinite_loss`), at any scale."""
        if not (self._first_skipped and self._warming_up and self._steps and self._skip_beyond_the_loss) \
                or self._warned_warmup or self._below_one:
            return
        steps = self._steps + 1
        self.ctx.events.record("setup_note", "warning",
                               f"the loss scaler skipped all {steps} steps of the run while finding its scale (now "
                               f"{self._previous:g}): no update was applied, nothing trained",
                               step=self.ctx.step - 1, phase="optimizer", probe=self.name, value=self._previous,
                               numel=steps, code="scaler_never_settled")

    def _growth_too_fast(self, lost: float, scale: float) -> None:
        interval = self.ctx.loss_scaler.growth_interval()
        self.ctx.events.record("setup_note", "warning",
                               f"the loss scaler skipped {lost:.0%} of the {self._settled_steps} steps since its "
                               f"warm-up while its scale kept its level ({self._settled_growths} doublings won back "
                               f"the halvings; {scale:g} at step {self.ctx.step}): its growth_interval is {interval}, "
                               "so it doubles into an overflow and loses the step after — the scale itself is fine: "
                               "keep GradScaler's default growth_interval=2000", step=self.ctx.step,
                               phase="optimizer", probe=self.name, value=interval, code="scaler_growth_too_fast")

    def _stepped_past_skip(self) -> None:
        if not self.ctx.events.say_once("optimizer_stepped_twice"):  # also seen by the step hooks: said once
            return
        self.ctx.events.record("setup_note", "warning",
                               f"the optimizer stepped at step {self.ctx.step}, a step the loss scaler skipped for "
                               "non-finite gradients — scaler.step(optimizer) never steps then, so optimizer.step() "
                               "is called besides it and applied the gradients it skipped: call "
                               "scaler.step(optimizer) alone", step=self.ctx.step, phase="optimizer",
                               probe=self.name, model=self.ctx.model_stepped_by(optimizers_of(self.ctx.optimizer)[0]),
                               code="optimizer_stepped_twice")

    def _backoff(self, what: str, scale: float, code: str) -> None:
        self.ctx.events.record("scaler_backoff", "warning",
                               f"loss scale keeps falling: {what} (scale {scale:g} at step {self.ctx.step})",
                               step=self.ctx.step, phase="optimizer", probe=self.name, value=scale, code=code)
