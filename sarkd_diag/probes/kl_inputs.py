"""What a hand-written KD loss hands `torch.nn.functional.kl_div`.

`kl_div(input, target)` is Σ target · (log target − input): `input` must be log-probabilities (a log_softmax),
`target` probabilities (or log-probabilities, with `log_target=True`). Handed probabilities or logits as `input` — the
most common slip of a KD loss written by hand — it returns a number that is no divergence: negative, flat however the
student learns, a loss "stuck at a constant", and nothing non-finite ever shows it. Log-probabilities are ≤ 0, so an
input holding a value above 0 is not one.

The function is looked up on `torch.nn.functional` at call time (`F.kl_div`, and `nn.KLDivLoss`'s forward), so
replacing it there while probes are open reaches those callers — a name imported before (`from torch.nn.functional
import kl_div`) is not; the replacement calls the original with the same arguments and changes nothing. Installed
once for all open listeners, removed with the last.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Listener = Callable[[torch.Tensor], None]

_listeners: list[Listener] = []
_original: Callable | None = None


def _kl_div(input, target, *args, **kwargs):  # noqa: A002 - torch's own parameter name
    """torch's kl_div, after telling the listeners its input."""
    _tell(input)
    return _original(input, target, *args, **kwargs)


@torch.compiler.disable  # a compiled loss runs the listeners eagerly, as a graph break
def _tell(input: torch.Tensor) -> None:  # noqa: A002
    for listener in list(_listeners):
        listener(input)


def watch_kl_div(listener: Listener) -> Callable[[], None]:
    """Call `listener(input)` before `F.kl_div` computes; returns the remover."""
    global _original
    if not _listeners:
        _original, F.kl_div = F.kl_div, _kl_div
    _listeners.append(listener)

    def remove() -> None:
        if listener in _listeners:
            _listeners.remove(listener)
            if not _listeners and F.kl_div is _kl_div:
                F.kl_div = _original
    return remove
