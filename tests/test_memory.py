"""estimate-memory: parameter counts read from configs alone match the real models exactly, the bytes follow
each mode's dtypes, and the command prints and exits like the others."""

import json
import math

import pytest

from sarkd_diag.train.memory import estimate_memory, estimate_mode, format_breakdown, model_shape, shape_from_config


@pytest.fixture(scope="module")
def shapes(tiny_world):
    from transformers import AutoModelForCausalLM

    real = {k: AutoModelForCausalLM.from_pretrained(tiny_world[k]) for k in ("teacher", "student")}
    return {k: (shape_from_config(str(tiny_world[k])), real[k]) for k in real}


def test_counts_from_the_meta_device_equal_the_loaded_models(shapes):
    for shape, model in shapes.values():
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert shape == model_shape(model, shape.name)
    teacher, model = shapes["teacher"]
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gates and teacher.router_params == sum(p.numel() for p in gates)
    assert teacher.experts_per_token == 2 and shapes["student"][0].router_params == 0


def test_bytes_follow_each_modes_dtypes(shapes):
    teacher, student = shapes["teacher"][0], shapes["student"][0]
    trainable, routers, frozen = student.params + teacher.router_params, teacher.router_params, \
        teacher.params - teacher.router_params
    fp32 = estimate_mode("fp32", teacher, student, 4, 32)
    assert (fp32.teacher_weights, fp32.student_weights) == (4 * teacher.params, 4 * student.params)
    assert (fp32.gradients, fp32.master_weights, fp32.optimizer_state) == (4 * trainable, 0, 8 * trainable)
    mixed = estimate_mode("mixed", teacher, student, 4, 32)  # fp16 working copies + fp32 masters
    assert mixed.teacher_weights == 2 * frozen + 2 * routers and mixed.student_weights == 2 * student.params
    assert (mixed.gradients, mixed.master_weights, mixed.optimizer_state) == (4 * trainable, 4 * trainable,
                                                                             8 * trainable)
    pure = estimate_mode("pure-bf16", teacher, student, 4, 32)
    assert (pure.gradients, pure.master_weights, pure.optimizer_state) == (2 * trainable, 0, 4 * trainable)
    assert pure.total < mixed.total < fp32.total


def test_activations_scale_with_the_batch_and_shrink_with_checkpointing(shapes):
    teacher, student = shapes["teacher"][0], shapes["student"][0]
    one, two = (estimate_mode("bf16-mixed", teacher, student, b, 32).activations for b in (4, 8))
    assert two == 2 * one
    assert estimate_mode("bf16-mixed", teacher, student, 4, 32, gradient_checkpointing=True).activations < one


def test_fused_logits_cost_one_chunk_of_rows_whatever_the_batch(shapes):
    """Over a 50k vocabulary the fused loss holds one chunk of the student's logits (86 rows at 50,257: 2,048 or
    4,096 rows in chunks of at least 84), the
    teacher's of half of them and five fp32 buffers of a row group (2 rows), plus the student's hidden-state
    gradient; unfused, every token's logits."""
    from dataclasses import replace

    teacher, student = (replace(shapes[k][0], vocab=50257) for k in ("teacher", "student"))
    one_chunk = (86 + 43 + 2 * 5) * 50257 * 4
    for batch in (4, 8):
        tokens = batch * 512
        every_token = tokens * 50257 * (4 + 4 + 4 + 4)  # student logits, log-softmax, gradient; teacher logits
        unfused = estimate_mode("fp32", teacher, student, batch, 512, fused_loss=False).activations
        fused = estimate_mode("fp32", teacher, student, batch, 512).activations
        assert unfused - fused == every_token - one_chunk - tokens * student.hidden * 4
    assert "86 rows at a time" in " ".join(estimate_mode("fp32", teacher, student, 4, 512).notes)
    # bf16 logits: chunks of the same bytes, twice the rows (2,048 rows in twelve chunks of at least 166)
    assert "171 rows at a time" in " ".join(estimate_mode("bf16-mixed", teacher, student, 4, 512).notes)


def test_a_student_whose_logits_do_not_fuse_is_counted_with_every_tokens_logits(tiny_world, tmp_path):
    """train falls back to complete logits for a model whose head does not fuse (Gemma 2's soft cap); estimate-memory
    counted one chunk of rows anyway, under the figure the run needs. It asks the meta model, as train asks the
    loaded one, and says why."""
    import tiny
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_world["student"])
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    student = tiny.save(Gemma2ForCausalLM(config), tokenizer, tmp_path / "gemma2")
    report = estimate_memory(teacher_model=str(tiny_world["teacher"]), student_model=str(student), block_size=32,
                             per_device_batch_size=4, modes=["fp32"])
    assert "soft cap" in report.student.unfused and report.teacher.unfused is None
    every_token = estimate_mode("fp32", report.teacher, report.student, 4, 32, fused_loss=False)
    assert report.estimates[0].total == every_token.total
    assert any(n.startswith(f"--fused-loss: the student ({student}) does not fuse") for n in report.notes)


def test_a_dual_tokenizer_teacher_costs_its_last_hidden_states_not_its_logits(shapes):
    """Across vocabularies the teacher's logits are never computed (its head runs on no position): the loss reads
    its last hidden states, and the student's CE takes every token's logits, fused or not."""
    from dataclasses import replace

    student = replace(shapes["student"][0], vocab=50257)
    teacher = replace(shapes["teacher"][0], vocab=151936, hidden=1024, router_params=0)  # SAR needs one vocabulary
    tokens = 4 * 512
    student_only = replace(teacher, vocab=student.vocab)  # same vocabulary: the teacher's logits are counted
    dual = estimate_mode("fp32", teacher, student, 4, 512, fused_loss=False, dual=True).activations
    same = estimate_mode("fp32", student_only, student, 4, 512, fused_loss=False).activations
    assert dual - same == tokens * teacher.hidden * 4 - tokens * student.vocab * 4
    assert estimate_mode("fp32", teacher, student, 4, 512, dual=True).activations == dual  # no --fused-loss here


@pytest.mark.parametrize("pair", ["padded", "dual"])
def test_estimate_memory_tells_dual_tokenizer_mode_as_train_does(tiny_world, cli, tmp_path, pair):
    """A teacher whose head is padded past the student's own tokenizer (Qwen2.5-7B over 0.5B's) is logit KD in
    `train`; estimate-memory called it dual-tokenizer mode whenever the vocab sizes differed, counting a projection
    that never trains and no teacher logits. Both now decide through `models.shared_vocabulary`, from the tokenizers."""
    import tiny
    from transformers import AutoTokenizer

    from sarkd_diag.train.models import load_tokenizer, shared_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tiny_world["student"])
    teacher = tiny.save(tiny.make_llama(len(tokenizer) + 32, seed=5), tokenizer, tmp_path / "padded_teacher")
    student = tiny_world["student"] if pair == "padded" else tiny_world["dual_student"]
    code, out, err = cli("estimate-memory", "--teacher-model", teacher, "--student-model", student, "--block-size",
                         "32", "--per-device-batch-size", "4", "--modes", "fp32", "--json")
    assert code == 0, err
    report = json.loads(out)
    shapes = {role: shape_from_config(str(path)) for role, path in (("teacher", teacher), ("student", student))}
    assert shapes["teacher"].vocab != shapes["student"].vocab
    dual = pair == "dual"
    projection = shapes["student"].hidden * shapes["teacher"].hidden + shapes["teacher"].hidden if dual else 0
    assert report["modes"][0]["student_weights"] == 4 * (shapes["student"].params + projection)
    assert dual == (shared_vocabulary(load_tokenizer(str(teacher), False), load_tokenizer(str(student), False),
                                      shapes["teacher"].vocab, shapes["student"].vocab) is None)  # train's decision
    expected = estimate_mode("fp32", shapes["teacher"], shapes["student"], 4, 32, dual=dual)
    assert report["modes"][0]["total"] == expected.total


def test_offloading_moves_the_frozen_teacher_to_the_host(shapes):
    teacher, student = shapes["teacher"][0], shapes["student"][0]
    on, off = (estimate_mode("fp32", teacher, student, 4, 32, offload_teacher=o) for o in (False, True))
    assert off.host == 4 * (teacher.params - teacher.router_params)
    assert on.total - off.total == off.host
    assert "estimated device memory for fp32" in format_breakdown(on)


def test_python_api_and_the_command(tiny_world, cli):
    report = estimate_memory(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                             block_size=32, per_device_batch_size=4, modes=["fp32", "mixed"])
    assert [e.mode for e in report.estimates] == ["fp32", "mixed"]
    code, out, err = cli("estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model",
                         tiny_world["student"], "--block-size", "32", "--per-device-batch-size", "4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [m["mode"] for m in data["modes"]] == ["fp32", "mixed", "bf16-mixed", "pure-fp16", "pure-bf16"]
    assert data["modes"][0]["total"] == report.estimates[0].total
    code, out, _ = cli("estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model",
                       tiny_world["student"], "--modes", "pure-fp16,fp32")
    assert code == 0 and "pure-fp16" in out and "masters" in out


def test_bad_input_is_one_line_and_exit_2(tiny_world, cli, tmp_path):
    code, _, err = cli("estimate-memory", "--student-model", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "no such directory" in err
    code, _, err = cli("estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model",
                       tiny_world["student"], "--modes", "fp16")
    assert code == 2 and "ambiguous" in err


def test_a_sharded_teacher_holds_its_shard_and_gathers_a_layer_at_a_time(shapes, tiny_world, cli):
    """--shard-teacher over N ranks: the teacher's bytes are 1/N of its weights, routers included, the output head
    whole, the embeddings and one layer gathered (measured against real shards in tests/e2e/test_distributed.py);
    of the rest, only the routers' gradients and AdamW moments shrink, to 1/N."""
    from sarkd_diag.train.memory import sharded_teacher_params

    teacher, student = shapes["teacher"][0], shapes["student"][0]
    routers = teacher.router_params
    assert routers > 0
    whole = estimate_mode("fp32", teacher, student, 4, 32)
    by_ranks = {n: estimate_mode("fp32", teacher, student, 4, 32, teacher_shards=n) for n in (2, 4)}
    for n, sharded in by_ranks.items():
        held, gathered = sharded_teacher_params(teacher, n)
        assert sharded.teacher_weights == 4 * (held + gathered)
        saved = routers - math.ceil(routers / n)  # each rank holds its shard of the routers
        assert sharded.gradients == whole.gradients - 4 * saved
        assert sharded.optimizer_state == whole.optimizer_state - 2 * 4 * saved
        assert sharded.student_weights == whole.student_weights and sharded.activations == whole.activations
    assert by_ranks[4].teacher_weights < by_ranks[2].teacher_weights
    args = ["estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model", tiny_world["student"],
            "--block-size", "32", "--per-device-batch-size", "4", "--modes", "fp32"]
    code, out, err = cli(*args, "--nproc", "2", "--shard-teacher", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ranks"] == 2 and data["modes"][0]["teacher_weights"] == by_ranks[2].teacher_weights
    code, out, _ = cli(*args, "--nproc", "2", "--shard-teacher")
    assert code == 0 and "per GPU of 2" in out and "--shard-teacher over 2 ranks" in " ".join(out.split())
    code, _, err = cli(*args, "--shard-teacher")
    assert code == 2 and err.count("\n") == 1 and "--nproc" in err


def test_the_out_of_memory_message_of_a_sharded_run_counts_the_teacher_sharded_and_never_advises_offloading():
    """--shard-teacher refuses --offload-teacher-to-cpu, so its out-of-memory advice must not offer it; its
    breakdown is estimate-memory's for the teacher split over the ranks."""
    import tiny
    import torch

    from sarkd_diag.contract.config import DistillConfig
    from sarkd_diag.train.out_of_memory import out_of_memory_message

    teacher, student = tiny.make_mixtral(96), tiny.make_gpt2(96)
    configs = {1: DistillConfig(), 2: DistillConfig(shard_teacher=True)}
    messages = {shards: out_of_memory_message(cfg, "fp32", teacher, student, torch.device("cpu"), dual=False,
                                              fused=True, error="x", phase="forward", step=3, saved=None,
                                              teacher_shards=shards)
                for shards, cfg in configs.items()}
    assert "--offload-teacher-to-cpu" in messages[1] and "--offload-teacher-to-cpu" not in messages[2]
    sharded = estimate_mode("fp32", model_shape(teacher), model_shape(student), configs[2].per_device_batch_size,
                            configs[2].block_size, teacher_shards=2)
    assert format_breakdown(sharded) in messages[2]
    # a run that fell back to complete logits (a model that does not fuse) is counted as it holds them
    unfused = out_of_memory_message(configs[1], "fp32", teacher, student, torch.device("cpu"), dual=False,
                                    fused=False, error="x", phase="forward", step=3, saved=None)
    every_token = estimate_mode("fp32", model_shape(teacher), model_shape(student), configs[1].per_device_batch_size,
                                configs[1].block_size, fused_loss=False)
    assert format_breakdown(every_token) in unfused


def test_a_block_longer_than_a_models_positions_is_refused_as_train_refuses_it(tiny_world, cli):
    """estimate-memory printed figures for `--block-size 100000000000` on a 256-position GPT-2 (a run that cannot
    start): it is refused with train's own line."""
    from transformers import AutoConfig

    student = str(tiny_world["student"])
    positions = AutoConfig.from_pretrained(student).n_positions
    models = ("--teacher-model", tiny_world["teacher"], "--student-model", student, "--modes", "fp32")
    code, out, err = cli("estimate-memory", *models, "--block-size", positions + 1)
    assert (code, out, err) == (2, "", f"sarkd-diag: error: --block-size {positions + 1} exceeds {student}'s "
                                      f"{positions} positions\n")
    code, out, err = cli("estimate-memory", *models, "--block-size", positions, "--json")
    assert code == 0 and json.loads(out)["block"] == positions, err


def test_a_model_directory_without_weights_is_estimated_and_one_without_a_tokenizer_is_told_so(tiny_world, cli,
                                                                                              tmp_path):
    """estimate-memory reads a model's config (its shapes) and its tokenizer (dual-tokenizer mode or not, as train
    decides it), never its weights: a directory saved before the weights were downloaded is estimated, and one
    without a tokenizer is told it lacks only that — not weights, which the estimate never reads."""
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_world["student"] / "config.json").read_bytes())
    code, _, err = cli("estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model", partial)
    assert code == 2 and err == (f"sarkd-diag: error: model path {partial} has no tokenizer files (tokenizer.json, "
                                 "tokenizer_config.json, vocab.json, ...): save its tokenizer "
                                 "(tokenizer.save_pretrained) there\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_bytes((tiny_world["student"] / name).read_bytes())
    code, out, err = cli("estimate-memory", "--teacher-model", tiny_world["teacher"], "--student-model", partial,
                         "--json")
    assert code == 0, err
    assert json.loads(out)["student"]["params"] == shape_from_config(str(tiny_world["student"])).params
