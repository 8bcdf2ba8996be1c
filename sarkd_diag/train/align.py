"""Dual-tokenizer mode: bring the teacher's hidden states onto the student's tokens by character spans.

When the two tokenizers split the same text differently there is no token-to-token map, but every
token covers a span of characters. A student token's target is the mean of the teacher states whose
spans overlap its own. The overlap is one [B, Ls, Lt] comparison and one sparse matmul: no Python
loop over tokens (see benchmarks/bench_align.py for the speed-up over a per-token loop).
"""

from __future__ import annotations

import torch


def _taking_part(offsets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Offsets with the tokens that take no part (masked, or an empty span such as a special token's
    (0, 0)) moved to (-1, -1), which overlaps nothing: the big comparison then needs no masks."""
    ok = offsets[..., 1] > offsets[..., 0]
    if mask is not None:
        ok &= mask.to(device=ok.device, dtype=torch.bool)
    return offsets.masked_fill(~ok[..., None], -1)


def align_teacher_to_student(
    teacher_hidden: torch.Tensor,
    teacher_offsets: torch.Tensor,
    teacher_mask: torch.Tensor | None,
    student_offsets: torch.Tensor,
    student_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean teacher hidden state over the teacher tokens whose character spans overlap each student token.

    teacher_hidden [B, Lt, H]; *_offsets [B, L, 2] (start, end) character offsets as fast tokenizers
    return them (`return_offsets_mapping=True`, non-negative); *_mask [B, L] (1 = real token, None = all real).
    Spans are half-open: [a, b) and [c, d) overlap when a < d and c < b. Masked and empty-span tokens
    (padding, special tokens) take no part on either side.

    Returns (aligned [B, Ls, H], valid [B, Ls] bool): `valid` marks student tokens with at least one
    overlapping teacher token; elsewhere `aligned` is 0. The sums are accumulated in fp32 and the
    result is cast back to teacher_hidden's dtype (bf16/fp16 in, bf16/fp16 out).
    """
    batch, student_len = student_offsets.shape[:2]
    teacher_len, hidden = teacher_hidden.shape[1:]
    device = teacher_hidden.device
    student = _taking_part(student_offsets.to(device), student_mask)
    teacher = _taking_part(teacher_offsets.to(device), teacher_mask)
    overlap = student[..., 0, None] < teacher[:, None, :, 1]  # [B, Ls, Lt]
    overlap &= teacher[:, None, :, 0] < student[..., 1, None]
    # A student token overlaps a handful of teacher tokens: multiply by the sparse pairs, not the
    # dense [B, Ls, Lt] matrix (O(pairs·H) instead of O(Ls·Lt·H)). nonzero() is row-major sorted,
    # so the pairs are already coalesced.
    rows, t = overlap.view(batch * student_len, teacher_len).nonzero(as_tuple=True)
    pairs = torch.sparse_coo_tensor(
        torch.stack([rows, rows // student_len * teacher_len + t]),
        torch.ones(rows.numel(), device=device),
        (batch * student_len, batch * teacher_len),
        check_invariants=False,
        is_coalesced=True,
    )
    counts = torch.bincount(rows, minlength=batch * student_len).view(batch, student_len)
    with torch.autocast(device.type, enabled=False):  # fp32 sums, also under autocast
        sums = torch.sparse.mm(pairs, teacher_hidden.reshape(-1, hidden).float())
    aligned = sums.view(batch, student_len, hidden).div_(counts.clamp(min=1)[..., None])
    return aligned.to(teacher_hidden.dtype), counts > 0
