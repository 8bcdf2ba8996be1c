"""The optimizer, checked against the dtype of the weights it updates.

Before the first step: is eps representable (AdamW's 1e-8 is 0.0 in fp16; torch's fused kernels do
their arithmetic in fp32 and are exempt), is weight decay, and how
many weights are so large that an Adam-sized update (≈ lr) is below half their ulp and will round away.
On statistics steps: second-moment entries that flushed to zero although their gradient was not zero.
Fractions are estimated on a fixed sample of each tensor (`base.sample`).
"""

from __future__ import annotations

from collections import Counter

import torch

from .base import Probe, sample, sampled

LOST_UPDATE_WARNING = 0.10  # fraction of weights whose lr-sized update rounds away
STATE_UNDERFLOW_WARNING = 0.01  # fraction of nonzero-gradient entries whose second moment is 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class OptimizerProbe(Probe):
    name = "optimizer"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._checked = False
        self._underflow = None
        self._reported_state = False

    def before_optimizer_step(self) -> None:
        if not self._checked and self.ctx.optimizer is not None:
            self._checked = True
            self._preflight()

    def _preflight(self) -> None:
        names = {id(w.param): w for w in self.ctx.watched}
        for index, group in enumerate(self.ctx.optimizer.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            dtype = Counter(p.dtype for p in params).most_common(1)[0][0]
            label = group.get("name", f"group {index}")
            model = next((names[id(p)].model for p in params if id(p) in names), None)
            eps, lr, wd = group.get("eps"), float(group.get("lr", 0.0)), float(group.get("weight_decay", 0.0))
            if isinstance(eps, tuple):  # Adafactor-style (eps1, eps2)
                eps = eps[0]
            tiny = torch.finfo(dtype).tiny
            if eps is not None and eps > 0 and not group.get("fused"):  # fused kernels add eps in fp32
                rounded = torch.tensor(eps, dtype=dtype).item()
                if rounded == 0.0:
                    self.ctx.events.record(
                        "optimizer_preflight", "critical",
                        f"{label}: optimizer eps={eps:g} is 0.0 in {_dtype_name(dtype)}: any entry whose squared "
                        "gradient also rounds to 0 divides by zero and fills the weights with Inf/NaN",
                        probe=self.name, phase="optimizer", model=model, tensor=label,
                        dtype=_dtype_name(dtype), value=float(eps), step=self.ctx.step)
                elif abs(rounded) < tiny:
                    self.ctx.events.record(
                        "optimizer_preflight", "warning",
                        f"{label}: optimizer eps={eps:g} is subnormal in {_dtype_name(dtype)} (stored as {rounded:g})",
                        probe=self.name, phase="optimizer", model=model, tensor=label,
                        dtype=_dtype_name(dtype), value=float(eps), step=self.ctx.step)
            if wd > 0 and torch.tensor(lr * wd, dtype=dtype).item() == 0.0:
                self.ctx.events.record(
                    "optimizer_preflight", "warning",
                    f"{label}: lr×weight_decay={lr * wd:g} is 0.0 in {_dtype_name(dtype)}: weight decay does nothing",
                    probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype),
                    value=lr * wd, step=self.ctx.step)
            lost = self._fraction_below_half_ulp(params, lr) if lr > 0 else 0.0
            if lost > LOST_UPDATE_WARNING:
                self.ctx.events.record(
                    "optimizer_preflight", "warning",
                    f"{label}: an update of size lr={lr:g} is below half an ulp for {lost:.0%} of the "
                    f"{_dtype_name(dtype)} weights: those updates will round away (stagnation)",
                    probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype),
                    value=lost, step=self.ctx.step)

    @staticmethod
    def _fraction_below_half_ulp(params: list[torch.Tensor], lr: float) -> float:
        """Adam moves each weight by about lr; that is lost where lr < ulp(|w|)/2 in the weight's dtype."""
        lost = total = 0
        for p in params:
            w = sample(p.detach())
            ulp = torch.nextafter(w.abs(), torch.full_like(w, float("inf"))) - w.abs()
            lost += int((ulp.float() / 2 > lr).sum())
            total += w.numel()
        return lost / total if total else 0.0

    def after_optimizer_step(self) -> None:
        if not self.ctx.stats_step or self.ctx.optimizer is None:
            return
        state = self.ctx.optimizer.state
        half = [(w.param.grad, v) for w in self.ctx.watched
                if (v := state.get(w.param, {}).get("exp_avg_sq")) is not None and w.param.grad is not None
                and v.dtype != torch.float32]
        if half:  # a gradient and its second moment share a shape: their samples line up
            live = sampled([g for g, _ in half]) != 0
            flushed = (sampled([v for _, v in half]) == 0) & live
            self._underflow = torch.stack([flushed.sum(), live.sum()]).float()

    def readings(self) -> dict[str, torch.Tensor]:
        out = {"state_underflow": self._underflow} if self._underflow is not None else {}
        self._underflow = None
        return out

    def after_step(self, host: dict) -> dict:
        pair = host.get("state_underflow")
        if pair is None:
            return {}
        zero, nonzero = pair
        fraction = zero / nonzero if nonzero else 0.0
        if fraction > STATE_UNDERFLOW_WARNING and not self._reported_state:
            self._reported_state = True
            self.ctx.events.record(
                "optimizer_state_underflow", "warning",
                f"{fraction:.1%} of second-moment entries are 0 although their gradient is not: the squared "
                "gradient flushed to zero in the optimizer state's dtype",
                step=self.ctx.step, phase="optimizer", probe=self.name, value=fraction, numel=int(nonzero))
        return {"state_underflow_fraction": fraction}
