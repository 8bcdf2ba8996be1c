"""The Python API a notebook uses: distill's explicit keyword signature and its quiet switch."""

import dataclasses
import inspect

import pytest

import sarkd_diag
from sarkd_diag import load_run
from sarkd_diag.contract.config import DistillConfig
from sarkd_diag.contract.errors import BadInput


def test_distill_shows_every_option_with_its_default():
    for distill in (sarkd_diag.distill, __import__("sarkd_diag.train.loop", fromlist=["distill"]).distill):
        params = inspect.signature(distill).parameters
        for f in dataclasses.fields(DistillConfig):
            assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
            assert f"{f.name} = {f.default!r}" in distill.__doc__
        assert params["quiet"].default is False


def test_a_quiet_distill_prints_nothing_and_still_writes_its_run(tiny_world, tmp_path, capsys):
    result = sarkd_diag.distill(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                                train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                                block_size=16, per_device_batch_size=2, train_steps=2, eval_steps=2,
                                output_dir=str(tmp_path / "run"), quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert result.status == "completed" and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("path", ["", "  "])
def test_load_run_of_an_empty_path_is_refused_not_the_current_directory(tmp_path, monkeypatch, path):
    """`load_run(os.environ.get("RUN", ""))` with RUN unset would read whatever run the notebook sits in: refused,
    as the CLI refuses an empty RUN_DIR."""
    (tmp_path / "config.json").write_text("{}")  # the current directory looks like a run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="empty run directory"):
        load_run(path)

