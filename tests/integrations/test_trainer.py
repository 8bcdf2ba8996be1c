"""SarkdDiagCallback on a real transformers.Trainer: pure fp16 with the Trainer's default optimizer, a clean
bf16 run, an exception mid-run, a resume from the Trainer's own checkpoint into the same run directory, and a
hand-written KD Trainer whose teacher overflows."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

pytest.importorskip("accelerate")

import tiny  # noqa: E402
from contract import nothing_found  # noqa: E402
from frameworks import Sequences, cause, logged_losses, overflow_fp16, training_args  # noqa: E402
from torch.nn.utils import clip_grad  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from sarkd_diag import Probes, load_run  # noqa: E402
from sarkd_diag.contract.errors import BadInput  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback  # noqa: E402

VOCAB = 64
ORIGINAL_CLIPPING = clip_grad._clip_grads_with_norm_


def _train(tmp_path, model, run_dir=None, dataset=None, **args):
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", **args),
                      train_dataset=dataset or Sequences(VOCAB))
    callback = SarkdDiagCallback.attach(trainer, run_dir) if run_dir is not None else None
    trainer.train()
    return trainer, callback


def _train_losses(run) -> list[float]:
    metrics = run["metrics"]
    return metrics[metrics["split"] == "train"]["loss"].tolist()


def test_default_trainer_optimizer_is_fused_adamw():
    # what the pure-fp16 test below relies on: fused AdamW adds eps in fp32, so no eps underflow is claimed
    assert TrainingArguments(output_dir="unused", report_to=[]).optim == "adamw_torch_fused"


def test_pure_fp16_with_the_default_optimizer_is_diagnosed_and_stopped(tmp_path):
    trainer, callback = _train(tmp_path, tiny.make_gpt2(VOCAB).half(), tmp_path / "run", learning_rate=1e-2,
                               max_steps=10)
    run = load_run(tmp_path / "run")
    summary = run["summary"]
    first_bad = int(run["events"].query("kind == 'nonfinite_param'")["step"].min())
    # stopped on the step whose weights went non-finite, not trained on NaN weights to step 10
    assert trainer.state.global_step == first_bad == callback.stopped_at < 10
    assert summary["status"] == "stopped" and summary["steps_completed"] == first_bad
    root = summary["diagnosis"][0]
    assert root["cause"] == "optimizer_state_underflow" and root["severity"] == "critical"
    assert root["model"] == "student" and root["first_step"] == 1
    assert root["module"] in dict(trainer.model.named_modules()) or root["module"] in dict(
        trainer.model.named_parameters())
    assert "optimizer_eps_underflow" not in [d["cause"] for d in summary["diagnosis"]]
    assert "TrainingArguments" in root["fix"] or "bf16" in root["fix"]  # fixes in the caller's terms

    plain, _ = _train(tmp_path, tiny.make_gpt2(VOCAB).half(), learning_rate=1e-2, max_steps=10)
    assert logged_losses(plain)[:first_bad] == logged_losses(trainer)  # the probes did not change training
    assert _train_losses(run)[:first_bad - 1] == pytest.approx(logged_losses(trainer)[:first_bad - 1], rel=1e-6)


@pytest.mark.parametrize("save", [dict(save_strategy="steps", save_steps=1, save_total_limit=1),
                                  dict(save_strategy="epoch")])
def test_stopping_on_nan_weights_saves_no_checkpoint_of_them(tmp_path, save):
    """The step whose weights turned NaN is not saved: under `save_total_limit` its checkpoint would have rotated out
    the last good one (the one to resume from), and under `save_strategy="epoch"` the epoch's end, reached by the
    stop, would have saved it."""
    trainer, callback = _train(tmp_path, tiny.make_gpt2(VOCAB).half(), tmp_path / "run", learning_rate=1e-2,
                               max_steps=10, **save)
    stopped = callback.stopped_at
    assert stopped is not None and trainer.state.global_step == stopped < 10
    kept = sorted(path.name for path in (tmp_path / "trainer").glob("checkpoint-*"))
    assert kept == ([f"checkpoint-{stopped - 1}"] if save["save_strategy"] == "steps" else [])


def test_fp16_on_the_cpu_which_accelerate_runs_in_fp32_is_recorded_as_fp32(tmp_path):
    """accelerate runs TrainingArguments(fp16=True) on the CPU with neither autocast nor a loss scaler: the run trains
    in fp32, and its record says so (not `mixed`, beside 'no autocast' and no scaler) and why."""
    trainer, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), tmp_path / "run", fp16=True, learning_rate=1e-3)
    assert not trainer.accelerator.native_amp and trainer.accelerator.scaler is None  # outside the tool
    precision = load_run(tmp_path / "run")["summary"]["precision"]
    assert (precision["mode"], precision["compute_dtype"], precision["loss_scaling"]) == ("fp32", None, False)
    assert precision["requested"] == "TrainingArguments(fp16=True)" and "without autocast" in precision["reason"]


def test_bf16_run_is_clean_and_recorded_as_bf16_mixed(tmp_path):
    model = tiny.make_gpt2(VOCAB)
    callback = SarkdDiagCallback(tmp_path / "run")  # the plain callbacks=[...] path, without attach
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", bf16=True, learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), callbacks=[callback])
    trainer.train()
    run = load_run(tmp_path / "run")
    summary = run["summary"]
    assert summary["status"] == "completed" and summary["steps_completed"] == 4
    assert nothing_found(summary)
    assert not {"warning", "critical"} & set(run["events"]["severity"]) if len(run["events"]) else True
    assert summary["precision"]["mode"] == "bf16-mixed"
    assert summary["precision"]["master_dtype"] == "float32"
    assert summary["precision"]["compute_dtype"] == "bfloat16"  # observed: the training forwards ran under autocast
    assert run["events"].query("kind == 'setup_note' and probe == 'precision'").empty
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"]["mode"] == "bf16-mixed"
    assert run["metrics"]["step"].tolist() == [1, 2, 3, 4]
    # the loss of every step, from the model's outputs, equals what the Trainer logged
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)

    plain, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), bf16=True, learning_rate=1e-3)
    assert logged_losses(plain) == logged_losses(trainer)


@pytest.mark.parametrize("how", ["attach", "callbacks", "add_callback"])
def test_an_exception_inside_the_trainer_closes_the_run_it_can(tmp_path, cli, how):
    """transformers calls no callback on an exception. Attached, or passed in `callbacks=[...]` (bound as the Trainer
    is built), the callback wraps `trainer.train` and closes the run as `failed` with its finished steps, and lets go
    of the hooks and the log files (in a notebook, the kernel holding them open would make `sarkd-diag report` refuse
    the run as live). Given by `add_callback`, it binds inside the first `train()`, too late to wrap it: the run stays
    open, readable, and `report` closes it as `crashed`."""
    callback = SarkdDiagCallback(tmp_path / "run")
    trainer = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", max_steps=8),
                      train_dataset=Sequences(VOCAB, fail_at=4 * 3 + 1),  # a corrupt record read in step 3 or 4
                      callbacks=[callback] if how == "callbacks" else [])
    if how == "attach":
        callback = SarkdDiagCallback.attach(trainer, tmp_path / "run")
    if how == "add_callback":
        trainer.add_callback(callback)
    with pytest.raises(RuntimeError, match="corrupt record"):
        trainer.train()
    died_after = trainer.state.global_step
    assert 1 <= died_after < 8
    run_dir = tmp_path / "run"
    assert (run_dir / "config.json").is_file()  # written when the run dir opened, not at close
    if how != "add_callback":
        assert clip_grad._clip_grads_with_norm_ is ORIGINAL_CLIPPING  # the hooks are gone with the run
        summary = load_run(run_dir)["summary"]
        assert summary["status"] == "failed" and summary["error"]["step"] == died_after + 1  # and what failed
        assert summary["error"]["message"].startswith("RuntimeError: corrupt record"), summary["error"]
    else:
        assert not (run_dir / "summary.json").exists()
        code, _, err = cli("report", run_dir)
        assert code == 0, err
        assert load_run(run_dir)["summary"]["status"] == "crashed"
        callback.probes.set.close()  # the hooks go with the process, as in a real crash (none left for later tests)
    run = load_run(run_dir)
    assert run["summary"]["steps_completed"] == died_after
    assert run["metrics"]["step"].tolist() == list(range(1, died_after + 1))


def test_building_a_second_trainer_with_an_attached_callback_leaves_it_bound_to_the_first(tmp_path):
    """A callback attached to one trainer, then passed to a second one built before the first trains (a notebook
    comparing two setups): building is not running, so the first trainer's `train()` is still wrapped, and its
    exception closes the run as `failed`."""
    first = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "first", max_steps=8),
                    train_dataset=Sequences(VOCAB, fail_at=4 * 3 + 1))
    callback = SarkdDiagCallback.attach(first, tmp_path / "run")
    Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "second"), train_dataset=Sequences(VOCAB),
            callbacks=[callback])
    with pytest.raises(RuntimeError, match="corrupt record"):
        first.train()
    assert load_run(tmp_path / "run")["summary"]["status"] == "failed"


class _Crash(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt  # the job killed right after a checkpoint


class _StateAtBegin(TrainerCallback):
    def __init__(self):
        self.global_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.global_step = state.global_step


def test_resume_from_a_trainer_checkpoint_appends_to_the_same_run(tmp_path):
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=1e-3)
    first = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", **args),
                    train_dataset=Sequences(VOCAB), callbacks=[_Crash(at_step=4)])
    SarkdDiagCallback.attach(first, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (tmp_path / "trainer" / "checkpoint-4").is_dir()

    spy = _StateAtBegin()
    second = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", **args),
                     train_dataset=Sequences(VOCAB), callbacks=[spy])
    SarkdDiagCallback.attach(second, tmp_path / "run")
    second.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-4"))
    assert spy.global_step == 4  # the Trainer loads the checkpoint's state before on_train_begin

    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == list(range(1, 9))  # 1..8, not 1..4 then 1..4 again
    assert run["summary"]["status"] == "completed" and run["summary"]["steps_completed"] == 8
    assert torch.isfinite(torch.tensor(_train_losses(run))).all()


class _OverflowAt(TrainerCallback):
    """A student module beyond fp16's range during one step (a fault of the run that died, not of its resume)."""

    def __init__(self, module, step: int):
        self.module, self.step, self.handle = module, step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.handle = self.module.register_forward_hook(lambda _m, _i, output: output * 0 + 1e5)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_a_resume_from_an_earlier_checkpoint_records_each_redone_step_once(tmp_path):
    """Killed at step 6 with its last checkpoint at 4, the run resumes (`resume_from_checkpoint=True`) and redoes
    steps 5 and 6: the run directory holds each step once, with the resumed run's values, and the fault the dead
    run met at step 5 — which the resume does not meet — is no longer in its events."""
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=1e-3)
    model = tiny.make_gpt2(VOCAB)
    first = Trainer(model=model, args=training_args(tmp_path / "trainer", **args), train_dataset=Sequences(VOCAB),
                    callbacks=[_Crash(at_step=6), _OverflowAt(model.transformer.h[0].mlp.c_proj, step=5)])
    SarkdDiagCallback.attach(first, tmp_path / "run", level="full")
    with pytest.raises(KeyboardInterrupt):
        first.train()
    died = load_run(tmp_path / "run")
    assert died["summary"]["status"] == "interrupted"  # closed by the attached callback as train() raised
    assert died["metrics"]["step"].tolist() == list(range(1, 7))
    assert set(died["events"].query("kind == 'fp16_overflow_risk'")["step"]) == {5}  # the fault was seen

    second = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", **args),
                     train_dataset=Sequences(VOCAB))
    SarkdDiagCallback.attach(second, tmp_path / "run", level="full")
    second.train(resume_from_checkpoint=True)

    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == list(range(1, 9))  # 5 and 6 once, not twice
    assert _train_losses(run) == pytest.approx(logged_losses(second), rel=1e-6)  # the resumed run's 5..8
    assert run["events"].query("kind == 'fp16_overflow_risk'").empty and nothing_found(run["summary"])
    rows = [json.loads(line)["step"] for line in (tmp_path / "run" / "activations.jsonl").read_text().splitlines()]
    assert sorted(set(rows)) == list(range(1, 9)) and len({rows.count(s) for s in set(rows)}) == 1  # one set a step
    assert run["summary"]["status"] == "completed" and run["summary"]["steps_completed"] == 8


@pytest.mark.parametrize("how", ["attach", "callbacks", "add_callback"])
def test_the_trainers_output_dir_is_refused_as_the_run_directory_before_any_step(tmp_path, monkeypatch, how):
    """SarkdDiagCallback(args.output_dir) was taken: `trainer.save_model()` then wrote the model's config.json over the
    run's, the run could no longer be loaded, and a resume into it raised BadInput inside `train()`, killing the
    training. It is refused where the callback first learns both directories — attached, built with the Trainer, or
    at the `train()` of one it was added to —, before any step, in one sentence naming a directory of its own."""
    monkeypatch.chdir(tmp_path)
    output_dir, run_dir = tmp_path / "trainer", "trainer"  # the same directory, spelled otherwise
    says = ("run_dir='trainer' is the Trainer's output_dir, where it writes its checkpoints and "
            "`trainer.save_model()` the model's config.json over the run's: give the probes a directory of their own, "
            "e.g. 'trainer/sarkd-diag'")
    args = training_args(output_dir, max_steps=2, save_strategy="steps", save_steps=1)
    callback = SarkdDiagCallback(run_dir)
    with pytest.raises(BadInput) as refused:
        trainer = Trainer(model=tiny.make_gpt2(VOCAB), args=args, train_dataset=Sequences(VOCAB),
                          callbacks=[callback] if how == "callbacks" else [])
        if how == "attach":
            SarkdDiagCallback.attach(trainer, run_dir)
        else:
            trainer.add_callback(callback)
            trainer.train()
    assert str(refused.value) == says
    if how == "add_callback":
        assert trainer.state.global_step == 0
    assert callback.probes is None and not (output_dir / "config.json").exists()
    assert not list(output_dir.glob("checkpoint-*")) and not list(output_dir.glob("events*.jsonl"))


def test_the_trainers_unnamed_parameter_groups_are_named_by_what_they_hold(tmp_path):
    """The Trainer's two groups (with and without weight decay) carry no names: a cause located at one says
    which tensors it holds, in the Trainer's words — not "group 0"."""
    _train(tmp_path, tiny.make_gpt2(VOCAB).half(), tmp_path / "run", learning_rate=1e-3, max_steps=2,
           optim="adamw_torch", weight_decay=0.01)
    summary = load_run(tmp_path / "run")["summary"]
    root = summary["diagnosis"][0]
    assert root["cause"] == "optimizer_eps_underflow" and root["model"] == "student"
    assert root["tensor"].startswith("student: ") and "tensors" in root["tensor"] and "group" not in root["tensor"]
    assert "--" not in root["fix"] and "TrainingArguments(fp16=True)" in root["fix"]


class KDTrainer(Trainer):
    """Distillation as people write it on the Trainer: a frozen `self.teacher` (or another name), KL on the logits
    plus the CE."""

    def __init__(self, *args, teacher, teacher_attribute="teacher", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_attribute = teacher_attribute
        setattr(self, teacher_attribute, teacher.eval())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = getattr(self, self.teacher_attribute)(input_ids=inputs["input_ids"]).logits
        kd = torch.nn.functional.kl_div(outputs.logits.float().log_softmax(-1),
                                        teacher_logits.float().log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        loss = 0.5 * outputs.loss + 0.5 * kd
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("attribute", ["teacher", "ref_teacher"])
def test_a_hand_written_kd_trainers_teacher_is_found_and_its_overflow_named(tmp_path, attribute):
    teacher = tiny.make_gpt2(VOCAB, seed=3).half()
    overflow_fp16(teacher.transformer.h[1])
    trainer = KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=teacher, teacher_attribute=attribute,
                        args=training_args(tmp_path / "trainer", max_steps=2), train_dataset=Sequences(VOCAB))
    callback = SarkdDiagCallback.attach(trainer, tmp_path / "run")
    assert callback.teacher is teacher
    trainer.train()
    root = load_run(tmp_path / "run")["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 1)


class Distillation(torch.nn.Module):
    """Distillation as a model: the student and its teacher in one module whose forward returns the KD loss (CE plus
    KL, the teacher under no_grad), handed to a plain Trainer as its `model`; `freeze`: the teacher's tensors set
    `requires_grad=False` (else left as loaded, and the Trainer's optimizer holds them)."""

    def __init__(self, student, teacher, freeze=True):
        super().__init__()
        self.student, self.teacher = student, teacher.requires_grad_(not freeze).eval()

    def forward(self, input_ids, labels=None):
        outputs = self.student(input_ids=input_ids, labels=labels)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        kl = torch.nn.functional.kl_div(outputs.logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                                        log_target=True, reduction="batchmean")
        return {"loss": outputs.loss + kl, "logits": outputs.logits}


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "left_requiring_grad"])
def test_a_distillation_models_teacher_is_watched_as_the_teacher_and_its_overflow_named(tmp_path, freeze):
    """The teacher a Trainer's model holds as a child (no teacher on the trainer) is the teacher: its fp16 overflow is
    `teacher_overflow` at its own module path — not an activation overflow of the student at `teacher.…` — and the
    run's evaluation of the KD objective is no perplexity. Training is unchanged. A teacher left requiring grad is in
    the Trainer's optimizer, but runs under no_grad: its forward is a frozen model's (it was read as a trained model's
    under no_grad — never a training forward, its overflow unseen)."""
    def distillation_trainer():
        return Trainer(model=Distillation(tiny.make_gpt2(VOCAB), _overflowing_teacher(), freeze=freeze),
                       args=training_args(tmp_path / "trainer", max_steps=2, eval_strategy="steps", eval_steps=2),
                       train_dataset=Sequences(VOCAB), eval_dataset=Sequences(VOCAB, n=8))

    trainer = distillation_trainer()
    callback = SarkdDiagCallback.attach(trainer, tmp_path / "run", on_critical="record")
    trainer.train()
    assert callback.probes.ctx.models == {"student": trainer.model.student, "teacher": trainer.model.teacher}
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 1), root
    assert run["summary"]["precision"]["mode"] == "fp32"  # the student's fp32, not fp32 over the teacher's fp16
    assert "eval_ppl" not in run["metrics"] or run["metrics"]["eval_ppl"].isna().all()
    plain = distillation_trainer()
    plain.train()
    assert logged_losses(plain) == logged_losses(trainer)


def _overflowing_teacher():
    teacher = tiny.make_gpt2(VOCAB, seed=3).half()
    overflow_fp16(teacher.transformer.h[1])
    return teacher


@pytest.mark.parametrize("how", ["callbacks", "add_callback", "class"])
def test_a_plain_callback_finds_its_trainer(tmp_path, how):
    """`callbacks=[SarkdDiagCallback(dir)]` or `trainer.add_callback(...)` after construction: transformers hands a
    callback no trainer, yet the callback reads the KD Trainer's teacher, the gradient norm the Trainer clips by and the
    loss `training_step` returns, as `attach` does. `callbacks=[SarkdDiagCallback]`, the class, which transformers
    builds with no arguments, records into `sarkd-diag` inside the Trainer's output_dir."""
    def kd_trainer(callbacks):
        return KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=_overflowing_teacher(), callbacks=callbacks,
                         args=training_args(tmp_path / "trainer", max_steps=2), train_dataset=Sequences(VOCAB))

    if how == "class":
        trainer = kd_trainer([SarkdDiagCallback])
        (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SarkdDiagCallback)]
        run_dir = tmp_path / "trainer" / "sarkd-diag"
    else:
        callback, run_dir = SarkdDiagCallback(tmp_path / "run"), tmp_path / "run"
        trainer = kd_trainer([callback] if how == "callbacks" else [])
    if how == "add_callback":
        trainer.add_callback(callback)
    trainer.train()
    assert callback.teacher is trainer.teacher
    run = load_run(run_dir)
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 1)
    # stopped at step 1, whose NaN loss is the one training_step returned (the Trainer logs 0 for it) and whose
    # gradient norm is the one the Trainer clipped by
    assert trainer.state.global_step == 1 and math.isnan(_train_losses(run)[0])
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(row["grad_norm"]) and math.isnan(_logged(trainer, "grad_norm")[0])  # measured, not null
    plain = kd_trainer([])
    plain.train()
    assert logged_losses(plain)[:1] == logged_losses(trainer)


def test_a_distillation_trainers_evaluation_is_no_perplexity(tmp_path):
    """A KD Trainer evaluates its compute_loss — CE and KL mixed: the eval row holds that loss, and no perplexity (its
    exp is none), so the summary names no validation perplexity it did not measure."""
    trainer = KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=tiny.make_gpt2(VOCAB, seed=3),
                        args=training_args(tmp_path / "trainer", max_steps=2, eval_strategy="steps", eval_steps=2),
                        train_dataset=Sequences(VOCAB), eval_dataset=Sequences(VOCAB, n=8),
                        callbacks=[SarkdDiagCallback(tmp_path / "run")])
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["split"] == "eval"]
    assert row["step"] == 2 and row["eval_loss"] == pytest.approx(trainer.state.log_history[-2]["eval_loss"])
    assert "eval_ppl" not in row and load_run(tmp_path / "run")["summary"]["final"]["eval_ppl"] is None


class Graded(torch.utils.data.Dataset):
    """Random token sequences, each with one real-valued grade (a regression target)."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.ids, self.grades = torch.randint(1, VOCAB, (n, 12), generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.grades[i]}


def test_a_sequence_regressors_evaluation_is_no_perplexity(tmp_path):
    """A `ForSequenceClassification` head fine-tuned to regress a grade evaluates a squared error: its exp is no
    perplexity, and the run names none (a language model's eval rows keep theirs: the test above)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                     num_labels=1, pad_token_id=0))
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=2, eval_strategy="steps",
                                                      eval_steps=2, learning_rate=1e-3),
                      train_dataset=Graded(), eval_dataset=Graded(8), callbacks=[SarkdDiagCallback(tmp_path / "run")])
    trainer.train()
    assert model.config.problem_type == "regression"
    run = load_run(tmp_path / "run")
    (row,) = run["metrics"].query("split == 'eval'").itertuples()
    assert row.eval_loss == pytest.approx(trainer.state.log_history[-2]["eval_loss"]) and math.isnan(row.eval_ppl)
    assert run["summary"]["final"]["eval_ppl"] is None
    report = (tmp_path / "run" / "report.md").read_text()  # the loss it measured, where a perplexity would read —
    assert "perplexity: —" not in report and f"| 2 | {row.eval_loss:.4g} |" in report
    assert f"validation loss (its exp is no perplexity): {row.eval_loss:.4g}" in report


def test_a_masked_lms_evaluation_keeps_its_perplexity(tmp_path):
    """A masked LM (BERT's, DistilBERT's: it cannot `generate`) evaluates a cross-entropy over its vocabulary: its exp
    is the perplexity MLM training reports, unlike a classifier's or a regressor's."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=2, eval_strategy="steps",
                                                      eval_steps=2, learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), eval_dataset=Sequences(VOCAB, n=8),
                      callbacks=[SarkdDiagCallback(tmp_path / "run")])
    trainer.train()
    (row,) = load_run(tmp_path / "run")["metrics"].query("split == 'eval'").itertuples()
    assert row.eval_ppl == pytest.approx(math.exp(row.eval_loss))


def test_a_callback_reused_by_a_second_trainer_binds_to_it(tmp_path):
    """One callback object given to two Trainers in turn: the second run reads the second trainer's teacher, and the
    first trainer's methods are its own again."""
    callback = SarkdDiagCallback(tmp_path / "run", level="full")
    first = KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=tiny.make_gpt2(VOCAB, seed=3), callbacks=[callback],
                      args=training_args(tmp_path / "first", max_steps=2), train_dataset=Sequences(VOCAB))
    first.train()
    second = KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=_overflowing_teacher(), callbacks=[callback],
                       args=training_args(tmp_path / "second", max_steps=2), train_dataset=Sequences(VOCAB))
    second.train()
    assert callback.teacher is second.teacher
    assert "training_step" not in vars(first) and "compute_loss" not in vars(first)
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == [1, 2, 3]  # the second run stopped at its first step, the NaN one
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 3)


def test_the_recorded_lr_is_the_one_each_step_used(tmp_path):
    """The Trainer steps its scheduler after the optimizer and before `on_step_end`: the lr of a step is read at
    the optimizer's pre-step hook, as the Trainer logs it — not the next step's (0 at the last step here)."""
    trainer, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), tmp_path / "run", learning_rate=1e-3,
                        lr_scheduler_type="linear")
    used = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert used == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert load_run(tmp_path / "run")["metrics"]["lr"].tolist() == pytest.approx(used)
    plain, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), learning_rate=1e-3, lr_scheduler_type="linear")
    assert logged_losses(plain) == logged_losses(trainer)  # reading the lr changed nothing


def _preflight(run) -> list[str]:
    return run["events"].query("kind == 'optimizer_preflight'")["code"].tolist()


def test_a_frozen_parameter_group_is_not_warned_about_weight_decay(tmp_path):
    """A group held at lr 0 (frozen embeddings) with the Trainer's weight decay: lr × weight_decay is 0 because
    the group does not train, not because weight decay rounds away."""
    model = tiny.make_gpt2(VOCAB)
    frozen = [model.transformer.wte.weight]
    rest = [p for p in model.parameters() if all(p is not f for f in frozen)]
    optimizer = torch.optim.AdamW([{"params": frozen, "lr": 0.0}, {"params": rest}], lr=1e-3, weight_decay=0.01)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=2),
                      train_dataset=Sequences(VOCAB), optimizers=(optimizer, None))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    run = load_run(tmp_path / "run")
    assert _preflight(run) == [] and nothing_found(run["summary"])


def test_preflight_checks_under_warmup_use_the_schedulers_initial_lr(tmp_path):
    """Under warmup the first step's lr is 0: checked at it, weight decay looks like it rounds away (a false
    warning) and no update looks too small (a real one missed). The scheduler's initial_lr is the lr meant."""
    _train(tmp_path, tiny.make_gpt2(VOCAB), tmp_path / "fp32", learning_rate=1e-3, warmup_steps=2,
           weight_decay=0.01, max_steps=2)
    assert _preflight(load_run(tmp_path / "fp32")) == []
    _train(tmp_path, tiny.make_gpt2(VOCAB).to(torch.bfloat16), tmp_path / "bf16", learning_rate=1e-6,
           warmup_steps=2, max_steps=2)
    run = load_run(tmp_path / "bf16")
    assert "update_below_half_ulp" in _preflight(run)
    assert "initial_lr=1e-06" in run["events"].query("code == 'update_below_half_ulp'")["message"].iloc[0]


def _plain_callback_run(tmp_path, model, **args):
    """A Trainer with `callbacks=[SarkdDiagCallback(dir)]` only: the loss is read from the model's outputs."""
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", **args), train_dataset=Sequences(VOCAB),
                      callbacks=[SarkdDiagCallback(tmp_path / "run")])
    trainer.train()
    return trainer, load_run(tmp_path / "run")


def test_under_gradient_accumulation_the_step_loss_sums_the_num_items_shares(tmp_path):
    """With gradient accumulation the Trainer calls the model with `num_items_in_batch`: each micro-batch's loss
    is its summed loss over the whole step's target count, a share — the step's loss is their sum (what the
    Trainer logs), not their mean nor the last one."""
    trainer, run = _plain_callback_run(tmp_path, tiny.make_gpt2(VOCAB), gradient_accumulation_steps=2,
                                       learning_rate=1e-3)
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)
    assert min(logged_losses(trainer)) > 3  # a step's loss (~ln 64), not a half of one
    plain, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), gradient_accumulation_steps=2, learning_rate=1e-3)
    assert logged_losses(plain) == logged_losses(trainer)



class ItemsKDTrainer(KDTrainer):
    """The KD trainer written as transformers asks under gradient accumulation: each term summed over the target tokens
    and divided by `num_items_in_batch`, the step's count over all its micro-batches."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        logits, labels = outputs.logits[:, :-1].float(), inputs["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
        kd = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher_logits[:, :-1].float().log_softmax(-1),
                                        log_target=True, reduction="sum")
        loss = (0.5 * ce + 0.5 * kd) / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("trainer_class, ignored", [(KDTrainer, True), (ItemsKDTrainer, False)])
def test_a_compute_loss_that_ignores_num_items_under_accumulation_sums_the_micro_batches(tmp_path, trainer_class,
                                                                                         ignored):
    """The GPT-2 student's forward takes `**kwargs`, so under `gradient_accumulation_steps=2` the Trainer hands
    `compute_loss` the step's `num_items_in_batch` and no longer divides its loss by 2 — counting on it. A KD override
    that never reads the count returns each micro-batch's mean loss: the step's gradient is their sum, twice the
    batch's, every value finite. Named once, as the summed micro-batches it makes; an override that divides by the
    count is not."""
    trainer = trainer_class(model=tiny.make_gpt2(VOCAB), teacher=tiny.make_gpt2(VOCAB, seed=3),
                            args=training_args(tmp_path / "trainer", max_steps=3, gradient_accumulation_steps=2),
                            train_dataset=Sequences(VOCAB))
    assert trainer.model_accepts_loss_kwargs  # the Trainer leaves the division to compute_loss
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    summary = load_run(tmp_path / "run")["summary"]
    if not ignored:
        assert nothing_found(summary), summary
        return
    (finding,) = summary["findings"]
    assert (finding["cause"], finding["severity"], finding["first_step"]) == ("micro_batches_summed", "warning", 1)
    assert finding["evidence"]["gradient_accumulation_steps"] == 2
    assert "`num_items_in_batch`" in finding["fix"] and "model_accepts_loss_kwargs = False" in finding["fix"]


class StoredTeacherLogits(Sequences):
    """Offline KD: a teacher's logits computed once and stored beside the tokens; records from `bad` on were saved from
    a float16 teacher that overflowed (+Inf)."""

    def __init__(self, vocab: int, bad: int):
        super().__init__(vocab)
        self.logits = torch.randn(len(self.ids), self.ids.shape[1], vocab, generator=torch.Generator().manual_seed(1))
        self.logits[bad:, 4, 7] = math.inf

    def __getitem__(self, i):
        return {**super().__getitem__(i), "teacher_logits": self.logits[i]}


class OfflineKDTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.pop("teacher_logits")
        outputs = model(**inputs)
        kd = torch.nn.functional.kl_div(outputs.logits.float().log_softmax(-1).flatten(0, 1),
                                        teacher_logits.log_softmax(-1).flatten(0, 1), log_target=True,
                                        reduction="batchmean")
        loss = 0.5 * outputs.loss + 0.5 * kd
        return (loss, outputs) if return_outputs else loss


def test_stored_teacher_logits_with_an_inf_are_named_as_the_bad_data(tmp_path):
    """The batch's `teacher_logits` reach the loss by no module: a replay finds every module finite and could only
    blame the loss's arithmetic. The batch `compute_loss` was handed is read once at the first non-finite loss: the
    stored logits are bad data, named by their key at the step that first trained on them."""
    trainer = OfflineKDTrainer(model=tiny.make_gpt2(VOCAB), args=training_args(
        tmp_path / "trainer", max_steps=4, learning_rate=1e-3, remove_unused_columns=False),
        train_dataset=StoredTeacherLogits(VOCAB, bad=16))  # half the records: some step after the first meets one
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    run = load_run(tmp_path / "run")
    first_nan = int(run["events"].query("kind == 'nonfinite_loss'")["step"].min())
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["tensor"], root["first_step"]) == ("nonfinite_input", "teacher_logits", first_nan)


class PromptOnlyEveryOther(Sequences):
    """Completion-only SFT whose completion was cut off: every other sequence is all prompt (labels -100). Records
    which reads were empty, in the order the Trainer reads them."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.empty_reads: list[bool] = []

    def __getitem__(self, i):
        item = super().__getitem__(i)
        self.empty_reads.append(bool(i % 2))
        return {**item, "labels": torch.full_like(item["labels"], -100)} if i % 2 else item


def test_an_empty_micro_batch_under_num_items_in_batch_adds_0_and_only_a_step_without_targets_is_bad_data(tmp_path):
    """Under gradient accumulation the Trainer divides each micro-batch's summed loss by the step's target count
    (`num_items_in_batch`): a micro-batch without targets adds 0 to a finite step loss — no bad data to report. A
    step whose every micro-batch is empty divides 0 by 0: that step's NaN is the data's doing, named there."""
    dataset = PromptOnlyEveryOther(VOCAB)
    _train(tmp_path, tiny.make_gpt2(VOCAB), tmp_path / "run", dataset=dataset, per_device_train_batch_size=1,
           gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=6)
    run = load_run(tmp_path / "run")
    losses = _train_losses(run)
    steps = [dataset.empty_reads[i:i + 2] for i in range(0, 12, 2)]
    nan_steps = [step for step, loss in enumerate(losses, start=1) if math.isnan(loss)]
    assert nan_steps == [step for step, reads in enumerate(steps, start=1) if all(reads)]  # 0/0 where all are empty
    assert nan_steps and any(any(reads) and not all(reads) for reads in steps)  # and finite with one empty
    assert run["events"].query("kind == 'empty_targets'")["step"].tolist() == nan_steps[:1]
    (cause, *_) = run["summary"]["diagnosis"]
    assert (cause["cause"], cause["severity"], cause["first_step"]) == ("nonfinite_input", "critical", nan_steps[0])


def test_a_second_train_call_continues_the_step_numbering(tmp_path):
    """A second `trainer.train()` starts the Trainer's global_step at 0 again; the run directory already holds
    steps 1..4, so the second run's steps are 5..8, not 1..4 a second time."""
    def twice(run_dir):
        trainer = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", learning_rate=1e-3),
                          train_dataset=Sequences(VOCAB))
        if run_dir is not None:
            SarkdDiagCallback.attach(trainer, run_dir)
        losses = []
        for _ in range(2):
            trainer.train()
            losses += logged_losses(trainer)
        return losses

    losses = twice(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == list(range(1, 9))
    assert _train_losses(run) == pytest.approx(losses, rel=1e-6)
    assert run["summary"]["steps_completed"] == 8
    assert twice(None) == losses


def _out_of_memory_at_batch_size(model, batch_size: int, forward: int) -> None:
    """The `forward`-th training forward of `model` at `batch_size` rows raises CUDA's out-of-memory error (a batch of
    long sequences on a GPU), as it would inside the Trainer's `training_step`."""
    forwards = [0]

    def out_of_memory(_module, args, kwargs):
        if kwargs["input_ids"].shape[0] == batch_size and torch.is_grad_enabled():
            forwards[0] += 1
            if forwards[0] == forward:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.register_forward_pre_hook(out_of_memory, with_kwargs=True)


@pytest.mark.parametrize("how", ["attach", "add_callback"])
def test_auto_find_batch_size_restarting_after_out_of_memory_is_recorded_in_the_trainers_steps(tmp_path, how):
    """`auto_find_batch_size=True`: an out-of-memory error in step 2 makes the Trainer start its training loop again
    inside the same `train()`, at a smaller batch size, from global_step 0. The record follows the Trainer's steps
    (its logs, its checkpoints, `resume_from_checkpoint`): the abandoned attempt's step is cut, not kept as step 1 with
    the new attempt's steps numbered on after it — and a fault at the Trainer's step 3 is placed at step 3. The
    restart is said, with the error that caused it."""
    def restarting_trainer():
        model = tiny.make_gpt2(VOCAB)
        _out_of_memory_at_batch_size(model, batch_size=8, forward=2)
        frozen = model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
        return Trainer(model=model, args=training_args(tmp_path / "trainer", auto_find_batch_size=True,
                                                       per_device_train_batch_size=8, learning_rate=1e-3),
                       train_dataset=Sequences(VOCAB), callbacks=[_InfWeightAt(frozen, step=3)])

    trainer = restarting_trainer()
    if how == "attach":
        SarkdDiagCallback.attach(trainer, tmp_path / "run")
    else:
        trainer.add_callback(SarkdDiagCallback(tmp_path / "run"))
    trainer.train()
    assert trainer.state.train_batch_size < 8 and trainer.state.global_step == 3  # restarted; stopped on NaN weights
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == [1, 2, 3] and run["summary"]["steps_completed"] == 3
    assert _train_losses(run)[:2] == pytest.approx(logged_losses(trainer)[:2], rel=1e-6)
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", "transformer.h.1.mlp.c_fc", 3), root
    note = run["events"].query("code == 'trainer_restarted'")
    assert note["step"].tolist() == [1] and "OutOfMemoryError" in note["message"].iloc[0]
    assert "batch size 7" in note["message"].iloc[0], note["message"].iloc[0]
    plain = restarting_trainer()
    plain.train()
    assert logged_losses(plain)[:2] == logged_losses(trainer)[:2]


def test_a_bf16_trainers_fix_does_not_advise_the_bf16_it_uses(tmp_path):
    """A student module beyond fp16's range under `bf16=True`: a warning about fp16, whose fix keeps the run on
    bf16 instead of telling it to set `TrainingArguments(bf16=True)`."""
    model = tiny.make_gpt2(VOCAB)
    overflow_fp16(model.transformer.h[1])
    _train(tmp_path, model, tmp_path / "run", bf16=True, max_steps=2)
    found = cause(load_run(tmp_path / "run")["summary"]["diagnosis"], "activation_overflow")
    assert found["severity"] == "warning" and found["module"] == "transformer.h.1.mlp.c_proj"
    assert "TrainingArguments" not in found["fix"] and "fp16 compute" in found["fix"], found["fix"]


def test_pure_bf16_under_the_trainer_is_fixed_with_the_model_loaded_in_fp32_not_with_fp16(tmp_path):
    """`bf16=True` over a model loaded in bfloat16 trains pure bf16 (weights and AdamW's state in bf16): an lr of
    1e-5 rounds most updates away. The fix keeps `bf16=True` and loads the model in fp32, in the Trainer's terms."""
    _train(tmp_path, tiny.make_gpt2(VOCAB).to(torch.bfloat16), tmp_path / "run", bf16=True, learning_rate=1e-5,
           max_steps=2)
    run = load_run(tmp_path / "run")
    assert run["summary"]["precision"]["mode"] == "pure-bf16"
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["evidence"]["dtype"]) == ("update_underflow", "bfloat16")
    assert "`TrainingArguments(bf16=True)` with the model loaded in fp32" in root["fix"], root["fix"]
    assert "fp16=True" not in root["fix"], root["fix"]


@pytest.mark.parametrize("caller", ["trainer", "loop"])
def test_a_bf16_model_that_keeps_its_router_gate_in_fp32_is_pure_bf16(tmp_path, caller):
    """`from_pretrained(dtype=torch.bfloat16)` keeps a MoE's router gates in fp32 (`_keep_in_fp32_modules_strict`):
    the weights and AdamW's state are bf16 but for a few thousand elements, and an lr of 1e-5 rounds most updates
    away. The run is pure bf16 — not a mode of no name, whose fix then told a bf16 run to switch to fp16."""
    model = tiny.load_moe_keeping_gates_in_fp32(tmp_path / "model", torch.bfloat16, VOCAB)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}  # transformers' doing
    if caller == "trainer":
        _train(tmp_path, model, tmp_path / "run", optim="adamw_torch", learning_rate=1e-5, max_steps=2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        with Probes(model, optimizer, run_dir=tmp_path / "run") as probes:
            for batch in torch.utils.data.DataLoader(Sequences(VOCAB, n=8), batch_size=4):
                model(**batch).loss.backward()
                optimizer.step()
                probes.step()
                optimizer.zero_grad()
    summary = load_run(tmp_path / "run")["summary"]
    assert summary["precision"]["mode"] == "pure-bf16", summary["precision"]
    found = cause(summary["diagnosis"], "update_underflow")
    assert found["evidence"]["dtype"] == "bfloat16" and "fp16" not in found["fix"].replace("bf16", ""), found["fix"]


class DetachedLossTrainer(Trainer):
    """A `compute_loss` of one's own that returns the loss detached (and `requires_grad_()` to silence backward)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs)
        loss = outputs.loss.detach().requires_grad_()
        return (loss, outputs) if return_outputs else loss


def test_a_compute_loss_that_detaches_the_loss_is_named_in_the_trainers_terms(tmp_path):
    trainer = DetachedLossTrainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", max_steps=2),
                                  train_dataset=Sequences(VOCAB))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    (root,) = load_run(tmp_path / "run")["summary"]["findings"]
    assert (root["cause"], root["first_step"]) == ("no_gradients", 1)
    assert "`compute_loss`" in root["fix"] and "before `step()`" not in root["fix"], root["fix"]


@pytest.mark.parametrize("where", ["recomputation", "every forward"])
def test_gradient_checkpointings_recomputation_is_not_read_again(tmp_path, where):
    """`gradient_checkpointing=True` runs each layer's forward a second time inside backward. Its outputs were read
    in the step's forward; read again, a step's statistics cost twice as much, and what the recomputation does
    (here a hook that pushes an output beyond fp16's range only there) would be reported as the step's."""
    model = tiny.make_gpt2(VOCAB)
    recomputing = where == "recomputation"

    def beyond_fp16(_module, _inputs, output):
        if not recomputing or torch._C._current_graph_task_id() != -1:  # a forward run inside backward
            return output * 0 + 1e5
        return None

    model.transformer.h[0].mlp.c_fc.register_forward_hook(beyond_fp16)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", gradient_checkpointing=True, max_steps=2),
                      train_dataset=Sequences(VOCAB))
    SarkdDiagCallback.attach(trainer, tmp_path / "run", level="full")
    trainer.train()
    run = load_run(tmp_path / "run")
    causes = [d["cause"] for d in run["summary"]["diagnosis"]]
    if recomputing:
        assert "activation_overflow" not in causes
    else:  # the same hook in the step's forward is seen: the test above can fail
        found = cause(run["summary"]["diagnosis"], "activation_overflow")
        assert (found["module"], found["first_step"]) == ("transformer.h.0.mlp.c_fc", 1)
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def test_under_accumulation_and_clipping_the_rows_are_the_trainers_steps(tmp_path):
    """gradient_accumulation_steps=2 with max_grad_norm=0.5: a row per optimizer step whose loss, lr and gradient
    norm (unscaled, before clipping: what `clip_grad_norm_` returns) are what the Trainer logged."""
    trainer, _ = _train(tmp_path, tiny.make_gpt2(VOCAB), tmp_path / "run", gradient_accumulation_steps=2,
                        max_grad_norm=0.5, learning_rate=1e-3, lr_scheduler_type="linear")
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["step"].tolist() == [1, 2, 3, 4]
    assert _train_losses(load_run(tmp_path / "run")) == pytest.approx(logged_losses(trainer), rel=1e-6)
    assert metrics["lr"].tolist() == pytest.approx(_logged(trainer, "learning_rate"))
    assert metrics["grad_norm"].tolist() == pytest.approx(_logged(trainer, "grad_norm"), rel=1e-6)
    assert max(metrics["grad_norm"]) > 0.5  # clipped: the norm before clipping, not after


class _NanGradientAt(TrainerCallback):
    """One weight's gradient made NaN in the backward of one optimizer step."""

    def __init__(self, param, step):
        self.step, self.current = step, 0
        param.register_hook(lambda g: g * math.nan if self.current == self.step else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1


def test_a_nan_gradient_is_placed_at_its_module_although_the_trainer_clips(tmp_path):
    """The Trainer clips every step (to max_grad_norm, 1.0 by default, or to inf for the norm it logs): a NaN total
    norm makes every gradient NaN before the optimizer's pre-step hook, which named the output end (ln_f). Read when
    accelerate unscales them for the clip, the gradients name the tensor the NaN came from."""
    model = tiny.make_gpt2(VOCAB)
    nan = _NanGradientAt(model.transformer.h[0].mlp.c_fc.weight, step=2)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), callbacks=[nan])
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["module"], root["tensor"], root["first_step"]) == (
        "divergence", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_fc.weight", 2)  # fp32: no overflow
    assert run["metrics"]["nonfinite_grad_tensors"].tolist() == [0, 1]  # one tensor, not all of them
    assert trainer.state.global_step == 2  # stopped: the weights are NaN from here on


def test_adafactor_on_fp16_weights_is_not_blamed_for_an_eps_it_adds_in_fp32(tmp_path):
    """`optim="adafactor"` on a model cast to fp16: transformers' Adafactor upcasts each weight and gradient to fp32
    and keeps fp32 state, so its eps=1e-30 is added in fp32, not the weights' fp16 (where it is 0.0). The eps is
    checked in the dtype of the state the first step made: no critical eps underflow for a run whose weights stay
    finite. (The same check with torch's AdamW, state in fp16, is the test of the unnamed parameter groups above.)"""
    trainer, _ = _train(tmp_path, tiny.make_gpt2(VOCAB).half(), tmp_path / "run", optim="adafactor",
                        learning_rate=1e-3)
    run = load_run(tmp_path / "run")
    assert "optimizer_eps_underflow" not in [d["cause"] for d in run["summary"]["diagnosis"]]
    assert run["events"].query("kind == 'optimizer_preflight' and code == 'eps_zero'").empty
    assert run["summary"]["status"] == "completed" and torch.isfinite(torch.tensor(logged_losses(trainer))).all()


def test_adafactors_relative_step_under_its_schedule_is_measured_from_the_first_step(tmp_path):
    """transformers' recipe for Adafactor's own step size: `Adafactor(lr=None, relative_step=True)` with
    `AdafactorSchedule`, which writes lr 0 into the group until the first step has computed one. That first step moves
    every weight: it is no frozen group, and its update and lost updates are measured like any other step's."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    model = tiny.make_gpt2(VOCAB)
    optimizer = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True, warmup_init=False)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=2),
                      train_dataset=Sequences(VOCAB), optimizers=(optimizer, AdafactorSchedule(optimizer)))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["lr"].iloc[0] == 0  # what the schedule reports for step 1 (the Trainer logs it too)
    assert metrics["update_ratio"].notna().all() and metrics["update_ratio"].iloc[0] > 0
    assert metrics["lost_update_fraction"].iloc[0] == 0  # measured: fp32 weights lose none


class _InfWeightAt(TrainerCallback):
    """One element of a weight set to +Inf as an optimizer step begins (a bad edit of the weights, a corrupt load)."""

    def __init__(self, param, step):
        self.param, self.step = param, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                self.param.view(-1)[0] = math.inf


@pytest.mark.parametrize("model_name", ["student", "teacher"])
def test_a_fault_between_statistics_steps_is_named_at_its_module(tmp_path, model_name):
    """Step 3 is no statistics step (1 and every 10th are): the loss turns non-finite with no module statistics, and
    after the optimizer step every weight is NaN. The teacher's Inf (frozen weights, read as loaded only) is placed
    by the callback's replay of the micro-batch's `compute_loss` with statistics on, before the optimizer step, whose
    first non-finite module has its own weights read; the student's, a trained weight, is read again at step 3's
    first training forward: finite after step 2's update (as loaded, the teacher's), Inf now — written since
    (`weights_edited`), at the same module and step. The edit is a finding; the failure it made stays a cause, a
    `divergence` at the written weight explained by it — no overflow, whose fix would be a wider dtype."""
    def trainer_with_fault():
        student, teacher = tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3)
        broken = (student if model_name == "student" else teacher).transformer.h[1].mlp.c_fc.weight
        return KDTrainer(model=student, teacher=teacher, args=training_args(tmp_path / "trainer", learning_rate=1e-3),
                         train_dataset=Sequences(VOCAB), callbacks=[_InfWeightAt(broken, step=3)])

    trainer = trainer_with_fault()
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    summary = load_run(tmp_path / "run")["summary"]
    (root, *_), (failure, *_) = summary["findings"], summary["diagnosis"]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "weights_edited", model_name, "transformer.h.1.mlp.c_fc", 3)
    assert (failure["cause"], failure["model"], failure["tensor"], failure["first_step"]) == (
        "divergence", model_name, "transformer.h.1.mlp.c_fc.weight", 3)
    assert failure["evidence"]["explained_by"].startswith("weights_edited@3") and "wider" not in failure["fix"]
    plain = trainer_with_fault()
    plain.train()
    assert logged_losses(plain)[:3] == logged_losses(trainer)  # the replay changed nothing the steps computed


def _fault_trainer(tmp_path, **args):
    """A Trainer whose frozen weight (never updated, read only as loaded) is set to Inf at step 3, no statistics
    step: the loss turns non-finite there and the callback replays the micro-batch's `compute_loss`."""
    model = tiny.make_gpt2(VOCAB)
    frozen = model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    compute_loss_func = args.pop("compute_loss_func", None)
    return Trainer(model=model, args=training_args(tmp_path / "trainer", learning_rate=1e-3, **args),
                   train_dataset=Sequences(VOCAB), callbacks=[_InfWeightAt(frozen, step=3)],
                   compute_loss_func=compute_loss_func)


def _next_token_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("args", [{"label_smoothing_factor": 0.1}, {"compute_loss_func": _next_token_loss}],
                         ids=["label_smoothing", "compute_loss_func"])
def test_the_replay_repeats_the_call_with_the_labels_compute_loss_popped(tmp_path, args):
    """Label smoothing and a `compute_loss_func` make the Trainer's `compute_loss` pop the labels out of the inputs
    dict it is handed. The replay of the non-finite loss calls it with the inputs as they were handed, labels and
    all: the loss is computed as in the step — not a model output with no loss (which raised), nor a loss function
    handed `labels=None` (which raised on them) — and the module is named."""
    trainer = _fault_trainer(tmp_path, **args)
    compute_loss, calls = trainer.compute_loss, []

    def outcome_recorded(model, inputs, *rest, **kw):
        try:
            loss = compute_loss(model, inputs, *rest, **kw)
        except Exception as exc:
            calls.append(type(exc).__name__)
            raise
        calls.append("replayed" if not torch.is_grad_enabled() else "step")
        return loss

    trainer.compute_loss = outcome_recorded  # bound to the trainer before the callback wraps it
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    assert calls == ["step"] * 3 + ["replayed"] + ["step"] * (trainer.state.global_step - 3)
    root = load_run(tmp_path / "run")["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", "transformer.h.1.mlp.c_fc", 3), root


def test_a_replay_whose_compute_loss_raises_still_names_the_module_and_training_goes_on(tmp_path):
    """A loss with a gradient penalty (`torch.autograd.grad` of the loss) cannot be computed under the replay's
    no_grad: the replay raises after the model's forward has run. What that forward read still names the module, and
    the readings are not left behind to fail the step's own: the probes do not crash the run."""
    def with_gradient_penalty(outputs, labels, num_items_in_batch=None):
        loss = _next_token_loss(outputs, labels)
        (logits_grad,) = torch.autograd.grad(loss, outputs.logits, create_graph=True)
        return loss + 1e-3 * logits_grad.pow(2).sum()

    trainer = _fault_trainer(tmp_path, compute_loss_func=with_gradient_penalty)
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    summary = load_run(tmp_path / "run")["summary"]
    root = summary["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", "transformer.h.1.mlp.c_fc", 3), root
    assert summary["steps_completed"] == trainer.state.global_step >= 3


def test_frozen_layers_are_not_reported_as_receiving_no_gradient(tmp_path):
    """Embeddings and the first block frozen (`requires_grad=False`, left out of the Trainer's optimizer): they are
    not watched, so neither a missing gradient nor an update that does not move them is an event — over a
    statistics step too (10)."""
    model = tiny.make_gpt2(VOCAB)
    for name, p in model.named_parameters():
        if name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")):
            p.requires_grad_(False)
    trainer, _ = _train(tmp_path, model, tmp_path / "run", max_steps=10, learning_rate=1e-3)
    run = load_run(tmp_path / "run")
    assert nothing_found(run["summary"]) and run["events"].empty
    assert (run["metrics"]["zero_grad_tensors"] == 0).all() and run["metrics"]["update_ratio"].notna().all()
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)


def test_evaluation_during_training_leaves_the_statistics_alone_and_is_recorded(tmp_path):
    """`eval_strategy="steps"` evaluates after every step, between the probes' steps, with per-module hooks on at
    `full`: its forwards (the model in eval mode) are not training forwards. A module made NaN only in evaluation
    is not reported, and the train rows are the four training steps, their losses the Trainer's. Each evaluation is
    an eval row after its step, its NaN loss NaN (its perplexity NaN, not Infinity), and the first is said once
    (`nonfinite_eval`: the run was silent beside it); `trainer.evaluate()` after `train()` adds its row to the closed
    run."""
    model = tiny.make_gpt2(VOCAB)
    model.transformer.h[0].mlp.c_proj.register_forward_hook(
        lambda module, _inputs, output: None if module.training else output * math.nan)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", eval_strategy="steps", eval_steps=1,
                                                      learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), eval_dataset=Sequences(VOCAB, n=8))
    SarkdDiagCallback.attach(trainer, tmp_path / "run", level="full")
    trainer.train()
    assert math.isnan(trainer.state.log_history[1]["eval_loss"])  # evaluation did see the NaN
    run = load_run(tmp_path / "run")
    (note,) = run["events"].itertuples()
    assert (note.kind, note.severity, note.step, note.phase) == ("nonfinite_eval", "warning", 1, "eval")
    assert nothing_found(run["summary"])  # training is healthy
    train = run["metrics"].query("split == 'train'")
    assert train["step"].tolist() == [1, 2, 3, 4]
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)
    evals = run["metrics"].query("split == 'eval'")
    assert evals["step"].tolist() == [1, 2, 3, 4]
    assert evals["eval_loss"].isna().all() and evals["eval_ppl"].isna().all()
    assert "Infinity" not in (tmp_path / "run" / "metrics.jsonl").read_text()

    model.transformer.h[0].mlp.c_proj._forward_hooks.clear()  # a finite evaluation now
    loss = trainer.evaluate()["eval_loss"]
    run = load_run(tmp_path / "run")
    last = run["metrics"].query("split == 'eval'").iloc[-1]
    assert (last["step"], last["eval_loss"]) == (4, pytest.approx(loss)) and math.isfinite(loss)
    assert run["summary"]["status"] == "completed"
    assert run["summary"]["final"]["eval_ppl"] == pytest.approx(math.exp(loss))


def test_a_nan_evaluate_after_train_is_said_in_the_closed_run(tmp_path):
    """`trainer.evaluate()` after a healthy `train()`, its loss NaN (a module NaN only in eval mode): the closed run
    gets its eval row and a `nonfinite_eval` event, and its summary is rebuilt with both."""
    model = tiny.make_gpt2(VOCAB)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer"), train_dataset=Sequences(VOCAB),
                      eval_dataset=Sequences(VOCAB, n=8))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    assert load_run(tmp_path / "run")["events"].empty
    model.transformer.h[0].mlp.c_proj.register_forward_hook(
        lambda module, _inputs, output: None if module.training else output * math.nan)
    assert math.isnan(trainer.evaluate()["eval_loss"])
    run = load_run(tmp_path / "run")
    (note,) = run["events"].itertuples()
    assert (note.kind, note.step) == ("nonfinite_eval", 4) and "fp16_full_eval" in note.message
    assert run["summary"]["status"] == "completed" and nothing_found(run["summary"])
    report = (tmp_path / "run" / "report.md").read_text()  # "no problem found" says training's, not evaluation's
    assert "No numerical problem was found in training" in report and "evaluation's loss was not finite" in report


def test_a_lora_student_of_a_kd_trainer_is_watched_through_its_adapters(tmp_path):
    """peft's LoRA on the student: only the adapters train, so they are what the probes watch (the frozen base is not
    reported as receiving no gradient), the teacher's overflow is named at its module, and training is unchanged."""
    peft = pytest.importorskip("peft")

    def lora_trainer(callbacks):
        student = peft.get_peft_model(tiny.make_gpt2(VOCAB), peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                             fan_in_fan_out=True))
        return KDTrainer(model=student, teacher=_overflowing_teacher(), callbacks=callbacks,
                         args=training_args(tmp_path / "trainer", max_steps=2), train_dataset=Sequences(VOCAB))

    callback = SarkdDiagCallback(tmp_path / "run", on_critical="record")
    trainer = lora_trainer([callback])
    trainer.train()
    assert {w.tensor.split(".")[-2] for w in callback.probes.ctx.watched} == {"default"}  # lora_A/B.default.weight
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 1)
    assert run["events"].query("kind == 'zero_gradients'").empty and (run["metrics"]["zero_grad_tensors"] == 0).all()
    plain = lora_trainer([])
    plain.train()
    assert logged_losses(plain) == logged_losses(trainer)


def test_each_of_several_evaluation_sets_is_recorded_under_its_name(tmp_path):
    """`eval_dataset={"near": ..., "far": ...}` makes the Trainer evaluate each set apart, logging `eval_near_loss` and
    `eval_far_loss` (never `eval_loss`), and `evaluate(metric_key_prefix="test")` logs `test_loss`: each is an eval row
    named by its set (`eval_set`), its loss the Trainer's. The summary's perplexities are those of the first set, not
    a mix of both; one evaluation set alone stays unnamed."""
    near, far = Sequences(VOCAB, n=8), Sequences(VOCAB, n=8, length=6)
    trainer = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", eval_strategy="steps",
                                                                      eval_steps=2, learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), eval_dataset={"near": near, "far": far})
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    logged = [(entry["step"], name, entry[f"eval_{name}_loss"]) for entry in trainer.state.log_history
              for name in ("near", "far") if f"eval_{name}_loss" in entry]
    assert [(step, name) for step, name, _ in logged] == [(2, "near"), (2, "far"), (4, "near"), (4, "far")]
    evals = load_run(tmp_path / "run")["metrics"].query("split == 'eval'")
    assert list(zip(evals["step"], evals["eval_set"], strict=True)) == [(step, name) for step, name, _ in logged]
    assert evals["eval_loss"].tolist() == pytest.approx([loss for _, _, loss in logged])

    test_loss = trainer.evaluate(near, metric_key_prefix="test")["test_loss"]
    run = load_run(tmp_path / "run")
    last = run["metrics"].query("split == 'eval'").iloc[-1]
    assert (last["step"], last["eval_set"], last["eval_loss"]) == (4, "test", pytest.approx(test_loss))
    near_losses = [loss for _, name, loss in logged if name == "near"]
    final = run["summary"]["final"]
    assert final["first_eval_ppl"] == pytest.approx(math.exp(near_losses[0]))
    assert final["eval_ppl"] == pytest.approx(math.exp(near_losses[-1]))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "validation perplexity of near:" in report and "| 4 | far |" in report and "| 4 | test |" in report

    single = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "single", eval_strategy="steps",
                                                                     eval_steps=2),
                     train_dataset=Sequences(VOCAB), eval_dataset=near)
    SarkdDiagCallback.attach(single, tmp_path / "single-run")
    single.train()
    assert load_run(tmp_path / "single-run")["metrics"].query("split == 'eval'")["eval_set"].isna().all()


class _TeacherSamples(TrainerCallback):
    """Samples from the teacher at the end of every step (a callback that logs generations), without a KV cache
    (`use_cache=False`, as gradient checkpointing's users set it), while the student is still in train mode."""

    def __init__(self, teacher):
        self.teacher, self.generating = teacher, False

    def on_step_end(self, args, state, control, **kwargs):
        self.generating = True
        try:
            self.teacher.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False,
                                  use_cache=False, pad_token_id=0)
        finally:
            self.generating = False


@pytest.mark.parametrize("where", ["generation", "every forward"])
def test_a_teachers_generate_in_a_callback_between_steps_is_not_read_as_its_training(tmp_path, where):
    """A teacher module beyond fp16's range only while a callback samples from it is not reported (the user's
    callback runs before the probes' own `on_step_end`, inside the step); in the teacher's training forward it is."""
    def kd_trainer(run_dir=None):
        teacher = tiny.make_gpt2(VOCAB, seed=3)
        samples = _TeacherSamples(teacher)
        teacher.transformer.h[0].mlp.c_proj.register_forward_hook(
            lambda _m, _i, output: output * 0 + 1e5 if samples.generating or where == "every forward" else None)
        trainer = KDTrainer(model=tiny.make_gpt2(VOCAB), teacher=teacher, callbacks=[samples],
                            args=training_args(tmp_path / "trainer", max_steps=2, learning_rate=1e-3),
                            train_dataset=Sequences(VOCAB))
        if run_dir is not None:
            SarkdDiagCallback.attach(trainer, run_dir, level="full")
        trainer.train()
        return trainer

    trainer = kd_trainer(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert _train_losses(run) == pytest.approx(logged_losses(trainer), rel=1e-6)
    if where == "generation":
        assert nothing_found(run["summary"]) and run["metrics"]["act_amax_teacher"].notna().all()
    else:
        found = cause(run["summary"]["diagnosis"], "activation_overflow")
        assert (found["model"], found["module"], found["first_step"]) == ("teacher", "transformer.h.0.mlp.c_proj", 1)
    assert logged_losses(kd_trainer()) == logged_losses(trainer)


def test_hyperparameter_trials_in_one_run_are_marked_and_judged_each_on_its_own(tmp_path):
    """Three `train()` calls of a Trainer built with `model_init` (a hyperparameter search's trials), numbered on in
    one run directory: two at a learning rate that brings a learnable sequence's loss down from ln(vocab), the last
    at one that leaves it there. Read as one curve, the loss of the second half climbs (steps 25-48, seven standard
    errors); it is three fresh starts. Each later trial begins with a `run_continued` note at its first step, and
    the loss rules judge each trial on its own: no divergence."""
    dataset = Sequences(VOCAB)
    dataset.ids = (torch.arange(12)[None] + torch.arange(len(dataset.ids))[:, None]) % (VOCAB - 1) + 1  # learnable
    trainer = Trainer(model_init=lambda: tiny.make_gpt2(VOCAB),
                      args=training_args(tmp_path / "trainer", max_steps=16), train_dataset=dataset)
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    for lr in (1e-2, 1e-2, 1e-5):
        trainer.args.learning_rate = lr
        trainer.train()
    run = load_run(tmp_path / "run")
    losses = _train_losses(run)
    assert len(losses) == 48 and losses[15] < 0.8 * losses[16]  # the trial boundary the curve jumps at
    notes = run["events"].query("code == 'run_continued'")
    assert notes["step"].tolist() == [17, 33] and set(notes["severity"]) == {"info"}
    assert nothing_found(run["summary"])


def test_a_loss_made_nonfinite_by_its_own_arithmetic_between_statistics_steps_is_placed_at_the_loss(tmp_path):
    """Step 3 (no statistics step) divides the loss by a token count of 0: the callback replays the micro-batch and
    finds every module output finite. That was read as no measurement at all — "the loss blows up without a precision
    cause: lower the lr" —; the replay's finite outputs (`forward_replay`) now place it in the loss's own arithmetic."""
    def zero_count_at_step_3(outputs, labels, num_items_in_batch=None):
        count = torch.tensor(0.0 if trainer.state.global_step + 1 == 3 else 1.0)
        return _next_token_loss(outputs, labels) * count / count

    trainer = Trainer(model=tiny.make_gpt2(VOCAB), args=training_args(tmp_path / "trainer", learning_rate=1e-3),
                      train_dataset=Sequences(VOCAB), compute_loss_func=zero_count_at_step_3)
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["tensor"], root["first_step"]) == ("divergence", "loss", 3)
    assert root["evidence"]["module_outputs_finite"] is True and "check the loss computation" in root["fix"]
    replayed = run["events"].query("kind == 'forward_replay'")
    assert replayed[["step", "model"]].values.tolist() == [[3, "student"]]


class HiddenRMSETrainer(Trainer):
    """Hidden-state distillation as people write it on the Trainer: the CE plus the RMSE between the last hidden
    states of the student and a frozen teacher."""

    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, output_hidden_states=True)
        with torch.no_grad():
            target = self.teacher(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[-1]
        loss = outputs.loss + torch.nn.functional.mse_loss(outputs.hidden_states[-1], target).sqrt()
        return (loss, outputs) if return_outputs else loss


def test_an_rmse_from_a_student_copied_from_its_teacher_is_named_in_the_trainer(tmp_path):
    """The student starts as its teacher's copy: step 1's RMSE is the sqrt of exactly 0 and every gradient NaN. The
    callback reads the graph of what `compute_loss` returned and names the sqrt, not a float32 overflow."""
    teacher = tiny.make_gpt2(VOCAB, seed=3).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    trainer = HiddenRMSETrainer(model=student, teacher=teacher, train_dataset=Sequences(VOCAB),
                                args=training_args(tmp_path / "trainer", max_steps=2))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    root = load_run(tmp_path / "run")["summary"]["diagnosis"][0]
    assert (root["cause"], root["first_step"], root["evidence"]["loss_operation"]) == ("divergence", 1, "sqrt")
    assert "GradScaler" not in root["fix"]


class GuardedKDTrainer(KDTrainer):
    """A KD Trainer whose `compute_loss` refuses a non-finite loss of the student, as people guard their loops."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if not torch.isfinite(outputs.loss):
            raise FloatingPointError(f"the student's loss is {outputs.loss.item()}: nan values")
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize(("raised_by", "model_name"), [("anomaly", "student"), ("anomaly", "teacher"),
                                                        ("guard", "student")])
def test_a_step_that_raises_on_its_nan_loss_before_the_update_is_replayed_and_placed(tmp_path, raised_by, model_name):
    """Step 3's loss is NaN (a batch with a token that makes one module's output infinite; step 3 is no statistics
    step), and the step raises inside `training_step`, before the callback's replay of a non-finite micro-batch: under
    `torch.autograd.detect_anomaly()` its backward ("returned nan values"), or `compute_loss` itself on the student's
    NaN loss. The run closed failed with the loss non-finite at no module. The optimizer never stepped: the
    micro-batch's `compute_loss` is replayed as the exception leaves `training_step`, and the module is named."""
    student, teacher = tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3)
    broken = student if model_name == "student" else teacher
    tiny.infinite_on_token(broken, broken.transformer.h[1].mlp.c_fc, token=0)
    data = Sequences(VOCAB)
    data.ids[9, 3] = 0  # in step 3's batch: samples 8-11 in order
    trainer = (GuardedKDTrainer if raised_by == "guard" else KDTrainer)(
        model=student, teacher=teacher, train_dataset=data,
        args=training_args(tmp_path / "trainer", learning_rate=1e-3, train_sampling_strategy="sequential"))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    anomaly = torch.autograd.detect_anomaly(check_nan=True) if raised_by == "anomaly" else contextlib.nullcontext()
    with pytest.raises((RuntimeError, FloatingPointError), match="nan values"), anomaly:
        trainer.train()
    run = load_run(tmp_path / "run")
    trained = run["metrics"][run["metrics"]["split"] == "train"]  # the raised step is an `unfinished` row
    assert run["summary"]["status"] == "failed" and trained["step"].tolist() == [1, 2]
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == (model_name, "transformer.h.1.mlp.c_fc", 3), root


def test_an_optimizer_that_trains_a_projection_beside_the_student_is_said_to_leave_it_unwatched(tmp_path):
    """`optimizers=(AdamW(student + projection), None)`, the projection held by the Trainer subclass: the callback
    watches the student and teacher, so the projection's gradients are not read — said before the first step, with the
    remedy in the Trainer's terms (hold it in the model the Trainer trains)."""
    model, projection = tiny.make_gpt2(VOCAB), torch.nn.Linear(32, 32)
    optimizer = torch.optim.AdamW([*model.parameters(), *projection.parameters()], lr=1e-3)
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=1),
                      train_dataset=Sequences(VOCAB), optimizers=(optimizer, None))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    notes = load_run(tmp_path / "run")["events"].query("code == 'optimizer_tensors_unwatched'")
    assert notes[["step", "numel"]].values.tolist() == [[1, 2]]
    assert "model.projection = nn.Linear(...)" in notes.iloc[0]["message"]
