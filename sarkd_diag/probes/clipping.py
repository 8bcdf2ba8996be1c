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

`clip_grad_value_` (a plain loop's, Lightning's `gradient_clip_algorithm="value"`) clamps every gradient entry to
±clip_value: read after it, an Inf gradient is a finite ±clip_value and every magnitude the clip value — the overflow
is gone without a trace. It calls no helper of its own: its public function is torch's `_no_grad` wrapper around the
function that clips, which it looks up in its closure at call time, so the closure's cell is pointed at a wrapper
instead — every caller, a name imported before the probes existed included, reaches it. The listener is then told
no norm (None) and the value it clamps at.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import clip_grad

Listener = Callable[[list, torch.Tensor | None, float | None], None]
NAME = "_clip_grads_with_norm_"  # what clip_grad_norm_ calls, in torch.nn.utils.clip_grad
PUBLIC_NAMES = ("clip_grads_with_norm_",)  # its public alias in torch.nn.utils

_listeners: list[Listener] = []
_original: Callable | None = None
_replaced: list = []  # the modules whose name for the function now holds the wrapper
_value_cell = None  # the closure cell through which clip_grad_value_ calls the function that clamps
_clamps_original: Callable | None = None


def _clips_with_norm(parameters, max_norm, total_norm, foreach=None):
    """torch's clipping by a given total norm, after telling the listeners which parameters and which norm."""
    parameters = [parameters] if torch.is_tensor(parameters) else list(parameters)  # a generator is read twice
    _tell(parameters, total_norm, max_norm)
    return _original(parameters, max_norm, total_norm, foreach)


def _clips_by_value(parameters, *args, **kwargs):
    """torch's clamping of each gradient entry, after telling the listeners which parameters, no norm, and the value
    it clamps at."""
    parameters = [parameters] if torch.is_tensor(parameters) else list(parameters)
    clip_value = args[0] if args else kwargs.get("clip_value")
    _tell(parameters, None, float(clip_value) if isinstance(clip_value, (int, float)) else None)
    return _clamps_original(parameters, *args, **kwargs)


@torch.compiler.disable  # a compiled training step that clips runs the probes eagerly, as a graph break
def _tell(parameters: list, total_norm: torch.Tensor | None, threshold: float | None) -> None:
    for listener in list(_listeners):
        listener(parameters, total_norm, threshold)


def _clamping_cell():
    """The closure cell holding the function `clip_grad_value_` clamps with (its `__wrapped__`), or None where torch
    builds it otherwise."""
    public = getattr(clip_grad, "clip_grad_value_", None)
    inner = getattr(public, "__wrapped__", None)
    cells = [c for c in getattr(public, "__closure__", None) or () if inner is not None and c.cell_contents is inner]
    return cells[0] if len(cells) == 1 else None


def watch_gradient_clipping(listener: Listener) -> Callable[[], None]:
    """Call `listener(parameters, total_norm, max_norm)` before torch clips gradients by a total norm, and
    `listener(parameters, None, clip_value)` before it clamps them by value; returns the remover."""
    global _original, _value_cell, _clamps_original
    if not _listeners:
        _original = getattr(clip_grad, NAME, None)
        if callable(_original):
            _replaced[:] = [(clip_grad, NAME)] + [(torch.nn.utils, name) for name in PUBLIC_NAMES
                                                  if getattr(torch.nn.utils, name, None) is _original]
            for module, name in _replaced:
                setattr(module, name, _clips_with_norm)
        _value_cell = _clamping_cell()
        if _value_cell is not None:
            _clamps_original, _value_cell.cell_contents = _value_cell.cell_contents, _clips_by_value
        if not _replaced and _value_cell is None:
            return lambda: None
    _listeners.append(listener)

    def remove() -> None:
        global _value_cell
        if listener in _listeners:
            _listeners.remove(listener)
            if not _listeners:
                for module, name in _replaced:
                    if getattr(module, name) is _clips_with_norm:
                        setattr(module, name, _original)
                _replaced.clear()
                if _value_cell is not None and _value_cell.cell_contents is _clips_by_value:
                    _value_cell.cell_contents = _clamps_original
                _value_cell = None
    return remove
