"""Probes on a model wrapped by `torch.compile` (backend "eager": dynamo's tracing, which is what the hooks meet,
without a C++ compiler's minutes): the hooks run as they are instead of being traced into the compiled graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils
from contract import nothing_found
from torch import nn

from sarkd_diag import Probes, load_run

EVERY = 3  # statistics steps 1, 3, 6, 9: per-module hooks come and go between them


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


def _loop(run_dir=None, steps=9, inf_weight_at=None, warmed_up=False, fullgraph=False, frozen=False):
    """Losses of a compiled MLP's training, and the graphs dynamo had compiled after each step. `warmed_up`: the
    compiled model ran a forward and backward before the probes were made (its gradients then cleared); `fullgraph`:
    compiled with fullgraph=True, where a graph break raises; `frozen`: `mid`'s weight, which `inf_weight_at` sets to
    Inf, is not trained (only a replay of the step's forward names it)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = MLP()
    model.mid.weight.requires_grad_(not frozen)
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if warmed_up:
        compiled(torch.zeros(8, 16)).square().mean().backward()
        optimizer.zero_grad()
    probes = Probes(compiled, optimizer=optimizer, run_dir=run_dir, every=EVERY) if run_dir else None
    losses, graphs = [], []
    data = torch.randn(steps, 8, 16, generator=torch.Generator().manual_seed(0))
    for step, x in enumerate(data, start=1):
        if step == inf_weight_at:
            with torch.no_grad():
                model.mid.weight[0, 0] = float("inf")
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        if probes is not None:
            probes.step(loss=loss)
        optimizer.zero_grad()
        losses.append(loss.item())
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    if probes is not None:
        probes.close()
    return losses, graphs


def test_statistics_steps_do_not_recompile_a_compiled_model(tmp_path):
    """Traced, the hooks' bookkeeping became guards: every statistics step recompiled each module's hook (a tiny
    GPT-2's first step took 19 s instead of 2.5 s, up to dynamo's recompile limit). Run eagerly, the model compiles
    once with the per-module hooks and once without, then never again."""
    losses, graphs = _loop(tmp_path / "run")
    assert graphs[EVERY - 1] == graphs[-1], graphs  # after the first steps with and without statistics: nothing new
    run = load_run(tmp_path / "run")
    assert nothing_found(run["summary"]) and run["summary"]["steps_completed"] == 9
    assert run["metrics"]["act_amax_student"].notna().sum() == 4  # the statistics steps read every module
    assert run["metrics"]["loss"].tolist() == losses
    assert _loop()[0] == losses  # the probes changed nothing the compiled model computes


@pytest.mark.parametrize("warmed_up", [False, True])
def test_a_fault_in_a_compiled_model_is_named_at_its_module_and_step(tmp_path, warmed_up):
    """Also when the model was compiled before the probes existed: code compiled without hooks never calls hooks added
    later, and the probes read no module at all — so dynamo's caches are reset once, said in a note."""
    _loop(tmp_path / "run", inf_weight_at=6, warmed_up=warmed_up)
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", "mid", 6)
    assert run["metrics"]["act_amax_student"].notna().any()
    notes = run["events"].query("code == 'compiled_before_probes'")
    assert len(notes) == warmed_up


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_compiled_as_one_graph_trains_unchanged_and_a_fault_is_still_named(tmp_path, frozen):
    """`torch.compile(model, fullgraph=True)` makes a graph break an error, and every probe hook run eagerly is one: the
    first forward raised dynamo's Unsupported. The hooks go on the compiled wrapper, outside the graph: training runs
    as without the probes, in one graph; a trained weight written between steps is named at its module and step, and a
    frozen one by the replay of the step, which runs the model eagerly; that statistics steps read no module is said."""
    losses, graphs = _loop(tmp_path / "run", inf_weight_at=6, fullgraph=True, frozen=frozen)
    assert graphs[-1] == graphs[0]  # one graph, never a break nor a recompile
    run = load_run(tmp_path / "run")
    root = run["summary"]["diagnosis"][0]
    assert (root["model"], root["module"], root["first_step"]) == ("student", "mid", 6), root
    if frozen:
        (placed,) = run["events"].query("kind == 'nonfinite_activation' and step == 6")["message"]
        assert "replayed" in placed
    assert run["metrics"]["loss"].tolist()[:5] == losses[:5]
    assert "act_amax_student" not in run["metrics"] or run["metrics"]["act_amax_student"].isna().all()
    assert run["events"].query("code == 'compiled_fullgraph'")["step"].tolist() == [1]
    assert _loop(inf_weight_at=6, fullgraph=True, frozen=frozen)[0][:5] == losses[:5]


class OtherMLP(nn.Module):
    """A model never compiled that shares only the leaf class `nn.Linear` with the compiled MLP."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 4)

    def forward(self, x):
        return self.proj(x)


def test_another_model_compiled_in_the_process_is_no_reason_to_reset(tmp_path):
    """A compiled model's graph breaks leave compiled entries on leaf classes' code (`nn.Linear.forward`) that every
    later model shares: they are no sign that this model was compiled, and it gets no note (CI read one on a T5 run
    that followed this file's tests in the same worker)."""
    _loop(tmp_path / "compiled", steps=3)
    assert torch._C._dynamo.eval_frame._debug_get_cache_entry_list(nn.Linear.forward.__code__)
    model = OtherMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probes(model, optimizer=optimizer, run_dir=tmp_path / "run") as probes:
        loss = model(torch.ones(2, 16)).square().mean()
        loss.backward()
        optimizer.step()
        probes.step(loss=loss)
    assert load_run(tmp_path / "run")["events"].query("code == 'compiled_before_probes'").empty


def test_a_model_never_compiled_whose_class_was_is_not_said_to_be_compiled(tmp_path):
    """Dynamo keeps compiled code per class (`MLP.forward`), not per model: after a compiled MLP trained (a notebook's
    earlier run), a fresh MLP that is never compiled still gets the reset — a compiled call of it could run that code —
    but the note says what was compiled, and for which model it may be, not that this model was compiled."""
    _loop(steps=2)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probes(model, optimizer=optimizer, run_dir=tmp_path / "run") as probes:
        loss = model(torch.ones(2, 16)).square().mean()
        loss.backward()
        optimizer.step()
        probes.step(loss=loss)
    (note,) = load_run(tmp_path / "run")["events"].query("code == 'compiled_before_probes'")["message"]
    assert "compiled MLP.forward" in note and "another of its class" in note, note
