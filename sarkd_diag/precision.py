"""The five precision modes, one small strategy object each (after Lightning Fabric's precision plugins).

The training loop calls the same five methods whatever the mode — convert, forward_context, backward,
unscale_gradients, optimizer_step — and never asks which mode it runs in. `resolve_mode` turns what the
user asked for (`auto`, an alias, the original scripts' `--model-dtype`) into a mode and a reason.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .errors import BadInput
from .loss_scaler import LossScaler


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
        return list(MODES)


def detect_capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
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


class Precision:
    """One way of holding weights, computing, scaling the loss and stepping the optimizer."""

    name: ClassVar[str]
    trainable_dtype: ClassVar[torch.dtype]
    frozen_dtype: ClassVar[torch.dtype]
    autocast_dtype: ClassVar[torch.dtype | None] = None
    loss_scaling: ClassVar[bool] = False

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_scaler = LossScaler(None)  # modes that scale the loss hold a GradScaler in it

    def convert(self, model: nn.Module) -> nn.Module:
        """Cast frozen weights to the frozen dtype and trainable ones (student, router) to the trainable dtype."""
        params = list(model.parameters())
        all_trainable = all(p.requires_grad for p in params)
        model.to(self.trainable_dtype if all_trainable else self.frozen_dtype)
        for p in params:
            if p.requires_grad:
                p.data = p.data.to(self.trainable_dtype)
        return model

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before clipping and probing."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Step; return a 0-dim device tensor, 1 where the step was skipped (a loss-scaler overflow)."""
        optimizer.step()
        return torch.zeros((), device=self.device)

    def loss_scale(self) -> torch.Tensor | None:
        """The current loss scale as a device tensor (None without scaling, or before the first backward)."""
        return None

    @property
    def master_dtype(self) -> torch.dtype:
        return self.trainable_dtype

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Modes without a loss scaler carry no state."""


class FP32(Precision):
    name = "fp32"
    trainable_dtype = frozen_dtype = torch.float32


class BF16Mixed(Precision):
    name = "bf16-mixed"
    trainable_dtype = torch.float32
    frozen_dtype = autocast_dtype = torch.bfloat16


class FP16Mixed(Precision):
    """fp32 master weights, fp16 compute and dynamic loss scaling: the fix the original scripts arrived at."""

    name = "mixed"
    trainable_dtype = torch.float32
    frozen_dtype = autocast_dtype = torch.float16
    loss_scaling = True

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.scaler = torch.amp.GradScaler(device.type)
        self.loss_scaler = LossScaler(self.scaler)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        found_inf = sum(self.loss_scaler.found_inf(optimizer))  # set by unscale_gradients
        self.scaler.step(optimizer)
        self.scaler.update()
        return (found_inf > 0).to(torch.float32)

    def loss_scale(self) -> torch.Tensor | None:
        return self.loss_scaler.scale()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)


class PureFP16(Precision):
    """Everything in fp16, optimizer state included: reproduces the original failure, never recommended."""

    name = "pure-fp16"
    trainable_dtype = frozen_dtype = torch.float16


class PureBF16(Precision):
    name = "pure-bf16"
    trainable_dtype = frozen_dtype = torch.bfloat16


MODES: dict[str, type[Precision]] = {m.name: m for m in (FP32, FP16Mixed, BF16Mixed, PureFP16, PureBF16)}
ALIASES = {
    "32-true": "fp32", "float32": "fp32",
    "16-mixed": "mixed", "fp16-mixed": "mixed",
    "bf16": "bf16-mixed",
    "16-true": "pure-fp16",
    "bf16-true": "pure-bf16",
}
MODEL_DTYPE_FAMILY = {"float16": ("mixed", "pure-fp16"), "bfloat16": ("bf16-mixed", "pure-bf16"), "float32": ("fp32",)}


def canonical_mode(requested: str) -> str:
    """A mode name or alias to its mode name; `auto` stays `auto`."""
    name = requested.strip().lower()
    if name == "auto" or name in MODES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name in ("fp16", "float16", "half"):
        raise BadInput(f"--precision {requested} is ambiguous: say `mixed` (fp16 compute, fp32 master weights, "
                       "loss scaling — what you want) or `pure-fp16` (everything fp16: reproduces the failure)")
    raise BadInput(f"unknown precision {requested!r}; choose one of auto, {', '.join(MODES)} "
                   f"(aliases: {', '.join(ALIASES)})")


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


def make_precision(mode: str, device: torch.device) -> Precision:
    return MODES[mode](device)
