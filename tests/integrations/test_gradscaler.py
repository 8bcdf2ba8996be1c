"""Probes in a plain loop with torch.autocast(fp16) and torch.amp.GradScaler on the CPU: one named module's
backward overflows fp16 on every step, the scaler skips every step and its scale falls below 1."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from sarkd_diag import Probes, load_run
from sarkd_diag.probes.scaler import MIN_WARMUP_SCALE

STEPS = 20  # 65536 halves below 1 after 17 skipped steps


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(embed=nn.Linear(16, 32), act=nn.ReLU(), wide=nn.Linear(32, 32),
                                      head=nn.Linear(32, 1)))
    with torch.no_grad():
        # `head` reads inputs of ~1e3 (a bias, so nothing upstream is amplified): only its weight gradient
        # goes beyond fp16's range, even unscaled
        model.wide.bias.fill_(1000.0)
    return model


def _loop(run_dir=None) -> tuple[list[float], list[float]]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS, 16, 16, generator=g), torch.randn(STEPS, 16, 1, generator=g)
    probes = Probes(model, optimizer=optimizer, scaler=scaler, run_dir=run_dir) if run_dir else None
    losses, scales = [], []
    for i in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x[i]).float(), y[i], reduction="sum")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if probes is not None:
            probes.step(loss=loss)
        optimizer.zero_grad()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    if probes is not None:
        probes.close()
    return losses, scales


def test_the_module_whose_backward_overflows_is_named_in_the_loss_scale_collapse(tmp_path):
    losses, scales = _loop(tmp_path / "run")
    assert scales[-1] < 1  # the setup does what it says: every step skipped
    run = load_run(tmp_path / "run")
    diagnosis = run["summary"]["diagnosis"]
    collapse = next(d for d in diagnosis if d["cause"] == "loss_scale_collapse")
    assert collapse["severity"] == "critical" and collapse["model"] == "student"
    assert collapse["module"] == "head"
    # it shows once the warm-up has halved the scale down to its floor (every step skipped), before it falls below 1
    assert collapse["first_step"] == 9 == 1 + next(i for i, s in enumerate(scales) if s <= MIN_WARMUP_SCALE)
    assert collapse["evidence"]["min_scale"] < 1
    grads = run["events"].query("kind == 'nonfinite_grad'")
    assert grads["module"].iloc[0] == "head" and int(grads["step"].min()) == 1
    assert run["summary"]["precision"]["mode"] == "mixed"  # fp32 weights, autocast fp16 and a scaler
    assert _loop() == (losses, scales)  # the probes did not change training


@pytest.mark.parametrize("scale", [1.0, 65536.0])
def test_head_is_the_only_module_whose_gradient_overflows(scale):
    # the premise of the test above, checked without probes: at the scaler's first scale and unscaled
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randn(16, 1, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y, reduction="sum")
    (loss * scale).backward()
    bad = {name.rpartition(".")[0] for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()}
    assert "head" in bad and (bad == {"head"} or scale > 1)


def _two_optimizers(run_dir, split: bool):
    """fp32 weights, a GradScaler, the head on an optimizer of its own (`split`) or in the same one."""
    model = _model()
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizers = [torch.optim.AdamW(rest, lr=1e-3), torch.optim.AdamW(head, lr=1e-3)] if split else [
        torch.optim.AdamW(model.parameters(), lr=1e-3)]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = torch.Generator().manual_seed(1)
    with Probes(model, optimizer=optimizers, scaler=scaler, run_dir=run_dir) as probes:
        for _ in range(3):
            loss = nn.functional.mse_loss(model(torch.randn(16, 16, generator=g)), torch.randn(16, 1, generator=g))
            scaler.scale(loss).backward()
            for optimizer in optimizers:
                scaler.step(optimizer)  # unscales that optimizer's gradients, then steps it
            scaler.update()
            probes.step(loss=loss)
            for optimizer in optimizers:
                optimizer.zero_grad()
    return load_run(run_dir)["metrics"]


def test_with_several_optimizers_gradients_are_read_once_all_are_unscaled(tmp_path):
    """`scaler.step(first)` unscales only the first optimizer's gradients: read then (at its unscale or its pre-step
    hook), the second's would still carry the loss scale (×1024 here). Read once every optimizer's are unscaled,
    they are what one optimizer over all the weights reads."""
    split, whole = _two_optimizers(tmp_path / "split", True), _two_optimizers(tmp_path / "whole", False)
    assert split["grad_amax"].tolist() == pytest.approx(whole["grad_amax"].tolist(), rel=1e-6)
    assert split["update_ratio"].tolist() == pytest.approx(whole["update_ratio"].tolist(), rel=1e-5)


def test_an_optimizer_that_does_not_step_leaves_its_still_scaled_gradients_unread(tmp_path):
    """Under a GradScaler the head's optimizer steps every third step on gradients it lets add up: between its
    steps `scaler.step` unscales only the body's, and the head's still carry the loss scale (×65536). A step's
    gradients are the ones its optimizers used, unscaled — not the head's scaled ones, ×65536 too large."""
    model = _model()
    body = torch.optim.AdamW([p for name, p in model.named_parameters() if not name.startswith("head")], lr=1e-3)
    head = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(1)
    used_amax = []  # the largest gradient each step's optimizers used, unscaled in place by scaler.step
    with Probes(model, optimizer=[body, head], scaler=scaler, run_dir=tmp_path / "run") as probes:
        for step in range(1, 7):
            loss = nn.functional.mse_loss(model(torch.randn(16, 16, generator=g)), torch.randn(16, 1, generator=g))
            scaler.scale(loss).backward()
            stepping = [body, head] if step % 3 == 0 else [body]
            for optimizer in stepping:
                scaler.step(optimizer)
            scaler.update()
            used_amax.append(max(p.grad.abs().max().item() for o in stepping for group in o.param_groups
                                 for p in group["params"]))
            probes.step(loss=loss)
            for optimizer in stepping:
                optimizer.zero_grad()
    metrics = load_run(tmp_path / "run")["metrics"]
    assert metrics["grad_amax"].tolist() == pytest.approx(used_amax, rel=1e-6)


def _loop_with_a_fault_at_step_4(fault: str, probed: bool) -> tuple[Probes | None, list[float]]:
    """A tiny GPT-2 in fp16 autocast with a GradScaler; from step 4 (no statistics step) on, `fault` — `module`: a
    forward hook scales one MLP's output by 1e6, beyond float16's range and well inside float32's; `loss`: a KL term
    takes the log of a probability that is exactly 0. The scaler skips those steps, the weights stay finite."""
    import tiny

    model = tiny.make_gpt2(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    step_now = [0]
    model.transformer.h[1].mlp.c_fc.register_forward_hook(
        lambda _m, _a, out: out * 1e6 if fault == "module" and step_now[0] >= 4 else out)
    probes = Probes(model, optimizer=optimizer, scaler=scaler) if probed else None
    losses = []
    for step in range(1, 7):
        step_now[0] = step
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if fault == "loss" and step >= 4:
            p = out.logits.float().softmax(-1)
            target = torch.zeros_like(p)
            target[..., 0] = 1.0  # a one-hot "teacher": log(0) where it is 0, 0 × -inf = NaN
            loss = loss + (target * (target.log() - p.log())).sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if probes is not None:
            probes.step(loss=loss)
        optimizer.zero_grad()
        losses.append(loss.item())
    if probes is not None:
        probes.close()
    return probes, losses


@pytest.mark.parametrize("fault", ["module", "loss"])
def test_a_fault_the_scaler_skips_between_statistics_steps_is_replayed_and_placed(fault):
    """Under a GradScaler the step is skipped and the weights stay those that made the loss: once the step closes with
    a non-finite loss, its forwards are replayed with statistics on. Before, a forward overflow and a loss-code NaN
    both read "most likely a forward overflow, unplaced"; now the module is named (float16's range: the float32
    replay of it is finite) or every output is finite and the loss's arithmetic is named. Training is unchanged."""
    probes, losses = _loop_with_a_fault_at_step_4(fault, probed=True)
    root = probes.diagnosis()[0]
    assert root["first_step"] == 4 and "unplaced" not in root["evidence"]
    if fault == "module":
        assert (root["cause"], root["module"]) == ("activation_overflow", "transformer.h.1.mlp.c_fc")
    else:
        assert (root["cause"], root["tensor"]) == ("divergence", "loss")
        assert root["evidence"]["module_outputs_finite"] is True
    _, unprobed = _loop_with_a_fault_at_step_4(fault, probed=False)
    assert str(losses) == str(unprobed)


@pytest.mark.parametrize(("optimizer", "steps_through", "root"), [
    ("sgd", "optimizer", ("scaler_bypassed", "critical")), ("adamw", "optimizer", ("scaler_bypassed", "warning")),
    ("sgd", "scaler", None), ("fused adamw", "scaler", None)])
def test_an_optimizer_stepped_past_the_scaler_is_named_not_the_lr(tmp_path, optimizer, steps_through, root):
    """A loop that scales its loss and then calls `optimizer.step()` itself, not `scaler.step(optimizer)`: the
    gradients stay × 65536. Under SGD the first update is 65536x too large and the run blows up — the root is the
    bypassed scaler, not an lr 'far too high'; under AdamW (which divides the scale away) a warning. Stepping through
    the scaler — also a fused optimizer, which the scaler hands the scale instead of unscaling — is said nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))  # gradients well within fp16's range
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=1e-2) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=1e-3, fused=optimizer.startswith("fused")))
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(1)
    with Probes(model, optimizer=opt, scaler=scaler) as probes:
        for _ in range(4):
            x = torch.randn(16, 16, generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            if steps_through == "scaler":
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    notes = [e for e in probes.events.events if e.code == "scaler_bypassed"]
    causes = probes.diagnosis()
    if root is None:
        assert notes == [] and "scaler_bypassed" not in {c["cause"] for c in causes.ranked}
        return
    (note,) = notes
    assert (note.step, note.value, note.model) == (1, 65536.0, "student")  # the model its optimizer steps
    first = causes.ranked[0]
    assert (first["cause"], first["severity"], first["first_step"], first["model"]) == (*root, 1, "student")
    assert "`scaler.step(optimizer)`" in first["fix"] and "65536" in first["fix"]
    # the blow-up is the bypassed scaler's: among the causes only as explained by it, with its fix
    assert all(c["evidence"].get("explained_by", "").startswith("scaler_bypassed@") and c["fix"] == first["fix"]
               for c in causes)
