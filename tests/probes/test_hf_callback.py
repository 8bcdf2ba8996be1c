"""The shipped TrainerCallback on a real transformers.Trainer and a tiny model."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")

from contract import assert_conforms, nothing_found  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from sarkd_diag import load_run  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback, trainer_teacher  # noqa: E402


class Sequences(torch.utils.data.Dataset):
    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (16, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _run(tmp_path, model, **args):
    callback = SarkdDiagCallback(tmp_path / "hf")
    training_args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4,
                                      max_steps=4, report_to=[], save_strategy="no", logging_strategy="no",
                                      use_cpu=True, **args)
    Trainer(model=model, args=training_args, train_dataset=Sequences(model.config.vocab_size),
            callbacks=[callback]).train()
    return callback, load_run(tmp_path / "hf")


def test_trainer_callback_records_a_healthy_run(tmp_path):
    import tiny

    callback, run = _run(tmp_path, tiny.make_gpt2(64), learning_rate=1e-3)
    assert run["summary"]["steps_completed"] == 4 and run["summary"]["status"] == "completed"
    assert nothing_found(run["summary"])
    assert run["metrics"]["grad_amax"].notna().all()
    assert_conforms(callback.run_dir)


def test_trainer_callback_explains_pure_fp16(tmp_path):
    import tiny

    callback, run = _run(tmp_path, tiny.make_gpt2(64).half(), learning_rate=1e-3, optim="adamw_torch")
    causes = [d["cause"] for d in run["summary"]["diagnosis"]]
    assert causes[0] == "optimizer_eps_underflow"
    assert run["summary"]["event_counts"].get("nonfinite_param", 0) > 0


def test_fused_adamw_adds_eps_in_fp32_so_no_eps_underflow_is_claimed(tmp_path):
    import tiny

    callback, run = _run(tmp_path, tiny.make_gpt2(64).half(), learning_rate=1e-3, optim="adamw_torch_fused")
    causes = [d["cause"] for d in run["summary"]["diagnosis"]]
    assert "optimizer_eps_underflow" not in causes
    assert run["summary"]["event_counts"].get("nonfinite_param", 0) == 0
    assert "optimizer_state_underflow" in causes  # the fp16 second moments still flush to zero


@pytest.mark.parametrize("attribute", ["teacher_model", "teacher", "ref_teacher", "Teacher_Net"])
def test_the_teacher_is_found_under_any_attribute_that_names_it(attribute):
    """TRL's `teacher_model`, a hand-written KD Trainer's `self.teacher` or `self.ref_teacher`: one rule, not a list of
    names; a DataParallel wrapper is taken off, and the student aliased as its teacher (self-distillation) is not."""
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wrapped = torch.nn.DataParallel(teacher)
    assert trainer_teacher(SimpleNamespace(model=student, **{attribute: teacher})) is teacher
    assert trainer_teacher(SimpleNamespace(model=student, **{attribute: wrapped})) is teacher
    assert trainer_teacher(SimpleNamespace(model=student, teacher=student, teacher_name="gpt2")) is None
