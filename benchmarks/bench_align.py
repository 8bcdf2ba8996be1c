"""Span alignment: vectorized `align_teacher_to_student` vs the per-token loop it replaces.

Batch 4 × 512 student tokens, 600 teacher tokens, H=768, fp32, on the CPU. Interleaved A/B rounds;
prints medians and their ratio (goal: ≥ 20×). One intra-op thread by default: the loop is
single-threaded Python, and on a 2-core box whose other core is busy, two OpenMP threads make every
small op 10-50× slower (each parallel region waits for the descheduled thread).

    python benchmarks/bench_align.py [--rounds 7] [--threads 1]

The spans here are in text order, as real tokenizers give them, so `align_teacher_to_student` takes
its binary-search path (two searchsorted calls, then one embedding_bag). An earlier version compared
every student token with every teacher token ([B, Ls, Lt] matrices, nonzero(), a sparse matmul:
~10 ms here, 10.8×) and, as glibc handed its freed multi-MB blocks back to the OS, page-faulted
~3000 pages a call, about half its time; the current one page-faults almost never once warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sarkd_diag.train.align import align_teacher_to_student

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))
from test_align import reference_align  # noqa: E402  the tests' per-token loop: one reference for both


def partition(text_len: int, n_tokens: int, g: torch.Generator) -> torch.Tensor:
    cuts = torch.randperm(text_len - 1, generator=g)[: n_tokens - 1].add(1).sort().values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([text_len])])
    return torch.stack([bounds[:-1], bounds[1:]], -1)


def make_inputs(batch=4, ls=512, lt=600, hidden=768, text_len=2400):
    g = torch.Generator().manual_seed(0)
    t_off = torch.stack([partition(text_len, lt, g) for _ in range(batch)])
    s_off = torch.stack([partition(text_len, ls, g) for _ in range(batch)])
    t_off[:, 0] = 0  # a BOS-like special token
    return (
        torch.randn(batch, lt, hidden, generator=g),
        t_off,
        torch.ones(batch, lt, dtype=torch.bool),
        s_off,
        torch.ones(batch, ls, dtype=torch.bool),
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--vectorized-reps", type=int, default=5, help="vectorized runs per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = make_inputs()
    got, want = align_teacher_to_student(*inputs), reference_align(*inputs)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5)

    vectorized, reference, ratios = [], [], []
    for _ in range(args.rounds):  # interleaved: one round = A then B, so drift hits both alike
        round_a = [timed(align_teacher_to_student, *inputs) for _ in range(args.vectorized_reps)]
        reference.append(timed(reference_align, *inputs))
        vectorized += round_a
        ratios.append(reference[-1] / statistics.median(round_a))
    a, b = statistics.median(vectorized), statistics.median(reference)
    print(f"threads={torch.get_num_threads()} batch=4 Ls=512 Lt=600 H=768 rounds={args.rounds}")
    print(f"vectorized median {a * 1e3:8.2f} ms  (n={len(vectorized)})")
    print(f"per-token  median {b * 1e3:8.2f} ms  (n={len(reference)})")
    print(
        f"speed-up {b / a:.1f}x (ratio of medians); per-round ratios median {statistics.median(ratios):.1f}x, "
        f"range {min(ratios):.1f}-{max(ratios):.1f}x"
    )


if __name__ == "__main__":
    main()
