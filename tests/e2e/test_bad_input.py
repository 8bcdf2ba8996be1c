"""Bad input, tried as a new user would: each case gives one clear line on stderr, exit 2, no traceback, and
leaves every existing file byte for byte as it was (and creates none)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from sarkd_diag.contract.config import DistillConfig

BASE = {"--block-size": "16", "--per-device-batch-size": "2", "--train-steps": "2", "--precision": "fp32",
        "--probes": "off"}


def _args(world, tmp: Path, drop=(), **options) -> list[str]:
    """`train` on the tiny world into tmp/run, with options replaced (`train_file=...`) or dropped."""
    given = {"--teacher-model": world["teacher"], "--student-model": world["student"], "--train-file": world["train"],
             "--validation-file": world["valid"], **BASE, "--output-dir": tmp / "run"}
    for key, value in options.items():
        given["--" + key.replace("_", "-")] = value
    args = ["train"]
    for key, value in given.items():
        if key in drop:
            continue
        args += [key] if value is True else [key, str(value)]
    return args


def _fifo(tmp: Path) -> Path:
    """A named pipe, which is what `--train-file <(cat x)` hands over (/dev/fd/63)."""
    os.mkfifo(tmp / "pipe.txt")
    return tmp / "pipe.txt"


def _file(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _model_copy(world, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(world["student"], tmp / name))


def _cut_short_weights(world, tmp: Path) -> Path:
    """The student with its model.safetensors cut in half, as a copy or download that stopped part-way leaves it."""
    model = _model_copy(world, tmp)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return model


def _checkpoint_of_a_run(world, tmp: Path) -> Path:
    """`RUN/checkpoints/step-00000002` of a run that saved its student: what --resume-from takes, mistaken for a model
    (it said: no config.json and no tokenizer files, save the model there)."""
    run = _recorded_run(tmp)
    shutil.copytree(world["student"], run / "student")
    checkpoint = run / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    for name, content in (("model.safetensors", b"weights"), ("trainer_state.pt", b"state"),
                          ("meta.json", '{"step": 2}')):
        _file(checkpoint, name, content)
    return checkpoint


def _no_special_tokens(world, tmp: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    model = _model_copy(world, tmp)
    for f in model.glob("*token*"):
        f.unlink()
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny.make_tokenizer(world["train"]).backend_tokenizer)
    bare.save_pretrained(model)
    return model


def _fewer_embeddings(world, tmp: Path) -> Path:
    """The student's tokenizer beside a model with fewer token embeddings than its ids need (tokens added to a
    tokenizer without resizing the model, or another model's tokenizer copied in)."""
    from transformers import AutoModelForCausalLM

    model = _model_copy(world, tmp)
    lm = AutoModelForCausalLM.from_pretrained(model)
    lm.resize_token_embeddings(8)
    lm.save_pretrained(model)
    return model


def _recorded_run(tmp: Path, **options) -> Path:
    """A run directory as a previous run left it (config.json and a metrics line), no checkpoint."""
    run = tmp / "run"
    run.mkdir()
    precision = options.pop("precision_block", {"mode": "fp32"})
    recorded = {**DistillConfig().to_dict(), **options}
    (run / "config.json").write_text(json.dumps({"options": recorded, "precision": precision}))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    return run


def _probes_run(tmp: Path) -> Path:
    """A run directory as `Probes` in a user's own loop leaves it: config.json records no options."""
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    return run


def _damaged_run(tmp: Path) -> Path:
    """A run that logged events and whose config.json was cut short (an edit, a full disk)."""
    run = _recorded_run(tmp)
    (run / "config.json").write_text('{"options": \n')
    (run / "events.jsonl").write_text('{"step": 1, "time": 0, "kind": "nonfinite_loss", "severity": "critical", '
                                      '"message": "loss is nan"}\n')
    return run


def _cut_summary(tmp: Path) -> Path:
    """A recorded run whose summary.json was cut short."""
    run = _recorded_run(tmp)
    (run / "summary.json").write_text('{"status": ')
    return run


def _listed_summary(tmp: Path) -> Path:
    """A recorded run whose summary.json holds valid JSON that is no object (an edit, another tool's file)."""
    run = _recorded_run(tmp)
    (run / "summary.json").write_text("[]\n")
    return run


def _unreadable(tmp: Path, monkeypatch) -> Path:
    path = _file(tmp, "secret.txt", "some text\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for anyone else
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return path


def _run_with_checkpoint(world, tmp: Path) -> Path:
    """A recorded run with a checkpoint at step 2 that does not load (its weights are not safetensors)."""
    run = _recorded_run(tmp, **_options_of(world))
    step = run / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 2, "sha256": {"model.safetensors": "0"}}')
    (step / "model.safetensors").write_bytes(b"not safetensors")
    return run


def _corrupt_checkpoint(world, tmp: Path) -> list[str]:
    return ["train", "--output-dir", _run_with_checkpoint(world, tmp), "--resume", "--train-steps", "4"]


def _project_with_runs(tmp: Path) -> Path:
    """A project directory as `train` leaves it: its runs/ of earlier runs, and a file of the user's."""
    run = _recorded_run(tmp)
    project = tmp / "project"
    (project / "runs").mkdir(parents=True)
    run.rename(project / "runs" / "first")
    (project / "notes.txt").write_text("mine\n")
    return project


def _comparison(tmp: Path) -> Path:
    """A directory as compare-precision leaves it: its compare_options.json and a run per mode under runs/."""
    comparison = tmp / "comparison"
    (comparison / "runs").mkdir(parents=True)
    _recorded_run(tmp).rename(comparison / "runs" / "fp32")
    (comparison / "compare_options.json").write_text(json.dumps({"modes": ["fp32"]}))
    return comparison


def _compare(world, tmp: Path, *extra) -> list[str]:
    """`compare-precision` of fp32 on the tiny world, one step, with `extra` options."""
    return ["compare-precision", *_args(world, tmp, drop=("--precision", "--train-steps", "--output-dir"))[1:],
            "--modes", "fp32", "--steps", "1", *map(str, extra)]


def _options_of(world) -> dict:
    return {"teacher_model": str(world["teacher"]), "student_model": str(world["student"]),
            "train_file": str(world["train"]), "validation_file": str(world["valid"]), "block_size": 16,
            "per_device_batch_size": 2, "train_steps": 2, "precision": "fp32", "probes": "off"}


# (case, how to build the command line from (world, tmp, monkeypatch), a phrase the error line must hold)
CASES = [
    ("missing train file", lambda w, t, m: _args(w, t, train_file=t / "nope.txt"), "no such file"),
    ("unreadable train file", lambda w, t, m: _args(w, t, train_file=_unreadable(t, m)), "cannot be read"),
    ("directory as train file", lambda w, t, m: _args(w, t, train_file=t), "is a directory"),
    ("missing validation file", lambda w, t, m: _args(w, t, validation_file=t / "v.txt"), "no such file"),
    ("a pipe as train file (<(cat x): it said no such file)", lambda w, t, m: _args(w, t, train_file=_fifo(t)),
     "--train-file {tmp}/pipe.txt exists but is not a regular file (a pipe); give a file on disk"),
    ("/dev/null as validation file (it said no such file)", lambda w, t, m: _args(w, t, validation_file="/dev/null"),
     "--validation-file /dev/null exists but is not a regular file (a device)"),
    ("malformed jsonl", lambda w, t, m: _args(w, t, train_file=_file(t, "d.jsonl", '{"text": "a"}\n{oops\n')),
     ":2: not valid JSON"),
    ("jsonl without text", lambda w, t, m: _args(w, t, train_file=_file(t, "d.jsonl", '{"body": "a"}\n')),
     "`text` field"),
    ("jsonl text not a string", lambda w, t, m: _args(w, t, train_file=_file(t, "d.jsonl", '{"text": [1]}\n')),
     "must be a string"),
    ("binary file", lambda w, t, m: _args(w, t, train_file=_file(t, "d.txt", b"\x7fELF\x00\x01\x02")), "binary"),
    ("non-utf8 text", lambda w, t, m: _args(w, t, train_file=_file(t, "d.txt", b"caf\xe9 au lait\n")), "UTF-8"),
    ("empty corpus", lambda w, t, m: _args(w, t, train_file=_file(t, "d.txt", "")), "d.txt holds no text"),
    ("corpus shorter than a block", lambda w, t, m: _args(w, t, train_file=_file(t, "d.txt", "the sky\n")),
     "fewer than one block of --block-size 16 + 1; give more text or a smaller --block-size"),
    ("validation set with no tokens", lambda w, t, m: _args(w, t, validation_file=_file(t, "v.txt", "\n  \n")),
     "--validation-file"),
    ("validation set shorter than a block", lambda w, t, m: _args(
        w, t, validation_file=_file(t, "v.jsonl", '{"text": "hi"}\n')), "v.jsonl has 3 tokens, fewer than one block"),
    ("zero train steps", lambda w, t, m: _args(w, t, train_steps=0), "--train-steps must be"),
    ("negative train steps", lambda w, t, m: _args(w, t, train_steps=-5), "--train-steps must be"),
    ("zero block size", lambda w, t, m: _args(w, t, block_size=0), "--block-size must be"),
    ("zero batch size", lambda w, t, m: _args(w, t, per_device_batch_size=0), "--per-device-batch-size must be"),
    ("negative save steps", lambda w, t, m: _args(w, t, save_steps=-1), "--save-steps must be"),
    ("zero eval steps", lambda w, t, m: _args(w, t, eval_steps=0), "--eval-steps must be"),
    ("block larger than the model", lambda w, t, m: _args(w, t, block_size=1000), "exceeds"),
    ("NaN learning rate", lambda w, t, m: _args(w, t, student_lr="nan"), "finite number"),
    ("negative adam eps (it was named after --student-lr)", lambda w, t, m: _args(w, t, adam_eps=-1),
     "--adam-eps must be ≥ 0, got -1.0"),
    ("zero steps of a comparison (it was named --train-steps)", lambda w, t, m: [
        "compare-precision", *_args(w, t, drop=("--precision", "--train-steps"))[1:], "--steps", "0"],
     "--steps must be ≥ 1, got 0"),
    ("Inf temperature", lambda w, t, m: _args(w, t, temperature="inf"), "finite number"),
    ("text for a number", lambda w, t, m: _args(w, t, train_steps="ten"), "--train-steps"),
    ("seed of the clock in nanoseconds", lambda w, t, m: _args(w, t, seed=1796524207872889996),
     "--seed must lie in 0 … 4294967295, got 1796524207872889996"),
    ("negative seed", lambda w, t, m: _args(w, t, seed=-1), "--seed must lie in 0"),
    ("report of an empty RUN_DIR (an unset variable)", lambda w, t, m: ["report", ""],
     "an empty argument ('': an unset shell variable?) where report takes RUN_DIR"),
    ("events of an empty RUN_DIR", lambda w, t, m: ["events", "", "--severity", "critical"],
     "an empty argument ('': an unset shell variable?) where events takes RUN_DIR"),
    ("check of an empty RUN_DIR after its options (it checked the current directory)", lambda w, t, m: [
        "check", "--expect", "completed", ""], "an empty argument ('': an unset shell variable?) where check takes "
     "RUN_DIR"),
    ("events of an empty RUN_DIR after its options (it listed the current directory)", lambda w, t, m: [
        "events", "--severity", "info", ""], "an empty argument ('': an unset shell variable?) where events takes "
     "RUN_DIR"),
    ("report of an empty RUN_DIR after --", lambda w, t, m: ["report", "--", " "],
     "an empty argument (' ': an unset shell variable?) where report takes RUN_DIR"),
    ("check with an infinite --max-eval-ppl (it passed every run, a diverged one too)", lambda w, t, m: [
        "check", _recorded_run(t, **_options_of(w)), "--max-eval-ppl", "inf"],
     "--max-eval-ppl must be a finite number > 0, got inf"),
    ("events at a negative step", lambda w, t, m: ["events", _recorded_run(t, **_options_of(w)), "--step", "-3"],
     "--step '-3': steps count from 0"),
    ("empty train file (an unset variable)", lambda w, t, m: _args(w, t, train_file=""),
     "--train-file is empty ('': an unset shell variable?); give a value, or leave the option out"),
    ("events of an empty --kind (it listed every event)", lambda w, t, m: ["events", _recorded_run(
        t, **_options_of(w)), "--kind", ""], "--kind is empty ('': an unset shell variable?)"),
    *((f"check --expect {name} of a run whose config.json is damaged ({before})", lambda w, t, m, name=name: [
        "check", "--expect", name, _damaged_run(t)], "{tmp}/run/config.json is not valid JSON (Expecting value: "
       "line 2 column 1 (char 13)): a run directory is read through it; restore it whole")
      for name, before in (("completed", "it said to run `report`, which refused it"), ("master-fp32", "exit 3"))),
    *((f"{command} of a run whose config.json records its precision as a string (exit 3)",
       lambda w, t, m, command=command, extra=extra: [command, *extra, _recorded_run(t, precision_block="fp32")],
       "{tmp}/run/config.json: its precision is 'fp32', where a run records a mapping of what ran")
      for command, extra in (("report", ()), ("check", ("--expect", "completed")))),
    ("check of a run whose summary.json is damaged (exit 3)", lambda w, t, m: [
        "check", "--expect", "completed", _cut_summary(t)],
     "{tmp}/run/summary.json is not valid JSON (Expecting value: line 1 column 12 (char 11)): `sarkd-diag report "
     "{tmp}/run` writes it again from the run's logs"),
    ("check of a run whose summary.json holds a list, not an object (exit 3)", lambda w, t, m: [
        "check", "--expect", "completed", _listed_summary(t)],
     "{tmp}/run/summary.json holds a JSON list, where a run's summary is an object: `sarkd-diag report {tmp}/run` "
     "writes it again from the run's logs"),
    ("check with an empty --expect (it checked one expectation fewer)", lambda w, t, m: [
        "check", _recorded_run(t, **_options_of(w)), "--expect", "", "--max-eval-ppl", "30"], "--expect is empty"),
    ("compare-precision of an empty --modes (it ran every mode)", lambda w, t, m: [
        "compare-precision", *_args(w, t, drop=("--precision",))[1:], "--modes", " , "],
     "--modes is empty (' , ': an unset shell variable?)"),
    ("compare-precision of a mode named twice (it ran the mode once, the mode meant not at all)", lambda w, t, m:
     _compare(w, t, "--modes", "float32"), "--modes fp32,float32 names fp32 twice (fp32, float32): each mode runs "
     "once; drop the repeat, or name the mode you meant (not yet named: mixed, bf16-mixed, pure-fp16, pure-bf16)"),
    ("empty student model", lambda w, t, m: _args(w, t, student_model=" "), "--student-model is empty"),
    ("tokenizer without pad and eos", lambda w, t, m: _args(w, t, student_model=_no_special_tokens(w, t)),
     "neither a pad nor an eos token"),
    ("tokenizer ids beyond the student's embeddings (an IndexError, exit 3)", lambda w, t, m: _args(
        w, t, student_model=_fewer_embeddings(w, t)), "--student-model {tmp}/model has 8 token embeddings, but the "
     "tokenizer of {tmp}/model gives the data token id"),
    ("tokenizer ids beyond a dual-tokenizer teacher's embeddings (an IndexError, exit 3)", lambda w, t, m: _args(
        w, t, teacher_model=_fewer_embeddings(w, t)), "--teacher-model {tmp}/model has 8 token embeddings"),
    ("model directory without weights", lambda w, t, m: _args(
        w, t, student_model=_drop(_model_copy(w, t), "model.safetensors")), "model path {tmp}/model has no weights "
     "(*.safetensors or *.bin): save the model (model.save_pretrained) there"),
    ("missing model directory", lambda w, t, m: _args(w, t, student_model=t / "no-model"), "no such directory"),
    ("a hub model's web address (it said no such directory)", lambda w, t, m: _args(
        w, t, student_model="https://huggingface.co/microsoft/DialoGPT-small"),
     "is a web address: give its hub id, microsoft/DialoGPT-small, not the URL"),
    ("a hub id with a space (transformers' own message)", lambda w, t, m: _args(
        w, t, teacher_model="microsoft/DialoGPT small"),
     "model 'microsoft/DialoGPT small' is neither a local directory nor a valid hub id"),
    ("file as model directory", lambda w, t, m: _args(w, t, student_model=w["train"]), "is a file"),
    ("unknown embedded model", lambda w, t, m: _args(w, t, teacher_model="embedded:huge"), "unknown embedded"),
    ("output dir holding a different run", lambda w, t, m: [*_args(w, t), "--student-lr", "0.5"]
     if _recorded_run(t, **{**_options_of(w), "student_lr": 0.1}) else [], "--output-dir {tmp}/run holds a different "
     "run (options differ: student_lr); give another --output-dir for a new run, --overwrite to replace it, or "
     "continue it with its own options: sarkd-diag train --config {tmp}/run/config.json --resume"),
    ("output dir holding the same run", lambda w, t, m: _args(w, t) if _recorded_run(t, **_options_of(w)) else [],
     "--resume to continue it, --overwrite to replace it, or another --output-dir for a new run"),
    ("overwrite of a directory that is no run", lambda w, t, m: _args(w, t, overwrite=True)
     if _file(t, "run", b"") and _swap_for_dir(t / "run") else [], "holds no sarkd-diag run"),
    ("overwrite of a model directory", lambda w, t, m: _args(w, t, output_dir=_model_copy(w, t), overwrite=True),
     "not a sarkd-diag run"),
    *((f"train {' '.join(extra)} into a comparison (it was 'not empty and holds no sarkd-diag run')".replace(
        "  ", " "), lambda w, t, m, extra=extra: [*_args(w, t, output_dir=_comparison(t)), *extra],
       "--output-dir {tmp}/comparison holds a compare-precision comparison (compare_options.json, runs/<mode>/), "
       "not a run; give train another directory (to continue one mode's run: sarkd-diag train --output-dir "
       "'{tmp}/comparison/runs/<mode>' --resume)") for extra in ((), ("--overwrite",))),
    ("comparison over a project's runs/ (--overwrite deleted them)", lambda w, t, m: _compare(
        w, t, "--output-dir", _project_with_runs(t), "--overwrite"),
     "--output-dir {tmp}/project is not empty and holds no comparison; choose another directory (--overwrite only "
     "replaces a comparison)"),
    ("comparison over a train run (--overwrite replaced its summary.json)", lambda w, t, m: _compare(
        w, t, "--output-dir", _recorded_run(t, **_options_of(w)), "--overwrite"),
     "--output-dir {tmp}/run holds a `train` run; choose another directory"),
    ("output path that is a file", lambda w, t, m: _args(w, t, output_dir=_file(t, "out", "x")), "is a file"),
    ("output path below a file", lambda w, t, m: _args(w, t, output_dir=_file(t, "out", "x") / "run"),
     "is a file"),
    ("output path not writable", lambda w, t, m: _args(w, t, output_dir="/proc/sarkd-diag-test/run"),
     "not writable"),
    ("resume with nothing there", lambda w, t, m: _args(w, t, resume=True), "nothing to resume"),
    ("resume without a checkpoint", lambda w, t, m: _args(w, t, resume=True) if _recorded_run(t, **_options_of(w))
     else [], "no checkpoint yet"),
    ("resume with only a corrupted checkpoint", lambda w, t, m: _corrupt_checkpoint(w, t), "loads"),
    ("resume with other options", lambda w, t, m: [*_args(w, t, resume=True), "--temperature", "3"]
     if _recorded_run(t, **_options_of(w)) else [], "other options"),
    ("resume-from a run directory", lambda w, t, m: _args(w, t, output_dir=t / "new",
                                                           resume_from=_run_with_checkpoint(w, t)),
     "--resume-from {tmp}/run: not a checkpoint but a run directory; its newest checkpoint is "
     "{tmp}/run/checkpoints/step-00000002 (or continue the run itself: sarkd-diag train --output-dir {tmp}/run "
     "--resume)"),
    ("resume and overwrite", lambda w, t, m: _args(w, t, resume=True, overwrite=True), "give one of them"),
    ("resume-from a directory that is no checkpoint", lambda w, t, m: _args(w, t, resume_from=t),
     "not a checkpoint"),
    ("float32 dtype with mixed precision", lambda w, t, m: _args(w, t, model_dtype="float32", precision="mixed"),
     "conflicts"),
    ("ambiguous fp16", lambda w, t, m: _args(w, t, precision="fp16"), "ambiguous"),
    ("cuda without a GPU", lambda w, t, m: _args(w, t, device="cuda"), "no CUDA device"),
    ("unknown option", lambda w, t, m: [*_args(w, t), "--learning-rate", "1e-3"],
     "train has no option --learning-rate: write --student-lr"),
    ("missing config file", lambda w, t, m: [*_args(w, t), "--config", t / "c.yaml"], "no such file"),
    ("a run directory as config file (it said no such file)", lambda w, t, m: [
        *_args(w, t, output_dir=t / "new"), "--config", _recorded_run(t, **_options_of(w))],
     "--config {tmp}/run is a directory, not a YAML or JSON file; the options this run was given are in "
     "{tmp}/run/config.json"),
    ("config file that is not YAML", lambda w, t, m: [*_args(w, t), "--config", _file(t, "c.yaml", "a: [1\n")],
     "YAML"),
    ("config file of another extension", lambda w, t, m: [*_args(w, t), "--config", _file(t, "c.txt", "seed: 1\n")],
     "not valid JSON (Expecting value: line 1 column 1); a YAML file needs the extension .yaml or .yml"),
    ("config file that is not JSON", lambda w, t, m: [*_args(w, t), "--config", _file(t, "c.json", '{"seed":\n')],
     "--config " + "{tmp}/c.json: not valid JSON (Expecting value: line 2 column 1)"),
    ("config file with an unknown key", lambda w, t, m: [*_args(w, t), "--config", _file(t, "c.json",
                                                                                       '{"lr": 1}')], "unknown"),
    ("dataset and train file", lambda w, t, m: _args(w, t, dataset_name="wikitext"), "not both"),
    ("student weights cut short (the library said: incomplete metadata, file not fully covered)",
     lambda w, t, m: _args(w, t, student_model=_cut_short_weights(w, t)),
     "{tmp}/model/model.safetensors is cut short ("),
    ("a run's checkpoint as the student", lambda w, t, m: _args(w, t, output_dir=t / "new",
                                                                student_model=_checkpoint_of_a_run(w, t)),
     "is a sarkd-diag checkpoint (the trainable weights and training state --resume-from continues), not a model: "
     "the run's trained student is in {tmp}/run/student"),
    ("a Probes run as the output dir (it offered --resume)", lambda w, t, m: _args(w, t, output_dir=_probes_run(t)),
     "--output-dir {tmp}/run holds the run a training loop's Probes wrote, not a `train` run; give another "
     "--output-dir for a new run, or --overwrite to replace it"),
    ("--resume of a Probes run (it said --save-steps None)",
     lambda w, t, m: _args(w, t, output_dir=_probes_run(t), resume=True),
     "--resume: nothing to resume, {tmp}/run holds the run a training loop's Probes wrote, not a `train` run"),
    ("a run's config.json without --output-dir (refused as --output-dir, which was never typed)", lambda w, t, m: [
        "train", "--config", _recorded_run(t, output_dir=str(t / "run"), **_options_of(w)) / "config.json"],
     "--config {tmp}/run/config.json's output_dir {tmp}/run holds a run already; pass --resume to continue it, "
     "--overwrite to replace it, or another --output-dir for a new run"),
]


def _drop(directory: Path, name: str) -> Path:
    (directory / name).unlink()
    return directory


def _swap_for_dir(path: Path) -> bool:
    """`path` as a non-empty directory of someone else's files (a notes.txt)."""
    path.unlink()
    path.mkdir()
    (path / "notes.txt").write_text("mine\n")
    return True


def _tree(*roots: Path) -> dict:
    """Every path under the roots, with each file's mode and bytes."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_dir():
                out[p] = None
                continue
            if not os.access(p, os.R_OK) or not p.is_file():  # a FIFO's open would wait for a writer
                out[p] = (p.stat().st_mode, None)
                continue
            with open(p, "rb") as f:  # not Path.read_bytes, which a case may have made fail
                out[p] = (p.stat().st_mode, f.read())
    return out


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("build, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_touches_nothing(cli, tiny_world, tmp_path, monkeypatch, build, phrase):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a stray default run directory would show up here
    args = build(tiny_world, tmp_path, monkeypatch)
    before = _tree(tmp_path, tiny_world["root"])
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sarkd-diag: error:"), err
    assert phrase.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _tree(tmp_path, tiny_world["root"]) == before


def test_an_unreachable_hub_for_a_dataset_is_one_line_in_seconds(tiny_world, tmp_path):
    """README: an unreachable hub is one line in seconds rather than a minute of retries. For --dataset-name it was
    twelve lines of datasets' retries (about 25 s), then the error."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env = {**clean, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = _args(tiny_world, tmp_path, drop=("--train-file", "--validation-file"), dataset_name="wikitext")
    result = subprocess.run([sys.executable, "-m", "sarkd_diag", *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("sarkd-diag: error: cannot load dataset 'wikitext': the hub at http://127.0.0.1:9 "
                             "cannot be reached (Connection refused); check the network, or give a local "
                             "--train-file\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "closed port"])
def test_an_unreachable_hub_is_one_line_and_exit_2(tiny_world, tmp_path, env):
    hub_id = "microsoft/DialoGPT-small"
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env = {**clean, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([sys.executable, "-m", "sarkd_diag", *map(str, _args(tiny_world, tmp_path,
                                                                                 student_model=hub_id))],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and hub_id in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_the_readme_counts_these_cases():
    """The README says how many cases there are: adding one must not leave it telling an old number."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"({len(CASES)} cases in `tests/e2e/test_bad_input.py`)" in readme
