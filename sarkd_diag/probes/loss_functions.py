"""What a hand-written loss hands torch's loss functions: `F.kl_div` and `F.cross_entropy`.

`kl_div(input, target)` is Σ target · (log target − input): `input` must be log-probabilities (a log_softmax),
`target` probabilities (or log-probabilities, with `log_target=True`). Handed probabilities or logits as `input` — the
most common slip of a KD loss written by hand — it returns a number that is no divergence: negative, flat however the
student learns, a loss "stuck at a constant", and nothing non-finite ever shows it. Log-probabilities are ≤ 0, so an
input holding a value above 0 is not one — nor a target above 0 under `log_target=True`. At its default
`reduction="mean"` it averages over every element: the divergence per token divided by the vocabulary's size.

`cross_entropy(input, target)` averages over the targets that are not `ignore_index`: over a batch with none (a
prompt-only batch, every label -100) its mean is 0/0, NaN. A KD loop calls it itself — the model called without labels,
its logits wanted for the KD term — so the labels are no model's input, and only this call sees them.

Each function is looked up on `torch.nn.functional` at call time (`F.kl_div`, `F.cross_entropy`, and `nn.KLDivLoss`'s
and `nn.CrossEntropyLoss`'s forwards, transformers' loss functions), so replacing it there while probes are open
reaches those callers — a name imported before (`from torch.nn.functional import kl_div`) is not; the replacement tells
the listeners its arguments, calls the original with them and changes nothing. Installed once per function for all of
its open listeners, removed with the last. A compiled loss tells its `kl_div` eagerly, as a graph break; a compiled
`cross_entropy` tells nothing — it is the one inside a compiled model's forward given labels (transformers'), whose
labels the probes read from the model's inputs, and a graph break in each such forward (an error under
`fullgraph=True`) would be the probes changing what runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Listener = Callable[..., None]  # called with the function's own arguments

_listeners: dict[str, list[Listener]] = {}
_originals: dict[str, Callable] = {}
_replacements: dict[str, Callable] = {}
UNTOLD_WHEN_COMPILED = {"cross_entropy"}


@torch.compiler.disable  # a compiled loss runs the listeners eagerly, as a graph break
def _tell(name: str, args: tuple, kwargs: dict) -> None:
    for listener in list(_listeners[name]):
        listener(*args, **kwargs)


def _replacement(name: str) -> Callable:
    """torch's function `name`, after telling its listeners its arguments."""
    def call(*args, **kwargs):
        if name not in UNTOLD_WHEN_COMPILED or not torch.compiler.is_compiling():
            _tell(name, args, kwargs)
        return _originals[name](*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    return call


def watch(name: str, listener: Listener) -> Callable[[], None]:
    """Call `listener` with the arguments of each call of `torch.nn.functional.<name>` before it computes; returns the
    remover."""
    if not _listeners.get(name):
        _originals[name], _replacements[name] = getattr(F, name), _replacement(name)
        setattr(F, name, _replacements[name])
    _listeners.setdefault(name, []).append(listener)

    def remove() -> None:
        if listener in _listeners[name]:
            _listeners[name].remove(listener)
            if not _listeners[name] and getattr(F, name) is _replacements[name]:
                setattr(F, name, _originals[name])
    return remove
