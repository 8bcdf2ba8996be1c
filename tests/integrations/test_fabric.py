"""Probes in a Lightning Fabric loop (`fabric.setup`, `fabric.backward`): Fabric's wrappers hand over the torch
optimizer and the module, and its precision plugin's loss scaler is the run's. Fabric turns `16-mixed` into
bf16 on a CPU, so the fp16 loop here gives the plugin a CPU GradScaler of its own."""

from __future__ import annotations

import warnings

import pytest
import torch

fabric_module = pytest.importorskip("lightning_fabric")

import tiny  # noqa: E402
from frameworks import cause, overflow_fp16, severities  # noqa: E402

from sarkd_diag import Probes, load_run  # noqa: E402

VOCAB = 64


def _fabric_loop(precision: str, run_dir=None, overflow: bool = False, steps: int = 4) -> list[float]:
    from lightning_fabric.plugins import MixedPrecision

    plugin = MixedPrecision(precision, "cpu", scaler=torch.amp.GradScaler("cpu") if precision == "16-mixed" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fabric = fabric_module.Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = tiny.make_gpt2(VOCAB)
    if overflow:
        overflow_fp16(model.transformer.h[1])
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ids = torch.randint(1, VOCAB, (steps, 4, 12), generator=torch.Generator().manual_seed(0))
    probes = Probes(model, optimizer=optimizer, run_dir=run_dir, level="full") if run_dir else None
    losses = []
    for batch in ids:
        loss = model(input_ids=batch, labels=batch).loss
        fabric.backward(loss)
        optimizer.step()
        if probes is not None:
            probes.step(loss=loss)
        optimizer.zero_grad()
        losses.append(loss.item())
    if probes is not None:
        probes.close()
    return losses


def test_a_fabric_fp16_loop_is_read_with_its_precision_plugins_loss_scaler(tmp_path):
    """The scaler inside Fabric's precision plugin is the run's: the run is `mixed` with loss scaling (not "float16
    autocast with no loss scaler"), the scale is recorded, and an MLP whose output leaves fp16's range is named."""
    _fabric_loop("16-mixed", tmp_path / "run", overflow=True)
    run = load_run(tmp_path / "run")
    precision = run["config"]["precision"]
    assert (precision["mode"], precision["loss_scaling"]) == ("mixed", True)
    assert run["metrics"].query("split == 'train'")["loss_scale"].notna().all()
    assert run["events"].query("code == 'unscaled_fp16_compute'").empty
    overflow = cause(run["summary"]["diagnosis"], "activation_overflow")
    assert (overflow["model"], overflow["module"], overflow["first_step"]) == (
        "student", "transformer.h.1.mlp.c_proj", 1)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_a_clean_fabric_loop_warns_of_nothing_and_trains_as_without_probes(tmp_path, precision):
    losses = _fabric_loop(precision, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert not {"warning", "critical"} & severities(run["summary"]["diagnosis"])
    assert not {"warning", "critical"} & set(run["events"]["severity"])
    assert run["config"]["precision"]["mode"] == {"16-mixed": "mixed", "bf16-mixed": "bf16-mixed"}[precision]
    assert losses == _fabric_loop(precision)
