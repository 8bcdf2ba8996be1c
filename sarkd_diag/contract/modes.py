"""The precision modes by name: their aliases, what a device runs well, and which mode a request means.

No torch here, so `sarkd-diag env` and option checks answer without importing it; the modes themselves,
as strategy objects, are train/precision.py's.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import empty_value
from .errors import BadInput
from .wording import did_you_mean

MODE_NAMES = ("fp32", "mixed", "bf16-mixed", "pure-fp16", "pure-bf16")


@dataclass(frozen=True)
class Capabilities:
    """What the device does well: decides `auto` and which modes can run at all."""

    device_type: str
    name: str
    native_bf16: bool
    fast_fp16: bool

    @property
    def runnable_modes(self) -> list[str]:
        if self.device_type == "cuda" and not self.native_bf16:
            return ["fp32", "mixed", "pure-fp16"]
        return list(MODE_NAMES)


def detect_capabilities(device) -> Capabilities:
    """The capabilities of a torch.device (or anything with `.type`): torch is imported for CUDA only."""
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        return Capabilities("cuda", name, torch.cuda.is_bf16_supported(including_emulation=False), True)
    return Capabilities("cpu", _cpu_name(), _cpu_has_native_bf16(), False)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products run faster than fp32 (2.5-3x measured here)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text(errors="replace")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


HALF_COMPUTE = {"mixed": "float16", "pure-fp16": "float16", "bf16-mixed": "bfloat16", "pure-bf16": "bfloat16"}


def slow_half_precision(mode: str, caps: Capabilities) -> str | None:
    """Why `mode` trains slowly on this device, when it does: it computes in a 16-bit dtype the device has no fast
    arithmetic for (float16 on a CPU, emulated: its matrix products measured 40-140x slower than fp32 on this
    project's machine; bfloat16 on a CPU without AVX512-BF16 or AMX). Such a run still reproduces the mode's
    numerics; a user who asked for speed is told, once, before the steps say it."""
    dtype = HALF_COMPUTE.get(mode)
    fast = {"float16": caps.fast_fp16, "bfloat16": caps.native_bf16}.get(dtype, True)
    if fast:
        return None
    picked, _ = resolve_mode("auto", None, caps)
    how_slow = "emulated there, its steps run tens of times" if dtype == "float16" else "its steps run several times"
    return (f"{mode} computes in {dtype}, which {caps.device_type} {caps.name!r} has no fast arithmetic for: "
            f"{how_slow} slower than fp32 — right for reproducing the mode's numerics, slow for training "
            f"(`--precision auto` picks {picked} on this device; `sarkd-diag env` says why)")


ALIASES = {
    "32-true": "fp32", "float32": "fp32",
    "16-mixed": "mixed", "fp16-mixed": "mixed",
    "bf16": "bf16-mixed",
    "16-true": "pure-fp16",
    "bf16-true": "pure-bf16",
}
MODEL_DTYPE_FAMILY = {"float16": ("mixed", "pure-fp16"), "bfloat16": ("bf16-mixed", "pure-bf16"), "float32": ("fp32",)}


def canonical_mode(requested: str, option: str = "--precision") -> str:
    """A mode name or alias to its mode name; `auto` stays `auto`. Errors name `option`, what the user typed."""
    name = requested.strip().lower()
    if name == "auto" or name in MODE_NAMES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name in ("fp16", "float16", "half", "16"):  # Lightning's `precision=16` meant AMP, a script's `16` may not
        raise BadInput(f"{option} {requested} is ambiguous: say `mixed` (fp16 compute, fp32 master weights, "
                       "loss scaling — what you want) or `pure-fp16` (everything fp16: reproduces the failure)")
    raise BadInput(f"{option} {requested}: not a precision mode{did_you_mean(name, [*MODE_NAMES, *ALIASES])}; "
                   f"choose one of auto, {', '.join(MODE_NAMES)} "
                   f"(aliases: {', '.join(ALIASES)})")


def parse_modes(requested: Sequence[str] | str | None, option: str = "--modes") -> list[str]:
    """The modes of a `--modes` option (comma-separated or repeated), canonical, in the order given; [] when none
    is given. `auto` is refused: a list of modes names each one. A mode named twice (`fp32,fp32`, `fp32,float32`)
    is refused too: each mode runs once, so the repeat is almost surely a typo for a mode that would be missing."""
    if isinstance(requested, str):
        requested = [requested]
    if requested is not None and not (isinstance(requested, Sequence) and all(isinstance(i, str) for i in requested)):
        raise BadInput(f"{option} takes mode names (a string, comma-separated, or a list of them), got {requested!r}")
    names = [n.strip() for item in requested or [] for n in item.split(",") if n.strip()]
    if requested and not names:  # `--modes "$MODES"` with MODES unset: not a request for every mode
        raise BadInput(empty_value(option, ",".join(requested)))
    modes: list[str] = []
    for name in names:
        mode = canonical_mode(name, option)
        if mode == "auto":
            raise BadInput(f"{option} takes precision modes, not auto: " + ", ".join(MODE_NAMES))
        if mode in modes:
            first = names[modes.index(mode)]
            same = f"{mode} twice" if first == name == mode else f"{mode} twice ({first}, {name})"
            unnamed = [m for m in MODE_NAMES if m not in modes]
            raise BadInput(f"{option} {','.join(names)} names {same}: each mode runs once; drop the repeat, or "
                           f"name the mode you meant" + (f" (not yet named: {', '.join(unnamed)})" if unnamed else ""))
        modes.append(mode)
    return modes


def resolve_mode(requested: str, model_dtype: str | None, caps: Capabilities) -> tuple[str, str]:
    """The mode to run and why, from --precision, the original --model-dtype and the device."""
    mode = canonical_mode(requested)
    if mode == "auto" and model_dtype:
        mode = MODEL_DTYPE_FAMILY[model_dtype][0]
        reason = f"--model-dtype {model_dtype} means `{mode}` (the original scripts' final fix)"
    elif mode == "auto":
        if caps.device_type == "cuda" and not caps.native_bf16:
            mode, reason = "mixed", f"{caps.name} has no fast bf16: fp16 autocast with loss scaling"
        elif caps.native_bf16:
            mode, reason = "bf16-mixed", f"{caps.device_type} {caps.name!r} runs bf16 natively"
        else:
            mode, reason = "fp32", f"{caps.device_type} {caps.name!r} has no fast half precision"
    else:
        if model_dtype and mode not in MODEL_DTYPE_FAMILY[model_dtype]:
            raise BadInput(f"--model-dtype {model_dtype} conflicts with --precision {requested} "
                           f"(float16 goes with mixed/pure-fp16, bfloat16 with bf16-mixed/pure-bf16, "
                           f"float32 with fp32)")
        reason = f"requested --precision {requested}"
    if mode not in caps.runnable_modes:
        raise BadInput(f"precision {mode} cannot run on {caps.device_type} {caps.name!r}: it has no native bf16")
    return mode, reason
