"""Distillation and cross-entropy losses, as sums over target tokens, computed in chunks.

Both losses return SUMS, never means: the training loop divides once by the number of
target tokens of all accumulation micro-batches together, so accumulated gradients equal
those of one big batch. Labels arrive already shifted (``labels[b, t]`` is the target of
``logits[b, t]``).

Memory: over a 50k vocabulary the fp32 softmaxes of both models are the largest tensors
of a distillation step, so the rows are taken a chunk at a time, each chunk upcast to fp32
into a few chunk-sized buffers that every chunk reuses (non-target rows are computed and
selected away: no host sync to find the targets). The gradient of a
scalar sum is ``grad_output`` times a fixed tensor, so that tensor is computed chunk by
chunk in the forward pass, while the chunk's softmaxes are at hand, instead of recomputing
them in backward; what is kept is just the gradient, the size of what backward has to
return anyway.

Nothing is clamped or masked: a NaN or Inf logit gives a non-finite loss, which is what
the probes are there to see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

KD_KINDS = ("forward-kl", "reverse-kl", "jsd")
KD_BUFFERS = {"forward-kl": 3, "reverse-kl": 3, "jsd": 4}  # fp32 [chunk rows, vocab] workspace buffers of each kind
CE_BUFFERS = 2

# A row function gets the slice of flat rows of one chunk, its fp32 workspace (buffers of
# [chunk rows, vocab] to overwrite at will), the chunk's rows of each input ([chunk rows,
# vocab], read only) and which of them need a gradient; it returns the chunk's fp32 loss per
# row and a gradient per input for those rows (None where not needed), which may live in the
# workspace.
RowFn = Callable[..., tuple[torch.Tensor, list[torch.Tensor | None]]]


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 chunk buffer holds 2**23 values (32 MiB) whatever the vocabulary."""
    return max(1, 2**23 // vocab_size)


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 2.0,
    jsd_beta: float = 0.5,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum over target positions of T² · D(teacher ‖ student) at temperature T (a 0-dim fp32 tensor).

    The divergence itself, not torchtune's cross-entropy form: identical logits give exactly
    0. ``forward-kl`` is KL(p_T ‖ p_S), ``reverse-kl`` is KL(p_S ‖ p_T), and ``jsd`` is the
    generalized Jensen-Shannon divergence of TRL's GKD: ``jsd_beta`` is the TEACHER's
    weight in the mixture m = β·p_T + (1-β)·p_S, and JSD = β·KL(p_T ‖ m) + (1-β)·KL(p_S ‖ m).
    As β → 0 it tends to β·KL(p_T ‖ p_S) (forward-like), as β → 1 to (1-β)·KL(p_S ‖ p_T).
    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).

    Gradients flow into the student logits and, when they require grad (a trained MoE
    router), into the teacher logits too.
    """
    check_kd_options(kind, temperature, jsd_beta)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be [batch, length, vocab] of the same shape; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if target_mask.dtype != torch.bool or target_mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"target_mask must be a bool tensor of shape {tuple(student_logits.shape[:2])}; got "
            f"{target_mask.dtype} {tuple(target_mask.shape)}"
        )

    chunk = default_chunk_tokens(student_logits.shape[-1]) if chunk_tokens is None else chunk_tokens
    return _row_loss_sum(kd_rows(kind, temperature, jsd_beta), (student_logits, teacher_logits), target_mask,
                         chunk, KD_BUFFERS[kind])


def check_kd_options(kind: str, temperature: float, jsd_beta: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kd loss kind must be one of {', '.join(KD_KINDS)}; got {kind!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    if kind == "jsd" and not 0 < jsd_beta < 1:
        raise ValueError(
            f"jsd_beta must lie strictly between 0 and 1 (the JSD is 0 at either end; use forward-kl "
            f"or reverse-kl there); got {jsd_beta}"
        )


def kd_rows(kind: str, temperature: float, jsd_beta: float) -> RowFn:
    """The row function of T² · D(teacher ‖ student) on a chunk of (student, teacher) logit rows."""
    divergence = {"forward-kl": _forward_kl, "reverse-kl": _reverse_kl, "jsd": _jsd}[kind]

    def rows(_rows, workspace, chunk_inputs, needs):
        scratch, log_s, log_t, *extra = workspace
        for logits, log_p in zip(chunk_inputs, (log_s, log_t), strict=True):
            torch.log_softmax(scratch.copy_(logits).div_(temperature), dim=-1, out=log_p)
        row_values, grad_s, grad_t = divergence(log_s, log_t, *needs, scratch, *extra, beta=jsd_beta)
        # T² · D at logits / T: the value scales by T², the gradient by T² / T.
        return row_values * temperature**2, [g.mul_(temperature) if g is not None else None
                                             for g in (grad_s, grad_t)]
    return rows


def ce_loss_sum(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions (a 0-dim fp32 tensor).

    Computed in fp32 chunks like the KD loss, so an autocast bf16/fp16 logits tensor is
    never upcast whole and its saved state is one gradient in the logits' own precision.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            "logits must be [batch, length, vocab] and labels [batch, length]; got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    return _row_loss_sum(ce_rows(labels.reshape(-1)), (student_logits,), labels != ignore_index,
                         default_chunk_tokens(student_logits.shape[-1]), CE_BUFFERS)


def ce_rows(flat_labels: torch.Tensor) -> RowFn:
    """The row function of next-token cross-entropy on a chunk of logit rows (labels of all rows, flat)."""
    def rows(chunk, workspace, chunk_inputs, needs):
        scratch, log_p = workspace
        targets = flat_labels[chunk].clamp(min=0).unsqueeze(1)  # ignored rows are masked out by the caller
        torch.log_softmax(scratch.copy_(chunk_inputs[0]), dim=-1, out=log_p)
        value = -log_p.gather(1, targets).squeeze(1)
        if not needs[0]:
            return value, [None]
        grad = log_p.exp_()
        grad.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=grad.dtype))
        return value, [grad]
    return rows


def _forward_kl(log_s, log_t, need_s, need_t, scratch, beta):
    value, grad_t, grad_s = _kl(log_t, log_s, need_t, need_s, scratch)
    return value, grad_s, grad_t


def _reverse_kl(log_s, log_t, need_s, need_t, scratch, beta):
    return _kl(log_s, log_t, need_s, need_t, scratch)


def _kl(log_p, log_q, need_p, need_q, scratch):
    """KL(p ‖ q) of each of the chunk's rows, and its gradients wrt the logits behind p and q.

    d/dx_p = p ⊙ (log p − log q − KL) and d/dx_q = q − p, per row. Works in place on both
    inputs and scratch, so a chunk holds no more than these three vocabulary-wide buffers.
    """
    p = torch.exp(log_p, out=scratch)
    terms = log_p.sub_(log_q).mul_(p)
    row_kl = terms.sum(-1, keepdim=True)
    grad_p = terms.addcmul_(p, row_kl, value=-1) if need_p else None
    grad_q = log_q.exp_().sub_(p) if need_q else None
    return row_kl.squeeze(1), grad_p, grad_q


def _jsd(log_s, log_t, need_s, need_t, scratch, extra, beta):
    """Generalized JSD (TRL's GKD convention, β = teacher weight) and its gradients.

    log m is taken relative to log p_S: with u = log p_T − log p_S,
    log m − log p_S = log(β·e^u + 1 − β) = max(u, 0) + log1p(w·expm1(−|u|)), w = β where
    u ≤ 0 else 1 − β. That is logsumexp(log p + log weight) rearranged so it cannot overflow
    and is exactly 0 where u is 0, so identical logits give exactly 0 (plain logaddexp leaves
    rounding residue). Gradients per row: d/dx_T = β·p_T ⊙ (log p_T/m − KL(p_T‖m)), and
    likewise for the student with weight 1 − β. Overwrites the inputs and both buffers, and
    allocates two more chunk-sized temporaries (the weight and max(u, 0)).
    """
    u = torch.sub(log_t, log_s, out=scratch)
    weight = torch.where(u > 0, 1 - beta, beta)
    log_m_over_s = torch.abs(u, out=extra).neg_().expm1_().mul_(weight).log1p_().add_(torch.relu(u))
    del weight
    log_s_over_m = log_m_over_s.neg_()
    log_t_over_m = u.add_(log_s_over_m)

    value = torch.zeros(log_s.shape[0], dtype=torch.float32, device=log_s.device)
    grads = []
    for log_p, log_p_over_m, share, need in (
        (log_s, log_s_over_m, 1 - beta, need_s),
        (log_t, log_t_over_m, beta, need_t),
    ):
        p = log_p.exp_()
        terms = log_p_over_m.mul_(p)
        row_kl = terms.sum(-1, keepdim=True)
        value = value + share * row_kl.squeeze(1)
        grads.append(terms.addcmul_(p, row_kl, value=-1).mul_(share) if need else None)
    return value, grads[0], grads[1]


def _row_loss_sum(
    row_fn: RowFn,
    inputs: Sequence[torch.Tensor],
    target_mask: torch.Tensor,
    chunk_tokens: int,
    buffers: int,
) -> torch.Tensor:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1; got {chunk_tokens}")
    plan = _Plan(row_fn, target_mask.reshape(-1), chunk_tokens, buffers)
    needs = tuple(torch.is_grad_enabled() and x.requires_grad for x in inputs)
    if any(needs):
        return _RowLossSum.apply(plan, needs, *inputs)
    return _run_chunks(plan, inputs, needs)[0]


class _Plan(NamedTuple):
    row_fn: RowFn
    flat_mask: torch.Tensor  # [batch · length] bool, True at target rows
    chunk_tokens: int
    buffers: int  # fp32 workspace buffers of [chunk_tokens, vocab] that row_fn uses


def _run_chunks(plan: _Plan, inputs: Sequence[torch.Tensor], needs: Sequence[bool]):
    """Applies the row function a chunk of rows at a time; returns the sum over target rows and full-size gradients.

    Chunks are fixed slices of all rows, known from the shapes alone, so the loss never reads the
    mask on the host (no sync); non-target rows are selected away with `where`, which, unlike a
    multiplication by 0, cannot turn their values into NaN. A chunk's loading and gradient store are
    plain copies (index_select stalled for seconds under CPU contention). The workspace is allocated
    once and reused by every chunk: allocating per chunk made the CPU allocator either zero-fill
    fresh pages for every chunk or fragment its heap.
    """
    flat = [x.reshape(-1, x.shape[-1]) for x in inputs]
    n_rows = flat[0].shape[0]
    grads = [
        torch.empty(x.shape, dtype=_grad_dtype(x.dtype), device=x.device) if need else None
        for x, need in zip(inputs, needs, strict=True)
    ]
    flat_grads = [g.view(-1, g.shape[-1]) if g is not None else None for g in grads]
    shape = (min(plan.chunk_tokens, n_rows), flat[0].shape[-1])
    workspace = [torch.empty(shape, dtype=torch.float32, device=flat[0].device) for _ in range(plan.buffers)]
    total = torch.zeros((), dtype=torch.float32, device=flat[0].device)
    for start in range(0, n_rows, plan.chunk_tokens):
        rows = slice(start, min(start + plan.chunk_tokens, n_rows))
        keep = plan.flat_mask[rows]
        values, chunk_grads = plan.row_fn(rows, [w[: rows.stop - start] for w in workspace],
                                           [x[rows] for x in flat], needs)
        total += torch.where(keep, values, 0.0).sum()
        for grad, chunk_grad in zip(flat_grads, chunk_grads, strict=True):
            if grad is not None:
                grad[rows].copy_(chunk_grad.masked_fill_(~keep[:, None], 0.0))
    return total, grads


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Keep an fp16 gradient in fp32 until backward has applied grad_output (the loss scale).

    Rounded to fp16 unscaled, the small entries of p_S − p_T would flush to zero before
    GradScaler's factor could save them; bf16 has fp32's exponent range, so it is stored as is.
    """
    return torch.float32 if dtype == torch.float16 else dtype


class _RowLossSum(torch.autograd.Function):
    """Autograd node of a chunked row loss whose gradient was computed during the forward pass."""

    @staticmethod
    def forward(ctx, plan, needs, *inputs):
        total, ctx.grads = _run_chunks(plan, inputs, needs)
        ctx.input_dtypes = [x.dtype for x in inputs]
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss's gradient was already used by an earlier backward; "
                "compute the loss again instead of retaining its graph"
            )
        # Scaled in place and handed over, so no second full-size gradient is allocated.
        grads, ctx.grads = ctx.grads, None
        scaled = [
            g.mul_(grad_output).to(dtype) if g is not None else None
            for g, dtype in zip(grads, ctx.input_dtypes, strict=True)
        ]
        return None, None, *scaled
