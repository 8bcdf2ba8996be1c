"""The five precision modes, one small strategy object each (after Lightning Fabric's precision plugins).

The training loop calls the same five methods whatever the mode — convert, forward_context, backward,
unscale_gradients, optimizer_step — and never asks which mode it runs in. Which mode a request means on
which device (`resolve_mode`) is contract/modes.py's, which needs no torch.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from ..contract.loss_scaler import LossScaler, ShardAwareGradScaler


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

    def backward_factor(self) -> torch.Tensor | float:
        """What `backward(loss)` will multiply the loss's gradient by (the loss scale, or 1): a loss that computes
        its gradient in the forward pass (the fused loss) works on gradients that already carry it."""
        return self.loss_scaler.factor()

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
        self.scaler = ShardAwareGradScaler(device.type)
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
def make_precision(mode: str, device: torch.device) -> Precision:
    return MODES[mode](device)
