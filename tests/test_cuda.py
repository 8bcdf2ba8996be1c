"""CUDA paths: run only where a CUDA GPU is present (skipped, and not counted, on this project's CPUs)."""

import math

import pytest
import torch

from sarkd_diag import load_run
from sarkd_diag.contract.modes import detect_capabilities, resolve_mode

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_picks_a_mixed_mode_on_the_gpu():
    caps = detect_capabilities(torch.device("cuda"))
    mode, _ = resolve_mode("auto", None, caps)
    assert mode == ("bf16-mixed" if caps.native_bf16 else "mixed")


def test_pure_fp16_fails_and_mixed_trains_on_the_gpu(cli, tiny_args, tmp_path):
    args = [a if a != str(tmp_path / "run") else str(tmp_path / "pure") for a in tiny_args]
    code, _, _ = cli("train", *args, "--device", "cuda", "--precision", "pure-fp16")
    assert code == 1
    assert load_run(tmp_path / "pure")["summary"]["diagnosis"][0]["cause"] == "optimizer_eps_underflow"
    args = [a if a != str(tmp_path / "run") else str(tmp_path / "mixed") for a in tiny_args]
    code, _, err = cli("train", *args, "--device", "cuda", "--precision", "mixed")
    assert code == 0, err
    summary = load_run(tmp_path / "mixed")["summary"]
    assert summary["status"] == "completed" and summary["precision"]["master_dtype"] == "float32"
    assert summary["final"]["eval_ppl"] < summary["final"]["first_eval_ppl"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_abs_max_on_the_gpu_agrees_with_the_cpu_path(dtype):
    from sarkd_diag.probes.base import abs_max

    tensors = [torch.randn(n, dtype=dtype) * 100 for n in (1, 7, 5000)]
    tensors[1][5] = -math.inf
    tensors[2][10] = math.nan
    on_gpu = abs_max([t.cuda() for t in tensors]).cpu()  # the fused foreach kernel
    assert [str(v) for v in on_gpu.float().tolist()] == [str(v) for v in abs_max(tensors).float().tolist()]
