"""What the integration tests share: a tiny causal-LM dataset, Trainer arguments for a short CPU run, a
tiny tokenizer and GPT-2 pair, and the one overflow that every framework test provokes."""

from __future__ import annotations

from pathlib import Path

import tiny
import torch
from torch import nn


class Sequences(torch.utils.data.Dataset):
    """Fixed random token sequences (labels = inputs); `fail_at` raises on that many-th item read."""

    def __init__(self, vocab: int, n: int = 32, length: int = 12, fail_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.fail_at, self.reads = fail_at, 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        self.reads += 1
        if self.fail_at is not None and self.reads >= self.fail_at:
            raise RuntimeError(f"corrupt record {i}")
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: Path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def logged_losses(trainer) -> list[float]:
    """The loss the Trainer logged at each step (logging_steps=1), in step order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def tiny_tokenizer(root: Path):
    corpus = tiny.write_corpus(root / "corpus.txt", 40, seed=0)
    return tiny.make_tokenizer(corpus, pad=True), corpus


def overflow_fp16(block: nn.Module, gain: float = 1000.0) -> None:
    """Make the MLP output of a GPT-2 block exceed fp16's 65504 with every weight still finite in fp16.

    `ln_2`'s gain scales what the MLP reads; `c_proj`'s weights ×1e4 (≈ 800 at most) turn that into
    outputs of ~3.6e5 at `mlp.c_proj` — +Inf in fp16, finite in bf16 and fp32 — while every module before it
    stays below ~3200 (measured on tiny.make_gpt2's weights).
    """
    with torch.no_grad():
        block.ln_2.weight.mul_(gain)
        block.mlp.c_proj.weight.mul_(1e4)


def cause(diagnosis: list[dict], name: str) -> dict:
    found = [d for d in diagnosis if d["cause"] == name]
    assert found, f"no {name} in {[(d['cause'], d['severity'], d['module']) for d in diagnosis]}"
    return found[0]


def severities(diagnosis: list[dict]) -> set[str]:
    return {d["severity"] for d in diagnosis}
