"""The one place that reads `torch.amp.GradScaler`'s internals; everything else asks this adapter.

GradScaler keeps the scale (`_scale`) and, after `unscale_`, the per-device overflow flags
(`_found_inf_per_device`) as private state. The training loop, the probes and the distributed all-reduce
all need them, so they are read here and nowhere else: a torch release that renames them breaks one file.

`on_unscaled` is how the probes see gradients on the steps that matter most: after unscaling and
before the scaler decides to skip. GradScaler never calls the optimizer (so never its step hooks) on a
step it skips, but it always unscales first, through `self.unscale_` — an instance attribute wrapped
here observes that moment in any loop, ours or a user's, accelerate's or the Trainer's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .shards import is_sharded, local_shard


class LossScaler:
    """A GradScaler (or nothing) seen through the few questions the project asks of it."""

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler = scaler

    @property
    def enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def scale(self) -> torch.Tensor | None:
        """The current scale as a 0-dim device tensor; None when disabled or before the first `scale()`."""
        if not self.enabled or self.scaler._scale is None:
            return None
        return self.scaler._scale.reshape(())

    def factor(self) -> torch.Tensor | float:
        """What the next `scaler.scale(loss)` multiplies by: the current scale (a device tensor), the scaler's
        initial one before its first use, 1.0 without a scaler."""
        if not self.enabled:
            return 1.0
        return self.scale() if self.scaler._scale is not None else float(self.scaler._init_scale)

    def growth_interval(self) -> int | None:
        """How many unskipped steps in a row the scaler takes before it doubles its scale (GradScaler's default:
        2000)."""
        return self.scaler.get_growth_interval() if self.enabled else None

    def found_inf(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The per-device overflow flags `unscale_` set for this optimizer (empty before unscaling)."""
        if not self.enabled:
            return []
        return list(self.scaler._found_inf_per_device(optimizer).values())

    def left_scaled(self, optimizer: torch.optim.Optimizer) -> bool:
        """A loss was scaled (the scale exists) and the scaler has not looked at this optimizer's gradients since its
        last update: not unscaled them (`unscale_`, which `scaler.step` calls), nor checked them for an optimizer that
        unscales in its own kernel (a fused one, which `scaler.step` hands the scale): an optimizer stepping now
        applies them still multiplied by the scale."""
        return self.enabled and self.scaler._scale is not None and not self.found_inf(optimizer)

    def on_unscaled(self, callback: Callable[[torch.optim.Optimizer], None]) -> Callable[[], None]:
        """Call `callback(optimizer)` right after every `unscale_`; returns a function that removes it."""
        if self.scaler is None:
            return lambda: None
        scaler = self.scaler
        original = scaler.unscale_

        def unscale_(optimizer):
            original(optimizer)
            callback(optimizer)

        scaler.unscale_ = unscale_

        def remove() -> None:
            if scaler.__dict__.get("unscale_") is unscale_:
                del scaler.unscale_
        return remove


class ShardAwareGradScaler(torch.amp.GradScaler):
    """torch's GradScaler, whose unscale also takes sharded gradients (a sharded teacher's routers): torch's own
    unscales each (device, dtype) group in one kernel, which cannot mix DTensor and plain tensors, so here the
    sharded ones give their local shards. Each rank's overflow flag then covers its shards; the loop all-reduces
    the flags (`World.agree_on_overflow`), as FSDP's ShardedGradScaler does. Nothing sharded: torch's own."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not any(is_sharded(p.grad) for p in params):
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            grad = local_shard(p.grad)
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        flags = {}
        with torch.no_grad():
            for (device, _), grads in groups.items():
                flag = flags.setdefault(device, found_inf.to(device))
                torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv_scale.to(device))
        return flags


def unwrap_optimizer(optimizer) -> tuple[torch.optim.Optimizer | None, torch.amp.GradScaler | None]:
    """The torch optimizer inside a framework's wrapper and the loss scaler such a wrapper carries, if any.

    accelerate's AcceleratedOptimizer subclasses Optimizer without being one underneath (it has no hooks of
    its own), so a wrapper is anything whose `.optimizer` is another optimizer, subclass or not. Its scaler:
    accelerate's `.scaler`, or Lightning Fabric's, in the precision plugin of the strategy the wrapper steps
    through (`._strategy.precision.scaler`)."""
    scaler = None
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        plugin = getattr(getattr(optimizer, "_strategy", None), "precision", None)
        scaler = scaler or getattr(optimizer, "scaler", None) or getattr(plugin, "scaler", None)
        optimizer = optimizer.optimizer
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not a torch optimizer and wraps none (.optimizer)")
    return optimizer, scaler
