"""What one micro-batch costs: the KD objective as a small object the loop calls without branching.

`LogitKD` distils logits (one tokenizer); `HiddenStateKD` matches hidden states across two tokenizers.
Both return token *sums* and the target count, so the loop divides once by the global count of an
optimizer step and accumulated micro-batches give the same gradient as one big batch. The weighted sum
`alpha_kd · kd + alpha_ce · ce` is the objective's own (`LossParts.objective`): the fused loss computes its
gradient for exactly that sum.

Every objective offers the same: `__call__(batch, grad_factor)`, `fused` (whether its logits never exist
whole), `student` (the model it trains through: the student, or DDP's wrapper of it under torchrun, given at
construction), `projection` (an identity where there is none), `extra_parameters()` (trained beside the
student), `eval_ce_sum(student, batch)` (evaluation's loss, its logits taken as training takes them) and
`close()`. An objective whose KD term may miss target tokens counts those it covers (`LossParts.kd_targets`)
and says why it missed the rest (`few_targets_reason()`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .align import align_teacher_to_student
from .data import IGNORE_INDEX
from .fused_loss import fused_ce_sum, fused_kd_ce, last_hidden_state
from .losses import ce_loss_sum, kd_loss_sum


@dataclass
class LossParts:
    """Sums over a micro-batch's target tokens — `objective` (alpha_kd · kd + alpha_ce · ce, the one with the
    gradient), kd and ce — its router loss and its target count."""

    objective: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    targets: int
    router_loss: torch.Tensor | None = None
    readings: dict[str, torch.Tensor] = field(default_factory=dict)
    kd_targets: torch.Tensor | None = None  # the target tokens the KD term covers where it may miss some; None: all

    @classmethod
    def weighted(cls, kd_sum: torch.Tensor, ce_sum: torch.Tensor, alpha_kd: float, alpha_ce: float,
                 targets: int) -> LossParts:
        """The parts of an objective whose terms carry their own graphs: the weighted sum is taken here."""
        return cls(alpha_kd * kd_sum + alpha_ce * ce_sum, kd_sum, ce_sum, targets)


def _teacher_device(teacher: nn.Module) -> torch.device:
    return next(teacher.parameters()).device


class LogitKD:
    """KL (or reverse KL, JSD) between teacher and student logits at temperature T, plus next-token CE.

    Fused (the default where both models allow it, `fused_loss.unfusable_reason`), the models return their last
    hidden states and the logits exist a chunk of rows at a time inside the loss; unfused, both models return
    complete logits and the chunked losses take them.

    With trainable routers the teacher forward keeps its graph (to the router weights only: every other
    teacher weight has requires_grad off), so the KD term trains the router too, and the router terms
    (anchor, load balance, entropy) are added.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, kind: str, temperature: float,
                 jsd_beta: float, alpha_kd: float, alpha_ce: float, fused: bool, router_terms=None,
                 vocab: int | None = None):
        self.teacher, self.student = teacher, student  # the student as trained: DDP's wrapper under torchrun
        self.vocab = vocab  # the logit columns the KD term compares (heads padded past one tokenizer); None: all
        self.kind, self.temperature, self.jsd_beta = kind, temperature, jsd_beta
        self.alpha_kd, self.alpha_ce = alpha_kd, alpha_ce
        self.fused = fused
        self.router_terms = router_terms
        self.projection = nn.Identity()  # logits need no projection; every objective has one

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def eval_ce_sum(self, student: nn.Module, batch: dict) -> torch.Tensor:
        """The student's next-token CE sum on an evaluation batch (no gradient), its logits taken as training
        takes them. `student` is the bare model: rank 0 evaluates alone, outside DDP's wrapper."""
        if not self.fused:
            return _plain_ce_sum(student, batch)
        hidden = last_hidden_state(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return fused_ce_sum(hidden, student.get_output_embeddings(), batch["labels"])

    def close(self) -> None:
        """Done: the router hooks come off the teacher, and the student it was given goes (DDP's wrapper must
        go before its process group). The objective is not called again."""
        if self.router_terms is not None:
            self.router_terms.close()
        self.student = None

    def __call__(self, batch: dict, grad_factor: torch.Tensor | float = 1.0) -> LossParts:
        """The micro-batch's loss parts; `grad_factor` is what backward will multiply the objective's gradient by
        (the loss scale × ranks / targets), which the fused loss builds into the gradient it computes."""
        labels = batch["labels"]
        device = _teacher_device(self.teacher)
        options = dict(kind=self.kind, temperature=self.temperature, jsd_beta=self.jsd_beta)
        grad = self.router_terms is not None and torch.is_grad_enabled()
        # the fused loss takes the models' last hidden states (no logits are computed), the unfused one their logits
        read = last_hidden_state if self.fused else _logits
        with contextlib.nullcontext() if grad else torch.no_grad():
            teacher_out = read(self.teacher, input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device))
        student_out = read(self.student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.fused:
            sums = fused_kd_ce(student_out, _head(self.student), teacher_out, _head(self.teacher), labels,
                               alpha_kd=self.alpha_kd, alpha_ce=self.alpha_ce, grad_factor=grad_factor, **options)
            parts = LossParts(*sums, targets=int(batch["n_targets"]))
        else:
            shared = slice(None, self.vocab)
            kd_sum = kd_loss_sum(student_out[..., shared], teacher_out[..., shared].to(labels.device), labels != -100,
                                 **options)
            ce_sum = ce_loss_sum(student_out, labels)
            parts = LossParts.weighted(kd_sum, ce_sum, self.alpha_kd, self.alpha_ce, int(batch["n_targets"]))
        if self.router_terms is not None:
            router = self.router_terms.loss(batch["attention_mask"].to(device))
            parts.router_loss, parts.readings = router.total.to(labels.device), router.layer_entropy
            self.router_terms.clear()
        return parts


def _logits(model: nn.Module, **inputs) -> torch.Tensor:
    return model(**inputs).logits


def _plain_ce_sum(student: nn.Module, batch: dict) -> torch.Tensor:
    return ce_loss_sum(_logits(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                       batch["labels"])


def _head(model: nn.Module) -> nn.Module:
    """The output projection of a causal LM, through DDP's wrapper if there is one."""
    return getattr(model, "module", model).get_output_embeddings()


class HiddenStateKD:
    """Dual-tokenizer KD: the student's last hidden states, through a learned projection on the student
    side, match the teacher's — averaged over the teacher tokens whose characters overlap each student
    token. The teacher's states are a fixed (detached) target, so shrinking both sides cannot help. A
    student token no teacher token overlaps has no target: the KD term counts the tokens it covers
    (`kd_targets`), so a run whose alignment is nearly empty says so instead of a quietly small kd_loss."""

    fused = False  # the student's CE takes its complete logits; the KD term has none

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_tokenizer, *, student_hidden_size: int,
                 teacher_max_tokens: int | None, device: torch.device, alpha_kd: float, alpha_ce: float):
        self.teacher, self.student, self.teacher_tokenizer = teacher, student, teacher_tokenizer  # student: as trained
        self.alpha_kd, self.alpha_ce = alpha_kd, alpha_ce
        self.teacher_max_tokens = teacher_max_tokens
        self.teacher_cut_short = False  # a block's text needed more teacher tokens than its position table: cut
        self.projection = nn.Linear(student_hidden_size, teacher.config.hidden_size).to(device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def eval_ce_sum(self, student: nn.Module, batch: dict) -> torch.Tensor:
        """The student's next-token CE sum on an evaluation batch (no gradient), from its complete logits."""
        return _plain_ce_sum(student, batch)

    def close(self) -> None:
        """Done: the student it was given goes (DDP's wrapper must go before its process group)."""
        self.student = None

    def teacher_inputs(self, texts: list[str]) -> dict:
        """The same characters the student sees, tokenized by the teacher's tokenizer (with offsets)."""
        inputs = self.teacher_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                        padding=True, truncation=self.teacher_max_tokens is not None,
                                        max_length=self.teacher_max_tokens, return_tensors="pt")
        self.teacher_cut_short |= any(encoding.overflowing for encoding in inputs.encodings)  # fast tokenizers only
        return inputs

    def few_targets_reason(self) -> str:
        """Why student tokens got no teacher target, for the `kd_targets_few` note."""
        if self.teacher_cut_short:
            return (f"the teacher reads at most {self.teacher_max_tokens} tokens of a block's text (its position "
                    "table) and its tokenizer needs more for the characters of a student block: the text past them "
                    "has no teacher state — a smaller --block-size keeps each block within the teacher's context")
        return ("student tokens that no teacher token's character span overlaps (a tokenizer whose offsets give "
                "empty spans) have no teacher state")

    def __call__(self, batch: dict, grad_factor: torch.Tensor | float = 1.0) -> LossParts:
        """The micro-batch's loss parts (`grad_factor`: taken by every objective, used by the fused loss only)."""
        labels = batch["labels"]
        device = _teacher_device(self.teacher)
        t_in = self.teacher_inputs(batch["texts"])
        with torch.no_grad():  # its logits are not used: the teacher's head runs on no position where it can
            teacher_hidden = last_hidden_state(self.teacher, input_ids=t_in["input_ids"].to(device),
                                               attention_mask=t_in["attention_mask"].to(device)).to(labels.device)
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        target, valid = align_teacher_to_student(teacher_hidden, t_in["offset_mapping"], t_in["attention_mask"],
                                                 batch["offsets"], batch["attention_mask"])
        predicted = self.projection(out.hidden_states[-1])
        squared = (predicted.float() - target.float()).pow(2).mean(-1)
        kd_sum, ce_sum = (squared * valid).sum(), ce_loss_sum(out.logits, labels)
        parts = LossParts.weighted(kd_sum, ce_sum, self.alpha_kd, self.alpha_ce, int(batch["n_targets"]))
        parts.kd_targets = (valid & (labels != IGNORE_INDEX)).sum()
        return parts
