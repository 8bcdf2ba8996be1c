"""Teacher memory per GPU with --shard-teacher: measured on CPU ranks, and computed for teachers too large here.

Measured (under torchrun, gloo on the CPU): the teacher is sharded exactly as `train --shard-teacher` does it
(`ShardedTeacher.hold`: its routers trainable as SAR trains them, sharded with their layer), then each rank counts
the bytes of what it holds — DTensor local shards plus the head, kept whole — and, in forward hooks on every
decoder layer, the bytes gathered at that moment; one forward of a few tokens. Rank 0 prints one JSON line per
rank's figures. A named shape is built on the meta device and sharded before anything is allocated (random
values: bytes are counted, not results).

    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --teacher PATH [--dtype fp16]
    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --shape dialogpt-large --dtype fp16

Computed (a plain `python benchmarks/fsdp_memory.py`): estimate-memory's arithmetic on meta-device models
(no weights), per GPU under DDP and sharded over 2 / 4 / 8 ranks, per-device batch 4 × 512, `mixed`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, GPT2Config, OlmoeConfig

from sarkd_diag.train import distributed as dist
from sarkd_diag.train.memory import GIB, estimate_mode, model_shape, sharded_teacher_params
from sarkd_diag.train.router import find_routers

SHAPES = {
    "dialogpt-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
    "dialogpt-small": GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "olmoe-1b-7b": OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                               num_experts_per_tok=8, vocab_size=50304),
    "gpt2-small-50304": GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50304, n_positions=2048),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def measure(teacher: torch.nn.Module, world: dist.World) -> dict:
    """This rank's teacher bytes once sharded: held (local shards + parts kept whole) and the most gathered at
    once during a forward."""
    from torch.distributed.tensor import DTensor

    full = sum(nbytes(p) for p in teacher.parameters())
    routers = [teacher.get_parameter(n) for r in find_routers(teacher) for n in r.param_names]
    for p in routers:
        p.requires_grad_(True)
    dist.ShardedTeacher(world.size, torch.device("cpu")).hold(teacher)
    if next(teacher.parameters()).is_meta:  # a named shape: only this rank's shards (and whole parts) allocated
        teacher.to_empty(device="cpu")
        teacher.tie_weights()  # to_empty gave a tied head its own tensor
    held = sum(nbytes(p.to_local() if isinstance(p, DTensor) else p) for p in teacher.parameters())
    whole = {id(p): p for p in teacher.parameters() if not isinstance(p, DTensor)}  # the head
    gathered = []

    def count(module, args):  # after FSDP's own pre-forward hook: this layer (and the root) are gathered now
        gathered.append(sum(nbytes(p) for p in teacher.parameters()
                            if not isinstance(p, DTensor) and id(p) not in whole))

    hooks = [layer.register_forward_pre_hook(count) for layer in dist.decoder_layers(teacher)]
    with torch.no_grad():
        teacher(input_ids=torch.arange(4).unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return {"rank": world.rank, "ranks": world.size, "full_bytes": full, "held_bytes": held,
            "whole_bytes": sum(nbytes(p) for p in whole.values()), "gathered_peak_bytes": max(gathered),
            "peak_bytes": held + max(gathered)}


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.teacher:
        return AutoModelForCausalLM.from_pretrained(args.teacher, dtype=DTYPES[args.dtype])
    with torch.device("meta"):  # no rank ever holds the whole of a large shape (its values do not matter here)
        return AutoModelForCausalLM.from_config(SHAPES[args.shape], dtype=DTYPES[args.dtype])


def measured(args) -> None:
    world, _ = dist.init(torch.device("cpu"))
    figures = world.gather(measure(build(args), world))
    if world.is_main:
        for row in figures:
            print(json.dumps(row))
    dist.teardown(world)


def computed() -> None:
    def meta(name: str, patterns=None):
        with torch.device("meta"):
            return model_shape(AutoModelForCausalLM.from_config(SHAPES[name]), name, patterns)

    batch, block = 4, 512
    for teacher, student in (("dialogpt-large", "dialogpt-small"), ("olmoe-1b-7b", "gpt2-small-50304")):
        t, s = meta(teacher), meta(student)
        ddp = estimate_mode("mixed", t, s, batch, block)
        sharded = [estimate_mode("mixed", t, s, batch, block, teacher_shards=n) for n in (2, 4, 8)]
        held, gathered = zip(*(sharded_teacher_params(t, n) for n in (2, 4, 8)), strict=True)
        print(f"{teacher} -> {student}, mixed, batch {batch} x {block}: DDP {ddp.total / GIB:.2f} GiB per GPU "
              f"(teacher {ddp.teacher_weights / GIB:.2f}); sharded over 2 / 4 / 8: "
              + " / ".join(f"{e.total / GIB:.2f}" for e in sharded) + " GiB (teacher "
              + " / ".join(f"{e.teacher_weights / GIB:.2f}" for e in sharded) + f"; held {held}, gathered "
              f"{gathered[0]} parameters)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a model directory (measured under torchrun)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a named shape, randomly initialised (measured)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    options = parser.parse_args()
    measured(options) if "WORLD_SIZE" in os.environ else computed()
