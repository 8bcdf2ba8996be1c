"""Which forwards are training forwards, what precision they ran in, and whether their inputs were finite.

A hook before each watched model's own forward (the root module, not its layers) decides whether this
forward belongs to a training step: a model this run trains (in mode `train()` or not: a teacher in eval
mode whose routers train counts) is in training mode, it is not generating (a forward handed a KV cache is
a generation step), and — for a model with weights the run updates — gradients are on. So a frozen
teacher's no-grad forward during a step counts; evaluation (the student in eval mode), generation (TRL's
on-policy samples), the student's no-grad forwards and forwards run inside a backward pass (gradient
checkpointing's recomputation) do not, and the per-module statistics skip them.

The same hook reads what the weights cannot tell: whether autocast was on, and in which dtype (a Trainer
or accelerate run under bf16 autocast holds fp32 weights), and whether a floating-point input holds NaN
(an `inputs_embeds` of bad data) — one device reduction per floating input, read with the step's readings.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Probe, eager, in_backward


def is_generating(kwargs: dict) -> bool:
    """A forward called by `generate`: transformers hands it the KV cache (or asks for one)."""
    return kwargs.get("past_key_values") is not None or kwargs.get("use_cache") is True


class ForwardProbe(Probe):
    name = "forwards"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._trainable = {name: ctx.trains(name) for name in ctx.models}
        self._nan_inputs: list[tuple[str, str, torch.Tensor]] = []  # (model, input name, any-NaN flag)
        self._reported = False
        self._handles = [model.register_forward_pre_hook(eager(self._before_forward(name)), with_kwargs=True)
                         for name, model in ctx.models.items()]

    def _training(self) -> bool:
        """A training step is under way: some model this run trains is in training mode."""
        return any(self.ctx.models[name].training for name, trainable in self._trainable.items() if trainable)

    def _before_forward(self, model_name: str):
        def hook(model: nn.Module, args: tuple, kwargs: dict):
            training = (self._training() and not is_generating(kwargs) and not in_backward()
                        and (torch.is_grad_enabled() or not self._trainable[model_name]))
            self.ctx.training_forward[model_name] = training
            if not training:
                return
            self.ctx.trained = True
            if self._trainable[model_name]:
                device = next(model.parameters()).device.type
                if torch.is_autocast_enabled(device):
                    self.ctx.autocast = torch.get_autocast_dtype(device)
            inputs = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
            for name, value in inputs:
                if torch.is_tensor(value) and value.is_floating_point() and value.numel():
                    self._nan_inputs.append((model_name, name, value.detach().isnan().any()))
        return hook

    def take_readings(self) -> dict[str, torch.Tensor]:
        if not self._nan_inputs:
            return {}
        flags = torch.stack([flag for _, _, flag in self._nan_inputs]).float()
        self._pending, self._nan_inputs = self._nan_inputs, []
        return {"nan_inputs": flags}

    def record(self, host: dict) -> dict:
        flags = host.get("nan_inputs")
        if flags is None:
            return {}
        bad = [(model, name) for (model, name, _), flag in zip(self._pending, flags, strict=True) if flag]
        if bad and not self._reported:
            self._reported = True
            model, name = bad[0]
            self.ctx.events.record("nonfinite_batch", "critical",
                                   f"{model}'s input {name} holds NaN at step {self.ctx.step}: bad data, not "
                                   "precision", step=self.ctx.step, phase="forward", probe=self.name, model=model,
                                   tensor=name)
        return {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
