"""What the probes cost in a step, counted rather than timed (timings on a shared machine are noise): the Python
calls of a step between statistics steps do not grow with the number of tensors watched. The per-tensor work runs
in torch's own loops (`abs_max`'s reductions, one `cat` of views kept from step to step) and in comprehensions;
a generator or a helper called once per tensor and step cost a tiny GPT-2 more than its reductions."""

import contextlib
import sys
from pathlib import Path

import tiny
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sarkd_diag
from sarkd_diag import Probes
from sarkd_diag.probes.base import sample, to_host

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


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: what a step's readings cost on any device, beyond Python."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_steps_readings_reach_the_host_in_a_few_ops_whatever_their_number():
    """A step hands over a dozen readings (0-dim values, per-tensor vectors): a detach, reshape and conversion each
    were three ops per reading, paid every step."""
    readings = {f"value{i}": torch.tensor(float(i)) for i in range(8)}
    readings |= {f"vector{i}": torch.arange(3.0) + i for i in range(4)}
    readings["count"] = torch.tensor(7)  # an integer reading: converted with the rest
    readings["tracked"] = torch.tensor(2.0, requires_grad=True) * 1.5  # one autograd tracks
    with _AtenOps() as counted:
        (host,) = to_host(readings)
    assert len(counted.ops) <= 6, counted.ops
    assert host["value3"] == 3.0 and host["vector2"] == [2.0, 3.0, 4.0]
    assert host["count"] == 7.0 and host["tracked"] == 3.0


def test_an_integer_count_beside_16_bit_readings_reaches_the_host_exactly():
    """A pure-fp16 run's weight maxima are float16 and a count beside them an integer: concatenated as they are, the
    count took float16's dtype — Inf past 65504 — and bfloat16's, rounded to 8 bits."""
    for dtype in (torch.float16, torch.bfloat16):
        (host,) = to_host({"amax": torch.tensor([1.5, 2.0], dtype=dtype), "count": torch.tensor(70001),
                           "scalar": torch.tensor(0.5, dtype=dtype), "elements": torch.tensor([123457])})
        assert host == {"amax": [1.5, 2.0], "count": 70001.0, "scalar": 0.5, "elements": [123457.0]}


def test_a_tensor_whole_as_its_sample_costs_no_op_to_sample():
    """Statistics steps sample every gradient, weight and moment; a small 1-D tensor is its own sample."""
    bias, matrix = torch.randn(32), torch.randn(32, 32)
    with _AtenOps() as counted:
        samples = sample(bias), sample(matrix)
    assert counted.ops == ["aten.view.default"]  # the matrix's, flattened
    assert samples[0] is bias and torch.equal(samples[1], matrix.reshape(-1))


def _aten_ops_per_step(probed: bool, steps: int = 3) -> float:
    """The aten ops of a plain loop's step between statistics steps (steps 3 on), with or without the probes."""
    model = tiny.make_gpt2(96)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    ops = 0
    with Probes(model, optimizer=opt, every=1000) if probed else contextlib.nullcontext() as probes:
        for step in range(2 + steps):
            with _AtenOps() if step >= 2 else contextlib.nullcontext() as counted:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if probes is not None:
                    probes.step(loss=loss)
                opt.zero_grad()
            ops += len(counted.ops) if counted is not None else 0
    return ops / steps


def test_a_step_without_statistics_costs_two_reductions_per_tensor_and_a_few_ops_more():
    """Between statistics steps the probes read each gradient and each weight once (one reduction each) and the
    update's size from one sample of the weights before and after; everything else is a fixed handful of ops — on
    an accelerator each is a launch, whatever the tensors' size."""
    tensors = len(list(tiny.make_gpt2(96).parameters()))
    probes_ops = _aten_ops_per_step(True) - _aten_ops_per_step(False)
    # 2 of the few: the gradients' largest maximum, read on the host before the update (a failing step is replayed)
    assert probes_ops <= 2 * tensors + 27, f"{probes_ops:.0f} ops a step for {tensors} tensors"
