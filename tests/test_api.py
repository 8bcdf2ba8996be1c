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



def test_distill_refusals_name_its_keyword_arguments_not_the_cli_options(tmp_path):
    """`distill(student_lr=-1)` was refused with `--student-lr must be > 0`: an option the notebook never typed and
    cannot pass. A refusal of the API names the keyword argument; a command it offers to run stays as written."""
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(student_lr=-1, quiet=True)
    assert str(refused.value) == "student_lr must be > 0, got -1.0"
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(resume=True, quiet=True)
    assert str(refused.value) == "resume=True needs output_dir (the run to continue)"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"options": {"block_size": 999}, "precision": {"mode": "fp32"}}')
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(output_dir=str(run), quiet=True)
    assert str(refused.value) == (
        f"output_dir {run} holds a different run (options differ: block_size); give another output_dir for a new run, "
        f"overwrite=True to replace it, or continue it with its own options: sarkd-diag train --config "
        f"{run / 'config.json'} --resume")
