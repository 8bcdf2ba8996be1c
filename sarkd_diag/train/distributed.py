"""torchrun plumbing as small functions: who this process is, and the few collectives the loop needs.

Distributed training is PyTorch's own: `torch.distributed` with gloo on CPU and NCCL on CUDA, the student
wrapped in DistributedDataParallel. Everything here is a no-op in a single process (a `World` of size 1),
so the loop calls `world.all_sum(...)` or `world.average_gradients(...)` without asking whether it runs
under torchrun, and a single-process run pays nothing.

Gradient arithmetic: each rank backpropagates its share of the global loss times the world size, and DDP
averages gradients over ranks, so the gradient is the global loss's (the loss is normalised by the global
target count, which every rank knows from the global batch's indices without communicating).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..contract.errors import BadInput
from ..contract.ranks import Ranks
from ..contract.shards import is_sharded

TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World(Ranks):
    """This process's place among the ranks (`contract.ranks.Ranks`: rank, size, gather, broadcast, barrier) and
    its device plumbing; size 1 is a plain single-process run."""

    local_rank: int = 0
    backend: str | None = None
    host_group: object = None  # a gloo group for flags the host holds (the default group on CPU)
    alone: bool = False  # after a failure of this rank alone: no more collectives (see on_its_own)

    def on_its_own(self) -> World:
        """This rank after an error of its own (an exception, out of memory): the others may be waiting in a
        collective it will never join, so it closes without one and exits; torchrun then stops the rest."""
        return replace(self, alone=True)

    @property
    def distributed(self) -> bool:
        return self.size > 1 and not self.alone

    # --------------------------------------------------------------------------------- collectives
    def all_sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors (0-dim) summed over ranks in one all-reduce; returned as they are in one process."""
        if not self.distributed:
            return tensors
        packed = torch.stack([t.detach().float().reshape(()) for t in tensors])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return tuple(packed.unbind())

    def any_flag(self, flag: torch.Tensor) -> torch.Tensor:
        """True on every rank when it is true on any (a bool tensor); the flag itself in one process."""
        if not self.distributed:
            return flag
        count = flag.detach().float().reshape(())
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return count > 0

    def any_host_flag(self, flag: bool) -> bool:
        """A host-side flag (a stop signal) true on every rank when true on any; a CPU all-reduce over gloo,
        so even an NCCL run does not wait for its GPU."""
        if not self.distributed:
            return flag
        count = torch.tensor([int(flag)])
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.host_group)
        return int(count[0]) > 0

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of parameters DDP does not hold (teacher routers, a dual-mode projection)
        over ranks, one coalesced all-reduce, as DDP does for the student's. A sharded teacher's routers are
        left alone: FSDP's reduce-scatter averaged them already."""
        grads = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's `clip_grad_norm_` where some parameters may be sharded (a sharded teacher's routers): torch's
        own cannot mix DTensor and plain gradients, so the norm is taken of the whole gradients and of the local
        shards, whose squares (in fp32) are summed over ranks in one all-reduce — the norm of the full
        gradients — and every gradient is scaled as torch scales it. Exactly torch's call when nothing is
        sharded."""
        sharded = [p for p in params if is_sharded(p)]
        if not sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        whole = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
        shards = [p.grad.to_local() for p in sharded if p.grad is not None]
        device = sharded[0].device
        shards_squared = torch.stack([torch.linalg.vector_norm(g).float() for g in shards]).square().sum() \
            if shards else torch.zeros((), device=device)
        dist.all_reduce(shards_squared, op=dist.ReduceOp.SUM)  # every rank, even one whose shard has no gradient
        norms = [torch.linalg.vector_norm(g) for g in whole] + [shards_squared.sqrt()]
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in whole + shards:
            g.mul_(scale.to(g.device))
        return total

    def agree_on_overflow(self, loss_scaler, optimizer: torch.optim.Optimizer) -> None:
        """After unscale: a loss scaler's found-inf flags all-reduced, so an overflow on any rank skips the step
        and lowers the scale on every rank (as ShardedGradScaler does); nothing without a scaler."""
        if not self.distributed:
            return
        for found in loss_scaler.found_inf(optimizer):  # torch's own per-device flags, all-reduced in place
            dist.all_reduce(found, op=dist.ReduceOp.MAX)

    # ------------------------------------------------------------------------------ models and data
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The student as DDP trains it (gradients averaged over ranks during backward); itself in one process."""
        if not self.distributed:
            return model
        ddp = nn.parallel.DistributedDataParallel
        # the models' buffers are constants (no batch norm): no buffer broadcast before every forward
        buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        device_ids = [device.index] if device.type == "cuda" else None
        return ddp(model, device_ids=device_ids, **{buffers: False})

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rows rank::size): the ranks partition every global batch."""
        return index[self.rank::self.size] if self.distributed else index


class WholeTeacher:
    """Every rank holds the whole frozen teacher (one process, or DDP's ranks): it stays as loaded."""

    name = "whole"
    size = 1  # the teacher is in one piece (what memory estimates divide it by)

    def hold(self, teacher: nn.Module) -> None:
        """Nothing to do."""


@dataclass(frozen=True)
class ShardedTeacher:
    """The teacher sharded over the ranks with FSDP2 (`--shard-teacher`): `fully_shard` per decoder layer and at
    the root, so a rank keeps 1/N of the teacher and gathers one layer at a time in the forward (and again in
    the backward when routers train). Weights stay in the dtypes the precision mode gave them (no
    MixedPrecisionPolicy cast). The trained routers are sharded with their layer: DTensor parameters whose
    gradients FSDP reduce-scatters (averaged over ranks), gathered whole in the layer's forward, where the router
    terms read them. The output head stays whole on every rank (`ignored_params`): the fused loss applies it
    outside the teacher's forward, where a shard is not gathered."""

    size: int
    device: torch.device

    name = "sharded"

    def hold(self, teacher: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(teacher)
        if not layers:
            raise BadInput(f"--shard-teacher: {type(teacher).__name__} names no decoder layer class "
                           "(_no_split_modules) to shard by")
        mesh = init_device_mesh(self.device.type, (self.size,))
        head = teacher.get_output_embeddings()
        options = {"mesh": mesh, "reshard_after_forward": True,
                   "ignored_params": set(head.parameters()) if head is not None else set()}
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(teacher, **options)  # the rest (embeddings, final norm): gathered for the whole forward


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value, gathered from every rank (a collective: every rank calls it, in the same
    order); any other tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` as `like` holds it: for a DTensor, a DTensor of this rank's part of `full` (cut locally, no
    communication: every rank holds `full`); for any other tensor, `full` itself."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers, by the classes transformers keeps whole when it splits a model across devices
    (`_no_split_modules`; sharded or not: fully_shard subclasses them); [] when it names none."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(cls.__name__ in kinds for cls in type(m).__mro__)]


def teacher_holding(world: World, device: torch.device, shard: bool) -> WholeTeacher | ShardedTeacher:
    """How this run holds the teacher: sharded over the ranks (`--shard-teacher`), else whole on each."""
    return ShardedTeacher(world.size, device) if shard else WholeTeacher()


def world_from_env() -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (size 1 without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and pick this rank's device.

    Under torchrun a CUDA rank trains on cuda:LOCAL_RANK; in a single process nothing happens.
    """
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return World(world.rank, world.size, world.local_rank, backend, host_group), device


def teardown(world: World) -> None:
    """Leave the process group together: all ranks reach it, and what still holds the group (DDP's reducer,
    dropped by the caller) is collected first, so no gloo thread outlives it at interpreter exit."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def gradient_sync(model: nn.Module, sync: bool):
    """DDP's all-reduce on this backward (`sync`), or not (an accumulation micro-batch before the last)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def launch_command(nproc: int, args: list[str]) -> list[str]:
    """The torchrun command `sarkd-diag train --nproc N` runs: the same arguments, minus --nproc."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "sarkd_diag", "train", *strip_nproc(args)]


def strip_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--nproc",):
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
