"""A run out of memory, explained: where it ran out, what the run needs, and which options to change.

The loop catches the failure, frees the failed step's tensors and keeps the last good step in a checkpoint;
this module words the `out_of_memory` event, so the user learns whether to resume with other options or
start again smaller, and keeps track of where the run is (`Phase`) so the event can say where it ran out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..contract.config import DistillConfig


class Phase:
    """Which part of the run is going on (`setup`, `forward`, `backward`, `optimizer`, `eval`, `policy`), for an
    out-of-memory failure to say where it happened and whether the step had touched the weights yet.

    `with phase("forward"): ...` marks a part; leaving it normally goes back to the enclosing one, while an
    exception leaves `current` at the part it was raised in, for the handler to read.
    """

    def __init__(self, current: str = "setup"):
        self.current = current

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        enclosing, self.current = self.current, name
        yield
        self.current = enclosing  # not reached on an exception: `current` stays where it was raised


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError) or Python's MemoryError."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def out_of_memory_message(cfg: DistillConfig, mode: str, teacher: nn.Module, student: nn.Module,
                          device: torch.device, *, dual: bool, fused: bool, error: str, phase: str, step: int,
                          saved: int | None, teacher_shards: int = 1) -> str:
    """The event's message: the failure, the run's memory breakdown (the logits as the run holds them, `fused` or
    not; the teacher split `teacher_shards` ways under --shard-teacher), and what to try — options a resume may
    change (when `saved`, the step a checkpoint keeps) and options only a new run may."""
    resumable = [flag for flag, on in (("--gradient-checkpointing", cfg.gradient_checkpointing),
                                       ("--offload-teacher-to-cpu", cfg.offload_teacher_to_cpu or cfg.shard_teacher))
                 if not on]  # a sharded teacher cannot also be offloaded
    fresh = [f"--block-size {cfg.block_size // 2}"] if cfg.block_size >= 32 else []
    if cfg.per_device_batch_size > 1:
        fresh.append(f"--per-device-batch-size {cfg.per_device_batch_size // 2} "
                     f"--grad-accum-steps {cfg.grad_accum_steps * 2}")
    advice = []
    if resumable:
        advice.append(" ".join(resumable) + (f" (then --resume: step {saved} is saved)" if saved is not None else ""))
    if fresh:
        advice.append("in a new run " + " or ".join(fresh))
    breakdown = _memory_breakdown(cfg, mode, teacher, student, device, teacher_shards, dual, fused)
    return (f"out of memory in the {phase} of step {step} ({error}); {breakdown}. "
            + (f"Try {'; or '.join(advice)}" if advice else "The models do not fit this device"))


def _memory_breakdown(cfg: DistillConfig, mode: str, teacher: nn.Module, student: nn.Module,
                     device: torch.device, teacher_shards: int, dual: bool, fused: bool) -> str:
    """estimate-memory's breakdown for this run, and on CUDA what the allocator holds."""
    try:
        from .memory import estimate_mode, format_breakdown, model_shape

        text = format_breakdown(estimate_mode(
            mode, model_shape(teacher, cfg.teacher_model, cfg.router_patterns),
            model_shape(student, cfg.student_model), cfg.per_device_batch_size, cfg.block_size,
            gradient_checkpointing=cfg.gradient_checkpointing, offload_teacher=cfg.offload_teacher_to_cpu,
            fused_loss=fused, teacher_shards=teacher_shards, dual=dual))
    except Exception as exc:  # an estimate is a help, never a second failure
        text = f"no memory estimate ({type(exc).__name__})"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        text += (f"; the allocator holds {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB "
                 f"(peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, reserved "
                 f"{torch.cuda.memory_reserved(device) / 2**20:.0f} MiB) of {total / 2**20:.0f} MiB")
    return text
