"""What every probe shares: the watched tensors, the event log and the step clock.

A probe keeps its per-step statistics as device tensors and hands them over once per step
(`take_readings`, which also clears them); the owner moves all probes' readings to the host in one
transfer and hands them back (`record`), where the probe turns them into events (first occurrences,
thresholds crossed) and metrics columns.

The moments of a step, in order: `begin_step`; the forwards and backwards; `gradients_ready` (after
unscaling and before a loss scaler decides, or at the optimizer's pre-step hook without one — every step,
also one the scaler skips); `before_optimizer_step` and `after_optimizer_step` (the optimizer's own
hooks: not on a skipped step); then `take_readings` and `record`.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..contract.errors import BadInput
from ..contract.events import EventLog, JsonlLog, NullLog
from ..contract.loss_scaler import LossScaler
from ..contract.numerics import FP16_MAX, dtype_name  # noqa: F401 - the probes' shared threshold and names
from ..contract.shards import local_shard, local_shards


@dataclass
class Watched:
    """A trainable tensor with the names a person looks for: its model, module and parameter name."""

    model: str
    module: str
    tensor: str
    param: nn.Parameter


@dataclass
class ProbeContext:
    models: dict[str, nn.Module]
    events: EventLog
    optimizer: torch.optim.Optimizer | Optimizers | None = None  # several: `Optimizers`
    loss_scaler: LossScaler = field(default_factory=lambda: LossScaler(None))
    level: str = "standard"
    every: int = 10
    step: int = 0
    stats_step: bool = False
    watched: list[Watched] = field(default_factory=list)
    weights_read_by_owner: bool = False  # the owner's loop hands over the weights' per-tensor amax
    training_forward: dict[str, bool] = field(default_factory=dict)  # per model: is its current forward training
    training_mode: dict[str, bool] = field(default_factory=dict)  # per trained model: its mode in its training forwards
    autocast: torch.dtype | None = None  # the autocast dtype of the student's latest training forward
    replaying: bool = False  # the loop replays a forward to name a module: its statistics count
    # this step's training forwards as (model, args, kwargs, autocast), kept where the probes replay a step themselves
    # (`ProbeSet.replays_steps`) on a step without statistics; None where nothing keeps them
    step_forwards: list | None = None
    reevaluating: bool = False  # an optimizer's step calls its closure again (LBFGS): not the step's loss
    # on a step whose optimizer called its closure again (LBFGS), the first call's result: the step's loss, which a
    # framework handing back the closure's last result (Lightning's outputs) does not carry
    first_closure_loss: torch.Tensor | float | None = None
    unfinished: bool = False  # the caller's loop raised inside this step: recorded as far as it got, at close
    activations_log: JsonlLog | NullLog | None = None  # activations.jsonl: each module's amax per statistics step
    gather: Callable[[object], list] = lambda value: [value]  # every rank's value in rank order (under torchrun)
    trained: bool = False  # a training forward has run in this step (what an optimizer step's gradients come from)
    # a training forward has run since the last optimizer step began: a second step of one optimizer within one
    # step is then a new batch's (the loop closes steps less often than it updates), else the same batch's again
    forward_since_update: bool = False
    training_forwards: int = 0  # the trained models' training forwards in this step, its micro-batches' included
    lr: float | None = None  # the first group's lr as the optimizer's step of this step used it (its pre-hook)
    optimizer_ran: bool = False  # the optimizer's pre-step hook ran in this step (a policy may skip the step)
    caller_skipped: bool = False  # the caller's loop skipped this step's backward and update on purpose
    optimizers_used: set[int] = field(default_factory=set)  # ids of the optimizers that used this step's gradients
    # this step's autograd nodes of the trained models' training-forward outputs, and of the losses the caller
    # handed over: the ends of the loss's own computation (`loss_graph`), read when gradients turn non-finite
    output_nodes: list = field(default_factory=list)
    loss_roots: list = field(default_factory=list)
    # the models whose forwards run inside a graph compiled with fullgraph=True (`sealed`), where a hook would be an
    # error: each with the module whose hooks run eagerly as the loop calls it (the torch.compile wrapper), or None
    # where the model is called inside a compiled function (a LightningModule's compiled training_step)
    callers: dict[str, nn.Module | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.watched:  # the tensors the optimizer updates (all that require grad without one)
            updated = None if self.optimizer is None else {
                id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for model_name, model in self.models.items():
                for name, p in model.named_parameters():
                    if p.requires_grad and (updated is None or id(p) in updated):
                        module, _, tensor = name.rpartition(".")
                        self.watched.append(Watched(model_name, module, name, p))

    def called(self, model_name: str) -> nn.Module | None:
        """The module to hook for a model's whole forward: where the loop's call of it runs eagerly (None: nowhere)."""
        return self.callers.get(model_name, self.models[model_name])

    def whole_forward_hooks(self) -> list[tuple[str, nn.Module]]:
        """(model name, module to hook) for each model whose whole forward some hook can watch (`called`)."""
        return [(name, self.called(name)) for name in self.models if self.called(name) is not None]

    def sealed(self, model_name: str) -> bool:
        """Whether a model's forward runs as one compiled graph (fullgraph=True): no hook may run inside it."""
        return model_name in self.callers

    def reads_modules(self) -> bool:
        """Whether this step's forwards read every model's module outputs: a statistics step, where no model runs as
        one compiled graph (its modules are read only by a replay)."""
        return self.stats_step and not any(map(self.sealed, self.models))

    def trains(self, model_name: str) -> bool:
        """Whether a model has weights this run updates (the student; the teacher only through its routers)."""
        return any(w.model == model_name for w in self.watched)

    def gradients_used(self) -> set[int] | None:
        """The ids of the tensors whose optimizer used this step's gradients — stepped with them, or had a loss scaler
        unscale them to step or skip —; None where that is every tensor (one optimizer, or none given). Several
        optimizers may keep cadences of their own (alternating ones, a router's stepping every few steps): one that
        did not step leaves its tensors' gradients to a later step, and no update of them was meant, lost or left
        uncleared."""
        optimizers = optimizers_of(self.optimizer)
        if len(optimizers) < 2:
            return None
        return {id(p) for o in optimizers if id(o) in self.optimizers_used for g in o.param_groups for p in g["params"]}

    def model_stepped_by(self, optimizer) -> str | None:
        """The watched model whose trainable tensors `optimizer` holds — the one a note about its steps is about; None
        where it holds several models' (or none watched)."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        models = {w.model for w in self.watched if id(w.param) in held}
        return models.pop() if len(models) == 1 else None

    def dtype_of(self, p: torch.Tensor) -> str:
        return dtype_name(p.dtype)

    def computes_in(self, model_name: str) -> torch.dtype:
        """The dtype a model's training forward and backward compute in: its autocast's where the training forwards
        ran under one (the student's), else `weights_compute_dtype`."""
        if self.autocast is not None and self.trains(model_name):
            return self.autocast
        return weights_compute_dtype(self.models[model_name])


def weights_compute_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that holds most of a model's weights, frozen ones included: what its forward multiplies
    in without autocast, and so what the backward's gradients pass through. LoRA adapters kept in fp32 over a base
    loaded in fp16 compute in fp16 — their gradients flush or overflow in it — though every trainable tensor is
    fp32."""
    return dtype_of_most(model.parameters()) or torch.float32


def dtype_of_most(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype that holds most of these tensors' elements; None without any. A model loaded in bf16 that
    keeps a few modules in fp32 (transformers' `_keep_in_fp32_modules`: MoE router gates, norms) trains in bf16."""
    elements: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            elements[t.dtype] = elements.get(t.dtype, 0) + t.numel()
    return max(elements, key=elements.get) if elements else None


def scores_tokens(model) -> bool:
    """Whether a model is a language model, whose loss is a cross-entropy over its vocabulary's tokens (its exp a
    perplexity): a transformers model that can generate (`can_generate()`: causal and seq2seq LMs) or a masked LM
    (`loss_type` "ForMaskedLM": BERT's, DistilBERT's), not a head that scores labels or regresses values
    (`ForSequenceClassification`, `ForTokenClassification`, `ForQuestionAnswering`). A model of the caller's own, which
    says nothing, is taken for the usual language model."""
    model = getattr(model, "module", model)
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate):
        return True
    return bool(can_generate()) or getattr(model, "loss_type", None) == "ForMaskedLM"


def teacher_by_name(modules: Iterable[tuple[str, object]], other_than: nn.Module | None = None) -> nn.Module | None:
    """The frozen model a student's loss compares it against, among a trainer's named attributes: the first module
    whose name says "teacher" (`teacher_model`, `teacher`, `ref_teacher` …), else a preference or RL trainer's
    reference model, `ref_model` (TRL's DPO, KTO, GRPO hold it so) — numerically a teacher: frozen, run in every
    training step, its outputs part of the loss, so a reference held in fp16 that overflows poisons the loss as a
    teacher does. Never `other_than`, the student itself (a self-distillation's alias)."""
    candidates = [(name, m) for name, m in modules if isinstance(m, nn.Module) and m is not other_than]
    for wanted in (lambda name: "teacher" in name.lower(), lambda name: name == "ref_model"):
        for name, m in candidates:
            if wanted(name):
                return m
    return None


def role_model(module: nn.Module, given: str | nn.Module, role: str) -> nn.Module:
    """The model `student=`/`teacher=` gives: itself, or the module an attribute of `module` holds by that name — else
    a BadInput that says what the name holds, before training: a teacher kept out of the module's children (a list
    hides it from Lightning's device moves and checkpoints) is given as the model itself."""
    if isinstance(given, nn.Module):
        return given
    found = getattr(module, given, None)
    if isinstance(found, nn.Module):
        return found
    owner = type(module).__name__
    held = f"{owner}.{given} is a {type(found).__name__}, not a torch module" if hasattr(module, given) \
        else f"{owner} has no attribute {given!r}"
    raise BadInput(f"{role}={given!r} names no model: {held} — pass the {role} model itself ({role}=model), or the "
                   f"name of the attribute that holds it")


def models_by_role(module: nn.Module, student: str | nn.Module | None = None,
                   teacher: str | nn.Module | None = None, optimized: set[int] | None = None) -> dict:
    """The models a module that holds them as children trains and distils from, by role: a LightningModule, a
    distillation wrapper handed to a Trainer as its model.

    The student is the attribute named `student`, else the one child module that holds every trainable tensor
    (`self.model`), else the module itself: the probes hook the forward that the training step calls, and
    causes name modules by the paths of the model the user holds. The teacher is the attribute named `teacher`,
    else the first child whose name contains "teacher" (`self.teacher`, `self.teacher_model`), else a frozen reference
    model `self.ref_model` (a DPO-style module's: `teacher_by_name`). Every other child whose tensors the optimizers
    train (`optimized`: their ids) — a projection beside the student, `self.projection` — is watched under its
    attribute's name: unwatched, a NaN gradient made there would be read as the student's (a clipping by the NaN total
    norm makes every gradient NaN). `student`/`teacher` given (`role_model`) are taken as given."""
    children = dict(module.named_children())
    if student is not None:
        found = role_model(module, student, "student")
    elif isinstance(children.get("student"), nn.Module):
        found = children["student"]
    else:
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        holders = [child for child in children.values()
                   if trainable and trainable <= {id(p) for p in child.parameters()}]
        found = holders[0] if len(holders) == 1 else module
    models = {"student": found}
    if teacher is not None:
        models["teacher"] = role_model(module, teacher, "teacher")
    else:
        named = teacher_by_name(children.items(), other_than=found)
        if named is not None:
            models["teacher"] = named
    watched = {id(p) for model in models.values() for p in model.parameters()}
    for name, child in children.items():
        tensors = {id(p) for p in child.parameters()}
        if name not in models and tensors & (optimized or set()) and not tensors & watched:
            models[name] = child
            watched |= tensors
    return models


def recompile_with_hooks(models: Iterable[nn.Module]) -> list[str]:
    """Drop torch.compile's code when some of these models' forwards were compiled before the probes' hooks existed.

    Dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`): code traced without them
    goes on running without them, so a compiled model warmed up, evaluated or trained before `Probes` were made (a
    notebook's second run, a Trainer's `torch_compile` after an earlier trainer compiled the same class) would have no
    module statistics at all — a fault inside it unplaced. `torch._dynamo.reset()`, dynamo's own remedy, makes the next
    call compile again, with the hooks. Returns the classes whose compiled forward made it reset (none: nothing done,
    as where torch was never asked to compile). Code is kept per class, not per model: a model never compiled whose
    class another model compiled earlier in the process (a notebook's earlier run) resets too — a compiled call of it
    could run that code.

    Only forwards that call other modules count: the hooks compiled code skips are those of the modules it calls, and
    a leaf's hooks run in its caller. A leaf class's code (`nn.Linear.forward`) holds compiled entries after any
    compiled model that used it ran with a graph break, though this model was never compiled."""
    dynamo = sys.modules.get("torch._dynamo")
    compiled = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "_debug_get_cache_entry_list", None)  # the compiled entries of a code object
    if dynamo is None or compiled is None:
        return []
    classes = {type(m) for model in models for m in model.modules() if next(m.children(), None) is not None}
    found = sorted(cls.__name__ for cls in classes  # the forward and what decorators wrap
                   if any(compiled(f.__code__) for f in {cls.forward, inspect.unwrap(cls.forward)}
                          if hasattr(f, "__code__")))
    if found:
        dynamo.reset()
    return found


def eager(hook: Callable) -> Callable:
    """A module hook that torch.compile calls as it is instead of tracing it into the compiled graph.

    Traced, a hook's bookkeeping (lists that grow with every module's reading) becomes guards of the graph: the
    hooks recompiled at every call and every statistics step, up to dynamo's recompile limit (a tiny GPT-2's first
    step took 19 s instead of 2.4 s). Run eagerly, a hook costs a graph break around it; on a model that is not
    compiled, ~0.5 µs a call."""
    return torch.compiler.disable(hook)


def version_of(data: torch.Tensor | None) -> int | None:
    """A tensor's version counter, which every in-place write moves (`copy_`, `buf[:] = ...`); an inference tensor keeps
    none (None: it can be written only inside inference mode, where no training forward runs)."""
    if data is None or data.is_inference():
        return None
    return data._version


def in_backward() -> bool:
    """A forward that runs inside a backward pass: gradient checkpointing recomputing a layer's forward (both the
    reentrant and the non-reentrant kind), not a forward of the step — its outputs were read the first time."""
    return graph_task_id() != -1


graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # the backward under way; -1 outside one


def group_lr(group: dict) -> float | torch.Tensor | None:
    """The lr a parameter group steps at: a number; a tensor (torch's optimizers take one) as a copy, which the
    owner moves to the host with the step's readings (a scheduler rewrites it in place); or None where the
    optimizer holds none (transformers' `Adafactor(relative_step=True)` computes its own, per tensor)."""
    lr = group.get("lr")
    if torch.is_tensor(lr):
        return lr.detach().clone()
    return None if lr is None else float(lr)


def intends_no_update(group: dict) -> bool:
    """A parameter group at lr 0: its optimizer changes none of its weights — unless the optimizer picks its own step
    size and `lr` only reports it (Adafactor's `relative_step`: transformers' `AdafactorSchedule` writes 0 there until
    the first step has computed one, and that step moves every weight)."""
    return not group.get("relative_step", False) and group.get("lr", 1.0) == 0


class Optimizers:
    """Several optimizers of one loop (a student's and a head's, at their own settings) seen as the one the probes
    read: their parameter groups in order and their state. The step's moments come from each one's hooks
    (`ProbeSet`): the pre-step moment at the first of them, the post-step one when the owner closes the step."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> _States:
        return _States([optimizer.state for optimizer in self.optimizers])


class _States(Mapping):
    """The optimizers' state dicts read as one, without inserting into their defaultdicts (a ChainMap would)."""

    def __init__(self, states: list):
        self._states = states

    def __getitem__(self, param):
        for state in self._states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self):
        return (param for state in self._states for param in state)

    def __len__(self) -> int:
        return sum(len(state) for state in self._states)


def optimizers_of(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind what the probes read: one, several (`Optimizers`) or none."""
    if optimizer is None:
        return []
    return list(getattr(optimizer, "optimizers", [optimizer]))


SAMPLE_LIMIT = 4096  # elements per tensor that estimate a fraction (lost updates, underflow)


def sample(t: torch.Tensor, limit: int = SAMPLE_LIMIT) -> torch.Tensor:
    """A fixed strided view of at most ~`limit` elements of a tensor, the same elements every step.

    Fractions (of lost updates, of flushed-to-zero entries) are estimated on it: copying and comparing
    every weight of a 124M-parameter student cost a statistics step seconds; a sample costs nothing.
    A tensor that is whole as its sample (1-D, under 2 × `limit` elements) is returned as it is: a view of it and a
    slice with step 1 would be two ops per tensor, and a statistics step samples each tensor up to three times.
    """
    t = local_shard(t)
    flat = t if t.dim() == 1 else t.reshape(-1)
    stride = max(1, flat.numel() // limit)
    return flat if stride == 1 else flat[::stride]


def sampled(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The samples of several tensors as one flat tensor: a fraction over all of them in a few ops, not
    a few per tensor (a GPT-2-sized model has ~150 tensors)."""
    return torch.cat([sample(t) for t in tensors])


class SampleViews:
    """`sampled(tensors)` for tensors read every step: the strided views are made once and kept (a view of a
    weight reads its current values), so a step costs one `cat` instead of one view per tensor and a `cat`
    (4 µs instead of 50 µs for a tiny GPT-2's 28 tensors). Rebuilt when a tensor's storage is replaced."""

    def __init__(self):
        self._key: tuple = ()
        self._views: list[torch.Tensor] = []

    def cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        key = (*map(id, tensors), *map(torch.Tensor.data_ptr, local_shards(tensors)))
        if key != self._key:
            self._key, self._views = key, [sample(t.detach()) for t in tensors]
        return torch.cat(self._views)


def sample_lengths(tensors: list[torch.Tensor]) -> torch.Tensor:
    """For `sampled(tensors)`: how many elements of it each tensor contributed (fixed for a list of tensors)."""
    device = tensors[0].device if tensors else None
    return torch.tensor([sample(t).numel() for t in tensors], device=device)


def per_tensor_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of a sampled quantity per tensor, in one kernel: [len(lengths)] on the device (a segment sum:
    5x faster on the CPU than index_add over the same elements)."""
    return torch.segment_reduce(values, "sum", lengths=lengths, initial=0)


@torch.no_grad()
def abs_max(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's absolute max as one [N] tensor on the device; NaN where a tensor holds a NaN.

    The fused foreach inf-norm is one launch on CUDA, but on the CPU it is ~15x slower than one aminmax
    pass per tensor (GPT-2's 124M weights: 360 ms against 21 ms on this project's machine). Runs under
    no_grad rather than detaching each tensor (a detach per tensor is half the cost on small models). A sharded
    tensor reads its local shard (the ranks' finiteness is combined by the caller's all-reduce).
    """
    tensors = local_shards(tensors)
    if not tensors:
        return torch.empty(0)
    if tensors[0].is_cuda:
        return torch.stack(torch._foreach_norm(tensors, math.inf))
    dtype, device = tensors[0].dtype, tensors[0].device
    if len({t.dtype for t in tensors}) > 1:
        lows, highs = zip(*(torch.aminmax(t) for t in tensors), strict=True)
        return torch.maximum(torch.stack(highs).abs(), torch.stack(lows).abs())  # abs, not neg: never -0.0
    extremes, outs = _extremes_buffer(dtype, device, len(tensors))
    for t, out in zip(tensors, outs, strict=True):
        torch.aminmax(t, out=out)
    return torch.linalg.vector_norm(extremes, math.inf, dim=0)  # |min| or |max|, in one op: never -0.0


_EXTREMES: dict[tuple, tuple[torch.Tensor, list]] = {}


def _extremes_buffer(dtype: torch.dtype, device: torch.device, count: int) -> tuple[torch.Tensor, list]:
    """A [2, count] buffer kept per (dtype, device, count) and the (min, max) 0-dim views aminmax writes into:
    the per-tensor reductions of a small model cost their dispatch, and new 0-dim results and two stacks
    doubled it (a tiny GPT-2's 28 tensors: 36 µs instead of 74). The caller's result is a new tensor."""
    key = (dtype, device, count)
    if key not in _EXTREMES:
        extremes = torch.empty(2, count, dtype=dtype, device=device)
        _EXTREMES[key] = extremes, list(zip(extremes[0].unbind(), extremes[1].unbind(), strict=True))
    return _EXTREMES[key]


def nonfinite_count_tensor(t: torch.Tensor) -> torch.Tensor:
    """NaN, +Inf and -Inf counted apart, on the device: [3]; of a sharded tensor, this rank's shard."""
    t = local_shard(t).detach()
    return torch.stack([t.isnan().sum(), (t == math.inf).sum(), (t == -math.inf).sum()])


def nonfinite_counts(t: torch.Tensor) -> dict[str, int]:
    """NaN, +Inf and -Inf counted apart (the failure path only: it moves three numbers to the host); of a
    sharded tensor, this rank's shard."""
    counts = nonfinite_count_tensor(t).tolist()
    return {"nan_count": counts[0], "posinf_count": counts[1], "neginf_count": counts[2],
            "numel": local_shard(t).numel()}


class Probe:
    """The hooks a probe may implement; each is a no-op by default."""

    name = "probe"

    def __init__(self, ctx: ProbeContext):
        self.ctx = ctx

    def begin_step(self) -> None: ...

    def gradients_ready(self) -> None: ...

    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self) -> None: ...

    def take_readings(self) -> dict[str, torch.Tensor]:
        """This step's device readings, handed over once: the probe forgets them."""
        return {}

    def record(self, host: dict) -> dict:
        """The step's readings on the host (all probes' together) into events; returns metrics columns."""
        return {}

    def conclude(self) -> None:
        """The run completed: what only its whole length shows (a failed or interrupted run ended for its own
        reason, and says nothing about what a full run would have done)."""

    def close(self) -> None: ...


def to_host(*groups: dict[str, torch.Tensor]) -> list[dict[str, float | list[float]]]:
    """Every device reading of a step in one transfer: one host sync instead of one per value.

    0-dim readings come back as floats, 1-D ones (per-tensor vectors) as lists; one dict per group. The 0-dim ones
    go in one stack, the rest as they are (detached only where autograd tracks them, a vector not reshaped): a step's
    dozen readings cost four ops, not three each. cat promotes mixed dtypes to the widest, exactly — except integer
    counts beside only 16-bit floats: then each reading is made float32 first.
    """
    readings = [v.detach() if v.requires_grad else v for group in groups for v in group.values()]
    dtypes = {v.dtype for v in readings}
    if functools.reduce(torch.promote_types, dtypes, torch.bool) in (torch.float16, torch.bfloat16) \
            and any(not d.is_floating_point for d in dtypes):  # cat would make an integer count 16-bit: rounded
        readings = [v.float() for v in readings]  # (bfloat16), or Inf past 65504 (float16)
    scalars = [v for v in readings if v.dim() == 0]
    parts = [torch.stack(scalars)] if scalars else []
    parts += [v if v.dim() == 1 else v.reshape(-1) for v in readings if v.dim()]
    values = torch.cat(parts).float().tolist() if parts else []
    out, scalar, i = [], 0, len(scalars)
    for group in groups:
        host = {}
        for name, value in group.items():
            if value.dim() == 0:
                host[name], scalar = values[scalar], scalar + 1
            else:
                size = value.numel()
                host[name], i = values[i:i + size], i + size
        out.append(host)
    return out
