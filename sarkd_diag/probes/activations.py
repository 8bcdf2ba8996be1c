"""Forward outputs of every module: non-finite values and values beyond fp16's range, first in forward order.

On statistics steps (step 1 and every N-th at `standard`, every step at `full`) a forward hook reduces
each module's output on the device; nothing moves to the host until the step ends. A non-finite
teacher output is recorded as such (the diagnosis calls it teacher_overflow). In fp32 and bf16 runs a
finite value beyond fp16's range is a headroom warning: it predicts where an fp16 run will overflow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import FP16_MAX, Probe


def _first_tensor(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o) and o.is_floating_point()), None)
    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits
    return None


class ActivationProbe(Probe):
    name = "activations"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._handles: list = []
        self._seen: list[tuple[str, str, str, torch.Tensor]] = []  # (model, module, dtype, stats)
        self._reported: set[tuple[str, str, str]] = set()

    def begin_step(self) -> None:
        if self.ctx.stats_step:
            self.attach()

    def attach(self) -> None:
        if not self._handles:
            for model_name, model in self.ctx.models.items():
                for module_name, module in model.named_modules():
                    if module_name and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Dropout)):
                        self._handles.append(module.register_forward_hook(self._hook(model_name, module_name)))

    def _hook(self, model_name: str, module_name: str):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            t = t.detach()
            stats = torch.stack([torch.linalg.vector_norm(t, math.inf).float(), t.isnan().sum().float(),
                                 (t == math.inf).sum().float(), (t == -math.inf).sum().float()])
            self._seen.append((model_name, module_name, str(t.dtype).removeprefix("torch."), stats))
        return hook

    def readings(self) -> dict[str, torch.Tensor]:
        self._detach()
        if not self._seen:
            return {}
        return {"activation_stats": torch.stack([s for *_, s in self._seen]).reshape(-1)}

    def after_step(self, host: dict, note: str = "") -> dict:
        flat = host.get("activation_stats")
        seen, self._seen = self._seen, []
        if flat is None:
            return {}
        metrics: dict = {}
        first_bad: dict[str, bool] = {}
        for i, (model, module, dtype, _) in enumerate(seen):
            amax, nan, posinf, neginf = flat[4 * i:4 * i + 4]
            key = f"act_amax_{model}"
            if math.isfinite(amax):
                metrics[key] = max(metrics.get(key, 0.0), amax)
            if nan or posinf or neginf:
                if not first_bad.get(model) and (model, module, "nonfinite") not in self._reported:
                    self._reported.add((model, module, "nonfinite"))
                    self.ctx.events.record(
                        "nonfinite_activation", "critical",
                        f"{model} {module} output is non-finite in forward at step {self.ctx.step} "
                        f"({int(nan)} NaN, {int(posinf)} +Inf, {int(neginf)} -Inf) — the first such module in "
                        "forward order" + note,
                        step=self.ctx.step, phase="forward", probe=self.name, model=model, module=module,
                        dtype=dtype, value=amax, nan_count=int(nan), posinf_count=int(posinf),
                        neginf_count=int(neginf))
                first_bad[model] = True
            elif amax > FP16_MAX and dtype != "float16" and (model, module, "risk") not in self._reported:
                self._reported.add((model, module, "risk"))
                self.ctx.events.record(
                    "fp16_overflow_risk", "warning",
                    f"{model} {module} output reaches {amax:.4g} in {dtype}, beyond fp16's {FP16_MAX:.0f}: "
                    "this module overflows in fp16 compute",
                    step=self.ctx.step, phase="forward", probe=self.name, model=model, module=module,
                    dtype=dtype, value=amax)
        return metrics

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        self._detach()
