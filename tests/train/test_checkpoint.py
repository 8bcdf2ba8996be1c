"""Checkpoints: complete, atomic, pruned, verified on load, never unpickled; the skip policy's pre-step copy."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from sarkd_diag.train import checkpoint as ckpt


def _state(step: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    wte = torch.randn(8, 4, generator=g)
    return {
        "step": step,
        "model": {"student.wte.weight": wte, "student.lm_head.weight": wte,  # tied: one tensor, two names
                  "teacher.gate.weight": torch.randn(2, 4, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "name": "student", "params": [0]}]},
        "precision": {"scale": 65536.0, "_growth_tracker": 2},
        "scheduler": None,
        "data": {"epoch": 1, "position": 16},
        "rng": ckpt.rng_state(),
        "policy": {"rollbacks": 0, "lr_factor": 1.0},
        "log_offsets": {"events.jsonl": 10, "metrics.jsonl": 20},
    }


def test_a_checkpoint_round_trips_everything_and_stores_tied_weights_once(tmp_path):
    state = _state(40)
    path = ckpt.save(tmp_path, 40, state, keep=2, eval_ppl=12.5, meta={"mode": "fp32"})
    assert path == tmp_path / "checkpoints" / "step-00000040"
    loaded = ckpt.load(path)
    assert set(loaded["model"]) == {"student.wte.weight", "teacher.gate.weight"}
    assert torch.equal(loaded["model"]["student.wte.weight"], state["model"]["student.wte.weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert (loaded["data"], loaded["precision"], loaded["log_offsets"]) == (state["data"], state["precision"],
                                                                            state["log_offsets"])
    assert loaded["meta"]["step"] == 40 and loaded["meta"]["eval_ppl"] == 12.5 and loaded["meta"]["mode"] == "fp32"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 10, _state(10), keep=2, eval_ppl=None)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, 20, _state(20), keep=2, eval_ppl=None)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010"]
    path, state, problems = ckpt.load_newest(tmp_path)
    assert path.name == "step-00000010" and state["step"] == 10 and not problems
    ckpt.save(tmp_path, 30, _state(30), keep=2, eval_ppl=None)  # the torn .tmp-* of step 20 is cleaned up
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_pruning_keeps_the_newest_n_and_the_best_by_validation_perplexity(tmp_path):
    for step, ppl in ((10, 9.0), (20, 4.0), (30, 6.0), (40, 7.0), (50, None)):
        ckpt.save(tmp_path, step, _state(step), keep=2, eval_ppl=ppl)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000040", "step-00000050"]


@pytest.mark.parametrize("damage", ["flip_weights", "truncate_state", "drop_meta", "drop_weights"])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ckpt.save(tmp_path, 10, _state(10), keep=3, eval_ppl=None)
    newest = ckpt.save(tmp_path, 20, _state(20), keep=3, eval_ppl=None)
    if damage == "flip_weights":
        data = bytearray((newest / ckpt.WEIGHTS).read_bytes())
        data[-3] ^= 0x40
        (newest / ckpt.WEIGHTS).write_bytes(bytes(data))
    elif damage == "truncate_state":
        data = (newest / ckpt.STATE).read_bytes()
        (newest / ckpt.STATE).write_bytes(data[: len(data) // 2])
    elif damage == "drop_meta":
        (newest / ckpt.META).unlink()
    else:
        (newest / ckpt.WEIGHTS).unlink()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(newest)
    path, state, problems = ckpt.load_newest(tmp_path)
    assert path.name == "step-00000010" and state["step"] == 10
    assert len(problems) == 1 and "step-00000020" in problems[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_never_executed(tmp_path):
    path = ckpt.save(tmp_path, 10, _state(10), keep=2, eval_ppl=None)
    marker = tmp_path / "pwned"
    with open(path / ckpt.STATE, "wb") as f:
        pickle.dump({"step": 10, "evil": _Payload(marker)}, f, protocol=2)
    meta = json.loads((path / ckpt.META).read_text())
    meta["sha256"][ckpt.STATE] = ckpt._sha256(path / ckpt.STATE)  # a consistent, deliberately crafted checkpoint
    (path / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded"):
        ckpt.load(path)
    assert not marker.exists()


def test_rng_state_restores_torch_python_and_numpy_sequences(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = ckpt.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "rng.pt")
    torch.rand(5), random.random(), np.random.rand()
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


def test_step_snapshot_puts_weights_and_adamw_state_back_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    snapshot = ckpt.StepSnapshot(params, opt)
    assert snapshot.bytes_needed() == sum(3 * 4 * p.numel() + 4 for p in params)

    def step(bad: bool) -> None:
        model(torch.randn(2, 4)).pow(2).sum().backward()
        if bad:
            params[0].grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()

    snapshot.take()  # before the first step the optimizer has no state: a restore removes the state it made
    step(bad=True)
    snapshot.restore()
    assert not opt.state and all(torch.isfinite(p).all() for p in params)
    step(bad=False)
    weights = [p.detach().clone() for p in params]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    snapshot.take()
    step(bad=True)
    assert not torch.isfinite(params[0]).all()
    snapshot.restore()
    for p, w, m in zip(params, weights, moments, strict=True):
        assert torch.equal(p, w)
        for k, v in m.items():
            assert torch.equal(opt.state[p][k], v), k
