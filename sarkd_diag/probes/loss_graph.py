"""What a caller's loss computes between the models' outputs and the loss, read off its autograd graph.

When a step's gradients turn non-finite from a finite loss and small forward values, the question is whether
backward overflowed or met an operation whose derivative is infinite or undefined at its input — sqrt of exactly 0
(an RMSE or a distance between equal tensors, as when a student starts from its teacher's weights: d√x/dx = inf,
times the 0 of the difference: NaN), pow(x, p < 1) at 0, a log or division at 0, acos/asin at ±1. On the first step
every gradient is non-finite, so no gradient magnitude was ever measured to rule an overflow out. The loss's graph
still says which operations the loss's own code ran: walked from the loss down to the outputs of the watched models'
training forwards (not into them: a model's own normalisation divides by a root that its eps keeps off 0), it names
those operations. It is read on this failure path only; the nodes stay readable after backward freed their tensors.

Which of them made it: where the backward kept its saved tensors (`retain_graph=True`), each operation's input is
read — at its singular point it may have, off it it cannot. Freed, as they mostly are by then, what is left is what
each operation makes at that point: sqrt(0) = 0 and acos(1) = 0 are finite, and a finite loss carries them with
nothing else amiss; log(0) = -inf and x/0 = inf are not, and reach a finite loss only where something discards them
(the other branch of a `torch.where`) — so the first kind is the likelier, and the normalising division after a
distance is not blamed for its sqrt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple


class Singular(NamedTuple):
    """An operation whose derivative is infinite or undefined at some point of its input."""

    written: str  # how a person writes it
    at_point: Callable  # its node → where its input sits at (or past) that point, elementwise, off its saved tensors
    finite_there: bool = False  # its value at that point is finite: a finite loss carries it with nothing else amiss


# the autograd nodes of such operations; PowBackward0 only with an exponent below 1 (x**0.5, x**-1 at 0)
SINGULAR = {
    "SqrtBackward0": Singular("sqrt", lambda n: (n._saved_result == 0) | n._saved_result.isnan(), finite_there=True),
    "RsqrtBackward0": Singular("rsqrt", lambda n: ~n._saved_result.isfinite()),
    "PowBackward0": Singular("pow", lambda n: (n._saved_self == 0) | ((n._saved_self < 0)
                                                                     & (n._saved_exponent % 1 != 0)),
                             finite_there=True),
    "LogBackward0": Singular("log", lambda n: n._saved_self <= 0),
    "Log2Backward0": Singular("log2", lambda n: n._saved_self <= 0),
    "Log10Backward0": Singular("log10", lambda n: n._saved_self <= 0),
    "Log1PBackward0": Singular("log1p", lambda n: n._saved_self <= -1),
    "ReciprocalBackward0": Singular("reciprocal", lambda n: ~n._saved_result.isfinite()),
    "DivBackward0": Singular("division", lambda n: n._saved_other == 0),
    "AcosBackward0": Singular("acos", lambda n: n._saved_self.abs() >= 1, finite_there=True),
    "AsinBackward0": Singular("asin", lambda n: n._saved_self.abs() >= 1, finite_there=True),
    "AtanhBackward0": Singular("atanh", lambda n: n._saved_self.abs() >= 1),
    "LgammaBackward0": Singular("lgamma", lambda n: (n._saved_self <= 0) & (n._saved_self == n._saved_self.round())),
    "DigammaBackward0": Singular("digamma", lambda n: (n._saved_self <= 0) & (n._saved_self == n._saved_self.round())),
}
MAX_NODES = 10_000  # a loss's own computation is a few dozen nodes; a walk that finds no stop ends here


def _singular(node) -> Singular | None:
    """The operation of an autograd node, when its derivative is infinite or undefined somewhere; a pow's value at 0
    is finite only for an exponent above 0 (0 ** 0.5 = 0, 0 ** -1 = inf)."""
    op = SINGULAR.get(node.name())
    if op is None or op.written != "pow":
        return op
    exponent = getattr(node, "_saved_exponent", 1)
    return op._replace(finite_there=exponent > 0) if exponent < 1 else None


def _rank(node, op: Singular) -> int | None:
    """How likely the node's operation made the gradients non-finite, 0 likeliest: its input read at its singular
    point (0); unread, its value there finite (1) or not (2). None: its input read off that point — it cannot have."""
    try:
        at_point = bool(op.at_point(node).any())
    except (RuntimeError, AttributeError):  # freed by the backward, or written in place since: nothing read
        return 1 if op.finite_there else 2
    return 0 if at_point else None


def singular_operations(roots: Iterable, stops: Iterable) -> list[str]:
    """The singular operations (`SINGULAR`) in the graph from the loss nodes `roots` down to, not into, the nodes
    `stops` (the models' outputs), likeliest first to have made the gradients non-finite (`_rank`), and among equals
    in the order met from the loss — the order backward meets them."""
    stop = {id(node) for node in stops}
    seen: dict[int, object] = {}  # visited nodes, held while walking so their ids stay theirs
    ranks: dict[str, int] = {}  # each operation's likeliest node, in the order first met
    queue = [node for node in roots if node is not None]
    while queue and len(seen) < MAX_NODES:
        node = queue.pop(0)
        if id(node) in seen or id(node) in stop:
            continue
        seen[id(node)] = node
        op = _singular(node)
        rank = None if op is None else _rank(node, op)
        if rank is not None and rank < ranks.get(op.written, rank + 1):
            ranks[op.written] = rank
        queue.extend(child for child, _ in node.next_functions if child is not None)
    return sorted(ranks, key=ranks.__getitem__)
