"""What the probes cost in a step, counted rather than timed (timings on a shared machine are noise): the Python
calls of a step between statistics steps do not grow with the number of tensors watched. The per-tensor work runs
in torch's own loops (`abs_max`'s reductions, one `cat` of views kept from step to step) and in comprehensions;
a generator or a helper called once per tensor and step cost a tiny GPT-2 more than its reductions."""

import sys
from pathlib import Path

import tiny
import torch

import sarkd_diag
from sarkd_diag import Probes

PACKAGE = str(Path(sarkd_diag.__file__).parent)


def _probe_calls_per_step(layers: int, steps: int = 4) -> tuple[float, int]:
    """Python calls into sarkd_diag per step (steps 3 on, none a statistics step), and the tensors watched."""
    model = tiny.make_gpt2(96, n_layer=layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = 0

    def count(frame, event, _arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            calls += 1

    with Probes(model, optimizer=opt, every=1000) as probes:
        for step in range(2 + steps):
            if step == 2:
                sys.setprofile(count)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            probes.step()
            opt.zero_grad()
        sys.setprofile(None)
    return calls / steps, len(probes.ctx.watched)


def test_a_steps_python_calls_do_not_grow_with_the_tensors_watched():
    few, few_tensors = _probe_calls_per_step(layers=1)
    many, many_tensors = _probe_calls_per_step(layers=4)
    assert many_tensors >= 2 * few_tensors
    assert many == few, f"{few:.0f} calls per step for {few_tensors} tensors, {many:.0f} for {many_tensors}"
