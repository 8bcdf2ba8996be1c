"""SarkdDiagLightningCallback on a real PyTorch Lightning Trainer (CPU, tiny GPT-2s): accumulated batches, a
teacher that overflows fp16, pure fp16 with its fixes in Lightning's terms, a clean bf16 run, and an exception
mid-fit."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import tiny  # noqa: E402
from contract import nothing_found  # noqa: E402
from frameworks import Sequences, cause, overflow_fp16  # noqa: E402

from sarkd_diag import load_run  # noqa: E402
from sarkd_diag.contract.errors import BadInput  # noqa: E402
from sarkd_diag.probes.base import models_by_role  # noqa: E402
from sarkd_diag.probes.lightning import SarkdDiagLightningCallback  # noqa: E402

VOCAB = 64


class Distil(pl.LightningModule):
    """CE plus KL to a frozen teacher when there is one; keeps each batch's loss to compare runs by."""

    def __init__(self, student, teacher=None, lr=1e-3):
        super().__init__()
        self.student, self.teacher, self.lr = student, teacher, lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        out = self.student(**batch)
        loss = out.loss
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch["input_ids"]).logits
            loss = loss + torch.nn.functional.kl_div(out.logits.float().log_softmax(-1),
                                                     teacher_logits.float().log_softmax(-1),
                                                     log_target=True, reduction="batchmean")
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)


def _fit(module, run_dir=None, dataset=None, **trainer_args):
    kwargs = dict(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    kwargs.update(trainer_args)
    callbacks = kwargs.pop("callbacks", [SarkdDiagLightningCallback(run_dir)] if run_dir is not None else [])
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(callbacks=callbacks, **kwargs)
        trainer.fit(module, torch.utils.data.DataLoader(dataset or Sequences(VOCAB), batch_size=4))
    return trainer


def test_accumulated_batches_close_one_step_each_and_training_is_unchanged(tmp_path):
    module = Distil(tiny.make_gpt2(VOCAB))
    trainer = _fit(module, tmp_path / "run", accumulate_grad_batches=2)
    run = load_run(tmp_path / "run")
    metrics = run["metrics"]
    assert trainer.global_step == 4 and metrics["step"].tolist() == [1, 2, 3, 4]  # not a row per batch
    assert metrics["loss"].tolist() == pytest.approx(  # the step's loss: the mean of its two batches'
        [(a + b) / 2 for a, b in zip(module.losses[::2], module.losses[1::2], strict=True)], rel=1e-6)
    assert metrics["grad_norm"].notna().all()  # read before Lightning's clipping, on the batch that steps
    assert not {"warning", "critical"} & set(run["events"]["severity"])  # no "step order" note
    assert run["summary"]["status"] == "completed" and nothing_found(run["summary"])

    plain = Distil(tiny.make_gpt2(VOCAB))
    _fit(plain, accumulate_grad_batches=2)
    assert plain.losses == module.losses  # the probes did not change training
    assert all(torch.equal(a, b) for a, b in zip(plain.student.parameters(), module.student.parameters(), strict=True))


class Stream(torch.utils.data.IterableDataset):
    """The sequences as a stream: Lightning knows no length, and learns an epoch's last batch as it fetches it."""

    def __init__(self, n: int):
        self.sequences = Sequences(VOCAB, n=n)

    def __iter__(self):
        return (self.sequences[i] for i in range(len(self.sequences)))


def test_a_streams_last_batch_closes_the_step_it_ends(tmp_path):
    """5 batches an epoch, accumulated in twos: Lightning steps after batches 2, 4 and 5 (the epoch's last), 3 steps an
    epoch — the partial step at the end of an epoch is a step of its own, not merged with the next epoch's first."""
    module = Distil(tiny.make_gpt2(VOCAB))
    trainer = _fit(module, tmp_path / "run", dataset=Stream(20), max_steps=-1, max_epochs=2,
                   accumulate_grad_batches=2)
    metrics = load_run(tmp_path / "run")["metrics"]
    assert trainer.global_step == 6 and metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]
    batches = [module.losses[i:j] for epoch in (0, 5) for i, j in ((epoch, epoch + 2), (epoch + 2, epoch + 4),
                                                                     (epoch + 4, epoch + 5))]
    assert metrics["loss"].tolist() == pytest.approx([sum(b) / len(b) for b in batches], rel=1e-6)
    assert metrics["grad_norm"].notna().all()  # every step's gradients read, before Lightning clipped them

    plain = Distil(tiny.make_gpt2(VOCAB))
    _fit(plain, dataset=Stream(20), max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    assert plain.losses == module.losses


class OptimizesItWhole(Distil):
    """The optimizer built over the whole module, `self.parameters()`, as many write it: a teacher left requiring grad
    is in it too, though the teacher runs under no_grad and no gradient reaches it."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "left_requiring_grad_in_the_optimizer"])
def test_a_teacher_that_overflows_fp16_is_named_and_training_stops_on_the_nan_weights(tmp_path, frozen):
    """A teacher left requiring grad in an optimizer over the whole module is read as frozen where it runs under
    no_grad: its overflow is placed at its module (it was unplaced: its no_grad forwards were read as a trained model's,
    none a training forward), and its fp16 tensors, which the optimizer never updates, are no eps or decay finding."""
    teacher = tiny.make_gpt2(VOCAB, seed=3)
    overflow_fp16(teacher.transformer.h[0])
    teacher = teacher.half().eval().requires_grad_(not frozen)
    module = (Distil if frozen else OptimizesItWhole)(tiny.make_gpt2(VOCAB), teacher)
    trainer = _fit(module, tmp_path / "run", max_steps=6)
    summary = load_run(tmp_path / "run")["summary"]
    root = summary["diagnosis"][0]
    assert root["cause"] == "teacher_overflow" and root["model"] == "teacher"
    assert root["module"] == "transformer.h.0.mlp.c_proj" and root["first_step"] == 1
    assert [d["cause"] for d in summary["diagnosis"]] == ["teacher_overflow"]
    assert summary["status"] == "stopped" and trainer.global_step == 1 < 6


def test_pure_fp16_is_named_from_the_trainers_precision_and_fixed_in_its_terms(tmp_path):
    student = tiny.make_gpt2(VOCAB)
    overflow_fp16(student.transformer.h[1])
    _fit(Distil(student), tmp_path / "run", precision="16-true")
    summary = load_run(tmp_path / "run")["summary"]
    assert summary["precision"]["mode"] == "pure-fp16"
    assert summary["precision"]["requested"] == 'Trainer(precision="16-true")'
    root = cause(summary["diagnosis"], "activation_overflow")
    assert root["module"] == "transformer.h.1.mlp.c_proj" and root["first_step"] == 1 and root["model"] == "student"
    assert 'Trainer(precision="bf16-mixed")' in root["fix"]


class StaticallyScaled(Distil):
    """Pure fp16 with a loss scale of one's own, fixed and too large: some gradients overflow to Inf (no NaN)."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 5e5


def test_a_gradient_overflow_is_read_before_clipping_by_value_clamps_it_finite(tmp_path):
    """`gradient_clip_algorithm="value"` clamps each gradient entry to ±gradient_clip_val, an Inf included: read after
    the clipping (the closure's end), the overflow was a finite 1.0 and the run looked clean."""
    _fit(StaticallyScaled(tiny.make_gpt2(VOCAB)), tmp_path / "run", precision="16-true",
         gradient_clip_algorithm="value", max_steps=1)
    run = load_run(tmp_path / "run")
    assert run["metrics"]["nonfinite_grad_tensors"].iloc[0] > 0  # the c_proj biases, +-Inf before the clamp
    found = cause(run["summary"]["diagnosis"], "gradient_overflow")
    assert found["first_step"] == 1 and found["module"].endswith("c_proj"), found


@pytest.mark.parametrize(("asked", "requested"), [("bf16-mixed", 'Trainer(precision="bf16-mixed")'),
                                                  ("16-mixed", 'Trainer(precision="16-mixed")'),
                                                  (16, "Trainer(precision=16)")])
def test_a_clean_bf16_mixed_run_is_recorded_as_such_and_warns_of_nothing(tmp_path, asked, requested):
    """On the CPU Lightning runs "16-mixed" as "bf16-mixed" (it warns: no fp16 AMP there): recorded as what it ran,
    `requested` still what the Trainer was asked for, which Lightning keeps no longer."""
    _fit(Distil(tiny.make_gpt2(VOCAB)), tmp_path / "run", precision=asked)
    run = load_run(tmp_path / "run")
    precision = run["summary"]["precision"]
    assert precision["mode"] == "bf16-mixed" and precision["compute_dtype"] == "bfloat16"
    assert precision["requested"] == requested
    assert ('which Lightning runs as "bf16-mixed"' in precision["reason"]) == (asked != "bf16-mixed")
    assert not precision["loss_scaling"]
    assert nothing_found(run["summary"]) and not {"warning", "critical"} & set(run["events"]["severity"])


class Remember(pl.Callback):
    """Keeps the Trainer it is given at the start of training (`_fit` returns none when `fit` raises)."""

    def __init__(self, trainers: list):
        self.trainers = trainers

    def on_train_start(self, trainer, pl_module):
        self.trainers.append(trainer)


class BlowsUpAtTheSecondBatch(Distil):
    """A loss multiplied by Inf on the second batch: its gradients are non-finite, and AdamW makes the weights NaN."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * (math.inf if batch_idx == 1 else 1.0)


@pytest.mark.parametrize("on_critical", ["stop", "record"])
def test_no_checkpoint_of_non_finite_weights_replaces_the_last_good_one(tmp_path, on_critical):
    """`ModelCheckpoint(every_n_train_steps=1)` keeps the latest checkpoint: at step 2 the weights turn NaN and the
    callback stops training, but ModelCheckpoint reads no `should_stop` — it wrote step 2's NaN weights (and again at
    the epoch's end) and removed step 1's, the one to resume from. Stopping: no checkpoint of NaN weights is written,
    step 1's stays, and the run says what was withheld. Recording: written, and the run says which holds them."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    _fit(BlowsUpAtTheSecondBatch(tiny.make_gpt2(VOCAB)), enable_checkpointing=True, max_steps=3,
         callbacks=[SarkdDiagLightningCallback(tmp_path / "run", on_critical=on_critical), saved])
    files = sorted((tmp_path / "ckpt").iterdir())
    finite = [all(torch.isfinite(t).all() for t in torch.load(f, weights_only=True)["state_dict"].values()
                  if t.is_floating_point()) for f in files]
    events = load_run(tmp_path / "run")["events"].query("kind == 'checkpoint_nonfinite'")
    assert len(events) >= 1 and set(events["step"]) >= {2}
    if on_critical == "stop":
        assert [f.name for f in files] == ["epoch=0-step=1.ckpt"] and finite == [True]
        assert set(events["severity"]) == {"info"} and all(events["message"].str.startswith("not written"))
    else:
        assert finite[-1:] == [False]  # the latest, as asked: written, and said
        assert set(events["severity"]) == {"warning"} and all(events["message"].str.startswith("written"))
    assert "student.transformer" in events["tensor"].iloc[0]


class LogsItsLoss(BlowsUpAtTheSecondBatch):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("options", [dict(save_top_k=1), dict(monitor="train_loss", save_top_k=3, save_last="link")])
def test_the_checkpoint_callbacks_records_name_the_last_good_checkpoint_not_one_withheld(tmp_path, options):
    """ModelCheckpoint records a checkpoint's path before it saves it: with the step-2 save of NaN weights withheld,
    its `best_model_path` named a file never written (`trainer.test(ckpt_path="best")` fails), a monitored NaN
    (+inf to it) sat in `best_k_models`, `save_last="link"` relinked last.ckpt to the missing file. Now: step 1's."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, **options)
    _fit(LogsItsLoss(tiny.make_gpt2(VOCAB)), enable_checkpointing=True, max_steps=3,
         callbacks=[SarkdDiagLightningCallback(tmp_path / "run"), saved])
    good = str(tmp_path / "ckpt" / "epoch=0-step=1.ckpt")
    assert saved.best_model_path == good
    assert list(saved.best_k_models) == ([good] if "monitor" in options else [])
    if options.get("save_last"):
        assert (tmp_path / "ckpt" / "last.ckpt").resolve() == (tmp_path / "ckpt" / "epoch=0-step=1.ckpt")


def test_an_exception_mid_fit_leaves_a_closed_run_with_its_finished_steps(tmp_path):
    trainers = []
    with pytest.raises(RuntimeError, match="corrupt record"):
        _fit(Distil(tiny.make_gpt2(VOCAB)), tmp_path / "run", dataset=Sequences(VOCAB, fail_at=10),
             callbacks=[SarkdDiagLightningCallback(tmp_path / "run"), Remember(trainers)])
    (trainer,) = trainers  # its checkpointing is its own again: no guard of a closed run left on it
    assert "save_checkpoint" not in vars(trainer) and "remove_checkpoint" not in vars(trainer.strategy)
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "failed"
    assert run["summary"]["error"]["message"].startswith("RuntimeError: corrupt record")  # what failed, said
    assert run["metrics"]["step"].tolist() == list(range(1, len(run["metrics"]) + 1)) and len(run["metrics"]) >= 1


def test_the_student_is_the_child_that_holds_every_trainable_tensor_and_the_teacher_found_by_name():
    student, teacher = tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3).requires_grad_(False)

    class Wrapped(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.teacher_model = student, teacher

    assert models_by_role(Wrapped()) == {"student": student, "teacher": teacher}

    class Preference(pl.LightningModule):  # a DPO-style module: its frozen reference is watched as the teacher
        def __init__(self):
            super().__init__()
            self.policy, self.ref_model = student, teacher

    assert models_by_role(Preference()) == {"student": student, "teacher": teacher}
    both_train = Distil(student, tiny.make_gpt2(VOCAB, seed=4))  # no child holds every trainable tensor
    assert models_by_role(both_train)["student"] is student  # the attribute named `student`


class HiddenTeacher(Distil):
    """KD whose teacher is kept out of the module's children — in a list, so Lightning neither moves nor
    checkpoints it, a common trick —, where no attribute name finds it as a module."""

    def __init__(self, student, teacher):
        super().__init__(student)
        self._teacher = [teacher]

    def training_step(self, batch, batch_idx):
        out = self.student(**batch)
        with torch.no_grad():
            teacher_logits = self._teacher[0](input_ids=batch["input_ids"]).logits
        loss = out.loss + torch.nn.functional.kl_div(out.logits.float().log_softmax(-1),
                                                     teacher_logits.float().log_softmax(-1),
                                                     log_target=True, reduction="batchmean")
        self.losses.append(loss.item())
        return loss


def test_a_teacher_kept_out_of_the_modules_children_is_watched_when_given_itself(tmp_path):
    """`teacher=` took only an attribute name: a teacher held in a list could not be watched, and its fp16 overflow
    was read as the student's non-finite loss. Given as the model itself, it is watched as the teacher."""
    teacher = tiny.make_gpt2(VOCAB, seed=3)
    overflow_fp16(teacher.transformer.h[0])
    teacher = teacher.half().eval().requires_grad_(False)
    callback = SarkdDiagLightningCallback(tmp_path / "run", teacher=teacher)
    trainer = _fit(HiddenTeacher(tiny.make_gpt2(VOCAB), teacher), max_steps=6, callbacks=[callback])
    assert callback.probes.ctx.models["teacher"] is teacher
    root = load_run(tmp_path / "run")["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.0.mlp.c_proj", 1)
    assert trainer.global_step == 1


@pytest.mark.parametrize("name, says", [
    ("_teacher", "teacher='_teacher' names no model: HiddenTeacher._teacher is a list, not a torch module — pass "
                 "the teacher model itself (teacher=model), or the name of the attribute that holds it"),
    ("tacher", "teacher='tacher' names no model: HiddenTeacher has no attribute 'tacher' — pass the teacher model "
               "itself (teacher=model), or the name of the attribute that holds it")], ids=["a list", "a typo"])
def test_a_teacher_name_that_holds_no_model_is_refused_before_training(tmp_path, name, says):
    """`teacher="_teacher"` naming a list raised a raw AttributeError ('list' object has no attribute 'parameters')
    from inside `fit`; a name that holds no module is refused in one sentence before any batch trains."""
    module = HiddenTeacher(tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3))
    with pytest.raises(BadInput) as refused:
        _fit(module, callbacks=[SarkdDiagLightningCallback(tmp_path / "run", teacher=name)])
    assert str(refused.value) == says
    assert module.losses == [] and not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="teacher= must be the teacher model or the name of the LightningModule's "
                                        "attribute that holds it, got a list"):
        SarkdDiagLightningCallback(tmp_path / "run", teacher=module._teacher)


@pytest.mark.parametrize("where", ["default_root_dir", "log_dir", "checkpoint_dirpath"])
def test_a_directory_lightning_writes_into_is_refused_as_the_run_directory_before_training(tmp_path, where):
    """A run directory that is the Trainer's default_root_dir (its logger's save_dir) or its logger's log_dir already
    held the logger's files when the probes opened it: they refused it, from inside `fit`, as "files and no sarkd-diag
    run"; a checkpoint callback's dirpath fills with checkpoints. Each is refused before the first batch, naming what
    writes there; a default_root_dir where nothing writes (no logger, no checkpointing) is the probes' to use."""
    root = tmp_path / "root"
    logger = pl.loggers.CSVLogger(root)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    run_dir, options, says = {
        "default_root_dir": (root, dict(logger=logger, default_root_dir=root),
                             "the Trainer's default_root_dir, where its CSVLogger writes its logs"),
        "log_dir": (logger.log_dir, dict(logger=logger), "the log_dir of the Trainer's CSVLogger, where it writes "
                                                         "its logs"),
        "checkpoint_dirpath": (tmp_path / "ckpt", dict(enable_checkpointing=True),
                               "the dirpath of the Trainer's ModelCheckpoint, where it writes its checkpoints")}[where]
    extra = [checkpoints] if where == "checkpoint_dirpath" else []
    module = Distil(tiny.make_gpt2(VOCAB))
    with pytest.raises(BadInput) as refused:
        _fit(module, callbacks=[SarkdDiagLightningCallback(run_dir), *extra], **options)
    assert str(refused.value) == (f"run_dir={str(run_dir)!r} is {says}: give the probes a directory of their own, "
                                  f"e.g. {str(Path(run_dir) / 'sarkd-diag')!r}")
    assert module.losses == [] and not (Path(run_dir) / "config.json").exists()

    _fit(Distil(tiny.make_gpt2(VOCAB)), max_steps=1, default_root_dir=root / "quiet",
         callbacks=[SarkdDiagLightningCallback(root / "quiet")])
    assert load_run(root / "quiet")["summary"]["status"] == "completed"


def test_a_fit_resumed_from_its_checkpoint_appends_to_the_same_run(tmp_path):
    def fit(steps, ckpt_path=None):
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path),
                             callbacks=[SarkdDiagLightningCallback(tmp_path / "run")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Distil(tiny.make_gpt2(VOCAB)), torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4),
                        ckpt_path=ckpt_path)
        return trainer

    first = fit(2)
    fit(4, first.checkpoint_callback.best_model_path)
    assert load_run(tmp_path / "run")["metrics"]["step"].tolist() == [1, 2, 3, 4]  # numbered by global_step
    fit(1)  # a new fit from step 0 into the same directory: numbered on
    assert load_run(tmp_path / "run")["metrics"]["step"].tolist() == [1, 2, 3, 4, 5]


class ManualAccumulation(pl.LightningModule):
    """Manual optimization that steps every second batch, clipping first, as GAN- and KD-style modules do; `divide`:
    each batch's loss halved before `manual_backward` (else summed)."""

    def __init__(self, divide: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.model = tiny.make_gpt2(VOCAB)
        self.losses: list[float] = []
        self.divide = divide

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.model(**batch).loss
        self.manual_backward(loss / 2 if self.divide else loss)
        self.losses.append(loss.item())
        if batch_idx % 2 == 1:
            self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_manual_optimization_closes_a_step_where_the_module_stepped(tmp_path):
    module = ManualAccumulation()
    trainer = _fit(module, tmp_path / "run", gradient_clip_val=None)
    run = load_run(tmp_path / "run")
    metrics = run["metrics"]
    assert trainer.global_step == 4 and metrics["step"].tolist() == [1, 2, 3, 4]  # not a row per batch
    assert metrics["loss"].tolist() == pytest.approx(
        [(a + b) / 2 for a, b in zip(module.losses[::2], module.losses[1::2], strict=True)], rel=1e-6)
    assert metrics["grad_norm"].notna().all()  # read at the module's own clipping, before it clips
    assert not {"warning", "critical"} & set(run["events"]["severity"])


def test_manual_accumulation_of_undivided_losses_is_fixed_in_lightnings_terms(tmp_path):
    """Manual optimization that sums two batches' `manual_backward(loss)` per step: the summing is named, and its
    fix is Lightning's — `self.manual_backward(loss / accumulation_steps)` — not a plain loop's `.backward()`."""
    _fit(ManualAccumulation(divide=False), tmp_path / "run", gradient_clip_val=None)
    found = cause(load_run(tmp_path / "run")["summary"]["findings"], "micro_batches_summed")
    assert found["first_step"] == 1 and "self.manual_backward(loss / accumulation_steps)" in found["fix"]
    assert ".backward()`" not in found["fix"]


def test_manual_optimization_clipping_before_a_scalers_unscale_is_fixed_in_lightnings_terms(tmp_path):
    """Under 16-mixed (a CPU GradScaler given to Lightning's precision plugin) the plugin unscales inside `opt.step()`:
    `self.clip_gradients` called before it, as Lightning's manual-optimization docs show, clips the scaled gradients.
    Said so, and the fix is where Lightning has unscaled — `on_before_optimizer_step` — not only
    `Trainer(gradient_clip_val)`, which manual optimization refuses."""
    from pytorch_lightning.plugins import MixedPrecision

    torch.manual_seed(0)
    module = ManualAccumulation()
    _fit(module, tmp_path / "run", gradient_clip_val=None,
         plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    found = cause(load_run(tmp_path / "run")["summary"]["findings"], "clip_before_unscale")
    assert "on_before_optimizer_step" in found["fix"] and "manual optimization" in found["fix"], found["fix"]


class ManualKD(ManualAccumulation):
    """Manual optimization that computes its loss from the logits (the model called without labels) and returns
    nothing, as manual-optimization modules may."""

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        logits = self.model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_a_manual_module_that_returns_no_loss_is_told_to_return_it(tmp_path):
    """Nothing hands the callback the loss: the note says so in Lightning's terms (return it from `training_step`),
    not as `probes.step(loss=...)`, which a Lightning user never calls."""
    _fit(ManualKD(), tmp_path / "run", gradient_clip_val=None)
    notes = load_run(tmp_path / "run")["events"].query("code == 'loss_unseen'")
    assert len(notes) == 1 and "return it from `training_step`" in notes["message"].iloc[0]
    assert "probes.step" not in notes["message"].iloc[0]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with a student optimizer stepping every batch and a projection's (a hidden-state KD
    head) every second one: Lightning's global_step counts both, 3 per two batches."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.student = tiny.make_gpt2(VOCAB)
        self.projection = torch.nn.Linear(self.student.config.n_embd, self.student.config.n_embd)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        student_optimizer, projection_optimizer = self.optimizers()
        out = self.student(**batch, output_hidden_states=True)
        loss = out.loss + 1e-3 * self.projection(out.hidden_states[-1]).pow(2).mean()
        self.manual_backward(loss)
        self.losses.append(loss.item())
        student_optimizer.step()
        student_optimizer.zero_grad()
        if batch_idx % 2 == 1:
            projection_optimizer.step()
            projection_optimizer.zero_grad()
        return loss

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.student.parameters(), lr=1e-3),
                torch.optim.SGD(self.projection.parameters(), lr=1e-2)]


def test_two_optimizers_stepping_in_one_batch_are_one_step(tmp_path):
    module = TwoOptimizers()
    trainer = _fit(module, tmp_path / "run", max_steps=6, gradient_clip_val=None)
    run = load_run(tmp_path / "run")
    metrics = run["metrics"]
    assert trainer.global_step == 6 and len(module.losses) == 4  # global_step counts each optimizer's steps
    assert metrics["step"].tolist() == [1, 2, 3, 4]  # a row per batch that stepped, numbered without gaps
    assert metrics["loss"].tolist() == pytest.approx(module.losses, rel=1e-6)
    assert metrics["update_ratio"].notna().all()
    assert not {"warning", "critical"} & set(run["events"]["severity"])

    plain = TwoOptimizers()
    _fit(plain, max_steps=6, gradient_clip_val=None)
    assert plain.losses == module.losses  # the probes did not change training


def test_a_fit_resumed_from_an_earlier_checkpoint_continues_the_steps_it_recorded(tmp_path, monkeypatch):
    """Checkpoints every 3 optimizer steps (global_step 3 is the end of the second batch, step 2); the fit goes on to
    step 4, and a new fit resumes from that checkpoint: steps 3 and 4 are redone and recorded once, numbered from the
    checkpoint's own count — not from its global_step, 3 — and the resumed rows hold the resumed losses. The resumed
    fit names the same run directory by a relative path: the count is found all the same."""
    def fit(max_steps, ckpt_path=None, run_dir=tmp_path / "run"):
        module = TwoOptimizers()
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             callbacks=[SarkdDiagLightningCallback(run_dir), checkpoints])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4), ckpt_path=ckpt_path)
        return module

    first = fit(6)
    assert load_run(tmp_path / "run")["metrics"]["step"].tolist() == [1, 2, 3, 4]
    (checkpoint,) = [path for path in (tmp_path / "ckpt").iterdir() if "step=3" in path.name]
    monkeypatch.chdir(tmp_path)
    resumed = fit(9, checkpoint, run_dir="run")
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert metrics["loss"].tolist() == pytest.approx(first.losses[:2] + resumed.losses, rel=1e-6)


def test_callbacks_into_two_run_directories_share_a_trainer(tmp_path):
    """Each keeps its step count in the checkpoint under a key of its own (two under one key are refused)."""
    module = Distil(tiny.make_gpt2(VOCAB))
    trainer = _fit(module, callbacks=[SarkdDiagLightningCallback(tmp_path / "a"),
                                      SarkdDiagLightningCallback(tmp_path / "b", level="full")])
    runs = [load_run(tmp_path / name)["metrics"]["step"].tolist() for name in ("a", "b")]
    assert trainer.global_step == 4 and runs == [[1, 2, 3, 4]] * 2


class Validated(Distil):
    def validation_step(self, batch, batch_idx):
        loss = self.student(**batch).loss
        self.log("val_loss", loss)
        return loss

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated.append(float(self.trainer.callback_metrics["val_loss"]))


def test_validations_are_the_runs_eval_rows_and_leave_the_statistics_alone(tmp_path):
    module = Validated(tiny.make_gpt2(VOCAB))
    module.validated = []
    val = torch.utils.data.DataLoader(Sequences(VOCAB, n=8), batch_size=4)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                         callbacks=[SarkdDiagLightningCallback(tmp_path / "run")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4), val)
    run = load_run(tmp_path / "run")
    evals = run["metrics"].query("split == 'eval'")
    assert evals["step"].tolist() == [2, 4]  # the sanity check before training is not recorded
    assert evals["eval_loss"].tolist() == pytest.approx(module.validated, rel=1e-6)
    assert evals["eval_ppl"].tolist() == pytest.approx([math.exp(v) for v in module.validated], rel=1e-6)
    assert run["metrics"].query("split == 'train'")["step"].tolist() == [1, 2, 3, 4]
    assert not {"warning", "critical"} & set(run["events"]["severity"])


def test_a_classifier_students_validation_is_no_perplexity(tmp_path):
    """A LightningModule fine-tuning a transformers sequence classifier logs its labels' cross-entropy as `val_loss`:
    its exp is no perplexity, and the eval rows hold the loss alone."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    class Labelled(Sequences):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 3}

    torch.manual_seed(0)
    module = Validated(GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                                                num_labels=3, pad_token_id=0)))
    module.validated = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, val_check_interval=2,
                   callbacks=[SarkdDiagLightningCallback(tmp_path / "run")]).fit(
            module, torch.utils.data.DataLoader(Labelled(VOCAB), batch_size=4),
            torch.utils.data.DataLoader(Labelled(VOCAB, n=8), batch_size=4))
    evals = load_run(tmp_path / "run")["metrics"].query("split == 'eval'")
    assert evals["eval_loss"].tolist() == pytest.approx(module.validated, rel=1e-6)
    assert evals["eval_ppl"].isna().all()


def test_each_validation_dataloader_is_an_evaluation_set_of_its_own(tmp_path):
    """With several validation dataloaders Lightning logs `val_loss/dataloader_idx_0`, `…_1` (never `val_loss`): each
    is an eval row named by its dataloader (`eval_set`), its loss what Lightning logged."""
    class OnSeveral(Validated):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

        def on_validation_epoch_end(self):  # `val_loss` alone is not logged with several dataloaders
            pass

    module = OnSeveral(tiny.make_gpt2(VOCAB))
    logged = []

    class Logged(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_loss")})

    vals = [torch.utils.data.DataLoader(Sequences(VOCAB, n=8, length=length), batch_size=4) for length in (12, 6)]
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                         callbacks=[Logged(), SarkdDiagLightningCallback(tmp_path / "run")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4), vals)
    assert [sorted(entry) for entry in logged] == [["val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1"]] * 2
    evals = load_run(tmp_path / "run")["metrics"].query("split == 'eval'")
    assert list(zip(evals["step"], evals["eval_set"], strict=True)) == [
        (2, "dataloader_idx_0"), (2, "dataloader_idx_1"), (4, "dataloader_idx_0"), (4, "dataloader_idx_1")]
    assert evals["eval_loss"].tolist() == pytest.approx(
        [entry[f"val_loss/dataloader_idx_{i}"] for entry in logged for i in (0, 1)], rel=1e-6)


class GradientsSeen(Distil):
    """Keeps the largest absolute gradient of each step as Lightning hands it to the optimizer, before clipping."""

    def __init__(self, student):
        super().__init__(student)
        self.grad_amax: list[float] = []

    def on_before_optimizer_step(self, optimizer):
        self.grad_amax.append(max(p.grad.abs().max().item() for p in self.student.parameters() if p.grad is not None))


def test_each_steps_gradients_are_read_after_the_closure_that_computes_them(tmp_path):
    """Lightning's automatic optimization hands the optimizer a closure that runs the forward and backward inside
    `optimizer.step()`, after its pre-step hooks: read at the hook, the gradients are the previous step's (or none).
    Each row holds its own step's, as the module saw them before clipping."""
    module = GradientsSeen(tiny.make_gpt2(VOCAB))
    _fit(module, tmp_path / "run")
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["grad_amax"].tolist() == pytest.approx(module.grad_amax, rel=1e-6)


class Skipping(Distil):
    """Drops some batches the way Lightning documents it: `training_step` returns None."""

    def __init__(self, student, skip):
        super().__init__(student)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        return None if self.skip(batch_idx) else super().training_step(batch, batch_idx)


def test_batches_a_training_step_drops_are_skipped_steps_and_no_loss_cut_off(tmp_path):
    """Two batches dropped in a row ran no backward: recorded as skipped, with no claim that the loss is cut off
    from the weights. A `training_step` that never returns its loss trained nothing, and the fix says why."""
    _fit(Skipping(tiny.make_gpt2(VOCAB), skip=lambda i: i in (1, 2)), tmp_path / "some", max_steps=6)
    run = load_run(tmp_path / "some")
    assert run["metrics"]["skipped"].fillna(0).tolist() == [0, 1, 1, 0, 0, 0]
    assert run["events"]["code"].tolist() == ["caller_skipped_step"] * 2
    assert nothing_found(run["summary"])

    _fit(Skipping(tiny.make_gpt2(VOCAB), skip=lambda i: True), tmp_path / "all")
    (found,) = load_run(tmp_path / "all")["summary"]["findings"]
    assert (found["cause"], found["severity"], found["first_step"]) == ("no_gradients", "warning", 1)
    assert "`training_step` returned None on every batch" in found["fix"]


class LineSearched(Distil):
    """Distillation fitted with LBFGS: its step calls Lightning's closure again at the weights its line search tries;
    keeps the loss each step's first call computed (the step's batch at the step's weights)."""

    def __init__(self, student):
        super().__init__(student)
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if len(self.step_losses) == self.trainer.global_step:  # the first call of this step's closure
            self.step_losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.student.parameters(), lr=0.5, max_iter=4)


def test_an_lbfgs_steps_loss_is_its_first_closure_call_as_in_a_plain_loop(tmp_path):
    """Lightning hands `on_train_batch_end` the result of the closure's last call — the line search's last trial
    weights, not the step's. The recorded loss is the first call's, what LBFGS's `step()` returns and a plain loop
    records; the line search did call the closure again (else the test would compare equal losses)."""
    module = LineSearched(tiny.make_gpt2(VOCAB))
    trainer = _fit(module, tmp_path / "run", max_steps=3, gradient_clip_val=None)
    assert trainer.global_step == 3 and len(module.losses) > 3  # re-evaluations ran
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["loss"].tolist() == pytest.approx(module.step_losses, rel=1e-6)


class HiddenRMSE(pl.LightningModule):
    """Hidden-state distillation: the CE plus the RMSE between the last hidden states of the student and a frozen
    teacher."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def training_step(self, batch, batch_idx):
        out = self.student(**batch, output_hidden_states=True)
        with torch.no_grad():
            target = self.teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        return out.loss + torch.nn.functional.mse_loss(out.hidden_states[-1], target).sqrt()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=1e-3)


def test_an_rmse_from_a_student_copied_from_its_teacher_is_named_in_lightning(tmp_path):
    """Step 1's RMSE is the sqrt of exactly 0 and every gradient NaN. What `on_train_batch_end` gets is the detached
    loss; the callback reads the graph of what `training_step` returned (its own method, put back after the fit) and
    names the sqrt, not a float32 overflow."""
    teacher = tiny.make_gpt2(VOCAB, seed=3).eval().requires_grad_(False)
    module = HiddenRMSE(copy.deepcopy(teacher).requires_grad_(True), teacher)
    _fit(module, tmp_path / "run", max_steps=2)
    root = load_run(tmp_path / "run")["summary"]["diagnosis"][0]
    assert (root["cause"], root["first_step"], root["evidence"]["loss_operation"]) == ("divergence", 1, "sqrt")
    assert "training_step" not in vars(module)


@pytest.mark.parametrize("model_name", ["student", "teacher"])
def test_a_step_that_detect_anomaly_ends_in_its_backward_is_replayed_and_placed(tmp_path, model_name):
    """`Trainer(detect_anomaly=True)`: the backward of step 3's NaN loss (a batch with a token that makes one module's
    output infinite; no statistics step) raises before the optimizer's pre-step hook, where a failing step is
    replayed. The run closed failed with the loss non-finite at no module — a teacher's NaN, which the student's own
    outputs do not show, with no cause at all: the step's forwards are replayed as the fit fails."""
    student, teacher = tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3).eval().requires_grad_(False)
    broken = student if model_name == "student" else teacher
    tiny.infinite_on_token(broken, broken.transformer.h[1].mlp.c_fc, token=0)
    data = Sequences(VOCAB)
    data.ids[9, 3] = 0  # batch 2 (samples 8-11): step 3
    with pytest.raises(RuntimeError, match="nan values"):
        _fit(Distil(student, teacher), tmp_path / "run", dataset=data, detect_anomaly=True)
    run = load_run(tmp_path / "run")
    trained = run["metrics"][run["metrics"]["split"] == "train"]  # the raised step is an `unfinished` row
    assert run["summary"]["status"] == "failed" and trained["step"].tolist() == [1, 2]
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == (model_name, "transformer.h.1.mlp.c_fc", 3), root


class HiddenKD(pl.LightningModule):
    """Hidden-state KD as people write it in Lightning: the student, a frozen wider teacher and a projection onto its
    width that the one optimizer trains beside the student; `nan_at`: the projection's gradient NaN at that batch."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.student, self.projection = tiny.make_gpt2(VOCAB), torch.nn.Linear(32, 48)
        self.teacher = tiny.make_gpt2(VOCAB, seed=3, n_embd=48).eval().requires_grad_(False)
        self.projection.weight.register_hook(lambda g: g * math.nan if self.batch == nan_at else g)
        self.batch = None

    def training_step(self, batch, batch_idx):
        self.batch = batch_idx
        out = self.student(**batch, output_hidden_states=True)
        with torch.no_grad():
            target = self.teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        return out.loss + torch.nn.functional.mse_loss(self.projection(out.hidden_states[-1]), target)

    def configure_optimizers(self):
        return torch.optim.AdamW([*self.student.parameters(), *self.projection.parameters()], lr=1e-3)


def test_a_projection_trained_beside_the_student_is_watched_under_its_name(tmp_path):
    """The projection's tensors were watched by no model (the student is `self.student`): its NaN gradient at step 2,
    made every gradient NaN by Lightning's clipping, read as the student's weights gone NaN from finite gradients —
    the optimizer blamed at the embeddings. Each other child the optimizer trains is watched under its own name."""
    module = HiddenKD(nan_at=1)
    optimized = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert models_by_role(module, optimized=optimized) == {
        "student": module.student, "teacher": module.teacher, "projection": module.projection}
    _fit(module, tmp_path / "run", max_steps=3)
    run = load_run(tmp_path / "run")
    assert run["events"].query("code == 'optimizer_tensors_unwatched'").empty
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["tensor"], root["first_step"]) == (
        "divergence", "projection", "weight", 2)


class CompiledMLP(pl.LightningModule):
    """A small MLP whose `mid` weight turns Inf as batch `inf_at` begins; keeps each step's loss."""

    def __init__(self, inf_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)
        self.inf_at, self.losses = inf_at, []

    def training_step(self, batch, batch_idx):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(batch))))).square().mean()

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == self.inf_at:
            with torch.no_grad():
                self.mid.weight[0, 0] = math.inf

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_module_compiled_as_one_graph_trains_and_its_fault_is_found_though_not_placed(tmp_path):
    """`trainer.fit(torch.compile(module, fullgraph=True))`: Lightning compiles the module's steps with that context,
    so the models they call run inside one graph, where each probe hook (a graph break) raised dynamo's Unsupported.
    No hook goes there: the fit trains as without the callback, a weight turned Inf is still found at its step and
    stops training, and that it cannot be placed at a module is said."""
    def fit(callbacks, inf_at=None):
        module = CompiledMLP(inf_at)
        rows = list(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
        _fit(torch.compile(module, backend="eager", fullgraph=True), dataset=rows, callbacks=callbacks,
             gradient_clip_val=None)
        return module

    module = fit([SarkdDiagLightningCallback(tmp_path / "run")], inf_at=2)
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", None, 3), root
    assert run["summary"]["status"] == "stopped" and len(module.losses) == 3
    assert run["events"].query("code == 'compiled_fullgraph'")["step"].tolist() == [1]
    assert fit([]).losses[:2] == module.losses[:2]
