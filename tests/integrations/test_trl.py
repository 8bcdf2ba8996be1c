"""SarkdDiagCallback.attach on TRL's distillation trainer (`trl.DistillationTrainer`, stable since TRL 1.x;
`trl.experimental.gkd.GKDTrainer` holds its teacher the same way, as `trainer.teacher_model`).

DistillationTrainer is fully on-policy: every step the student generates completions (`model.generate` under
no_grad), then the student's and the teacher's *backbones* run on prompt + completion (the teacher under
no_grad, in eval mode) and a chunked JSD is taken over their `lm_head`s — `model(...).loss` is never
computed, which is why `attach` records the loss `training_step` returns.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

import tiny  # noqa: E402
from contract import nothing_found  # noqa: E402
from datasets import Dataset  # noqa: E402
from frameworks import cause, logged_losses, overflow_fp16, tiny_tokenizer  # noqa: E402

from sarkd_diag import load_run  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tokenizer, corpus = tiny_tokenizer(root)
    prompts = [line.split(" B:")[0] + " B:" for line in corpus.read_text().splitlines()[:16]]
    return {"tokenizer": tokenizer, "dataset": Dataset.from_dict({"prompt": prompts}), "vocab": len(tokenizer)}


def _distil(world, out, student, teacher, run_dir=None, **args):
    config = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                  learning_rate=1e-3, max_completion_length=6)
    config.update(args)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(**config),
                                      train_dataset=world["dataset"], processing_class=world["tokenizer"])
    callback = SarkdDiagCallback.attach(trainer, run_dir) if run_dir is not None else None
    trainer.train()
    return trainer, callback


def _pair(world, dtype=torch.float32):
    return tiny.make_gpt2(world["vocab"], seed=0).to(dtype), tiny.make_gpt2(world["vocab"], seed=3).to(dtype)


def test_attach_finds_the_teacher(world, tmp_path):
    student, teacher = _pair(world)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher,
                                      args=trl.DistillationConfig(output_dir=str(tmp_path), report_to=[],
                                                                  use_cpu=True),
                                      train_dataset=world["dataset"], processing_class=world["tokenizer"])
    callback = SarkdDiagCallback.attach(trainer, tmp_path / "run")
    assert callback.teacher is teacher
    assert callback in trainer.callback_handler.callbacks


def test_an_fp16_teacher_that_overflows_is_named_teacher_overflow(world, tmp_path):
    def pair():
        student, teacher = _pair(world)
        teacher = teacher.half()
        overflow_fp16(teacher.transformer.h[1])
        return student, teacher

    trainer, callback = _distil(world, tmp_path / "t", *pair(), run_dir=tmp_path / "run")
    summary = load_run(tmp_path / "run")["summary"]
    root = summary["diagnosis"][0]
    assert (root["cause"], root["severity"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "critical", "teacher", "transformer.h.1.mlp.c_proj", 1)
    assert "gradient_overflow" not in [d["cause"] for d in summary["diagnosis"]]  # not blamed on the student
    assert summary["status"] == "stopped" and trainer.state.global_step == callback.stopped_at == 1

    # without the callback the next step generates from NaN weights and dies inside `generate` ("probability
    # tensor contains either inf, nan or element < 0"): run only the step both runs share
    plain, _ = _distil(world, tmp_path / "p", *pair(), max_steps=1)
    assert logged_losses(plain) == logged_losses(trainer)


def test_a_clean_bf16_distillation_records_nothing(world, tmp_path):
    trainer, _ = _distil(world, tmp_path / "t", *_pair(world), run_dir=tmp_path / "run", bf16=True)
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed" and run["summary"]["steps_completed"] == 3
    assert nothing_found(run["summary"])
    # the mode the user asked for; note that DistillationTrainer's training forwards run outside accelerate's
    # autocast (its `_forward_redirection` calls the backbones directly): only `generate` runs under bf16 there
    assert run["summary"]["precision"]["requested"] == "TrainingArguments(bf16=True)"
    notes = run["events"].query("kind == 'setup_note' and probe == 'precision'")
    assert len(notes) == 1 and "no autocast" in notes.iloc[0]["message"]  # and the probes saw it, and say so
    metrics = run["metrics"][run["metrics"]["split"] == "train"]
    assert metrics["step"].tolist() == [1, 2, 3]
    assert metrics["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)  # the loss of every step
    assert metrics["act_amax_teacher"].notna().any()  # the teacher's forwards were read (on statistics steps)

    plain, _ = _distil(world, tmp_path / "p", *_pair(world), bf16=True)
    assert logged_losses(plain) == logged_losses(trainer)


def test_a_bf16_student_at_a_tiny_lr_loses_its_updates(world, tmp_path):
    trainer, _ = _distil(world, tmp_path / "t", *_pair(world, torch.bfloat16), run_dir=tmp_path / "run",
                         learning_rate=1e-6)
    summary = load_run(tmp_path / "run")["summary"]
    found = cause(summary["diagnosis"], "update_underflow")
    assert found["severity"] == "warning" and found["model"] == "student" and found["first_step"] == 1
    assert summary["precision"]["mode"] == "pure-bf16"
    assert "critical" not in {d["severity"] for d in summary["diagnosis"] + summary["findings"]}

    plain, _ = _distil(world, tmp_path / "p", *_pair(world, torch.bfloat16), learning_rate=1e-6)
    assert logged_losses(plain) == logged_losses(trainer)


def _beyond_fp16_in(module, when):
    """A forward hook that pushes a module's output past fp16's range in the forwards `when()` selects."""
    def hook(_module, _inputs, output):
        if when():
            return output * 0 + 1e5
        return None
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["generation", "every forward"])
def test_statistics_come_from_training_forwards_not_from_generation(world, tmp_path, where):
    # On-policy generation runs the student's forward once per generated token, under no_grad; if the probes
    # read those forwards, a module that exceeds fp16's range only while generating would be reported.
    student, teacher = _pair(world)
    only_generating = where == "generation"
    _beyond_fp16_in(student.transformer.h[0].mlp.c_proj,
                    lambda: not torch.is_grad_enabled() if only_generating else True)
    _distil(world, tmp_path / "t", student, teacher, run_dir=tmp_path / "run", max_steps=1)
    diagnosis = load_run(tmp_path / "run")["summary"]["diagnosis"]
    if only_generating:
        assert "activation_overflow" not in [d["cause"] for d in diagnosis]
    else:  # the same hook in the training forward is seen: the test above can fail
        found = cause(diagnosis, "activation_overflow")
        assert (found["severity"], found["model"], found["module"], found["first_step"]) == (
            "warning", "student", "transformer.h.0.mlp.c_proj", 1)


def test_a_teacher_fault_between_statistics_steps_is_named_by_a_replay(world, tmp_path):
    """Step 2 is no statistics step: the teacher's weight made Inf there turns the loss non-finite with no module
    statistics. The callback replays the micro-batch's `compute_loss` (what TRL computes from the generated
    completions, teacher forward included) with them on, before the optimizer step; the teacher's first non-finite
    module has its own weights read: finite as loaded, Inf now — written (`weights_edited`), the failure a
    `divergence` at that weight, explained by it."""
    from transformers import TrainerCallback

    class InfTeacherWeight(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 2:
                with torch.no_grad():
                    teacher.transformer.h[1].mlp.c_fc.weight.view(-1)[0] = float("inf")

    student, teacher = _pair(world)
    config = dict(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3,
                  max_completion_length=6)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(**config),
                                      train_dataset=world["dataset"], processing_class=world["tokenizer"],
                                      callbacks=[InfTeacherWeight()])
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    summary = load_run(tmp_path / "run")["summary"]
    (root, *_), (failure, *_) = summary["findings"], summary["diagnosis"]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "weights_edited", "teacher", "transformer.h.1.mlp.c_fc", 2)
    assert (failure["cause"], failure["tensor"], failure["first_step"]) == (
        "divergence", "transformer.h.1.mlp.c_fc.weight", 2)
    assert failure["evidence"]["explained_by"].startswith("weights_edited@2")


def _other_trainer(world, kind, out, student, run_dir=None, ref_model=None, **args):
    """TRL's SFTTrainer, DPOTrainer (its reference model `ref_model`, a fresh fp32 GPT-2 unless given) and
    (experimental) GKDTrainer on the tiny world, 3 steps on the CPU; `args`: more of the trainer's config."""
    lines = [f"{p}{' the sky is blue .'}" for p in world["dataset"]["prompt"]]
    config = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, report_to=[], save_strategy="no",
                  logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3, **args)
    tokenizer = world["tokenizer"]
    if kind == "sft":
        trainer = trl.SFTTrainer(model=student, args=trl.SFTConfig(**config, max_length=32),
                                 train_dataset=Dataset.from_dict({"text": lines}), processing_class=tokenizer)
    elif kind == "dpo":
        prompts = list(world["dataset"]["prompt"])
        data = Dataset.from_dict({"prompt": prompts, "chosen": [" the sky is blue ."] * len(prompts),
                                  "rejected": [" blue is sky the ."] * len(prompts)})
        ref_model = ref_model if ref_model is not None else tiny.make_gpt2(world["vocab"], seed=0)
        trainer = trl.DPOTrainer(model=student, ref_model=ref_model,
                                 args=trl.DPOConfig(**config, max_length=48), train_dataset=data,
                                 processing_class=tokenizer)
    else:
        return _gkd(world, out, student, tiny.make_gpt2(world["vocab"], seed=3), run_dir, lmbda=1.0)
    if run_dir is not None:
        SarkdDiagCallback.attach(trainer, run_dir)
    trainer.train()
    return trainer


def _gkd(world, out, student, teacher, run_dir=None, **gkd):
    """TRL's (experimental) GKDTrainer, 3 steps on the CPU; `gkd`: lmbda (the share of steps on which the student
    generates) and seq_kd (on the others, the teacher generates)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = world["tokenizer"]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    data = Dataset.from_list([{"messages": [{"role": "user", "content": p},
                                            {"role": "assistant", "content": "the sky is blue ."}]}
                              for p in world["dataset"]["prompt"]])
    config = GKDConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, report_to=[],
                       save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3,
                       max_new_tokens=6, max_length=48, **gkd)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                         processing_class=tokenizer)
    if run_dir is not None:
        SarkdDiagCallback.attach(trainer, run_dir)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["sft", "dpo", "gkd"])
def test_sft_dpo_and_gkd_trainers_record_their_steps(world, tmp_path, kind):
    """The same callback on TRL's other trainers: each step's loss is the one the trainer logs, bf16 (TRL's default)
    is recorded as asked, and a clean run is diagnosed clean. GKD is on-policy (lmbda=1: the student generates every
    step): a student module beyond fp16's range only while generating is not reported."""
    student = tiny.make_gpt2(world["vocab"], seed=0)
    if kind == "gkd":
        _beyond_fp16_in(student.transformer.h[0].mlp.c_proj, lambda: not torch.is_grad_enabled())
    trainer = _other_trainer(world, kind, tmp_path / "t", student, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed" and run["summary"]["steps_completed"] == 3
    assert nothing_found(run["summary"])
    assert run["summary"]["precision"]["requested"] == "TrainingArguments(bf16=True)"
    metrics = run["metrics"]
    assert metrics["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)
    assert metrics["grad_norm"].tolist() == pytest.approx([h["grad_norm"] for h in trainer.state.log_history
                                                           if "loss" in h], rel=1e-6)


def test_a_dpo_reference_that_overflows_fp16_is_named_as_the_teacher(world, tmp_path):
    """DPO's reference model (`ref_model`) is frozen and runs in every training step, its log-probabilities part of the
    loss: a reference loaded in fp16 to save memory that overflows is `teacher_overflow` at its module, not an unplaced
    non-finite loss whose fix points at the loss code. Training stops on the NaN weights it leaves."""
    reference = tiny.make_gpt2(world["vocab"], seed=0).half()
    overflow_fp16(reference.transformer.h[1])
    trainer = _other_trainer(world, "dpo", tmp_path / "t", tiny.make_gpt2(world["vocab"], seed=0), tmp_path / "run",
                             ref_model=reference, bf16=False)
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_proj", 1)
    assert run["summary"]["status"] == "stopped" and trainer.state.global_step == 1


def test_a_dpo_policy_and_its_reference_overflowing_alike_are_each_named(world, tmp_path):
    """A policy and the reference DPO copies from it, both loaded in fp16, overflow at the same module in the same
    step. The policy's forward reads none of the reference's outputs: its overflow is a cause of its own, not a symptom
    folded into the reference's — fixing the reference alone would leave the policy overflowing."""
    policy = tiny.make_gpt2(world["vocab"], seed=0)
    overflow_fp16(policy.transformer.h[1])
    policy = policy.half()
    _other_trainer(world, "dpo", tmp_path / "t", policy, tmp_path / "run", ref_model=copy.deepcopy(policy),
                   bf16=False)
    diagnosis = load_run(tmp_path / "run")["summary"]["diagnosis"]
    reference, own = cause(diagnosis, "teacher_overflow"), cause(diagnosis, "activation_overflow")
    assert (reference["model"], reference["module"], reference["first_step"]) == (
        "teacher", "transformer.h.1.mlp.c_proj", 1)
    assert (own["model"], own["module"], own["first_step"], own["severity"]) == (
        "student", "transformer.h.1.mlp.c_proj", 1, "critical")


@pytest.mark.parametrize("reference, precomputed", [("healthy", True), ("fp16_overflow", True), ("nan_weights", False)])
def test_a_dpo_reference_precomputed_before_training_is_said_unseen(world, tmp_path, reference, precomputed):
    """`precompute_ref_log_probs=True`: DPOTrainer runs its reference over the whole dataset in its constructor, before
    any callback is called, and never during training. The run says the reference was not watched; a float16 reference
    that overflowed there is blamed without claiming its outputs were measured finite (the largest was never read).
    A reference that runs in the step is read, also where nothing it made is finite (NaN weights): no such note."""
    model = tiny.make_gpt2(world["vocab"], seed=0)
    if reference == "fp16_overflow":
        model = model.half()
        overflow_fp16(model.transformer.h[1])
    elif reference == "nan_weights":
        with torch.no_grad():
            for weight in model.parameters():
                weight.fill_(float("nan"))
    trainer = _other_trainer(world, "dpo", tmp_path / "t", tiny.make_gpt2(world["vocab"], seed=0), tmp_path / "run",
                             ref_model=model, bf16=False, precompute_ref_log_probs=precomputed)
    run = load_run(tmp_path / "run")
    notes = run["events"].query("code == 'frozen_model_unseen'")
    assert notes[["model", "step"]].values.tolist() == ([["teacher", 1]] if precomputed else [])
    diagnosis = run["summary"]["diagnosis"]
    if reference == "nan_weights":
        assert diagnosis[0]["model"] == "teacher"
        return
    if reference == "healthy":
        assert diagnosis == [] and run["summary"]["steps_completed"] == 3
        return
    root = diagnosis[0]
    assert (root["cause"], root["model"], root["first_step"]) == ("teacher_overflow", "teacher", 1)
    assert root["evidence"]["teacher_outputs_measured"] is False
    assert "finite outputs" not in root["fix"] and "nan" not in root["fix"] and "precomputed" in root["fix"]
    assert trainer.state.global_step == 1


def test_grpo_whose_reward_never_differs_is_told_its_advantages_are_zero(world, tmp_path):
    """GRPO with a reward function that scores every completion alike (a format it never matches): each group's
    advantages are 0, so the loss and every gradient are exactly 0 and nothing trains. With no teacher to match, that
    is no loss at its minimum (information) but a loss multiplied by 0 — a warning that names the reward function."""
    config = trl.GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, num_generations=4,
                            max_steps=3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                            disable_tqdm=True, seed=0, learning_rate=1e-3, bf16=False, max_completion_length=6)
    trainer = trl.GRPOTrainer(model=tiny.make_gpt2(world["vocab"]), reward_funcs=lambda completions, **_: [0.0] * len(
        completions), args=config, train_dataset=world["dataset"], processing_class=world["tokenizer"])
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    assert logged_losses(trainer) == [0.0, 0.0, 0.0]
    found = cause(load_run(tmp_path / "run")["summary"]["findings"], "no_gradients")
    assert (found["severity"], found["first_step"]) == ("warning", 1)
    assert "reward function" in found["fix"] and "identical to its teacher" not in found["fix"]


def _sft(world, out, kind, run_dir=None):
    """SFTTrainer as users run it, with packing (sequences packed into rows of max_length) or with the loss on the
    completions only (prompt tokens masked from the labels); the callback passed plainly, in `callbacks=[...]`."""
    corpus = [f"{p} the sky is blue ." for p in world["dataset"]["prompt"]]
    config = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, report_to=[], save_strategy="no",
                  logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3, max_length=32)
    if kind == "packing":
        data, config["packing"] = Dataset.from_dict({"text": corpus}), True
    else:
        prompts = list(world["dataset"]["prompt"])
        data = Dataset.from_dict({"prompt": prompts, "completion": [" the sky is blue ."] * len(prompts)})
        config["completion_only_loss"] = True
    student = tiny.make_gpt2(world["vocab"], seed=0)
    _beyond_fp16_in(student.transformer.h[0].mlp.c_proj, lambda: True)
    trainer = trl.SFTTrainer(model=student, args=trl.SFTConfig(**config), train_dataset=data,
                             processing_class=world["tokenizer"],
                             callbacks=[SarkdDiagCallback(run_dir)] if run_dir is not None else [])
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["packing", "completion_only"])
def test_sft_with_packing_or_completion_only_loss_records_its_steps(world, tmp_path, kind):
    """Each step's loss is the one SFTTrainer logs (packed rows, or a loss over the completion tokens alone), the
    module beyond fp16's range is named at its step, and the probes change no loss."""
    trainer = _sft(world, tmp_path / "t", kind, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed"
    metrics = run["metrics"]
    assert metrics["step"].tolist() == [1, 2, 3]
    assert metrics["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)
    found = cause(run["summary"]["diagnosis"], "activation_overflow")
    assert (found["severity"], found["model"], found["module"], found["first_step"]) == (
        "warning", "student", "transformer.h.0.mlp.c_proj", 1)
    assert logged_losses(_sft(world, tmp_path / "p", kind)) == logged_losses(trainer)


def _generating(model):
    """A flag that is True while `model.generate` runs (set by wrapping it, for the test's hook to read)."""
    flag, generate = [False], model.generate

    def wrapped(*args, **kwargs):
        flag[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            flag[0] = False
    model.generate = wrapped
    return flag


@pytest.mark.parametrize("where", ["teacher generation", "every forward"])
def test_gkd_sequence_kd_reads_the_teachers_training_forwards_not_its_generation(world, tmp_path, where):
    """GKD with seq_kd (lmbda=0: every step the teacher generates the completions the student learns): the frozen
    teacher generates under no_grad while the student is in train mode, with `use_cache=False` (no KV cache is handed
    to its forwards) — so neither the gradient mode nor the arguments tell generation from the teacher's training
    forward. A teacher module beyond fp16's range only while generating is not reported; in every forward it is."""
    def pair():
        student, teacher = _pair(world)
        generating = _generating(teacher)
        _beyond_fp16_in(teacher.transformer.h[0].mlp.c_proj,
                        lambda: generating[0] if where == "teacher generation" else True)
        return student, teacher

    trainer = _gkd(world, tmp_path / "t", *pair(), tmp_path / "run", lmbda=0.0, seq_kd=True)
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == [1, 2, 3]
    assert run["metrics"]["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)
    if where == "teacher generation":
        assert nothing_found(run["summary"])
        assert run["metrics"]["act_amax_teacher"].notna().any()  # its training forward was read
    else:
        found = cause(run["summary"]["diagnosis"], "activation_overflow")
        assert (found["severity"], found["model"], found["module"], found["first_step"]) == (
            "warning", "teacher", "transformer.h.0.mlp.c_proj", 1)
    plain = _gkd(world, tmp_path / "p", *pair(), lmbda=0.0, seq_kd=True)
    assert logged_losses(plain) == logged_losses(trainer)
