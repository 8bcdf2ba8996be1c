"""Going on from a checkpoint: which run directory, what a checkpoint of the run holds, and its logs cut to match.

A run continues where it stopped (`--resume`: the newest checkpoint of its directory that loads), from a
given checkpoint (`--resume-from PATH`, in that run's directory or a new one), or after a rollback of the
non-finite policy. In every case `TrainingState` puts back exactly what the checkpoint holds, and a resumed
run's logs end where the checkpoint was taken, so the steps redone after it are not recorded twice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..contract.config import DistillConfig
from ..contract.errors import BadInput
from ..contract.events import events_file_name
from ..contract.rundir import check_output_dir, claim_output_dir, default_run_dir, differing_options
from ..contract.shards import is_sharded, local_shard
from ..contract.wording import shell_command
from ..contract.writers import RunClaim
from . import checkpoint as ckpt
from .data import BatchStream
from .distributed import World, full_tensor, shard_of
from .precision import Precision


def locate_run(cfg: DistillConfig, world: World, mode: str) -> tuple[Path, Path | None, RunClaim | None]:
    """The run directory, checked before anything in it changes and claimed at once (before the slow setup: two
    runs started into one directory together would both have found it free), the run directory of the checkpoint
    to resume from (None for a new run), and the claim (rank 0's, for the whole job; None on the other ranks)."""
    run_dir, source = _run_and_source(cfg, world, mode)
    main = world.broadcast(os.getpid() if world.is_main else None) if world.distributed else os.getpid()
    check_output_dir(run_dir, cfg.to_dict(), cfg.overwrite, resume=source is not None and _in_place(source, run_dir),
                     besides=[main])
    if cfg.resume and not ckpt.list_checkpoints(run_dir):
        raise BadInput(f"--resume: nothing to resume, {run_dir} has no checkpoint yet (one is written "
                       "every --save-steps steps and at the end)")
    return run_dir, source, claim_output_dir(run_dir) if world.is_main else None


def _not_a_checkpoint(path: Path) -> BadInput:
    """--resume-from named something else: a run directory or its checkpoints/ names the newest checkpoint."""
    run = path.parent if path.name == ckpt.CHECKPOINTS else path
    held = ckpt.list_checkpoints(run)
    if held:
        return BadInput(f"--resume-from {path}: not a checkpoint but {'the checkpoints of ' if run != path else ''}"
                        f"a run directory; its newest checkpoint is {held[-1]} (or continue the run itself: "
                        f"{shell_command('train', '--output-dir', run, '--resume')})")
    return BadInput(f"--resume-from {path}: not a checkpoint (no {ckpt.META}); checkpoints are the directories "
                    f"RUN/{ckpt.CHECKPOINTS}/step-NNNNNNNN")


def _run_and_source(cfg: DistillConfig, world: World, mode: str) -> tuple[Path, Path | None]:
    if cfg.resume:
        return Path(cfg.output_dir), Path(cfg.output_dir)
    if not cfg.resume_from:
        if cfg.output_dir:
            return Path(cfg.output_dir), None
        return world.broadcast(default_run_dir(mode) if world.is_main else None), None  # rank 0's, for all
    checkpoint = Path(cfg.resume_from)
    if not (checkpoint / ckpt.META).is_file():
        raise _not_a_checkpoint(checkpoint)
    source = checkpoint.parent.parent
    if cfg.output_dir:
        return Path(cfg.output_dir), source
    if not (source / "config.json").is_file():
        raise BadInput(f"--resume-from {checkpoint} does not lie in a run directory: give --output-dir")
    return source, source


def _in_place(source: Path, run_dir: Path) -> bool:
    """A resume in place: the checkpoint's run goes on in its own directory."""
    return source.resolve() == run_dir.resolve()


@dataclass
class Resumed:
    """Where a resumed run continues from: the checkpoint, the run it belongs to, the log offsets to keep."""

    checkpoint: Path
    source_dir: Path
    in_place: bool
    step: int
    log_offsets: dict[str, int]
    fallbacks: list[str]

    def continue_logs(self, run_dir: Path, events_name: str, is_main: bool) -> None:
        """The logs end where the checkpoint was taken, so the steps redone after it are not recorded twice.

        In place, events.jsonl and metrics.jsonl are cut at the checkpoint's offsets and newer checkpoints
        (of steps about to be redone, or unreadable) are removed; into a new directory, the logs up to the
        checkpoint are copied from its run. summary.json goes: until the run closes, it reads as crashed.
        Each rank continues its own events; rank 0 (`is_main`) the rest.
        """
        mine = {events_name} | ({"metrics.jsonl"} if is_main else set())
        for name, size in self.log_offsets.items():
            if name not in mine:
                continue
            source, target = self.source_dir / name, run_dir / name
            if self.in_place and target.is_file() and target.stat().st_size > size:
                os.truncate(target, size)
            elif not self.in_place and source.is_file():
                with open(source, "rb") as src, open(target, "wb") as dst:
                    dst.write(src.read(size))
        if not is_main:
            return
        if self.in_place:
            for path in ckpt.list_checkpoints(run_dir):
                if ckpt.read_meta(path).get("step", math.inf) > self.step:
                    shutil.rmtree(path)
        (run_dir / "summary.json").unlink(missing_ok=True)


def resume_run(cfg: DistillConfig, run_dir: Path, source: Path, mode: str,
               restore: Callable[[dict], None]) -> Resumed:
    """--resume (the newest checkpoint that loads) or --resume-from PATH, checked against this run and put
    back by `restore` (which raises CheckpointError when it does not fit)."""
    if cfg.resume_from:
        path, fallbacks = Path(cfg.resume_from), []
        try:
            state = ckpt.load(path)
        except ckpt.CheckpointError as exc:
            raise BadInput(f"--resume-from: {exc}") from None
    else:
        path, state, fallbacks = ckpt.load_newest(run_dir)
        if state is None:
            raise BadInput(f"--resume: no checkpoint of {run_dir} loads ({fallbacks[0]})")
    meta, step = state["meta"], int(state["step"])
    differing = differing_options(meta.get("options") or {}, cfg.to_dict())
    if differing:
        raise BadInput(f"{cfg.resume_option}: {path} was trained with other options ({', '.join(differing[:4])}); "
                       "resume with the run's own options")
    if meta.get("mode", mode) != mode:
        raise BadInput(f"{cfg.resume_option}: {path} was trained in {meta['mode']}, this run would train in {mode}; "
                       f"give --precision {meta['mode']}")
    if step > cfg.train_steps or (step == cfg.train_steps and not _left_unclosed(meta, source)):
        raise BadInput(f"{cfg.resume_option}: {path} is at step {step} and --train-steps is {cfg.train_steps}; raise "
                       "--train-steps to train further")
    try:
        restore(state)
    except ckpt.CheckpointError as exc:
        raise BadInput(f"{cfg.resume_option}: {path}: {exc}") from None
    return Resumed(path, source, _in_place(source, run_dir), step, dict(state["log_offsets"]), fallbacks)


def _left_unclosed(meta: dict, source: Path) -> bool:
    """Whether a checkpoint of the last step is of a run that evaluated that step and died before it closed as
    completed (killed while saving its student): resumed, the run only closes — saves the student, writes its
    summary."""
    try:
        status = json.loads((source / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    return meta.get("eval_ppl") is not None and status != "completed"


def log_offsets(run_dir: Path, event_sizes: list[int]) -> dict[str, int]:
    """The logs' sizes when a checkpoint is taken (each rank's events), where a resume cuts them."""
    ranks = len(event_sizes)
    return {"metrics.jsonl": (run_dir / "metrics.jsonl").stat().st_size,
            **{events_file_name(r, ranks): size for r, size in enumerate(event_sizes)}}


class TrainingState:
    """What a checkpoint holds for a run to go on exactly where it was: the trainable weights (student, trained
    routers, a dual-mode projection), the optimizer, the loss scaler, the scheduler, the data position, the RNGs.

    The step and the non-finite policy's state travel beside it in the same checkpoint.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, projection: nn.Module,
                 optimizer: torch.optim.Optimizer, precision: Precision, scheduler, batches: BatchStream):
        self.student, self.teacher, self.projection = student, teacher, projection
        self.optimizer, self.precision, self.scheduler, self.batches = optimizer, precision, scheduler, batches

    def named_trainable(self) -> list[tuple[str, str, nn.Parameter]]:
        """(model, name, parameter) of every trained weight: the student's, trained routers', a projection's."""
        return ([("student", n, p) for n, p in self.student.named_parameters()]
                + [("teacher", n, p) for n, p in self.teacher.named_parameters() if p.requires_grad]
                + [("projection", n, p) for n, p in self.projection.named_parameters()])

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight a checkpoint must restore: the student, trained routers, a dual-mode projection (the live
        tensors: a sharded teacher's routers as DTensors)."""
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"{model}.{name}": p for model, name, p in self.named_trainable() if model != "student"})
        return state

    @property
    def sharded(self) -> bool:
        """Whether a trained weight is sharded over the ranks (a sharded teacher's routers): a checkpoint then
        gathers it, with every rank taking part."""
        return any(is_sharded(p) for _, _, p in self.named_trainable())

    def state_dict(self) -> dict:
        """The checkpoint's content, every tensor full: sharded routers and their optimizer state gathered (so
        every rank calls this), in the format an unsharded run writes."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {index: {k: full_tensor(v) for k, v in values.items()}
                              for index, values in optimizer["state"].items()}
        return {
            "model": {k: full_tensor(v) for k, v in self.weights().items()},
            "optimizer": optimizer,
            "precision": self.precision.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "data": self.batches.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Put a checkpoint back; CheckpointError when its weights do not fit this run."""
        current = self.weights()
        weights = state["model"]
        stored = {local_shard(current[k]).data_ptr() for k in current if k in weights}
        missing = [k for k in current  # tied: stored once
                   if k not in weights and local_shard(current[k]).data_ptr() not in stored]
        unknown = [k for k in weights if k not in current]
        if missing or unknown:
            raise ckpt.CheckpointError(f"its weights do not fit this run (missing {missing[:3]}, unknown "
                                       f"{unknown[:3]})")
        with torch.no_grad():
            for key, tensor in weights.items():
                if tensor.shape != current[key].shape:
                    raise ckpt.CheckpointError(f"its {key} has shape {tuple(tensor.shape)}, this run's "
                                               f"{tuple(current[key].shape)}")
                local_shard(current[key]).copy_(local_shard(shard_of(tensor, current[key])))
        self.optimizer.load_state_dict(self._sharded_like_params(state["optimizer"]))
        self.precision.load_state_dict(state["precision"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])

    def _sharded_like_params(self, optimizer: dict) -> dict:
        """A checkpoint's optimizer state (full tensors) with each sharded parameter's moments cut to this
        rank's shard, as DTensors like the parameter (its step count stays as saved)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {index: {k: shard_of(v, params[index]) if torch.is_tensor(v) and v.shape == params[index].shape
                         else v for k, v in values.items()}
                 for index, values in optimizer["state"].items()}
        return {**optimizer, "state": state}
