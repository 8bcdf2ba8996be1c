"""Which process of a torchrun job this is, and the few object collectives a run directory's writers need.

One run directory, several processes: each rank writes its own events file (`events.events_file_name`), rank 0
alone what there is one of (config, metrics, activations, summary). `train`'s `World` is a `Ranks` with its
device plumbing; `Probes` in a user's loop takes the process group the user's script joined (`joined`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; size 1 is a plain single-process run (every collective a no-op)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def joined(cls) -> Ranks:
        """The process group this process has joined (`torch.distributed.init_process_group`), else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what there is one of: config, metrics, checkpoints, the merged events and summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def gather(self, value):
        """Every rank's `value` (a picklable object), in rank order; [value] in one process."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a run directory chosen once, an exit code)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
