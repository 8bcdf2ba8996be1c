"""Time spent inside the probes at `standard`, as a fraction of a transformers Trainer step on the tiny models.

A wall-clock A/B of ~10-50 ms steps on a shared 2-core machine is mostly noise, so the probes' own time is
measured directly: every hook the probes register (forward hooks, optimizer step pre/post hooks, tensor
hooks) is wrapped with a timer at registration, and so are the callback's Trainer events, `Probes.step` and
what runs inside the framework methods the probes wrap (the gradients' reading at accelerate's unscale, the
clipped norm, the non-finite loss check after `training_step`) and what listens to torch's loss functions
(`F.cross_entropy`, `F.kl_div`); nested timers are not double counted. Each
figure is a fraction of the same run's step time; the A/B step times with and without the callback are printed
beside it, runs alternating A B A B ..., medians over rounds.

    python benchmarks/bench_hooks.py                 # 41 steps (5 statistics steps at every=10), 5 rounds
    python benchmarks/bench_hooks.py --steps 81 --rounds 7 --teacher
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import sarkd_diag.probes as probes_module  # noqa: E402
from sarkd_diag.probes import ProbeSet  # noqa: E402
from sarkd_diag.probes.hf import SarkdDiagCallback  # noqa: E402

GOAL = 0.05
EVERY = 10  # the probes' default: step 1 and every 10th step take the per-module statistics


class Clock:
    """Seconds spent inside the probes; re-entrant calls (a timed function calling another) count once."""

    def __init__(self):
        self.seconds, self.depth, self.calls = 0.0, 0, 0
        self.by_name: dict[str, float] = {}
        self.counting = False  # off outside the measured steps (setup, step 1, closing the run)

    def wrap(self, fn):
        target = getattr(fn, "__func__", fn)
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(fn))}"

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.depth or not self.counting:
                return fn(*args, **kwargs)
            self.depth += 1
            self.calls += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds += spent
                self.by_name[name] = self.by_name.get(name, 0.0) + spent
                self.depth -= 1
        return timed


def _is_probe(fn) -> bool:
    target = getattr(fn, "__func__", fn)
    return (getattr(target, "__module__", "") or "").startswith("sarkd_diag")


@contextlib.contextmanager
def timed_probe_hooks(clock: Clock):
    """Wrap every hook sarkd_diag registers, whatever probe registers it, with the clock."""
    registrars = [(nn.Module, "register_forward_hook"), (nn.Module, "register_forward_pre_hook"),
                  (nn.Module, "register_full_backward_hook"), (torch.optim.Optimizer, "register_step_pre_hook"),
                  (torch.optim.Optimizer, "register_step_post_hook"), (torch.Tensor, "register_hook"),
                  (torch.Tensor, "register_post_accumulate_grad_hook")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in registrars]

    def patched(original):
        @functools.wraps(original)
        def register(self, hook, *args, **kwargs):
            return original(self, clock.wrap(hook) if _is_probe(hook) else hook, *args, **kwargs)
        return register

    global_hooks = nn.modules.module.register_module_forward_hook
    # what listens to torch's loss functions (`F.cross_entropy`, `F.kl_div`: probes/loss_functions.py)
    watch_loss_function = probes_module.watch_loss_function
    # what runs inside the framework's own methods the probes wrap (accelerate's unscale_gradients and
    # clip_grad_norm_, the Trainer's training_step): the gradients' reading, the norm, the non-finite loss check
    methods = [(ProbeSet, "gradients_ready"), (ProbeSet, "observe_grad_norm"),
               (SarkdDiagCallback, "_replay_if_nonfinite")]
    saved += [(owner, name, getattr(owner, name)) for owner, name in methods]
    try:
        for owner, name in methods:
            setattr(owner, name, clock.wrap(getattr(owner, name)))
        for owner, name, original in saved[:len(registrars)]:
            setattr(owner, name, patched(original))
        nn.modules.module.register_module_forward_hook = lambda hook, **kw: global_hooks(
            clock.wrap(hook) if _is_probe(hook) else hook, **kw)
        probes_module.watch_loss_function = lambda name, listener: watch_loss_function(name, clock.wrap(listener))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        nn.modules.module.register_module_forward_hook = global_hooks
        probes_module.watch_loss_function = watch_loss_function


class StepTimes(TrainerCallback):
    """Wall time between consecutive on_step_begin events: one whole optimizer step, callbacks included.

    Added before the probes' callback, so its events run first: the clock counts from step 2's on_step_begin
    to on_train_end, before the probes close the run (writing parquet, report and plots is not a step's cost).
    """

    def __init__(self, clock: Clock):
        self.begins: list[float] = []
        self.clock = clock
        self.probe_seconds: dict[int, float] = {}  # per step the clock counted (the probes' numbering): its seconds
        self._counted = 0.0  # the clock's seconds when the step under way began

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_step(state.global_step)
        self.begins.append(time.perf_counter())
        self.clock.counting = len(self.begins) >= 2

    def on_train_end(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())
        self._close_step(state.global_step)
        self.clock.counting = False

    def _close_step(self, step: int) -> None:
        """The probes' seconds of the step that just ended (`global_step` counts it), when the clock counted it."""
        if self.clock.counting:
            self.probe_seconds[step] = self.clock.seconds - self._counted
        self._counted = self.clock.seconds

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.begins, self.begins[1:], strict=False)][1:]  # step 1: one-time work


class Data(torch.utils.data.Dataset):
    def __init__(self, vocab: int, length: int):
        self.ids = torch.randint(1, vocab, (512, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def one_run(out: Path, steps: int, probed: bool, teacher: bool, batch: int, length: int,
            where: dict[str, float] | None = None,
            by_step: dict[int, list[float]] | None = None) -> tuple[float, float]:
    """(median step seconds, probe seconds per step) of one Trainer run; `where` adds up seconds per hook, `by_step`
    collects the probes' seconds of each step."""
    vocab = 96
    model = tiny.make_gpt2(vocab)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-4)
    clock = Clock()
    timer = StepTimes(clock)
    trainer = Trainer(model=model, args=args, train_dataset=Data(vocab, length), callbacks=[timer])
    with timed_probe_hooks(clock):
        if probed:
            callback = SarkdDiagCallback.attach(trainer, out / "run", level="standard", every=EVERY,
                                                teacher=tiny.make_gpt2(vocab, seed=3).eval() if teacher else None)
            for event in ("on_step_begin", "on_step_end"):
                setattr(callback, event, clock.wrap(getattr(callback, event)))
        trainer.train()
    if where is not None:
        for name, spent in clock.by_name.items():
            where[name] = where.get(name, 0.0) + spent / (steps - 1)
    if by_step is not None:
        for step, spent in timer.probe_seconds.items():
            by_step.setdefault(step, []).append(spent)
    return statistics.median(timer.seconds()), clock.seconds / (steps - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--teacher", action="store_true", help="also watch a frozen tiny GPT-2 teacher")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plain, probed, inside, where, by_step = [], [], [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for with_probes in (False, True):  # A B A B ...: machine noise hits both alike
                step, probe = one_run(Path(tmp) / f"{r}-{int(with_probes)}", args.steps, with_probes, args.teacher,
                                      args.batch, args.length, where, by_step if with_probes else None)
                (probed if with_probes else plain).append(step)
                if with_probes:
                    inside.append(probe)
    step_plain, step_probed, probe = (statistics.median(v) for v in (plain, probed, inside))
    fraction = probe / step_probed
    print(f"tiny GPT-2 (n_embd 32, 2 layers), batch {args.batch} x {args.length} tokens, {args.steps} steps, "
          f"{args.rounds} rounds, level standard, every {EVERY}{', with a teacher' if args.teacher else ''}")
    print(f"Trainer step, median: {step_plain * 1e3:.2f} ms without the callback, {step_probed * 1e3:.2f} ms with "
          f"(A/B ratio {step_probed / step_plain:.3f}, noise included)")
    print(f"time inside the probes: {probe * 1e3:.3f} ms per step = {fraction:.1%} of a step "
          f"(goal <= {GOAL:.0%}: {'met' if fraction <= GOAL else 'NOT met'})")
    statistics_steps = [statistics.median(v) for step, v in by_step.items() if step % EVERY == 0]
    other_steps = [statistics.median(v) for step, v in by_step.items() if step % EVERY]
    print(f"  of which {statistics.median(other_steps) * 1e3:.3f} ms on a step without statistics, "
          f"{statistics.median(statistics_steps) * 1e3:.3f} ms on a statistics step (every {EVERY}th; medians)")
    for name, spent in sorted(where.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {spent / args.rounds * 1e3:8.3f} ms/step  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
