"""Tensors sharded over ranks (DTensors: a sharded teacher's routers, their gradients and optimizer state), asked
about without importing torch.distributed.tensor — half a second, and no DTensor exists before something has
imported it."""

from __future__ import annotations

import sys

import torch

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))  # checked first: the probes ask about every tensor every step


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor."""
    if type(t) in _PLAIN:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_shard(t):
    """What this rank holds of `t`: a DTensor's local shard, any other tensor itself. Reading it never starts a
    collective (a DTensor op would, per tensor)."""
    return t.to_local() if is_sharded(t) else t


def local_shards(tensors: list) -> list:
    """`local_shard` of each tensor; the list itself when none is sharded (told by type alone: what the probes read
    every step, where a call per tensor cost more than the reading's bookkeeping)."""
    if _PLAIN.issuperset(map(type, tensors)):
        return tensors
    return [local_shard(t) for t in tensors]
