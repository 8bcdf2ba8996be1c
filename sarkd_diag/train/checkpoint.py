"""Resumable checkpoints: complete, atomic (written as .tmp-* and renamed), loaded without unpickling.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/`: the trainable weights in safetensors, everything
else (optimizer, scaler, scheduler, RNG, data position, log offsets, policy state) in a torch file read
back with `weights_only=True`, so a checkpoint cannot run code, and `meta.json` — written last — with the
step, the validation perplexity at that step, the precision mode, the run's options and a SHA-256 of each
file, so a torn or corrupted checkpoint is recognised and an older one used instead. The loop never writes
one of step 0 or of non-finite weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..contract.rundir import STUDENT, remove_abandoned
from ..contract.shards import local_shard

CHECKPOINTS = "checkpoints"
WEIGHTS, STATE, META = "model.safetensors", "trainer_state.pt", "meta.json"
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "metrics.parquet", "events.jsonl", "events.parquet",
             "activations.jsonl", "report.md", "report.html",
             "fp16_headroom.png", "traceback.txt", "router_update.pt", "loss_curves.png", "loss_scale.png")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: incomplete, corrupted, or not a checkpoint at all."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple:
    """Every RNG's state as the libraries hand it out (cheap: taken at the start of each step)."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            random.getstate(), np.random.get_state())


def rng_state(captured: tuple | None = None) -> dict:
    """RNG states (torch, CUDA, python, numpy) as tensors and plain values that `weights_only` loads."""
    torch_state, cuda_state, py_state, np_state = captured or capture_rng()
    return {
        "torch": torch_state,
        "cuda": cuda_state,
        "python": list(py_state[1]) + [py_state[2]],
        "python_version": py_state[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ---------------------------------------------------------------------------------------------- save
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _unique_weights(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, tied ones (wte = lm_head) stored once under their first name."""
    weights, seen = {}, set()
    for key, value in model.items():
        alias = (value.data_ptr(), value.dtype, tuple(value.shape)) if value.numel() else None
        if alias is not None and alias in seen:
            continue
        seen.add(alias)
        weights[key] = value.detach().contiguous().cpu()
    return weights


def save(run_dir: Path, step: int, state: dict, keep: int, eval_ppl: float | None, meta: dict | None = None) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then prune to the newest `keep` plus the best by eval ppl.

    Everything is written into `.tmp-step-NNNNNNNN`, synced, and renamed into place: a crash at any point
    leaves the previous checkpoints as they were (and at most a .tmp-* directory, removed by the next save). A save
    that fails (a full disk) removes its partial files itself: the space they hold is what closing the run needs.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final, tmp = root / step_dir_name(step), root / f".tmp-{step_dir_name(step)}"
    tmp.mkdir()
    try:
        save_file(_unique_weights(state["model"]), str(tmp / WEIGHTS))
        torch.save({k: v for k, v in state.items() if k != "model"}, tmp / STATE)
        record = {"step": step, "eval_ppl": eval_ppl, **(meta or {}),
                  "sha256": {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}}
        (tmp / META).write_text(json.dumps(record, indent=1, default=str))
        for name in (WEIGHTS, STATE, META, ""):
            _fsync(tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step written again (after a rollback): swap, never a moment without one
        old = root / f".tmp-old-{step_dir_name(step)}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    _prune(root, keep)
    return final


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; {} when it is missing or unreadable (an incomplete checkpoint)."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _prune(root: Path, keep: int) -> None:
    found = list_checkpoints(root.parent)
    ppl = {}
    for p in found:
        value = read_meta(p).get("eval_ppl")
        if isinstance(value, (int, float)) and np.isfinite(value):
            ppl[p] = value
    keepers = set(found[-keep:])
    if ppl:
        keepers.add(min(ppl, key=ppl.get))
    for p in found:
        if p not in keepers:
            shutil.rmtree(p)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


# ---------------------------------------------------------------------------------------------- load
def load(path: Path) -> dict:
    """A checkpoint's state (and its meta under "meta"); CheckpointError on a torn or corrupted one.

    Nothing is unpickled: the weights are safetensors, the rest loads with `weights_only=True`.
    """
    path = Path(path)
    meta = read_meta(path)
    if not meta:
        raise CheckpointError(f"{path} has no readable {META} (not a checkpoint, or written incompletely)")
    for name, expected in (meta.get("sha256") or {}).items():
        if name not in (WEIGHTS, STATE):
            continue
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
        if _sha256(path / name) != expected:
            raise CheckpointError(f"{path / name} is corrupted (its SHA-256 differs from the one recorded)")
    try:
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")
        state["model"] = load_file(str(path / WEIGHTS))
    except Exception as exc:  # UnpicklingError (a pickle that is not plain data), OSError, safetensors errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded: {first}") from None
    state["meta"] = meta
    return state


def load_newest(run_dir: Path, before_step: int | None = None) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint that loads (optionally: of a step before `before_step`).

    Returns (path, state, problems): each newer checkpoint that failed to load leaves one line in
    `problems`, so the caller can record the fallback as an event.
    """
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        meta = read_meta(path)
        if before_step is not None and meta.get("step", -1) >= before_step:
            continue
        try:
            return path, load(path), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    return None, None, problems


class StepSnapshot:
    """--on-nonfinite skip: the trainable weights and optimizer state before a step, to put back after a bad one.

    It costs one more copy of the trainable weights and of the optimizer state, in their own dtypes —
    for AdamW 3 × (trainable parameters) × (bytes per weight) — allocated once and refilled on the device
    before every step: copies, no host sync.
    """

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self.weights: list[torch.Tensor] = []
        self.state: dict[torch.Tensor, dict] = {}

    def bytes_needed(self) -> int:
        """The copy's size once the optimizer holds its state (AdamW: two moments per weight, plus steps)."""
        return sum(3 * local_shard(p).numel() * p.element_size() + 4 for p in self.params)  # a rank's shard

    @torch.no_grad()
    def take(self) -> None:
        if not self.weights:
            self.weights = [torch.empty_like(p) for p in self.params]
        for saved, p in zip(self.weights, self.params, strict=True):
            saved.copy_(p)
        previous, self.state = self.state, {}
        for p in self.params:
            if p in self.optimizer.state:
                buffers = previous.get(p, {})
                self.state[p] = {k: _copy_into(buffers.get(k), v) for k, v in self.optimizer.state[p].items()}

    @torch.no_grad()
    def restore(self) -> None:
        for saved, p in zip(self.weights, self.params, strict=True):
            p.copy_(saved)
        for p in self.params:
            if p not in self.state:  # the step created this state (the first step): it goes again
                self.optimizer.state.pop(p, None)
                continue
            current = self.optimizer.state[p]
            for k, v in self.state[p].items():
                current[k] = _copy_into(current.get(k), v)


def _copy_into(buffer, value):
    """`value` copied into `buffer` when it fits (no new allocation), else a fresh copy; non-tensors as they are."""
    if not torch.is_tensor(value):
        return value
    if torch.is_tensor(buffer) and buffer.shape == value.shape and buffer.dtype == value.dtype \
            and buffer.device == value.device:
        return buffer.copy_(value)
    return value.detach().clone()


def clear_run_files(run_dir: Path) -> None:
    """--overwrite: remove the previous run's files (only names this tool writes), and what a process killed while
    writing them left (`remove_abandoned`)."""
    remove_abandoned(Path(run_dir))
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for pattern in ("events.rank*.jsonl", "traceback.rank*.txt"):  # a torchrun run's files of each rank
        for per_rank in Path(run_dir).glob(pattern):
            per_rank.unlink()
    for name in (CHECKPOINTS, STUDENT, "tensorboard"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
