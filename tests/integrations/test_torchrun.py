"""Probes in a user's own loop under torchrun: 2 CPU processes (gloo), a DDP-wrapped tiny GPT-2, one run
directory. Each rank records its own events file; rank 0 alone writes config, metrics and summary, and
`sarkd-diag report` / `load_run` read the result as one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.test_distributed import env, free_port

from sarkd_diag import load_run

TESTS = Path(__file__).resolve().parents[1]
STEPS = 4
SCRIPT = f'''
import contextlib
import gc
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, {str(TESTS)!r})
import tiny

from sarkd_diag import Probes

dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.parallel.DistributedDataParallel(tiny.make_gpt2(64, seed=0))
# weight decay of 1e-45: lr x weight_decay is 0 in fp32 -- a preflight warning that every rank records
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-45)
ids = torch.randint(1, 64, ({STEPS}, 4, 12), generator=torch.Generator().manual_seed(rank))
losses = []
watched = sys.argv[2] == "probes"
with Probes(model, optimizer, run_dir=sys.argv[1]) if watched else contextlib.nullcontext() as probes:
    for batch in ids:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        if watched:
            probes.step()
        optimizer.zero_grad()
        losses.append(loss.item())
with open(sys.argv[1] + f".losses.rank{{rank}}", "w") as f:
    f.write(repr(losses))
# leave the group as train's teardown does: DDP's reducer collected first, or a gloo thread may outlive it
dist.barrier()
del model, optimizer, probes
gc.collect()
dist.destroy_process_group()
'''


def _torchrun(script: Path, run_dir: Path, watched: bool = True) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(run_dir), "probes" if watched else "plain"]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_each_rank_writes_its_own_events_and_rank_0_the_rest(tmp_path, cli):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    _torchrun(script, run_dir)

    for rank in (0, 1):
        rows = [json.loads(line) for line in (run_dir / f"events.rank{rank}.jsonl").read_text().splitlines()]
        assert {row["rank"] for row in rows} == {rank}
        assert [row["code"] for row in rows] == ["weight_decay_zero"]
    assert not (run_dir / "events.jsonl").exists()
    run = load_run(run_dir)
    assert run["metrics"]["step"].tolist() == list(range(1, STEPS + 1))  # one row per step, not one per rank
    ranks = [eval((tmp_path / f"run.losses.rank{rank}").read_text()) for rank in (0, 1)]  # noqa: S307 - its lists
    assert run["metrics"]["loss"].tolist() == pytest.approx([(a + b) / 2 for a, b in zip(*ranks, strict=True)])
    assert run["summary"]["status"] == "completed" and run["summary"]["steps_completed"] == STEPS
    assert sorted(run["events"]["rank"]) == [0, 1]

    (run_dir / "summary.json").unlink()
    code, out, err = cli("report", run_dir)
    assert code == 0, err
    assert load_run(run_dir)["summary"]["steps_completed"] == STEPS

    _torchrun(script, tmp_path / "plain", watched=False)
    for rank in (0, 1):  # the probes did not change training
        assert (tmp_path / f"plain.losses.rank{rank}").read_text() == (tmp_path / f"run.losses.rank{rank}").read_text()
