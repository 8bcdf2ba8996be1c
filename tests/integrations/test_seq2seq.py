"""SarkdDiagCallback on `Seq2SeqTrainer` with a tiny T5 (an encoder-decoder): its labels are the decoder's targets,
not shifted as a causal LM's; `predict_with_generate` evaluation runs `generate`, which is no training forward; and a
fault is named at its encoder or decoder module."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from contract import nothing_found  # noqa: E402
from frameworks import logged_losses  # noqa: E402
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration  # noqa: E402

from sarkd_diag import load_run  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback  # noqa: E402

VOCAB = 64


def _t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


class Pairs(torch.utils.data.Dataset):
    """Random source sequences and `target_length`-token targets."""

    def __init__(self, target_length: int, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.sources = torch.randint(2, VOCAB, (n, 10), generator=g)
        self.targets = torch.randint(2, VOCAB, (n, target_length), generator=g)

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        return {"input_ids": self.sources[i], "labels": self.targets[i]}


def _train(tmp_path, model, run_dir=None, target_length=1, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3)
    kwargs.update(overrides)
    trainer = Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**kwargs),
                             train_dataset=Pairs(target_length), eval_dataset=Pairs(target_length, n=8))
    if run_dir is not None:
        SarkdDiagCallback.attach(trainer, run_dir, level="full")
    trainer.train()
    return trainer


def test_one_token_targets_of_an_encoder_decoder_are_targets(tmp_path):
    """T5 scores every label (it shifts them right into its decoder's inputs): a batch of one-token targets has
    targets, not the 0/0 loss of a causal LM's one-token rows — no `empty_targets`, no data to fix. Training is the
    same with the probes, and the loss recorded is the Trainer's."""
    trainer = _train(tmp_path, _t5(), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run["events"].empty and nothing_found(run["summary"])
    train = run["metrics"].query("split == 'train'")
    assert train["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)
    assert logged_losses(_train(tmp_path, _t5())) == logged_losses(trainer)


def test_generation_in_evaluation_is_not_read_and_a_training_fault_is_named_at_its_module(tmp_path):
    """`predict_with_generate=True` evaluates after every step by `generate` (the model in eval mode, a KV cache): a
    decoder module made NaN only there is not reported (only that the evaluation's loss was not finite: a
    `nonfinite_eval` note). A NaN from an encoder module in training is named at it."""
    model = _t5()
    model.decoder.block[1].layer[2].DenseReluDense.wo.register_forward_hook(
        lambda module, _inputs, output: None if module.training else output * torch.nan)
    _train(tmp_path, model, tmp_path / "clean", target_length=4, eval_strategy="steps", eval_steps=1,
           predict_with_generate=True, generation_max_length=6, per_device_eval_batch_size=8)
    run = load_run(tmp_path / "clean")
    assert set(run["events"]["kind"]) == {"nonfinite_eval"} and nothing_found(run["summary"])
    assert run["metrics"].query("split == 'train'")["step"].tolist() == [1, 2, 3]

    model = _t5()
    model.encoder.block[1].layer[1].DenseReluDense.wo.register_forward_hook(
        lambda module, _inputs, output: output * torch.nan)
    _train(tmp_path, model, tmp_path / "faulty", target_length=4)
    root = load_run(tmp_path / "faulty")["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "divergence", "student", "encoder.block.1.layer.1.DenseReluDense.wo", 1)
