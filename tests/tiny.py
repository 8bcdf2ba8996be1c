"""Tiny models, tokenizers and corpora built inside the tests, saved with save_pretrained and loaded back
through the same path users take (nothing downloaded)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

WORDS = ("the sky sea grass sun moon is blue green red yellow white bright dark what colour why because "
         "i you we like see think it a an and or not very").split()


def write_corpus(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        thing, colour = rng.choice(WORDS[:5]), rng.choice(WORDS[6:12])
        text.append(f"A: what colour is the {thing} ? B: the {thing} is {colour} . A: why {colour} ? "
                    f"B: because i see the {thing} .")
    path.write_text("\n".join(text) + "\n")
    return path


def make_tokenizer(corpus: Path, vocab_size: int = 96, pad: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    kwargs = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    if pad:
        kwargs["pad_token"] = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def make_gpt2(vocab_size: int, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=2, n_positions=n_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def infinite_on_token(model: torch.nn.Module, module: torch.nn.Module, token: int) -> None:
    """Make `module`'s output infinite in each forward of `model` whose `input_ids` hold `token`: a fault that one batch
    brings (a bad record), made again by a replay of that batch's forward and by no other batch."""
    bad = [False]

    def note_batch(_, args, kwargs):
        bad[0] = bool((kwargs["input_ids"] == token).any())

    model.register_forward_pre_hook(note_batch, with_kwargs=True)
    module.register_forward_hook(lambda _, inputs, output: output * math.inf if bad[0] else output)


def make_mixtral(vocab_size: int, seed: int = 1, hidden: int = 32, layers: int = 2, positions: int = 128):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=positions,
                           bos_token_id=0, eos_token_id=0)
    return MixtralForCausalLM(config)


def load_moe_keeping_gates_in_fp32(path: Path, dtype, vocab_size: int, seed: int = 0):
    """A tiny Dots1 MoE (one routed layer) saved to `path` and loaded in `dtype`, as `from_pretrained` loads it: its
    router gate stays fp32 (`_keep_in_fp32_modules_strict`), a few thousand elements beside the model's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("dots1", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def make_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, positions: int = 128,
               attention: str = "sdpa", tied: bool = False):
    """A tiny Llama-style decoder: RMSNorm, rotary positions, grouped-query attention (2 heads, 1 key-value head),
    a SwiGLU MLP (down(silu(gate(x)) * up(x)): the product is the MLP's own code, no module's output)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=positions, tie_word_embeddings=tied, attn_implementation=attention,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_gpt2_untied(vocab_size: int, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_positions: int = 128):
    """The tiny GPT-2 with an lm_head of its own (not tied to the token embedding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=2, n_positions=n_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


class MaskedAttention(torch.nn.Module):
    """Self-attention written by hand, as users write it: the masked softmax is the module's own code, between
    its children (q, k, v, proj). A row whose every key is masked is a softmax over -inf alone: 0/0, NaN."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v, self.proj = (torch.nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        weights = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
        return self.proj(weights @ self.v(x))


class MaskedAttentionNet(torch.nn.Module):
    """embed -> attn (a MaskedAttention) -> head: tokens and a key-padding mask (True: a real token) in, logits out."""

    def __init__(self, vocab_size: int, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.attn = MaskedAttention(width)
        self.head = torch.nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(ids), keep))


def write_world(root: Path) -> dict:
    """A corpus, a tokenizer, a tiny GPT-2 student, a tiny Mixtral teacher and a dense GPT-2 teacher on disk:
    what the tests and scripts/pathologies.py train on."""
    root.mkdir(parents=True, exist_ok=True)
    train = write_corpus(root / "train.txt", 300, seed=0)
    valid = write_corpus(root / "valid.txt", 30, seed=1)
    tokenizer = make_tokenizer(train)
    vocab = len(tokenizer)
    return {"root": root, "train": train, "valid": valid, "tokenizer": tokenizer,
            "student": save(make_gpt2(vocab), tokenizer, root / "student"),
            "teacher": save(make_mixtral(vocab), tokenizer, root / "teacher"),
            "dense_teacher": save(make_gpt2(vocab, seed=3), tokenizer, root / "dense_teacher")}
