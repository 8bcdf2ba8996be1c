"""Probes for Hugging Face Trainer and TRL users: one callback, the same events and diagnosis.

    trainer = Trainer(model=model, args=args, train_dataset=data)      # or trl.DistillationTrainer, GKDTrainer, ...
    diag = SarkdDiagCallback.attach(trainer, "runs/hf")
    trainer.train()
    print(diag.probes.diagnosis())

A callback is handed only what transformers hands every callback (the model, the accelerate-wrapped optimizer,
`args` and `state`), which holds neither a distillation trainer's teacher nor the loss of a trainer whose student
forward returns no `loss` (TRL's DistillationTrainer runs the student's backbone and a chunked divergence, never
`model(...).loss`). So the callback binds to its trainer (`_bind`): `attach` at once, a callback passed in
`Trainer(..., callbacks=[SarkdDiagCallback(dir)])` at `on_init_end` (the end of `Trainer.__init__`), one given by
`trainer.add_callback(...)` at `on_train_begin` — each where it finds the Trainer calling it up the call stack.
Bound, it reads both from the trainer itself, reads the gradients before the Trainer clips them, and replays a
micro-batch's `compute_loss` whose loss turned non-finite between statistics steps.
"""

from __future__ import annotations

import copy
import dis
import functools
import inspect
import math
from collections.abc import MutableMapping
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..contract.numerics import dtype_name
from ..contract.wording import counted
from . import Probes, check_own_directory, check_probe_settings, chosen, replace_method
from .base import dtype_of_most, models_by_role, scores_tokens, teacher_by_name, weights_compute_dtype
from .forwards import is_data

ON_CRITICAL = ("stop", "record")


def trainer_precision(args, model: nn.Module, autocast: bool = True) -> dict:
    """The precision a Trainer runs in, named from `TrainingArguments` and the weights' dtype.

    The weights alone say `fp32` for a run under bf16 autocast (`bf16=True` keeps fp32 master weights), so
    the mode comes from what the user asked the Trainer for, in the same vocabulary as sarkd-diag's own
    runs: fp16=True with fp32 weights is `mixed` (autocast + GradScaler), bf16=True is `bf16-mixed`, and a
    model already cast to fp16/bf16 trains its weights in that dtype (`pure-fp16`/`pure-bf16`). Without either,
    fp32 trainable tensors over frozen fp16/bf16 weights (LoRA over a base loaded in fp16) compute in the frozen
    weights' dtype: `mixed`/`bf16-mixed` without autocast. `autocast`: whether the Trainer's accelerator applies the
    one asked for (`native_amp`) — accelerate runs fp16=True on the CPU with neither autocast nor a loss scaler, in
    the weights' dtype, and the mode is then the weights'.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = dtype_of_most(trainable)  # a few modules kept in fp32 (`_keep_in_fp32_modules`) leave a bf16 model bf16
    several = len({p.dtype for p in trainable}) > 1
    name = f"mostly {dtype_name(weights)}" if several else dtype_name(weights) if weights is not None else "no"
    pure = {torch.float16: "pure-fp16", torch.bfloat16: "pure-bf16"}
    frozen = weights_compute_dtype(model) if weights == torch.float32 else None
    over = f" over frozen {dtype_name(frozen)} weights" if frozen in (torch.float16, torch.bfloat16) else ""
    asked = "fp16" if getattr(args, "fp16", False) else "bf16" if getattr(args, "bf16", False) else None
    requested = f"TrainingArguments({asked}=True)" if asked else "TrainingArguments()"
    if asked and autocast:
        mode = pure.get(weights, {"fp16": "mixed", "bf16": "bf16-mixed"}[asked])
    else:
        wider = {torch.float16: "mixed", torch.bfloat16: "bf16-mixed"}.get(frozen, "fp32")
        mode = {**pure, torch.float32: wider}.get(weights, "external")
    unapplied = ", which its accelerator runs without autocast on this device" if asked and not autocast else ""
    return {"mode": mode, "requested": requested,
            "reason": f"transformers Trainer: {requested}{unapplied} with {name} trainable weights{over}"}


def trainer_teacher(trainer) -> nn.Module | None:
    """The teacher a trainer holds (`teacher_by_name` of its attributes), unwrapped from accelerate/DeepSpeed: TRL's
    DistillationTrainer and GKDTrainer keep it as `teacher_model` (prepared with `accelerator.prepare_model`), a
    Trainer subclass written for KD by hand as `self.teacher`, `self.ref_teacher` …, TRL's DPO its reference as
    `ref_model`."""
    accelerator = getattr(trainer, "accelerator", None)
    unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: getattr(m, "module", m))
    student = getattr(trainer, "model", None)
    student = unwrap(student) if isinstance(student, nn.Module) else None
    modules = ((name, unwrap(value)) for name, value in vars(trainer).items() if isinstance(value, nn.Module))
    return teacher_by_name(modules, other_than=student)


def trainer_models(model: nn.Module, teacher: nn.Module | None, optimizer) -> dict:
    """The models a Trainer trains and distils from, by role: its model, the student, beside the trainer's teacher;
    where the trainer holds none and its model holds the teacher as a child (a distillation model: `self.student` and
    `self.teacher` in one module whose forward returns the KD loss), the model's children by role (`models_by_role`),
    so the teacher is watched as such — its overflow a `teacher_overflow`, not the student's — and each is named by its
    own module paths."""
    if teacher is not None:
        return {"student": model, "teacher": getattr(teacher, "module", teacher)}
    if teacher_by_name(model.named_children()) is None:
        return {"student": model}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]} if optimizer is not None else None
    return models_by_role(model, optimized=optimized)


class SarkdDiagCallback(TrainerCallback):
    """Records a Trainer's numerical events into a run directory and stops training on non-finite weights.

    Each optimizer step of the Trainer is one probe step, numbered `state.global_step` like the Trainer's
    own logs and checkpoints, so a run resumed from a checkpoint into the same directory appends after the
    last recorded step instead of starting again at 1; a second `train()` (global_step 0 again) into a directory
    that holds steps is numbered on after them. The precision is named from `TrainingArguments`
    (see `trainer_precision`), and fixes are written in TrainingArguments' terms (`caller="trainer"`).

    on_critical: "stop" (default) sets `control.should_training_stop` once the probes record a critical
    event (non-finite weights): every later step would only train NaN weights, and the Trainer would save
    them as checkpoints — nor is the checkpoint of the stopping step itself saved. The run closes as `stopped` with
    its diagnosis. "record" keeps training.

    The run directory holds config.json from the first step, and events and metrics are flushed as they
    are written. The Trainer calls no callback on an exception: a bound callback wraps `trainer.train` and closes
    the run as `failed` (`interrupted` on Ctrl-C) when it raises; a `train()` it was not bound before (the first of a
    callback given by `add_callback`) leaves the directory readable, and `sarkd-diag report RUN` closes it as `crashed`.
    """

    def __init__(self, run_dir: str | Path | None = None, level: str = "standard", every: int = 10,
                 on_critical: str = "stop", teacher: nn.Module | None = None):
        on_critical, level = chosen(on_critical, ON_CRITICAL, "on_critical"), check_probe_settings(level, every)
        # None: `<output_dir>/sarkd-diag` of the Trainer that runs it (see `trainer_run_dir`)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.level, self.every = level, every
        self.on_critical, self.teacher, self._given_teacher = on_critical, teacher, teacher
        self.probes: Probes | None = None
        self.stopped_at: int | None = None  # the step whose critical event stopped training
        self._trainer = None  # bound by `attach`, else at `on_init_end`/`on_train_begin` to the Trainer calling it
        self._unbind: list = []  # what puts the bound trainer's methods back
        self._losses: list[torch.Tensor] = []
        self._offset = 0  # added to the Trainer's global_step: the steps an earlier train() recorded
        self._loss_call = None  # (compute_loss, args, kwargs) of the micro-batch under way (attach)
        self._call_loss = None  # the loss that call returned (in a training_step: `_bind`)
        self._replayed_at: int | None = None  # the step whose non-finite loss was replayed
        self._train_calls = 0  # the bound trainer's train() calls entered; `_began_in`: the one the probes began in
        self._began_in: int | None = None
        self._raised: BaseException | None = None  # what the last training_step raised

    @classmethod
    def attach(cls, trainer, run_dir: str | Path | None = None, **kwargs) -> SarkdDiagCallback:
        """Add the callback to `trainer`, bound to it now (`_bind`): its teacher is known before `train()`."""
        callback = cls(run_dir, **kwargs)
        callback._check_run_dir(trainer.args)
        callback._bind(trainer)
        trainer.add_callback(callback)
        return callback

    def _bind(self, trainer) -> None:
        """Read from `trainer` what callbacks are not handed: the teacher of a distillation trainer (watched as
        `teacher`, so an overflowing teacher is named as such; unless one was given), the loss scaler of the trainer's
        accelerator, and the loss `training_step` returns (recorded, not changed) with the `compute_loss` call a
        replay repeats. Bound to another trainer before (a callback object reused), that one's methods are put back."""
        if trainer is self._trainer:
            return
        for restore in self._unbind:
            restore()
        self._trainer = trainer
        self._find_teacher()
        training_step, compute_loss = trainer.training_step, trainer.compute_loss

        @functools.wraps(training_step)
        def recorded_training_step(*args, **kw):
            self._loss_call = self._call_loss = None
            try:
                loss = training_step(*args, **kw)
            except Exception as exc:
                self._raised = exc
                # the backward raised on the micro-batch's non-finite loss (`torch.autograd.detect_anomaly()`'s
                # "returned nan values"), or `compute_loss` did on the model's (a guard of the user's): no optimizer
                # step came, the weights are still those that made it
                loss = self._call_loss
                if loss is None and self.probes is not None and self.probes.set.loss is not None \
                        and self.probes.set.loss.outputs_nonfinite():
                    loss = torch.tensor(math.nan)
                if loss is not None:
                    self._replay_if_nonfinite(loss, read_anyway=True)
                raise
            self._losses.append(loss.detach())
            self._replay_if_nonfinite(loss)
            return loss

        @functools.wraps(compute_loss)
        def recorded_compute_loss(*args, **kw):
            # what a replay calls again: the inputs as handed, since `compute_loss` pops the labels out of its dict
            # (label smoothing, a `compute_loss_func`); a shallow copy, the tensors are not copied
            self._loss_call = (compute_loss, tuple(_as_handed(a) for a in args),
                               {k: _as_handed(v) for k, v in kw.items()})
            result = compute_loss(*args, **kw)
            self._call_loss = result[0] if isinstance(result, tuple) else result
            if self.probes is not None:
                self.probes.set.observe_loss_graph(result)
                if kw.get("num_items_in_batch") is not None and self.probes.events.say_once("num_items_read"):
                    self._check_items_read(compute_loss)
            return result

        train = trainer.train

        @functools.wraps(train)
        def closing_train(*args, **kw):
            self._train_calls += 1
            try:
                return train(*args, **kw)
            except BaseException as exc:
                self._close_on(exc)
                raise

        self._unbind = [replace_method(trainer, "training_step", recorded_training_step),
                        replace_method(trainer, "compute_loss", recorded_compute_loss),
                        replace_method(trainer, "train", closing_train)]

    def _check_items_read(self, compute_loss) -> None:
        """Once, at the first `compute_loss` handed `num_items_in_batch` (the step's target count over all its
        micro-batches): the Trainer leaves each micro-batch's loss undivided by `gradient_accumulation_steps` where it
        counts on `compute_loss` to have divided by that count (a model that takes loss kwargs, a `compute_loss_func`).
        An override of `compute_loss` — a KD trainer's — whose code never reads it, nor the `**kwargs` it came in,
        returns each micro-batch's mean loss undivided: the step's gradient is their sum, that many times the batch's
        (`num_items_ignored`). Read off the override's bytecode; the framework's own `compute_loss` is theirs to get
        right."""
        trainer, function = self._trainer, inspect.unwrap(getattr(compute_loss, "__func__", compute_loss))
        steps = getattr(trainer.args, "gradient_accumulation_steps", 1)
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:  # as the Trainer decides it (transformers before `loss_is_scaled_for_ga`: the same terms)
            scaled = bool(getattr(trainer, "model_accepts_loss_kwargs", False)
                          or getattr(trainer, "compute_loss_func", None) is not None)
        if steps <= 1 or not scaled or (function.__module__ or "").split(".")[0] in ("transformers", "trl") \
                or _reads_count(function):
            return
        self.probes.events.record(
            "setup_note", "warning",
            f"{type(trainer).__name__}.compute_loss is handed num_items_in_batch and never reads it, while the Trainer "
            f"leaves each micro-batch's loss undivided for it (gradient_accumulation_steps={steps}): each step's "
            f"gradient is the sum of {steps} micro-batches' mean losses, {steps}× the batch's",
            step=self.probes.ctx.step, phase="loss", probe="loss", model="student", value=float(steps),
            code="num_items_ignored")

    def _check_run_dir(self, args) -> None:
        """Refuse the Trainer's own `output_dir` as the run directory (`check_own_directory`), where the callback first
        learns both — attached, built with its Trainer (`on_init_end`), or added to one (`on_train_begin`) —, before
        any step: the run recorded there would be lost at the first `save_model()`, and its resume would fail inside
        `train()`."""
        check_own_directory(self.run_dir, [(getattr(args, "output_dir", None),
                                            "the Trainer's output_dir, where it writes its checkpoints and "
                                            "`trainer.save_model()` the model's config.json over the run's")])

    def _find_teacher(self) -> None:
        """The teacher to watch: the one given, else the bound trainer's (`trainer_teacher`)."""
        if self._given_teacher is None and self._trainer is not None:
            self.teacher = trainer_teacher(self._trainer)

    def _close_on(self, exc: BaseException) -> None:
        """`train()` raised, and transformers calls no callback on an exception: the run is closed here as `interrupted`
        (Ctrl-C) or `failed`, with its finished steps and diagnosis, and the hooks and log files are let go — left open
        in a notebook's kernel, they would go on watching the model, and `sarkd-diag report` would refuse the run as one
        a live process still writes."""
        if self.probes is not None:
            self.probes.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", exc)

    def _replay_if_nonfinite(self, loss: torch.Tensor, read_anyway: bool = False) -> None:
        """A micro-batch's loss is non-finite on a step without per-module statistics: run its `compute_loss` again,
        under no_grad with them on — before the optimizer step, so from the weights that made the loss (the
        student's and a teacher's forwards, whatever the trainer's loss does) — to name the module where the
        non-finite value began. The Trainer reads every micro-batch's loss on the host anyway
        (`logging_nan_inf_filter`, on by default), so checking it here costs no transfer more; the replay (one
        forward, on the failure path only) draws no random numbers the run would (`fork_rng`). Once a step, before
        any weight is non-finite (after that every module's output is), in a single process (a replay on one rank
        of a sharded or DDP model would wait on the others). `read_anyway`: the loss is read on the host whatever
        `logging_nan_inf_filter` says (`training_step` raised: the run is ending, the read costs it nothing). First,
        once a run, the batch handed to `compute_loss` is read (`_nonfinite_data`): data the model never sees — a
        teacher's logits stored beside the tokens — reaches the loss by no module a replay reads."""
        probes, call, self._loss_call = self.probes, self._loss_call, None
        if (probes is None or call is None or probes.critical or self._replayed_at == probes.ctx.step
                or not (read_anyway or getattr(self._trainer.args, "logging_nan_inf_filter", False))
                or _finite(loss)):
            return
        self._replayed_at = probes.ctx.step
        compute_loss, args, kwargs = call
        if probes.events.say_once("loss_inputs_read"):
            _nonfinite_data(probes, args, kwargs)
        if not probes.ranks.distributed and probes.set.needs_replay(math.nan):
            probes.set.replay_apart(lambda: compute_loss(*args, **kwargs))

    # ------------------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, **kwargs):
        """`Trainer(..., callbacks=[...])` is building its trainer: bound now, the callback wraps the first `train()`
        too, so one that raises closes its run (see `_bind`). A subclass sets its teacher after `Trainer.__init__`:
        it is looked up again at `on_train_begin`. A callback bound already (attached to another trainer) stays so
        until this one trains: building a trainer is not running it."""
        self._check_run_dir(args)
        trainer = running_trainer(self)
        if trainer is not None and self._trainer is None:
            self._bind(trainer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_run_dir(args)
        restarted = self.probes is not None and not self.probes.closed and self._began_in == self._train_calls
        if restarted:  # the Trainer starts its loop again inside the train() under way: its steps are numbered anew
            abandoned = self.probes.ctx.step - 1 - self._offset
            self.probes.close("interrupted")
        elif self.probes is not None:  # a second train() on the same callback appends to the same directory
            self.probes.close("completed")
        trainer = running_trainer(self)
        if trainer is not None:
            self._bind(trainer)
        self._find_teacher()
        models = trainer_models(model, self.teacher, optimizer)
        # the Trainer hands callbacks accelerate's AcceleratedOptimizer: Probes watches the optimizer inside it
        # and takes the loss scaler it carries (or, attached, the trainer's accelerator's)
        # on a resume the Trainer has loaded the checkpoint's state before this event: global_step is the
        # checkpoint's step, and what the directory recorded after it (steps redone now) is cut away
        accelerator = getattr(self._trainer, "accelerator", None)
        self.probes = Probes(models, optimizer=optimizer, scaler=getattr(accelerator, "scaler", None),
                             run_dir=self.run_dir or trainer_run_dir(args), level=self.level, every=self.every,
                             precision=trainer_precision(args, models["student"],
                                                         getattr(accelerator, "native_amp", True)),
                             caller="trainer",
                             resumed_from=self._offset + state.global_step if restarted else state.global_step or None)
        if accelerator is not None:  # gradients read before the Trainer clips them; its norm as `grad_norm`
            self.probes.watch_accelerator(accelerator)
        # a train() from global_step 0 into a directory that holds steps (a second train() call) continues after
        # them instead of at 1
        self._offset = self.probes.first_step - 1 if state.global_step == 0 else 0
        if restarted:
            self._note_restart(state, abandoned)
        self._began_in, self._raised = self._train_calls, None
        self.probes.begin_step(self._offset + state.global_step + 1)
        self.stopped_at = None
        self._losses = []

    def _note_restart(self, state, abandoned: int) -> None:
        """The Trainer began its training loop again without ending it, inside the same `train()`: its
        `auto_find_batch_size` caught an out-of-memory error and retries at a smaller batch size, numbering its steps
        (logs, checkpoints) from the same global_step again. The record follows the Trainer's numbering, as on a
        resume: the abandoned attempt's steps are cut (`resumed_from`), and the restart is said, not left silent."""
        first = self._offset + state.global_step + 1
        error = f"{type(self._raised).__name__} in a training step" if self._raised is not None else "an error"
        batch = getattr(state, "train_batch_size", None)
        at_batch = f" at batch size {batch}" if batch else ""
        cut = (f"what the abandoned attempt recorded ({counted(abandoned, 'step')}) is cut from it, its updates kept "
               "in the weights") if abandoned else "the abandoned attempt had finished no step"
        self.probes.events.record(
            "setup_note", "info",
            f"the Trainer began its training loop again at step {first}{at_batch}, inside the same train(), after "
            f"{error} it caught (auto_find_batch_size): the record follows the Trainer's step numbering — {cut} — "
            "and the loss rules judge the new attempt on its own",
            code="trainer_restarted", step=first, probe="loop")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.probes is not None:
            self.probes.begin_step(self._offset + state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        """The Trainer has stepped the optimizer, zeroed the gradients and counted the step: close it."""
        if self.probes is None:
            return
        # training_step returns each micro-batch's loss already divided for gradient accumulation: their sum is
        # the step's loss, as the Trainer logs it
        losses = self._losses
        loss = None if not losses else losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        self._losses = []
        self.probes.step(loss=loss)
        if self.probes.critical and self.on_critical == "stop" and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
        self._unsaved_once_stopped(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unsaved_once_stopped(control)

    def _unsaved_once_stopped(self, control) -> None:
        """Stopped on non-finite weights: the checkpoint the Trainer would save of them now — the stopping step a
        `save_steps` multiple, the epoch's end under `save_strategy="epoch"` — holds only NaN, and under
        `save_total_limit` it would rotate out the last good checkpoint, the one to resume from. It is not saved."""
        if self.stopped_at is not None:
            control.should_save = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """The Trainer evaluated (`eval_strategy`, or `trainer.evaluate()` — also after `train()`, into the closed
        run): its loss becomes the eval row after the step it evaluated, NaN kept NaN. Its exp is a perplexity only
        where the loss is a language model's cross-entropy over its tokens: a distillation trainer (a teacher watched)
        evaluates its distillation objective, a sequence classifier or regressor (`ForSequenceClassification`) its
        labels' cross-entropy or squared error — there `eval_ppl` is left unmeasured. Before the first `train()`
        there is no run to record it in (the probes are built at `on_train_begin`)."""
        if self.probes is None or not metrics:
            return
        prefix = evaluation_prefix(metrics)
        if prefix is not None and f"{prefix}_loss" in metrics:
            distils = "teacher" in self.probes.ctx.models
            self.probes.evaluation(self._offset + state.global_step, metrics[f"{prefix}_loss"],
                                   cross_entropy=not distils and scores_tokens(model),
                                   eval_set=evaluation_set(prefix))

    def on_train_end(self, args, state, control, **kwargs):
        if self.probes is not None:
            self.probes.close("stopped" if self.stopped_at is not None else "completed")


def trainer_run_dir(args) -> Path:
    """The run directory of a callback given none — `callbacks=[SarkdDiagCallback]`, the class, which transformers
    builds with no arguments as it does its own callbacks: `sarkd-diag` inside the Trainer's `output_dir`, beside its
    checkpoints, as the TensorBoard callback logs under `output_dir/runs`."""
    return Path(args.output_dir) / "sarkd-diag"


def evaluation_prefix(metrics: dict) -> str | None:
    """The `metric_key_prefix` of one `Trainer.evaluate()`'s metrics: `eval` by default, `eval_<name>` for each set
    of an `eval_dataset` dict, whatever the caller passed otherwise — read off the `<prefix>_runtime` every
    evaluation reports (its loss is `<prefix>_loss`)."""
    return next((key.removesuffix("_runtime") for key in metrics if key.endswith("_runtime")),
                "eval" if "eval_loss" in metrics else None)


def evaluation_set(prefix: str) -> str | None:
    """The name of the evaluation data a prefix stands for: None for the Trainer's one unnamed `eval` set, the dict
    key of `eval_<name>`, the prefix itself where the caller chose one (`evaluate(metric_key_prefix="test")`)."""
    return None if prefix == "eval" else prefix.removeprefix("eval_")


def running_trainer(callback: TrainerCallback):
    """The Trainer whose callback handler is calling `callback` now, found up the call stack: transformers hands a
    callback the model and optimizer, never the trainer, so `Trainer(callbacks=[SarkdDiagCallback(dir)])` and
    `trainer.add_callback(...)` would miss the teacher, the accelerator and the loss `training_step` returns. None
    when no Trainer that holds this callback is calling (a loop that drives callbacks by itself)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and any(c is callback for c in owner.callback_handler.callbacks):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _reads_count(function) -> bool:
    """Whether `function`'s own code reads its `num_items_in_batch` parameter, or the `**kwargs` it would come in
    (handed on, it may be read further down) — or hands either to an inner function."""
    code = getattr(function, "__code__", None)
    if code is None:
        return True  # no Python code to read: not judged
    names = {name for name, parameter in inspect.signature(function).parameters.items()
             if name == "num_items_in_batch" or parameter.kind is inspect.Parameter.VAR_KEYWORD}
    if names & set(code.co_cellvars):
        return True
    return any(instruction.opname.startswith("LOAD_") and names & set(
        instruction.argval if isinstance(instruction.argval, tuple) else (instruction.argval,))
        for instruction in dis.get_instructions(code))


def _as_handed(value):
    """A mutable mapping (the batch's inputs: a dict, a BatchEncoding) as it is now, for a call to be repeated after the
    callee changed it: a shallow copy, its tensors shared; anything else as it is."""
    return copy.copy(value) if isinstance(value, MutableMapping) else value


def _nonfinite_data(probes: Probes, args: tuple, kwargs: dict) -> None:
    """The first tensor of the batch `compute_loss` was handed (its dict's entries, by key) that holds NaN or +Inf:
    bad data, recorded as `nonfinite_batch` at that key. Only data — tensors no differentiable op made —, and -Inf is
    no fault: it is how a mask is written (a teacher's logits over a masked vocabulary)."""
    batch = [(name, value) for argument in (*args, *kwargs.values()) if isinstance(argument, MutableMapping)
             for name, value in argument.items()]
    for name, value in batch:
        if is_data(value) and bool((value.isnan() | (value == math.inf)).any()):
            holds = "NaN" if bool(value.isnan().any()) else "+Inf"
            probes.events.record("nonfinite_batch", "critical",
                                 f"the batch handed to compute_loss at step {probes.ctx.step} holds {holds} in "
                                 f"{name!r}: bad data, not precision", step=probes.ctx.step, phase="loss",
                                 probe="loss", model="student", tensor=name)
            return


def _finite(loss: torch.Tensor) -> bool:
    """Whether a training_step's loss is finite, read on the host (one value: `item`, the cheapest read)."""
    return math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
