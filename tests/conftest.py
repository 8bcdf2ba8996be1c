from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives, and tests stay stable under load

import tiny  # noqa: E402
from contract import CHECKER  # noqa: E402


def pytest_terminal_summary(terminalreporter) -> None:
    """Whether run directories were checked against the shared contract: without shared/ beside the checkout that
    check passes silently, and a green run says nothing about conformance (said even under -q)."""
    if CHECKER.is_file():
        terminalreporter.write_line(f"run-directory conformance: checked by {CHECKER}")
    else:
        terminalreporter.write_line(f"run-directory conformance: NOT checked ({CHECKER} is not beside this checkout)")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A corpus, a tokenizer, a tiny GPT-2 student and a tiny Mixtral teacher, all on disk."""
    world = tiny.write_world(tmp_path_factory.mktemp("tiny_world"))
    other_tokenizer = tiny.make_tokenizer(world["train"], vocab_size=320)
    dual_student = tiny.save(tiny.make_gpt2(len(other_tokenizer), seed=2), other_tokenizer,
                             world["root"] / "dual_student")
    return {**{k: v for k, v in world.items() if k != "tokenizer"}, "dual_student": dual_student}


@pytest.fixture
def tiny_args(tiny_world, tmp_path) -> list[str]:
    """CLI arguments of a short run on the tiny world (an output directory of its own)."""
    return ["--teacher-model", str(tiny_world["teacher"]), "--student-model", str(tiny_world["student"]),
            "--train-file", str(tiny_world["train"]), "--validation-file", str(tiny_world["valid"]),
            "--block-size", "32", "--per-device-batch-size", "4", "--train-steps", "6", "--eval-steps", "3",
            "--student-lr", "3e-3", "--output-dir", str(tmp_path / "run")]


@pytest.fixture(scope="session")
def cli():
    """Run the real CLI entry point in-process: returns (exit code, stdout, stderr). It holds no state, so
    module-scoped fixtures may train through it too (one run that several tests read)."""
    import contextlib
    import io

    from sarkd_diag.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return code, out.getvalue(), err.getvalue()

    return run
