"""Lost updates: weights that did not change although the optimizer meant to change them.

On statistics steps the probe keeps a pre-step copy of a fixed sample of each trainable tensor (at
most ~4096 elements, see `base.sample`) and, after the step, counts sampled elements whose intended
update was non-zero (a non-zero gradient or, for Adam, a non-zero first moment) but whose stored value
is unchanged: the update was below half an ulp of the weight's dtype — the stagnation of pure-bf16 and
pure-fp16 training. The fraction is estimated on the sample.
"""

from __future__ import annotations

import torch

from .base import Probe, sample, sampled

LOST_UPDATE_WARNING = 0.10


class LostUpdateProbe(Probe):
    name = "updates"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._moving: list = []
        self._before: torch.Tensor | None = None
        self._counts = None
        self._reported = False

    def before_optimizer_step(self) -> None:
        if self.ctx.stats_step:
            self._moving = self._meant_to_move()
            self._before = sampled([w.param.detach() for w in self._moving]) if self._moving else None

    def _meant_to_move(self) -> list:
        """The watched tensors the optimizer means to change: a learning rate of 0 intends no update."""
        if self.ctx.optimizer is None:
            return list(self.ctx.watched)
        lr = {id(p): g.get("lr", 1.0) for g in self.ctx.optimizer.param_groups for p in g["params"]}
        return [w for w in self.ctx.watched if lr.get(id(w.param), 1.0) != 0]

    def after_optimizer_step(self) -> None:
        if self._before is None:
            return
        state = self.ctx.optimizer.state if self.ctx.optimizer is not None else {}
        after = sampled([w.param.detach() for w in self._moving])
        # intended: a non-zero gradient or, for Adam, a non-zero first moment
        meant = torch.cat([_sample_or_zeros(w.param.grad, w.param) for w in self._moving]) != 0
        moments = [state.get(w.param, {}).get("exp_avg") for w in self._moving]
        if any(m is not None for m in moments):
            meant |= torch.cat([_sample_or_zeros(m, w.param) for m, w in zip(moments, self._moving, strict=True)]) != 0
        lost = (after == self._before) & meant
        self._counts = torch.stack([lost.sum(), meant.sum()]).float()
        self._before = None

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


def _sample_or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The sample of `t`, or zeros where `like` has no such tensor (no gradient, no optimizer state yet)."""
    return sample(t) if t is not None else torch.zeros_like(sample(like))
