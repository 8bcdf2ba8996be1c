"""Host syncs of sarkd-diag's own code per training step at `standard` (syncs inside torch don't count):
intercepted on the CPU, reported by torch.cuda.set_sync_debug_mode on a GPU."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.presentation.ui import TrainingDisplay
from sarkd_diag.train.loop import Trainer

PACKAGE = str(Path(__import__("sarkd_diag").__file__).parent)
SYNCING = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy")


class SyncCounter:
    """Counts calls that move a tensor to the host when the calling frame is sarkd-diag's own code."""

    def __init__(self):
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, _name=name, _original=original, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PACKAGE):
                    self.calls.append(f"{_name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


class SyncDebugWarnings:
    """On a GPU, torch.cuda.set_sync_debug_mode warns at every synchronizing call; those made from
    sarkd-diag's own files are counted (a GradScaler's own sync inside torch is not)."""

    def __enter__(self):
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._caught.__exit__(*exc)
        self.calls = [f"{Path(w.filename).name}:{w.lineno}" for w in self._records if w.filename.startswith(PACKAGE)]


COUNTERS = {"cpu": SyncCounter, "cuda": SyncDebugWarnings}
ON_A_GPU = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(("device", "precision"), [
    ("cpu", "fp32"), ("cpu", "bf16-mixed"),
    *(pytest.param("cuda", p, marks=ON_A_GPU) for p in ("fp32", "bf16-mixed", "mixed")),  # mixed: shown beside
])
def test_at_most_two_host_syncs_per_step_at_standard(tiny_world, tmp_path, device, precision):
    if device == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = DistillConfig(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                        train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                        block_size=16, per_device_batch_size=2, train_steps=6, eval_steps=100, precision=precision,
                        probes="standard", probe_every=2, device=device, output_dir=str(tmp_path / "run")).validate()
    trainer = Trainer(cfg, TrainingDisplay(quiet=True))
    per_step: list[list[str]] = []
    original_step = trainer._step

    def counted_step():
        with COUNTERS[device]() as counter:
            row = original_step()
        per_step.append(counter.calls)
        return row

    trainer._step = counted_step
    assert trainer.train().status == "completed"
    steady = per_step[1:]  # step 1 also runs the one-time optimizer preflight
    assert len(steady) == 5  # stats steps (2, 4, 6) and plain steps (3, 5) alike
    for calls in steady:
        assert len(calls) <= 2, calls
