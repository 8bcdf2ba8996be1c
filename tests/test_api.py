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


def test_a_distill_console_gives_its_fixes_as_keyword_arguments(tiny_world, tmp_path, capsys):
    """A notebook's distill() printed the fix `train with --precision bf16-mixed — or raise --student-lr`: options its
    caller never typed. Its console names the keyword arguments, as its refusals do; the run directory is the
    command line's (`sarkd-diag report` words it so)."""
    sarkd_diag.distill(teacher_model=str(tiny_world["teacher"]), student_model=str(tiny_world["student"]),
                       train_file=str(tiny_world["train"]), validation_file=str(tiny_world["valid"]),
                       block_size=16, per_device_batch_size=2, train_steps=3, eval_steps=3, precision="pure-bf16",
                       student_lr=1e-6, output_dir=str(tmp_path / "run"))
    printed = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "train with `precision='bf16-mixed'` — or raise `student_lr=`" in printed, printed
    assert "--" not in printed, printed
    assert "`--precision bf16-mixed`" in (tmp_path / "run" / "report.md").read_text()


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
    assert str(refused.value) == "student_lr= must be > 0, got -1.0"
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(resume=True, quiet=True)
    assert str(refused.value) == "resume=True needs output_dir= (the run to continue)"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"options": {"block_size": 999}, "precision": {"mode": "fp32"}}')
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(output_dir=str(run), quiet=True)
    assert str(refused.value) == (
        f"output_dir={str(run)!r} holds a different run (options differ: block_size); give another output_dir= for a "
        f"new run, overwrite=True to replace it, or continue it with its own options: sarkd-diag train --config "
        f"{run / 'config.json'} --resume")


@pytest.mark.parametrize(("options", "says"), [
    ({"precision": "fp16"}, "precision='fp16' is ambiguous: say `mixed`"),
    ({"dataset_config_name": "x"}, "dataset_config_name='x' configures a dataset_name=, and none is given (e.g. "
                                   "dataset_name='wikitext' dataset_config_name='wikitext-2-raw-v1')"),
    ({"train_file": "nope.txt"}, "train_file='nope.txt': no such file"),
    ({"validation_file": "nope.txt"}, "validation_file='nope.txt': no such file"),
    ({"device": "tpu"}, "device='tpu' is not a device (auto, cpu, cuda, cuda:N)"),
    ({"kd_loss": "kl"}, "kd_loss= must be one of forward-kl, reverse-kl, jsd; got 'kl'"),
], ids=["precision", "dataset config", "train file", "validation file", "device", "kd loss"])
def test_distill_refusals_name_the_keyword_as_the_call_wrote_it(tmp_path, monkeypatch, options, says):
    """`distill(precision="fp16")` said `precision fp16 is ambiguous`, `distill(train_file="nope.txt")` said
    `nope.txt: no such file` (which of two files?), dataset_config_name's advice was CLI words (`e.g. dataset_name
    wikitext ...`): a keyword argument is named as the call writes it, with its value where the message shows one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(quiet=True, **options)
    assert str(refused.value).startswith(says), str(refused.value)


def test_compare_precision_refusals_name_one_mode_of_several_as_an_item_of_modes(tmp_path):
    """`compare_precision(["fp16", "fp32"])` said `modes fp16 is ambiguous`, as if `modes` were "fp16"."""
    with pytest.raises(BadInput) as refused:
        sarkd_diag.compare_precision(["fp16", "fp32"], output_dir=str(tmp_path / "o"), quiet=True)
    assert str(refused.value).startswith("'fp16' (of modes=) is ambiguous: say `mixed`"), str(refused.value)


@pytest.mark.parametrize(("options", "says"), [
    ({"precision": "fp32"}, "compare-precision sets precision= itself, one mode per run: choose the modes with modes= "
                            "(e.g. `modes='fp32,mixed'`)"),
    ({"on_nonfinite": "skip"}, "compare-precision runs every mode with `on_nonfinite='continue'`, so each mode's "
                               "failure is recorded"),
])
def test_compare_precision_refusals_give_their_examples_as_keyword_arguments(tmp_path, options, says):
    """`compare_precision(precision="fp32")` advised `modes= fp32,mixed`, `on_nonfinite=` advised `on_nonfinite=
    continue`: an example is written as the call writes it."""
    with pytest.raises(BadInput) as refused:
        sarkd_diag.compare_precision(output_dir=str(tmp_path / "o"), quiet=True, **options)
    assert str(refused.value).startswith(says), str(refused.value)


def test_probes_refusals_name_the_keyword_argument():
    """`Probes(model, level="max")` said `probe level must be one of ...`: no keyword called that exists."""
    import torch

    with pytest.raises(ValueError) as refused:
        sarkd_diag.Probes(torch.nn.Linear(2, 2), level="max")
    assert str(refused.value) == "level= must be one of off, standard, full, got 'max'"


@pytest.mark.parametrize("callback", ["transformers", "lightning"])
def test_probe_choices_are_read_in_any_case_as_the_cli_reads_them(tmp_path, callback):
    """`sarkd-diag train --probes Full` and `distill(probes="Full")` ran at `full`; `Probes(model, level="Full")` and
    `SarkdDiagCallback(on_critical="Record")` were refused: the same choice, read two ways."""
    import torch

    model = torch.nn.Linear(2, 2)
    with sarkd_diag.Probes(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run",
                           level="Full", caller="Loop") as probes:
        assert (probes.ctx.level, probes.caller) == ("full", "loop")
    if callback == "transformers":
        from sarkd_diag.probes.hf import SarkdDiagCallback as Callback
    else:  # needs lightning or pytorch_lightning installed
        Callback = pytest.importorskip("sarkd_diag.probes.lightning").SarkdDiagLightningCallback
    made = Callback(tmp_path / "cb", level="OFF", on_critical="Record")
    assert (made.level, made.on_critical) == ("off", "record")
