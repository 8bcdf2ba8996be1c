"""The moment between a total gradient norm and the clipping by it, whoever clips.

A loop that clips (`torch.nn.utils.clip_grad_norm_`, the most common line of a training loop) multiplies every
gradient by max_norm / total_norm before the optimizer's pre-step hook, where the probes otherwise read them. A
non-finite gradient in one tensor makes the total norm NaN or Inf, and the clipping then makes every tensor's
gradient NaN (or zero): read after it, the first non-finite gradient in backward order is the output end, never
the module where the NaN began, and the finite magnitudes are the clipped ones.

torch's `clip_grad_norm_` computes the norm and then calls `clip_grad._clip_grads_with_norm_` (also public as
`torch.nn.utils.clip_grads_with_norm_`, which accelerate calls), looked up at call time. Wrapping that one function
while probes are open reaches every caller — a name imported before the probes existed included — with the
parameters being clipped, the norm they are clipped by and the threshold; the wrapper calls the original with the
same arguments
and changes nothing. Installed once for all open listeners, removed with the last. Where a later torch renames the
function, nothing is installed and the gradients are read at the optimizer's pre-step hook as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import clip_grad

Listener = Callable[[list, torch.Tensor, float], None]
NAME = "_clip_grads_with_norm_"  # what clip_grad_norm_ calls, in torch.nn.utils.clip_grad
PUBLIC_NAMES = ("clip_grads_with_norm_",)  # its public alias in torch.nn.utils

_listeners: list[Listener] = []
_original: Callable | None = None
_replaced: list = []  # the modules whose name for the function now holds the wrapper


def _clips_with_norm(parameters, max_norm, total_norm, foreach=None):
    """torch's clipping by a given total norm, after telling the listeners which parameters and which norm."""
    parameters = [parameters] if torch.is_tensor(parameters) else list(parameters)  # a generator is read twice
    _tell(parameters, total_norm, max_norm)
    return _original(parameters, max_norm, total_norm, foreach)


@torch.compiler.disable  # a compiled training step that clips runs the probes eagerly, as a graph break
def _tell(parameters: list, total_norm: torch.Tensor, max_norm: float) -> None:
    for listener in list(_listeners):
        listener(parameters, total_norm, max_norm)


def watch_gradient_clipping(listener: Listener) -> Callable[[], None]:
    """Call `listener(parameters, total_norm, max_norm)` before torch clips gradients by a total norm; returns the
    remover."""
    global _original
    if not _listeners:
        _original = getattr(clip_grad, NAME, None)
        if not callable(_original):
            return lambda: None
        _replaced[:] = [(clip_grad, NAME)] + [(torch.nn.utils, name) for name in PUBLIC_NAMES
                                              if getattr(torch.nn.utils, name, None) is _original]
        for module, name in _replaced:
            setattr(module, name, _clips_with_norm)
    _listeners.append(listener)

    def remove() -> None:
        if listener in _listeners:
            _listeners.remove(listener)
            if not _listeners:
                for module, name in _replaced:
                    if getattr(module, name) is _clips_with_norm:
                        setattr(module, name, _original)
                _replaced.clear()
    return remove
