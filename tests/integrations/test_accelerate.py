"""Probes.from_accelerator in an accelerate loop under bf16 autocast (Accelerator(mixed_precision="bf16") on
the CPU): a clean run, one with gradient accumulation, and a module whose output is beyond fp16's range
(finite in bf16) warned by name."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")

import tiny  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from contract import nothing_found  # noqa: E402
from frameworks import Sequences, cause, overflow_fp16  # noqa: E402

from sarkd_diag import Probes, load_run  # noqa: E402

VOCAB, STEPS = 64, 4


def _loop(run_dir=None, break_module=False, accumulation=1, probes_first=False, infinite_grad=False,
          eval_mode=False, make_optimizer=None, clip=None, norms=None, nan_grad_at=None, plain_probes=False,
          mixed_precision="bf16", stepping="accumulate", clip_every_batch=False, **call) -> list[float]:
    """The loss of every batch; under `accumulation` > 1 the loop is accelerate's `accumulate` idiom, which
    calls `optimizer.step()` (a no-op until the gradients sync) and `probes.step()` on every batch. `call`: more
    arguments of the model's forward; `probes_first`: `probes.step()` before `optimizer.step()` (the wrong order);
    `infinite_grad`: one weight's gradient made +Inf (a backward that blows up in any precision); `eval_mode`:
    trained in eval mode (no dropout), as some do; `make_optimizer`: the optimizer of the model's parameters
    (AdamW at lr 1e-3 by default); `clip`: `accelerator.clip_grad_norm_(..., clip)` where the gradients sync (on every
    batch with `clip_every_batch`), the norms of the syncing batches appended to `norms`; `nan_grad_at`: one weight's
    gradient made NaN on that optimizer step; `plain_probes`: `Probes(model, optimizer)` of the prepared pair instead
    of `Probes.from_accelerator`; `mixed_precision`: the Accelerator's; `stepping`: "accumulate" (accelerate's
    idiom), "every batch" (no `accumulate` context: the optimizer steps on every batch) or "by hand" (no `accumulate`
    context: the loop calls `optimizer.step()` and `probes.step()` on every `accumulation`-th batch itself)."""
    AcceleratorState._reset_state(True)  # one process, several Accelerators one after another
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = tiny.make_gpt2(VOCAB)
    if break_module:
        overflow_fp16(model.transformer.h[1])
    if infinite_grad:
        model.transformer.h[1].mlp.c_proj.weight.register_hook(lambda g: g * math.inf)
    steps = [1]
    if nan_grad_at is not None:
        model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * math.nan if steps[0] == nan_grad_at else g)
    optimizer = (make_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3)))(model.parameters())
    loader = torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_mode:
        model.eval()
    probes = None if not run_dir else Probes(model, optimizer, run_dir=run_dir) if plain_probes else \
        Probes.from_accelerator(accelerator, model, optimizer, run_dir=run_dir)
    losses = []
    for index, batch in zip(range(STEPS * accumulation), loader, strict=False):
        ends_step = stepping != "by hand" or (index + 1) % accumulation == 0
        with accelerator.accumulate(model) if stepping == "accumulate" else contextlib.nullcontext():
            outputs = model(**batch, **call)
            loss = outputs[0] if isinstance(outputs, tuple) else outputs.loss
            accelerator.backward(loss)
            if clip is not None and (accelerator.sync_gradients or clip_every_batch):
                norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                if norms is not None and accelerator.sync_gradients:
                    norms.append(norm.item())
            if probes is not None and probes_first:
                probes.step()
            if ends_step:
                optimizer.step()
            if probes is not None and not probes_first and ends_step:
                probes.step()  # the loss of the step: read from the model's outputs
            if ends_step:
                optimizer.zero_grad()
            steps[0] += accelerator.sync_gradients
        losses.append(loss.item())
    if probes is not None:
        probes.close()
    return losses


def test_a_clean_bf16_accelerate_loop_records_nothing(tmp_path):
    losses = _loop(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert nothing_found(run["summary"]) and run["summary"]["steps_completed"] == STEPS
    assert run["summary"]["precision"]["mode"] == "bf16-mixed"  # from the autocast state, not the fp32 weights
    metrics = run["metrics"]
    assert metrics["step"].tolist() == [1, 2, 3, 4]
    assert metrics["loss"].tolist() == pytest.approx(losses, rel=1e-6)
    assert _loop() == losses  # the probes did not change training


def test_a_module_beyond_fp16s_range_is_warned_by_name(tmp_path):
    losses = _loop(tmp_path / "run", break_module=True)
    diagnosis = load_run(tmp_path / "run")["summary"]["diagnosis"]
    found = cause(diagnosis, "activation_overflow")
    assert (found["severity"], found["model"], found["module"], found["first_step"]) == (
        "warning", "student", "transformer.h.1.mlp.c_proj", 1)
    assert "critical" not in {d["severity"] for d in diagnosis}  # finite in bf16: a warning about fp16, no more
    assert 'mixed_precision="bf16"' not in found["fix"] and "fp16 compute" in found["fix"]  # bf16 is in use
    assert all(torch.isfinite(torch.tensor(losses)))
    assert _loop(break_module=True) == losses


@pytest.mark.parametrize("plain_probes", [False, True])
def test_under_gradient_accumulation_a_step_is_an_optimizer_step(tmp_path, plain_probes):
    """`probes.step()` on every batch of `accelerator.accumulate`: one row per optimizer step, numbered as such,
    whose loss is the mean of its micro-batches' and whose update is the step's — also for `Probes` handed the
    prepared optimizer rather than built by `from_accelerator` (it was a row per batch, half of them without an
    update)."""
    losses = _loop(tmp_path / "run", accumulation=2, plain_probes=plain_probes)
    run = load_run(tmp_path / "run")
    metrics = run["metrics"]
    assert "micro_batches_summed" not in set(run["events"]["code"])  # accelerator.backward divides each loss
    assert metrics["step"].tolist() == [1, 2, 3, 4]
    means = [sum(losses[i:i + 2]) / 2 for i in range(0, len(losses), 2)]
    assert metrics["loss"].tolist() == pytest.approx(means, rel=1e-6)
    assert metrics["update_ratio"].notna().all()  # every row saw its optimizer step
    assert _loop(accumulation=2) == losses


@pytest.mark.parametrize("plain_probes", [False, True])
@pytest.mark.parametrize(("stepping", "noted"), [("every batch", True), ("accumulate", False), ("by hand", False)])
def test_an_accelerator_accumulating_over_batches_the_loop_does_not_accumulate_is_noted(tmp_path, stepping, noted,
                                                                                         plain_probes):
    """`Accelerator(gradient_accumulation_steps=4)` divides each loss `accelerator.backward` is given by 4; a loop
    that never enters `accelerator.accumulate(model)` has the optimizer step on every batch, each update from a quarter
    of the batch's gradient — said once, at step 1. Not for accelerate's idiom, nor for a loop that steps on every 4th
    batch itself (its 4 quarters make the mean). Read off the prepared optimizer, so also for a `Probes(model,
    optimizer)` handed it rather than built by `from_accelerator` (it said nothing)."""
    losses = _loop(tmp_path / "run", accumulation=4, stepping=stepping, plain_probes=plain_probes)
    events = load_run(tmp_path / "run")["events"]
    notes = events[events["code"] == "accumulation_unmatched"]
    if not noted:
        assert notes.empty
        return
    (note,) = notes.itertuples()
    assert (note.step, note.severity, note.value) == (1, "warning", 4.0)
    assert "after 1 batch," in note.message and "`with accelerator.accumulate(model):`" in note.message
    found = cause(load_run(tmp_path / "run")["summary"]["findings"], "accumulation_unmatched")
    assert (found["severity"], found["first_step"]) == ("warning", 1)
    assert "gradient_accumulation_steps=4" in found["fix"] and "accelerator.accumulate(model)" in found["fix"]
    assert _loop(accumulation=4, stepping=stepping) == losses


def test_a_model_called_with_return_dict_false_has_its_loss_recorded(tmp_path):
    """`return_dict=False`: the outputs are a tuple, the loss first (the model was given labels)."""
    losses = _loop(tmp_path / "run", return_dict=False)
    assert load_run(tmp_path / "run")["metrics"]["loss"].tolist() == pytest.approx(losses, rel=1e-6)
    assert _loop(return_dict=False) == losses


def _order_notes(run) -> list[str]:
    return run["events"].query("code == 'step_order'")["message"].tolist()


def test_probes_step_before_optimizer_step_is_noted(tmp_path):
    """Called in the wrong order, every row's update statistics would be the previous step's: a note says why."""
    losses = _loop(tmp_path / "wrong", probes_first=True)
    notes = _order_notes(load_run(tmp_path / "wrong"))
    assert len(notes) == 1 and "probes.step() is called before optimizer.step()" in notes[0]
    assert _loop() == losses
    for right in ("train_mode", "eval_mode"):  # in eval mode no forward counts as training: not a sign alone
        _loop(tmp_path / right, eval_mode=right == "eval_mode")
        assert _order_notes(load_run(tmp_path / right)) == []


def test_an_infinite_gradient_in_a_bf16_run_advises_no_precision_switch(tmp_path):
    """bf16 has fp32's range, and nothing measured comes near it: the gradient made infinite in backward is an
    infinite derivative, not an overflow — neither bf16 (in use) nor fp16 (narrower) nor a loss scaler fixes it."""
    losses = _loop(tmp_path / "run", infinite_grad=True)
    found = cause(load_run(tmp_path / "run")["summary"]["diagnosis"], "divergence")
    assert "mixed_precision" not in found["fix"], found["fix"]
    assert "derivative" in found["fix"] and found["module"] == "transformer.h.1.mlp.c_proj"
    np.testing.assert_array_equal(_loop(infinite_grad=True), losses)  # NaN where the weights turned NaN


def test_adafactor_with_its_own_relative_step_trains_and_records_no_lr(tmp_path):
    """transformers' `Adafactor(params)` (relative step: lr=None in its groups) picks its lr per tensor: the lr column
    is not known (null). Reading it as a number raised TypeError inside the optimizer's pre-step hook, killing the
    run."""
    from transformers.optimization import Adafactor

    losses = _loop(tmp_path / "run", make_optimizer=Adafactor)
    run = load_run(tmp_path / "run")
    assert run["summary"]["status"] == "completed" and nothing_found(run["summary"])
    assert run["metrics"]["lr"].isna().all() and run["metrics"]["update_ratio"].notna().all()
    assert run["metrics"]["loss"].tolist() == pytest.approx(losses, rel=1e-6)
    assert _loop(make_optimizer=Adafactor) == losses


def test_fp16_that_the_accelerator_runs_without_autocast_on_the_cpu_is_recorded_and_diagnosed_as_fp32(tmp_path):
    """accelerate runs `mixed_precision="fp16"` on the CPU with neither autocast nor a loss scaler (`native_amp` off):
    the run computes in fp32. Recorded as `mixed`, it was diagnosed as fp16 compute — an infinite derivative in it read
    as an fp16 overflow, to be fixed by a precision switch."""
    losses = _loop(tmp_path / "run", infinite_grad=True, mixed_precision="fp16")
    summary = load_run(tmp_path / "run")["summary"]
    precision = summary["precision"]
    assert (precision["mode"], precision["compute_dtype"], precision["loss_scaling"]) == ("fp32", None, False)
    assert precision["requested"] == "Accelerator(mixed_precision='fp16')" and "without autocast" in precision["reason"]
    found = cause(summary["diagnosis"], "divergence")
    assert "derivative" in found["fix"] and "mixed_precision" not in found["fix"], found["fix"]
    np.testing.assert_array_equal(_loop(infinite_grad=True, mixed_precision="fp16"), losses)


@pytest.mark.parametrize("clip_every_batch", [False, True])
def test_gradients_are_read_before_accelerate_clips_them(tmp_path, clip_every_batch):
    """`accelerator.clip_grad_norm_` under `accumulate`: a NaN in one tensor's gradient makes the total norm NaN, and
    clipping by it turns every gradient NaN before the optimizer's pre-step hook. Read when accelerate unscales them
    for the clip, the gradients still say where the NaN came from; the norm clip_grad_norm_ returned is `grad_norm`.
    A loop that clips on every batch, not only where the gradients sync, spreads the NaN at the step's first batch:
    read there too, the gradients still name the tensor (they named the output end, `lm_head`)."""
    norms = []
    _loop(tmp_path / "run", accumulation=2, clip=1.0, norms=norms, nan_grad_at=3, clip_every_batch=clip_every_batch)
    run = load_run(tmp_path / "run")
    found = cause(run["summary"]["diagnosis"], "divergence")  # fp32, small values: an undefined derivative
    assert (found["module"], found["tensor"], found["first_step"]) == (
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_fc.weight", 3)
    metrics = run["metrics"]
    assert metrics["nonfinite_grad_tensors"].tolist()[:3] == [0, 0, 1]  # one tensor, not all of them
    assert metrics["grad_norm"].tolist()[:2] == pytest.approx(norms[:2], rel=1e-6)  # one per optimizer step
    assert math.isnan(metrics["grad_norm"].iloc[2])


def _two_optimizers(run_dir, split: bool, optimizers_given: str = "both", nan_grad_at=None) -> list[float]:
    """transformer.h.1 trained by an optimizer of its own (`split`), or the same settings as a second parameter
    group of one optimizer; `optimizers_given`: "both" (a list) or "first" to the probes."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = tiny.make_gpt2(VOCAB)
    own = [p for n, p in model.named_parameters() if n.startswith("transformer.h.1.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformer.h.1.")]
    if split:
        optimizers = [torch.optim.AdamW(rest, lr=1e-3), torch.optim.AdamW(own, lr=3e-3)]
    else:
        optimizers = [torch.optim.AdamW([{"params": rest}, {"params": own, "lr": 3e-3}], lr=1e-3)]
    steps = [1]
    if nan_grad_at is not None:
        model.transformer.h[1].mlp.c_fc.weight.register_hook(lambda g: g * math.nan if steps[0] == nan_grad_at else g)
    loader = torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4, shuffle=False)
    model, loader, *optimizers = accelerator.prepare(model, loader, *optimizers)
    given = optimizers if optimizers_given == "both" else optimizers[0]
    losses = []
    with Probes.from_accelerator(accelerator, model, given, run_dir=run_dir) as probes:
        for _, batch in zip(range(STEPS), loader, strict=False):
            loss = model(**batch).loss
            accelerator.backward(loss)
            for optimizer in optimizers:
                optimizer.step()
            probes.step()
            for optimizer in optimizers:
                optimizer.zero_grad()
            losses.append(loss.item())
            steps[0] += 1
    return losses


def test_several_optimizers_are_watched_as_one(tmp_path):
    """A layer with an optimizer of its own: given both, the probes read it as they read the same settings in a
    parameter group — the same update ratio every step (the post-step reading waits for the last optimizer) — and a
    NaN gradient there is named. Given only the first, its tensors are unwatched: a setup note says so."""
    split = _two_optimizers(tmp_path / "split", split=True)
    grouped = _two_optimizers(tmp_path / "grouped", split=False)
    assert split == grouped  # the same training
    ratios = [load_run(tmp_path / name)["metrics"]["update_ratio"].tolist() for name in ("split", "grouped")]
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-5)
    assert nothing_found(load_run(tmp_path / "split")["summary"])

    _two_optimizers(tmp_path / "nan", split=True, nan_grad_at=2)
    found = cause(load_run(tmp_path / "nan")["summary"]["diagnosis"], "divergence")  # fp32: no overflow
    assert (found["tensor"], found["first_step"]) == ("transformer.h.1.mlp.c_fc.weight", 2)

    _two_optimizers(tmp_path / "first", split=True, optimizers_given="first")
    notes = load_run(tmp_path / "first")["events"].query("code == 'unwatched_params'")
    assert len(notes) == 1 and notes.iloc[0]["tensor"].startswith("transformer.h.1.")


def _resumable(run_dir, checkpoint, steps, save_at=None, resume_from=None) -> list[float]:
    """An accelerate loop that saves its state (`accelerator.save_state`) after optimizer step `save_at`, or starts
    from the one saved (`load_state`) as step `resume_from`, skipping the batches that checkpoint has trained; the
    loss of each step it trains."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = tiny.make_gpt2(VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if resume_from is not None:
        accelerator.load_state(checkpoint)
        loader = accelerator.skip_first_batches(loader, resume_from)
    probes = Probes.from_accelerator(accelerator, model, optimizer, run_dir=run_dir, resumed_from=resume_from)
    losses = []
    for step, batch in zip(range((resume_from or 0) + 1, steps + 1), loader, strict=False):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        probes.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == save_at:
            accelerator.save_state(checkpoint)
    probes.close("interrupted" if resume_from is None else "completed")
    return losses


def test_a_loop_resumed_with_load_state_records_each_redone_step_once(tmp_path):
    """Saved at step 4, the loop goes on to 6 and dies; resumed from the saved state with `resumed_from=4` it redoes 5
    and 6: the run directory holds each step once, the resumed run's losses at 5 to 8."""
    first = _resumable(tmp_path / "run", tmp_path / "state", steps=6, save_at=4)
    resumed = _resumable(tmp_path / "run", tmp_path / "state", steps=8, resume_from=4)
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["step"].tolist() == list(range(1, 9))
    assert metrics["loss"].tolist() == pytest.approx(first[:4] + resumed, rel=1e-6)
    assert resumed[:2] == pytest.approx(first[4:], rel=1e-6)  # the same steps redone from the saved state


def _with_projection(run_dir, by_role: bool, nan_grad_at: int | None = None, accumulation: int = 1) -> list[float]:
    """Hidden-state KD as people write it in accelerate: a projection of the student's last hidden states onto the
    teacher's width, trained by the student's optimizer and clipped with it, the two accumulated together
    (`accelerator.accumulate(model, projection)`) over `accumulation` batches a step, three steps in all;
    `nan_grad_at`: its weight's gradient NaN at that optimizer step; no `run_dir`: no probes. Returns every batch's
    loss."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model, projection = tiny.make_gpt2(VOCAB), torch.nn.Linear(32, 48)
    teacher = tiny.make_gpt2(VOCAB, seed=3, n_embd=48).eval().requires_grad_(False)
    steps = [1]
    projection.weight.register_hook(lambda g: g * math.nan if steps[0] == nan_grad_at else g)
    trained = list(model.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    loader = torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4, shuffle=False)
    model, projection, optimizer, loader = accelerator.prepare(model, projection, optimizer, loader)
    models = {"student": model, "projection": projection} if by_role else model
    losses = []
    probes = Probes.from_accelerator(accelerator, models, optimizer, teacher=teacher, run_dir=run_dir) if run_dir \
        else None
    with probes or contextlib.nullcontext():
        for batch in itertools.islice(loader, 3 * accumulation):
            with accelerator.accumulate(model, projection):
                out = model(**batch, output_hidden_states=True)
                with torch.no_grad():
                    target = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
                loss = out.loss + torch.nn.functional.mse_loss(projection(out.hidden_states[-1]).float(), target)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, 1.0)
                optimizer.step()
                if probes is not None:
                    probes.step(loss=loss)
                optimizer.zero_grad()
                steps[0] += accelerator.sync_gradients
            losses.append(loss.item())
    return losses


def test_a_projection_the_optimizer_trains_beside_the_student_is_watched_when_given_and_said_when_not(tmp_path):
    """The optimizer trains a projection that is no model given to `from_accelerator`: its gradients were not read, so
    its NaN gradient — made every gradient NaN by the clipping — read as the student's weights gone NaN from finite
    gradients, the optimizer blamed at the embeddings. Left out, a note says so before the first step; given by role
    (`{'student': model, 'projection': projection}`), the NaN is named where it was made."""
    _with_projection(tmp_path / "left_out", by_role=False)
    notes = load_run(tmp_path / "left_out")["events"].query("code == 'optimizer_tensors_unwatched'")
    assert notes[["step", "severity", "numel"]].values.tolist() == [[1, "warning", 2]]
    message = notes.iloc[0]["message"]
    assert "48×32, 48" in message and "Probes.from_accelerator(accelerator, {'student': model" in message

    _with_projection(tmp_path / "given", by_role=True, nan_grad_at=1)
    run = load_run(tmp_path / "given")
    assert run["events"].query("code == 'optimizer_tensors_unwatched'").empty
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["tensor"], root["first_step"]) == (
        "divergence", "projection", "weight", 1)


def test_a_nan_from_a_projection_accumulated_with_the_student_is_named_once_and_not_as_bad_data(tmp_path):
    """`accelerator.accumulate(model, projection)` over two batches a step: the projection's gradient NaN at optimizer
    step 2 makes every weight NaN, so at step 3 the student's hidden states that the projection reads hold NaN. That
    input was computed by the student (it has a `grad_fn`): no bad data — the one cause is the projection's gradient.
    Step 2's forwards, replayed before the update on its non-finite gradients (its loss was finite), are said to be.
    The rows are optimizer steps, and the probes change no loss."""
    losses = _with_projection(tmp_path / "run", by_role=True, nan_grad_at=2, accumulation=2)
    run = load_run(tmp_path / "run")
    assert run["metrics"]["step"].tolist() == [1, 2, 3]
    assert run["events"].query("kind == 'nonfinite_batch'").empty
    replayed = run["events"].query("kind == 'forward_replay'")
    assert replayed[["step", "model"]].values.tolist() == [[2, "student"], [2, "teacher"]]
    assert replayed["message"].str.contains("after non-finite gradients").all()
    assert [(d["cause"], d["model"], d["tensor"], d["first_step"]) for d in run["summary"]["diagnosis"]] == [
        ("divergence", "projection", "weight", 2)]
    assert np.array_equal(losses, _with_projection(None, by_role=True, nan_grad_at=2, accumulation=2), equal_nan=True)


@pytest.mark.parametrize("handed", [False, True])
def test_a_distillation_loop_handing_no_loss_is_told_the_rows_hold_the_students_own(tmp_path, handed):
    """`Probes.from_accelerator(..., teacher=teacher)` and `probes.step()` without `loss=`: the rows hold the student's
    `outputs.loss`, not the KD objective the loop's backward runs — a teacher's Inf at step 2 makes that objective NaN
    while the rows stay finite. Said once, at step 1; a loop that hands the loss over records it, told nothing."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, teacher = tiny.make_gpt2(VOCAB), tiny.make_gpt2(VOCAB, seed=3).requires_grad_(False)
    data = Sequences(VOCAB)
    data.ids[5, 3] = 0  # in the second batch
    tiny.infinite_on_token(teacher, teacher.transformer.h[1].mlp.c_fc, token=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    objectives = []
    with Probes.from_accelerator(accelerator, model, optimizer, teacher=teacher, run_dir=tmp_path / "run") as probes:
        for batch in itertools.islice(loader, 2):
            outputs = model(**batch)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits
            loss = outputs.loss + torch.nn.functional.kl_div(outputs.logits.log_softmax(-1),
                                                             teacher_logits.log_softmax(-1), log_target=True,
                                                             reduction="batchmean")
            accelerator.backward(loss)
            optimizer.step()
            probes.step(loss=loss) if handed else probes.step()
            optimizer.zero_grad()
            objectives.append(loss.item())
    run = load_run(tmp_path / "run")
    assert math.isfinite(objectives[0]) and math.isnan(objectives[1])
    recorded = run["metrics"]["loss"].tolist()
    notes = run["events"].query("code == 'loss_without_teacher'")
    if handed:
        assert recorded[0] == pytest.approx(objectives[0]) and math.isnan(recorded[1]) and notes.empty
    else:
        assert all(map(math.isfinite, recorded)) and notes["step"].tolist() == [1]
    root = run["summary"]["diagnosis"][0]
    assert (root["cause"], root["model"], root["module"], root["first_step"]) == (
        "teacher_overflow", "teacher", "transformer.h.1.mlp.c_fc", 2), root


@pytest.mark.parametrize("handed", ["the model's loss on sync", "a number on sync", "every batch",
                                    "two forwards' mean"])
def test_a_loss_handed_only_where_the_gradients_sync_is_no_micro_batchs_loss_recorded_silently(tmp_path, handed):
    """A loop under `accelerator.accumulate` that calls `probes.step(loss=loss)` only `if accelerator.sync_gradients`
    (where loops log) recorded the last micro-batch's loss as the step's, saying nothing. Handed the model's own loss,
    the row holds the mean of the losses the model returned in the step (said once, info); handed anything else (a
    number), the row holds it and a warning names the fix. A loop that hands each micro-batch's loss is told nothing,
    nor one without accumulation that hands one loss over two forwards of its batch (R-Drop's two dropout passes)."""
    accumulation = 1 if handed == "two forwards' mean" else 4
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = tiny.make_gpt2(VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Sequences(VOCAB), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    with Probes.from_accelerator(accelerator, model, optimizer, run_dir=tmp_path / "run") as probes:
        for batch in itertools.islice(loader, 2 * accumulation):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if handed == "two forwards' mean":
                    loss = (loss + model(**batch).loss) / 2
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                if handed == "every batch":
                    probes.step(loss=loss)
                elif handed == "two forwards' mean" or accelerator.sync_gradients:
                    probes.step(loss=loss.item() if handed == "a number on sync" else loss)
    run = load_run(tmp_path / "run")
    recorded = run["metrics"]["loss"].tolist()
    notes = run["events"].query("code == 'loss_handed_once'")
    means = [sum(losses[i:i + accumulation]) / accumulation for i in range(0, len(losses), accumulation)]
    if handed == "a number on sync":
        assert recorded == pytest.approx(losses[accumulation - 1::accumulation], rel=1e-6)
        (note,) = notes.itertuples()
        assert (note.step, note.severity, note.value) == (1, "warning", 4.0)
        assert "one micro-batch's, unless the loop combined them" in note.message
        assert ("call probes.step(loss=loss) after every micro-batch's backward, inside `accelerator.accumulate`; "
                "its row's loss is then the step's mean") in note.message
        return
    assert recorded == pytest.approx(means, rel=1e-6)
    if handed == "the model's loss on sync":
        (note,) = notes.itertuples()
        assert (note.step, note.severity) == (1, "info") and "the row holds the mean of the losses" in note.message
    else:
        assert notes.empty
