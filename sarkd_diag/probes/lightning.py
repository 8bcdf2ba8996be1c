"""sarkd-diag in a PyTorch Lightning run: a Callback that gives `Probes` what Lightning knows.

Plain `Probes` inside a LightningModule record a run, but they cannot tell a micro-batch of
`accumulate_grad_batches` from an optimizer step (a row per batch, and a false "step order" warning), they go
on recording while Lightning trains NaN weights to the last step, and their fixes speak of a plain loop. The
callback numbers steps by the batches that stepped an optimizer (`trainer.global_step` counts every optimizer's
steps: two optimizers stepping in one batch are one step; the count travels in Lightning's checkpoints, so a
resume continues it), closes a step only on such a batch, takes the optimizers and the loss scaler from the
Trainer and the precision from `Trainer(precision=...)`, watches the LightningModule's student and teacher,
stops training on a critical event (`trainer.should_stop`) and closes the run when training ends or fails.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from . import Probes, check_probe_settings, replace_method
from .base import scores_tokens, teacher_by_name

try:  # the unified `lightning` package and the standalone `pytorch_lightning` each check callbacks by their own class
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

ON_CRITICAL = ("stop", "record")
# Trainer(precision=...) by what it does to the module: the true-half modes train its weights in that dtype, the
# mixed ones compute under autocast over fp32 weights; "32-true" and others are read off the weights and autocast
PRECISION_MODES = {"16-mixed": "mixed", "bf16-mixed": "bf16-mixed", "16-true": "pure-fp16", "bf16-true": "pure-bf16"}


def lightning_models(module: nn.Module, student: str | None = None, teacher: str | None = None) -> dict:
    """The models a LightningModule trains and distils from, by role.

    The student is the attribute named `student`, else the one child module that holds every trainable tensor
    (`self.model`), else the LightningModule itself: the probes hook the forward that `training_step` calls, and
    causes name modules by the paths of the model the user holds. The teacher is the attribute named `teacher`,
    else the first child whose name contains "teacher" (`self.teacher`, `self.teacher_model`), else a frozen reference
    model `self.ref_model` (a DPO-style module's: `teacher_by_name`)."""
    children = dict(module.named_children())
    if student is not None:
        found = getattr(module, student)
    elif isinstance(children.get("student"), nn.Module):
        found = children["student"]
    else:
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        holders = [child for child in children.values()
                   if trainable and trainable <= {id(p) for p in child.parameters()}]
        found = holders[0] if len(holders) == 1 else module
    models = {"student": found}
    if teacher is not None:
        models["teacher"] = getattr(module, teacher)
    else:
        named = teacher_by_name(children.items(), other_than=found)
        if named is not None:
            models["teacher"] = named
    return models


def ends_accumulation(trainer) -> bool:
    """Whether automatic optimization steps the optimizer at the end of the batch about to run — Lightning's own rule
    (the negation of its epoch loop's `_should_accumulate`), read from the loop's public progress, which Lightning has
    counted before `on_train_batch_start`: every accumulate_grad_batches-th batch of the epoch, and its last — also the
    last of a stream of unknown length (`is_last_batch`, known once the batch after it failed to come), unless the
    strategy accumulates over the epoch's end itself (DeepSpeed)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    ready = progress.current.ready
    last = ready == trainer.num_training_batches or progress.is_last_batch
    return ready % trainer.accumulate_grad_batches == 0 or (last and not trainer.strategy.handles_gradient_accumulation)


class SarkdDiagLightningCallback(Callback):
    """Records a Lightning run's numerical events into a run directory and stops training on non-finite weights.

    run_dir, level, every: as for `Probes`. student, teacher: attribute names of the LightningModule, where
    `lightning_models` would not find them. eval_metric: the name the module logs its validation loss under
    (`self.log("val_loss", ...)`), recorded as the run's eval rows. on_critical: "stop" (default) sets
    `trainer.should_stop` once the probes record a critical event (non-finite weights), and the run closes as
    `stopped`; "record" keeps training.
    """

    def __init__(self, run_dir: str | Path, level: str = "standard", every: int = 10, on_critical: str = "stop",
                 student: str | None = None, teacher: str | None = None, eval_metric: str = "val_loss"):
        if on_critical not in ON_CRITICAL:
            raise ValueError(f"on_critical must be one of {', '.join(ON_CRITICAL)}, got {on_critical!r}")
        check_probe_settings(level, every)
        self.run_dir, self.level, self.every, self.on_critical = Path(run_dir), level, every, on_critical
        self.student, self.teacher, self.eval_metric = student, teacher, eval_metric
        self.probes: Probes | None = None
        self.stopped_at: int | None = None  # the step whose critical event stopped training
        self.step = 0  # the last step closed, as the run directory numbers it
        self._checkpointed_step: int | None = None  # `step` as the checkpoint a fit resumes from saved it
        self._step_open = False  # a step has begun and not closed
        self._scheduled_step = True  # automatic optimization: the batch under way ends an accumulation
        self._step_at_batch_start = 0  # global_step when the batch under way began
        self._batch_ended = False  # the batch under way has ended (its optimizer step, if any, is done)
        self._unwrap_training_step = None  # puts the module's own `training_step` back (`_watch_training_step`)

    @property
    def state_key(self) -> str:
        """Where Lightning keeps this callback's state in a checkpoint: one per run directory, so callbacks recording
        into two directories can share a Trainer (Lightning refuses two stateful callbacks under one key)."""
        return self._generate_state_key(run_dir=str(self.run_dir.resolve()))

    def state_dict(self) -> dict:
        """Saved in Lightning's checkpoints: the steps recorded so far, where a fit resumed from one continues."""
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._checkpointed_step = state_dict.get("step")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.probes is not None:  # a second fit on the same callback appends to the same directory
            self.probes.close("completed")
        optimizers = list(trainer.optimizers)
        precision = str(trainer.precision)
        # a fit resumed from a checkpoint continues at the step it saved: its own count, or — a checkpoint saved
        # without this callback — global_step, which is that count with a single optimizer. A fit from 0 into a
        # directory that holds steps (a second fit) continues after them
        resumed_from = None
        if trainer.global_step > 0:
            resumed_from = self._checkpointed_step if self._checkpointed_step is not None else trainer.global_step
        self._checkpointed_step = None
        self.probes = Probes(lightning_models(pl_module, self.student, self.teacher),
                             optimizer=optimizers[0] if len(optimizers) == 1 else optimizers or None,
                             scaler=getattr(trainer.precision_plugin, "scaler", None), run_dir=self.run_dir,
                             level=self.level, every=self.every, caller="lightning",
                             precision={"mode": PRECISION_MODES.get(precision),
                                        "requested": f'Trainer(precision="{precision}")',
                                        "reason": f'PyTorch Lightning: Trainer(precision="{precision}")'},
                             sync_gradients=lambda: self._closes_step(trainer, pl_module), resumed_from=resumed_from)
        self.step, self._step_open, self.stopped_at = self.probes.first_step - 1, False, None
        self._watch_training_step(pl_module)

    def _watch_training_step(self, pl_module) -> None:
        """Wrap the module's `training_step` for the loss it returns before Lightning backpropagates it (what
        `on_train_batch_end` gets is detached): the root of the loss's graph (`ProbeSet.observe_loss_graph`)."""
        self._unwatch_training_step()
        training_step = pl_module.training_step

        @functools.wraps(training_step)
        def watched_training_step(*args, **kwargs):
            output = training_step(*args, **kwargs)
            if self.probes is not None:
                self.probes.set.observe_loss_graph(output)
            return output
        self._unwrap_training_step = replace_method(pl_module, "training_step", watched_training_step)

    def _unwatch_training_step(self) -> None:
        if self._unwrap_training_step is not None:
            self._unwrap_training_step()
            self._unwrap_training_step = None

    def _closes_step(self, trainer, pl_module) -> bool:
        """Whether the batch under way ends with an optimizer step. Under automatic optimization Lightning steps on
        every accumulate_grad_batches-th batch of an epoch and on its last one (`ends_accumulation`): known from the
        batch's start, so the gradients are read before Lightning clips them, inside the step. Under manual
        optimization the module steps when it chooses: a batch that ended without moving global_step only accumulated,
        and until a batch ends a clipping is taken to come before a step."""
        if pl_module.automatic_optimization:
            return self._scheduled_step
        return not self._batch_ended or trainer.global_step != self._step_at_batch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._scheduled_step = ends_accumulation(trainer)
        self._step_at_batch_start, self._batch_ended = trainer.global_step, False
        if self.probes is not None and not self._step_open:  # the first micro-batch of a step
            self._step_open, self._step_backpropagated = True, False
            self.probes.begin_step(self.step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """After the batch's backward and, on the last micro-batch of a step, its optimizer step: the batch's loss
        joins the step's (their mean), and a batch that stepped the optimizer closes the step. Lightning hands over
        the loss it backpropagated, `training_step`'s divided by `accumulate_grad_batches`: multiplied back, the mean
        of a step's batches is the loss it optimised. Under automatic optimization a `training_step` that returns
        None skips its batch (no backward): a step none of whose batches returned a loss is closed as skipped."""
        if self.probes is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.probes.ctx.first_closure_loss is not None:  # LBFGS: outputs hold its line search's last trial
            loss = self.probes.ctx.first_closure_loss
        if torch.is_tensor(loss) and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches
        self._batch_ended = True
        self._step_backpropagated |= loss is not None
        skipped = pl_module.automatic_optimization and not self._step_backpropagated
        if self.probes.step(loss=loss, skipped=skipped) is not None:  # the batch stepped: the step is closed
            self.step += 1
            self._step_open = False
        if self.probes.critical and self.on_critical == "stop" and self.stopped_at is None:
            self.stopped_at = self.step
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        """A validation during fit (not the sanity check before it, which runs before there is a run): the logged
        `eval_metric` becomes the eval row after the step it evaluated — one per validation dataloader, each named by
        the suffix Lightning logs it under (`val_loss/dataloader_idx_1`: `eval_set` "dataloader_idx_1"). With a teacher
        watched it is a distillation objective, and a student that is no language model (a transformers classifier or
        regressor, `scores_tokens`) is scored on its labels: their exp is no perplexity, and `eval_ppl` is left
        unmeasured, as for the Trainer."""
        if self.probes is None or trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            name, _, eval_set = key.partition("/")
            if name == self.eval_metric and (not eval_set or eval_set.startswith("dataloader_idx_")):
                models = self.probes.ctx.models
                self.probes.evaluation(self.step, value, eval_set=eval_set or None,
                                       cross_entropy="teacher" not in models and scores_tokens(models["student"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self._unwatch_training_step()
        if self.probes is not None:
            self.probes.close("stopped" if self.stopped_at is not None else "completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._unwatch_training_step()
        if self.probes is not None:
            self.probes.close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed", exception)
