"""Which forwards are training forwards, what precision they ran in, and whether their inputs were finite.

A hook before each watched model's own forward (the root module, not its layers) decides whether this
forward belongs to a training step. Nothing in it generates (a forward handed a KV cache, or one that a generation
model's `generate` runs — with `use_cache=False` no cache is handed) nor runs inside a backward pass (gradient
checkpointing's recomputation). A model with weights the run updates
trains in a forward with gradients on, whatever its mode: a loop that never calls `model.train()` (a model as
`from_pretrained` returns it, in eval mode) trains in eval mode, and its statistics must not go blind. A frozen
model (the teacher) runs under no_grad in training and in evaluation alike, so its forward counts while a
trained model is in the mode its training forwards ran in (`ProbeContext.training_mode`, followed as modes are
switched during the run; before its first one, in `train()` mode or not yet seen in a no-grad forward). So a
frozen teacher's forward during a step counts; evaluation and generation (no-grad forwards: the student in eval
mode, TRL's on-policy samples) do not, and the per-module statistics skip them. The one case this cannot tell
apart: a loop that trains in eval mode and evaluates a teacher too — its evaluation's teacher forwards count. A
teacher left `requires_grad=True` in a module an optimizer was built over whole is in the optimizer, but runs under
no_grad: no gradient reaches it, and its forwards are a frozen model's (`_used_frozen`).

A frozen model whose training forward runs in `train()` mode with dropout on — a Dropout module with p above 0, or a
transformers attention's `config.attention_dropout` — draws a new mask each forward: the KD targets are noisy and the
teacher's forward is not deterministic, while nothing it computes trains (a `teacher_dropout_on` note, once per model;
a module that holds both models switched to `train()` — Lightning's, at every fit — switches the teacher with it).

The same hook reads what the weights cannot tell: whether autocast was on, and in which dtype (a Trainer
or accelerate run under bf16 autocast holds fp32 weights), and whether a floating-point input holds NaN
(an `inputs_embeds` of bad data) — one device reduction per floating input, read with the step's readings. An input
computed from weights that train (another model's output, with a `grad_fn`) is no data: its NaN is theirs.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from .base import Probe, eager, in_backward, version_of


def is_generating(kwargs: dict) -> bool:
    """A forward called by `generate`: transformers hands it the KV cache (or asks for one)."""
    return kwargs.get("past_key_values") is not None or kwargs.get("use_cache") is True


def in_generate() -> bool:
    """A forward that a generation model's `generate` runs, found up the call stack: generation without a KV cache
    (`use_cache=False`, as gradient checkpointing sets it and TRL's GKD then generates the teacher's sequences with)
    looks like any no-grad forward by its arguments. A generation model is a module with transformers' generation
    API (`prepare_inputs_for_generation`: its models, PEFT's wrappers of them), not any module with a method of that
    name (a GAN-style module's `generate` that runs the training step). Frame names are compared first; only a
    `generate` frame's locals are read."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "generate" and _generates_text(frame.f_locals.get("self")):
            return True
        frame = frame.f_back
    return False


def unwritten(versions: list[tuple[torch.Tensor, int | None]]) -> bool:
    """Each tensor's version counter is the one noted beside it: none was written in place since."""
    return all(version_of(t) == version for t, version in versions)


def as_it_ran(forward: tuple) -> bool:
    """A kept forward's tensor inputs hold what they held when it ran."""
    return unwritten(forward[4])


def is_data(value) -> bool:
    """A floating-point tensor input whose NaN would be bad data: one no differentiable op made. An input with a
    `grad_fn` was computed in this step from weights that train — another watched model's output (the student's
    hidden states a projection reads, a vision tower's features a language model reads), an `inputs_embeds` looked up
    from the embeddings — so a NaN in it is those weights' or that model's, named at its own modules, not the data's."""
    return torch.is_tensor(value) and value.is_floating_point() and value.grad_fn is None and value.numel() > 0


def _copied(value):
    return value.detach().clone() if torch.is_tensor(value) else value


def _generates_text(owner) -> bool:
    return isinstance(owner, nn.Module) and callable(getattr(owner, "prepare_inputs_for_generation", None))


def output_nodes(output) -> list:
    """The autograd nodes of the tensors a forward returned: a tensor, a tuple or dict of them (a ModelOutput), one
    level of nesting (the hidden states' tuple)."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else (output,)
    nodes = []
    for value in values:
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if torch.is_tensor(t) and t.grad_fn is not None:
                nodes.append(t.grad_fn)
    return nodes


class ForwardProbe(Probe):
    name = "forwards"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._trainable = {name: ctx.trains(name) for name in ctx.models}
        # teachers whose tensors the optimizer holds, seen running under no_grad: used frozen (`_used_frozen`)
        self._run_frozen: set[str] = set()
        self._nan_inputs: list[tuple[str, str, torch.Tensor]] = []  # (model, input name, any-NaN flag)
        self._reported = False
        self._copies_inputs = False  # the loop rewrites its input tensors in place: forwards are kept with copies
        self._last_inputs: list[tuple[weakref.ref, int | None]] = []  # the last training forward's tensors
        # a weight of each model, whose device says where it computes: `next(model.parameters())` walks the module
        # tree, 20 µs a forward on a tiny GPT-2 (a weight moved by `.to()` keeps its object and reads its new device)
        self._a_weight = {name: next(model.parameters(), None) for name, model in ctx.models.items()}
        self._handles = [module.register_forward_pre_hook(eager(self._before_forward(name)), with_kwargs=True)
                         for name, module in ctx.whole_forward_hooks()]
        self._handles += [module.register_forward_hook(eager(self._after_forward(name)))
                          for name, module in ctx.whole_forward_hooks() if self._trainable[name]]
        self._dropout_read: set[str] = set()  # the frozen models whose dropout was read in train mode

    def _step_under_way(self) -> bool:
        """A training step is under way: some model this run trains is in the mode its training forwards ran in —
        before its first, in `train()` mode, or not yet seen in a no-grad forward (an evaluation)."""
        ctx = self.ctx
        for name in (name for name, trainable in self._trainable.items() if trainable and name not in self._run_frozen):
            mode, training = ctx.training_mode.get(name), ctx.models[name].training
            if training == mode or (mode is None and (training or ctx.training_forward.get(name, True))):
                return True
        return False

    def _before_forward(self, model_name: str):
        def hook(_caller: nn.Module, args: tuple, kwargs: dict):
            model = self.ctx.models[model_name]  # not a compiled wrapper the hook sits on: its replay runs eagerly
            trainable = self._trainable[model_name] and (torch.is_grad_enabled() or not self._used_frozen(model_name))
            # a trained model's generation runs under no_grad (generate's own decorator); a frozen model's forwards
            # run under no_grad in training too, so whether a `generate` runs them is looked up
            training = (not is_generating(kwargs) and not in_backward()
                        and (torch.is_grad_enabled() if trainable else self._step_under_way() and not in_generate()))
            self.ctx.training_forward[model_name] = training
            if not training:
                return
            if trainable:
                self.ctx.training_mode[model_name] = model.training
            elif model.training and model_name not in self._dropout_read:
                self._dropout_read.add(model_name)
                self._note_dropout(model_name, model)
            self.ctx.trained = self.ctx.forward_since_update = True
            self.ctx.training_forwards += int(trainable)
            weight = self._a_weight[model_name]
            if trainable and weight is not None and torch.is_autocast_enabled(weight.device.type):
                self.ctx.autocast = torch.get_autocast_dtype(weight.device.type)
            self._note_refill(args, kwargs)
            if self.ctx.step_forwards is not None and weight is not None and not self.ctx.replaying:
                device = weight.device.type
                autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                self.ctx.step_forwards.append(self._kept_for_replay(model, args, kwargs, autocast))
            inputs = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
            for name, value in inputs:
                if is_data(value):
                    self._nan_inputs.append((model_name, name, value.isnan().any()))  # untracked: no detach
        return hook

    def _used_frozen(self, model_name: str) -> bool:
        """A teacher (a role whose name says so) whose tensors the optimizer holds runs under no_grad: left
        `requires_grad=True` inside the module an optimizer was built over whole (a distillation model handed to the
        Trainer, a LightningModule's `self.parameters()`). No gradient reaches it, so nothing trains it: its forward is
        a frozen model's, read while a step is under way — read as a trained model's, under no_grad none would count,
        and its overflow would go unseen. A trained model's own no_grad forwards (an evaluation, a generation, a
        reference pass with its adapters off) stay no training forwards: by its role alone can a teacher be told."""
        if "teacher" not in model_name.lower():
            return False
        self._run_frozen.add(model_name)
        return True

    def _after_forward(self, model_name: str):
        def hook(_model: nn.Module, _args: tuple, output) -> None:
            """A trained model's training forward returned: the autograd nodes of what it returned (its loss, logits,
            hidden states), where a caller's own loss computation begins (`loss_graph`)."""
            if self.ctx.training_forward.get(model_name):
                self.ctx.output_nodes.extend(output_nodes(output))
        return hook

    def _note_dropout(self, model_name: str, model: nn.Module) -> None:
        """A frozen model in train mode with dropout on: its outputs, the KD targets, come through a random mask."""
        active = [(name, float(m.p)) for name, m in model.named_modules()
                  if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
        attention = float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0)
        if attention > 0:
            active.append(("config.attention_dropout", attention))
        if not active:
            return
        module, p = max(active, key=lambda found: found[1])
        self.ctx.events.record("setup_note", "warning",
                               f"{model_name} runs its forward in train() mode with dropout on ({module}, p={p:g}; "
                               f"{len(active)} in all) though nothing of it trains: each forward draws a new mask, so "
                               "its outputs — the KD targets — are noisy and not deterministic",
                               step=self.ctx.step, phase="forward", probe=self.name, model=model_name, module=module,
                               value=p, numel=len(active), code="teacher_dropout_on")

    def _kept_for_replay(self, model: nn.Module, args: tuple, kwargs: dict, autocast: torch.dtype | None) -> tuple:
        """A training forward kept for a replay of its step: (model, args, kwargs, autocast, the version counter of
        each tensor input). A loop that refills one input buffer for each micro-batch (`buf.copy_(batch)`) hands every
        forward the same tensor, which holds the last batch by the time a replay runs: a replay would read that batch
        as each one's and could find every output finite where one batch's data made the NaN. The versions tell (see
        `as_it_ran`); once the loop is seen refilling (`_note_refill`), the inputs are kept as copies."""
        if self._copies_inputs:
            args, kwargs = tuple(map(_copied, args)), {name: _copied(value) for name, value in kwargs.items()}
        versions = [(t, version_of(t)) for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        return model, args, kwargs, autocast, versions

    def _note_refill(self, args: tuple, kwargs: dict) -> None:
        """Whether this training forward is handed a tensor the one before it was, written in place since: the loop
        refills an input buffer. Watched on every step, statistics steps too, so the first step a replay may need
        already keeps copies."""
        if self._copies_inputs:
            return
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        again = [(ref(), version) for ref, version in self._last_inputs if any(ref() is t for t in tensors)]
        self._copies_inputs = not unwritten(again)
        self._last_inputs = [(weakref.ref(t), version_of(t)) for t in tensors]  # weak: no batch held past its step

    def take_readings(self) -> dict[str, torch.Tensor]:
        if not self._nan_inputs:
            return {}
        flags = torch.stack([flag for _, _, flag in self._nan_inputs]).float()
        self._pending, self._nan_inputs = self._nan_inputs, []
        return {"nan_inputs": flags}

    def record(self, host: dict) -> dict:
        flags = host.get("nan_inputs")
        if flags is None:
            return {}
        bad = [(model, name) for (model, name, _), flag in zip(self._pending, flags, strict=True) if flag]
        if bad and not self._reported:
            self._reported = True
            model, name = bad[0]
            self.ctx.events.record("nonfinite_batch", "critical",
                                   f"{model}'s input {name} holds NaN at step {self.ctx.step}: bad data, not "
                                   "precision", step=self.ctx.step, phase="forward", probe=self.name, model=model,
                                   tensor=name)
        return {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
