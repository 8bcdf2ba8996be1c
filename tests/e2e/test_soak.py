"""Long runs stay healthy (`make soak`, not `make test`): the embedded default for 2,000 steps at probes
`standard` keeps its resident memory flat after warm-up, and its event log grows with events, not steps.

SARKD_SOAK_STEPS shortens the run (to try the test itself); the verdict is meant for the full 2,000.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest

from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.presentation.ui import TrainingDisplay
from sarkd_diag.train.loop import Trainer

STEPS = int(os.environ.get("SARKD_SOAK_STEPS", "2000"))
MAX_RSS_GROWTH = 0.05
WINDOW = 50  # steps averaged (median) at each end: allocator and garbage-collector noise


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(TrainingDisplay):
    """A quiet display that reads the process's resident set after every step."""

    def __init__(self):
        super().__init__(quiet=True)
        self.rss: dict[int, int] = {}

    def update(self, step, row):
        self.rss[step] = _rss_bytes()


@pytest.mark.soak
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_the_embedded_default_runs_2000_steps_without_leaking(tmp_path):
    sampler = RssSampler()
    cfg = DistillConfig(train_steps=STEPS, probes="standard", output_dir=str(tmp_path / "run")).validate()
    result = Trainer(cfg, sampler).train()
    assert result.status == "completed" and result.summary["steps_completed"] == STEPS

    warm = max(STEPS // 5, WINDOW)  # after warm-up: the allocator, caches and optimizer state have settled
    settled = statistics.median(sampler.rss[s] for s in range(warm, warm + WINDOW))
    final = statistics.median(sampler.rss[s] for s in range(STEPS - WINDOW + 1, STEPS + 1))
    growth = final / settled - 1
    assert growth < MAX_RSS_GROWTH, f"resident memory grew {growth:.1%} from step {warm} to {STEPS}"

    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    late = [e for e in events if e["step"] > STEPS // 2]
    assert len(late) <= max(10, STEPS // 200), f"{len(late)} events in the last {STEPS // 2} steps: {late[:5]}"
