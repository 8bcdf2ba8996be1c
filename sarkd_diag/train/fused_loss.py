"""The KD and CE sums from the last hidden states, the output projections fused in: no full logits, ever.

Over a 50k–150k vocabulary the logits are the largest tensors of a distillation step: both models'
`[batch, block, vocab]`, the student's with a gradient of the same size. Here each chunk of rows gets its
logits from the hidden states and the heads, its KD and CE rows and their gradient with respect to those
logits (the row functions of `losses.py`, unchanged), and that gradient is pushed through the head at
once — into the hidden states' gradient and the head weight's — so a chunk's logits die with the chunk.
Within a chunk the loss rows run a few rows at a time on a small fp32 workspace, and each group's gradient is
written over the student logits it came from: what a chunk holds is its student logits and half of its
teacher logits (`_run_chunks`), not fp32 copies of them.
What outlives the forward pass is the gradient of what backward must return anyway: the hidden states'
(`[tokens, hidden]`) and the head weight's (`[vocab, hidden]`, which becomes the weight's `.grad`).

The heads are called as modules, chunk by chunk, so their forward hooks see every chunk's logits: the
activation probe still names an `lm_head` that overflows and still measures the logits' fp16 headroom.

Precision, as in the unfused path: the logits are what the head gives under the mode's autocast (or in
the weights' dtype); the loss rows are fp32; the gradient products run in the logits' dtype, on a gradient
that already carries the factor backward will bring (`grad_factor`: the loss scale × ranks / targets, which
the loop knows before the forward), so fp16 products overflow and flush exactly where the unfused
backward's would and a loss-scale collapse is still found at the head. Backward multiplies by what it
actually brings over that factor (1 when the loop's factor was right). The head weight's gradient is
accumulated chunk by chunk in the logits' dtype: in bf16 and fp16 that is one rounding per chunk, where
the unfused product rounds once.

The gradient is computed for the weighted sum `alpha_kd · kd + alpha_ce · ce` (the `objective` output),
the one the loop differentiates; the kd and ce sums come along as plain values for the metrics.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .losses import KD_BUFFERS, RowFn, ce_loss_sum, ce_rows, check_kd_options, kd_rows

# bytes of one chunk of the student's logits, [rows, vocab], in their dtype: 83.5 rows at 50,257 tokens in fp32, 167
# in bf16 (whose products also run faster on wider chunks: 84 → 128 rows, each of the three 6-9 % faster)
CHUNK_BYTES = 2**24
# fewer rows make the head's forward product slow: on this project's CPU (MKL, fp32, one thread) 83 rows cost 25 % more
# per row than 84 (608 against 486 ms per 512 rows at 768 inputs, 838 against 680 at 1024)
MIN_CHUNK_ROWS = 84
TEACHER_PARTS = 2  # the teacher's logits are made this many parts of a chunk at a time (see _run_chunks)
ROW_GROUP_VALUES = 2**17  # fp32 values of one buffer of the loss rows' workspace (512 KiB): it stays in cache
# on an accelerator each element-wise op of a group is a kernel launch: CPU-sized groups (2 rows at 50,257 tokens)
# run ~48,000 ops for a 4 × 512 step, groups of this many values ~7,500, one group a chunk ~3,000 (counted aten ops;
# the time not measured on a GPU yet); each fp32 buffer 4 MiB
ACCELERATOR_ROW_GROUP_VALUES = 2**20


def chunk_rows(vocab: int, logits_bytes: int = 4) -> int:
    """Rows per chunk: the student's logits (`logits_bytes` an element) of about CHUNK_BYTES, never fewer than
    MIN_CHUNK_ROWS (84 rows in fp32 from 49,933 tokens on). A batch's chunks are never narrower (`_chunks`)."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (vocab * logits_bytes))


def group_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows per group of the loss rows (on the CPU 2 at 50,257 tokens, 1 from 65,537 on): their element-wise passes
    run on a workspace that fits in cache, three times faster than over a whole chunk on this project's CPU. On an
    accelerator, groups of ACCELERATOR_ROW_GROUP_VALUES: enough values per kernel to pay for its launch."""
    values = ROW_GROUP_VALUES if device_type == "cpu" else ACCELERATOR_ROW_GROUP_VALUES
    return max(1, values // vocab)


def widest_chunk(n_rows: int, vocab: int, logits_bytes: int) -> int:
    """Rows of the widest chunk that `n_rows` rows are cut into: what one chunk's logits hold at most."""
    first = _chunks(n_rows, chunk_rows(vocab, logits_bytes))[0]
    return first.stop - first.start


class FusedSums(NamedTuple):
    """One micro-batch's loss sums over target tokens: `objective` carries the gradient, kd and ce do not."""

    objective: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: torch.Tensor


def fused_kd_ce(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    labels: torch.Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 2.0,
    jsd_beta: float = 0.5,
    alpha_kd: float = 0.5,
    alpha_ce: float = 0.5,
    grad_factor: float | torch.Tensor = 1.0,
    chunk_tokens: int | None = None,
) -> FusedSums:
    """`kd_loss_sum(head_s(h_s), head_t(h_t), ...)` and `ce_loss_sum(head_s(h_s), labels)` without the logits.

    Hidden states are `[batch, length, hidden]` (the teacher's on the teacher head's device), labels
    `[batch, length]` already shifted, -100 where a position is not a target. Gradients reach the student's
    hidden states, head weight and bias, and the teacher's hidden states when they require grad (its routers
    train); the teacher's head is frozen. `grad_factor` is what backward is expected to multiply the
    objective's gradient by (see the module's docstring); any factor gives the right gradient.
    """
    check_kd_options(kind, temperature, jsd_beta)
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:2] \
            or teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(
            "hidden states must be [batch, length, hidden] over the same positions as labels [batch, length]; got "
            f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)} and {tuple(labels.shape)}"
        )
    if teacher_head.weight.requires_grad:
        raise ValueError("the fused loss trains no teacher head: freeze it (requires_grad_(False))")
    vocab = student_head.weight.shape[0]
    if teacher_head.weight.shape[0] != vocab:
        raise ValueError(f"student and teacher heads must share a vocabulary; got {vocab} and "
                         f"{teacher_head.weight.shape[0]}")
    flat_labels = labels.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = chunk_rows(vocab, _logits_dtype(student_head, student_hidden).itemsize)
    plan = _Plan(
        student_head, teacher_head, kd_rows(kind, temperature, jsd_beta), ce_rows(flat_labels), flat_labels != -100,
        chunk_tokens, group_rows(vocab, student_hidden.device.type),
        KD_BUFFERS[kind] + 1,
        alpha_kd, alpha_ce, grad_factor,
    )
    if plan.chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1; got {plan.chunk_tokens}")
    inputs = (student_hidden.reshape(-1, student_hidden.shape[-1]), student_head.weight, student_head.bias,
              teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return FusedSums(*_FusedKDCE.apply(plan, *inputs))
    return FusedSums(*_run_chunks(plan, *inputs, needs=(False,) * 4)[:3])


@torch.no_grad()
def fused_ce_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over target positions from the last hidden states, without gradient: evaluation's
    loss, `ce_loss_sum` on one chunk of the head's logits at a time, so no more of them is alive than a training
    step holds."""
    flat_hidden, flat_labels = hidden.reshape(1, -1, hidden.shape[-1]), labels.reshape(1, -1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for rows in _chunks(flat_labels.shape[1], chunk_rows(head.weight.shape[0], _logits_dtype(head, hidden).itemsize)):
        total += ce_loss_sum(head(flat_hidden[:, rows]), flat_labels[:, rows])
    return total


def _logits_dtype(head: nn.Module, hidden: torch.Tensor) -> torch.dtype:
    """The dtype a head's logits will have: the autocast dtype where autocast is on, else the weight's (only the
    chunks' size rests on it)."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype


class _Plan(NamedTuple):
    student_head: nn.Module
    teacher_head: nn.Module
    kd: RowFn
    ce: RowFn
    flat_mask: torch.Tensor  # [batch · length] bool, True at target rows
    chunk_tokens: int
    group_rows: int
    buffers: int  # fp32 [group rows, vocab] buffers: the KD rows' workspace and one for the CE gradient
    alpha_kd: float
    alpha_ce: float
    grad_factor: float | torch.Tensor  # what backward is expected to bring: the products run on scaled gradients


class _HeadGradient:
    """The gradient products of one head: into its input (hidden states) and, for the student, its weight and bias.

    Created at the first chunk, when the logits' dtype (the products' dtype) is known. A weight held in another
    dtype (fp32 masters under autocast) is multiplied under the mode's autocast, whose cache already holds the
    cast the head's forward made: no second copy of the weight.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 logits_dtype: torch.dtype, needs: tuple[bool, bool, bool]):
        self.dtype, self.weight = logits_dtype, weight
        need_hidden, need_weight, need_bias = needs
        self.hidden = torch.empty(hidden.shape, dtype=self.dtype, device=hidden.device) if need_hidden else None
        self.need_weight, self.weight_grad = need_weight, None  # the first chunk's product starts the sum
        self.bias_grad = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None

    def add_bias(self, logits_grad: torch.Tensor) -> None:
        """A row group's logits gradient (fp32, scaled) into the bias's, before it is rounded to the logits' dtype."""
        if self.bias_grad is not None:
            self.bias_grad += logits_grad.sum(0)

    def add_chunk(self, rows: slice, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        """Push one chunk's logits gradient ([chunk rows, vocab], scaled, in the logits' dtype) through the head."""
        device = grad.device.type
        if self.hidden is not None:
            with torch.autocast(device, dtype=self.dtype, enabled=self.weight.dtype != self.dtype):
                self.hidden[rows] = torch.mm(grad, self.weight)
        if self.need_weight:
            chunk_hidden = hidden[rows].detach().to(self.dtype)
            with torch.autocast(device, enabled=False):
                if self.weight_grad is None:
                    self.weight_grad = torch.mm(grad.t(), chunk_hidden)
                else:
                    self.weight_grad.addmm_(grad.t(), chunk_hidden)

    def grads(self) -> list[torch.Tensor | None]:
        return [self.hidden, self.weight_grad, self.bias_grad]


def _run_chunks(plan: _Plan, h_s, w_s, b_s, h_t, needs: tuple[bool, ...]):
    """The chunk loop: each chunk's logits from the heads, its loss rows, its gradient through the heads.

    Returns the weighted objective, the kd and ce sums (0-dim fp32) and the gradients of the inputs (None where
    not needed). Like `losses._run_chunks`: fixed chunks known from the shapes (no host sync), non-target rows
    selected away with `where`, one workspace reused by every chunk. What a chunk holds at once is its student
    logits, which become their own gradient row group by row group (the heads' forward hooks have read them by
    then), one part of its teacher logits (`TEACHER_PARTS`: the student's feed three wide products, the
    teacher's one, so it is the teacher's that are made narrower), and the row groups' small fp32 workspace.
    """
    n_rows, device = h_s.shape[0], h_s.device
    chunks = _chunks(n_rows, plan.chunk_tokens)
    group = min(plan.group_rows, chunks[0].stop)
    workspace = [torch.empty((group, w_s.shape[0]), dtype=torch.float32, device=device) for _ in range(plan.buffers)]
    row_values = torch.empty(2, n_rows, dtype=torch.float32, device=device)  # each row's kd and ce
    heads: list[_HeadGradient | None] = [None, None]  # student, teacher
    need_student, need_teacher = any(needs[:3]), needs[3]
    for chunk in chunks:
        logits_s = plan.student_head(h_s[chunk])
        if need_student and heads[0] is None:  # the logits' dtype is known now
            heads[0] = _HeadGradient(h_s, w_s, b_s, logits_s.dtype, needs[:3])
        for part in _split(chunk, TEACHER_PARTS):
            logits_t = plan.teacher_head(h_t[part]).to(device)
            if need_teacher and heads[1] is None:
                heads[1] = _HeadGradient(h_t, plan.teacher_head.weight, None, logits_t.dtype, (True, False, False))
            for rows in _slices(part.start, part.stop, group):
                _add_rows(plan, rows, workspace, logits_s[_shift(rows, chunk)], logits_t[_shift(rows, part)],
                          row_values, heads, needs)
            if need_teacher:
                heads[1].add_chunk(part, h_t, logits_t.to(h_t.device))
            del logits_t
        if need_student:
            heads[0].add_chunk(chunk, h_s, logits_s)
        del logits_s
    kd_total, ce_total = torch.where(plan.flat_mask, row_values, 0.0).sum(1).unbind()
    objective = plan.alpha_kd * kd_total + plan.alpha_ce * ce_total
    student, teacher = heads
    grads = (student.grads() if student else [None] * 3) + (teacher.grads()[:1] if teacher else [None])
    return objective, kd_total, ce_total, grads


def _chunks(n_rows: int, rows: int) -> list[slice]:
    """`n_rows` in chunks of at least `rows` rows (fewer only when there are fewer in all), at most `2·rows - 1`
    (as many as fit: 512 rows of at least 84 make six chunks of 85 or 86): a narrower chunk's forward product would
    be the slow one that `MIN_CHUNK_ROWS` keeps away."""
    return _split(slice(0, n_rows), max(1, n_rows // rows))


def _split(rows: slice, parts: int) -> list[slice]:
    """`rows` in `parts` slices whose sizes differ by at most one row, the first as large as any: no small last
    one, whose products run least efficiently (and may take the BLAS library's buffers for one more shape)."""
    size = rows.stop - rows.start
    ends = [rows.stop - size * (parts - i) // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(ends[:-1], ends[1:], strict=True) if b > a]


def _slices(start: int, stop: int, step: int) -> list[slice]:
    return [slice(at, min(at + step, stop)) for at in range(start, stop, step)]


def _shift(rows: slice, within: slice) -> slice:
    """`rows` (flat row numbers) as rows of the tensor that holds `within`'s."""
    return slice(rows.start - within.start, rows.stop - within.start)


def _add_rows(plan: _Plan, rows: slice, workspace: list[torch.Tensor], logits_s: torch.Tensor,
              logits_t: torch.Tensor, row_values: torch.Tensor, heads: list, needs: tuple[bool, ...]) -> None:
    """One row group's loss rows into `row_values`, and their gradient written over the logits they came from, in
    the logits' dtype: the row functions have copied the logits to the fp32 workspace before."""
    n = rows.stop - rows.start
    scratch, ce_buffer, log_s, log_t, *extra = [w[:n] for w in workspace]
    need_student, need_teacher = any(needs[:3]), needs[3]
    ce_values, (ce_grad,) = plan.ce(rows, [scratch, ce_buffer], [logits_s], (need_student,))
    kd_values, (kd_grad_s, kd_grad_t) = plan.kd(rows, [scratch, log_s, log_t, *extra], [logits_s, logits_t],
                                                (need_student, need_teacher))
    row_values[0, rows], row_values[1, rows] = kd_values, ce_values
    dropped = ~plan.flat_mask[rows][:, None]
    if need_student:
        grad = ce_grad.mul_(plan.alpha_ce).add_(kd_grad_s, alpha=plan.alpha_kd).mul_(plan.grad_factor)
        heads[0].add_bias(grad.masked_fill_(dropped, 0.0))
        logits_s.copy_(grad)
    if need_teacher:
        logits_t.copy_(kd_grad_t.mul_(plan.alpha_kd).mul_(plan.grad_factor).masked_fill_(dropped, 0.0))


class _FusedKDCE(torch.autograd.Function):
    """Autograd node of the fused loss: its gradients were computed in the forward pass, backward scales them."""

    @staticmethod
    def forward(ctx, plan, h_s, w_s, b_s, h_t):
        needs = tuple(ctx.needs_input_grad[1:])
        objective, kd, ce, ctx.grads = _run_chunks(plan, h_s, w_s, b_s, h_t, needs)
        ctx.grad_factor = plan.grad_factor
        ctx.input_dtypes = [x.dtype if x is not None else None for x in (h_s, w_s, b_s, h_t)]
        ctx.mark_non_differentiable(kd, ce)
        return objective, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_objective, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss's gradient was already used by an earlier backward; "
                "compute the loss again instead of retaining its graph"
            )
        grads, ctx.grads = ctx.grads, None
        rescale = grad_objective / ctx.grad_factor  # 1 when the loop's factor was the one backward brings
        return None, *[_rescaled(g, rescale, dtype) if g is not None else None
                       for g, dtype in zip(grads, ctx.input_dtypes, strict=True)]


def _rescaled(grad: torch.Tensor, rescale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient times `rescale`, in the input's dtype, in one pass: in place and handed over when the dtypes
    agree, else written straight into the input's dtype (a bf16 weight gradient of an fp32 master)."""
    if grad.dtype == dtype:
        return grad.mul_(rescale)
    return torch.mul(grad, rescale, out=torch.empty_like(grad, dtype=dtype))


# ------------------------------------------------------------------------------------ which models fuse
NO_LOGITS_KEPT = "logits_to_keep"


def last_hidden_state(model: nn.Module, **inputs) -> torch.Tensor:
    """A causal LM's forward (its hooks and routers as ever) for its last hidden state alone, with no logits where
    the forward takes `logits_to_keep` (an empty index: the head runs on zero positions).

    Under autograd the state is asked for among the outputs (`output_hidden_states`): the graph holds every layer's
    output anyway (the next layer's norm saves it), and wrappers that hook the tensors a forward returns — FSDP2
    gathers its parameters for backward there — must see the one backward runs through. Without autograd that
    request would keep every layer's states until the loss is done, where a frozen teacher frees each as the next
    layer runs (DialoGPT-large's 37 × [batch, block, 1280]): the state is caught as it leaves the decoder instead.
    """
    if torch.is_grad_enabled():
        return model(**inputs, **_no_logits(model, inputs), output_hidden_states=True).hidden_states[-1]
    return _forward_to_last_hidden(model, inputs)[1]


def _no_logits(model: nn.Module, inputs: dict) -> dict:
    if not _keeps_logits_selectively(type(getattr(model, "module", model))):  # DDP's wrapper takes anything
        return {}
    return {NO_LOGITS_KEPT: torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)}


@functools.cache
def _keeps_logits_selectively(model_class: type) -> bool:
    """Whether a model class's forward takes `logits_to_keep`: asked once per class, not at every forward
    (reading a signature costs tens of µs)."""
    return NO_LOGITS_KEPT in inspect.signature(model_class.forward).parameters


def _decoder(model: nn.Module) -> nn.Module:
    """The module whose output is the last hidden state: the decoder, which a forward may call past its base model
    (OPT's calls `model.decoder`, so a hook on its base model never fires)."""
    model = getattr(model, "module", model)
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _forward_to_last_hidden(model: nn.Module, inputs: dict):
    """(the model's output, its decoder's output: the last hidden state)."""
    caught = []
    handle = _decoder(model).register_forward_hook(lambda _module, _args, out: caught.append(_state(out)))
    try:
        output = model(**inputs, **_no_logits(model, inputs))
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(f"{type(model).__name__}'s forward never ran its decoder ({type(_decoder(model)).__name__})")
    return output, caught[-1]


def _state(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def unfusable_reason(model: nn.Module) -> str | None:
    """Why a causal LM's logits cannot be computed chunk by chunk from its last hidden state, or None if they can.

    Checked, not assumed, by following the tensors of a forward on a few tokens (evaluation mode, no gradient):
    the head is a linear layer the forward calls, its input is the decoder's output — the state
    `last_hidden_state` returns, either way it reads it —, its output is the logits the model returns, and with
    `logits_to_keep` empty there are none. Identity, not equal values, so it holds on the meta device too (what
    `estimate-memory` builds) and for a model whose forward is already NaN; a soft cap or a scale on the logits
    (Gemma 2, Cohere, Granite) or a projection between the state and the head makes new tensors and fails it.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"its output head is {type(head).__name__}, not a linear layer"
    if not _keeps_logits_selectively(type(model)):
        return f"its forward ({type(model).__name__}) takes no {NO_LOGITS_KEPT}"
    if _decoder(model) is model:
        return f"it has no decoder apart from its head ({type(model).__name__} is its own decoder)"
    ids = torch.arange(4, device=head.weight.device).remainder(head.weight.shape[0]).unsqueeze(0)
    inputs = {"input_ids": ids}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _head_reason(model, head, inputs)
    finally:
        model.train(was_training)


def _head_reason(model: nn.Module, head: nn.Linear, inputs: dict) -> str | None:
    seen = {}
    hooks = [_decoder(model).register_forward_hook(lambda _m, _args, out: seen.update(state=_state(out))),
             head.register_forward_hook(lambda _m, args, out: seen.update(head_input=args[0], head_output=out))]
    try:
        plain = model(**inputs, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    if "state" not in seen:
        return f"its forward never runs its decoder ({type(_decoder(model)).__name__})"
    if "head_input" not in seen:
        return "its forward does not call its output head as a module"
    if not (_same_tensor(seen["head_input"], seen["state"]) and _same_tensor(plain.hidden_states[-1], seen["state"])):
        return "its output head does not read its last hidden state (a projection in between)"
    if plain.logits is not seen["head_output"]:
        return "its logits are not its output head's output (a soft cap or a scale on the logits)"
    unkept, state = _forward_to_last_hidden(model, {**inputs, "output_hidden_states": True})
    if unkept.logits is not None and unkept.logits.numel() > 0:
        return f"its forward computes logits with {NO_LOGITS_KEPT} empty"
    if not _same_tensor(unkept.hidden_states[-1], state):
        return "the last of its hidden states is not its decoder's output"
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements of the same storage: the tensor itself, or a view of it that takes all of it (the head's
    input is the state sliced to the positions kept, all of them by default)."""
    def storage_owner(t):
        return t if t._base is None else t._base

    return a is b or (storage_owner(a) is storage_owner(b) and a.shape == b.shape and a.stride() == b.stride()
                      and a.storage_offset() == b.storage_offset())
