"""Lost updates: weights that did not change although the optimizer meant to change them.

On statistics steps the probe keeps a pre-step copy of a fixed sample of each trainable tensor (at
most ~4096 elements, see `base.sample`) and, after the step, counts sampled elements whose intended
update was non-zero (a non-zero gradient or, for Adam, a non-zero first moment) but whose stored value
is unchanged: the update was below half an ulp of the weight's dtype — the stagnation of pure-bf16 and
pure-fp16 training. The fraction is estimated on the sample.
"""

from __future__ import annotations

import torch

from .base import Probe, sample

LOST_UPDATE_WARNING = 0.10


class LostUpdateProbe(Probe):
    name = "updates"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._before: list[torch.Tensor] | None = None
        self._counts = None
        self._reported = False

    def before_optimizer_step(self) -> None:
        if self.ctx.stats_step:
            self._before = [sample(w.param.detach()).clone() for w in self.ctx.watched]

    def after_optimizer_step(self) -> None:
        if self._before is None:
            return
        lost = intended = None
        lr = {id(p): g.get("lr", 1.0) for g in self.ctx.optimizer.param_groups for p in g["params"]} \
            if self.ctx.optimizer is not None else {}
        for w, before in zip(self.ctx.watched, self._before, strict=True):
            if lr.get(id(w.param), 1.0) == 0:
                continue  # a learning rate of 0 intends no update
            g = w.param.grad
            state = self.ctx.optimizer.state.get(w.param, {}) if self.ctx.optimizer is not None else {}
            moment = state.get("exp_avg")
            meant = (sample(g) != 0) if g is not None else torch.zeros_like(before, dtype=torch.bool)
            if moment is not None:
                meant = meant | (sample(moment) != 0)
            unchanged = (sample(w.param.detach()) == before) & meant
            lost = unchanged.sum() if lost is None else lost + unchanged.sum()
            intended = meant.sum() if intended is None else intended + meant.sum()
        self._before = None
        if lost is not None:
            self._counts = torch.stack([lost.float(), intended.float()])

    def readings(self) -> dict[str, torch.Tensor]:
        out = {"lost_updates": self._counts} if self._counts is not None else {}
        self._counts = None
        return out

    def after_step(self, host: dict) -> dict:
        pair = host.get("lost_updates")
        if pair is None:
            return {}
        lost, intended = pair
        fraction = lost / intended if intended else 0.0
        if fraction > LOST_UPDATE_WARNING and not self._reported:
            self._reported = True
            dtypes = sorted({self.ctx.dtype_of(w.param) for w in self.ctx.watched})
            self.ctx.events.record(
                "lost_updates", "warning",
                f"{fraction:.0%} of intended weight updates were lost to rounding at step {self.ctx.step} "
                f"(weights in {', '.join(dtypes)})",
                step=self.ctx.step, phase="optimizer", probe=self.name, value=fraction, numel=int(intended),
                dtype=dtypes[0] if len(dtypes) == 1 else None)
        return {"lost_update_fraction": fraction}
