"""`sarkd-diag env`: what this machine runs well, so a user knows what `auto` will do before a run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from pathlib import Path
from types import SimpleNamespace

from rich.table import Table

from ..contract.errors import BadInput
from ..contract.modes import detect_capabilities, resolve_mode
from .terminal import Console

LIBRARIES = ("sarkd-diag", "torch", "transformers", "datasets", "pandas", "pyarrow", "rich", "typer", "matplotlib")


def nvidia_driver_present() -> bool:
    """Whether this machine could have a CUDA device at all: without NVIDIA's driver there is none, and
    `env` answers without importing torch (1.3 s of its 1.4 s here)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def environment_report(device: str = "auto") -> dict:
    from ..assets import EMBEDDED_MODELS

    if device == "cpu" or (device == "auto" and not nvidia_driver_present()):
        dev, cuda_available, threads = SimpleNamespace(type="cpu"), False, len(os.sched_getaffinity(0))
    else:
        import torch

        cuda_available = torch.cuda.is_available()
        dev = torch.device("cuda" if device == "auto" and cuda_available else ("cpu" if device == "auto" else device))
        threads = torch.get_num_threads()
    caps = detect_capabilities(dev)
    try:
        auto, reason = resolve_mode("auto", None, caps)
    except BadInput as exc:
        auto, reason = None, str(exc)
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "device": {"type": caps.device_type, "name": caps.name, "native_bf16": caps.native_bf16,
                   "fast_fp16": caps.fast_fp16, "threads": threads, "cuda_available": cuda_available},
        "modes": caps.runnable_modes,
        "auto": {"mode": auto, "reason": reason},
        "embedded_models": {f"embedded:{name}": text for name, text in EMBEDDED_MODELS.items()},
        "versions": versions,
        "python": platform.python_version(),
    }


def print_environment(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    d = report["device"]
    console.print(f"[bold]device[/]: {d['type']} {d['name']!r} — native bf16: {d['native_bf16']}, "
                  f"fast fp16: {d['fast_fp16']}, threads: {d['threads']}")
    console.print(f"[bold]modes it runs[/]: {', '.join(report['modes'])}")
    console.print(f"[bold]auto picks[/]: {report['auto']['mode']} — {report['auto']['reason']}")
    table = Table("embedded model", "what it is")
    for name, text in report["embedded_models"].items():
        table.add_row(name, text)
    console.print(table)
    console.print("[bold]versions[/]: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
                  + f", python {report['python']}")
