"""The loss terms of each micro-batch: non-finite KD / CE / router terms, and batches with no target
token (whose per-token mean would be 0/0)."""

from __future__ import annotations

import math

import torch

from .base import Probe

TERMS = ("kd", "ce", "router")


class LossProbe(Probe):
    name = "loss"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._terms: list[torch.Tensor] = []
        self._reported: set[str] = set()
        self._micro = 0
        self.nonfinite_this_step = False

    def begin_step(self) -> None:
        self._micro = 0
        self.nonfinite_this_step = False

    def observe(self, kd: torch.Tensor | None, ce: torch.Tensor | None, router: torch.Tensor | None,
                targets: int | None) -> None:
        """Called once per micro-batch with its loss terms (device tensors) and its target count (host)."""
        self._micro += 1
        if targets == 0 and "empty" not in self._reported:
            self._reported.add("empty")
            self.ctx.events.record("empty_targets", "warning",
                                   f"micro-batch {self._micro} of step {self.ctx.step} has no target tokens: its "
                                   "per-token loss is 0/0", step=self.ctx.step, micro_step=self._micro,
                                   phase="loss", probe=self.name)
        values = [t.detach().float().reshape(()) if t is not None else torch.zeros(())
                  for t in (kd, ce, router)]
        device = next((v.device for v in values if v.device.type != "cpu"), values[0].device)
        self._terms.append(torch.stack([v.to(device) for v in values]))

    def readings(self) -> dict[str, torch.Tensor]:
        if not self._terms:
            return {}
        out = {"loss_terms": torch.stack(self._terms).reshape(-1)}
        self._terms = []
        return out

    def after_step(self, host: dict) -> dict:
        flat = host.get("loss_terms")
        if flat is None:
            return {}
        for micro in range(len(flat) // len(TERMS)):
            for j, term in enumerate(TERMS):
                value = flat[micro * len(TERMS) + j]
                self.nonfinite_this_step |= not math.isfinite(value)
                if not math.isfinite(value) and term not in self._reported:
                    self._reported.add(term)
                    self.ctx.events.record("nonfinite_loss", "critical",
                                           f"{term} loss is {value} at step {self.ctx.step} "
                                           f"(micro-batch {micro + 1})", step=self.ctx.step,
                                           micro_step=micro + 1, phase="loss", probe=self.name, tensor=term,
                                           value=value)
        return {}
