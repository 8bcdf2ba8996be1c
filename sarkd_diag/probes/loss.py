"""The loss of each micro-batch as the caller names it, and batches with no target token.

sarkd-diag's loop hands over its terms (kd, ce, router); a user's loop its loss ("loss") — either given to
`Probes.step(loss=...)` or read from the model's outputs. A non-finite value is an event with the term's
name. The target count comes with the loss (an int the loop knows, or a device count from the labels the
model was called with): a micro-batch without target tokens has a per-token loss of 0/0, bad data rather
than bad numerics — unless its loss is a share of the step's (divided by the step's target count, the Trainer's
`num_items_in_batch`) and another micro-batch of the step has targets: then it adds 0, harmlessly. The first empty
micro-batch is recorded, and the first one on a step whose loss turned non-finite, if that is a later one: that
one explains the NaN, whatever came before it. The gradient backward brings each loss a model returns is its weight
in the step's gradient: several of one model's forwards each at full weight, on different batches, are micro-batches
summed, not averaged. A weight is summed per batch (the input tensor a forward was handed, as it held then: a
buffer refilled in place holds a new batch): one forward's loss
backpropagated twice (`backward(retain_graph=True)`, then again through a total that holds it), or two forwards of the
same batch (two objectives, R-Drop's two dropout passes), are that batch's objectives, not a second micro-batch.
But one forward's loss that two backwards adding to `.grad` each brought at full weight (`loss.backward(retain_graph=
True)` twice, or again through a total that holds it) is applied twice: its gradient is doubled (a
`loss_backpropagated_twice` note). A backward that adds nothing to `.grad` (`torch.autograd.grad`, `backward(inputs=
...)` over other tensors) does not count.
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from dataclasses import dataclass

import torch

from ..contract.numerics import NEGATIVE_TERM_SLACK, NONNEGATIVE_TERMS
from .base import Probe, dtype_name, eager, graph_task_id, version_of

LOG_PROBABILITY_SLACK = 1e-3  # a log-probability is ≤ 0; log(p + eps) may round a hair above it
# A KD target whose largest probability is within ONE_HOT_SLACK of 1 in KD_ONE_HOT_SHARE of its distributions or more is
# one-hot: a trained teacher at T ≥ 1 leaves more than 1e-6 to the rest of the vocabulary on most tokens (a top logit
# 14 above every other is rare), while at T = 1e-3 a logit gap of 0.02 does it.
ONE_HOT_SLACK = 1e-6
# Targets where the attention mask is 0 (beyond one a row: an EOS kept on purpose) from this share of a step's targets
# up: padding kept as labels is a tenth of what the loss trains on, and more — the model learns to predict padding.
PADDED_TARGETS_WARNING = 0.1
KD_ONE_HOT_SHARE = 0.9
IGNORE_INDEX = -100  # labels that are no target (transformers' and torch's cross-entropy convention)
_CROSS_ENTROPY = inspect.signature(torch.nn.functional.cross_entropy)  # how a call's arguments are read
_KL_DIV = inspect.signature(torch.nn.functional.kl_div)


def count_targets(labels: torch.Tensor, shifted: bool = True) -> torch.Tensor:
    """Target tokens in a model's labels (a device count). A causal LM shifts them (`shifted`), so the first
    position of each row is never a target."""
    if shifted and labels.dim() >= 2:
        labels = labels[..., 1:]
    return (labels != IGNORE_INDEX).sum()


# transformers' `loss_type`s whose labels are each a target where they stand (a classifier's, a masked LM's)
UNSHIFTED_LOSSES = ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")


def is_encoder_decoder(model) -> bool:
    """T5, BART: the labels are the decoder's, the attention mask the encoder's input's."""
    return bool(getattr(getattr(getattr(model, "module", model), "config", None), "is_encoder_decoder", False))


def shifts_labels(model) -> bool:
    """Whether `model` shifts its labels: a causal LM predicts position t+1 at t, so it drops each row's first label;
    an encoder-decoder (T5, BART: `config.is_encoder_decoder`) shifts its labels right into the decoder's inputs and
    scores every one of them — counted as a causal LM's, one-token targets would read as no target at all. Nor does
    a classifier or a masked LM (its `loss_type`): a binary multi-label head's [batch, 1] labels are one target each."""
    model = getattr(model, "module", model)  # DDP keeps the model as `module`
    return not is_encoder_decoder(model) and getattr(model, "loss_type", None) not in UNSHIFTED_LOSSES


def output_loss(output, labelled: bool) -> torch.Tensor | None:
    """The loss in a model's outputs: a ModelOutput's or dict's `loss`, or — called with `return_dict=False`,
    a tuple — its first element when the model was given labels (transformers puts the loss first then)."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple):
        first = output[0] if output and labelled else None
        return first if torch.is_tensor(first) and first.dim() == 0 and first.is_floating_point() else None
    return getattr(output, "loss", None)


def caller_loss(loss) -> torch.Tensor:
    """The loss a caller hands over, as a 0-dim tensor: a tensor (one value), a number (`loss.item()`, as loops
    log it), or the model's outputs (a ModelOutput, dict or `return_dict=False` tuple, read as `output_loss` reads
    them). A loss of several values is not the step's loss: averaging it here would hide what the loop optimises."""
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    value = loss if torch.is_tensor(loss) else output_loss(loss, labelled=True)
    if not torch.is_tensor(value):
        raise TypeError(f"loss must be a tensor, a number or the model's outputs holding one, not "
                        f"{type(loss).__name__}")
    if value.numel() != 1:
        raise TypeError(f"loss has {value.numel()} values (shape {tuple(value.shape)}): pass the reduced loss the "
                        "loop optimises (e.g. loss.mean()), not a loss per sample or per token")
    return value if value.dim() == 0 else value.reshape(())


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """A one-value reading as a 0-dim tensor, detached where autograd tracks it (`to_host` converts it with the step's
    other readings)."""
    value = value.detach() if value.requires_grad else value
    return value if value.dim() == 0 else value.reshape(())


def _judged_for_sign(dtype: torch.dtype) -> bool:
    """Whether a term computed in `dtype` below −NEGATIVE_TERM_SLACK is below 0 beyond its rounding: in float32 a KL's
    log-probabilities round by ~1e-7 a token; in 16 bits by ~1e-3 (bfloat16: ~1e-2), so a KL of near-equal
    distributions summed over a batch's tokens lands that far below 0 (−0.01 over 24 tokens, where it is +1e-5)."""
    return torch.finfo(dtype).eps <= torch.finfo(torch.float32).eps


# a loss backpropagated as is gets a gradient of exactly 1 (to the scale's rounding under a loss scaler)
SUMMED_WEIGHT_TOLERANCE = 1e-3


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # within a backward: will it run this node


@dataclass
class Weight:
    """One backward through a forward's loss: the gradient it brought (unscaled) is the loss's weight in the step's
    gradient."""

    model: str
    batch: int  # the input the forward was handed (its number this step)
    forward: int  # the forward (its number this step)
    task: int  # the backward (autograd's graph task)
    accumulates: bool  # it adds to the model's `.grad`
    weight: torch.Tensor


class LossProbe(Probe):
    name = "loss"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._terms: list[torch.Tensor] = []
        self._names: list[tuple[tuple[str, torch.dtype], ...]] = []  # (name, dtype) of each micro-batch's terms
        self._targets: list[tuple[torch.Tensor, bool]] = []  # (device count, share) per micro-batch that had labels
        self._reported: set[str] = set()
        self._shares: list[bool] = []  # per micro-batch with terms: is its loss a share of the step's (see observe)
        self._target_shares: list[bool] = []  # the same, per target count handed over
        self._micro = 0
        # (loss, targets, share) of each training forward's outputs
        self._captured: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []
        # each backward through a forward's loss: the loss's weight in the step's gradient (`Weight`)
        self._weights: list[Weight] = []
        self._weighed: list[Weight] = []  # the weights handed to the readings, in order
        self._forwards = 0  # the step's training forwards whose loss was read: each one's number
        self._accumulators: dict[str, list] = {}  # model -> its trainable tensors' gradient accumulators (autograd)
        self._batches: list = []  # (input, its version) per distinct batch, held for the step so no id is reused
        self._batch = 0  # the batch of the forward under way: its number in `_batches`
        self._labels: torch.Tensor | None = None  # target count of the forward under way
        self._padded: list[torch.Tensor] = []  # per labelled forward of a statistics step: [padded targets, targets]
        self._labelled = self._share = False  # the forward under way: called with labels; with num_items_in_batch
        self._handles: list = []
        self._model = next((w.model for w in ctx.watched), None)  # the loss trains this model (the student)
        self._kl_read: int | None = None  # the step whose F.kl_div input was read
        # (target, its version, ignore_index) of each F.cross_entropy mean the step's training computed
        self._cross_entropy_targets: list = []
        self._returned = None  # the loss tensor the step's last training forward returned (a weak reference)

    def watch_model_outputs(self) -> None:
        """A user's loop: take the loss (and the labels' target count) of each training forward of the
        trainable models from their outputs, so no one needs to hand them over."""
        for name, model in self.ctx.whole_forward_hooks():
            if self.ctx.trains(name):
                self._handles += [model.register_forward_pre_hook(eager(self._read_labels(name)), with_kwargs=True),
                                  model.register_forward_hook(eager(self._read_loss(name)))]

    def _read_labels(self, model_name: str):
        shifts = None  # whether the model shifts its labels, read once: its class and config say, not the batch

        def hook(_caller, args, kwargs):
            nonlocal shifts
            labels = kwargs.get("labels")
            training = self.ctx.training_forward.get(model_name, False)
            self._labelled = training and torch.is_tensor(labels)
            if self._labelled and shifts is None:
                shifts = shifts_labels(self.ctx.models[model_name])
            self._labels = count_targets(labels, shifts) if self._labelled else None
            if self._labelled and self.ctx.stats_step and "padded_targets" not in self._reported \
                    and not is_encoder_decoder(self.ctx.models[model_name]):  # its mask is the encoder's input's
                self._read_padded_targets(labels, kwargs.get("attention_mask"), shifts)
            self._share = kwargs.get("num_items_in_batch") is not None
            self._batch = self._batch_of(kwargs.get("input_ids", next(filter(torch.is_tensor, args), None)))
        return hook

    def _read_padded_targets(self, labels: torch.Tensor, mask, shifted: bool) -> None:
        """Targets where the attention mask is 0: padding the model was told not to read, kept as labels (labels
        copied from `input_ids` with the pads left in, not set to -100) — the loss then trains the model to predict
        padding. One per row is left out: a collator that pads with EOS may keep the first as a target on purpose
        (to learn to stop). [excess padded targets, targets] on the device, read with the step's readings."""
        if not (torch.is_tensor(mask) and mask.shape == labels.shape and labels.dim() >= 2):
            return
        if shifted:
            labels, mask = labels[..., 1:], mask[..., 1:]
        padded = ((labels != IGNORE_INDEX) & (mask == 0)).sum(-1)
        self._padded.append(torch.stack([(padded - 1).clamp(min=0).sum(), (labels != IGNORE_INDEX).sum()]))

    def _batch_of(self, data: torch.Tensor | None) -> int:
        """The number of the batch a forward was handed this step: the same tensor again, unwritten since, is the same
        batch; one buffer a loop refills in place for each micro-batch (`buf.copy_(batch)`: its version counter moves)
        holds a new one each time (a forward without an input tensor is a batch of its own)."""
        version = version_of(data)
        for number, (seen, seen_version) in enumerate(self._batches):
            if data is not None and seen is data and seen_version == version:
                return number
        self._batches.append((data if data is not None else object(), version))
        return len(self._batches) - 1

    def _read_loss(self, model_name: str):
        def hook(_model, _args, output):
            loss = output_loss(output, self._labelled)
            if self.ctx.training_forward.get(model_name, False) and torch.is_tensor(loss) and not self.ctx.reevaluating:
                self._captured.append((loss.detach(), self._labels, self._share))
                self._returned = weakref.ref(loss)
                if loss.requires_grad and not self._share:  # a share is divided by the step's count already
                    self._forwards += 1
                    loss.register_hook(self._weigh(model_name, self._batch, self._forwards))
        return hook

    def _weigh(self, model_name: str, batch: int, forward: int):
        """Note the weight backward gives a loss the model returned (1 where it is backpropagated as is), reading the
        gradient without changing it; under a loss scaler, divided by the scale it was multiplied by — and whether
        this backward adds to the model's `.grad`."""
        def hook(grad: torch.Tensor) -> None:
            self._weights.append(Weight(model_name, batch, forward, graph_task_id(), self._accumulates(model_name),
                                        grad.detach().reshape(()).float() / self.ctx.loss_scaler.factor()))
        return hook

    def _accumulates(self, model_name: str) -> bool:
        """Whether the backward under way adds to `.grad` of the model's trainable tensors: `backward()` does,
        `torch.autograd.grad` (the engine refuses to say for a leaf there) and `backward(inputs=...)` over other tensors
        do not. Not known (a torch without the engine's answer): False — nothing is claimed."""
        if _will_execute is None:
            return False
        try:
            if model_name not in self._accumulators:  # each weight's node that adds to its `.grad`, taken once: held,
                self._accumulators[model_name] = [  # it stays the one backward runs (the weight holds it weakly)
                    torch.autograd.graph.get_gradient_edge(w.param).node
                    for w in self.ctx.watched if w.model == model_name]
            return any(_will_execute(node) for node in self._accumulators[model_name])
        except (RuntimeError, AttributeError, TypeError):
            return False

    def returned_last(self, loss: torch.Tensor) -> bool:
        """Whether `loss` is the very tensor the step's last training forward returned as its loss: a loop that hands
        over the model's own loss (`model(**batch).loss`), so each of the step's forwards' losses is what it would have
        handed for that forward."""
        return self._returned is not None and self._returned() is loss

    def outputs_nonfinite(self) -> bool:
        """Whether a loss the trained models returned in this step's training forwards so far is NaN/Inf (one host
        read): what a caller's code that raised before handing its loss over had computed from."""
        return any(not bool(torch.isfinite(loss).all()) for loss, *_ in self._captured)

    def read_kl_div(self, input: torch.Tensor, target, *args, **kwargs) -> None:  # noqa: A002 - kl_div's own name
        """What `F.kl_div` is handed in a statistics step's training (`loss_functions.py`): log-probabilities are ≤ 0,
        so an input holding a value above 0 is none — nor a target with `log_target=True` (the teacher's softmax handed
        as its log: Σ e^q·(q − log p), large and flat however the student learns). One host read a statistics step —
        the loop's misuse is the same at every step — until found."""
        if not (self.ctx.stats_step and torch.is_grad_enabled()) or not input.is_floating_point() or not input.numel():
            return
        call = _KL_DIV.bind(input, target, *args, **kwargs).arguments
        self._read_kl_reduction(input, call)  # the arguments of every call: no device work
        if self._kl_read == self.ctx.step:
            return
        self._kl_read = self.ctx.step
        handed = {"input": input}
        if call.get("log_target") and torch.is_tensor(target) and target.is_floating_point() and target.numel():
            handed["target"] = target
        handed = {what: tensor for what, tensor in handed.items() if f"kl_{what}" not in self._reported}
        one_hot = self._one_hot_rows(target, call)
        if not handed and one_hot is None:
            return
        read = [tensor.detach().amax().float() for tensor in handed.values()]
        values = torch.stack([*read, *([one_hot] if one_hot is not None else [])]).tolist()  # one read
        largest = values[:len(read)]
        if one_hot is not None and values[-1] >= KD_ONE_HOT_SHARE:
            self._report_one_hot(target, values[-1])
        for (what, tensor), value in zip(handed.items(), largest, strict=True):
            if value > LOG_PROBABILITY_SLACK:
                self._reported.add(f"kl_{what}")
                given = "probabilities or logits" if what == "input" else "probabilities (with log_target=True)"
                self.ctx.events.record(
                    "setup_note", "warning", f"F.kl_div's {what} holds values up to {value:.3g} at step "
                    f"{self.ctx.step}: it takes log-probabilities (≤ 0), and given {given} it returns no divergence",
                    step=self.ctx.step, probe=self.name, phase="loss", model=self._model, value=value,
                    dtype=dtype_name(tensor.dtype), code=f"kl_{what}_not_log_probs")

    def _one_hot_rows(self, target, call: dict) -> torch.Tensor | None:
        """The share of the KD target's distributions (rows over the last dimension) whose largest probability is
        within ONE_HOT_SLACK of 1, on the device; None once reported, or where the target is no distribution. A
        teacher's softmax at a temperature far below 1 is one-hot wherever its top logits differ by more than ~T × 14:
        the KD term then carries its argmax alone, and its gradient T× its size at T = 1. The row maxima come first,
        in the target's own dtype: no float copy of a (tokens × vocabulary) tensor."""
        if "kl_one_hot" in self._reported or not (torch.is_tensor(target) and target.is_floating_point()) \
                or target.dim() < 1 or target.shape[-1] < 2 or not target.numel():
            return None
        top = target.detach().amax(-1).float()
        top = top.exp() if call.get("log_target") else top
        return (top > 1 - ONE_HOT_SLACK).float().mean()

    def _report_one_hot(self, target: torch.Tensor, share: float) -> None:
        self._reported.add("kl_one_hot")
        self.ctx.events.record(
            "setup_note", "warning", f"F.kl_div's target is one-hot (its largest probability within {ONE_HOT_SLACK:g} "
            f"of 1) in {share:.0%} of its {target.shape[-1]}-way distributions at step {self.ctx.step}: the teacher's "
            "softmax carries its argmax alone", step=self.ctx.step, probe=self.name, phase="loss", model=self._model,
            value=share, dtype=dtype_name(target.dtype), code="kl_target_one_hot")

    def _read_kl_reduction(self, input: torch.Tensor, call: dict) -> None:  # noqa: A002 - kl_div's own name
        """`F.kl_div` averaged over every element (`reduction="mean"`, its default): the divergence per distribution
        divided by the distribution's size, the vocabulary's — torch's own warning, printed once and easily missed.
        Beside a cross-entropy the KD term then carries 1/|V| of its weight: the student learns from the CE alone."""
        support = input.shape[-1] if input.dim() else 1
        if call.get("reduction", "mean") != "mean" or call.get("size_average") is not None \
                or call.get("reduce") is not None or support < 2 or "kl_reduction" in self._reported:
            return
        self._reported.add("kl_reduction")
        self.ctx.events.record(
            "setup_note", "warning", f"F.kl_div averages over every element at step {self.ctx.step} "
            f"(reduction='mean'): its value is the divergence per distribution divided by their size, {support}",
            step=self.ctx.step, probe=self.name, phase="loss", model=self._model, value=float(support),
            code="kl_div_mean_over_support")

    def read_cross_entropy(self, input: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> None:  # noqa: A002
        """`F.cross_entropy` averaging over a training forward's targets (`loss_functions.py`): the labels it was given,
        held for the step — counted only if the step's loss turns non-finite (`_record_empty`), where a call without a
        target was 0/0. No device work on a step that stays finite."""
        call = _CROSS_ENTROPY.bind_partial(input, target, *args, **kwargs).arguments
        if (call.get("reduction", "mean") == "mean" and call.get("size_average") is None and call.get("reduce") is None
                and torch.is_grad_enabled() and input.requires_grad and not target.is_floating_point()):
            self._cross_entropy_targets.append((target, version_of(target), call.get("ignore_index", IGNORE_INDEX)))

    def observe_caller_loss(self, loss: torch.Tensor, labels: torch.Tensor | None = None,
                            terms: dict[str, torch.Tensor] | None = None) -> None:
        """The loss the caller optimises, given explicitly (as `caller_loss` read it), and the terms the caller names
        in it (`kd`, `ce`, ...), each checked as sarkd-diag's own loop's terms are: it replaces the losses read
        from the outputs; its target count comes from `labels`, else from the labels the model was called with this
        step — the fewest of any forward, since one micro-batch without targets makes an accumulated loss 0/0 —
        or, where every forward's loss was a share of the step's (`num_items_in_batch`), their sum: each was divided by
        that, 0 only where the whole step has no target."""
        captured = [(targets, share) for _, targets, share in self._captured if targets is not None]
        self._captured = []
        if labels is not None:
            targets = count_targets(labels, shifts_labels(self.ctx.models.get(self._model)))
        elif len(captured) == 1:  # one forward: its count (a stack and a reduction of one value cost two ops)
            targets = captured[0][0]
        elif captured:
            counts = torch.stack([count for count, _ in captured])
            targets = counts.sum() if all(share for _, share in captured) else counts.min()
        else:
            targets = None
        if loss.grad_fn is not None:  # the root of its graph, as `ProbeSet.observe_loss_graph` keeps a framework's
            self.ctx.loss_roots.append(loss.grad_fn)
        self.observe({**(terms or {}), "loss": loss}, targets)  # a term first: a NaN it made is named by it

    def begin_step(self) -> None:
        self._micro = 0
        self._batches = []
        self._forwards = 0
        self._returned = None

    def observe(self, terms: dict[str, torch.Tensor | None], targets: int | torch.Tensor | None = None,
                share: bool = False) -> None:
        """One micro-batch's loss terms (device tensors; None for a term it does not have) and its target
        count: a host int (checked now) or a device count (checked with the step's readings). `share`: the
        loss is already this micro-batch's share of the step's — a model called with `num_items_in_batch` (the
        Trainer's gradient accumulation) divides its summed loss by the whole step's target count — so the
        step's loss is the shares' sum, where other micro-batches' losses are averaged."""
        self._micro += 1
        if isinstance(targets, int):
            if targets == 0:
                self._empty(self._micro)
        elif targets is not None:
            self._targets.append((_scalar(targets), share))
        names = tuple((name, t.dtype) for name, t in terms.items() if t is not None)
        if names:
            values = [_scalar(terms[name]) for name, _ in names]
            device = next((v.device for v in values if v.device.type != "cpu"), values[0].device)
            self._terms.extend(v.to(device) for v in values)  # stacked once, at take_readings
            self._names.append(names)
            self._shares.append(share)

    def _check_padded(self, counts: list[float] | None) -> None:
        """A `targets_on_padding` note, once, where PADDED_TARGETS_WARNING of a statistics step's targets or more sit
        where the attention mask is 0 (beyond one a row)."""
        if not counts or not counts[1] or counts[0] / counts[1] < PADDED_TARGETS_WARNING:
            return
        self._reported.add("padded_targets")
        share = counts[0] / counts[1]
        self.ctx.events.record(
            "setup_note", "warning", f"{share:.0%} of step {self.ctx.step}'s {int(counts[1])} target tokens sit where "
            "the attention mask is 0: padding kept as labels, so the loss trains the model to predict padding",
            step=self.ctx.step, probe=self.name, phase="loss", model=self._model, value=share,
            numel=int(counts[1]), code="targets_on_padding")

    def _record_empty(self, counts: list[float], nonfinite: bool) -> None:
        """The micro-batches of this step without targets whose loss is 0/0: all of them, except a share of a step
        that has targets elsewhere (0 over the step's count)."""
        shares, self._target_shares = self._target_shares, []
        calls, self._cross_entropy_targets = self._cross_entropy_targets, []
        step_has_targets = sum(counts) > 0
        for micro, (count, share) in enumerate(zip(counts, shares, strict=True), start=1):
            if count == 0 and not (share and step_has_targets):
                self._empty(micro, nonfinite)
        if nonfinite and "empty_nonfinite" not in self._reported:  # the labels no model was handed
            self._empty_cross_entropy(calls)

    def _empty_cross_entropy(self, calls: list) -> None:
        """The step's loss is non-finite: the first `F.cross_entropy` mean over no target explains it (every label its
        ignore_index: 0/0). One host read per call, on this step only; a target written since the call (a buffer
        refilled) holds another batch's labels and is not read."""
        for number, (target, version, ignore_index) in enumerate(calls, start=1):
            if version_of(target) == version and not bool((target != ignore_index).any()):
                self._empty(None, True, call=number)
                return

    def _empty(self, micro: int | None, nonfinite: bool = False, call: int | None = None) -> None:
        """Recorded the first time, and once more the first time the step's loss is non-finite with it (the one that
        explains the NaN). `call`: found at the step's `call`-th F.cross_entropy, not at a micro-batch's labels."""
        key = "empty_nonfinite" if nonfinite and "empty" in self._reported else "empty"
        if key not in self._reported:
            self._reported.update({key, "empty_nonfinite"} if nonfinite else {key})
            where = (f"F.cross_entropy's call {call} of step {self.ctx.step} averages over no target token (every "
                     "label its ignore_index)" if call
                     else f"micro-batch {micro} of step {self.ctx.step} has no target tokens")
            self.ctx.events.record("empty_targets", "warning", f"{where}: its per-token loss is 0/0",
                                   step=self.ctx.step, micro_step=micro, phase="loss", probe=self.name,
                                   model=self._model)

    def take_readings(self) -> dict[str, torch.Tensor]:
        captured, self._captured = self._captured, []
        for loss, targets, share in captured:
            self.observe({"loss": loss}, targets, share)
        out = {}
        if self._terms:
            out["loss_terms"] = torch.stack(self._terms)  # mixed dtypes promote exactly to the widest
        if self._targets:
            out["loss_targets"] = torch.stack([count for count, _ in self._targets])
            self._target_shares = [share for _, share in self._targets]
        if self._weights:
            out["loss_weights"] = torch.stack([w.weight for w in self._weights])
        if self._padded:
            out["padded_targets"] = torch.stack(self._padded).sum(0)
            self._padded = []
        self._weighed = self._weights
        self._terms, self._targets, self._weights = [], [], []
        return out

    def record(self, host: dict) -> dict:
        names, self._names = self._names, []
        shares, self._shares = self._shares, []
        flat = host.get("loss_terms") or []
        counts = host.get("loss_targets") or []
        self._record_empty(counts, not all(map(math.isfinite, flat)))
        targets = {"loss_targets": sum(counts)} if counts else {}
        weighed, self._weighed = self._weighed, []
        weights = host.get("loss_weights") or []
        self._check_summed(weighed, weights)
        self._check_backpropagated_twice(weighed, weights)
        self._check_padded(host.get("padded_targets"))
        if not names:
            return targets
        losses, i = [], 0
        for micro, (terms, share) in enumerate(zip(names, shares, strict=True), start=1):
            for term, dtype in terms:
                value = flat[i]
                i += 1
                if term == "loss":
                    losses.append((value, share))
                if not math.isfinite(value):
                    self._nonfinite(term, value, micro, dtype)
                elif term in NONNEGATIVE_TERMS and value < -NEGATIVE_TERM_SLACK and _judged_for_sign(dtype):
                    self._negative(term, value, micro)
        if not losses:
            return targets
        total = sum(value for value, _ in losses)
        return {"loss": total if all(share for _, share in losses) else total / len(losses), **targets}

    def _check_summed(self, weighed: list[Weight], weights: list[float]) -> None:
        """Several losses one model returned this step, each backpropagated at full weight: the step's gradient is
        their sum, not their mean — micro-batches accumulated without dividing each loss by their count, so the
        gradient is that many times the batch's (SGD's step and the norm a clipping threshold meets with it). Two
        models' losses each at full weight are two objectives, not this; nor are the losses of one batch — one
        forward's that two backwards went through, two forwards of the same input — weighed once, their sum. Said
        once."""
        totals: dict[tuple[str, int], float] = {}  # each batch's loss weight, over its forwards and backwards
        for w, weight in zip(weighed, weights, strict=True):
            totals[w.model, w.batch] = totals.get((w.model, w.batch), 0.0) + weight
        for model in dict.fromkeys(model for model, _ in totals):
            mine = [w for (m, _), w in totals.items() if m == model]
            if len(mine) > 1 and all(abs(w - 1) <= SUMMED_WEIGHT_TOLERANCE for w in mine) \
                    and self.ctx.events.say_once("micro_batches_summed"):
                self.ctx.events.record("setup_note", "warning",
                                       f"step {self.ctx.step} backpropagated {len(mine)} losses of {model}'s forwards "
                                       f"each at full weight: the gradient is their sum, {len(mine)}× their mean's",
                                       step=self.ctx.step, phase="loss", probe=self.name, model=model,
                                       value=float(len(mine)), code="micro_batches_summed")

    def _check_backpropagated_twice(self, weighed: list[Weight], weights: list[float]) -> None:
        """One forward's loss that several backwards adding to `.grad` each brought at full weight: its gradient is
        applied that many times — `loss.backward(retain_graph=True)` called again, or a total that holds the loss
        backpropagated after it. Said once."""
        passes: dict[tuple[str, int], set[int]] = {}  # (model, forward) -> the backwards that applied it in full
        for w, weight in zip(weighed, weights, strict=True):
            if w.accumulates and abs(weight - 1) <= SUMMED_WEIGHT_TOLERANCE:
                passes.setdefault((w.model, w.forward), set()).add(w.task)
        twice = next(((model, len(tasks)) for (model, _), tasks in passes.items() if len(tasks) > 1), None)
        if twice and self.ctx.events.say_once("loss_backpropagated_twice"):
            model, count = twice
            self.ctx.events.record("setup_note", "warning",
                                   f"step {self.ctx.step} backpropagated one forward's loss of {model} {count} times, "
                                   f"each at full weight and each adding to .grad: its gradient is applied {count}×",
                                   step=self.ctx.step, phase="loss", probe=self.name, model=model, value=float(count),
                                   code="loss_backpropagated_twice")

    def _nonfinite(self, term: str, value: float, micro: int, dtype: torch.dtype) -> None:
        if f"nonfinite_{term}" in self._reported:
            return
        self._reported.add(f"nonfinite_{term}")
        what = "the loss" if term == "loss" else f"the {term} loss term"
        self.ctx.events.record("nonfinite_loss", "critical",
                               f"{what} is {value} at step {self.ctx.step} (micro-batch {micro})",
                               step=self.ctx.step, micro_step=micro, phase="loss", probe=self.name,
                               model=self._model, tensor=term, dtype=dtype_name(dtype),
                               value=value, code="loss_nonfinite" if term == "loss" else "loss_term_nonfinite")

    def _negative(self, term: str, value: float, micro: int) -> None:
        """A term named a divergence or a cross-entropy below 0, where neither goes: it is no such thing (a sign
        flipped, log p and log q swapped), and minimising it does not do what the name says — with every value finite
        and a total that may fall as a loss should. Said once per term."""
        key = f"negative_{term}"
        if key in self._reported:
            return
        self._reported.add(key)
        self.ctx.events.record("setup_note", "warning",
                               f"the {term} loss term is {value:.4g} at step {self.ctx.step} (micro-batch {micro}): "
                               f"below 0, where no {NONNEGATIVE_TERMS[term]} goes",
                               step=self.ctx.step, micro_step=micro, phase="loss", probe=self.name, model=self._model,
                               tensor=term, value=value, code="loss_term_negative")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
