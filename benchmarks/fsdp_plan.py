"""Per-GPU memory for the README's FSDP plan: estimate_mode on meta-device models (no hub).

FSDP per GPU = total - teacher weights + teacher weights / N + one gathered teacher layer."""
import torch
from transformers import AutoModelForCausalLM, GPT2Config, OlmoeConfig

from sarkd_diag.train.memory import GIB, estimate_mode, model_shape


def meta(config, name, patterns=None):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_shape(model, name, patterns)


large = meta(GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024), "DialoGPT-large")
small = meta(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024), "DialoGPT-small")
olmoe = meta(OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304),
             "OLMoE-1B-7B")
student7 = meta(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50304, n_positions=2048), "GPT-2-small@50304")
for s in (large, small, olmoe, student7):
    print(s)
B, T = 4, 512
for teacher, student in ((large, small), (olmoe, student7)):
    for mode in ("mixed", "bf16-mixed"):
        e = estimate_mode(mode, teacher, student, B, T)
        d = e.to_dict()
        print(f"\n{teacher.name} -> {student.name} {mode} batch {B}x{T}")
        for k in ("teacher_weights", "student_weights", "gradients", "master_weights", "optimizer_state",
                  "activations", "total"):
            print(f"  {k:16s} {d[k] / GIB:7.2f} GiB")
        frozen_bytes = e.teacher_weights
        for n in (2, 4, 8):
            per_gpu = e.total - frozen_bytes + frozen_bytes / n + (frozen_bytes / teacher.layers)
            layer = frozen_bytes / teacher.layers / GIB
            print(f"  FSDP teacher over {n} GPUs: {per_gpu / GIB:7.2f} GiB per GPU "
                  f"(teacher shard {frozen_bytes / n / GIB:.2f} + one gathered layer {layer:.2f})")
