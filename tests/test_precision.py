import pytest
import torch
from torch import nn

from sarkd_diag.contract.errors import BadInput
from sarkd_diag.contract.modes import MODE_NAMES, Capabilities, canonical_mode, resolve_mode, slow_half_precision
from sarkd_diag.train.precision import MODES, make_precision

CPU_BF16 = Capabilities("cpu", "epyc", native_bf16=True, fast_fp16=False)
CPU_PLAIN = Capabilities("cpu", "old", native_bf16=False, fast_fp16=False)
T4 = Capabilities("cuda", "Tesla T4", native_bf16=False, fast_fp16=True)
A100 = Capabilities("cuda", "A100", native_bf16=True, fast_fp16=True)


class TinyTeacher(nn.Module):
    """A frozen body with one trainable router, like a SAR teacher."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.router = nn.Linear(4, 2, bias=False)
        self.body.requires_grad_(False)


EXPECTED = {  # mode: (trainable dtype, frozen dtype, autocast dtype, loss scaling)
    "fp32": (torch.float32, torch.float32, None, False),
    "mixed": (torch.float32, torch.float16, torch.float16, True),
    "bf16-mixed": (torch.float32, torch.bfloat16, torch.bfloat16, False),
    "pure-fp16": (torch.float16, torch.float16, None, False),
    "pure-bf16": (torch.bfloat16, torch.bfloat16, None, False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_convert_puts_each_weight_in_the_modes_dtype(mode):
    trainable, frozen, autocast, scaled = EXPECTED[mode]
    precision = make_precision(mode, torch.device("cpu"))
    student = precision.convert(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    teacher = precision.convert(TinyTeacher())
    assert {p.dtype for p in student.parameters()} == {trainable}
    assert teacher.router.weight.dtype == trainable
    assert teacher.body.weight.dtype == frozen
    assert precision.autocast_dtype == autocast
    assert precision.loss_scaling == scaled
    assert precision.master_dtype == trainable


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_steps_the_optimizer_through_the_same_methods(mode):
    torch.manual_seed(0)
    precision = make_precision(mode, torch.device("cpu"))
    model = precision.convert(nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with precision.forward_context():
        loss = model(torch.randn(2, 8, dtype=precision.trainable_dtype)).float().pow(2).mean()
    precision.backward(loss)
    precision.unscale_gradients(opt)
    skipped = precision.optimizer_step(opt)
    assert skipped.item() == 0
    assert not torch.equal(before, model.weight.detach())


def test_mixed_scaler_skips_a_step_with_inf_gradients_and_reports_it():
    precision = make_precision("mixed", torch.device("cpu"))
    model = precision.convert(nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with precision.forward_context():
        loss = model(torch.tensor([[float("inf"), 1.0]])).float().sum()
    precision.backward(loss)
    precision.unscale_gradients(opt)
    assert precision.optimizer_step(opt).item() == 1
    assert torch.equal(before, model.weight.detach())
    assert precision.loss_scale().item() == 2.0**15  # backed off from 2**16
    state = precision.state_dict()
    other = make_precision("mixed", torch.device("cpu"))
    other.load_state_dict(state)
    assert other.state_dict()["scale"] == state["scale"]


@pytest.mark.parametrize("caps, expected", [(CPU_BF16, "bf16-mixed"), (CPU_PLAIN, "fp32"), (T4, "mixed"),
                                            (A100, "bf16-mixed")])
def test_auto_picks_the_mixed_mode_the_device_runs_well(caps, expected):
    mode, reason = resolve_mode("auto", None, caps)
    assert mode == expected and reason


@pytest.mark.parametrize(("caps", "slow"), [
    (CPU_PLAIN, {"mixed": "float16", "pure-fp16": "float16", "bf16-mixed": "bfloat16", "pure-bf16": "bfloat16"}),
    (CPU_BF16, {"mixed": "float16", "pure-fp16": "float16"}),
    (T4, {"bf16-mixed": "bfloat16", "pure-bf16": "bfloat16"}), (A100, {}),  # (T4 refuses the bf16 modes)
], ids=["cpu without bf16", "cpu with bf16", "t4", "a100"])
def test_a_mode_computing_in_a_dtype_the_device_runs_slowly_is_named_with_what_auto_picks(caps, slow):
    """`--precision mixed` on a CPU trained ~50x slower than fp32 here (emulated fp16), and nothing said so."""
    for mode in MODE_NAMES:
        note = slow_half_precision(mode, caps)
        if mode not in slow:
            assert note is None, (mode, note)
            continue
        auto, _ = resolve_mode("auto", None, caps)
        assert note.startswith(f"{mode} computes in {slow[mode]}, which {caps.device_type} {caps.name!r} has no fast")
        assert f"`--precision auto` picks {auto} on this device" in note


@pytest.mark.parametrize("alias, mode", [("32-true", "fp32"), ("float32", "fp32"), ("16-mixed", "mixed"),
                                         ("fp16-mixed", "mixed"), ("bf16", "bf16-mixed"), ("16-true", "pure-fp16"),
                                         ("bf16-true", "pure-bf16"), ("MIXED", "mixed")])
def test_aliases(alias, mode):
    assert canonical_mode(alias) == mode


@pytest.mark.parametrize("word", ["fp16", "float16", "half", "int8"])
def test_no_fp16_alias_and_unknown_modes_are_bad_input(word):
    with pytest.raises(BadInput):
        canonical_mode(word)


@pytest.mark.parametrize("dtype, mode", [("float16", "mixed"), ("bfloat16", "bf16-mixed"), ("float32", "fp32")])
def test_model_dtype_means_the_mixed_mode_of_its_family(dtype, mode):
    assert resolve_mode("auto", dtype, CPU_PLAIN)[0] == mode


def test_explicit_precision_decides_within_the_model_dtype_family():
    assert resolve_mode("pure-fp16", "float16", CPU_BF16)[0] == "pure-fp16"
    with pytest.raises(BadInput, match="conflicts"):
        resolve_mode("mixed", "float32", CPU_BF16)


def test_bf16_modes_cannot_run_on_a_gpu_without_bf16():
    for mode in ("bf16-mixed", "pure-bf16"):
        with pytest.raises(BadInput, match="cannot run"):
            resolve_mode(mode, None, T4)
    assert T4.runnable_modes == ["fp32", "mixed", "pure-fp16"]


def test_the_mode_names_are_the_strategies_names_in_order():
    """contract/modes.py (no torch) names the modes; train/precision.py holds them as strategies: the two agree."""
    assert tuple(MODES) == MODE_NAMES
