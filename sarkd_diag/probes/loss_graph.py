"""What a caller's loss computes between the models' outputs and the loss, read off its autograd graph.

When a step's gradients turn non-finite from a finite loss and small forward values, the question is whether
backward overflowed or met an operation whose derivative is infinite or undefined at its input — sqrt of exactly 0
(an RMSE or a distance between equal tensors, as when a student starts from its teacher's weights: d√x/dx = inf,
times the 0 of the difference: NaN), pow(x, p < 1) at 0, a log or division at 0, acos/asin at ±1. On the first step
every gradient is non-finite, so no gradient magnitude was ever measured to rule an overflow out. The loss's graph
still says which operations the loss's own code ran: walked from the loss down to the outputs of the watched models'
training forwards (not into them: a model's own normalisation divides by a root that its eps keeps off 0), it names
those operations. It is read on this failure path only; the nodes stay readable after backward freed their tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

# autograd nodes whose function has a point where its derivative is infinite or undefined, and how a person
# writes the operation; PowBackward0 only with an exponent below 1 (x**0.5, x**-1 at 0)
SINGULAR = {
    "SqrtBackward0": "sqrt", "RsqrtBackward0": "rsqrt", "PowBackward0": "pow",
    "LogBackward0": "log", "Log2Backward0": "log2", "Log10Backward0": "log10", "Log1pBackward0": "log1p",
    "ReciprocalBackward0": "reciprocal", "DivBackward0": "division", "AcosBackward0": "acos",
    "AsinBackward0": "asin", "AtanhBackward0": "atanh", "LgammaBackward0": "lgamma", "DigammaBackward0": "digamma",
}
MAX_NODES = 10_000  # a loss's own computation is a few dozen nodes; a walk that finds no stop ends here


def _singular(node) -> str | None:
    """How the operation of an autograd node is written, when its derivative is infinite or undefined somewhere."""
    name = SINGULAR.get(node.name())
    if name == "pow" and not getattr(node, "_saved_exponent", 1) < 1:
        return None
    return name


def singular_operations(roots: Iterable, stops: Iterable) -> list[str]:
    """The singular operations (`SINGULAR`) in the graph from the loss nodes `roots` down to, not into, the nodes
    `stops` (the models' outputs), in the order met from the loss."""
    stop = {id(node) for node in stops}
    seen: dict[int, object] = {}  # visited nodes, held while walking so their ids stay theirs
    found: list[str] = []
    queue = [node for node in roots if node is not None]
    while queue and len(seen) < MAX_NODES:
        node = queue.pop(0)
        if id(node) in seen or id(node) in stop:
            continue
        seen[id(node)] = node
        name = _singular(node)
        if name is not None and name not in found:
            found.append(name)
        queue.extend(child for child, _ in node.next_functions if child is not None)
    return found
