"""Probes on PEFT models (LoRA adapters from `peft.get_peft_model`), in a user loop and in the Trainer: the
adapters are the trainable tensors, the frozen base they sit in decides what the forward computes in."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

import tiny  # noqa: E402
from contract import nothing_found  # noqa: E402
from frameworks import Sequences, cause, logged_losses, overflow_fp16, training_args  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from sarkd_diag import Probes, load_run  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback  # noqa: E402

VOCAB = 64


def lora(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2's attention and MLP projections adapted (Conv1D: fan_in_fan_out); adapters in fp32 whatever the base."""
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                            fan_in_fan_out=True))


def _setup_notes(run, severity: str = "warning"):
    events = run["events"]
    return events[(events["kind"] == "setup_note") & (events["severity"] == severity)]


def _train_lora_loop(run_dir, loss_weight: float, steps: int = 4) -> list[float]:
    model = lora(tiny.make_gpt2(VOCAB).half())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    with Probes(model, optimizer=optimizer, run_dir=run_dir) if run_dir else _no_probes() as probes:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss * loss_weight  # a KD term weighted far below 1
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if probes is not None:
                probes.step(loss=loss)
    return losses


class _no_probes:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_lora_over_an_fp16_base_without_a_scaler_is_told_its_gradients_flush_in_the_base(tmp_path):
    # fp32 adapters, every gradient of which passes back through the fp16 base: at a loss of ~4e-6 they all flush
    # to zero there. Before, the backward counted as fp32 (the adapters' dtype) and the cause read "cut off"
    losses = _train_lora_loop(tmp_path / "run", loss_weight=1e-6)
    run = load_run(tmp_path / "run")
    precision = run["summary"]["precision"]
    assert precision["mode"] == "mixed" and precision["compute_dtype"] == "float16"
    assert precision["master_dtype"] == "float32" and not precision["loss_scaling"]
    note = _setup_notes(run).iloc[0]
    assert note["step"] == 1 and note["model"] == "student" and "lora_" in note["tensor"]
    assert "frozen in float16" in note["message"] and "GradScaler" in note["message"]
    diagnosis = run["summary"]["diagnosis"]
    root = cause(diagnosis, "update_underflow")
    assert root["model"] == "student" and root["first_step"] == 1 and "lora_" in root["tensor"]
    assert "flush" in root["fix"] and root["evidence"]["compute_dtype"] == "float16"
    assert "no_gradients" not in [d["cause"] for d in run["summary"]["findings"]]
    assert losses == _train_lora_loop(None, loss_weight=1e-6)  # the probes did not change training


def test_lora_over_an_fp16_base_at_a_normal_loss_trains_and_is_recorded_as_mixed(tmp_path):
    _train_lora_loop(tmp_path / "run", loss_weight=1.0)
    run = load_run(tmp_path / "run")
    assert run["summary"]["precision"]["mode"] == "mixed"
    assert nothing_found(run["summary"])
    assert run["metrics"]["zero_grad_tensors"].iloc[1:].eq(0).all()  # LoRA's B at 0 zeroes A's gradient on step 1 only


def _trainer(tmp_path, model, run_dir=None, **args):
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", **args), train_dataset=Sequences(VOCAB))
    if run_dir is not None:
        SarkdDiagCallback.attach(trainer, run_dir)
    trainer.train()
    return trainer


def test_a_clean_lora_run_in_the_trainer_warns_of_nothing_and_trains_alike(tmp_path):
    trainer = _trainer(tmp_path, lora(tiny.make_gpt2(VOCAB)), tmp_path / "run", bf16=True, learning_rate=1e-3)
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed" and nothing_found(run["summary"])
    assert run["summary"]["precision"]["mode"] == "bf16-mixed"
    assert not {"warning", "critical"} & set(run["events"]["severity"])
    plain = _trainer(tmp_path, lora(tiny.make_gpt2(VOCAB)), bf16=True, learning_rate=1e-3)
    assert logged_losses(plain) == logged_losses(trainer)


def test_a_trainer_over_an_fp16_base_is_mixed_and_its_overflow_named_at_the_wrapped_layer(tmp_path):
    base = tiny.make_gpt2(VOCAB)
    overflow_fp16(base.transformer.h[1])  # mlp.c_proj's outputs beyond 65504; every weight finite in fp16
    trainer = _trainer(tmp_path, lora(base.half()), tmp_path / "run", learning_rate=1e-3, max_steps=6)
    run = load_run(tmp_path / "run")
    summary = run["summary"]
    assert summary["precision"]["mode"] == "mixed" and summary["precision"]["compute_dtype"] == "float16"
    assert "frozen float16" in summary["precision"]["reason"]
    assert _setup_notes(run, "info").empty  # no "asks for ... but ran with no autocast": fp16 is what it computes in
    root = summary["diagnosis"][0]
    assert root["cause"] == "activation_overflow" and root["model"] == "student" and root["first_step"] == 1
    assert root["module"].endswith("transformer.h.1.mlp.c_proj.base_layer")
    assert root["module"] in dict(trainer.model.named_modules())
    assert summary["status"] == "stopped" and trainer.state.global_step == 1


def _fp16_adapters() -> torch.nn.Module:
    """LoRA adapters left in the fp16 of their base (`autocast_adapter_dtype=False`)."""
    model = get_peft_model(tiny.make_gpt2(VOCAB).half(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                           fan_in_fan_out=True), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float16}
    return model


def test_fp16_adapters_under_a_grad_scaler_are_told_to_keep_the_adapters_in_fp32(tmp_path):
    """GradScaler refuses fp16 gradients ("Attempting to unscale FP16 gradients"): for adapters over an fp16 base the
    weights it needs in fp32 are the adapters, not the model."""
    model = _fp16_adapters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unscale FP16 gradients"), Probes(model, optimizer, scaler,
                                                                            run_dir=tmp_path / "run"):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
    root = load_run(tmp_path / "run")["summary"]["findings"][0]
    assert root["cause"] == "scaler_fp16_weights" and "lora_" in root["tensor"]
    assert "keep the trainable tensors (the adapters) in fp32 over the frozen float16 weights" in root["fix"]
    assert "load the model in fp32" not in root["fix"]


def test_fp16_adapters_over_an_fp16_base_are_told_to_keep_the_adapters_in_fp32_not_to_load_the_model_so(tmp_path):
    """Adapters left in fp16 (`autocast_adapter_dtype=False`) train in pure fp16: Adam's eps is 0 there and the
    adapters turn NaN on step 1. Their master weights are the adapters alone, so the fix is fp32 adapters over the
    frozen fp16 base — loading the whole model in fp32, as for a fully trained model, doubles the base for nothing."""
    trainer = _trainer(tmp_path, _fp16_adapters(), tmp_path / "run", learning_rate=1e-2, optim="adamw_torch")
    summary = load_run(tmp_path / "run")["summary"]
    assert summary["precision"]["mode"] == "pure-fp16" and summary["precision"]["adapted_models"] == ["student"]
    root = summary["diagnosis"][0]
    assert root["cause"] == "optimizer_eps_underflow" and "lora_" in root["tensor"]
    assert "trainable tensors in fp32" in root["fix"] and "autocast_adapter_dtype=True" in root["fix"]
    assert "TrainingArguments(fp16=True)" in root["fix"] and "model loaded in fp32" not in root["fix"]
    plain = _trainer(tmp_path, _fp16_adapters(), learning_rate=1e-2, optim="adamw_torch")
    assert logged_losses(plain)[:1] == logged_losses(trainer)  # the probes did not change training


def test_an_optimizer_built_before_the_adapters_were_added_is_named_before_the_first_step(tmp_path):
    base = tiny.make_gpt2(VOCAB)
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-3)  # the base's tensors, frozen by get_peft_model
    trainer = Trainer(model=lora(base), args=training_args(tmp_path / "trainer"), train_dataset=Sequences(VOCAB),
                      optimizers=(optimizer, None))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    root = cause(load_run(tmp_path / "run")["summary"]["findings"], "no_gradients")
    assert root["model"] == "student" and "lora_" in root["tensor"] and root["first_step"] == 1
    assert root["evidence"]["trainable_tensors_in_optimizer"] == 0


def test_trls_sft_trainer_with_a_peft_config_over_an_fp16_base_is_recorded_as_it_computes(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from frameworks import tiny_tokenizer

    tokenizer, corpus = tiny_tokenizer(tmp_path)
    args = trl.SFTConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                         learning_rate=1e-3, bf16=False, max_length=32)
    trainer = trl.SFTTrainer(model=tiny.make_gpt2(len(tokenizer)).half(), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"text": corpus.read_text().splitlines()[:16]}),
                             peft_config=LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    SarkdDiagCallback.attach(trainer, tmp_path / "run")
    trainer.train()
    run = load_run(tmp_path / "run")
    assert run["summary"]["precision"]["mode"] == "mixed" and run["summary"]["precision"]["compute_dtype"] == "float16"
    assert _setup_notes(run)["tensor"].str.contains("lora_A").all() and len(_setup_notes(run)) == 1
    assert run["metrics"]["loss"].tolist() == pytest.approx(logged_losses(trainer), rel=1e-6)


@pytest.mark.parametrize("stored_dtype, stored_value, in_file", [(torch.float16, float("inf"), True),
                                                                  (torch.float32, 1e5, False)])
def test_an_inf_as_loaded_under_lora_is_read_back_from_the_checkpoint_under_its_saved_name(tmp_path, stored_dtype,
                                                                                          stored_value, in_file):
    """The base of a LoRA model, loaded in float16, holds +Inf in an adapted layer. The file knows that weight as
    `transformer.h.0.mlp.c_fc.weight`; the PEFT model names it `base_model.model.transformer.h.0.mlp.c_fc.base_layer
    .weight`. Before, the read-back found no such key and the event said the file "may be sound" either way; now a
    file holding the Inf is named corrupt, and one holding 1e5 in fp32 is named sound (float16's cast made it)."""
    from transformers import AutoModelForCausalLM

    saved = tiny.make_gpt2(VOCAB).to(stored_dtype)
    with torch.no_grad():
        saved.get_parameter("transformer.h.0.mlp.c_fc.weight")[0, 0] = stored_value
    saved.save_pretrained(tmp_path / "checkpoint")
    model = lora(AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", dtype=torch.float16))
    tensor = "base_model.model.transformer.h.0.mlp.c_fc.base_layer.weight"
    assert model.get_parameter(tensor)[0, 0] == float("inf")  # either way, +Inf as loaded
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.arange(16).reshape(2, 8)
    with Probes(model, optimizer=optimizer, run_dir=tmp_path / "run") as probes:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        probes.step(loss=loss)
    events = load_run(tmp_path / "run")["events"]
    (event,) = events[events["kind"] == "nonfinite_at_load"].itertuples()
    assert (event.tensor, event.code) == (tensor, "nonfinite_in_checkpoint" if in_file else "nonfinite_at_load")
    assert ("the file is sound" in event.message) is not in_file and "may be sound" not in event.message
    root = probes.diagnosis()[0]
    assert (root["cause"], root["tensor"]) == ("nonfinite_input", tensor)
    assert ("the checkpoint is corrupt" in root["fix"]) is in_file and ("65504" in root["fix"]) is not in_file


def test_a_healthy_lora_runs_zero_initialised_adapters_are_no_finding():
    """peft initialises each adapter's B to 0, so its output is exactly 0 until the first update moves it: every
    healthy LoRA run read a `zero_activation` at step 1. A zero the first update ends is how the adapter is built;
    only one still there at the next forward (a Dropout with p=1.0) is recorded."""
    model = lora(tiny.make_gpt2(VOCAB))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    with Probes(model, optimizer=optimizer) as probes:
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            probes.step(loss=loss)
    assert [e.kind for e in probes.events.events if e.kind == "zero_activation"] == []
    assert probes.diagnosis().ranked == []
