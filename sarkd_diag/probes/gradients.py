"""Gradients as the optimizer would use them (unscaled): the first non-finite module in backward order,
and magnitudes fp16 could not hold (metrics, not warnings: nearly every run has some).

Gradients are read at `gradients_ready`: after a loss scaler unscales them and before it decides to skip
the step — so the steps a scaler skips, where overflows live, are seen too — or, without a scaler, when
accelerate unscales them for its clipping (before a NaN total norm makes every gradient NaN: the Trainer and
accelerate loops), else at the optimizer's pre-step hook. One reduction per tensor; nothing moves to the host
until the step ends. The total norm the loop's clipping returns, where the probes see it, is `grad_norm`.

A non-finite gradient on a step a loss scaler skips is the scaler working (info); one that reaches an
optimizer without a scaler corrupts the weights (critical). An event is recorded where a stretch of such
steps begins and, while a scaler skips them, wherever the first bad tensor moves — its first skips
overflow at the output end, a module that overflows for good shows itself once the scale has come down.

Gradients that are exactly zero are the opposite failure: fp16 flushes a gradient below its smallest
subnormal (6e-8) to zero, and a backward computed in fp16 without a loss scaler — autocast without a
GradScaler, or fp16 weights — loses whole tensors' gradients when the loss is small (a KD term weighted 0.1
over thousands of tokens and a 50k vocabulary gives logit gradients near 1e-9): nothing moves and the
loss stays where it was. A tensor the loss reaches has an all-zero gradient only by such a flush or by a
structural zero: a dead unit, or a zero-initialised partner (LoRA's B is 0, so its A's gradient is 0 until
the first update moves B) — which lasts one step. So an event (`zero_gradients`) is recorded when most of
the tensors that have a gradient have an all-zero one on two consecutive steps, at the first of them, and
`zero_grad_tensors` counts them every step. An MoE expert no token was routed to (skipped, or called on an empty
selection) has an all-zero gradient too, though the loss reaches every weight that took part: while most gradients
are zero, hooks before the forward of the watched tensors' modules note which ran with input, and from the next step
on the tensors of those that did not are left out of the count (the hooks go once most are non-zero: on every module,
every step, they would cost a compiled model a graph break each). A step where not one trainable tensor has a
gradient at the optimizer step — the gradients cleared between backward and the step, or a loss cut off from the
weights (logits detached, a forward under no_grad hidden by `loss.requires_grad_()`) — counts as one of such a
stretch.

At `standard` backward order is taken as the reverse of registration (the output end first); at `full`,
post-accumulate hooks record the order in which gradients actually arrived. A tensor that several modules use — an
lm_head tied to the token embedding, a layer shared across depths — gets its gradient once every use has added to it,
so its arrival, and its registration under its first owner, both put it at the input end; backward computed it first
where its last owner in the forward ran, the output end. Such a tensor is placed, and named, at its last registered
owner — at `standard` just after the tensors registered before that owner, at `full` just before the first of them
arrives — unless the tensor just upstream of that owner is finite while ones further up are not: then the fault
began up there and reached it through an earlier use.

A backward adds its gradients to what `.grad` holds, so a loop must clear them once the optimizer (or a loss scaler
that skipped the step) has used them. Whether it did is read where it shows: when the first gradient of a step
arrives at a sentinel tensor of each optimizer — the smallest of its tensors that had a gradient, so the check costs
one small reduction — after that optimizer used the previous gradients (its step, or a loss scaler's unscale), the
tensor's `.grad` must be None or zero. Holding values, it holds the previous steps' gradients: each update then
applies the sum of every gradient so far, and under a loss scaler one overflow stays in the gradients and every later
step is skipped (a `gradients_not_cleared` note, once). One sentinel per optimizer, since several may keep cadences
of their own (alternating ones, a router's stepping every few steps): one that has not stepped yet is meant to let
its gradients add up, and one that steps without clearing is found whichever it is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..contract.numerics import FP16_TINY
from ..contract.shards import is_sharded, local_shard
from ..contract.wording import counted
from .base import FP16_MAX, Probe, abs_max, dtype_name, eager, nonfinite_counts, optimizers_of, sampled
from .loss_graph import singular_operations


@dataclass
class Sentinel:
    """The watched tensor whose first gradient of a step checks what `.grad` held, for one optimizer."""

    index: int  # into the watched tensors
    armed: bool = False  # its optimizer used the gradients since: the next arrival checks
    held: torch.Tensor | None = None  # did `.grad` hold non-zero values when that arrival came


class GradientProbe(Probe):
    name = "gradients"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._amax = None
        self._params = [w.param for w in ctx.watched]
        self._grads: list[torch.Tensor | None] = []
        self._underflow = None
        self._norm = None  # the total norm the loop's clipping returned, this step
        self._clip_max_norm: float | None = None  # the threshold it clipped at, this step (finite: a clipping)
        self._clip_value: float | None = None  # the value `clip_grad_value_` clamped each entry at, this step
        self._arrival: dict[int, int] = {}
        self._clock = itertools.count()
        self._handles = []
        self._last_first_bad: int | None = None  # the first bad tensor of the previous step, None if it was clean
        self._mostly_zero_since: int | None = None  # first step of the current stretch of mostly-zero gradients
        self._none_reached = False  # this step: no watched tensor has a gradient at all
        self._reported_zero = False
        self._participation: list = []  # forward hooks of the watched tensors' modules, while most gradients are zero
        self._hooked: set[tuple[str, str]] = set()  # the (model, module) those hooks watch
        self._participation_known = False  # they were on for the whole of this step
        self._ran: set[tuple[str, str]] = set()  # (model, module) that ran a forward with input this step
        self._sentinels: dict[int | None, Sentinel] = {}  # per optimizer (its id; None: one optimizer, or none)
        self._held: list[tuple[int, torch.Tensor]] = []  # this step's checks of gradients used since: (index, held)
        self._held_at: list[int] = []  # the sentinels of the checks handed over, in order
        self._shared = self._shared_tensors()  # watched index → (its last owner, the tensors upstream of it)
        if ctx.level == "full":
            for i, w in enumerate(ctx.watched):
                self._handles.append(w.param.register_post_accumulate_grad_hook(self._arrived(i)))

    def _arrived(self, index: int):
        def hook(_param):
            self._arrival.setdefault(index, next(self._clock))
        return hook

    def _shared_tensors(self) -> dict[int, tuple[str, list[int]]]:
        """The watched tensors that more than one module of their model holds (tied or shared weights): the last of
        those owners in registration order, and the model's other watched tensors upstream of it (their modules
        registered before it)."""
        index = {id(w.param): i for i, w in enumerate(self.ctx.watched)}
        shared: dict[int, tuple[str, list[int]]] = {}
        for model_name in dict.fromkeys(w.model for w in self.ctx.watched):
            model = self.ctx.models.get(model_name)
            modules = list(model.named_modules(remove_duplicate=False)) if model is not None else []
            order = {name: n for n, (name, _m) in enumerate(modules)}
            owners: dict[int, list[str]] = {}
            for name, module in modules:
                for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
                    i = index.get(id(p))
                    if i is not None and self.ctx.watched[i].model == model_name:
                        owners.setdefault(i, []).append(name)
            for i, names in owners.items():
                if len(set(names)) > 1:
                    last = order[names[-1]]
                    shared[i] = (names[-1], [j for j, w in enumerate(self.ctx.watched) if w.model == model_name
                                             and j != i and order.get(w.module, last) < last])
        return shared

    def begin_step(self) -> None:
        self._amax = self._underflow = None  # a reading of a step that closed without taking it is not this step's
        self._arrival.clear()
        self._ran.clear()
        self._participation_known = bool(self._participation)

    def _watch_participation(self, on: bool) -> None:
        """Hooks before the forward of each module that holds watched tensors, on while most gradients are zero (off
        otherwise: a hook on every module would cost a compiled model a graph break each, every step)."""
        if on == bool(self._participation):
            return
        for h in self._participation:
            h.remove()
        self._participation, self._hooked = [], set()
        if not on:
            return
        for key in dict.fromkeys((w.model, w.module) for w in self.ctx.watched):
            model = self.ctx.models.get(key[0])  # a tensor of no watched model (a KD projection): not followed
            if model is not None and self.ctx.sealed(key[0]):  # compiled as one graph: no hook inside it
                model = None
            module = model.get_submodule(key[1]) if model is not None else None
            if module is not None:
                self._hooked.add(key)
                self._participation.append(module.register_forward_pre_hook(eager(self._ran_with_input(key)),
                                                                            with_kwargs=True))

    def _ran_with_input(self, key: tuple[str, str]):
        def hook(_module, args: tuple, kwargs: dict) -> None:
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            if not tensors or any(t.numel() for t in tensors):
                self._ran.add(key)
        return hook

    def _took_part(self, indices: list[int]) -> list[int]:
        """The watched tensors among `indices` whose module ran a forward with input this step (all of them where
        that was not watched for the whole step): an MoE expert no token was routed to — skipped, or called on an
        empty selection — has an all-zero gradient that says nothing of whether the loss reaches the weights."""
        if not self._participation_known:
            return indices
        keys = ((i, (self.ctx.watched[i].model, self.ctx.watched[i].module)) for i in indices)
        return [i for i, key in keys if key not in self._hooked or key in self._ran]

    def observe_norm(self, norm: torch.Tensor | float, max_norm: float | None = None) -> None:
        """The total norm the loop's clipping computed (before clipping): kept on the device for the step's transfer;
        and the threshold it clips at, when known and finite (a fix that says to clip names it)."""
        if max_norm is not None and math.isfinite(float(max_norm)):
            self._clip_max_norm = float(max_norm)
        if torch.is_tensor(norm):
            norm = norm if type(norm) is torch.Tensor else local_shard(norm)
            self._norm = (norm.detach() if norm.requires_grad else norm).float()
        else:
            self._norm = torch.tensor(float(norm))

    def observe_clip_value(self, clip_value: float) -> None:
        """The value the loop clamps each gradient entry at (`clip_grad_value_`), when finite."""
        if math.isfinite(clip_value):
            self._clip_value = clip_value

    def _first_gradient_of_step(self, sentinel: Sentinel):
        def hook(_grad) -> None:
            """A tensor hook: runs before the arriving gradient is added to `.grad`, so what `.grad` holds here is
            what the loop left from the steps before."""
            if sentinel.armed:
                sentinel.armed = False
                held = self.ctx.watched[sentinel.index].param.grad
                if held is not None:
                    sentinel.held = local_shard(held).detach().ne(0).any()
        return hook

    def _arm(self) -> None:
        """The gradients were used — an optimizer stepped with them, or a loss scaler unscaled them to step or skip
        —: the next arrival at the sentinel of each optimizer that used them must find them cleared. (A step closed
        without either is a micro-batch of an accumulation, whose gradients are meant to add up; so is, for one of
        several optimizers, a step it did not take.) A sentinel is chosen once, among its optimizer's tensors that
        have a gradient now. What its first arrival found counts only if the sum is used: a loop that cleared the
        gradients since (between backward and step) applies none of it."""
        optimizers = optimizers_of(self.ctx.optimizer)
        for optimizer in optimizers if len(optimizers) > 1 else [None]:  # one optimizer: one sentinel, every step
            if optimizer is not None and id(optimizer) not in self.ctx.optimizers_used:
                continue
            key = None if optimizer is None else id(optimizer)
            sentinel = self._sentinels.get(key) or self._choose_sentinel(key, optimizer)
            if sentinel is None:
                continue
            if sentinel.held is not None:
                grad = self.ctx.watched[sentinel.index].param.grad
                if grad is not None:
                    self._held.append((sentinel.index, sentinel.held & local_shard(grad).detach().ne(0).any()))
                sentinel.held = None
            sentinel.armed = True

    def _choose_sentinel(self, key: int | None, optimizer) -> Sentinel | None:
        """The smallest of an optimizer's watched tensors (every watched one for `None`) that has a gradient now."""
        held = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        whole = [i for i, w in enumerate(self.ctx.watched)  # FSDP fills a shard's .grad by its reduce-scatter,
                 if w.param.grad is not None and not is_sharded(w.param)  # not the accumulation a hook precedes
                 and (held is None or id(w.param) in held)]
        if not whole:
            return None
        sentinel = Sentinel(min(whole, key=lambda i: self.ctx.watched[i].param.numel()))
        self._sentinels[key] = sentinel
        self._handles.append(self.ctx.watched[sentinel.index].param.register_hook(self._first_gradient_of_step(sentinel)))
        return sentinel

    def gradients_ready(self) -> None:
        """Read each tensor's gradient: its absolute max (and, on statistics steps, its fp16 underflow). Read again in
        a step (a micro-batch's reading before the next backward added to it), the later reading replaces the earlier
        — unless the earlier already held a non-finite value: a clipping since then, by the NaN total norm it made,
        has made every gradient NaN, and only the earlier reading shows the tensor it came from (`_earliest_fault`)."""
        self._grads = self._unscaled_gradients()
        present = [g for g in self._grads if g is not None]
        if not present:
            self._none_reached = bool(self._grads)  # not one trainable tensor has a gradient at the step
            return
        self._none_reached = False
        if any(self.ctx.loss_scaler.found_inf(o) for o in optimizers_of(self.ctx.optimizer)):
            self._arm()  # unscaled: the scaler steps or skips with them (a skipped step never reaches the optimizer)
        amax = abs_max(present).float()
        if len(present) < len(self._grads):  # tensors without a gradient this step read 0
            where = torch.tensor([g is not None for g in self._grads], device=amax.device)
            amax = amax.new_zeros(len(self._grads)).masked_scatter_(where, amax)
        self._amax = _earliest_fault(self._amax, amax)
        if self.ctx.stats_step:  # estimated on a fixed sample of each tensor
            s = sampled(present)
            live = s != 0
            self._underflow = torch.stack([(live & (s.abs() < FP16_TINY)).sum(), live.sum()]).float()

    def _unscaled_gradients(self) -> list[torch.Tensor | None]:
        """Each watched tensor's gradient as its optimizer uses it. Under a loss scaler, one of several optimizers
        that does not step this step (its own cadence: a critic stepping five times per generator step, a head every
        few batches) is not unscaled: its gradients are still multiplied by the scale — read as they are, a healthy
        fp32 run's gradients would seem thousands of times larger than they are — and belong to the step that uses
        them, so they are read as none."""
        used = self.ctx.gradients_used() if self.ctx.loss_scaler.enabled else None
        if not used:
            return [p.grad for p in self._params]
        return [p.grad if id(p) in used else None for p in self._params]

    def nonfinite(self) -> bool:
        """Whether a gradient read this step holds NaN/Inf: the largest of the per-tensor maxima is finite exactly when
        each is (max propagates NaN) — one op and a host sync."""
        return self._amax is not None and len(self._amax) > 0 and not math.isfinite(self._amax.max().item())

    def after_optimizer_step(self) -> None:
        self._arm()  # after, not before: an optimizer stepped with a closure (Lightning's) runs the backward inside

    def take_readings(self) -> dict[str, torch.Tensor]:
        out = {}
        if self._amax is not None:
            out["grad_amax"] = self._amax
        if self._underflow is not None:
            out["grad_underflow"] = self._underflow
        if self._norm is not None:
            out["grad_norm"] = self._norm
        if self._held:
            self._held_at = [index for index, _ in self._held]
            out["grads_held"] = torch.stack([flag for _, flag in self._held]).float()
        self._amax = self._underflow = self._norm = None
        self._held = []
        return out

    def record(self, host: dict) -> dict:
        held = [index for index, flag in zip(self._held_at, host["grads_held"], strict=True)
                if flag] if "grads_held" in host else []
        if held and self.ctx.events.say_once("gradients_not_cleared"):
            self._report_not_cleared(held[0])
        amax = host.get("grad_amax")
        metrics: dict = {} if host.get("grad_norm") is None else {"grad_norm": host["grad_norm"]}
        if self._clip_max_norm is not None:
            metrics["clip_max_norm"], self._clip_max_norm = self._clip_max_norm, None
        if self._clip_value is not None:
            metrics["clip_value"], self._clip_value = self._clip_value, None
        if host.get("grad_underflow") is not None:
            tiny, nonzero = host["grad_underflow"]
            metrics["grad_fp16_underflow_fraction"] = tiny / nonzero if nonzero else 0.0
        if amax is None:
            if self._none_reached and not self.ctx.caller_skipped:  # nothing reached the weights (a step the loop
                # skipped on purpose ran no backward: no sign of a loss cut off): as all-zero gradients
                metrics["zero_grad_tensors"] = 0
                self._track_zero(True, list(range(len(self._grads))), 0)
            self._grads, self._none_reached = [], False
            return metrics
        finite = [v for v in amax if math.isfinite(v)]
        metrics["grad_amax"] = max(finite) if finite else math.nan
        metrics["grad_fp16_overflow_tensors"] = sum(1 for v in finite if v > FP16_MAX)
        present = [i for i, g in enumerate(self._grads) if g is not None]
        zero = [i for i in present if amax[i] == 0]
        metrics["zero_grad_tensors"] = len(zero)
        if not self.ctx.caller_skipped:
            zero_in, present_in = self._took_part(zero), self._took_part(present)
            self._track_zero(2 * len(zero_in) > len(present_in), zero_in, len(present_in))
            self._watch_participation(2 * len(zero) > len(present))
        bad = [i for i, v in enumerate(amax) if not math.isfinite(v)]
        metrics["nonfinite_grad_tensors"] = len(bad)
        first = self._first_in_backward_order(bad) if bad else None
        begins = first is not None and self._last_first_bad is None
        moved = first is not None and first != self._last_first_bad and self.ctx.loss_scaler.enabled
        if begins or moved:
            self._report(first, bad, amax[first])
        if begins and self.ctx.loss_roots and self.ctx.events.say_once("singular_derivative"):
            self._report_singular_operations()
        self._last_first_bad = first
        self._grads = []
        return metrics

    def _track_zero(self, mostly_zero: bool, zero: list[int], present: int) -> None:
        """A stretch of steps where most tensors with a gradient have an all-zero one, or none has a gradient at
        all (`present` 0): reported once, at its first step, when it lasts two steps."""
        if mostly_zero and self._mostly_zero_since is not None and not self._reported_zero:
            self._reported_zero = True
            self._report_zero(self._first_in_backward_order(zero), zero, present, self._mostly_zero_since)
        self._mostly_zero_since = (self._mostly_zero_since or self.ctx.step) if mostly_zero else None

    def _first_in_backward_order(self, bad: list[int]) -> int:
        if self._arrival:
            return min(bad, key=lambda i: self._arrived_at(i, bad))
        return max(bad, key=lambda i: self._registered_at(i, bad))

    def _arrived_at(self, index: int, bad: list[int]) -> float:
        """When a watched tensor's gradient arrived; a shared tensor's made at its last owner (`_made_at_last_owner`),
        just before the first arrival among the tensors upstream of that owner: backward computed it there — as a
        module, or inside a fused loss that takes its weight — while it arrives once every use has added to it."""
        upstream = self._made_at_last_owner(index, bad)
        if not upstream:
            return self._arrival.get(index, math.inf)
        return min(self._arrival.get(i, math.inf) for i in upstream) - 0.5

    def _registered_at(self, index: int, bad: list[int]) -> float:
        """Where a watched tensor sits in registration order: its index; a shared tensor's made at its last owner,
        just after the tensors upstream of that owner."""
        upstream = self._made_at_last_owner(index, bad)
        return max(upstream) + 0.5 if upstream else index

    def _made_at_last_owner(self, index: int, bad: list[int]) -> list[int]:
        """For a shared tensor whose gradient is among `bad` because of its last owner's use, the watched tensors
        upstream of that owner; else empty. Backward reaches the tensor just upstream of an owner right after it, so
        a fault made at the owner shows there too — or nowhere upstream, when the owner's own product overflowed (a
        float16 head's sum over the tokens). That tensor finite while ones further up are bad: the fault began up
        there and reached the shared tensor through an earlier use (the embedding's)."""
        _, upstream = self._shared.get(index, (None, []))
        bad_upstream = set(upstream) & set(bad)
        return upstream if upstream and (not bad_upstream or max(upstream) in bad_upstream) else []

    def _named_at(self, index: int, bad: list[int]) -> tuple[str, str]:
        """The module and tensor name of a watched tensor where backward first computed its gradient: a shared
        tensor's last owner, where its gradient was made there."""
        w = self.ctx.watched[index]
        if not self._made_at_last_owner(index, bad):
            return w.module, w.tensor
        owner = self._shared[index][0]
        return owner, f"{owner}.{w.tensor.rpartition('.')[2]}"

    def _report(self, first: int, bad: list[int], value: float) -> None:
        w = self.ctx.watched[first]
        module, tensor = self._named_at(first, bad)
        shared = f" (the same tensor as {w.tensor}: backward computed it there first)" if tensor != w.tensor else ""
        grad = self._grads[first]
        counts = nonfinite_counts(grad) if grad is not None else {}
        # a scaler skips every step whose gradients are non-finite; a loop's policy may skip it before the optimizer;
        # a loop that raised inside the step ended on it (`Probes.close` records the step it left unfinished)
        raised = self.ctx.unfinished
        scaled = self.ctx.loss_scaler.enabled and not raised
        held_back = self.ctx.optimizer is not None and not self.ctx.optimizer_ran and not raised
        skipped = scaled or held_back
        outcome = ("the loop raised before its optimizer step: training ended on it" if raised else
                   "the loss scaler skips the step" if scaled else
                   "the step was skipped before the optimizer ran" if held_back else
                   "no loss scaler: the optimizer applies it")
        self.ctx.events.record(
            "nonfinite_grad", "info" if skipped else "critical",
            f"gradient of {w.model} {tensor}{shared} is non-finite at step {self.ctx.step} — the first in backward "
            f"order of {counted(len(bad), 'non-finite tensor')}; {outcome}",
            step=self.ctx.step, phase="backward", probe=self.name, model=w.model, module=module,
            tensor=tensor, dtype=self.ctx.dtype_of(grad if grad is not None else w.param), value=value,
            code="grad_nonfinite_skipped" if skipped else "grad_nonfinite_applied", **counts)

    def _report_singular_operations(self) -> None:
        """The gradients turned non-finite: the operations of the caller's own loss computation (between the trained
        models' outputs and the loss) whose derivative is infinite or undefined at some input, read off the loss's
        graph — what a backward from a finite loss and small values can only have met (`loss_graph`); `tensor` names
        the likeliest to have made them, which the diagnosis quotes."""
        operations = singular_operations(self.ctx.loss_roots, self.ctx.output_nodes)
        if operations:
            likeliest = " (the likeliest first)" if len(operations) > 1 else ""
            self.ctx.events.record(
                "singular_derivative", "info",
                f"the loss's own computation at step {self.ctx.step} holds {', '.join(operations)}{likeliest} — an "
                "operation whose derivative is infinite or undefined at some input (sqrt or pow below 1 at 0, a log "
                "or division at 0, acos/asin at ±1)", step=self.ctx.step, phase="loss", probe=self.name,
                tensor=operations[0])

    def _report_not_cleared(self, index: int) -> None:
        w = self.ctx.watched[index]
        self.ctx.events.record(
            "setup_note", "warning",
            f"the gradients were not cleared after step {self.ctx.step - 1}: when step {self.ctx.step}'s backward "
            f"reached {w.model} {w.tensor}, its .grad still held the earlier steps' values, and the backward added to "
            "them — each update applies the sum of every gradient so far (call optimizer.zero_grad() after each "
            "optimizer step)",
            step=self.ctx.step, phase="backward", probe=self.name, model=w.model, module=w.module, tensor=w.tensor,
            code="gradients_not_cleared")

    def _report_zero(self, first: int, zeros: list[int], present: int, since: int) -> None:
        w, zero = self.ctx.watched[first], len(zeros) if present else 0
        module, tensor = self._named_at(first, zeros)
        computed = self.ctx.computes_in(w.model)  # what the backward ran in: a frozen fp16 base under fp32 adapters too
        if present:
            what = (f"the gradients of {zero} of the {counted(present, 'trainable tensor')} are exactly zero on every "
                    f"step since step {since}, from {w.model} {tensor} (backward order) on")
        else:
            what = (f"none of the {counted(len(self._grads), 'trainable tensor')} has a gradient at the optimizer step "
                    f"on every step since step {since} (cleared before the step, or the loss does not reach them)")
        self.ctx.events.record(
            "zero_gradients", "warning",
            f"{what}: no update reaches them (backward computed in {dtype_name(computed)}, "
            f"{'with' if self.ctx.loss_scaler.enabled else 'without'} a loss scaler)",
            step=since, phase="backward", probe=self.name, model=w.model, module=module, tensor=tensor,
            dtype=dtype_name(computed), value=zero / present if present else 1.0, numel=present)

    def close(self) -> None:
        self._watch_participation(False)
        for h in self._handles:
            h.remove()


def _earliest_fault(earlier: torch.Tensor | None, later: torch.Tensor) -> torch.Tensor:
    """Per-tensor gradient maxima of one step read twice: the later, unless the earlier holds a NaN/Inf still there in
    the later. Gradients only add up within a step, so a non-finite partial gradient stays non-finite in the step's
    (the update applies it either way); what may differ is where: a clipping in between spreads it to every tensor.
    A tensor non-finite before and finite after was cleared in between (a guard's `zero_grad()`): the earlier
    reading is then no part of the step's. Chosen on the device, no host sync."""
    if earlier is None or earlier.shape != later.shape:
        return later
    bad_before = ~torch.isfinite(earlier)
    kept = bad_before.any() & ~(bad_before & torch.isfinite(later)).any()
    return torch.where(kept, earlier, later)
