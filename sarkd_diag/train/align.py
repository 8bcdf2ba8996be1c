"""Dual-tokenizer mode: bring the teacher's hidden states onto the student's tokens by character spans.

When the two tokenizers split the same text differently there is no token-to-token map, but every
token covers a span of characters. A student token's target is the mean of the teacher states whose
spans overlap its own: a list of (student token, teacher token) pairs, then one `embedding_bag` (a
fused gather-and-mean: no [pairs, H] temporary). No Python loop over tokens; see
benchmarks/bench_align.py for the speed-up over a per-token loop.

Finding the pairs. Real tokenizers emit spans in text order, so the teacher tokens overlapping a
student token are a contiguous run, found with two binary searches (`_pairs_by_search`). Spans in
any other arrangement (nested, out of order) fall back to comparing every student token with every
teacher token (`_pairs_by_comparison`, a [B, Ls, Lt] matrix). Both give the same pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _taking_part(offsets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L] bool: the tokens that take part (not masked, and a non-empty span: a special token's
    (0, 0) covers no text)."""
    ok = offsets[..., 1] > offsets[..., 0]
    if mask is not None:
        ok &= mask.to(device=ok.device, dtype=torch.bool)
    return ok


def _pairs_by_search(teacher, t_ok, student, s_ok) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(teacher rows, pair counts) when the teacher spans, sorted by start, also have sorted ends; else None.

    Then {ends > s0} is a suffix and {starts < s1} a prefix of the sorted teacher tokens, so the
    overlap is the run between two `searchsorted` results. Each batch row is shifted by row << 32 so
    that one flat search serves the whole batch (offsets are < 2**32); teacher tokens that take no
    part sort last with start = end = `never`, beyond any student key, and fall in no run.
    """
    batch = teacher.shape[0]
    shift = torch.arange(batch, device=teacher.device)[:, None, None] << 32
    never = batch << 32
    teacher = torch.where(t_ok[..., None], teacher + shift, never).view(-1, 2)
    starts, order = teacher[:, 0].sort(stable=True)
    ends = teacher[:, 1][order]
    student = (student + shift).view(-1, 2)
    lo = torch.searchsorted(ends, student[:, 0].contiguous(), right=True)  # first end > s0
    hi = torch.searchsorted(starts, student[:, 1].contiguous())  # first start >= s1
    counts = (hi - lo).clamp_(min=0).mul_(s_ok.flatten())
    monotonic, total = torch.stack([(ends[1:] >= ends[:-1]).all(), counts.sum()]).tolist()  # one host sync
    if not monotonic:
        return None
    # Student token i's pairs sit at first[i] + k (k < counts[i]) and take sorted teacher token lo[i] + k.
    first = F.pad(counts.cumsum(0), (1, 0))[:-1]
    run = torch.repeat_interleave(lo - first, counts, output_size=total).add_(torch.arange(total, device=lo.device))
    return order[run], counts


def _pairs_by_comparison(teacher, t_ok, student, s_ok) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher rows, pair counts) for spans in any order: the [B, Ls, Lt] overlap matrix, nonzero()."""
    batch, student_len = student.shape[:2]
    teacher_len = teacher.shape[1]
    teacher = teacher.masked_fill(~t_ok[..., None], -1)  # (-1, -1) overlaps nothing
    student = student.masked_fill(~s_ok[..., None], -1)
    overlap = student[..., 0, None] < teacher[:, None, :, 1]  # [B, Ls, Lt]
    overlap &= teacher[:, None, :, 0] < student[..., 1, None]
    rows, t = overlap.view(batch * student_len, teacher_len).nonzero(as_tuple=True)  # row-major: grouped by row
    return rows // student_len * teacher_len + t, torch.bincount(rows, minlength=batch * student_len)


def align_teacher_to_student(
    teacher_hidden: torch.Tensor,
    teacher_offsets: torch.Tensor,
    teacher_mask: torch.Tensor | None,
    student_offsets: torch.Tensor,
    student_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean teacher hidden state over the teacher tokens whose character spans overlap each student token.

    teacher_hidden [B, Lt, H]; *_offsets [B, L, 2] (start, end) character offsets as fast tokenizers
    return them (`return_offsets_mapping=True`, non-negative, < 2**32); *_mask [B, L] (1 = real token,
    None = all real). Spans are half-open: [a, b) and [c, d) overlap when a < d and c < b. Masked and
    empty-span tokens (padding, special tokens) take no part on either side.

    Returns (aligned [B, Ls, H], valid [B, Ls] bool): `valid` marks student tokens with at least one
    overlapping teacher token; elsewhere `aligned` is 0. The sums are accumulated in fp32 and the
    result is cast back to teacher_hidden's dtype (bf16/fp16 in, bf16/fp16 out). Differentiable in
    teacher_hidden. One host sync (two when the spans need the general path).
    """
    batch, student_len = student_offsets.shape[:2]
    hidden = teacher_hidden.shape[-1]
    device = teacher_hidden.device
    teacher = teacher_offsets.to(device=device, dtype=torch.int64)
    student = student_offsets.to(device=device, dtype=torch.int64)
    t_ok, s_ok = _taking_part(teacher, teacher_mask), _taking_part(student, student_mask)
    spans = teacher, t_ok, student, s_ok
    teacher_rows, counts = _pairs_by_search(*spans) or _pairs_by_comparison(*spans)
    with torch.autocast(device.type, enabled=False):  # fp32 sums, also under autocast
        aligned = F.embedding_bag(  # bag i = teacher_rows[bounds[i]:bounds[i + 1]]; empty bags give 0
            teacher_rows,
            teacher_hidden.reshape(-1, hidden).float(),
            F.pad(counts.cumsum(0), (1, 0)),
            mode="mean",
            include_last_offset=True,
        )
    return aligned.view(batch, student_len, hidden).to(teacher_hidden.dtype), counts.view(batch, student_len) > 0
