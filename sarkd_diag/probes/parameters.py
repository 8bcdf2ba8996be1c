"""Weights after each optimizer step: which tensors turned non-finite, how many elements, first step."""

from __future__ import annotations

import math

import torch

from .base import Probe, abs_max, nonfinite_counts


class ParameterProbe(Probe):
    name = "parameters"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._amax: torch.Tensor | None = None
        self._params = [w.param for w in ctx.watched]
        self._reported: set[str] = set()

    def after_optimizer_step(self) -> None:
        if not self.ctx.weights_read_by_owner:  # sarkd-diag's loop reads them for its guard and hands them over
            self._amax = abs_max(self._params)

    def take_readings(self) -> dict[str, torch.Tensor]:
        amax, self._amax = self._amax, None
        return {"param_amax": amax} if amax is not None else {}

    def record(self, host: dict) -> dict:
        amax = host.get("param_amax")
        if amax is None:
            return {}
        bad = [i for i, v in enumerate(amax) if not math.isfinite(v)]
        for i in bad:
            w = self.ctx.watched[i]
            if w.tensor in self._reported:
                continue
            self._reported.add(w.tensor)
            counts = nonfinite_counts(w.param.detach())
            self.ctx.events.record(
                "nonfinite_param", "critical",
                f"{w.model} weight {w.tensor} is non-finite after optimizer step {self.ctx.step} "
                f"({counts['nan_count']} NaN, {counts['posinf_count']} +Inf, {counts['neginf_count']} -Inf "
                f"of {counts['numel']})",
                step=self.ctx.step, phase="optimizer", probe=self.name, model=w.model, module=w.module,
                tensor=w.tensor, dtype=self.ctx.dtype_of(w.param), value=amax[i], **counts)
        finite = [v for v in amax if math.isfinite(v)]
        return {"param_amax": max(finite) if finite else math.nan, "nonfinite_param_tensors": len(bad)}
