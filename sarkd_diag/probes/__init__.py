"""Probes watch a training loop through hooks and record numerical events; they never steer it.

Usable on their own, in anyone's loop:

    with Probes(model, optimizer=opt, scaler=scaler, run_dir="runs/mine") as probes:
        for batch in data:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update()
            probes.step()                 # after the optimizer step; the loss is read from the outputs
            opt.zero_grad()
    print(probes.diagnosis())

`ProbeSet` is the probes of one run and the hooks that drive them (sarkd-diag's own loop holds one);
`Probes` is what a user holds: a ProbeSet plus a run directory, a step clock, the metrics rows and the
diagnosis. Gradients are read after a loss scaler unscales them (without one, when accelerate unscales them
for its clipping, else at the optimizer's pre-step hook), weights through the optimizer's step hooks,
activations through forward hooks attached on statistics steps only; every probe keeps its statistics on the
device, and a step moves all of them to the host in one transfer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..contract import numerics
from ..contract.config import CALLERS, user_path
from ..contract.config import PROBE_LEVELS as LEVELS  # defined once, beside the --probes option
from ..contract.errors import BadInput
from ..contract.events import EventLog, JsonlLog, NullLog, events_file_name
from ..contract.loss_scaler import LossScaler, unwrap_optimizer
from ..contract.numerics import dtype_name
from ..contract.ranks import Ranks
from ..contract.wording import counted
from .activations import ActivationProbe
from .base import (
    Optimizers,
    Probe,
    ProbeContext,
    Watched,
    dtype_of_most,
    group_lr,
    optimizers_of,
    recompile_with_hooks,
    to_host,
    weights_compute_dtype,
)
from .clipping import watch_gradient_clipping
from .forwards import ForwardProbe, as_it_ran
from .gradients import GradientProbe
from .loss import LossProbe, caller_loss, output_loss
from .loss_functions import watch as watch_loss_function
from .optimizer import OptimizerProbe
from .parameters import ParameterProbe
from .scaler import ScalerProbe
from .updates import UpdateProbe

# forward-hook order matters: ForwardProbe decides which forwards are training ones before the others look
PROBE_TYPES = (ForwardProbe, LossProbe, ActivationProbe, GradientProbe, OptimizerProbe, UpdateProbe,
               ParameterProbe, ScalerProbe)
# the moments of a step, each called only on the probes that implement it: not a no-op call per probe and moment
MOMENTS = ("begin_step", "gradients_ready", "before_optimizer_step", "after_optimizer_step", "take_readings", "record")

# what a replay of a step's forwards follows, said in its events (`replay_forward`): by default the step's loss, else
# the gradients its optimizer was about to apply
NONFINITE_LOSS = "a non-finite loss"

# metrics columns of the run-directory contract that Probes cannot know in someone else's loop: null, not 0
NOT_SEEN_IN_A_USER_LOOP = ("kd_loss", "ce_loss", "grad_norm", "tokens_per_s", "eval_ppl")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers, and any other wrapper whose `.module` holds
    every weight it has (Lightning Fabric's `_FabricModule`, DeepSpeed's engine): the one whose names a person knows
    (`transformer.h.1.mlp`, not `_forward_module.transformer.h.1.mlp`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif _wraps_all_of(model, getattr(model, "module", None)):
            model = model.module
        else:
            return model


def compiled_as_one_graph(model: nn.Module) -> bool:
    """A torch.compile wrapper made with fullgraph=True: a graph break inside its forward raises, and the probes' module
    hooks are graph breaks there (`base.eager`)."""
    return bool(getattr(getattr(model, "dynamo_ctx", None), "fullgraph", False))


def _wraps_all_of(wrapper: nn.Module, inner) -> bool:
    """`inner` is a module holding every parameter `wrapper` has: the wrapper adds nothing but a prefix to names."""
    if not isinstance(inner, nn.Module) or inner is wrapper:
        return False
    held = {id(p) for p in inner.parameters()}
    return all(id(p) in held for p in wrapper.parameters())


def replace_method(owner, name: str, replacement: Callable) -> Callable[[], None]:
    """Set `owner.name` (a method of a framework's object) to `replacement`; returns what puts the original back —
    unless something replaced it again since, whose replacement stays."""
    had_own, original = name in vars(owner), vars(owner).get(name)

    def restore() -> None:
        if vars(owner).get(name) is replacement:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

    setattr(owner, name, replacement)
    return restore


def _run_as_it_ran(model: nn.Module, args: tuple, kwargs: dict, autocast: torch.dtype | None) -> None:
    """One recorded forward again, under the autocast it ran in (the replay runs outside the loop's context)."""
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        model(*args, **kwargs)


@contextlib.contextmanager
def _buffers_put_back(models: Iterable[nn.Module]):
    """Every buffer of `models` as it was, once the block ends: a replay runs their forwards again in the mode they
    trained in, and a forward in train mode updates buffers in place — a BatchNorm's running statistics and batch
    count, a spectral norm's power-iteration vectors, a quantisation observer's range —, a second update the run
    without probes never makes. A clone of each, on the failure path only; one the forward replaced is set back."""
    kept = [(module, name, buffer, buffer.clone()) for model in models for module in model.modules()
            for name, buffer in module.named_buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in kept:
                module._buffers[name] = buffer
                buffer.copy_(value)


class ProbeSet:
    """The probes of one run and the hooks that drive them: the optimizer's step hooks and the loss
    scaler's unscale. The owner's loop calls `begin_step`, hands over its loss terms (`observe_terms`),
    moves `take_readings()` to the host with its own values and hands them back to `record`."""

    def __init__(self, ctx: ProbeContext, replays_steps: bool = False):
        self.ctx = ctx
        self.probes = [] if ctx.level == "off" else [cls(ctx) for cls in PROBE_TYPES]
        self._at = {moment: [p for p in self.probes if getattr(type(p), moment) is not getattr(Probe, moment)]
                    for moment in MOMENTS}
        self.loss = next((p for p in self.probes if isinstance(p, LossProbe)), None)
        self._activations = next((p for p in self.probes if isinstance(p, ActivationProbe)), None)
        self._gradients = next((p for p in self.probes if isinstance(p, GradientProbe)), None)
        self._optimizers = optimizers_of(ctx.optimizer)
        # where no owner replays a failing step (a caller's loop; the Trainer's callback and `train` replay their own):
        # one process, statistics off on most steps, an optimizer whose pre-step hook sees the gradients
        self.replays_steps = (replays_steps and self._activations is not None and self._gradients is not None
                              and bool(self._optimizers))
        self._read_at: int | None = None  # this step's training forwards when its gradients were last read
        self._reading_final = False  # read as the optimizer uses them: no later reading replaces it
        self.readings_taken = False  # this step's readings were handed over (its recording began)
        self.closed_without_optimizer_step = False  # the last step the owner closed saw no optimizer step
        self.lr_read = False  # this step reached the optimizer (its pre-step hook, or the loss scaler's unscale)
        self.optimizer_stepping = False  # this step's (first) optimizer pre-step hook ran
        self._stepped: set[int] = set()  # the optimizers whose pre-step hook ran in this step
        self._unscaled_ones: set[int] = set()  # the optimizers the loss scaler unscaled this step
        self._watched_ids = {id(w.param) for w in ctx.watched}
        self._removers = []
        if self._optimizers and self.probes:
            for optimizer in self._optimizers:
                self._removers.append(optimizer.register_step_pre_hook(self._before_optimizer_step).remove)
                if len(self._optimizers) == 1:  # several: the post-step moment is the owner's close of the step
                    self._removers.append(optimizer.register_step_post_hook(self._after_optimizer_step).remove)
            if ctx.loss_scaler.enabled:
                self._removers.append(ctx.loss_scaler.on_unscaled(self._unscaled))

    @classmethod
    def for_trainer(cls, run, events: EventLog) -> ProbeSet:
        """The probes of sarkd-diag's own loop (`run`: a `train.loop.Run`), sharing its event log.

        They watch the optimizer's parameters in its own order, so the loop's guard — a per-tensor absolute
        max of the weights after every step, which it takes anyway — is the parameter probe's reading too
        (handed over as `param_amax`) instead of a second pass over the weights.
        """
        models = {"student": run.models.student, "teacher": run.models.teacher}
        names = {id(p): (model, name) for model, m in models.items() for name, p in m.named_parameters()}
        names.update({id(p): ("projection", name) for name, p in run.objective.projection.named_parameters()})
        watched = []
        for p in run.optimization.trainable:
            model, name = names[id(p)]
            watched.append(Watched(model, name.rpartition(".")[0], name, p))
        cfg = run.config
        activations = JsonlLog(run.run_dir / "activations.jsonl") if run.compute.world.is_main else None
        ctx = ProbeContext(models, events, run.optimization.optimizer, run.compute.precision.loss_scaler, cfg.probes,
                           cfg.probe_every, watched=watched, weights_read_by_owner=True, activations_log=activations,
                           gather=run.compute.world.gather)
        return cls(ctx)

    # ----------------------------------------------------------------------------------- the clock
    def begin_step(self, step: int) -> None:
        ctx = self.ctx
        ctx.step = step
        ctx.stats_step = ctx.level == "full" or (ctx.level == "standard" and (step == 1 or step % ctx.every == 0))
        ctx.lr, ctx.trained, ctx.optimizer_ran, ctx.first_closure_loss = None, False, False, None
        ctx.training_forwards = 0
        self.lr_read = self.optimizer_stepping = self.readings_taken = self._reading_final = False
        self._read_at = None
        self._stepped = set()
        self._unscaled_ones = set()
        ctx.optimizers_used = set()
        ctx.output_nodes, ctx.loss_roots = [], []
        ctx.step_forwards = [] if self.replays_steps and not ctx.reads_modules() else None
        for probe in self._at["begin_step"]:
            probe.begin_step()

    def models_read(self) -> set[str]:
        """The models whose module outputs the last statistics step read (none without the activation probe)."""
        return self._activations.models_read if self._activations is not None else set()

    def gradients_ready(self) -> None:
        """Read the gradients now: after unscaling, before a clipping, or before the optimizer uses them. Once a step
        — or again where a training forward ran since the last reading, before the optimizer used them: that reading
        was a micro-batch's (a loop that clips each micro-batch of an accumulation), and each later backward adds to
        the gradients. Read once the optimizer's update has begun, the reading is the step's: what runs after it (an
        LBFGS line search's re-evaluations) is no micro-batch of the step."""
        forwards = self.ctx.training_forwards
        if not self._reading_final and self._read_at != forwards:
            self._read_at = forwards
            for probe in self._at["gradients_ready"]:
                probe.gradients_ready()
        self._reading_final = self._reading_final or self.optimizer_stepping

    def _unscaled(self, optimizer) -> None:
        """The loss scaler unscaled an optimizer's gradients: read them once every optimizer's are (with several,
        the ones unscaled first are read true while the others are still scaled)."""
        if any(optimizer is o for o in self._optimizers):
            self._unscaled_ones.add(id(optimizer))
            self.ctx.optimizers_used.add(id(optimizer))
            self._read_lr()
            if len(self._unscaled_ones) == len(self._optimizers):
                self.gradients_ready()

    def gradients_unscaled(self) -> bool:
        """No loss scaler scales the gradients, or it has unscaled every optimizer's this step."""
        return not self.ctx.loss_scaler.enabled or len(self._unscaled_ones) == len(self._optimizers)

    def watches_any(self, params: list) -> bool:
        return any(id(p) in self._watched_ids for p in params)

    @property
    def several_optimizers(self) -> bool:
        return len(self._optimizers) > 1

    def _read_lr(self) -> None:
        """The lr this step's update uses, read before the optimizer steps (also on a step the loss scaler skips):
        a scheduler changes it after the step (the Trainer and accelerate call `scheduler.step()` after
        `optimizer.step()`), so read at `Probes.step()` it would be the next step's."""
        self.lr_read = True
        self.ctx.lr = group_lr(self.ctx.optimizer.param_groups[0])

    def _before_optimizer_step(self, optimizer, args, kwargs) -> tuple | None:
        """The optimizer's pre-step hook. Stepped with a closure (Lightning's automatic optimization, LBFGS), the
        step calls it to run the forward and backward: the gradients and the moment before the update come after
        it, so the closure is handed on wrapped (same arguments, same result) and the moment is taken when it
        returns — read here, the gradients would be the previous step's, or none."""
        if id(optimizer) in self._stepped:
            (self._steps_left_open if self.ctx.forward_since_update else self._stepped_twice)(optimizer)
        self.ctx.forward_since_update = False
        # unscaled this step already: a scaler's update() between its step and this one forgets that, the probes not
        if id(optimizer) not in self._stepped | self._unscaled_ones and self.ctx.loss_scaler.left_scaled(optimizer):
            self._stepped_past_the_scaler(optimizer)
        self._stepped.add(id(optimizer))
        self.ctx.optimizers_used.add(id(optimizer))
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args: (optimizer, *step's arguments)
        if not callable(closure):
            self._before_update()
            return None
        first_result = []

        def closure_then_before_update():
            if first_result:  # LBFGS re-evaluates the loss at trial weights: the step's batch was the first call's
                self.ctx.first_closure_loss = first_result[0]
                return self._reevaluation(closure)
            result = closure()
            first_result.append(result.detach() if torch.is_tensor(result) else result)
            self._before_update()
            return result
        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_before_update}
        return (args[0], closure_then_before_update, *args[2:]), kwargs

    def _reevaluation(self, closure):
        """Run an optimizer's closure again within its step, its forwards marked as re-evaluations (`ctx.reevaluating`):
        their loss is at weights the step tries, not the step's loss (LBFGS calls it up to max_iter × 1.25 times)."""
        self.ctx.reevaluating = True
        try:
            return closure()
        finally:
            self.ctx.reevaluating = False

    def _before_update(self) -> None:
        """The moment before an optimizer's update: its gradients complete, its weights not yet changed."""
        if self.optimizer_stepping:  # a second optimizer of the same step: the moment has passed
            return
        self.optimizer_stepping = True
        self.ctx.optimizer_ran = True
        if self.closed_without_optimizer_step and not self.ctx.trained:
            self._stepped_before_a_forward()
        self.closed_without_optimizer_step = False
        self._read_lr()
        if self.gradients_unscaled():
            self.gradients_ready()  # else a later optimizer's gradients are still scaled: read when they are not
        for probe in self._at["before_optimizer_step"]:
            probe.before_optimizer_step()
        self._replay_if_gradients_nonfinite()

    def _replay_if_gradients_nonfinite(self) -> None:
        """The optimizer is about to apply non-finite gradients on a step without per-module statistics: replay the
        step's training forwards with the statistics on, from the weights that made them, which the update is about
        to ruin. Gradients a loss scaler unscaled and let through are finite (it skips the others): this is the loop
        nothing skips, where it costs one host sync a step (the gradients' finiteness)."""
        forwards, self.ctx.step_forwards = self.ctx.step_forwards, None
        if forwards and not self._unscaled_ones and self._gradients.nonfinite():
            self._replay(forwards, after="non-finite gradients")

    def replay_if_loss_nonfinite(self, loss: float | None) -> None:
        """The step closes with a non-finite loss and no optimizer step (a loss scaler skipped it): the weights are
        still those that made it — replay the step's training forwards with the statistics on."""
        forwards, self.ctx.step_forwards = self.ctx.step_forwards, None
        if forwards and loss is not None and not math.isfinite(loss) and not self.ctx.optimizer_ran:
            self._replay(forwards)

    def _replay(self, forwards: list, after: str = NONFINITE_LOSS) -> None:
        """Replay a step's recorded forwards as they ran (same arguments, same autocast) with per-module statistics
        on, where no owner replays a step (`replays_steps`), so the module where a non-finite value began is named —
        or every output is found finite and the loss's own arithmetic made it. The first failing step of the run
        only (`replay_apart`). Not where an input was rewritten in place since it ran (a refilled buffer,
        `forwards.as_it_ran`): another batch's data would be read as its own, and finite outputs would clear the
        modules of a NaN that batch made."""
        if not all(map(as_it_ran, forwards)):
            return
        self.replays_steps = False
        self.replay_apart(lambda: [_run_as_it_ran(*forward[:4]) for forward in forwards], after)

    def replay_apart(self, forward, after: str = NONFINITE_LOSS) -> None:
        """`replay_forward` between the run's own steps (the Trainer's callback, a caller's loop): it draws no random
        numbers the run would (`fork_rng`, on every device the models use), and one that raises part-way names what it
        read and nothing more — the run goes on as it would have."""
        devices = sorted({p.device.index or 0 for m in self.ctx.models.values() for p in m.parameters()
                          if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), contextlib.suppress(Exception):
            self.replay_forward(forward, after)

    def _stepped_twice(self, optimizer) -> None:
        """An optimizer steps a second time within one step with no training forward between: the same batch's
        gradients applied twice — `scaler.step(optimizer)` followed by `optimizer.step()` also applies, unscaled, the
        non-finite gradients of a step the scaler skips. Said once."""
        scaler = " (a loss scaler steps it too: `scaler.step(optimizer)` already calls `optimizer.step()`)" \
            if self.ctx.loss_scaler.enabled else ""
        self._note_once("optimizer_stepped_twice",
                        f"an optimizer stepped twice on one batch in step {self.ctx.step}{scaler}: optimizer.step() is "
                        "called twice per batch — every gradient applied twice, and a gradient the scaler skipped as "
                        "non-finite applied anyway", optimizer)

    def _steps_left_open(self, optimizer) -> None:
        """An optimizer steps again within one step after another training forward: a new batch's update, so the
        loop calls `Probes.step()` less often than it steps (never, or only where it logs) — no gradient applied twice,
        but one row holds several updates, numbered as the probes' steps, not the optimizer's. Said once."""
        self._note_once("steps_left_open",
                        f"the optimizer stepped again in step {self.ctx.step} after another training forward: "
                        "probes.step() is not called after every optimizer step, so one step's row holds several "
                        "updates (its statistics and loss the last batch's) and the steps are not numbered as the "
                        "optimizer counts them — call probes.step() after every optimizer.step()", optimizer)

    def _stepped_past_the_scaler(self, optimizer) -> None:
        """An optimizer steps on gradients the loss scaler scaled and has not unscaled: the loop calls
        `optimizer.step()` where `scaler.step(optimizer)` belongs (which unscales first, and skips a step whose
        gradients overflowed), so every update applies the gradients × the scale, and non-finite ones too. Said once,
        with the scale (read once)."""
        if not self.ctx.events.say_once("scaler_bypassed"):
            return
        scale = float(self.ctx.loss_scaler.scale())
        self.ctx.events.record("setup_note", "warning",
                               f"the optimizer stepped at step {self.ctx.step} on gradients the loss scaler scaled "
                               f"(by {scale:g}) and never unscaled: optimizer.step() is called instead of "
                               "scaler.step(optimizer), so every update is the gradient × the scale and no overflowing "
                               "step is skipped — call scaler.step(optimizer), then scaler.update()",
                               step=self.ctx.step, probe="optimizer", phase="optimizer", value=scale,
                               model=self.ctx.model_stepped_by(optimizer), code="scaler_bypassed")

    def _stepped_before_a_forward(self) -> None:
        """The optimizer steps before any training forward of the step, right after a step that closed without
        one: `Probes.step()` closed the step before the loop's `optimizer.step()` (the wrong order), so each update
        lands on the next step's row, and the first row has none. Said once: the statistics are not wrong by
        accident, the order is. (Both signs, not one: each alone has other causes — a step the loop skipped, forwards
        the probes do not see.)"""
        self._note_once("step_order",
                        f"the optimizer stepped at step {self.ctx.step} before any training forward of it: "
                        "probes.step() is called before optimizer.step(), so every row's update statistics and lr "
                        "belong to the step before it (the first row has none) — call probes.step() after "
                        "optimizer.step(), before zero_grad()")

    def _note_once(self, code: str, message: str, optimizer=None) -> None:
        """A warning of how the loop steps `optimizer`, the first time its check finds it. The model it steps is
        looked up only then: a walk over the optimizer's tensors, and a misused loop meets the check every step."""
        if self.ctx.events.say_once(code):
            self.ctx.events.record("setup_note", "warning", message, step=self.ctx.step, probe="optimizer",
                                   phase="optimizer", code=code,
                                   model=self.ctx.model_stepped_by(optimizer) if optimizer is not None else None)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_stepped()

    def optimizer_stepped(self) -> None:
        """The moment after an optimizer step: from the optimizer's hook, or — in a loop that gave the probes no
        optimizer to hook — from `Probes.step()`, which comes after the loop's optimizer step."""
        for probe in self._at["after_optimizer_step"]:
            probe.after_optimizer_step()

    def observe_grad_norm(self, norm: torch.Tensor | float, max_norm: float | None = None) -> None:
        """The total gradient norm the loop's clipping computed (unscaled, before clipping): the `grad_norm` column;
        the threshold it clips at (when known): `clip_max_norm`."""
        if self._gradients is not None:
            self._gradients.observe_norm(norm, max_norm)

    def observe_clip_value(self, clip_value: float) -> None:
        """The value the loop's `clip_grad_value_` clamps each gradient entry at: the `clip_value` column."""
        if self._gradients is not None:
            self._gradients.observe_clip_value(clip_value)

    def observe_loss_graph(self, output) -> None:
        """What a framework's loss hook returned before its backward (the Trainer's `compute_loss`, Lightning's
        `training_step`: a loss, a `(loss, outputs)` tuple, a dict holding one): the root of the loss's graph, walked
        only if the step's gradients turn non-finite (`loss_graph`). The loss handed to `Probes.step` is one too."""
        loss = output if torch.is_tensor(output) else output_loss(output, labelled=True)
        if torch.is_tensor(loss) and loss.grad_fn is not None:
            self.ctx.loss_roots.append(loss.grad_fn)

    def observe_terms(self, terms: dict[str, torch.Tensor | None], targets: int | None) -> None:
        """The loop's loss terms of one micro-batch (kd, ce, router) and its target count."""
        if self.loss is not None:
            self.loss.observe(terms, targets)

    def take_readings(self) -> dict[str, torch.Tensor]:
        """Every probe's device readings of this step, handed over once (the probes forget them)."""
        out: dict[str, torch.Tensor] = {}
        self.readings_taken = True
        for probe in self._at["take_readings"]:
            out.update(probe.take_readings())
        return out

    def record(self, host: dict) -> dict:
        """The step's host readings into events; returns the metrics columns."""
        metrics: dict = {}
        for probe in self._at["record"]:
            metrics.update(probe.record(host))
        return metrics

    def needs_replay(self, loss: float) -> bool:
        """The step's loss turned non-finite on a step without per-module statistics: no module is named yet.
        `loss` is the step's loss over all ranks, so under torchrun every rank decides alike — a replay runs
        the models' forwards, and a sharded teacher's forward is a collective every rank must take part in."""
        return not math.isfinite(loss) and not self.ctx.reads_modules() and self._activations is not None

    def replay_forward(self, forward, after: str = NONFINITE_LOSS) -> None:
        """Re-run one forward with per-module statistics, to name the module where a non-finite loss began (or the
        non-finite gradients, `after` says which: its events say it).

        `standard` keeps per-module statistics off on most steps; when a loss turns non-finite there, the
        loop replays the step's first micro-batch — from weights that are still the pre-step ones (the
        loss scaler skipped the step, or the policy restored them) — and the first non-finite module is
        recorded as if the statistics had been on. The failure path only: it costs one forward and a sync.
        A forward that raises part-way has what it read recorded all the same: readings taken and not recorded would
        be paired with the next step's modules (and, unmatched, fail its readings). The models' buffers are put back
        after it (`_buffers_put_back`): the replay changes nothing the run computes.
        """
        probe = self._activations
        self.ctx.replaying = True
        probe.attach()
        try:
            with torch.no_grad(), _buffers_put_back(self.ctx.models.values()):
                forward()
        finally:
            self.ctx.replaying = False
            readings = probe.take_readings()  # detaches the hooks
            host = {"activation_extremes": readings["activation_extremes"].tolist()} if readings else {}
            probe.record(host, replayed_after=after)

    def wrap(self, owner, name: str, after: Callable) -> None:
        """Replace `owner.name` (a method of a framework's object) by one that calls it, then `after(its result)`;
        put back at `close()` unless something replaced it again since."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            after(result)
            return result

        self.until_close(replace_method(owner, name, wrapper))

    def until_close(self, remove: Callable[[], None]) -> None:
        """Call `remove` (a hook's remover) at `close()`."""
        self._removers.append(remove)

    def close(self, completed: bool = False) -> None:
        """Remove every hook; a run that `completed` is concluded first (`Probe.conclude`)."""
        if completed:
            for probe in self.probes:
                probe.conclude()
        for remove in self._removers:
            remove()
        self._removers = []
        for probe in self.probes:
            probe.close()
        self.ctx.output_nodes, self.ctx.loss_roots = [], []  # the last step's graph nodes are not held past the run
        if self.ctx.activations_log is not None:
            self.ctx.activations_log.close()
            self.ctx.activations_log = None


_OPEN: dict[str, Probes] = {}  # the Probes of this process whose run directory is open, by its real path



def check_probe_settings(level: str, every: int) -> str:
    """`level` and `every` as Probes reads them — `step % every` picks the statistics steps —, checked where they are
    given: by Probes, and by the framework callbacks when they are made rather than inside the framework's train().
    Returns the level as LEVELS spell it."""
    level = chosen(level, LEVELS, "level")
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every= must be a whole number of steps, at least 1, got {every!r}")
    return level


def check_own_directory(run_dir: Path | None, framework_dirs: Iterable[tuple[str | os.PathLike | None, str]]) -> None:
    """Refuse, before training, a run directory that is one the framework writes its own files into
    (`framework_dirs`: each directory, None where unset, with what writes there): a Trainer's `save_model()` writes the
    model's config.json over the run's, and a logger's files make a fresh run directory one the probes refuse, inside
    the framework's training loop — said once, up front, with where to record instead."""
    if run_dir is None:
        return
    ours = os.path.realpath(user_path(run_dir))
    for directory, writes in framework_dirs:
        if isinstance(directory, (str, os.PathLike)) and os.path.realpath(user_path(directory)) == ours:
            raise BadInput(f"run_dir={str(run_dir)!r} is {writes}: give the probes a directory of their own, e.g. "
                           f"{str(Path(run_dir) / 'sarkd-diag')!r}")


def chosen(value: str, choices: tuple[str, ...], keyword: str) -> str:
    """`value` as `choices` spell it, typed in any case — as the CLI and DistillConfig read a choice (`--probes
    Full`) —, else a ValueError that names the keyword argument."""
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"{keyword}= must be one of {', '.join(choices)}, got {value!r}")


class Probes:
    """Probes in a user's own loop, recording into a run directory that `sarkd-diag report`, `events` and
    `load_run` read like one of `train`'s.

    models: a module (the student) or {"student": m, "teacher": t}; frozen models get forward statistics.
    optimizer: a torch optimizer or a framework's wrapper of one (accelerate's); its scaler is taken too. A loop
    with several optimizers (one per part of the model, at their own settings) passes them all, as a list.
    scaler: the `GradScaler` of an AMP loop. precision: {"mode", "requested", "reason"} where the caller
    knows better than the weights and the autocast state the probes observe. caller: "loop", "trainer",
    "accelerate" or "lightning" — the words the diagnosis's fixes are written in. sync_gradients: for a loop
    whose framework accumulates gradients over several `step()` calls, a function that is False on the calls
    that end a micro-batch without an optimizer step (accelerate's `Accelerator.sync_gradients`;
    `from_accelerator` and the Lightning callback pass one; an optimizer accelerate prepared brings its own).
    resumed_from: the step of the checkpoint the loop
    resumed from (a Trainer's `resume_from_checkpoint`, accelerate's `load_state`): steps are numbered on from it,
    and what `run_dir` recorded after it — steps redone now, or lost with a process that died — is cut away, so each
    step appears once. Without it, a `run_dir` that holds steps is continued after its last. fullgraph_models: the
    roles of models the loop calls inside a function compiled with fullgraph=True (a LightningModule's compiled
    `training_step`), where a probe hook would be an error; a model handed over compiled so is found by itself. Call
    `step()` after each optimizer step.

    Under torchrun (a process group the script joined before creating the probes), every rank holds its own
    Probes on the same `run_dir`: each writes its events to events.rank{N}.jsonl, rank 0 alone config.json,
    metrics.jsonl (the loss: the mean of the ranks'), activations.jsonl (per-module maxima over every rank) and,
    at `close()`, the summary. Every rank calls `step()` and `close()` alike: they hold collectives.
    """

    def __init__(self, models: nn.Module | dict[str, nn.Module], optimizer=None,
                 scaler: torch.amp.GradScaler | None = None, *, run_dir: str | Path | None = None,
                 level: str = "standard", every: int = 10, precision: dict | None = None, caller: str = "loop",
                 sync_gradients: Callable[[], bool] | None = None, resumed_from: int | None = None,
                 fullgraph_models: Iterable[str] = ()):
        level, caller = check_probe_settings(level, every), chosen(caller, CALLERS, "caller")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(f"scaler= must be the loop's loss scaler (a torch.amp.GradScaler), got a "
                            f"{type(scaler).__name__}")
        if resumed_from is not None and (not isinstance(resumed_from, int) or resumed_from < 0):
            raise ValueError(f"resumed_from= must be the step of a checkpoint (an int >= 0), got {resumed_from!r}")
        given = _by_role(models)
        models = {name: unwrap_model(m) for name, m in given.items()}
        callers = {name: m for name, m in given.items() if compiled_as_one_graph(m)}
        callers.update((name, None) for name in fullgraph_models if name not in callers)
        unwrapped = [unwrap_optimizer(o) for o in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer])]
        optimizers = [o for o, _ in unwrapped if o is not None]
        self._gradient_state = accumulation_state(optimizer)
        sync_gradients = sync_gradients or accumulation_clock(self._gradient_state)
        optimizer = optimizers[0] if len(optimizers) == 1 else Optimizers(optimizers) if optimizers else None
        wrapped_scaler = next((s for _, s in unwrapped if s is not None), None)
        self.scaler = LossScaler(scaler if scaler is not None else wrapped_scaler)
        self.caller, self._precision_override = caller, precision or {}
        self._sync_gradients = sync_gradients
        self.run_dir = user_path(run_dir) if run_dir is not None else None
        self.ranks = Ranks.joined()
        events = events_file_name(self.ranks.rank, self.ranks.size)
        stale = None
        if self.run_dir is not None:
            self._check_run_dir()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stale = self._close_a_stale_probes()
            if resumed_from is not None:  # before the logs open for appending
                self._cut_to(resumed_from, events)
        self.events = EventLog(self.run_dir / events if self.run_dir else None, rank=self.ranks.rank)
        if self.run_dir is not None:
            self.events.said_before(row["code"] for row in _read_rows(self.run_dir / events) if row.get("code"))
        self.critical = False  # a weight turned non-finite: training is ruined from here on
        self.events.on_event(self._watch_for_ruin)
        activations = JsonlLog(self.run_dir / "activations.jsonl") \
            if self.run_dir is not None and self.ranks.is_main else None
        self.set = ProbeSet(ProbeContext(models, self.events, optimizer, self.scaler, level, every,
                                         activations_log=activations, gather=self.ranks.gather, callers=callers),
                            replays_steps=caller != "trainer" and not self.ranks.distributed)
        self._metrics = NullLog()  # the run directory's metrics log once it is open
        try:
            self._start(stale, resumed_from)
        except BaseException:  # a Probes that fails to build leaves no hook on the model, the optimizer or torch
            self.set.close()
            self.events.close()
            self._metrics.close()
            raise
        if self.run_dir is not None:  # built: the next Probes on this directory closes it if it is left open
            _OPEN[os.path.realpath(self.run_dir)] = self

    def _start(self, stale: int | None, resumed_from: int | None) -> None:
        """The hooks beyond the probes' own, the run directory opened (numbered on after `resumed_from`, else after its
        last step), the checks before the first step."""
        if self.set.loss is not None:
            self.set.loss.watch_model_outputs()
            self.set.until_close(watch_loss_function("kl_div", self.set.loss.read_kl_div))
            self.set.until_close(watch_loss_function("cross_entropy", self.set.loss.read_cross_entropy))
        if self.set.probes:
            self.set.until_close(watch_gradient_clipping(self._before_clipping))
        self.rows: list[dict] = []  # the metrics rows, kept here only without a run directory (else in its file)
        self._steps_recorded = 0
        self._last_train_loss: float | None = None  # the training loss of the last step closed
        self._steps_skipped = 0  # steps the caller's loop skipped on purpose (`step(skipped=True)`)
        self._micro_batch_calls = 0  # step() calls of the step under way that closed no step (accumulation)
        self._steps_reaching_the_optimizer = 0
        self._closed, self._closed_as = False, None  # closed: with which status (an evaluation after keeps it)
        first_step = 1
        if self.run_dir is not None:
            first_step = self._open_run_dir()
        if resumed_from is not None:
            first_step = resumed_from + 1
        self.first_step = first_step  # after the checkpoint resumed from, else after the last step the directory holds
        self._precision_written = None
        self._autocast_written = self.ctx.autocast
        self._write_config()
        if resumed_from is None and first_step > 1:
            self.events.record("setup_note", "info", f"a new training run continues this run directory at step "
                               f"{first_step} (a second train() or fit, a hyperparameter-search trial, a script run "
                               f"again): its loss starts afresh here, and the diagnosis judges its trend on its own",
                               code="run_continued", step=first_step, probe="loop")
        if stale is not None:
            self.events.record("setup_note", "warning", f"a Probes of this process on this run directory was still "
                               f"open after step {stale} (its loop never closed it: an error or an interrupt out of "
                               f"the loop): closed as interrupted, its hooks removed; this one continues the run at "
                               f"step {first_step}", code="stale_probes_closed", step=first_step, probe="loop")
        compiled = recompile_with_hooks(m for name, m in self.ctx.models.items()
                                        if not self.ctx.sealed(name)) if self.set.probes else []
        if compiled:
            forwards = ", ".join(f"{name}.forward" for name in compiled)
            self.events.record("setup_note", "info", f"torch.compile had compiled {forwards} before the probes' hooks "
                               "existed — for a watched model, or another of its class earlier in this process — and "
                               "a compiled call runs that code without noticing hooks added later: dynamo's caches "
                               "were reset (torch._dynamo.reset()), so a compiled call compiles again, once, with them",
                               code="compiled_before_probes", step=first_step, probe="loop")
        self._note_compiled_fullgraph(first_step)
        self._check_scaler_dtypes(first_step)
        self._check_optimizer_given(first_step)
        if self.ctx.optimizer is not None:
            self._check_unoptimized(first_step)
        if self._gradient_state is not None and self.set.probes and self.caller != "trainer":
            self._watch_accumulation()  # the Trainer accumulates in its own loop, not the caller's
        self.set.begin_step(first_step)

    @classmethod
    def from_accelerator(cls, accelerator, model: nn.Module | dict[str, nn.Module], optimizer, *,
                         teacher: nn.Module | None = None, **kwargs) -> Probes:
        """Probes for an accelerate loop: the prepared model (or models by role, as `Probes` takes them: a projection
        the optimizer trains beside the student, `{'student': model, 'projection': projection}`) and optimizer, the
        Accelerator's loss scaler,
        its mixed-precision setting (its autocast wraps the model's forward, out of the hooks' sight) and its
        gradient accumulation (under `accelerator.accumulate`, a step is an optimizer step, not a batch). A setting
        the Accelerator does not apply on this device (`native_amp` off: "fp16" on the CPU runs with neither autocast
        nor a loss scaler) is recorded as asked, and the mode is what the weights compute in."""
        models = {role: accelerator.unwrap_model(m) for role, m in _by_role(model).items()}
        if teacher is not None:
            models["teacher"] = accelerator.unwrap_model(teacher)
        mode = {"fp16": "mixed", "bf16": "bf16-mixed"}.get(str(accelerator.mixed_precision))
        requested = f"Accelerator(mixed_precision={accelerator.mixed_precision!r})"
        precision = None
        if mode and getattr(accelerator, "native_amp", True):
            precision = {"mode": mode, "requested": requested, "reason": "the Accelerator's setting"}
        elif mode:
            precision = {"requested": requested, "reason": f"{requested}, which the Accelerator runs without autocast "
                                                           "or a loss scaler on this device: the weights' dtype is "
                                                           "what the run computes in"}
        kwargs.setdefault("precision", precision)
        kwargs.setdefault("caller", "accelerate")
        kwargs.setdefault("sync_gradients", lambda: accelerator.sync_gradients)
        probes = cls(models, optimizer, accelerator.scaler, **kwargs)
        probes.watch_accelerator(accelerator)
        return probes

    def _watch_accumulation(self) -> None:
        """`Accelerator(gradient_accumulation_steps=N)` divides every loss `accelerator.backward` is given by N, for
        N batches an optimizer step — which `with accelerator.accumulate(model):` makes so, by skipping the
        optimizer's step on the others. A loop that never enters it has the optimizer step on every batch (accelerate
        syncs whenever it is not told otherwise), each update from 1/N of the batch's gradient. Read off the optimizer
        accelerate prepared (`from_accelerator`, or `Probes` handed it): each batch runs at least one training forward
        of the trained model, so an optimizer step after fewer than N of them came after fewer than N batches. Noted
        once, at the first such step — not at an epoch's last batch, where accelerate ends a short accumulation
        itself — in the Accelerator's terms."""
        state = self._gradient_state

        def check(*_) -> None:
            forwards, steps = self.ctx.training_forwards, state.num_steps
            if 0 < forwards < steps and not state.end_of_dataloader and self.events.say_once("accumulation_unmatched"):
                self._accumulation_unmatched(forwards, steps)

        for optimizer in optimizers_of(self.ctx.optimizer):
            self.set.until_close(optimizer.register_step_pre_hook(check).remove)

    def _accumulation_unmatched(self, forwards: int, steps: int) -> None:
        step = self.ctx.step
        self.events.record("setup_note", "warning",
                           f"the optimizer stepped at step {step} after {counted(forwards, 'batch')}, while "
                           f"Accelerator(gradient_accumulation_steps={steps}) divides each loss accelerator.backward "
                           f"is given by {steps}: the update has {forwards}/{steps} of the gradient the batches "
                           f"make (SGD's step {steps / forwards:g}× smaller; the norm a clipping threshold meets with "
                           "it) — run each batch's forward, backward and optimizer step inside `with "
                           "accelerator.accumulate(model):`, which steps the optimizer on the last of "
                           f"every {steps} batches only, or pass the number of batches the loop accumulates as "
                           "gradient_accumulation_steps", step=step, probe="optimizer", phase="optimizer",
                           code="accumulation_unmatched", value=float(steps))

    def watch_accelerator(self, accelerator) -> None:
        """Read the gradients when accelerate has them complete: at `accelerator.unscale_gradients`, which its
        `clip_grad_norm_` and `clip_grad_value_` call before they clip (the Trainer clips every step, to
        `max_grad_norm` or to inf for its logged norm). At the optimizer's pre-step hook they are clipped already,
        and clipping by a NaN total norm turns every tensor's gradient NaN: the module a NaN came from is lost.
        `clip_grad_norm_`'s return — the total norm before clipping — becomes the `grad_norm` column. Only on a
        step that ends an accumulation (`accelerator.sync_gradients`); the methods are restored at `close()`."""
        if self.set.probes:
            self.set.wrap(accelerator, "unscale_gradients", after=lambda _: (
                self.set.gradients_ready() if accelerator.sync_gradients else None))
            self.set.wrap(accelerator, "clip_grad_norm_", after=lambda norm: (
                self.set.observe_grad_norm(norm) if accelerator.sync_gradients and norm is not None else None))

    def _before_clipping(self, parameters: list, total_norm: torch.Tensor | None, threshold: float | None) -> None:
        """torch is about to clip gradients, by `total_norm` at `threshold` (max_norm), or (None) each entry by value
        at `threshold` (clip_value) (`clipping.py`): read them first, once no longer scaled — also on a micro-batch of
        accumulation that ends no step (a loop that clips every micro-batch): clipped by the NaN total norm of one
        tensor's NaN, every gradient would be NaN by the step's end, the tensor it came from lost; the step's reading
        then keeps this one's non-finite tensors (`GradientProbe.gradients_ready`). On the step's last micro-batch,
        keep the norm as `grad_norm`, the threshold as `clip_max_norm` (a fix that would tell the loop to clip knows
        it already does) or `clip_value`."""
        if not self.set.watches_any(parameters):
            return
        ends_step = self._sync_gradients is None or self._sync_gradients()
        if not self.set.gradients_unscaled():
            if ends_step and self.events.say_once("clip_before_unscale"):
                self._clipped_while_scaled()
            return
        self.set.gradients_ready()  # a micro-batch's too: clipped by a NaN total norm, every gradient would be NaN
        if not ends_step:
            return
        if total_norm is not None:
            self.set.observe_grad_norm(total_norm, threshold)
        elif threshold is not None:
            self.set.observe_clip_value(threshold)

    def _clipped_while_scaled(self) -> None:
        """The loop clips gradients the loss scaler still scales — `clip_grad_norm_` or `clip_grad_value_` before
        `scaler.unscale_` — so it clips their values × the scale: gradients the threshold should leave alone are cut,
        and after the scaler unscales them each is about scale× smaller than the threshold meant. Said once, with the
        scale (read once)."""
        scale = self.ctx.loss_scaler.scale()
        scale = None if scale is None else float(scale)
        self.events.record("setup_note", "warning",
                           f"the loop clips the gradients at step {self.ctx.step} while the loss scaler still scales "
                           f"them (by {scale}): clipping before scaler.unscale_(optimizer) clips the scaled values, "
                           "and once unscaled the gradients are ~scale× smaller than the threshold meant — "
                           "call scaler.unscale_(optimizer) before clipping", step=self.ctx.step, probe="gradients",
                           phase="backward", code="clip_before_unscale", value=scale)

    @property
    def ctx(self) -> ProbeContext:
        return self.set.ctx

    @property
    def closed(self) -> bool:
        return self._closed

    def _watch_for_ruin(self, event) -> None:
        self.critical = self.critical or event.kind in ("nonfinite_param", "nonfinite_at_load")

    # ------------------------------------------------------------------------ the run directory
    def _check_run_dir(self) -> None:
        """Refuse, before any hook is placed or file written, a run directory the probes may not write
        (`contract.rundir.probes_run_dir_problem`): BadInput, a ValueError. Rank 0 decides for the job."""
        from ..contract.rundir import probes_run_dir_problem

        job = self.ranks.gather(os.getpid())
        problem = probes_run_dir_problem(self.run_dir, besides=job) if self.ranks.is_main else None
        problem = self.ranks.broadcast(problem)
        if problem:
            raise BadInput(problem)

    def _note_compiled_fullgraph(self, step: int) -> None:
        """Say which models run inside a graph compiled with fullgraph=True, and what of them goes unread there."""
        wrapped = [name for name in self.ctx.models if self.ctx.sealed(name) and self.ctx.called(name) is not None]
        inside = [name for name in self.ctx.models if self.ctx.sealed(name) and self.ctx.called(name) is None]
        if not self.set.probes or not (wrapped or inside):
            return
        said = []
        if wrapped:
            said.append(f"{' and '.join(wrapped)}: the hooks stay outside its compiled forward — its inputs, "
                        "loss, gradients and weights are read, its modules' outputs only where a step whose gradients "
                        "or loss turn non-finite is replayed (the model run eagerly, uncompiled), not on statistics "
                        "steps")
        if inside:
            said.append(f"{' and '.join(inside)}, called inside a compiled function: no hook runs in its forwards — "
                        "its gradients, weights and the step's loss are read, its inputs and modules' outputs are not, "
                        "so a non-finite value made there is found, not placed at its module")
        self.events.record("setup_note", "warning", "compiled with fullgraph=True, where a graph break is an error "
                           "and every probe hook (run eagerly) is one: " + "; ".join(said) + " — compile without "
                           "fullgraph=True for per-module statistics", code="compiled_fullgraph", step=step,
                           probe="loop")

    def _close_a_stale_probes(self) -> int | None:
        """Close the Probes of this process that still holds this run directory open, never closed — a notebook cell
        run again after its loop failed, a Trainer run again after an interrupt — and take its place: its hooks stayed
        on the model and recorded every event a second time, into the same logs. Returns its last step, if any."""
        stale = _OPEN.get(os.path.realpath(self.run_dir))
        if stale is None or stale._closed:
            return None
        stale.close("interrupted")
        return stale.ctx.step - 1

    def _open_run_dir(self) -> int:
        """Open the metrics log (continuing the run the directory holds); returns the first step to record, as
        rank 0 reads it before it writes a row."""
        metrics = self.run_dir / "metrics.jsonl"
        first = None
        if self.ranks.is_main:
            first = max((row.get("step", 0) for row in _read_rows(metrics)), default=0) + 1
        self._metrics = JsonlLog(metrics) if self.ranks.is_main else NullLog()
        return self.ranks.broadcast(first)

    def _cut_to(self, step: int, events: str) -> None:
        """The run directory cut back to the checkpoint of `step` (`drop_steps_after`): each rank its own events, rank 0
        the logs it alone writes and the summary of the run before, so a resume that dies unfinished reads as crashed
        (as `--resume` does)."""
        from ..contract.rundir import drop_steps_after

        drop_steps_after(self.run_dir / events, step)
        if self.ranks.is_main:
            for name in ("metrics.jsonl", "activations.jsonl"):
                drop_steps_after(self.run_dir / name, step)
            (self.run_dir / "summary.json").unlink(missing_ok=True)

    def begin_step(self, step: int) -> None:
        """Number the step about to run (the Trainer's `global_step + 1`); by default steps count from 1."""
        self.set.begin_step(step)

    def step(self, loss: torch.Tensor | float | None = None, labels: torch.Tensor | None = None, *,
             terms: dict[str, torch.Tensor | float] | None = None, skipped: bool = False) -> dict | None:
        """Close the current step (after optimizer.step, before zero_grad): one host transfer, events recorded.

        `loss`: what the loop optimises — the reduced loss as a tensor, a number (`loss.item()`) or the model's
        outputs; a loss per sample is refused (TypeError). Without it, the mean loss of the step's training forwards
        as the model returned it. `labels`: the step's labels, to tell a batch without targets; without them, the labels
        the model was called with. `terms`: the parts of `loss` by name (`{"kd": kd, "ce": ce}`, each as `loss` is
        taken), so a non-finite value is named by the term that made it; `kd` and `ce` are read as a divergence and a
        cross-entropy, and one below 0 is no such thing. Returns the step's metrics row — or None on a micro-batch of
        gradient accumulation (`sync_gradients` False): its loss joins the step's, whose gradients are still partial.
        A loss handed only to a step's last call, after several micro-batches, is said (`_loss_handed_once`).
        `skipped`: the loop skipped this step's backward and update on purpose (a guard that drops a batch;
        Lightning's `training_step` returning None): recorded as skipped, its missing gradients no sign of a loss
        cut off from the weights.
        """
        loss = None if loss is None else caller_loss(loss)  # refused at every level, not only where it is read
        terms = self._caller_terms(terms, loss)
        closes = self._sync_gradients is None or self._sync_gradients()
        handed_once = closes and loss is not None and self._one_call_for_micro_batches()
        # the model's own loss of the step's last micro-batch: the losses it returned for each are the step's
        returned = handed_once and not terms and self.set.loss is not None and self.set.loss.returned_last(loss)
        if loss is not None and self.set.loss is not None and not returned:
            self.set.loss.observe_caller_loss(loss, labels, terms)
        if not closes:
            self._micro_batch_calls += 1
            return None
        self._micro_batch_calls = 0
        self.ctx.caller_skipped = skipped
        self.set.gradients_ready()  # no optimizer hook ran (no optimizer given, or the step was skipped early)
        if self.ctx.optimizer is None or (self.set.several_optimizers and self.set.optimizer_stepping):
            self.set.optimizer_stepped()  # the weights after the loop's optimizer step(s), read here
        optimizer = self.ctx.optimizer
        self.set.closed_without_optimizer_step = optimizer is not None and not self.set.lr_read  # no pre-step hook
        self._steps_reaching_the_optimizer += self.set.lr_read
        lr = self.ctx.lr if self.set.lr_read or optimizer is None else group_lr(optimizer.param_groups[0])
        readings = self.set.take_readings()
        if torch.is_tensor(lr):  # a tensor lr joins the step's one transfer
            readings["lr"] = lr
        (host,) = to_host(readings)
        lr = host.pop("lr", lr)
        metrics = self.set.record(host)
        self.set.replay_if_loss_nonfinite(metrics.get("loss"))
        if self.ranks.distributed:  # the step's loss is every rank's batch's: their mean (one small gather)
            losses = [loss for loss in self.ranks.gather(metrics.get("loss")) if loss is not None]
            metrics["loss"] = sum(losses) / len(losses) if losses else None
        step = self.ctx.step
        if handed_once:
            self._loss_handed_once(step, recovered=returned)
        if metrics.get("loss") is None and self.ctx.trained and not skipped:
            self._loss_unseen(step)
        elif loss is None and metrics.get("loss") is not None:
            self._loss_without_the_teacher(step)
        row = {"step": step, "split": "train", "loss": None, "lr": lr, "loss_scale": None,
               **dict.fromkeys(NOT_SEEN_IN_A_USER_LOOP), **metrics}
        if not self._steps_recorded:
            self._check_requested_autocast()
            self._check_unscaled_fp16_compute()
        if self.ctx.trained and self.ctx.stats_step and self.events.say_once("frozen_model_unseen"):
            self._frozen_models_unseen(step)
        self._steps_recorded += 1
        self._last_train_loss = row["loss"]
        if skipped:
            row["skipped"] = 1
            self._steps_skipped += 1
            self.events.record("caller_skip", "info", f"step {step} was skipped by the training loop (no backward, "
                               "no update; in Lightning, `training_step` returned None)", step=step, phase="optimizer",
                               probe="optimizer", code="caller_skipped_step")
        if self.run_dir is None:
            self.rows.append(row)
        else:
            self._metrics.write_line(json.dumps(row))
            if self.ctx.autocast is not self._autocast_written:
                self._write_config()  # a training forward showed autocast: the mode is known now
        self.set.begin_step(step + 1)
        return row

    @staticmethod
    def _caller_terms(terms: dict | None, loss: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`step(terms=...)` as tensors, refused where they cannot be read: a term is a part of the loss handed over
        with them, one value each, under a name of its own (`loss` is the total's)."""
        if not terms:
            return {}
        if loss is None:
            raise TypeError("terms are the parts of the loss the loop optimises: pass it too, "
                            "probes.step(loss=loss, terms=...)")
        if "loss" in terms or not all(isinstance(name, str) for name in terms):
            raise ValueError(f"terms are named by strings other than 'loss' (the total's name), not {list(terms)}")
        return {name: caller_loss(value) for name, value in terms.items()}

    def _frozen_models_unseen(self, step: int) -> None:
        """The run's first statistics step that trained read no module output of a frozen model the probes watch (a
        teacher, DPO's reference): what that model hands the loss was computed where no probe looks — before training
        (TRL's `precompute_ref_log_probs` runs the reference in the trainer's constructor), or cached — so none of its
        modules is read, and a non-finite value it made shows only in the loss. Said once, on the first such step."""
        for name in self.ctx.models:
            if not self.ctx.trains(name) and not self.ctx.sealed(name) and name not in self.set.models_read():
                self.events.record("setup_note", "info",
                                   f"{name} ran no training forward in step {step}: it is not used yet, or the "
                                   "outputs of it that the loss uses were computed before the probes watched "
                                   "(precomputed before training, as TRL's precompute_ref_log_probs does, or cached), "
                                   "so none of its modules is read and a non-finite value it made shows only in the "
                                   "loss",
                                   step=step, probe="forwards", phase="forward", model=name,
                                   code="frozen_model_unseen")

    def _one_call_for_micro_batches(self) -> bool:
        """The step about to close under accelerate's gradient accumulation had several training forwards of the
        trained model and this is its only `step()` call: the loop calls it only where `accelerator.sync_gradients`
        (where loops log), so the micro-batches' losses were never handed over. The Trainer hands its step's summed
        loss once by design."""
        state = self._gradient_state
        return (self.caller != "trainer" and state is not None and state.num_steps > 1
                and self._micro_batch_calls == 0 and self.ctx.training_forwards > 1)

    def _loss_handed_once(self, step: int, recovered: bool) -> None:
        """Say once that a step's loss came in one `step(loss=...)` call for all its micro-batches: `recovered`, the
        loss handed over was the model's own of the last micro-batch, and the row holds the mean of the losses the
        model returned in the step instead; else the row holds what was handed over, which is one micro-batch's
        unless the loop combined them itself."""
        if not self.events.say_once("loss_handed_once"):
            return
        forwards, steps = self.ctx.training_forwards, self._gradient_state.num_steps
        held = (f"it was the last micro-batch's loss as the model returned it, and the row holds the mean of the "
                f"losses the model returned in the step's {forwards} training forwards instead" if recovered else
                "the row holds it as the step's loss — one micro-batch's, unless the loop combined them")
        self.events.record("setup_note", "info" if recovered else "warning",
                           f"step {step} was handed its loss in its only probes.step() call, after {forwards} training "
                           f"forwards under Accelerator(gradient_accumulation_steps={steps}): {held} — call "
                           "probes.step(loss=loss) after every micro-batch's backward, inside "
                           "`accelerator.accumulate`; its row's loss is then the step's mean",
                           step=step, probe="loss", phase="loss",
                           code="loss_handed_once", value=float(forwards))

    def _loss_unseen(self, step: int) -> None:
        """A step that trained closed with no loss: none given to `step()`, and the model's outputs hold none (called
        without labels — a loop that computes its own loss, a KD term from the logits). Without it a non-finite loss,
        a climb or a blow-up is never seen, and a NaN the loss code makes reaches the diagnosis as gradients that
        turned NaN. Said once, in the caller's terms: a Lightning module hands its loss over by returning it."""
        if self.events.say_once("loss_unseen"):
            given, remedy = (
                ("`training_step` returned none", "return it from `training_step`") if self.caller == "lightning"
                else ("probes.step() was given none", "pass the loss the loop optimises: probes.step(loss=loss)"))
            self.events.record("setup_note", "warning",
                               f"step {step} closed with no loss: {given} and the model's outputs hold none (it was "
                               "called without labels): a non-finite loss, or one that climbs or blows up, goes "
                               f"unseen, and a NaN the loss code makes reads as gradients gone NaN — {remedy}",
                               step=step, probe="loss", phase="loss", code="loss_unseen")

    def _loss_without_the_teacher(self, step: int) -> None:
        """The step's loss was read off the student's outputs (`step()` was given none) while a frozen model it
        distils from ran its training forwards: the rows hold the student's own loss, not the objective its backward
        ran — a KD term that turns non-finite (a teacher's overflow) or climbs leaves them finite and calm. Said once,
        in a caller's loop (the frameworks' callbacks hand the step's loss over)."""
        frozen = [name for name in self.ctx.models
                  if not self.ctx.trains(name) and self.ctx.training_forward.get(name)]
        if frozen and self.caller in ("loop", "accelerate") and self.events.say_once("loss_without_teacher"):
            self.events.record("setup_note", "info",
                               f"step {step}'s loss is the student's own `loss` output (probes.step() was given none) "
                               f"while {' and '.join(frozen)} ran in its training: a distillation objective that adds "
                               f"{' and '.join(frozen)}'s terms is not what the rows hold, and a term of it that turns "
                               "non-finite or climbs goes unseen there — pass the loss the loop optimises: "
                               "probes.step(loss=loss)", step=step, probe="loss", phase="loss",
                               code="loss_without_teacher")

    def evaluation(self, step: int, loss: torch.Tensor | float, perplexity: float | None = None, *,
                   cross_entropy: bool = True, eval_set: str | None = None) -> dict:
        """Record an evaluation after `step` as the run directory's eval row (`eval_loss`, `eval_ppl`): what the
        summary's perplexities, the report's evaluations and the figure's evaluation loss read. `loss`: the mean
        loss on the evaluation data (a number or a one-value tensor); `perplexity` defaults to its exp — NaN for a NaN
        loss, not Infinity — where the loss is a per-token cross-entropy; `cross_entropy=False` (a distillation
        objective, whose exp is no perplexity) leaves `eval_ppl` unmeasured. After `close()` (a Trainer's `evaluate()`
        after `train()`) the row is appended still, and the closed run's summary and report are rebuilt with it.
        `eval_set` names the evaluation data where a run evaluates on several (the summary's perplexities are the
        first set's). Returns the row."""
        loss = caller_loss(loss).item()
        row = {"step": step, "split": "eval", "eval_set": eval_set, "eval_loss": loss}
        if not math.isfinite(loss) and self._trains_finite() and self.events.say_once("nonfinite_eval"):
            self._nonfinite_evaluation(step, loss, eval_set)
        if perplexity is not None or cross_entropy:
            row["eval_ppl"] = numerics.perplexity(loss) if perplexity is None else float(perplexity)
        if self.run_dir is None:
            self.rows.append(row)
        elif not self._closed:
            self._metrics.write_line(json.dumps(row))
        elif self.ranks.is_main:
            from ..presentation.closing import finalize_run

            metrics = JsonlLog(self.run_dir / "metrics.jsonl")
            metrics.write_line(json.dumps(row))
            metrics.close()
            finalize_run(self.run_dir, self._closed_as)
        return row

    def _trains_finite(self) -> bool:
        """The last step closed had a finite training loss, and no weight has turned non-finite."""
        return self._last_train_loss is not None and math.isfinite(self._last_train_loss) and not self.critical

    def _nonfinite_evaluation(self, step: int, loss: float, eval_set: str | None) -> None:
        """An evaluation's loss is non-finite where training's is finite over finite weights: evaluation computes what
        training does not, and the probes read no evaluation forward (they are no training forwards) — without this
        the run reads as healthy beside a NaN evaluation. Said once; into a closed run's events too (an `evaluate()`
        after `train()`), before its summary is rebuilt."""
        events = self.events
        if self._closed:
            events = EventLog(self.run_dir / events_file_name(self.ranks.rank, self.ranks.size), rank=self.ranks.rank)
        of_set = f" on {eval_set}" if eval_set else ""
        events.record("nonfinite_eval", "warning",
                      f"the evaluation after step {step}{of_set} has a loss of {loss} while training's last loss was "
                      f"finite ({self._last_train_loss:.4g}) and every weight is: evaluation computes what training "
                      "does not — a cast for evaluation (the Trainer's fp16_full_eval, a model.half() before "
                      "evaluating), the model in eval mode (no dropout), or its data (a batch with no target token) — "
                      "and the probes read no evaluation forward: evaluate in the precision training uses to tell",
                      step=step, phase="eval", probe="loss", value=loss)
        if events is not self.events:
            events.close()

    def _check_unoptimized(self, step: int) -> None:
        """Trainable tensors of a model the optimizer trains that none of its parameter groups holds: a second
        optimizer the probes were not given (they watch only what they are given), or a layer left out by mistake."""
        held_tensors = [p for group in self.ctx.optimizer.param_groups for p in group["params"]]
        held = set(map(id, held_tensors))
        trainable = {name: [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                     for name, model in self.ctx.models.items()}
        # a framework that steps flat copies of the weights (DeepSpeed's ZeRO partitions) holds plain tensors, never
        # a module's Parameter: only an optimizer of Parameters, none of them these models', was built from others
        if (held and all(isinstance(p, nn.Parameter) for p in held_tensors)
                and not any(id(p) in held for params in trainable.values() for _, p in params)):
            if not self._holds_frozen_model(held, trainable, step):
                self._optimizes_none_of_them(trainable, step)
            return
        holds_instead = [name for name, params in trainable.items() if any(id(p) in held for _, p in params)]
        # built over another model's tensors (a teacher left trainable) and none of the student's
        if holds_instead and trainable.get("student") and "student" not in holds_instead:
            self._optimizes_none_of_them({"student": trainable["student"]}, step, holds_instead[0])
            return
        for name, params in trainable.items():
            left = [n for n, p in params if id(p) not in held]
            if left and len(left) < len(params):
                self.events.record("setup_note", "warning",
                                   f"{len(left)} of {name}'s {len(params)} trainable tensors (e.g. {left[0]}) are in "
                                   "no parameter group of the optimizer the probes were given: nothing of them is "
                                   "watched — a second optimizer? Pass every one: optimizer=[...]",
                                   step=step, probe="optimizer", model=name, tensor=left[0], code="unwatched_params")
        owned = {id(p) for model in self.ctx.models.values() for p in model.parameters()}
        loose = [p for p in held_tensors if p.requires_grad and id(p) not in owned]
        if loose:
            self._optimizer_tensors_unwatched(loose, step)

    def _optimizer_tensors_unwatched(self, loose: list, step: int) -> None:
        """The optimizer trains tensors of no model the probes were given (a projection head, a learned temperature
        beside the student): their gradients and weights are not read. A NaN gradient made there reaches the watched
        models only through the update — or at once through clipping, whose NaN total norm makes every gradient NaN —
        and would be read as theirs (the optimizer blamed for weights gone NaN from finite gradients). Said before the
        first step, with what to pass instead, in the caller's terms."""
        shapes = ", ".join("×".join(map(str, p.shape)) or "scalar" for p in loose[:3])
        remedy = {
            "accelerate": "pass the module that holds them with the models by role: Probes.from_accelerator("
                          "accelerator, {'student': model, 'projection': projection}, optimizer)",
            "lightning": "hold them in a child module of the LightningModule (self.projection = nn.Linear(...)): "
                         "each child that trains is watched under its attribute's name",
            "trainer": "hold them in a submodule of the model the Trainer trains (model.projection = "
                       "nn.Linear(...)), where they are watched as the student's",
        }.get(self.caller, "pass the module that holds them with the models by role: "
                           "Probes({'student': model, 'projection': projection}, optimizer)")
        self.events.record("setup_note", "warning",
                           f"the optimizer trains {counted(len(loose), 'tensor')} (shaped {shapes}"
                           f"{', …' if len(loose) > 3 else ''}) of no model the probes were given: their gradients "
                           "and weights are not read, and a NaN made there would be read as the models' own (through "
                           f"the update, or a clipping by its NaN total norm) — {remedy}",
                           step=step, probe="optimizer", numel=len(loose), code="optimizer_tensors_unwatched")

    def _holds_frozen_model(self, held: set[int], trainable: dict[str, list], step: int) -> bool:
        """The optimizer holds a model's own tensors and the model has no trainable tensor at all: it was frozen (a
        `requires_grad_(False)` meant for the teacher) — not an optimizer built from other parameters. Backward gives
        them nothing; said at the model frozen, not at another model that happens to be trainable (a teacher left
        unfrozen). (A model with trainable tensors the optimizer lacks — adapters added after it was built over the
        base they froze — is the other case.) Unless the model frozen is the teacher and the student is trainable:
        then the optimizer was built over the wrong model (`AdamW(teacher.parameters())`), and unfreezing the
        teacher is no fix — said at the student, as an optimizer built from the teacher's parameters."""
        for name, model in self.ctx.models.items():
            frozen = [n for n, p in model.named_parameters() if id(p) in held]
            if frozen and not trainable[name] and name != "student" and trainable.get("student"):
                self._optimizes_none_of_them({"student": trainable["student"]}, step, name)
                return True
            if frozen and not trainable[name]:
                self.events.record("setup_note", "warning",
                                   f"the optimizer holds {len(frozen)} of {name}'s tensors (e.g. {frozen[0]}) and "
                                   f"none of them requires grad: {name} is frozen, so backward gives them no "
                                   "gradient and nothing of it trains", step=step, probe="optimizer", model=name,
                                   tensor=frozen[0], numel=len(frozen), code="optimizer_holds_frozen")
                return True
        return False

    def _optimizes_none_of_them(self, trainable: dict[str, list], step: int, instead: str | None = None) -> None:
        """The optimizer holds parameters, but not one trainable tensor of the models given: built from another
        model, a copy, or before the model was re-created or wrapped (adapters added after the optimizer was made
        are trainable tensors it never saw). Or (`instead`) it holds only another watched model's — the teacher's,
        left trainable — and none of the student's. Its step changes nothing of them: the loss cannot move."""
        name, params = next(((n, ps) for n, ps in trainable.items() if ps), (None, []))
        if name is None:
            return  # nothing the probes were given is trainable: nothing for the optimizer to miss
        built_from = f"{instead}'s parameters" if instead else "other parameters"
        self.events.record("setup_note", "warning",
                           f"the optimizer holds none of {name}'s {len(params)} trainable tensors (e.g. {params[0][0]})"
                           f" — it was built from {built_from}: its steps change nothing of {name}",
                           step=step, probe="optimizer", model=name, tensor=params[0][0], numel=len(params),
                           code="unoptimized_models")

    def _check_optimizer_stepped(self) -> None:
        """Steps closed, and not one reached the optimizer given (its pre-step hook, or a loss scaler's unscale — so
        a step the scaler skips counts as reached): `optimizer.step()` is never called — missing, or behind a
        condition that never holds (an accumulation count larger than the run) — and nothing trained. Or every step
        closed was one the loop skipped on purpose (`step(skipped=True)`): a guard that drops every batch, a
        `training_step` that never returns its loss."""
        if self._steps_recorded >= 2 and self._steps_skipped == self._steps_recorded:
            self.events.record("setup_note", "warning",
                               f"every one of the {self._steps_recorded} steps closed was skipped by the training "
                               "loop (in Lightning, `training_step` returned None): nothing trained",
                               step=self.ctx.step - 1, probe="optimizer", numel=self._steps_recorded,
                               code="every_step_skipped")
            return
        if self.ctx.optimizer is None or self._steps_reaching_the_optimizer or self._steps_recorded < 2:
            return
        w = next(iter(self.ctx.watched), None)
        self.events.record("setup_note", "warning",
                           f"not one of the {self._steps_recorded} steps closed by probes.step() reached the "
                           "optimizer: optimizer.step() was never called, and no weight changed",
                           step=self.ctx.step - 1, probe="optimizer", model=w.model if w else None,
                           tensor=w.tensor if w else None, numel=self._steps_recorded, code="optimizer_never_stepped")

    def _check_optimizer_given(self, step: int) -> None:
        """Without the optimizer the weights are still read at each `step()`, but what only its hooks and
        settings show is not: the eps and update-size preflight, update ratios, lost updates, optimizer state."""
        if self.ctx.optimizer is None and self.ctx.watched:
            self.events.record("setup_note", "info",
                               "no optimizer given to Probes: the weights are read at each step(), but the "
                               "optimizer's checks (eps and update size before the first step, update ratios, "
                               "lost updates, its state's underflow) need it — pass optimizer=",
                               step=step, probe="optimizer")

    def _check_scaler_dtypes(self, step: int) -> None:
        """A loss scaler over float16 weights: GradScaler refuses to unscale float16 gradients, so the first
        optimizer step raises "Attempting to unscale FP16 gradients" — said here, before it, with the fix."""
        half = [w for w in self.ctx.watched if w.param.dtype == torch.float16]
        if self.scaler.enabled and half:
            self.events.record("setup_note", "warning",
                               f"a loss scaler with float16 weights ({len(half)} of {len(self.ctx.watched)} trainable "
                               f"tensors, e.g. {half[0].model} {half[0].tensor}): GradScaler refuses to unscale "
                               "float16 gradients ('Attempting to unscale FP16 gradients'); keep the weights in "
                               "float32 and compute in float16 under autocast — the scaler is for that",
                               step=step, probe="precision", model=half[0].model, tensor=half[0].tensor,
                               dtype="float16", numel=len(half), code="scaler_fp16_weights")

    def _check_unscaled_fp16_compute(self) -> None:
        """After the first step: a trained model computing in float16 with no loss scaler — under float16 autocast,
        or trainable fp32 tensors over frozen fp16 weights (LoRA over a base loaded in fp16). The backward then
        runs in fp16 unprotected — gradients below 6e-8 flush to zero, overflows reach the optimizer — which is
        what GradScaler exists for; said once, as a setup fact, before any of it shows."""
        if self.scaler.enabled:
            return
        if self.ctx.autocast == torch.float16:
            self.events.record("setup_note", "warning",
                               "training forwards run under float16 autocast with no loss scaler: the backward's "
                               "small gradients flush to zero in fp16 and its overflows reach the optimizer — "
                               "scale the loss with a GradScaler, or use bfloat16 autocast (fp32's range)",
                               step=self.ctx.step, probe="precision", dtype="float16")
            return
        frozen = None if self.ctx.autocast else self._frozen_low_precision()
        if frozen is not None and frozen[1] == torch.float16:
            w = next(w for w in self.ctx.watched if w.model == frozen[0])
            self.events.record("setup_note", "warning",
                               f"{w.model}'s trainable tensors ({w.tensor}, …) are {dtype_name(w.param.dtype)} but "
                               "most of its weights are frozen in float16: its forward and backward compute in fp16 "
                               "with no loss scaler, so small gradients flush to zero before they reach the "
                               "trainable tensors and overflows reach the optimizer — scale the loss with a "
                               "GradScaler, or load the frozen weights in bfloat16 (fp32's range)",
                               step=self.ctx.step, probe="precision", model=w.model, tensor=w.tensor,
                               dtype="float16")

    def _check_requested_autocast(self) -> None:
        """After the first step: a caller that asked for a mixed mode whose training forwards ran without
        autocast (TRL's DistillationTrainer under bf16=True runs them in fp32) is told so, once."""
        requested = self._precision_override.get("mode")
        expected = {"mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(requested)
        frozen = self._frozen_low_precision()  # frozen fp16 weights compute in fp16 unasked
        computed = self.ctx.autocast or (frozen[1] if frozen else None)
        if expected is not None and computed != expected and self.ctx.stats_step:
            seen = dtype_name(self.ctx.autocast) + " autocast" if self.ctx.autocast else "no autocast"
            self.events.record("setup_note", "info",
                               f"{self._precision_override.get('requested') or requested} asks for {requested}, but "
                               f"the first step's training forwards ran with {seen}: the weights' dtype is what "
                               "they computed in", step=self.ctx.step, probe="precision")

    def diagnosis(self):
        """The numerical causes so far, most important first (analysis/diagnose.py): a list of dicts that prints
        readably, with the loop's and the setup's findings beside it (`.findings`; `.ranked`: both, root first)."""
        import pandas as pd

        from ..analysis.diagnose import diagnose
        from ..contract.events import events_frame
        from ..contract.rundir import load_metrics

        frame = events_frame(e.__dict__ for e in self.events.events)
        metrics = pd.DataFrame(self.rows) if self.run_dir is None else load_metrics(self.run_dir)
        return diagnose(frame, metrics, self._config())

    def precision_info(self) -> dict:
        """The precision this loop runs in: the weights' dtypes, the loss scaler, the autocast seen in training."""
        dtypes = sorted({dtype_name(w.param.dtype) for w in self.ctx.watched})
        held = dtype_of_most(w.param for w in self.ctx.watched)  # a few tensors kept in fp32 do not make it fp32
        autocast = self.ctx.autocast
        frozen = self._frozen_low_precision() if held == torch.float32 and not autocast else None
        frozen = frozen[1] if frozen else None
        if held == torch.float32:
            mode = {torch.float16: "mixed", torch.bfloat16: "bf16-mixed"}.get(autocast or frozen)
            mode = mode or ("mixed" if self.scaler.enabled else "fp32")
        else:
            mode = {torch.float16: "pure-fp16", torch.bfloat16: "pure-bf16"}.get(held, "external")
        most = f" (most in {dtype_name(held)})" if len(dtypes) > 1 else ""
        seen = f"{', '.join(dtypes) or 'no'} weights{most}" \
            + (f", {dtype_name(autocast)} autocast" if autocast else "") \
            + (f" over frozen {dtype_name(frozen)} ones" if frozen else "") \
            + (", a loss scaler" if self.scaler.enabled else "")
        compute = autocast or frozen
        info = {"mode": mode, "requested": "external loop", "reason": f"inferred: {seen}",
                "master_dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes), "param_dtypes": dtypes,
                "compute_dtype": dtype_name(compute) if compute else None, "loss_scaling": self.scaler.enabled,
                "model_dtypes": {name: sorted({dtype_name(p.dtype) for p in m.parameters() if p.is_floating_point()})
                                 for name, m in self.ctx.models.items()},  # frozen ones too: what a teacher outputs
                # the models besides the student that nothing trains — a second teacher, an RL loop's reference —: the
                # diagnosis reads them as it reads the teacher
                "frozen_models": [name for name in self.ctx.models if name != "student" and not self.ctx.trains(name)],
                "adapted_models": [name for name, m in self.ctx.models.items() if self.ctx.trains(name) and adapted(m)]}
        info.update({k: v for k, v in self._precision_override.items() if v is not None})
        return info

    def _frozen_low_precision(self) -> tuple[str, torch.dtype] | None:
        """A trained model whose fp32 trainable tensors sit over frozen float16 or bfloat16 weights that hold most of
        it (LoRA's adapters over a base loaded in fp16), and that dtype: what it computes in without autocast."""
        low = (torch.float16, torch.bfloat16)
        for name in dict.fromkeys(w.model for w in self.ctx.watched):
            dtype = weights_compute_dtype(self.ctx.models[name])
            if dtype in low and not any(w.param.dtype in low for w in self.ctx.watched if w.model == name):
                return name, dtype
        return None

    def _config(self) -> dict:
        return {"options": {}, "precision": self.precision_info(), "source": "sarkd_diag.Probes in a user loop",
                "caller": self.caller}

    def _write_config(self) -> None:
        """config.json from the moment the directory opens (a run that dies is still readable), rewritten when
        what the probes learnt about the precision changes. A continued run keeps the file it had."""
        if self.run_dir is None or not self.ranks.is_main:
            return
        config = self._config()
        path = self.run_dir / "config.json"
        if self._precision_written is None and path.exists():
            self._precision_written = config["precision"]  # a resumed run: its record stands
            return
        self._autocast_written = self.ctx.autocast
        if config["precision"] != self._precision_written:
            from ..contract.rundir import write_json_atomic

            write_json_atomic(path, config)
            self._precision_written = config["precision"]

    def close(self, status: str = "completed", error: BaseException | None = None) -> None:
        """Remove the hooks and, with a run directory, close it: summary, parquet files, report (once). `error`: the
        exception that ended a `failed` run, recorded as its `run_error` event — the panel, report and summary name
        it, where they said "failed" with no reason."""
        if not self._closed and status in ("failed", "interrupted"):
            self._record_unfinished_step(replay=status == "failed")
            if error is not None and status == "failed":
                self._record_error(error)
        completed = status == "completed" and not self._closed
        if completed:
            self._check_optimizer_stepped()
        if self.run_dir is not None and _OPEN.get(os.path.realpath(self.run_dir)) is self:
            del _OPEN[os.path.realpath(self.run_dir)]
        self.set.close(completed)
        if self.run_dir is not None and not self._closed:
            from ..presentation.closing import finalize_run

            self._closed, self._closed_as = True, status
            self.events.close()
            self._metrics.close()
            if status in ("completed", "stopped"):  # a rank that failed closes alone: the others may never come
                self.ranks.barrier()  # every rank's events are on disk before rank 0 reads them all
            if self.ranks.is_main:
                finalize_run(self.run_dir, status)

    def _record_unfinished_step(self, replay: bool) -> None:
        """The loop raised inside a step, after its training forward — `clip_grad_norm_(..., error_if_nonfinite=True)`
        on a NaN gradient, an assert on the loss, an out-of-memory error: what the probes read of that step (its loss,
        its module statistics, its gradients once unscaled) becomes its events and an `unfinished` metrics row, not a
        `train` one (the step never finished: no update, no step completed). It is the step the diagnosis needs most;
        closed without it, the run read as failed for no cause — and without its magnitudes (the finite gradients and
        outputs beside the NaN), a NaN gradient could not be told from an overflow.
        `replay`: the step raised before its optimizer step with a non-finite loss on a step without per-module
        statistics (`detect_anomaly`'s "returned nan values" in the backward, a check of the loop's own) — the weights
        are still those that made the loss, so its forwards are replayed with statistics on, as for a step a loss
        scaler skipped, and the module where the value began is named (not on Ctrl-C: the user wants out).
        Not under torchrun: recording holds collectives, and the other ranks may never come. Nor when `step()` took the
        step's readings already and raised recording them (a probe's own error): taken twice, the second error hid the
        first from the caller."""
        if not self.ctx.trained or self.ranks.distributed or not self.set.probes or self.set.readings_taken:
            return
        self.ctx.unfinished = True
        if self.set.gradients_unscaled():
            self.set.gradients_ready()
        (host,) = to_host(self.set.take_readings())
        metrics = self.set.record(host)
        if replay:
            self.set.replay_if_loss_nonfinite(metrics.get("loss"))
        row = {"step": self.ctx.step, "split": "unfinished", **metrics}
        if self.run_dir is None:
            self.rows.append(row)
        else:
            self._metrics.write_line(json.dumps(row))

    def _record_error(self, error: BaseException) -> None:
        """The exception as `train` records its own: one line, its type and message, at the step it ended, in the phase
        the step had reached as far as the probes saw it: the optimizer's pre-step hook ran, or a training forward ran
        and the watched tensors hold gradients (backward), else the forward — reading its batch included (the caller's
        traceback is the caller's to print)."""
        graded = any(w.param.grad is not None for w in self.ctx.watched)
        phase = ("optimizer" if self.ctx.optimizer_ran else "backward" if self.ctx.trained and graded else "forward")
        self.events.record("run_error", "critical", " ".join(f"{type(error).__name__}: {error}".split()),
                           step=self.ctx.step, phase=phase, probe="loop")

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("completed" if exc_type is None else "interrupted" if exc_type is KeyboardInterrupt
                   else "failed", exc)


def accumulation_state(optimizer):
    """The accumulation state of an optimizer accelerate prepared (its `gradient_state`: `sync_gradients`, False on the
    batches whose `optimizer.step()` it skips; `num_steps`, the Accelerator's gradient_accumulation_steps), or None."""
    for wrapper in optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]:
        state = getattr(wrapper, "gradient_state", None)
        if isinstance(getattr(state, "sync_gradients", None), bool):
            return state
    return None


def accumulation_clock(state) -> Callable[[], bool] | None:
    """Whether the batch under way ends an accumulation, as accelerate's `state` knows it: a loop that hands `Probes`
    its prepared optimizer, not `from_accelerator`, still gets a row per optimizer step, not per batch."""
    return None if state is None else lambda: state.sync_gradients


def adapted(model: nn.Module) -> bool:
    """Whether a model trains through adapters: its trainable tensors hold under half its weights, the rest frozen
    (LoRA, or the lower layers frozen). Its master weights are those tensors alone — a fix that asks for fp32 master
    weights asks for them in fp32, not for the frozen weights too."""
    sizes = {True: 0, False: 0}
    for p in model.parameters():
        sizes[p.requires_grad] += p.numel()
    return 0 < sizes[True] < sizes[False]


def _by_role(models) -> dict[str, nn.Module]:
    """The models by role — a module alone is the student — or a TypeError that says what Probes takes."""
    if isinstance(models, (list, tuple)):
        raise TypeError("Probes takes one model (the student) or a dict by role, {'student': model, 'teacher': "
                        f"teacher}}, not a {type(models).__name__}")
    by_role = models if isinstance(models, dict) else {"student": models}
    for role, model in by_role.items():
        if isinstance(model, torch.optim.Optimizer) or hasattr(model, "param_groups"):  # accelerate's wraps one
            raise TypeError(f"Probes watches torch modules: {role} is the optimizer ({type(model).__name__}); pass "
                            "the model first and the optimizer as optimizer=: Probes(model, optimizer=optimizer)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probes watches torch modules: {role} is of type {type(model).__name__}, not an "
                            "nn.Module (load it first, e.g. AutoModelForCausalLM.from_pretrained)")
    return by_role


def _read_rows(path: Path) -> list[dict]:
    from ..contract.events import read_jsonl

    return read_jsonl(path) if path.is_file() else []


__all__ = ["Probes", "ProbeSet", "check_probe_settings", "chosen", "replace_method", "unwrap_model"]
