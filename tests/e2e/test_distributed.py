"""Distributed KD under torchrun: 2 CPU processes with gloo against one process with the same global batch.

Each torchrun test launches `python -m torch.distributed.run` on a free port with OMP_NUM_THREADS=1; the
single-process reference runs in this process through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sarkd_diag.contract.events import events_file_name
from sarkd_diag.train import distributed as dist
from sarkd_diag.train.data import BatchStream, TokenBlocks

REPO = Path(__file__).resolve().parents[2]
INJECT = '''"""torchrun entry for a test: rank {rank} alone fails at step {step} ({fault}); then the real CLI."""
import sys

import torch

from sarkd_diag.cli import main
from sarkd_diag.train import loop

original_init = loop.Trainer.__init__


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    unscale = self.precision.unscale_gradients

    def poisoned_unscale(optimizer):
        if self.world.rank == {rank} and self.step == {step}:
            if "{fault}" == "error":
                raise RuntimeError("injected")
            with torch.no_grad():
                next(self.student.parameters()).grad.fill_(float("inf"))
        return unscale(optimizer)

    self.precision.unscale_gradients = poisoned_unscale


loop.Trainer.__init__ = init
main(sys.argv[1:])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, entry: list[str] | None = None, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *(entry or ["-m", "sarkd_diag"]), "train",
            *map(str, args)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(*args: str, entry: list[str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, entry=entry), env=env(), capture_output=True, text=True,
                          timeout=timeout)


def base_args(world: dict, out: Path, *, teacher: str = "dense_teacher", steps: int = 4,
              precision: str = "fp32", device: str = "cpu") -> list[str]:
    return ["--teacher-model", world[teacher], "--student-model", world["student"], "--train-file", world["train"],
            "--validation-file", world["valid"], "--block-size", "32", "--train-steps", str(steps),
            "--eval-steps", "2", "--student-lr", "3e-3", "--precision", precision, "--output-dir", out,
            "--device", device]


# gloo on the CPU everywhere; NCCL where two CUDA GPUs are present (each rank trains on cuda:LOCAL_RANK)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL across ranks needs two CUDA GPUs")])]
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def train_rows(run: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return pd.DataFrame([r for r in rows if r["split"] == "train"]).set_index("step")


def ranked_events(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / events_file_name(rank, 2)).read_text().splitlines()]


# ------------------------------------------------------------------------------------- single process
def test_a_single_process_world_is_a_no_op():
    world = dist.World()
    a, b = torch.tensor(1.5), torch.tensor(2.0)
    assert world.all_sum(a, b) == (a, b)
    assert world.any_flag(torch.tensor(True)) and not world.any_host_flag(False)
    assert world.gather(3) == [3] and world.broadcast("x") == "x"
    model = torch.nn.Linear(2, 2)
    assert world.wrap(model, torch.device("cpu")) is model
    assert torch.equal(world.shard(torch.arange(4)), torch.arange(4))


def test_rank_shards_partition_each_global_batch():
    blocks = TokenBlocks(torch.arange(40 * 9).reshape(40, 9))
    whole = BatchStream(blocks, 4, seed=3)
    shards = [BatchStream(blocks, 2, seed=3, ranks=2, shard=dist.World(rank=r, size=2).shard) for r in range(2)]
    for _ in range(25):  # across an epoch boundary
        full = whole.next()
        parts = [s.next() for s in shards]
        rows = torch.cat([p["input_ids"] for p in parts])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full["input_ids"].tolist()))
        assert all(p["global_targets"] == full["n_targets"] for p in parts)
        assert sum(p["n_targets"] for p in parts) == full["n_targets"]


def test_nproc_is_removed_from_the_launched_command():
    command = dist.launch_command(2, ["--nproc", "2", "--train-steps", "3", "--nproc=2", "--seed", "1"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[-6:] == ["sarkd_diag", "train", "--train-steps", "3", "--seed", "1"]


# ------------------------------------------------------------------------------------------- torchrun
# the MoE teacher's routers train too; with load-balance and entropy terms off the router loss is the anchor
# alone, which does not depend on how the batch is split, so routers must match a single process exactly. A
# router lr and anchor weight this large move the routers by ~1e-2 and make the anchor's gradient count, so a
# router update or anchor that went wrong (sharded: its sum over the ranks' shards) shows far above 1e-5
SETUPS = {"dense": ("dense_teacher", "student", []),
          "routers": ("teacher", "student", ["--router-load-balance-weight", "0", "--router-entropy-weight", "0",
                                             "--router-lr", "3e-3", "--router-anchor-weight", "10"]),
          "dual-tokenizer": ("teacher", "dual_student", [])}
# how the two ranks hold the teacher: a whole copy each (DDP), or sharded with FSDP2 (--shard-teacher)
HOLDINGS = {"whole": [], "sharded": ["--shard-teacher"]}


def assert_same_run(reference: Path, run: Path) -> None:
    """The same losses step by step, the same saved student and router update, within 1e-5 (fp32)."""
    single, ranks = train_rows(reference), train_rows(run)
    assert list(ranks.index) == list(single.index)
    entropies = [c for c in single.columns if c.startswith("expert_entropy_layer")]  # the router's readings
    assert entropies == [c for c in ranks.columns if c.startswith("expert_entropy_layer")]
    for column in ("loss", "kd_loss", "ce_loss", "grad_norm", *entropies):
        assert (ranks[column] - single[column]).abs().max() < 1e-5, column
    assert (ranks["tokens"] == single["tokens"]).all()  # all ranks' tokens
    a, b = (load_file(str(r / "student" / "model.safetensors")) for r in (reference, run))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    assert (reference / "router_update.pt").is_file() == (run / "router_update.pt").is_file()
    if (reference / "router_update.pt").is_file():
        routers_one, routers_two = (torch.load(r / "router_update.pt", weights_only=True) for r in (reference, run))
        assert routers_one.keys() == routers_two.keys() and routers_one
        for key in routers_one:
            torch.testing.assert_close(routers_two[key], routers_one[key], atol=1e-5, rtol=1e-5)
        config = json.loads((reference / "config.json").read_text())
        teacher = dict(AutoModelForCausalLM.from_pretrained(config["options"]["teacher_model"]).named_parameters())
        moved = max((routers_one[k] - teacher[k].detach().float()).abs().max().item() for k in routers_one)
        assert moved > 1e-3, moved  # the routers trained: matching within 1e-5 says something


@pytest.fixture(scope="module")
def single_process(tiny_world, tmp_path_factory, cli):
    """single_process(setup, device): the run directory of one process training SETUPS[setup] with the global
    batch (4) through the real CLI. Trained once per (setup, device) and only read afterwards: every two-rank
    run of that setup, resumed or not, is compared with the same reference."""
    runs = {}

    def reference(setup: str, device: str = "cpu") -> Path:
        if (setup, device) not in runs:
            teacher, student, extra = SETUPS[setup]
            world = {k: str(v) for k, v in tiny_world.items()}
            world["student"] = world[student]
            out = tmp_path_factory.mktemp(f"one-{setup}-{device}") / "one"
            code, _, err = cli("train", *base_args(world, out, teacher=teacher, device=device), *extra,
                               "--per-device-batch-size", "4")
            assert code == 0, err
            runs[(setup, device)] = out
        return runs[(setup, device)]

    return reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", [
    # slow: a dense teacher's run is the routers' without the routers' terms, each two-rank run 33 s of the suite
    pytest.param("dense", marks=pytest.mark.slow), "routers", "dual-tokenizer"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_world, tmp_path, single_process, setup, device):
    """One process, two ranks each holding the whole teacher (DDP), two ranks sharding it (FSDP2): the same run."""
    teacher, student, extra = SETUPS[setup]
    world = {k: str(v) for k, v in tiny_world.items()}
    world["student"] = world[student]
    one = single_process(setup, device)
    args = {"teacher": teacher, "device": device}
    for holding, flags in HOLDINGS.items():
        two = tmp_path / holding
        run = subprocess.run([sys.executable, "-m", "sarkd_diag", "train", *base_args(world, two, **args), *extra,
                              *flags, "--per-device-batch-size", "2", "--nproc", "2"], env=env(), capture_output=True,
                             text=True, timeout=120)  # `train --nproc 2` launches torchrun itself
        assert run.returncode == 0, run.stderr[-3000:]

        assert list(train_rows(two).index) == [1, 2, 3, 4]
        assert_same_run(one, two)
        assert (two / "router_update.pt").is_file() == (setup == "routers")
        assert not (two / "events.jsonl").exists()
        for rank in (0, 1):  # every rank records its own setup
            kinds = {e["kind"] for e in ranked_events(two, rank)}
            assert "precision_setup" in kinds
            assert {e["rank"] for e in ranked_events(two, rank)} == {rank}
        merged = pd.read_parquet(two / "events.parquet")
        assert set(merged["rank"]) == {0, 1}
        config = json.loads((two / "config.json").read_text())
        assert config["distributed"] == {"ranks": 2, "backend": BACKENDS[device], "teacher": holding}
        assert config["options"]["nproc"] == 2
        assert json.loads((two / "summary.json").read_text())["status"] == "completed"
    assert_same_run(tmp_path / "whole", tmp_path / "sharded")  # and the two ways of holding the teacher directly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("precision", "policy", "holding"), [
    # slow: mixed-stop-whole — the loss scaler's all-reduced skip is mixed-stop-sharded's, a whole teacher fp32-stop's
    ("fp32", "stop", "whole"), pytest.param("mixed", "stop", "whole", marks=pytest.mark.slow),
    # slow: a whole teacher's ranks agreeing on rank 1's overflow is fp32-stop-whole's, the skip policy acting on
    # both ranks fp32-skip-sharded's (the same all-reduced flag, then the pre-step copy of DTensors too)
    pytest.param("fp32", "skip", "whole", marks=pytest.mark.slow),
    ("fp32", "skip", "sharded"), ("mixed", "stop", "sharded"),  # the routers' DTensors: pre-step copy, loss scaler
])
def test_an_overflow_on_rank_1_makes_both_ranks_act_on_that_step(tiny_world, tmp_path, precision, policy, holding,
                                                                 device):
    world = {k: str(v) for k, v in tiny_world.items()}
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(rank=1, step=3, fault="overflow"))
    out = tmp_path / "run"
    run = torchrun(*base_args(world, out, teacher="teacher", steps=5, precision=precision, device=device),
                   *HOLDINGS[holding], "--per-device-batch-size", "2", "--eval-steps", "10", "--on-nonfinite", policy,
                   entry=[str(script)])
    scaled = precision == "mixed"  # the loss scaler skips the step itself, on both ranks: its flag is all-reduced
    assert run.returncode == (1 if policy == "stop" and not scaled else 0), run.stderr[-3000:]
    action = "scaler_skip" if scaled else f"policy_{policy}"
    for rank in (0, 1):
        acted = [e["step"] for e in ranked_events(out, rank) if e["kind"] == action]
        assert acted == [3], (rank, acted)
    summary = json.loads((out / "summary.json").read_text())
    if scaled:
        assert summary["status"] == "completed" and summary["final"]["skipped_steps"] == 1
    elif policy == "stop":
        assert summary["status"] == "stopped" and summary["steps_completed"] == 3
        top = summary["diagnosis"][0]
        assert top["rank"] == 1 and top["first_step"] == 3, top
        bad = [e for e in ranked_events(out, 0) if e["kind"].startswith("nonfinite")]
        assert bad == []  # rank 0's own gradients and weights stayed finite: it stopped on rank 1's word
    else:
        assert summary["status"] == "completed" and summary["final"]["skipped_steps"] == 1


@pytest.mark.parametrize(("setup", "holding"), [
    # slow: the ranks' checkpoint and resume are the same code for a whole teacher; routers-sharded adds the DTensors
    pytest.param("dense", "whole", marks=pytest.mark.slow), ("routers", "sharded")])
def test_checkpoint_and_resume_under_torchrun(tiny_world, tmp_path, single_process, setup, holding):
    teacher, _, extra = SETUPS[setup]
    world = {k: str(v) for k, v in tiny_world.items()}
    resumed = tmp_path / "resumed"
    args = [*extra, *HOLDINGS[holding], "--per-device-batch-size", "2", "--save-steps", "2"]
    straight = single_process(setup)  # one process, the global batch, 4 steps: the reference for the resumed ranks
    first = torchrun(*base_args(world, resumed, teacher=teacher, steps=2), *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (resumed / "checkpoints" / "step-00000002").is_dir()
    again = torchrun(*base_args(world, resumed, teacher=teacher, steps=4), *args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(train_rows(resumed).index) == [1, 2, 3, 4]
    assert_same_run(straight, resumed)  # the routers too, where they train
    for rank in (0, 1):
        assert sum(e["kind"] == "precision_setup" for e in ranked_events(resumed, rank)) == 1
        assert any("resumed from" in e["message"] for e in ranked_events(resumed, rank))


@pytest.mark.parametrize(("launcher", "holding"), [
    # slow: `sarkd-diag --nproc` sends torchrun this same SIGTERM (sarkd-diag --nproc-whole): the ranks see the
    # same signal forwarded by torchrun; here only torchrun's own exit code (1) differs
    pytest.param("torchrun", "whole", marks=pytest.mark.slow),
    # slow: the launcher forwards the signal whatever the ranks hold; sharded adds saving a sharded teacher's state
    pytest.param("sarkd-diag --nproc", "whole", marks=pytest.mark.slow), ("sarkd-diag --nproc", "sharded")])
def test_sigterm_to_torchrun_saves_state(tiny_world, tmp_path, launcher, holding):
    world = {k: str(v) for k, v in tiny_world.items()}
    out = tmp_path / "run"
    args = [*base_args(world, out, steps=500), *HOLDINGS[holding], "--per-device-batch-size", "2",
            "--eval-steps", "1000"]
    if launcher == "torchrun":
        command = torchrun_command(*args)
    else:  # the launcher forwards the signal to torchrun and exits 143 as a single process would
        command = [sys.executable, "-m", "sarkd_diag", "train", *map(str, args), "--nproc", "2"]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"train"') >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted", err[-3000:]
    assert proc.returncode == (143 if launcher != "torchrun" else 1)  # torchrun: 1 when a rank exits non-zero
    steps = summary["steps_completed"]
    assert (out / "checkpoints" / f"step-{steps:08d}").is_dir()
    for rank in (0, 1):
        stops = [e["step"] for e in ranked_events(out, rank) if e["kind"] == "interrupted"]
        assert stops == [steps], (rank, stops)  # both ranks stopped after the same step


def test_nproc_without_torchrun_is_refused_by_the_api(tiny_world, tmp_path):
    from sarkd_diag import distill
    from sarkd_diag.contract.errors import BadInput

    world = {k: str(v) for k, v in tiny_world.items()}
    with pytest.raises(BadInput, match="torchrun"):
        distill(teacher_model=world["teacher"], student_model=world["student"], train_file=world["train"],
                nproc=2, output_dir=str(tmp_path / "run"))


def test_an_error_on_one_rank_ends_the_run_instead_of_hanging(tiny_world, tmp_path):
    world = {k: str(v) for k, v in tiny_world.items()}
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(rank=1, step=2, fault="error"))
    out = tmp_path / "run"
    started = time.time()
    run = torchrun(*base_args(world, out, steps=50), "--per-device-batch-size", "2", "--eval-steps", "100",
                   entry=[str(script)], timeout=90)
    assert run.returncode != 0
    assert time.time() - started < 80
    assert "RuntimeError: injected" in (out / "traceback.rank1.txt").read_text()  # each rank its own
    assert not (out / "traceback.txt").exists()


# ------------------------------------------------------------------------------------ the sharded teacher
INJECT_TEACHER = '''"""torchrun entry: on rank {rank} alone the teacher's {module} is ×{factor} at step {step}."""
import sys

from sarkd_diag.cli import main
from sarkd_diag.train import loop

original_init = loop.Trainer.__init__


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if self.world.rank == {rank}:
        self.teacher.get_submodule("{module}").register_forward_hook(
            lambda module, inputs, output: output * {factor} if self.step == {step} else None)


loop.Trainer.__init__ = init
main(sys.argv[1:])
'''


TEACHER_MODULE = "model.layers.1.self_attn.o_proj"  # what INJECT_TEACHER scales on rank 1


def run_with_rank_1s_teacher_scaled(tiny_world, tmp_path, *args: str, step: int, factor: str, train_steps: int,
                                    precision: str = "fp32", timeout: int = 120):
    """Two ranks of `train` (the run directory and the torchrun process) where rank 1 alone multiplies its
    teacher's TEACHER_MODULE output by `factor` at `step`."""
    world = {k: str(v) for k, v in tiny_world.items()}
    script = tmp_path / "inject.py"
    script.write_text(INJECT_TEACHER.format(rank=1, module=TEACHER_MODULE, step=step, factor=factor))
    out = tmp_path / "run"
    run = torchrun(*base_args(world, out, teacher="teacher", steps=train_steps, precision=precision), *args,
                   "--per-device-batch-size", "2", entry=[str(script)], timeout=timeout)
    return out, run


def test_a_teacher_overflow_on_one_rank_of_a_sharded_teacher_names_that_rank(tiny_world, tmp_path):
    out, run = run_with_rank_1s_teacher_scaled(tiny_world, tmp_path, "--shard-teacher", step=1,
                                               factor='float("inf")', train_steps=3)
    assert run.returncode == 1, run.stderr[-3000:]  # a critical cause; --on-nonfinite stop
    top = json.loads((out / "summary.json").read_text())["diagnosis"][0]
    assert (top["cause"], top["rank"], top["module"], top["first_step"]) == ("teacher_overflow", 1, TEACHER_MODULE,
                                                                             1), top
    teacher_bad = [e for e in ranked_events(out, 0) if e["kind"] == "nonfinite_activation" and e["model"] == "teacher"]
    assert teacher_bad == []  # rank 0's teacher forward stayed finite: the gathered weights are the same


# slow: whole — each rank replays its own copy; sharded, kept, replays through the teacher's collectives
@pytest.mark.parametrize("holding", [pytest.param("whole", marks=pytest.mark.slow), "sharded"])
def test_a_loss_that_turns_nonfinite_on_one_rank_between_statistics_steps_is_replayed_by_every_rank(
        tiny_world, tmp_path, holding):
    """Step 3 (no module statistics at `standard`) of rank 1 alone: its teacher overflows, the loss is NaN, the
    loss scaler skips the step on both ranks. The replay that names the module runs the teacher's forward —
    sharded, a collective — so every rank replays, and the module is named with rank 1."""
    out, run = run_with_rank_1s_teacher_scaled(tiny_world, tmp_path, *HOLDINGS[holding], "--eval-steps", "10",
                                               step=3, factor='float("inf")', train_steps=4, precision="mixed",
                                               timeout=240)
    assert run.returncode == 1, run.stderr[-3000:]  # a critical cause, the run completed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_completed"] == 4
    top = summary["diagnosis"][0]
    assert (top["cause"], top["rank"], top["module"], top["first_step"]) == ("teacher_overflow", 1, TEACHER_MODULE,
                                                                             3), top


def test_the_headroom_map_under_torchrun_is_the_largest_output_over_every_ranks_batch(tiny_world, tmp_path):
    """Rank 1's batch alone drives a sharded teacher's module beyond fp16 (×1e9, finite in fp32): rank 1 warns
    of it, and rank 0's activations.jsonl and act_amax_teacher — gathered once per statistics step — show it."""
    out, run = run_with_rank_1s_teacher_scaled(tiny_world, tmp_path, "--shard-teacher", step=1, factor="1e9",
                                               train_steps=2)
    assert run.returncode == 0, run.stderr[-3000:]
    risks = {rank: [e["module"] for e in ranked_events(out, rank) if e["kind"] == "fp16_overflow_risk"]
             for rank in (0, 1)}
    assert risks[0] == [] and risks[1][0] == TEACHER_MODULE  # rank 0's own batch stayed within fp16 everywhere
    rows = [json.loads(line) for line in (out / "activations.jsonl").read_text().splitlines()]
    (mapped,) = [r["amax"] for r in rows if (r["step"], r["model"], r["module"]) == (1, "teacher", TEACHER_MODULE)]
    upstream = [r["amax"] for r in rows if r["step"] == 1 and r["module"].startswith("model.layers.0.")]
    assert mapped > 65504 > max(upstream)
    assert train_rows(out).loc[1, "act_amax_teacher"] == pytest.approx(mapped)


ROUTER_GRADIENTS = '''"""torchrun entry for a test: a sharded teacher's routers after setup and one backward."""
import json
import sys

import torch
from torch.distributed.tensor import DTensor, Shard

from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.train import distributed as dist
from sarkd_diag.train.loop import build_run

run = build_run(DistillConfig(**json.loads(sys.argv[1])).validate())
routers = [p for p in run.models.teacher.parameters() if p.requires_grad]
in_forward = []  # what a router module holds while the teacher runs it: the router terms' hooks read the same
for router in run.models.routers:
    run.models.teacher.get_submodule(router.name).register_forward_hook(
        lambda module, args, output: in_forward.append([type(module.weight).__name__, list(module.weight.shape)]))
batch = {k: v.to(run.compute.device) if torch.is_tensor(v) else v for k, v in run.data.batches.next().items()}
parts = run.objective(batch)
(parts.objective / batch["global_targets"] + parts.router_loss).backward()
before = [p.grad.to_local().clone() for p in routers]
run.compute.world.average_gradients(run.optimization.outside_ddp)
figures = {
    "routers": len(routers),
    "sharded": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in routers),
    "local_rows": [p.to_local().shape[0] for p in routers], "rows": [p.shape[0] for p in routers],
    "in_forward": in_forward,
    "grads_sharded": all(isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),) for p in routers),
    "grads_nonzero": all(bool(g.abs().sum() > 0) for g in before),
    "untouched_by_average": all(torch.equal(p.grad.to_local(), g) for p, g in zip(routers, before)),
    "optimized": {id(p) for p in routers} <= {id(q) for g in run.optimization.optimizer.param_groups
                                               for q in g["params"]},
}
with open(f"{sys.argv[2]}/rank{run.compute.world.rank}.json", "w") as out:  # the ranks print at once: a file each
    json.dump(figures, out)
run.objective.close()
dist.teardown(run.compute.world)
'''


def test_a_sharded_teachers_routers_are_dtensors_whose_gradients_fsdp_reduces(tiny_world, tmp_path):
    """Routers train sharded: DTensor parameters split by rows over the ranks, gathered whole (a plain parameter)
    while their layer runs, where the router terms read them; their gradients DTensor shards (FSDP's
    reduce-scatter), which `average_gradients` — the DDP path's averaging — leaves alone."""
    world = {k: str(v) for k, v in tiny_world.items()}
    script = tmp_path / "routers.py"
    script.write_text(ROUTER_GRADIENTS)
    options = {"teacher_model": world["teacher"], "student_model": world["student"], "train_file": world["train"],
               "validation_file": world["valid"], "block_size": 32, "per_device_batch_size": 2,
               "precision": "fp32", "device": "cpu", "shard_teacher": True, "output_dir": str(tmp_path / "run")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(script), json.dumps(options), str(tmp_path)]
    run = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for r in ranks:
        assert r["routers"] == 2 and r["sharded"] and r["grads_sharded"] and r["grads_nonzero"], r
        assert r["untouched_by_average"] and r["optimized"], r
        assert r["rows"] == [4, 4] and r["local_rows"] == [2, 2], r  # 4 experts: two rows on each rank
        assert r["in_forward"] == [["Parameter", [4, 32]]] * 2, r  # gathered whole in the layer's forward


@pytest.mark.parametrize(("extra", "message"), [
    ([], "--shard-teacher shards the teacher over several ranks"),  # one process
    (["--nproc", "2", "--offload-teacher-to-cpu"], "--shard-teacher and --offload-teacher-to-cpu"),
])
def test_a_sharded_teacher_it_cannot_serve_is_refused(tiny_args, cli, extra, message):
    code, _, err = cli("train", *tiny_args, "--shard-teacher", *extra)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_each_rank_holds_its_shard_of_the_teacher_and_one_layer_gathered(tiny_world):
    """Measured from the DTensor local shards on two gloo ranks: the shards partition the teacher, routers
    included, each rank holds half of it plus the head, kept whole, and the most gathered at once is what
    estimate-memory computes (the embeddings and one decoder layer, its router too)."""
    from sarkd_diag.train.memory import shape_from_config, sharded_teacher_params

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(REPO / "benchmarks" / "fsdp_memory.py"),
               "--teacher", str(tiny_world["teacher"])]
    run = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["rank"] for r in ranks] == [0, 1]
    full, whole = ranks[0]["full_bytes"], ranks[0]["whole_bytes"]
    shards = [r["held_bytes"] - r["whole_bytes"] for r in ranks]
    assert sum(shards) == full - whole  # the ranks' shards partition the sharded part exactly
    assert all(abs(s - (full - whole) / 2) <= 0.02 * full for s in shards), shards  # rows split in halves
    shape = shape_from_config(str(tiny_world["teacher"]))
    assert all(r["whole_bytes"] == 4 * shape.vocab * shape.hidden for r in ranks)  # the head alone: routers shard
    held, gathered = sharded_teacher_params(shape, 2)
    assert sum(r["held_bytes"] for r in ranks) / 2 == 4 * held  # fp32: the estimate's
    assert all(r["gathered_peak_bytes"] == 4 * gathered for r in ranks)
