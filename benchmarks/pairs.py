"""The two model pairs the benchmarks measure, built locally (no download).

`tiny`: the embedded default (tiny Mixtral teacher, tiny GPT-2 student). `gpt2`: random-init models
shaped like DialoGPT-small (student: 12 layers, 768 wide) and DialoGPT-medium (teacher: 24 layers,
1024 wide) with the real GPT-2 architecture and 50,257-token vocabulary. Their tokenizer is the
embedded byte-level BPE padded with added tokens to 50,257 entries, so the logits and the KD loss
cover the full vocabulary as DialoGPT's do.
"""

from __future__ import annotations

import os
from pathlib import Path

from sarkd_diag.assets import embedded_model_path

CACHE = Path(os.environ.get("SARKD_BENCH_CACHE", "/tmp/sarkd-diag-bench"))
GPT2_VOCAB = 50257


def tiny_pair() -> tuple[str, str]:
    return "embedded:tiny-mixtral", "embedded:tiny-gpt2"


def gpt2_pair() -> tuple[str, str]:
    """DialoGPT-medium-shaped teacher and DialoGPT-small-shaped student, saved once under CACHE."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    teacher_dir, student_dir = CACHE / "gpt2-medium-shaped", CACHE / "gpt2-small-shaped"
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return str(teacher_dir), str(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("tiny-gpt2"))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(GPT2_VOCAB - len(tokenizer))])
    assert len(tokenizer) == GPT2_VOCAB
    for path, (layers, width, heads) in ((student_dir, (12, 768, 12)), (teacher_dir, (24, 1024, 16))):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(teacher_dir), str(student_dir)


PAIRS = {"tiny": tiny_pair, "gpt2": gpt2_pair}
