"""Gradients as the optimizer is about to use them (unscaled): the first non-finite module in backward
order, and magnitudes fp16 could not hold (metrics, not warnings: nearly every run has some).

At `standard` one reduction per tensor and step gives its absolute max; backward order is taken as
the reverse of registration (the output end first). At `full`, post-accumulate hooks record the order
in which gradients actually arrived.
"""

from __future__ import annotations

import itertools
import math

import torch

from .base import FP16_MAX, Probe, abs_max, nonfinite_counts, sampled

FP16_TINY = float(torch.finfo(torch.float16).tiny) * 2.0**-10  # smallest fp16 subnormal


class GradientProbe(Probe):
    name = "gradients"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._amax = None
        self._grads: list[torch.Tensor | None] = []
        self._underflow = None
        self._arrival: dict[int, int] = {}
        self._clock = itertools.count()
        self._handles = []
        self._in_episode = False  # one event per stretch of steps with non-finite gradients
        if ctx.level == "full":
            for i, w in enumerate(ctx.watched):
                self._handles.append(w.param.register_post_accumulate_grad_hook(self._arrived(i)))

    def _arrived(self, index: int):
        def hook(_param):
            self._arrival.setdefault(index, next(self._clock))
        return hook

    def begin_step(self) -> None:
        self._arrival.clear()

    def before_optimizer_step(self) -> None:
        self._grads = [w.param.grad for w in self.ctx.watched]
        present = [g for g in self._grads if g is not None]
        if not present:
            return
        amax = abs_max(present).float()
        if len(present) < len(self._grads):  # tensors without a gradient this step read 0
            where = torch.tensor([g is not None for g in self._grads], device=amax.device)
            amax = amax.new_zeros(len(self._grads)).masked_scatter_(where, amax)
        self._amax = amax
        if self.ctx.stats_step:  # estimated on a fixed sample of each tensor
            s = sampled(present)
            live = s != 0
            self._underflow = torch.stack([(live & (s.abs() < FP16_TINY)).sum(), live.sum()]).float()

    def readings(self) -> dict[str, torch.Tensor]:
        out = {}
        if self._amax is not None:
            out["grad_amax"] = self._amax
        if self._underflow is not None:
            out["grad_underflow"] = self._underflow
        self._amax = self._underflow = None
        return out

    def after_step(self, host: dict) -> dict:
        amax = host.get("grad_amax")
        metrics: dict = {}
        if host.get("grad_underflow") is not None:
            tiny, nonzero = host["grad_underflow"]
            metrics["grad_fp16_underflow_fraction"] = tiny / nonzero if nonzero else 0.0
        if amax is None:
            self._grads = []
            return metrics
        finite = [v for v in amax if math.isfinite(v)]
        metrics["grad_amax"] = max(finite) if finite else math.nan
        metrics["grad_fp16_overflow_tensors"] = sum(1 for v in finite if v > FP16_MAX)
        bad = [i for i, v in enumerate(amax) if not math.isfinite(v)]
        metrics["nonfinite_grad_tensors"] = len(bad)
        if bad and not self._in_episode:
            self._report(bad, amax)
        self._in_episode = bool(bad)
        self._grads = []
        return metrics

    def _report(self, bad: list[int], amax: list[float]) -> None:
        if self._arrival:
            order = sorted(bad, key=lambda i: self._arrival.get(i, math.inf))
        else:
            order = sorted(bad, reverse=True)
        first = order[0]
        w = self.ctx.watched[first]
        grad = self._grads[first]
        counts = nonfinite_counts(grad) if grad is not None else {}
        self.ctx.events.record(
            "nonfinite_grad", "critical",
            f"gradient of {w.model} {w.tensor} is non-finite at step {self.ctx.step} — the first of {len(bad)} "
            f"tensor(s) in backward order",
            step=self.ctx.step, phase="backward", probe=self.name, model=w.model, module=w.module,
            tensor=w.tensor, dtype=self.ctx.dtype_of(grad if grad is not None else w.param), value=amax[first],
            **counts)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
