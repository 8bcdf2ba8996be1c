"""Resumable checkpoints: complete, atomic (written as .tmp-* and renamed), loaded without unpickling.

Weights go to safetensors; everything else (optimizer, scaler, scheduler, RNG, data position, log
offsets) to a torch file read back with `weights_only=True`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "metrics.parquet", "events.jsonl", "events.parquet",
             "report.md", "traceback.txt", "router_update.pt")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
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


def save(run_dir: Path, step: int, state: dict, keep: int, eval_ppl: float | None) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then prune to the newest `keep` plus the best by eval ppl."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, seen = {}, set()
    for key, value in state["model"].items():  # tied weights (wte = lm_head) are stored once
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        weights[key] = value.detach().contiguous().cpu()
    save_file(weights, str(tmp / "model.safetensors"))
    rest = {k: v for k, v in state.items() if k != "model"}
    torch.save(rest, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "eval_ppl": eval_ppl}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    ppl = {}
    for p in found:
        try:
            value = json.loads((p / "meta.json").read_text()).get("eval_ppl")
        except (OSError, ValueError):
            value = None
        if value is not None and np.isfinite(value):
            ppl[p] = value
    keepers = set(found[-keep:])
    if ppl:
        keepers.add(min(ppl, key=ppl.get))
    for p in found:
        if p not in keepers:
            shutil.rmtree(p)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load(path: Path) -> dict:
    """A checkpoint's state; raises on a torn or corrupted one (the caller falls back to an older one)."""
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=True, map_location="cpu")
    state["model"] = load_file(str(Path(path) / "model.safetensors"))
    return state


def clear_run_files(run_dir: Path) -> None:
    """--overwrite: remove the previous run's files (only names this tool writes)."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, "student"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
