"""Step time of `sarkd-diag train` at each probe level, against a minimal hand-written KD loop and against
transformers' DebugUnderflowOverflow on the same student — ratios measured in one process.

Variants alternate within each round (A B C D E, A B C D E, ...) so machine noise hits all of them
alike; each variant's figure is the median over rounds of its mean step time over steps 2..N (step 1
carries one-time work: the optimizer preflight, allocator warm-up). At `standard`, N > --probe-every
puts one statistics step into the mean, so its cost is amortised as in a real run.

    python benchmarks/bench_step.py                      # both pairs, fp32 and bf16-mixed, 5 rounds
    python benchmarks/bench_step.py --pairs tiny --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from pairs import PAIRS  # noqa: E402

from sarkd_diag import distill, load_run  # noqa: E402
from sarkd_diag.presentation.ui import TrainingDisplay  # noqa: E402
from sarkd_diag.train.models import resolve_model_source  # noqa: E402

SHAPES = {"tiny": (8, 64), "gpt2": (1, 128)}  # batch, block
TEMPERATURE, ALPHA_KD, ALPHA_CE, LR = 2.0, 0.5, 0.5, 1e-4


def trainer_step_time(teacher: str, student: str, precision: str, probes: str, steps: int, probe_every: int,
                      out: Path) -> float:
    batch, block = SHAPES[current_pair]
    result = distill(teacher_model=teacher, student_model=student, precision=precision, probes=probes,
                     probe_every=probe_every,
                     train_steps=steps, eval_steps=10**6, eval_max_batches=1, block_size=block,
                     per_device_batch_size=batch, student_lr=LR, output_dir=str(out), overwrite=True,
                     display=TrainingDisplay(quiet=True))
    train = load_run(result.run_dir)["metrics"].query("split == 'train'")
    seconds = (train["tokens"] / train["tokens_per_s"]).tolist()
    return statistics.fmean(seconds[1:])


def hand_written_step_time(teacher: str, student: str, precision: str, steps: int, debug: bool) -> float:
    """The same KD math in plain PyTorch: no probes, no logging, no guard, no chunking."""
    from transformers import AutoModelForCausalLM
    from transformers.debug_utils import DebugUnderflowOverflow

    batch, block = SHAPES[current_pair]
    half = precision == "bf16-mixed"
    torch.manual_seed(0)
    t_model = AutoModelForCausalLM.from_pretrained(resolve_model_source(teacher),
                                                   dtype=torch.bfloat16 if half else torch.float32).eval()
    s_model = AutoModelForCausalLM.from_pretrained(resolve_model_source(student), dtype=torch.float32).train()
    t_model.requires_grad_(False)
    routers = [p for n, p in t_model.named_parameters() if n.endswith("mlp.gate.weight")]  # SAR on the tiny MoE
    for p in routers:
        p.data = p.data.float()
        p.requires_grad_(True)
    if debug:
        DebugUnderflowOverflow(s_model)
    groups = [{"params": list(s_model.parameters())}] + ([{"params": routers}] if routers else [])
    opt = torch.optim.AdamW(groups, lr=LR)
    vocab = s_model.config.vocab_size
    times = []
    for _ in range(steps):
        ids = torch.randint(0, min(vocab, 512), (batch, block + 1))
        inputs, labels = ids[:, :-1], ids[:, 1:]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            with torch.set_grad_enabled(bool(routers)):
                t_logits = t_model(input_ids=inputs).logits
            s_logits = s_model(input_ids=inputs).logits
        n = labels.numel()
        log_s = F.log_softmax(s_logits.float() / TEMPERATURE, dim=-1)
        log_t = F.log_softmax(t_logits.float() / TEMPERATURE, dim=-1)
        kd = F.kl_div(log_s, log_t, log_target=True, reduction="sum") * TEMPERATURE**2 / n
        ce = F.cross_entropy(s_logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="sum") / n
        loss = ALPHA_KD * kd + ALPHA_CE * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


def main() -> None:
    global current_pair
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="tiny,gpt2")
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--probe-every", type=int, default=10,
                        help="statistics steps at `standard`; below --steps the mean includes their cost")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a second thread mostly waits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds, "
          f"{args.steps} steps a run (mean over steps 2..{args.steps}), probe-every {args.probe_every}, "
          "medians over rounds")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for current_pair in args.pairs.split(","):
            teacher, student = PAIRS[current_pair]()
            for precision in args.precisions.split(","):
                models = (teacher, student, precision)
                variants = {
                    "hand-written": partial(hand_written_step_time, *models, args.steps, False),
                    "hand-written + DebugUnderflowOverflow": partial(hand_written_step_time, *models, args.steps, True),
                    **{f"train --probes {level}":
                       partial(trainer_step_time, *models, level, args.steps, args.probe_every, Path(tmp) / level)
                       for level in ("off", "standard", "full")},
                }
                samples = {name: [] for name in variants}
                for _ in range(args.rounds):
                    for name, run in variants.items():
                        samples[name].append(run())
                med = {name: statistics.median(v) for name, v in samples.items()}
                hand, off = med["hand-written"], med["train --probes off"]
                rows.append((current_pair, precision, med, {
                    "standard / off": med["train --probes standard"] / off,
                    "full / off": med["train --probes full"] / off,
                    "DebugUnderflowOverflow / hand-written": med["hand-written + DebugUnderflowOverflow"] / hand,
                    "train (off) / hand-written": off / hand,
                }))
                print(f"\n{current_pair} pair (batch × block {SHAPES[current_pair]}), {precision}")
                for name, value in med.items():
                    print(f"  {name:40s} {value * 1000:9.1f} ms/step")
                for name, ratio in rows[-1][3].items():
                    print(f"  {name:40s} {ratio:9.3f}x")


if __name__ == "__main__":
    main()
