"""sarkd-diag in a PyTorch Lightning run: a Callback that gives `Probes` what Lightning knows.

Plain `Probes` inside a LightningModule record a run, but they cannot tell a micro-batch of
`accumulate_grad_batches` from an optimizer step (a row per batch, and a false "step order" warning), they go
on recording while Lightning trains NaN weights to the last step, and their fixes speak of a plain loop. The
callback numbers steps by the batches that stepped an optimizer (`trainer.global_step` counts every optimizer's
steps: two optimizers stepping in one batch are one step; the count travels in Lightning's checkpoints, so a
resume continues it), closes a step only on such a batch, takes the optimizers and the loss scaler from the
Trainer and the precision from `Trainer(precision=...)`, watches the LightningModule's student and teacher,
stops training on a critical event (`trainer.should_stop`) without a checkpoint of the non-finite weights, and
closes the run when training ends or fails.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path

import torch
from torch import nn

from . import Probes, check_own_directory, check_probe_settings, chosen, replace_method
from .base import models_by_role, role_model, scores_tokens

try:  # the unified `lightning` package and the standalone `pytorch_lightning` each check callbacks by their own class
    from lightning.pytorch import Callback
    from lightning.pytorch.trainer.connectors import accelerator_connector
except ImportError:
    from pytorch_lightning import Callback
    from pytorch_lightning.trainer.connectors import accelerator_connector

ON_CRITICAL = ("stop", "record")
# Trainer(precision=...) by what it does to the module: the true-half modes train its weights in that dtype, the
# mixed ones compute under autocast over fp32 weights; "32-true" and others are read off the weights and autocast
PRECISION_MODES = {"16-mixed": "mixed", "bf16-mixed": "bf16-mixed", "16-true": "pure-fp16", "bf16-true": "pure-bf16"}
REQUESTED = "_sarkd_diag_requested_precision"  # where a Trainer's accelerator connector keeps `precision` as given


def _keep_requested_precision(connector_type: type) -> None:
    """Have each Trainer's accelerator connector keep the `precision` it was handed, observed and left as it is:
    Lightning keeps only what it turned it into — on the CPU `Trainer(precision="16-mixed")` runs as "bf16-mixed" (with
    a warning) — and that is all `trainer.precision` says by the time a callback runs. Done once, at import, before
    the Trainer the callback is handed to is built."""
    original = connector_type.__init__
    if getattr(original, REQUESTED, False):
        return

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        setattr(self, REQUESTED, kwargs.get("precision"))
        original(self, *args, **kwargs)

    setattr(init, REQUESTED, True)
    connector_type.__init__ = init


_keep_requested_precision(accelerator_connector._AcceleratorConnector)


def requested_precision(trainer) -> str:
    """`Trainer(precision=...)` as the Trainer was given it (`16`, `"16-mixed"`), else — a precision plugin given
    instead, or a Trainer built before this module was imported — as it runs."""
    asked = getattr(getattr(trainer, "_accelerator_connector", None), REQUESTED, None)
    asked = str(trainer.precision) if asked is None else asked
    shown = f'"{asked}"' if isinstance(asked, str) else str(asked)
    return f"Trainer(precision={shown})"


def steps_compiled_as_one_graph(pl_module) -> bool:
    """`trainer.fit(torch.compile(module, fullgraph=True))`: Lightning unwraps the module and compiles its steps
    (`training_step`, `forward` …) with that dynamo context, so the models they call run inside one graph."""
    compiler = getattr(pl_module, "_compiler_ctx", None)
    return isinstance(compiler, dict) and bool(getattr(compiler.get("dynamo_ctx"), "fullgraph", False))


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


def lightning_directories(trainer) -> list[tuple[str | None, str]]:
    """The directories a Lightning Trainer writes its own files into, each with what writes there: each logger's
    `save_dir` (the default logger's is the Trainer's `default_root_dir`) and `log_dir`, and each checkpoint callback's
    `dirpath` where one was given (left unset, it is a `checkpoints` folder inside one of those)."""
    root = os.path.realpath(trainer.default_root_dir)
    places = []
    for logger in trainer.loggers:
        kind, save_dir = type(logger).__name__, getattr(logger, "save_dir", None)
        at_root = isinstance(save_dir, (str, os.PathLike)) and os.path.realpath(save_dir) == root
        named = "the Trainer's default_root_dir" if at_root else f"the save_dir of the Trainer's {kind}"
        places += [(save_dir, f"{named}, where its {kind} writes its logs"),
                   (getattr(logger, "log_dir", None), f"the log_dir of the Trainer's {kind}, where it writes its logs")]
    places += [(getattr(callback, "dirpath", None),
                f"the dirpath of the Trainer's {type(callback).__name__}, where it writes its checkpoints")
               for callback in trainer.checkpoint_callbacks]
    return places


class SarkdDiagLightningCallback(Callback):
    """Records a Lightning run's numerical events into a run directory and stops training on non-finite weights.

    run_dir, level, every: as for `Probes`; not a directory Lightning writes into (`setup`). student, teacher: the
    models, or the names of the LightningModule's attributes that hold them, where `models_by_role` would not find
    them — a teacher kept out of the module's children (`self._teacher = [teacher]`) is given as itself.
    eval_metric: the name the module logs its validation loss under (`self.log("val_loss", ...)`), recorded as the
    run's eval rows. on_critical: "stop" (default) sets
    `trainer.should_stop` once the probes record a critical event (non-finite weights), writes no checkpoint while
    a weight is non-finite (`_guard_checkpoints`), and the run closes as `stopped`; "record" keeps training.
    """

    def __init__(self, run_dir: str | Path, level: str = "standard", every: int = 10, on_critical: str = "stop",
                 student: str | nn.Module | None = None, teacher: str | nn.Module | None = None,
                 eval_metric: str = "val_loss"):
        on_critical, level = chosen(on_critical, ON_CRITICAL, "on_critical"), check_probe_settings(level, every)
        for role, given in (("student", student), ("teacher", teacher)):
            if given is not None and not isinstance(given, (str, nn.Module)):
                raise TypeError(f"{role}= must be the {role} model or the name of the LightningModule's attribute that "
                                f"holds it, got a {type(given).__name__}")
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
        self._unguards: list = []  # what puts the Trainer's checkpointing back (`_guard_checkpoints`)
        self._records: list = []  # (checkpoint callback, its state as the stopping step found it): `_keep_records`
        self._unwrap_training_step = None  # puts the module's own `training_step` back (`_watch_training_step`)
        self._returned_loss: torch.Tensor | None = None  # what the batch under way's `training_step` returned

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

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before a fit trains (and before its sanity check), what would otherwise fail inside it is refused in one
        sentence: a run directory Lightning writes its own files into (`lightning_directories`: a logger's files there
        make it one the probes refuse as holding no run) and a `student=`/`teacher=` name that holds no model
        (`role_model`)."""
        if stage != "fit":
            return
        check_own_directory(self.run_dir, lightning_directories(trainer))
        for role, given in (("student", self.student), ("teacher", self.teacher)):
            if given is not None:
                role_model(pl_module, given, role)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.probes is not None:  # a second fit on the same callback appends to the same directory
            self.probes.close("completed")
        optimizers = list(trainer.optimizers)
        precision, requested = str(trainer.precision), requested_precision(trainer)
        ran_as = "" if requested == f'Trainer(precision="{precision}")' else f', which Lightning runs as "{precision}"'
        # a fit resumed from a checkpoint continues at the step it saved: its own count, or — a checkpoint saved
        # without this callback — global_step, which is that count with a single optimizer. A fit from 0 into a
        # directory that holds steps (a second fit) continues after them
        resumed_from = None
        if trainer.global_step > 0:
            resumed_from = self._checkpointed_step if self._checkpointed_step is not None else trainer.global_step
        self._checkpointed_step = None
        optimized = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
        models = models_by_role(pl_module, self.student, self.teacher, optimized)
        self.probes = Probes(models,
                             optimizer=optimizers[0] if len(optimizers) == 1 else optimizers or None,
                             scaler=getattr(trainer.precision_plugin, "scaler", None), run_dir=self.run_dir,
                             level=self.level, every=self.every, caller="lightning",
                             precision={"mode": PRECISION_MODES.get(precision),
                                        "requested": requested, "reason": f"PyTorch Lightning: {requested}{ran_as}"},
                             sync_gradients=lambda: self._closes_step(trainer, pl_module), resumed_from=resumed_from,
                             fullgraph_models=models if steps_compiled_as_one_graph(pl_module) else ())
        self.step, self._step_open, self.stopped_at, self._records = self.probes.first_step - 1, False, None, []
        self._guard_checkpoints(trainer, pl_module)
        self._watch_training_step(pl_module)

    def _watch_training_step(self, pl_module) -> None:
        """Wrap the module's `training_step` for the loss it returns before Lightning backpropagates it (what
        `on_train_batch_end` gets is detached): the root of the loss's graph (`ProbeSet.observe_loss_graph`), and the
        loss a backward that raises was handed (`on_exception`)."""
        self._unwatch_training_step()
        training_step = pl_module.training_step

        @functools.wraps(training_step)
        def watched_training_step(*args, **kwargs):
            output = training_step(*args, **kwargs)
            loss = output.get("loss") if isinstance(output, dict) else output
            self._returned_loss = loss.detach() if torch.is_tensor(loss) else None
            if self.probes is not None:
                self.probes.set.observe_loss_graph(output)
            return output
        self._unwrap_training_step = replace_method(pl_module, "training_step", watched_training_step)

    def _unwatch_training_step(self) -> None:
        if self._unwrap_training_step is not None:
            self._unwrap_training_step()
            self._unwrap_training_step = None

    def _guard_checkpoints(self, trainer, pl_module) -> None:
        """Lightning's `ModelCheckpoint` reads no `should_stop`: stopped on non-finite weights, it still writes them
        (at the epoch's end, at the step under `every_n_train_steps`, under `save_last`) and, keeping `save_top_k`,
        removes the last good checkpoint to make room. While a weight is non-finite (looked for once the probes
        recorded a critical event) a checkpoint is not written and none is removed: the last good one is where to
        resume. Under on_critical="record" it is written, and the run says which holds them. Through the Trainer's
        `save_checkpoint` and its strategy's `remove_checkpoint`, put back when the fit ends (teardown, or an
        exception). A checkpoint callback records the path it saves to before saving (`best_model_path`,
        `best_k_models`, `last_model_path`): a checkpoint not written, its records are put back as the stopping step
        found them, so `best_model_path` and `trainer.test(ckpt_path="best")` name the last good checkpoint, not a file
        that does not exist; and under `save_last="link"` last.ckpt is not relinked to it (ModelCheckpoint links it
        itself, not through the Trainer)."""
        self._unguard_checkpoints()
        save, remove = trainer.save_checkpoint, trainer.strategy.remove_checkpoint
        withheld_paths: set[str] = set()

        def guarded_save(filepath, *args, **kwargs):
            tensor = self._nonfinite_weight(pl_module)
            withheld = tensor is not None and self.on_critical == "stop"
            if tensor is not None:
                self.probes.events.record(
                    "checkpoint_nonfinite", "info" if withheld else "warning",
                    f"{'not written' if withheld else 'written'}: the checkpoint {filepath} after step {self.step} — "
                    f"{tensor} holds a non-finite value" + (" (training stopped on it; resume from a checkpoint "
                                                            "saved before it)" if withheld else ""),
                    step=self.step, phase="optimizer", probe="parameters", tensor=tensor)
            if not withheld:
                save(filepath, *args, **kwargs)
                return
            withheld_paths.add(str(filepath))
            for callback, records in self._records:
                callback.load_state_dict({key: copy.copy(value) for key, value in records.items()})

        def guarded_remove(filepath):
            if not (self.on_critical == "stop" and self._nonfinite_weight(pl_module)):
                remove(filepath)

        def guarded_link(link):
            def link_unless_withheld(trainer, filepath, linkpath):
                if str(filepath) not in withheld_paths:
                    link(trainer, filepath, linkpath)
            return link_unless_withheld

        self._unguards = [replace_method(trainer, "save_checkpoint", guarded_save),
                          replace_method(trainer.strategy, "remove_checkpoint", guarded_remove)]
        self._unguards += [replace_method(callback, "_link_checkpoint", guarded_link(callback._link_checkpoint))
                           for callback in trainer.checkpoint_callbacks if hasattr(callback, "_link_checkpoint")]

    def _nonfinite_weight(self, pl_module) -> str | None:
        """The first tensor of the module's state that holds NaN/Inf, looked for once the probes recorded a critical
        event (none before: a save costs no scan of the weights)."""
        if self.probes is None or not self.probes.critical:
            return None
        return next((name for name, t in pl_module.state_dict().items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)

    def _unguard_checkpoints(self) -> None:
        for restore in self._unguards:
            restore()
        self._unguards = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """After fit's last hook (`ModelCheckpoint.on_train_end`'s `save_last` too): the run closes, the Trainer's
        checkpointing is its own again."""
        if stage == "fit":
            self._close("stopped" if self.stopped_at is not None else "completed")
            self._unguard_checkpoints()
            self._unwatch_training_step()

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
        self._returned_loss = None
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
            self._keep_records(trainer)

    def _keep_records(self, trainer) -> None:
        """Keep the checkpoint callbacks' records (`ModelCheckpoint`'s best_model_path, best_k_models, last_model_path,
        its `state_dict`) as they are when training stops on non-finite weights: Lightning calls checkpoint callbacks
        after every other, so none has reacted to the stopping step yet. A checkpoint not written is put back out of
        them (`_guard_checkpoints`)."""
        self._records = [(callback, {key: copy.copy(value) for key, value in callback.state_dict().items()})
                         for callback in trainer.checkpoint_callbacks]

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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A fit that raised ends without teardown: the run closes, the Trainer's checkpointing is its own again. A
        backward that raised on the non-finite loss `training_step` returned (`detect_anomaly=True`) — the teacher's NaN
        in a KD term, which the student's own outputs do not show — has the step's forwards replayed first, as one the
        optimizer is about to apply is: it never stepped, the weights are still those that made the loss."""
        interrupted = isinstance(exception, KeyboardInterrupt)
        loss, self._returned_loss = self._returned_loss, None
        if self.probes is not None and not interrupted and self._step_open and loss is not None \
                and not bool(torch.isfinite(loss).all()):
            self.probes.set.replay_if_loss_nonfinite(math.nan)
        self._close("interrupted" if interrupted else "failed", exception)
        self._unguard_checkpoints()
        self._unwatch_training_step()

    def _close(self, status: str, error: BaseException | None = None) -> None:
        if self.probes is not None:
            self.probes.close(status, error)
