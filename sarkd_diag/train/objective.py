"""What one micro-batch costs: the KD objective as a small object the loop calls without branching.

`LogitKD` distils logits (same tokenizer); the dual-tokenizer objective matches hidden states. Both
return token *sums* and the target count, so the loop divides once by the global count of an optimizer
step and accumulated micro-batches give the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import ce_loss_sum, kd_loss_sum


@dataclass
class LossParts:
    """Sums over a micro-batch's target tokens (kd, ce), its router loss and its target count."""

    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    targets: int
    router_loss: torch.Tensor | None = None
    readings: dict[str, torch.Tensor] = field(default_factory=dict)


class LogitKD:
    """KL (or reverse KL, JSD) between teacher and student logits at temperature T, plus next-token CE."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, kind: str, temperature: float,
                 jsd_beta: float, router_terms=None, teacher_device: torch.device | None = None):
        self.teacher, self.student = teacher, student
        self.kind, self.temperature, self.jsd_beta = kind, temperature, jsd_beta
        self.router_terms = router_terms
        self.teacher_device = teacher_device

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits; the graph reaches its router weights only when those train."""
        grad = self.router_terms is not None and torch.is_grad_enabled()
        device = self.teacher_device or batch["input_ids"].device
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = self.teacher(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device))
        return out.logits.to(batch["input_ids"].device)

    def __call__(self, batch: dict) -> LossParts:
        labels = batch["labels"]
        mask = labels != -100
        teacher_logits = self.teacher_logits(batch)
        student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parts = LossParts(
            kd_sum=kd_loss_sum(student_logits, teacher_logits, mask, kind=self.kind,
                               temperature=self.temperature, jsd_beta=self.jsd_beta),
            ce_sum=ce_loss_sum(student_logits, labels),
            targets=int(batch["n_targets"]),
        )
        if self.router_terms is not None:
            parts.router_loss, parts.readings = self.router_terms.loss(batch["attention_mask"])
        return parts
