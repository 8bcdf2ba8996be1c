"""Forward outputs of every module: non-finite values and values beyond fp16's range, first in forward order.

On statistics steps (step 1 and every N-th at `standard`, every step at `full`) a forward hook takes
each module's output's min and max in one pass (`aminmax`, which propagates NaN), on the device; nothing
moves to the host until the step ends. That names the first non-finite module and which of NaN, +Inf and
-Inf it holds, but not how many: counting them apart costs ~15x the pass (the tensor is gone by the time
the host knows it was bad), so an activation event's counts are null. A non-finite teacher output is
recorded as such (the diagnosis calls it teacher_overflow). In fp32 and bf16 runs a finite value beyond
fp16's range is a headroom warning: it predicts where an fp16 run will overflow. Each module's largest
output of each statistics step goes to activations.jsonl when the owner keeps one: the fp16 headroom map
(module × step) is drawn from it. Under torchrun each rank names its own non-finite modules (its events),
and the map and the `act_amax_<model>` columns are the largest over every rank's batch: one gather of the
per-module maxima per statistics step (`ProbeContext.gather`). Only training forwards
count (`forwards.py` decides which): not evaluation, not generation; and a layer that gradient checkpointing
recomputes in backward is not read a second time.

A module's own code also computes between its children (a residual sum, a masked softmax, a log): a NaN made
there first shows in the output of the child it is handed to, whose own work was fine. So on statistics steps
a hook before each module also reads its floating inputs that no watched module produced (each tensor once;
the outputs already read, and the model's own inputs — the data, which `forwards.py` checks — are skipped):
a NaN there was made by the module running when it was handed over — the innermost watched one, or the model's
own `forward` (named `<Class>.forward`) when none of its modules is — and that module is named, before the child;
the model's output, when its own code made it rather than a child, is read so too. Only NaN and +Inf count in
these readings (a division by zero makes either): -Inf is how a mask is written into scores that a softmax module
then takes. A finite value beyond fp16's range made there in a wider dtype is that module's fp16 risk (a SwiGLU MLP's
silu(gate) · up, handed to down_proj, overflows fp16 though gate, up and down_proj all fit): its high side only, as
a large negative value is how a mask is written (float32's min, -1e9). The headroom map and `act_amax_<model>` stay
module outputs.

The first module output, in forward order, that is exactly 0 everywhere where an earlier module output of the same
model in the step was not is recorded once, as information (`zero_activation`): nothing after it depends on the input (a
Dropout with p=1.0 before it, a gate or mask that multiplies by 0, dead ReLUs) and no gradient passes back through it.
Only a zero that lasts counts: that module's output is read again at its next training forward (one hook, read with the
step's other readings) and the event is written, at the step first seen, only if that output is 0 everywhere too — a
zero-initialised module (a LoRA adapter's B, a zero-init residual projection) outputs 0 until the first update moves
its weights, which is how it is built, not a finding. The diagnosis reads it where no gradient reaches the weights.
A float16 zero may be float16's own doing, with no NaN to show it: an intermediate beyond its range turned Inf and a
division by it 0 (a hand-written norm's mean(x²) over values above 256 is Inf, and x · rsqrt(Inf) is 0 everywhere). So
the inputs and weights of that next forward are kept too (float32 copies, this once), and a zero that lasts is run
again on them in float32 (`wide_replay`, as below): non-zero there, float16 zeroed it; 0 there too, it is the code's.

A float16 output that is NaN or Inf has two possible makers the output alone cannot tell apart: float16's range
(a product beyond 65504, a mask's fill value or an eps float16 cannot hold) and an operation undefined on its
inputs (the sqrt or log of a negative, 0/0), NaN in any precision. So the first such module is watched on the
training forwards that follow (its output checked, one sync a forward, on this failure path only, and for at most
WIDE_REPLAY_TRIES of them — a fault that does not come back costs no sync for the rest of the run): the first time its
float16 output is non-finite again from finite inputs and finite weights, it is run once more on those inputs in
float32 — float32 copies of its weights and buffers (`torch.func.functional_call`), autocast off, no gradients,
the RNG state forked, its children's statistics not counted, no object of the forward's handed over (a key-value
cache, which the replay would extend a second time: None in its place) — and the result is a `wide_replay` event: finite
there, float16 could not hold what it computes; non-finite there too, the operation is undefined on its inputs.
Without a loss scaler (float16 weights, `.half()`) no later forward is left: the step's update makes every weight
non-finite. So on a statistics step of a model that computes in float16 without one, each module's inputs are kept
until the model's forward ends, where one sync reads that forward's float16 readings; the first non-finite module is
run in float32 there, on the inputs it was handed and the weights that made it (until a module is so named).
Nothing of the training changes.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

from .base import FP16_MAX, Probe, dtype_name, eager, in_backward

WIDE_REPLAY_TRIES = 16  # training forwards of the suspect module checked for a non-finite output to run in float32


def _trainable_weights_at_zero(module: nn.Module) -> bool:
    """The module has trainable weights and every one is 0 everywhere (one host read, on this failure path only)."""
    trainable = [p.detach() for p in module.parameters() if p.requires_grad and p.numel()]
    return bool(trainable) and torch.stack([p.abs().amax().float() for p in trainable]).max().item() == 0


def _first_tensor(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o) and o.is_floating_point()), None)
    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits
    return None


class ActivationProbe(Probe):
    name = "activations"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._handles: list = []
        # (model, module, dtype, numel, handed to): a module's output (handed to None), or a tensor that `module`'s
        # own code made and handed to the child `handed to` — in forward order
        self._seen: list[tuple[str, str, str, int, str | None]] = []
        self._running: list[tuple[str, str]] = []  # the watched modules whose forward is under way, innermost last
        self._read: dict[int, weakref.ref] = {}  # tensors already read this step (by id, checked by identity)
        self._lows: list[torch.Tensor] = []
        self._highs: list[torch.Tensor] = []
        self._reported: set[tuple[str, str, str]] = set()
        self._hooks: list | None = None
        self._root_labels: dict[str, str] = {}  # model -> how its root's own code is named (`root_label`)
        self.models_read: set[str] = set()  # the models whose module outputs the last statistics step read
        self._suspect: tuple[str, str] | None = None  # (model, module) whose float16 output was non-finite
        self._suspect_handles: list = []  # its hooks until it is run in float32 (`_replay_wide`)
        self._suspect_inputs: tuple | None = None
        self._suspect_tries = 0  # its training forwards checked so far
        # without a loss scaler, float16 weights a non-finite step makes non-finite at once: no later forward is left
        # to replay, so on statistics steps each module's inputs are kept until its model's forward ends (`_root`)
        self._forward_start: dict[str, int] = {}  # model -> where its forward's readings begin in `_seen`
        self._inputs: dict[tuple[str, str], tuple | None] = {}  # (model, module) -> (args, kwargs) of this forward
        # model -> a module output found 0 everywhere, read again at its next training forward (`_watch_zero`)
        self._zeros: dict[str, _ZeroOutput] = {}

    def begin_step(self) -> None:
        self._running, self._read = [], {}
        self._forward_start, self._inputs = {}, {}
        if self.ctx.stats_step:
            self.attach()

    def attach(self) -> None:
        if not self._handles:
            for model_name, module, before, after in self._module_hooks():
                if self.ctx.sealed(model_name) and not self.ctx.replaying:  # compiled as one graph: no hook inside
                    continue  # (a replay runs the model itself, eagerly)
                self._handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
                if after is not None:
                    self._handles.append(module.register_forward_hook(after))

    def _module_hooks(self) -> list[tuple[str, nn.Module, Callable, Callable | None]]:
        """(model name, module, pre-hook, hook) for every module of every model, made once: attached on each statistics
        step, made each time they cost that step more than reading the modules (`eager` is ~15 µs a hook)."""
        if self._hooks is None:
            self._hooks = []
            for model_name, model in self.ctx.models.items():
                for module_name, module in model.named_modules():
                    if module_name and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Dropout)):
                        self._hooks.append((model_name, module, eager(self._before(model_name, module_name)),
                                            eager(self._hook(model_name, module_name))))
                    elif not module_name:  # the root: its inputs are the data, not a module's making
                        self._hooks.append((model_name, module, eager(self._root(model_name)),
                                            eager(self._root_output(model_name, root_label(module)))))
        return self._hooks

    def _counts(self, model_name: str) -> bool:
        """A training forward's module (or a replay's); not a layer gradient checkpointing recomputes in backward."""
        return (self.ctx.training_forward.get(model_name, True) or self.ctx.replaying) and not in_backward()

    def _root(self, model_name: str):
        def hook(module, args, kwargs):
            self._running = []
            if self._counts(model_name):
                for t in _floating(args, kwargs):
                    self._read[id(t)] = weakref.ref(t)
                if self._suspect is None and not self.ctx.loss_scaler.enabled and _computes_in_fp16(module):
                    self._forward_start[model_name] = len(self._seen)
        return hook

    def _root_output(self, model_name: str, label: str):
        """The root's output when its own code made it (not a child's output handed on): read as made by it — not a
        scalar, which is a loss the model computed (`return_dict=False` puts it first), the loss probe's reading."""
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is not None and t.is_floating_point() and t.dim() and t.numel() and self._counts(model_name):
                self._read_made(t, model_name, label, "its caller")
            if model_name in self._forward_start:
                self._replay_first_fault(model_name, self._forward_start.pop(model_name))
                self._inputs = {key: kept for key, kept in self._inputs.items() if key[0] != model_name}
        return hook

    def _before(self, model_name: str, module_name: str):
        """Read the inputs no watched module produced, as made by the innermost running module's own code — the
        root's (`root_label`) when no module of the model is running."""
        root = self._root_labels.setdefault(model_name, root_label(self.ctx.models[model_name]))

        def hook(_module, args, kwargs):
            if not self._counts(model_name):
                return
            running = self._running[-1][1] if self._running and self._running[-1][0] == model_name else root
            self._running.append((model_name, module_name))
            if model_name in self._forward_start:  # a module called twice: which call failed is not known (None)
                key = (model_name, module_name)
                self._inputs[key] = None if key in self._inputs else (args, kwargs)
            for t in _floating(args, kwargs):
                self._read_made(t, model_name, running, module_name)
        return hook

    def _read_made(self, t: torch.Tensor, model_name: str, maker: str, handed_to: str) -> None:
        """A tensor `maker`'s own code made and hands to `handed_to`, unless already read: its NaN check."""
        if self._was_read(t):
            return
        self._read[id(t)] = weakref.ref(t)
        low, high = torch.aminmax(t.detach())  # NaN if any element is
        self._lows.append(low)
        self._highs.append(high)
        self._seen.append((model_name, maker, dtype_name(t.dtype), t.numel(), handed_to))

    def _was_read(self, t: torch.Tensor) -> bool:
        ref = self._read.get(id(t))
        return ref is not None and ref() is t

    def _hook(self, model_name: str, module_name: str):
        def hook(_module, _inputs, output):
            if not self._counts(model_name):
                return
            if self._running and self._running[-1] == (model_name, module_name):
                self._running.pop()
            t = _first_tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            if model_name == "student" and torch.is_autocast_enabled(t.device.type):  # a framework's autocast
                self.ctx.autocast = torch.get_autocast_dtype(t.device.type)  # wraps forward, out of forwards.py's sight
            self._read[id(t)] = weakref.ref(t)
            low, high = torch.aminmax(t.detach())
            self._lows.append(low)
            self._highs.append(high)
            self._seen.append((model_name, module_name, dtype_name(t.dtype), t.numel(), None))
        return hook

    def take_readings(self) -> dict[str, torch.Tensor]:
        self._detach()
        self._running, self._read = [], {}
        readings = {}
        rereads = [amax for zero in self._zeros.values() for amax in zero.rereads]
        if rereads:
            readings["zero_rereads"] = torch.stack([amax.float() for amax in rereads])
        if self._seen:
            readings["activation_extremes"] = torch.stack(self._lows + self._highs)  # promotes exactly to the widest
            self._lows, self._highs = [], []
        return readings

    def record(self, host: dict, replayed_after: str = "") -> dict:
        """The step's readings into events and metrics; `replayed_after`: these are a replay's, run after that
        (`ProbeSet.replay_forward`), which each event says."""
        note = f" (replayed with per-module statistics after {replayed_after})" if replayed_after else ""
        self._judge_zeros(host.get("zero_rereads", []))
        extremes = host.get("activation_extremes")
        seen, self._seen = self._seen, []
        largest, gone_bad = self._record_events(seen, extremes, note) if extremes is not None else ({}, set())
        if note:  # a replay tells where — or, every output finite, that the forwards did not make it
            if largest and not gone_bad:
                self._record_finite_replay(largest, replayed_after)
            return {}
        if not self.ctx.stats_step:
            return {}  # a step without statistics has none to tell
        self.models_read = {model for model, *_ in seen}  # NaN outputs too: `act_amax_<model>` counts finite ones
        largest = _largest_over_ranks(self.ctx.gather(largest))  # one collective per statistics step
        if self.ctx.activations_log is not None:
            self.ctx.activations_log.write_lines([
                json.dumps({"step": self.ctx.step, "model": model, "module": module, "dtype": dtype, "amax": amax})
                for (model, module), (dtype, amax) in largest.items()])
        metrics: dict = {}
        for (model, _), (_, amax) in largest.items():
            if math.isfinite(amax):
                metrics[f"act_amax_{model}"] = max(metrics.get(f"act_amax_{model}", 0.0), amax)
        return metrics

    def _record_events(self, seen: list, extremes: list[float], note: str) -> tuple[dict, set[str]]:
        """This rank's events (the first non-finite module in forward order per model, fp16 headroom); returns each
        module's largest output over the step's micro-batches, {(model, module): (dtype, amax)}, and the models
        one of whose modules made or output a non-finite value."""
        models_gone_bad: set[str] = set()
        models_live: set[str] = set()  # a module output of the model was non-zero earlier in the step's forwards
        largest: dict[tuple[str, str], tuple[str, float]] = {}
        for (model, module, dtype, numel, handed_to), low, high in zip(seen, extremes[:len(seen)],
                                                                        extremes[len(seen):], strict=True):
            if handed_to is not None:  # made by `module`'s own code: NaN and +Inf count, -Inf is a mask (docstring)
                made = "a NaN" if math.isnan(low) else "+Inf" if high == math.inf else None
                if made and dtype == "float16" and self._suspect is None and module != root_label(
                        self.ctx.models[model]):  # its own output carries what it made: run it in float32
                    self._watch_suspect(model, module)
                if made and model not in models_gone_bad:
                    models_gone_bad.add(model)
                    self._frozen_weight_written(model, module)
                    self._report_once(
                        (model, module, "nonfinite"), "nonfinite_activation", "critical",
                        f"{model} {module} made {made} in its own code at step {self.ctx.step} (in {dtype}, handed "
                        f"to {handed_to}, no watched module's output) — the first non-finite value in forward "
                        "order" + note,
                        model=model, module=module, dtype=dtype, value=math.nan if math.isnan(low) else math.inf,
                        numel=numel, nan_count=None, posinf_count=None, neginf_count=None)
                elif not made and high > FP16_MAX and dtype != "float16":  # the high side: a mask is large negative
                    self._report_once(
                        (model, module, "risk"), "fp16_overflow_risk", "warning",
                        f"{model} {module} makes values reaching {high:.4g} in its own code (in {dtype}, handed to "
                        f"{handed_to}, no watched module's output), beyond fp16's {FP16_MAX:.0f}: this overflows in "
                        "fp16 compute",
                        model=model, module=module, dtype=dtype, value=high, numel=numel)
                continue
            amax = math.nan if math.isnan(low) else max(-low, high)  # aminmax makes both NaN
            largest[(model, module)] = (dtype, _larger(largest.get((model, module), (dtype, -math.inf))[1], amax))
            if amax == 0 and model in models_live and not note and model not in self._zeros \
                    and (model, "zero") not in self._reported and (model, module, "zero_init") not in self._reported:
                self._watch_zero(model, module, dtype, numel)
            if amax != 0:
                models_live.add(model)
            if not math.isfinite(amax):
                if dtype == "float16" and self._suspect is None:
                    self._watch_suspect(model, module)
                if model not in models_gone_bad:
                    models_gone_bad.add(model)
                    self._frozen_weight_written(model, module)
                    holds = [kind for kind, present in (("NaN", math.isnan(amax)), ("+Inf", high == math.inf),
                                                        ("-Inf", low == -math.inf)) if present]
                    self._report_once(
                        (model, module, "nonfinite"), "nonfinite_activation", "critical",
                        f"{model} {module} output is non-finite in forward at step {self.ctx.step} (holds "
                        f"{', '.join(holds)}, in {dtype}) — the first such module in forward order" + note,
                        model=model, module=module, dtype=dtype, value=amax, numel=numel,
                        nan_count=None, posinf_count=None, neginf_count=None)  # not counted: see the docstring
                continue
            if amax > FP16_MAX and dtype != "float16":
                self._report_once(
                    (model, module, "risk"), "fp16_overflow_risk", "warning",
                    f"{model} {module} output reaches {amax:.4g} in {dtype}, beyond fp16's {FP16_MAX:.0f}: "
                    "this module overflows in fp16 compute",
                    model=model, module=module, dtype=dtype, value=amax, numel=numel)
        return largest, models_gone_bad

    def _frozen_weight_written(self, model_name: str, module_name: str) -> None:
        """A model nothing trains (a teacher) made its first non-finite value in `module_name`: its weights were read
        as loaded and found finite (else `nonfinite_at_load`), and no probe reads them after that — so read the
        module's own now (one host sync, once a run, on this failure path only). One that holds NaN/Inf was written
        since by the caller's code, and the module's output follows from it — no overflow, no undefined operation:
        `nonfinite_between_steps`, at that tensor and this step."""
        if self.ctx.trains(model_name) or not self.ctx.events.say_once("frozen_weight_read"):
            return
        if any(e.kind == "nonfinite_at_load" and e.model == model_name for e in self.ctx.events.events):
            return
        model = self.ctx.models[model_name]
        own = module_name == root_label(model)  # the model's own `forward` made it: any of its weights
        for name, weight in (model if own else model.get_submodule(module_name)).named_parameters():
            if not weight.is_floating_point() or bool(torch.isfinite(weight).all()):
                continue
            tensor = name if own else f"{module_name}.{name}"
            holds = "NaN" if bool(weight.isnan().any()) else "Inf"
            self.ctx.events.record(
                "nonfinite_between_steps", "critical",
                f"{model_name} weight {tensor} holds {holds} at step {self.ctx.step}'s forward, finite as loaded: "
                f"nothing trains {model_name}, so code outside the optimizer wrote it", step=self.ctx.step,
                phase="forward", probe=self.name, model=model_name, module=tensor.rpartition(".")[0], tensor=tensor,
                dtype=dtype_name(weight.dtype), value=math.nan if holds == "NaN" else math.inf, nan_count=None,
                posinf_count=None, neginf_count=None, numel=weight.numel())
            return

    def _watch_zero(self, model_name: str, module_name: str, dtype: str, numel: int) -> None:
        """Read a module whose output was 0 everywhere again at its next training forward (`_judge_zeros`)."""
        zero = _ZeroOutput(module_name, dtype, numel, self.ctx.step)

        def reread(module, args, kwargs, output):
            t = _first_tensor(output)
            if t is not None and t.is_floating_point() and t.numel() and self._counts(model_name):
                zero.rereads.append(t.detach().abs().amax())
                if dtype == "float16" and zero.replay is None:  # float16's doing or the code's: `_judge_zeros`
                    with torch.no_grad():
                        zero.replay = (_float32_state(module), _widened(args), _widened(kwargs))
        module = self.ctx.models[model_name].get_submodule(module_name)
        zero.handle = module.register_forward_hook(eager(reread), with_kwargs=True)
        self._zeros[model_name] = zero

    def _judge_zeros(self, rereads: list[float]) -> None:
        """Each watched zero output read again this step: 0 everywhere again, it lasts (`zero_activation`, at the
        step first seen) — and a float16 one run again in float32 (`wide_replay`): float16's zero or the code's; else
        its weights moved it off 0 — a zero-initialised module, no finding. Nor is one whose own trainable weights are
        still all 0 (LoRA's B): built that way, its first update should have ended it — that update is what is
        missing (a gradient flushed, an lr of 0), and the rules on gradients and updates name it."""
        for model, zero in list(self._zeros.items()):
            if not zero.rereads:
                continue  # no training forward of it yet
            mine, rereads = rereads[:len(zero.rereads)], rereads[len(zero.rereads):]
            zero.handle.remove()
            del self._zeros[model]
            if not all(amax == 0 for amax in mine):
                continue
            module = self.ctx.models[model].get_submodule(zero.module)
            if _trainable_weights_at_zero(module):
                self._reported.add((model, zero.module, "zero_init"))  # not watched again
                continue
            self._reported.add((model, "zero"))
            self.ctx.events.record(
                "zero_activation", "info",
                f"{model} {zero.module} output is exactly 0 everywhere at step {zero.step} (in {zero.dtype}), "
                f"where an earlier module's was not, and still at step {self.ctx.step}: nothing after it depends "
                "on the input, and no gradient passes back through it",
                step=zero.step, phase="forward", probe=self.name, model=model, module=zero.module,
                dtype=zero.dtype, value=0.0, numel=zero.numel)
            if zero.replay is not None:
                self._run_wide(model, zero.module, module, *zero.replay, made="was 0 everywhere")

    def _record_finite_replay(self, largest: dict, after: str) -> None:
        """A replay after a non-finite loss or non-finite gradients (`after`) found every module output of its forwards
        finite: one `forward_replay` event per model, with its largest output — the non-finite value was made after
        the models' forwards (in the loss's own arithmetic, or in backward), which the diagnosis reads as it reads a
        statistics step's finite outputs."""
        by_model: dict[str, float] = {}
        for (model, _), (_, amax) in largest.items():
            by_model[model] = max(by_model.get(model, 0.0), amax)
        for model, amax in by_model.items():
            self.ctx.events.record(
                "forward_replay", "info",
                f"step {self.ctx.step}'s forwards, replayed with per-module statistics after {after}: every "
                f"{model} module's output finite (the largest {amax:.3g}) — the non-finite value was made after them",
                step=self.ctx.step, phase="forward", probe=self.name, model=model, value=amax)

    def _replay_first_fault(self, model_name: str, start: int) -> None:
        """At the end of a statistics step's forward without a loss scaler (`_root`): the first float16 module in it
        whose output — or what its own code made — is non-finite, run once in float32 on the inputs it was handed,
        while its weights are still those that made it (one sync, for this forward's readings; the update would make
        them non-finite before any later forward). Nothing non-finite, or no such module: nothing more."""
        root = self._root_labels.setdefault(model_name, root_label(self.ctx.models[model_name]))
        mine = [i for i in range(start, len(self._seen))
                if self._seen[i][0] == model_name and self._seen[i][2] == "float16"]
        if not mine:
            return
        values = torch.stack([self._lows[i] for i in mine] + [self._highs[i] for i in mine]).float().tolist()
        for i, low, high in zip(mine, values[:len(mine)], values[len(mine):], strict=True):
            _, module_name, _, _, handed_to = self._seen[i]
            made = math.isnan(low) or high == math.inf or (handed_to is None and low == -math.inf)
            if not made:
                continue
            if module_name == root:  # the model's own forward made it: not a module that can run apart
                return
            inputs = self._inputs.get((model_name, module_name))
            module = self.ctx.models[model_name].get_submodule(module_name)
            tensors = chain(_floating(*inputs), (p for p in module.parameters() if p.is_floating_point())) \
                if inputs is not None else ()
            if inputs is not None and all(bool(torch.isfinite(x).all()) for x in tensors):
                self._suspect = (model_name, module_name)  # named and replayed: no later forward is watched
                self._replay_wide(model_name, module_name, module, *inputs)
            return

    def _watch_suspect(self, model_name: str, module_name: str) -> None:
        """Watch the module whose float16 output turned non-finite, to run it once in float32 (module docstring)."""
        self._suspect = (model_name, module_name)
        module = self.ctx.models[model_name].get_submodule(module_name)

        def keep_inputs(_module, args, kwargs):
            self._suspect_inputs = (args, kwargs) if self._counts(model_name) else None

        def check(module, _inputs, output):
            inputs, self._suspect_inputs = self._suspect_inputs, None
            t = _first_tensor(output)
            if inputs is None or t is None or t.dtype != torch.float16:
                return
            self._suspect_tries += 1
            if self._suspect_tries > WIDE_REPLAY_TRIES:
                self._stop_watching_suspect()
                return
            if bool(torch.isfinite(t).all()):
                return
            tensors = chain(_floating(*inputs), (p for p in module.parameters() if p.is_floating_point()))
            if all(bool(torch.isfinite(x).all()) for x in tensors):  # else what it was handed was non-finite
                self._replay_wide(model_name, module_name, module, *inputs)
        self._suspect_handles = [module.register_forward_pre_hook(eager(keep_inputs), with_kwargs=True),
                                 module.register_forward_hook(eager(check))]

    def _replay_wide(self, model_name: str, module_name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the module once more on the same inputs in float32 and record what it makes (`wide_replay`)."""
        self._stop_watching_suspect()
        self._run_wide(model_name, module_name, module, _float32_state(module), _widened(args), _widened(kwargs),
                       made="turned non-finite")

    def _run_wide(self, model_name: str, module_name: str, module: nn.Module, wide: dict, cast: tuple, kwcast: dict,
                  made: str) -> None:
        """`module` run on float32 copies of its weights (`wide`) and inputs (`cast`, `kwcast`), its float16 output
        having `made` what it did: the `wide_replay` event of what float32 makes of them."""
        device = next(iter(wide.values())).device if wide else torch.device("cpu")
        counted = self.ctx.training_forward.get(model_name)
        self.ctx.training_forward[model_name] = False  # its children's hooks: no statistics of this run
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False), torch.random.fork_rng(
                    devices=[] if device.type == "cpu" else [device], device_type=device.type):
                t = _first_tensor(torch.func.functional_call(module, wide, cast, kwcast))
        except Exception:  # noqa: BLE001 — a module that cannot run apart (sharded weights, a stateful forward)
            t = None  # tells nothing; the probes never break the training they watch
        finally:
            if counted is None:
                self.ctx.training_forward.pop(model_name, None)
            else:
                self.ctx.training_forward[model_name] = counted
        if t is None:
            return
        low, high = (float(v) for v in torch.aminmax(t.float()))
        amax = math.nan if math.isnan(low) else max(-low, high)
        verdict = ("0 there too: the code's zero, not float16's" if amax == 0 else
                   f"finite (largest {amax:.4g}): float16 cannot hold what it computes" if math.isfinite(amax) else
                   f"{'NaN' if math.isnan(amax) else 'Inf'} there too: an operation undefined on its inputs, in "
                   "any precision")
        self.ctx.events.record(
            "wide_replay", "info",
            f"{model_name} {module_name}, whose float16 output {made}, run again in float32 on the inputs and "
            f"weights of its forward at step {self.ctx.step}: {verdict}",
            step=self.ctx.step, phase="forward", probe=self.name, model=model_name, module=module_name,
            dtype="float32", value=amax, numel=t.numel())

    def _stop_watching_suspect(self) -> None:
        for h in self._suspect_handles:
            h.remove()
        self._suspect_handles = []

    def _report_once(self, key: tuple, kind: str, severity: str, message: str, **fields) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.ctx.events.record(kind, severity, message, step=self.ctx.step, phase="forward", probe=self.name,
                                   **fields)

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        self._detach()
        self._stop_watching_suspect()
        for zero in self._zeros.values():
            zero.handle.remove()
        self._zeros = {}


class _ZeroOutput:
    """A module output found 0 everywhere on a statistics step, and its readings at the training forwards after."""

    def __init__(self, module: str, dtype: str, numel: int, step: int):
        self.module, self.dtype, self.numel, self.step = module, dtype, numel, step
        self.rereads: list[torch.Tensor] = []
        self.handle = None
        self.replay: tuple | None = None  # float16: its weights and inputs of the reread forward, in float32


def root_label(model: nn.Module) -> str:
    """How a model's own forward code is named where it made a NaN: `<Class>.forward` (a root module has no dotted
    name, and the class is what the user wrote)."""
    return f"{type(model).__name__}.forward"


def _float32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's weights and buffers, the floating ones in float32, for a replay
    (`torch.func.functional_call`): the replay's forward updates them in place where training would (a BatchNorm's
    batch count, an integer, too), and the module's own must stay as the training left them."""
    return {name: t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
            for name, t in chain(module.named_parameters(), module.named_buffers())}


def _widened(value):
    """A replay's copy of a forward's arguments: floating tensors in float32, in containers too (a layer's rotary
    (cos, sin)); values and tensors as they are; any other object — state a forward changes, such as the key-value
    cache transformers hands each layer in every forward, which a replay would extend a second time — as None."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_widened(v) for v in value)
    if type(value) is dict:
        return {k: _widened(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)):
        return value
    return None


def _computes_in_fp16(model: nn.Module) -> bool:
    """Whether a model's forward computes in float16: its weights (`.half()`), or float16 autocast around it."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return False
    autocast = torch.is_autocast_enabled(weight.device.type) and \
        torch.get_autocast_dtype(weight.device.type) == torch.float16
    return autocast or any(p.dtype == torch.float16 for p in model.parameters())


def _floating(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """A forward's floating-point tensor arguments (positional and keyword; not inside containers)."""
    return [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point() and t.numel()]


def _larger(a: float, b: float) -> float:
    """The larger of two absolute maxima, NaN if either is (a NaN anywhere is what the map must show)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _largest_over_ranks(per_rank: list[dict]) -> dict:
    """Every rank's {(model, module): (dtype, amax)} into one: each module's largest output over all ranks'
    batches, in the first rank's forward order (a module only some ranks ran, an expert no token of theirs
    chose, comes after)."""
    merged: dict = {}
    for largest in per_rank:
        for key, (dtype, amax) in largest.items():
            merged[key] = (dtype, _larger(merged[key][1], amax) if key in merged else amax)
    return merged
