"""SAR end to end: only the teacher's routers train, their update re-applies, dual-tokenizer KD runs."""

import math

import pytest
import tiny
import torch
from contract import assert_run_dir, nothing_found
from transformers import AutoModelForCausalLM, AutoTokenizer

from sarkd_diag import load_run
from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.presentation.ui import TrainingDisplay
from sarkd_diag.train.loop import Trainer
from sarkd_diag.train.router import apply_router_update


def _config(world, out, **over):
    base = dict(teacher_model=str(world["teacher"]), student_model=str(world["student"]),
                train_file=str(world["train"]), validation_file=str(world["valid"]), block_size=16,
                per_device_batch_size=4, train_steps=4, eval_steps=4, student_lr=3e-3, router_lr=3e-2,
                output_dir=str(out), precision="fp32")
    return DistillConfig(**{**base, **over}).validate()


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_only_router_weights_change_and_they_keep_fp32_masters(tiny_world, tmp_path, precision):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", precision=precision), TrainingDisplay(quiet=True))
    result = trainer.train()
    assert result.status == "completed"
    fresh = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"])
    trained = dict(trainer.teacher.named_parameters())
    router_names = {n for r in trainer.routers for n in r.param_names}
    assert router_names == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    for name, before in fresh.named_parameters():
        after = trained[name]
        if name in router_names:
            assert after.dtype == torch.float32
            assert not torch.equal(after.detach().float(), before.detach()), name
        else:
            assert after.dtype == trainer.precision.frozen_dtype
            assert torch.equal(after.detach(), before.detach().to(after.dtype)), name  # bit for bit
    config = load_run(result.run_dir)["config"]
    assert [r["module"] for r in config["routers"]] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    metrics = load_run(result.run_dir)["metrics"].query("split == 'train'")
    assert {"router_loss", "expert_entropy_layer0", "expert_entropy_layer1"} <= set(metrics.columns)


def test_router_update_reapplies_to_a_fresh_teacher(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run"), TrainingDisplay(quiet=True))
    result = trainer.train()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"]).eval()
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        applied = apply_router_update(fresh, result.run_dir / "router_update.pt")
        assert len(applied) == 2
        torch.testing.assert_close(fresh(input_ids=ids).logits, trainer.teacher(input_ids=ids).logits, rtol=0, atol=0)
    assert not torch.equal(before, fresh(input_ids=ids).logits)


def test_dense_teacher_trains_as_plain_kd_with_a_warning(cli, tiny_args, tiny_world, tmp_path):
    args = [str(tiny_world["dense_teacher"]) if a == str(tiny_world["teacher"]) else a for a in tiny_args]
    code, _, err = cli("train", *args, "--precision", "fp32")
    assert code == 0, err
    run = load_run(tmp_path / "run")
    assert list(run["events"].query("kind == 'no_router'")["severity"]) == ["warning"]
    assert nothing_found(run["summary"])
    assert not (tmp_path / "run" / "router_update.pt").exists()


@pytest.mark.parametrize("patterns, message", [(["nothing_here"], "match no router"),
                                               (["gate("], "not a valid regular expression")])
def test_bad_router_patterns_are_bad_input(cli, tiny_args, tmp_path, patterns, message):
    code, out, err = cli("train", *tiny_args, *[x for p in patterns for x in ("--router-patterns", p)])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_router_patterns_narrow_the_choice(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", router_patterns=[r"layers\.1\."]),
                      TrainingDisplay(quiet=True))
    assert [r.name for r in trainer.routers] == ["model.layers.1.mlp.gate"]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "mixed"])
def test_dual_tokenizer_mode_trains_the_student_on_hidden_states(cli, tiny_args, tiny_world, tmp_path, precision):
    args = [str(tiny_world["dual_student"]) if a == str(tiny_world["student"]) else a for a in tiny_args]
    if precision == "mixed":
        args = [a if a != "6" else "3" for a in args]
    code, _, err = cli("train", *args, "--precision", precision)
    assert code == 0, err
    summary = assert_run_dir(tmp_path / "run")
    run = load_run(tmp_path / "run")
    kinds = set(run["events"]["kind"])
    assert {"dual_tokenizer", "router_frozen_dual"} <= kinds and "router_found" not in kinds
    assert run["config"]["objective"]["kind"].startswith("hidden-state-kd")
    assert "projection" in run["config"]["precision"]["param_dtypes"]
    train = run["metrics"].query("split == 'train'")
    assert train["kd_loss"].notna().all() and (train["kd_loss"] > 0).all()
    assert (train["kd_targets"] == train["targets"]).all() and "kd_targets_few" not in set(run["events"]["code"])
    ppls = run["metrics"].query("split == 'eval'")["eval_ppl"].tolist()
    assert ppls[-1] < ppls[0]
    assert not [d for d in summary["diagnosis"] + summary["findings"] if d["severity"] != "info"]


def test_a_dual_tokenizer_kd_term_over_few_tokens_says_so(cli, tiny_args, tiny_world, tmp_path):
    """A teacher whose position table holds fewer tokens than a student block's text needs: the text past them is cut,
    and the student tokens there get no teacher state. The kd_loss, a mean over every target, read as a small loss
    and nothing said why; now the step's covered targets are a column and the first step short of half says so."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"])
    teacher.config.max_position_embeddings = 8  # rotary positions: the table is the config's number alone
    teacher_dir = tiny.save(teacher, AutoTokenizer.from_pretrained(tiny_world["teacher"]), tmp_path / "short_teacher")
    args = [{str(tiny_world["student"]): str(tiny_world["dual_student"]), str(tiny_world["teacher"]): str(teacher_dir),
             "6": "2"}.get(a, a) for a in tiny_args]
    code, out, err = cli("train", *args, "--precision", "fp32")
    assert code == 0, err
    run = load_run(tmp_path / "run")
    train = run["metrics"].query("split == 'train'")
    assert (train["kd_targets"] < train["targets"] / 2).all()
    (note,) = run["events"].query("code == 'kd_targets_few'").itertuples()
    assert (note.severity, note.step, note.numel) == ("warning", 1, train["targets"].iloc[0])
    assert "at most 8 tokens" in note.message and "--block-size" in note.message
    assert "the KD term covered" in out + err
    # a note the summary ignored: "no numerical problems" while most tokens had no teacher target
    cause = next(c for c in run["summary"]["findings"] if c["cause"] == "kd_targets_few")
    assert (cause["severity"], cause["model"], cause["first_step"]) == ("warning", "teacher", 1)
    assert cause["evidence"]["steps_under_threshold"] == len(train) and "--block-size (now" in cause["fix"]


def test_a_teacher_whose_vocabulary_is_padded_is_distilled_on_logits_over_the_shared_ids(cli, tiny_args, tiny_world,
                                                                                        tmp_path):
    """The student's own tokenizer, the teacher's vocab_size rounded up past it (Qwen2.5-7B's 152064 rows against
    0.5B's 151936, one tokenizer): every id lies below both, so it is logit KD over the shared ids — not hidden-state
    KD, as between two tokenizers. The heads differ in size, so the loss takes complete logits."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["student"])
    teacher = tiny.save(tiny.make_llama(len(tokenizer) + 32, seed=5), tokenizer, tmp_path / "padded_teacher")
    args = [str(teacher) if a == str(tiny_world["teacher"]) else a for a in tiny_args]
    code, _, err = cli("train", *args, "--precision", "fp32")
    assert code == 0, err
    run = load_run(tmp_path / "run")
    events = run["events"]
    assert run["config"]["objective"]["kind"] == "logit-kd" and "dual_tokenizer" not in set(events["kind"])
    assert not run["config"]["objective"]["fused_loss"] and set(events["code"]) >= {"padded_vocabulary", "loss_unfused"}
    train = run["metrics"].query("split == 'train'")
    assert all(math.isfinite(v) and v > 0 for v in train["kd_loss"])
    assert not [d for d in run["summary"]["diagnosis"] + run["summary"]["findings"] if d["severity"] != "info"]


@pytest.mark.parametrize("precision, dtype", [("pure-bf16", "bfloat16"), ("pure-fp16", "float16")])
def test_dual_tokenizer_mode_holds_its_projection_as_a_pure_mode_holds_the_student(cli, tiny_args, tiny_world,
                                                                                    tmp_path, precision, dtype):
    """The projection trains with the student: in a pure mode it is held in the mode's dtype like the student's weights
    (it was left in fp32, and its matmul with the student's half hidden states stopped the run with an internal
    error before step 1)."""
    args = [str(tiny_world["dual_student"]) if a == str(tiny_world["student"]) else a for a in tiny_args]
    args = [a if a != "6" else "2" for a in args]
    code, _, err = cli("train", *args, "--precision", precision, "--adam-eps", "1e-4")
    run = load_run(tmp_path / "run")
    assert code != 3 and "internal error" not in err and not list((tmp_path / "run").glob("traceback*"))
    assert run["summary"]["steps_completed"] == 2
    assert set(run["config"]["precision"]["param_dtypes"]["projection"]["trainable"]) == {dtype}


def test_dual_batches_carry_student_offsets_into_their_own_text(tiny_world, tmp_path):
    trainer = Trainer(_config(tiny_world, tmp_path / "run", student_model=str(tiny_world["dual_student"])),
                      TrainingDisplay(quiet=True))
    batch = trainer.batches.next()
    tok = trainer.student_tokenizer
    for text, ids, offsets in zip(batch["texts"], batch["input_ids"], batch["offsets"], strict=True):
        pieces = [text[a:b] for a, b in offsets.tolist()]
        decoded = [tok.decode([i]) for i in ids.tolist()]
        assert [p for p, d in zip(pieces, decoded, strict=True) if d != tok.eos_token] == \
            [d for d in decoded if d != tok.eos_token]
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])  # shifted once, in the data
