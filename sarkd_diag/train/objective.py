"""What one micro-batch costs: the KD objective as a small object the loop calls without branching.

`LogitKD` distils logits (one tokenizer); `HiddenStateKD` matches hidden states across two tokenizers.
Both return token *sums* and the target count, so the loop divides once by the global count of an
optimizer step and accumulated micro-batches give the same gradient as one big batch.

Every objective offers the same: `__call__(batch)`, `student` (the model it trains through: the student, or
DDP's wrapper of it under torchrun, given at construction), `projection` (an identity where there is none),
`extra_parameters()` (trained beside the student) and `close()`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .align import align_teacher_to_student
from .losses import ce_loss_sum, kd_loss_sum


@dataclass
class LossParts:
    """Sums over a micro-batch's target tokens (kd, ce), its router loss and its target count."""

    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    targets: int
    router_loss: torch.Tensor | None = None
    readings: dict[str, torch.Tensor] = field(default_factory=dict)


def _teacher_device(teacher: nn.Module) -> torch.device:
    return next(teacher.parameters()).device


class LogitKD:
    """KL (or reverse KL, JSD) between teacher and student logits at temperature T, plus next-token CE.

    With trainable routers the teacher forward keeps its graph (to the router weights only: every other
    teacher weight has requires_grad off), so the KD term trains the router too, and the router terms
    (anchor, load balance, entropy) are added.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, kind: str, temperature: float,
                 jsd_beta: float, router_terms=None):
        self.teacher, self.student = teacher, student  # the student as trained: DDP's wrapper under torchrun
        self.kind, self.temperature, self.jsd_beta = kind, temperature, jsd_beta
        self.router_terms = router_terms
        self.projection = nn.Identity()  # logits need no projection; every objective has one

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def close(self) -> None:
        """Done: the router hooks come off the teacher, and the student it was given goes (DDP's wrapper must
        go before its process group). The objective is not called again."""
        if self.router_terms is not None:
            self.router_terms.close()
        self.student = None

    def __call__(self, batch: dict) -> LossParts:
        labels = batch["labels"]
        device = _teacher_device(self.teacher)
        grad = self.router_terms is not None and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"].to(device),
                                          attention_mask=batch["attention_mask"].to(device)).logits
        teacher_logits = teacher_logits.to(labels.device)
        student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parts = LossParts(
            kd_sum=kd_loss_sum(student_logits, teacher_logits, labels != -100, kind=self.kind,
                               temperature=self.temperature, jsd_beta=self.jsd_beta),
            ce_sum=ce_loss_sum(student_logits, labels),
            targets=int(batch["n_targets"]),
        )
        if self.router_terms is not None:
            router = self.router_terms.loss(batch["attention_mask"].to(device))
            parts.router_loss, parts.readings = router.total.to(labels.device), router.layer_entropy
            self.router_terms.clear()
        return parts


class HiddenStateKD:
    """Dual-tokenizer KD: the student's last hidden states, through a learned projection on the student
    side, match the teacher's — averaged over the teacher tokens whose characters overlap each student
    token. The teacher's states are a fixed (detached) target, so shrinking both sides cannot help."""

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_tokenizer, *, student_hidden_size: int,
                 teacher_max_tokens: int | None, device: torch.device):
        self.teacher, self.student, self.teacher_tokenizer = teacher, student, teacher_tokenizer  # student: as trained
        self.teacher_max_tokens = teacher_max_tokens
        self.projection = nn.Linear(student_hidden_size, teacher.config.hidden_size).to(device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def close(self) -> None:
        """Done: the student it was given goes (DDP's wrapper must go before its process group)."""
        self.student = None

    def teacher_inputs(self, texts: list[str]) -> dict:
        """The same characters the student sees, tokenized by the teacher's tokenizer (with offsets)."""
        return self.teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                      padding=True, truncation=self.teacher_max_tokens is not None,
                                      max_length=self.teacher_max_tokens, return_tensors="pt")

    def __call__(self, batch: dict) -> LossParts:
        labels = batch["labels"]
        device = _teacher_device(self.teacher)
        t_in = self.teacher_inputs(batch["texts"])
        with torch.no_grad():
            teacher_hidden = self.teacher(input_ids=t_in["input_ids"].to(device),
                                          attention_mask=t_in["attention_mask"].to(device),
                                          output_hidden_states=True).hidden_states[-1].to(labels.device)
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        target, valid = align_teacher_to_student(teacher_hidden, t_in["offset_mapping"], t_in["attention_mask"],
                                                 batch["offsets"], batch["attention_mask"])
        predicted = self.projection(out.hidden_states[-1])
        squared = (predicted.float() - target.float()).pow(2).mean(-1)
        return LossParts(kd_sum=(squared * valid).sum(), ce_sum=ce_loss_sum(out.logits, labels),
                         targets=int(batch["n_targets"]))
