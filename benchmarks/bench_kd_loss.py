"""Chunked KD loss against a naive full-vocabulary one: peak memory, agreement and time.

    python benchmarks/bench_kd_loss.py [--batch 1 --length 512 --vocab 50257 --rounds 7]

Forward-KL at T=2, forward + backward, student logits requiring grad, teacher not. Each
variant's peak memory is measured in a fresh subprocess (Linux): the peak resident set is
reset after the inputs exist, so the figure is what the loss itself adds, its gradient
included. Times are A/B interleaved in one process; medians and ratios are printed.
Timing on a shared machine is noisy: the load average is printed with the figures.
Goals: peak memory <= 0.5x naive, time <= 1.2x naive, agreement within 1e-5 relative
(for bf16/fp16 logits, the gradient within one ulp of its dtype).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from sarkd_diag.contract.numerics import dtype_name
from sarkd_diag.train.losses import kd_loss_sum

TEMPERATURE = 2.0
MEMORY_GOAL, TIME_GOAL, AGREEMENT_GOAL = 0.5, 1.2, 1e-5


def naive_kd(student, teacher, _mask):
    """The obvious full-vocabulary version: both log-softmaxes in fp32, one KL (every position a target)."""
    log_s = F.log_softmax(student.float() / TEMPERATURE, dim=-1)
    log_t = F.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
    return TEMPERATURE**2 * F.kl_div(log_s, log_t, log_target=True, reduction="sum")


def chunked_kd(student, teacher, mask):
    return kd_loss_sum(student, teacher, mask, kind="forward-kl", temperature=TEMPERATURE)


VARIANTS = {"naive": naive_kd, "chunked": chunked_kd}


def make_inputs(batch, length, vocab, dtype):
    """Logits of LM-like spread, built in place so no temporary raises the baseline."""
    generator = torch.Generator().manual_seed(0)
    student = torch.empty(batch, length, vocab).normal_(generator=generator).mul_(3).to(dtype)
    teacher = torch.empty(batch, length, vocab).normal_(generator=generator).mul_(3).to(dtype)
    return student.requires_grad_(), teacher, torch.ones(batch, length, dtype=torch.bool)


def step(loss_fn, student, teacher, mask):
    student.grad = None
    loss = loss_fn(student, teacher, mask)
    loss.backward()
    return loss.detach()


def peak_rss_mb(variant, args):
    """Runs in the subprocess: the rise of the peak resident set over one forward + backward."""
    student, teacher, mask = make_inputs(args.batch, args.length, args.vocab, args.dtype)
    small = make_inputs(1, 2, args.vocab, args.dtype)
    step(VARIANTS[variant], *small)  # load kernels and thread pools before the baseline
    del small
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident set (Linux >= 4.0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(VARIANTS[variant], student, teacher, mask)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024


def measure_memory_in_subprocess(variant, args):
    command = [sys.executable, __file__, "--memory-of", variant, *shape_args(args)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["peak_mb"]


def shape_args(args):
    dtype = dtype_name(args.dtype)
    return [f"--batch={args.batch}", f"--length={args.length}", f"--vocab={args.vocab}", f"--dtype={dtype}"]


def agreement(student, teacher, mask):
    """Relative differences of the chunked loss and its gradient from the naive ones."""
    naive_value = step(naive_kd, student, teacher, mask)
    naive_grad = student.grad.float()
    chunked_value = step(chunked_kd, student, teacher, mask)
    chunked_grad = student.grad.float()
    value_diff = ((chunked_value - naive_value).abs() / naive_value.abs()).item()
    grad_diff = ((chunked_grad - naive_grad).abs().max() / naive_grad.abs().max()).item()
    return naive_value.item(), value_diff, grad_diff


def interleaved_times(student, teacher, mask, rounds):
    """Seconds of each forward + backward, A/B alternating (ABBA) so drift hits both alike."""
    times = {name: [] for name in VARIANTS}
    for name in VARIANTS:
        step(VARIANTS[name], student, teacher, mask)  # warm-up
    for round_index in range(rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            start = time.perf_counter()
            step(VARIANTS[name], student, teacher, mask)
            times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtype", type=lambda name: getattr(torch, name), default=torch.float32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_rss_mb(args.memory_of, args)}))
        return

    memory = {name: measure_memory_in_subprocess(name, args) for name in VARIANTS}
    inputs = make_inputs(args.batch, args.length, args.vocab, args.dtype)
    value, value_diff, grad_diff = agreement(*inputs)
    times = interleaved_times(*inputs, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}

    logits_mib = inputs[0].numel() * inputs[0].element_size() / 2**20
    print(
        f"kd_loss forward-kl, T={TEMPERATURE}, logits [{args.batch}, {args.length}, {args.vocab}] "
        f"{str(args.dtype).removeprefix('torch.')} ({logits_mib:.0f} MiB each), "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'variant':<10}{'peak MiB':>10}{'median s':>11}{'min s':>9}{'max s':>9}")
    for name in VARIANTS:
        print(f"{name:<10}{memory[name]:>10.1f}{medians[name]:>11.3f}{min(times[name]):>9.3f}{max(times[name]):>9.3f}")
    memory_ratio = memory["chunked"] / memory["naive"]
    time_ratio = medians["chunked"] / medians["naive"]
    # A bf16/fp16 gradient is rounded once to its dtype by both variants: one ulp may differ.
    grad_goal = max(AGREEMENT_GOAL, torch.finfo(args.dtype).eps)
    checks = [
        ("peak memory chunked/naive", memory_ratio, MEMORY_GOAL),
        ("time chunked/naive", time_ratio, TIME_GOAL),
        ("value relative difference", value_diff, AGREEMENT_GOAL),
        ("gradient max diff / max |grad|", grad_diff, grad_goal),
    ]
    print(f"loss value {value:.6g}")
    for label, figure, goal in checks:
        print(f"{label:<32}{figure:>10.3g}  (goal <= {goal:g}: {'ok' if figure <= goal else 'MISSED'})")


if __name__ == "__main__":
    main()
