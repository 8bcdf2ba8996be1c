"""`train` with the fused loss (the default) against `--no-fused-loss`, end to end through the CLI."""

import json

import numpy as np
import pytest
import tiny
import torch
from contract import assert_run_dir

from sarkd_diag import load_run


def train_losses(run_dir):
    """Each training step's loss, kd and ce, then each evaluation's loss (its CE, fused or not)."""
    metrics = load_run(run_dir)["metrics"]
    train = metrics[metrics["split"] == "train"][["loss", "kd_loss", "ce_loss"]].to_numpy().ravel()
    return np.concatenate([train, metrics[metrics["split"] == "eval"]["eval_loss"].to_numpy()])


@pytest.mark.parametrize("mode, tolerance", [("fp32", 1e-5), ("bf16-mixed", 2e-2)])
def test_training_losses_match_the_unfused_path_step_by_step(cli, tiny_args, tmp_path, mode, tolerance):
    """The embedded-default shape of run (SAR teacher, routers training), both ways from the same start. In fp32
    the two agree to float rounding; in bf16-mixed the head's products round in bf16 in a different order."""
    losses = {}
    for flag in ("--fused-loss", "--no-fused-loss"):
        run_dir = tmp_path / flag
        code, _, err = cli("train", *tiny_args, "--precision", mode, "--output-dir", str(run_dir), flag)
        assert code == 0, err
        config = json.loads((run_dir / "config.json").read_text())
        assert config["objective"]["fused_loss"] is (flag == "--fused-loss")
        losses[flag] = train_losses(run_dir)
    fused, unfused = losses["--fused-loss"], losses["--no-fused-loss"]
    assert fused.shape == unfused.shape == (6 * 3 + 3,)  # 6 steps of loss, kd, ce; 3 evaluations
    assert abs(fused - unfused).max() <= tolerance * abs(unfused).max()
    heads = {flag: logits_extremes(tmp_path / flag) for flag in losses}
    assert set(heads["--fused-loss"]) == {"student", "teacher"}  # the fp16 headroom of the logits, from the chunks
    for model, amax in heads["--fused-loss"].items():
        assert abs(amax - heads["--no-fused-loss"][model]) <= tolerance * amax


def logits_extremes(run_dir) -> dict[str, float]:
    """Each model's lm_head output absolute max at step 1, from activations.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "activations.jsonl").read_text().splitlines()]
    return {r["model"]: r["amax"] for r in rows if r["module"] == "lm_head" and r["step"] == 1}


def hot_head_model(world, role: str, tmp_path):
    """An untied GPT-2 whose lm_head output reaches ~1e5, beyond fp16's range (a teacher or a student)."""
    from transformers import AutoTokenizer

    model = tiny.make_gpt2_untied(len(AutoTokenizer.from_pretrained(world["student"])), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(3e6)
    return tiny.save(model, AutoTokenizer.from_pretrained(world["student"]), tmp_path / f"hot_{role}")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_an_overflowing_lm_head_is_named_the_same_way_fused_or_not(cli, tiny_args, tiny_world, tmp_path, role):
    """The head's forward hooks see every chunk, so the diagnosis names lm_head with the same cause either way."""
    hot = hot_head_model(tiny_world, role, tmp_path)
    args = [a if a != "6" else "2" for a in tiny_args]  # fp16 arithmetic is slow on this CPU: keep it short
    first = {}
    for flag in ("--fused-loss", "--no-fused-loss"):
        run_dir = tmp_path / flag
        cli("train", *args, "--precision", "mixed", f"--{role}-model", str(hot), "--output-dir", str(run_dir), flag)
        summary = assert_run_dir(run_dir)
        located = [(d["cause"], d.get("model"), d.get("module")) for d in summary["diagnosis"]
                   if d.get("module")]
        first[flag] = located[0]
    assert first["--fused-loss"] == first["--no-fused-loss"]
    assert first["--fused-loss"][1:] == (role, "lm_head")


def test_a_head_that_does_not_fuse_falls_back_with_a_note(cli, tiny_args, tiny_world, tmp_path):
    """A soft-capped student (Gemma 2's final_logit_softcapping): the run takes complete logits and says why."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_world["student"])
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    student = tiny.save(Gemma2ForCausalLM(config), tokenizer, tmp_path / "capped_student")
    args = [a if a != "6" else "2" for a in tiny_args]
    code, _, err = cli("train", *args, "--precision", "fp32", "--student-model", str(student))
    assert code == 0, err
    run_dir = tmp_path / "run"
    events = load_run(run_dir)["events"]
    notes = events[events["code"] == "loss_unfused"]
    assert len(notes) == 1 and notes.iloc[0]["model"] == "student" and "soft cap" in notes.iloc[0]["message"]
    assert notes.iloc[0]["message"].startswith("--fused-loss: the student does not fuse, its logits are not")
    assert json.loads((run_dir / "config.json").read_text())["objective"]["fused_loss"] is False
