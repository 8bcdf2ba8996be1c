"""What a newcomer tripped over at the command line (issue 14): help, -h, --version, quick answers, and the
messages of bad model paths, offline hub ids, train files of other formats and --resume without a checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from sarkd_diag import __version__
from sarkd_diag.cli import app
from sarkd_diag.contract.config import build_config, value_type

COMMANDS = [[], ["train"], ["env"], ["report"], ["compare-precision"], ["events"], ["check"], ["estimate-memory"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_h_is_help_for_every_command(cli, command):
    code, out, err = cli(*command, "-h")
    assert code == 0, err
    assert out.startswith("Usage: sarkd-diag") and "-h, --help" in out


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out == f"sarkd-diag {__version__}\n"


def _train_help(cli) -> str:
    code, out, _ = cli("train", "--help")
    assert code == 0
    return out


def test_flags_show_no_value_placeholder_and_booleans_show_both_forms(cli):
    out = _train_help(cli)
    assert "<bool>" not in out and "<str>" not in out and "<int>" not in out
    assert "--use-scheduler / --no-use-scheduler" in out
    help_line = next(line for line in out.splitlines() if "--help" in line)
    assert "<" not in help_line
    assert "--train-steps N" in out and "--student-lr X" in out  # values say what they take


def test_help_shows_defaults(cli):
    text = " ".join(_train_help(cli).split())  # wrapped help as one line
    assert "Optimizer steps. [default: 120]" in text
    assert "Use a learning-rate schedule with warmup. [default: off]" in text
    assert "[default: auto]" in text  # --precision, --log-every


def test_underscore_aliases_are_hidden_from_help_but_still_parse(cli):
    out = _train_help(cli)
    assert "--train_steps" not in out and "--no_use_scheduler" not in out and "--use-scheduler" in out
    command = typer.main.get_command(app).commands["train"]
    params = command.make_context("train", ["--train_steps", "3", "--use_scheduler", "--log_every", "2"]).params
    cfg = build_config({k: v for k, v in params.items() if k != "config"})
    assert (cfg.train_steps, cfg.use_scheduler, cfg.log_every) == (3, True, 2)
    assert any("--train_steps" in p.opts for p in command.params)  # declared: the original scripts' spelling


@pytest.mark.parametrize(("typed", "count"), [("1e3", 1000), ("1_000", 1000), ("3.0", 3), ("-2", -2)])
def test_a_count_is_read_as_typed_by_every_command(typed, count):
    """`--train-steps 1e3` was refused as 'not a whole number' although a --config file's `train_steps: 1e3` trained
    1000 steps: every whole-number option of every command reads a number whose value is whole (a negative one is
    then refused by its range check, with the option named)."""
    group = typer.main.get_command(app)
    counts = [(name, p) for name, command in group.commands.items() for p in command.params
              if p.param_type_name == "option" and value_type(p.type_descriptor.annotation) is int]
    shown = {p.opts[0] for _, p in counts}
    assert {"--train-steps", "--steps", "--rank", "--max-skipped-steps", "--block-size"} <= shown
    for name, param in counts:
        arguments = ["RUN"] * sum(p.param_type_name == "argument" for p in group.commands[name].params)
        params = group.commands[name].make_context(name, [*arguments, param.opts[0], typed]).params
        assert params[param.name] == count, (name, param.opts[0])


def test_a_choice_typed_in_another_case_is_the_choice_meant(tmp_path):
    """`--precision BF16-mixed` and `events --severity Warning` were read as meant, but `--probes Full`, `--on-nonfinite
    Stop`, a YAML file's `kd_loss: Forward-KL` and `check --expect Completed` were refused: every choice is read in any
    case and recorded as the choices spell it."""
    from sarkd_diag.presentation.query import expectations

    (tmp_path / "run.yaml").write_text("kd_loss: Forward-KL\nreport_to: NONE\n")
    typed = {"probes": "Full", "on_nonfinite": " Stop", "scheduler_type": "LINEAR", "model_dtype": "BFloat16"}
    config = build_config(typed, tmp_path / "run.yaml")
    assert (config.probes, config.on_nonfinite, config.scheduler_type, config.model_dtype, config.kd_loss,
            config.report_to) == ("full", "stop", "linear", "bfloat16", "forward-kl", "none")
    assert list(expectations(["Completed,No-Critical", "MASTER-FP32"])) == ["completed", "no-critical", "master-fp32"]


HEAVY = ("torch", "transformers", "pandas", "matplotlib", "datasets")


@pytest.mark.parametrize(("args", "allowed"), [(["--help"], ()), (["--version"], ()), (["train", "-h"], ()),
                                               (["env"], ())])
def test_help_version_and_env_import_only_what_they_need(args, allowed):
    """--help, --version and env import no torch, transformers or pandas (0.06 s instead of 1.9 s here): env
    imports torch only on a machine with NVIDIA's driver, to ask it for the CUDA device."""
    code = ("import sys\nfrom sarkd_diag.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    loaded = result.stdout.strip().splitlines()[-1]
    assert loaded == f"LOADED {sorted(allowed)!r}", result.stdout + result.stderr


# ------------------------------------------------------------------------------------ models
def test_offline_hub_model_says_it_cannot_be_loaded_not_router_patterns(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}, "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sarkd_diag", "estimate-memory", "--teacher-model",
                             "microsoft/DialoGPT-large"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--router-patterns" not in lines[0], lines
    assert "cannot load --teacher-model 'microsoft/DialoGPT-large'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_a_bad_router_pattern_is_still_named(cli):
    code, _, err = cli("estimate-memory", "--router-patterns", "(")
    assert code == 2 and err.startswith("sarkd-diag: error: --router-patterns '('") and err.count("\n") == 1


def _run_dir(tmp_path: Path, with_student: bool) -> Path:
    run = tmp_path / "somerun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {"seed": 1}, "precision": {"mode": "fp32"}}))
    if with_student:
        (run / "student").mkdir()
        (run / "student" / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize("with_student", [True, False])
def test_a_run_directory_as_model_points_at_its_student(cli, tiny_args, tmp_path, with_student):
    run = _run_dir(tmp_path, with_student)
    code, _, err = cli("train", *tiny_args, "--student-model", run)
    assert code == 2 and err.count("\n") == 1
    assert f"{run} is a sarkd-diag run directory" in err
    if with_student:
        assert err.strip().endswith(f"its trained student is in {run / 'student'}")
    else:
        assert "without a trained student" in err
    assert not (Path(tiny_args[-1])).exists()


@pytest.mark.parametrize("kept, says", [
    (("config.json", "model.safetensors"), "has no tokenizer files (tokenizer.json, tokenizer_config.json, "
     "vocab.json, ...): save its tokenizer (tokenizer.save_pretrained) there"),
    (("config.json",), "has no weights (*.safetensors or *.bin) and no tokenizer files (tokenizer.json, "
     "tokenizer_config.json, vocab.json, ...): save the model (model.save_pretrained) and its tokenizer "
     "(tokenizer.save_pretrained) there"),
    (("tokenizer.json", "tokenizer_config.json"), "has no config.json and no weights (*.safetensors or *.bin): save "
     "the model (model.save_pretrained) there"),
    ((), "holds no model: it has no config.json, no weights (*.safetensors or *.bin) and no tokenizer files "
     "(tokenizer.json, tokenizer_config.json, vocab.json, ...); give a directory written by save_pretrained (the "
     "model's and its tokenizer's)"),
], ids=["no tokenizer", "config only (it was told to save a tokenizer)", "tokenizer only", "empty"])
def test_a_model_directory_missing_parts_names_all_it_lacks(cli, tiny_args, tiny_world, tmp_path, kept, says):
    """transformers names one missing file at a time, and the tokenizer loads first: a directory holding only a
    config.json was told to save a tokenizer, and would then be told it has no weights."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in kept:
        (partial / name).write_bytes((tiny_world["student"] / name).read_bytes())
    code, _, err = cli("train", *tiny_args, "--student-model", partial)
    assert code == 2 and err == f"sarkd-diag: error: model path {partial} {says}\n"
    assert not Path(tiny_args[-1]).exists()


def test_a_trainers_output_directory_points_at_the_model_directories_inside(cli, tiny_args, tiny_world, tmp_path):
    import shutil

    output = tmp_path / "trainer-output"
    for name in ("checkpoint-500", "checkpoint-1000"):
        shutil.copytree(tiny_world["student"], output / name)
    code, _, err = cli("train", *tiny_args, "--student-model", output)
    assert code == 2 and err.count("\n") == 1
    assert err.rstrip().endswith("give the model directory inside it: checkpoint-1000, checkpoint-500")


@pytest.mark.parametrize("kind", ["t5", "vit"])
def test_a_model_of_another_kind_is_named_not_an_unrecognized_configuration_class(cli, tiny_args, tiny_world,
                                                                                 tmp_path, kind):
    """An encoder-decoder (T5) or a vision model (ViT, which has no tokenizer either) in a local directory: one line
    naming what the directory holds, not transformers' "Unrecognized configuration class", nor a missing tokenizer;
    estimate-memory, which reads no weights, says the same."""
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

    model = tmp_path / kind
    if kind == "t5":
        T5ForConditionalGeneration(T5Config(vocab_size=257, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                            d_kv=8)).save_pretrained(model)
        (model / "tokenizer.json").write_bytes((tiny_world["student"] / "tokenizer.json").read_bytes())
        holds = "a t5 model (T5ForConditionalGeneration, an encoder-decoder)"
    else:
        ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8)).save_pretrained(model)
        holds = "a vit model (ViTModel)"
    for command in (["train", *tiny_args], ["estimate-memory"]):
        code, _, err = cli(*command, "--teacher-model", model)
        assert code == 2 and err == (f"sarkd-diag: error: model path {model} holds {holds}, not a causal language "
                                     "model: sarkd-diag distils decoder-only LMs (GPT-2, Llama, Mistral, Qwen, "
                                     "Mixtral, ...); give one of those\n")
    assert not Path(tiny_args[-1]).exists()


def test_a_load_error_is_joined_into_one_complete_line():
    from sarkd_diag.train.models import model_load_error

    exc = ValueError("Couldn't instantiate the backend tokenizer from one of:\n(1) a `tokenizers` file,\n(2) a slow "
                     "tokenizer to convert.")
    text = str(model_load_error("tokenizer", "x", exc))
    assert "\n" not in text and text.endswith("(2) a slow tokenizer to convert.")


# -------------------------------------------------------------------------------- train files
def test_csv_train_files_read_their_text_column_and_unknown_extensions_are_refused(tmp_path):
    from sarkd_diag.contract.errors import BadInput
    from sarkd_diag.train.data import read_text_file

    csv = tmp_path / "d.csv"
    csv.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n3,\n')
    assert read_text_file(str(csv)) == ["hello, world", "two\nlines"]
    plain = tmp_path / "d.text"
    plain.write_text("a b\n\nc d\n")
    assert read_text_file(str(plain)) == ["a b", "c d"]
    nocol = tmp_path / "n.csv"
    nocol.write_text("id,body\n1,x\n")
    with pytest.raises(BadInput, match="`text` column"):
        read_text_file(str(nocol))
    other = tmp_path / "d.parquet"
    other.write_text("x")
    with pytest.raises(BadInput, match="unknown text format '.parquet'"):
        read_text_file(str(other))


@pytest.mark.parametrize(("name", "content", "documents"), [
    ("d.csv", 'text,id\n"hello, world",1\n', ["hello, world"]),
    ("d.jsonl", '{"text": "hello"}\n', ["hello"]),
    ("d.txt", "hello\n", ["hello"]),
])
def test_a_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path, name, content, documents):
    """Excel's "CSV UTF-8" and Windows editors begin a file with a UTF-8 byte-order mark: a .csv was refused for
    lacking the `text` column it showed (`columns: \ufefftext, id`), a .jsonl as `not valid JSON (Unexpected UTF-8
    BOM)`, and a .txt trained on the mark as part of its first document."""
    from sarkd_diag.train.data import read_text_file

    path = tmp_path / name
    path.write_text(content, encoding="utf-8-sig")
    assert read_text_file(str(path)) == documents


@pytest.mark.parametrize(("name", "content"), [
    ("d.jsonl", '{"text": ""}\n{"text": "hello"}\n\n{"text": " \\t "}\n'),
    ("d.csv", 'text\n""\nhello\n" \t "\n'),
    ("d.txt", "\nhello\n \t \n"),
])
def test_empty_and_blank_documents_are_skipped_in_every_format(cli, tiny_args, tmp_path, name, content):
    """A .jsonl's empty or blank `text` values were read as documents (each an end-of-text token in the training
    stream), although the refusal of an empty corpus says `empty text values are skipped`, as a .txt's blank lines
    and a .csv's empty values are: a .jsonl of blank texts was 'N tokens, fewer than one block' — not 'holds no
    text'."""
    from sarkd_diag.train.data import read_text_file

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert read_text_file(str(path)) == ["hello"]
    blank = "\n".join(line for line in content.splitlines() if "hello" not in line) + "\n"
    path.write_text(blank, encoding="utf-8")
    code, _, err = cli("train", *tiny_args, "--train-file", path)
    assert code == 2 and err == (f"sarkd-diag: error: --train-file {path} holds no text (blank lines and empty `text` "
                                 "values are skipped); give at least one document\n")


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """`--config run.json` saved by a Windows editor was `not valid JSON (Unexpected UTF-8 BOM ...)`."""
    config = tmp_path / "run.json"
    config.write_text('{"train_steps": 3}', encoding="utf-8-sig")
    assert build_config({}, config).train_steps == 3


@pytest.mark.parametrize("name, content, says", [
    ("d.csv", "prompt,answer\n1,2\n", "d.csv: a .csv needs a header row with a `text` column; its header has 2 "
     "columns (`prompt`, `answer`); the documents are read from `text` only: rename the column that holds them to "
     "`text`, or give a .txt file of one document a line"),
    ("d.jsonl", '{"text": "a"}\n{"prompt": "hi", "completion": "there"}\n', "d.jsonl:2: expected an object with a "
     "`text` field; this one has 2 fields (`prompt`, `completion`); the documents are read from `text` only: rename "
     "the field that holds them to `text`, or give a .txt file of one document a line"),
    ("d.jsonl", '["hi", "there"]\n', "d.jsonl:1: expected an object with a `text` field, got an array"),
])
def test_a_file_without_a_text_field_names_the_fields_it_has_and_what_to_do(cli, tiny_args, tmp_path, name,
                                                                            content, says):
    """It said `expected an object with a `text` field` alone: which field holds the documents, and what then?"""
    data = tmp_path / name
    data.write_text(content)
    code, _, err = cli("train", *tiny_args, "--train-file", data)
    assert code == 2 and err == f"sarkd-diag: error: --train-file {tmp_path}/{says}\n"


# --------------------------------------------------------------------------------------- resume
def test_resume_without_a_checkpoint_says_why(cli, tiny_args, tmp_path):
    run = Path(tiny_args[-1])
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {"save_steps": 0}, "precision": {"mode": "fp32"}}))
    before = (run / "config.json").read_bytes()
    code, _, err = cli("train", *tiny_args, "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "no checkpoint yet" in err and "--save-steps 0" in err and "kill -9" in err
    assert (run / "config.json").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_json_files_of_a_run_get_the_usual_mode(tmp_path):
    from sarkd_diag.contract.rundir import write_json_atomic

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_the_bare_command_prints_its_help(cli):
    code, out, err = cli()
    assert code == 0 and out.startswith("Usage: sarkd-diag") and "compare-precision" in out and err == ""


@pytest.mark.parametrize(("args", "flag"), [(["--use-scheduler", "true"], "--use-scheduler"),
                                            (["--no_use_scheduler", "0"], "--no_use_scheduler"),
                                            (["--overwrite", "False"], "--overwrite")])
def test_a_value_after_a_flag_says_the_flag_takes_none(cli, tiny_args, args, flag):
    code, _, err = cli("train", *tiny_args, *args)
    assert code == 2 and err.count("\n") == 1
    assert f"{flag} is a flag and takes no value" in err and "--no-" in err
    assert not Path(tiny_args[-1]).exists()


def test_a_config_field_of_another_type_still_becomes_an_option():
    """Options are mapped from the fields' real types: a type the CLI has not seen before (a Path, a Literal)
    builds an option that parses, rather than failing when the module is imported."""
    from dataclasses import dataclass, field, fields
    from typing import Literal, get_type_hints

    from sarkd_diag.cli import config_option

    @dataclass
    class Other:
        where: Path | None = field(default=None, metadata={"help": "A place."})
        mode: Literal["a", "b"] = field(default="a", metadata={"help": "A or b.", "metavar": "MODE"})
        ratio: float = field(default=0.5, metadata={"help": "A ratio."})

    hints = get_type_hints(Other, localns={"Path": Path, "Literal": Literal})
    options = {f.name: config_option(f, hints[f.name]) for f in fields(Other)}
    assert options["where"].help == "A place. [default: none]" and options["mode"].metavar == "MODE"
    assert options["ratio"].metavar == "X" and options["where"].declarations == ["--where"]
    command = typer.core.TyperCommand("x", params=[o.parameter() for o in options.values()])
    params = command.make_context("x", ["--where", "/tmp", "--mode", "b", "--ratio", "2"]).params
    assert params == {"where": Path("/tmp"), "mode": "b", "ratio": 2.0}


# ---------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize(("args", "start"), [
    (["estimate-memory", "--modes", "fp32,fp16"], "--modes fp16 is ambiguous"),
    (["estimate-memory", "--modes", "mixd"], "--modes mixd: not a precision mode"),
    (["estimate-memory", "--modes", "auto"], "--modes takes precision modes, not auto"),
    (["train", "--precision", "mixd"], "--precision mixd: not a precision mode"),
])
def test_a_wrong_mode_is_named_with_the_option_it_was_typed_in(cli, tmp_path, monkeypatch, args, start):
    """estimate-memory's --modes said `--precision fp16 is ambiguous`, an option the command does not have."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"sarkd-diag: error: {start}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["train", "--precision", "bf16mixed"], "--precision bf16mixed: not a precision mode (did you mean bf16-mixed?); "),
    (["compare-precision", "--modes", "fp32,mixd"], "--modes mixd: not a precision mode (did you mean mixed?); "),
    (["train", "--probes", "ful"], "--probes must be one of off, standard, full; got 'ful' (did you mean full?)"),
    (["train", "--kd-loss", "reverse_kl"], "--kd-loss must be one of forward-kl, reverse-kl, jsd; got 'reverse_kl' "
     "(did you mean reverse-kl?)"),
    (["events", "RUN", "--kind", "nonfinite-params"], "--kind nonfinite-params: not an event kind (did you mean "
     "nonfinite_param?); kinds: "),
    (["events", "RUN", "--severity", "crit"], "--severity 'crit' (did you mean critical?): choose one of info, "),
    (["events", "RUN", "--format", "jsn"], "--format 'jsn' (did you mean json?): choose one of table, json, csv"),
    (["check", "RUN", "--expect", "complete"], "--expect complete: unknown (did you mean completed?); expectations: "),
    (["train", "--probes", "verbose"], "--probes must be one of off, standard, full; got 'verbose'\n"),
    (["train", "--precision", "16"], "--precision 16 is ambiguous: say `mixed` "),  # not `did you mean bf16?`
])
def test_a_mistyped_choice_is_answered_with_the_choice_meant(cli, tmp_path, monkeypatch, args, says):
    """A mistyped option name got `did you mean --block-size?`, a mistyped value only the list of choices to search
    (37 event kinds for `--kind`); a value close to none gets the list alone."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {}, "precision": {"mode": "fp32"}}))
    code, out, err = cli(*[str(run) if a == "RUN" else a for a in args])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"sarkd-diag: error: {says}" in err, err


@pytest.mark.parametrize("content, says", [
    ("train_step: 3\n", "unknown option train_step (did you mean train_steps?)"),
    ("--train-steps: 3\n", "unknown option --train-steps (did you mean train_steps?)"),
    ("1: 3\n", "unknown option 1"),  # a key YAML reads as a number: it was an internal error, exit 3
    ("train_step: 3\nlr: 1\n", "unknown options lr, train_step"),
])
def test_an_unknown_config_key_is_named_as_written_with_the_key_meant(cli, tmp_path, monkeypatch, content, says):
    """A key of a --config file got no suggestion where the same typo on the command line did, `--train-steps:`
    (an option copied into YAML) was named `__train_steps`, and a number as a key raised AttributeError."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(content)
    code, out, err = cli("train", "--config", config)
    assert (code, out, err) == (2, "", f"sarkd-diag: error: --config {config}: {says}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_compare_precision_help_shows_its_own_defaults(cli):
    """compare-precision probes every 5 steps unless told (README), but its help showed train's `[default: 10]`."""
    from sarkd_diag.contract.config import COMPARE_DEFAULTS

    code, out, _ = cli("compare-precision", "--help")
    text = " ".join(out.split())
    assert code == 0 and COMPARE_DEFAULTS["probe_every"] == 5
    assert "every N-th step. [default: 5]" in text and "[default: 10]" not in text
    assert "every N-th step. [default: 10]" in " ".join(_train_help(cli).split())


def test_compare_precision_help_describes_its_own_output_directory(cli, tmp_path, monkeypatch):
    """compare-precision's help said --output-dir was a 'Run directory (default: a new runs/<date-time>-<mode>/)' and
    --overwrite replaced 'a run directory that holds a different run': it writes a comparison, named -compare."""
    from sarkd_diag.contract.rundir import default_run_dir

    code, out, _ = cli("compare-precision", "--help")
    text, unwrapped = " ".join(out.split()), "".join(out.split())  # help wraps paths at their dashes
    assert code == 0 and "<mode>" not in text and "holds a different run" not in text, text
    assert "runs/<date-time>-compare/" in unwrapped and "Replace an existing comparison directory." in text
    monkeypatch.chdir(tmp_path)
    assert default_run_dir("compare").name.endswith("-compare")  # what the help promises
    assert "runs/<date-time>-<mode>/" in "".join(_train_help(cli).split())


# ------------------------------------------------------------------------------------------ the Python API
@pytest.mark.parametrize(("options", "says"), [
    ({"train_steps": "2"}, "train_steps= must be a whole number, got '2'"),
    ({"train_steps": 2.5}, "train_steps= must be a whole number, got 2.5"),
    ({"student_lr": "fast"}, "student_lr= must be a number, got 'fast'"),
    ({"use_scheduler": "no"}, "use_scheduler= must be True or False, got 'no'"),
    ({"router_patterns": "gate"}, "router_patterns= must be a list of strings or None, got 'gate'"),
    ({"output_dir": 3}, "output_dir= must be a string or None, got 3"),
])
def test_distill_refuses_a_value_of_the_wrong_type_naming_the_option(tmp_path, monkeypatch, options, says):
    """`distill(train_steps="2")` was `TypeError: '<=' not supported between instances of 'str' and 'int'`, and
    `train_steps=2.5` trained: a notebook's typo met no option name, or no error at all."""
    import sarkd_diag
    from sarkd_diag.contract.errors import BadInput

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as refused:
        sarkd_diag.distill(quiet=True, **options)
    assert str(refused.value) == says
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_distill_of_a_config_with_options_changes_those_options(monkeypatch):
    """`distill(config, train_steps=2)` trained the config's 120 steps: the options beside a DistillConfig were
    dropped without a word. They change a copy of it; the caller's config is left as it was."""
    import sarkd_diag
    import sarkd_diag.train.loop as loop
    from sarkd_diag import DistillConfig

    trained = []

    class Recorded:
        def __init__(self, config, display):
            trained.append(config)

        def train(self):
            return "result"

    monkeypatch.setattr(loop, "Trainer", Recorded)
    config = DistillConfig(probes="off", output_dir="~/runs/a")
    assert sarkd_diag.distill(config, train_steps=2, student_lr=1e-3, quiet=True) == "result"
    (used,) = trained
    assert (used.train_steps, used.student_lr, used.probes) == (2, 1e-3, "off")
    assert config == DistillConfig(probes="off", output_dir="~/runs/a")  # not validated in place either


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_every_number_option_refuses_nan_and_inf(value):
    """Only the last field was checked for a while (the check slipped out of the loop over the fields): NaN and Inf
    are refused in every number option, by name."""
    from sarkd_diag import DistillConfig
    from sarkd_diag.contract.config import FIELD_TYPES
    from sarkd_diag.contract.errors import BadInput

    numbers = [name for name, hint in FIELD_TYPES.items() if value_type(hint) is float]
    assert {"student_lr", "temperature", "max_grad_norm"} <= set(numbers)
    for name in numbers:
        with pytest.raises(BadInput, match=f"^--{name.replace('_', '-')} must be a finite number, got {value}$"):
            DistillConfig(**{name: value}).validate()


def test_a_path_and_numpy_numbers_are_taken_as_meant():
    """A numpy number from a sweep passed validation and was recorded in config.json as a string (`"3"`, json's
    default=str); a Path stayed a Path in the options. Each is now the option's own type."""
    import numpy as np

    from sarkd_diag import DistillConfig

    config = DistillConfig(output_dir=Path("runs/x"), train_steps=np.int64(3), student_lr=np.float32(0.5),
                           router_patterns=("gate",)).validate()
    assert config.to_dict() == {**DistillConfig().to_dict(), "output_dir": "runs/x", "train_steps": 3,
                                "student_lr": 0.5, "router_patterns": ["gate"]}
    assert type(config.train_steps) is int and type(config.student_lr) is float
    json.dumps(config.to_dict())


# ------------------------------------------------------------------------------------------ paths given with ~
def test_a_path_given_with_a_tilde_is_the_home_directory(cli, tiny_args, tiny_world, tmp_path, monkeypatch):
    """The shell leaves `--output-dir=~/runs/a` (and a config file's `~/...`) alone: the run trained into ./~/runs/a,
    then pandas, which does expand `~`, failed to write its parquet files into $HOME/runs/a — exit 3 after the last
    step, no summary; `--train-file=~/corpus.txt` was 'no such file'. Every path a user gives has `~` expanded."""
    import shutil

    import torch

    import sarkd_diag

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    shutil.copy(tiny_world["train"], home / "corpus.txt")
    (home / "run.yaml").write_text("validation_file: ~/corpus.txt\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    args = [a for a in tiny_args[:-2] if a not in ("--validation-file", str(tiny_world["valid"]))]
    code, _, err = cli("train", *args, "--train-steps", "1", "--train-file=~/corpus.txt", "--config", "~/run.yaml",
                       "--output-dir=~/runs/a")
    assert code == 0 and err == "", err
    run = home / "runs" / "a"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run / "config.json").read_text())["options"]["train_file"] == str(home / "corpus.txt")
    assert not any(cwd.iterdir())
    for command in (["check", "~/runs/a", "--expect", "completed"], ["events", "~/runs/a"], ["report", "~/runs/a"]):
        code, _, err = cli(*command)
        assert code == 0, err
    assert sarkd_diag.load_run("~/runs/a")["summary"]["steps_completed"] == 1
    model = torch.nn.Linear(2, 2)
    with sarkd_diag.Probes(model, run_dir="~/loop") as probes:
        model(torch.ones(1, 2)).sum().backward()
        probes.step()
    assert (home / "loop" / "summary.json").is_file() and not any(cwd.iterdir())


@pytest.mark.parametrize("role", ["--student-model", "--teacher-model"])
def test_a_bidirectional_encoder_is_refused_as_no_causal_lm(cli, tiny_args, tiny_world, tmp_path, role):
    """AutoModelForCausalLM loads a BERT checkpoint (as BertLMHeadModel) without complaint: trained on next-token
    prediction it would see every answer, its loss fall to nothing and no numerical check tell. One line, exit 2,
    before a run directory exists."""
    import shutil

    from transformers import AutoConfig, BertConfig, BertForMaskedLM

    vocab = AutoConfig.from_pretrained(tiny_world["student"]).vocab_size
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    for file in tiny_world["student"].iterdir():
        if "token" in file.name or file.name in ("vocab.json", "merges.txt"):
            shutil.copy(file, bert / file.name)
    code, _, err = cli("train", *tiny_args, role, bert)
    assert code == 2 and err.count("\n") == 1
    assert f"{role} {bert} is not a causal LM" in err and "is_decoder=True" in err
    assert not Path(tiny_args[-1]).exists()


@pytest.mark.parametrize("content, says", [
    ('{"text": "a"}\n{"text": "b"}\n', " — it holds one JSON object a line (JSON Lines): rename it to d.jsonl"),
    ('[{"text": "a"}, {"text": "b"}]\n', " — it holds a JSON array: write one object a line as .jsonl (`jq -c '.[]' "
     "{path} > data.jsonl`)"),
    ('{\n  "text": "a"\n}\n', ""),
], ids=["JSON Lines", "array", "one object"])
def test_a_json_train_file_is_told_what_to_do_with_it(cli, tiny_args, tmp_path, content, says):
    """`datasets`' to_json writes JSON Lines under a .json name: it was refused with the formats alone, as a JSON
    array was, when the one is a rename away and the other a jq line."""
    data = tmp_path / "d.json"
    data.write_text(content)
    code, out, err = cli("train", *tiny_args, "--train-file", data)
    assert (code, out) == (2, "")
    assert err == (f"sarkd-diag: error: --train-file {data}: unknown text format '.json'; give `.txt` (one document a "
                   f"line), `.jsonl` (a `text` field a line) or `.csv` (a `text` column){says.format(path=data)}\n")


@pytest.mark.parametrize(("precision", "shown"), [
    ({"mode": "fp32"}, ["- precision: **fp32**\n"]),
    ({"mode": "mixed", "requested": "auto", "reason": "CUDA with fp16", "master_dtype": "torch.float32"},
     ["- precision: **mixed** (requested `auto`: CUDA with fp16)\n", "- trainable weights held in: torch.float32\n"]),
])
def test_report_reads_the_precision_fields_a_config_holds(cli, tmp_path, precision, shown):
    """`report RUN` of a hand-written or older config.json whose precision block lacked `requested` or `reason`
    ended in exit 3 (a KeyError): the report shows the fields there are and leaves out the ones there are not."""
    from sarkd_diag import DistillConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": DistillConfig().to_dict(), "precision": precision}))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    code, _, err = cli("report", str(run))
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert all(line in report for line in shown), report
    assert ("trainable weights" in report) == ("master_dtype" in precision)
    assert f"<b>{precision['mode']}</b>" in (run / "report.html").read_text()


def test_check_completed_offers_report_only_where_report_accepts_the_directory(cli, tmp_path):
    """`check --expect completed` of a directory of events whose config.json is no run's said `sarkd-diag report
    RUN` closes it, and `report` then refused the directory: check now says what report says of it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"precision": {"mode": "fp32"}}')  # no options: not a run's
    (run / "events.jsonl").write_text('{"step": 1, "time": 0, "kind": "x", "severity": "info", "message": "m"}\n')
    code, out, _ = cli("check", "--expect", "completed", str(run))
    assert code == 1
    report_code, _, refusal = cli("report", str(run))
    assert report_code == 2
    assert out.strip().endswith(refusal.strip().removeprefix("sarkd-diag: error: ")), (out, refusal)
    assert "closes it" not in out


@pytest.mark.parametrize("config", [None, '{"precision": {"mode": "fp32"}}'], ids=["no-config", "no-runs-config"])
def test_a_directory_of_a_runs_logs_without_its_config_is_called_one_thing(cli, tmp_path, config):
    """Event logs without a run's config.json: `check` read the directory as a run ('no-critical holds for 1 run')
    and said, through report's refusal, that it was 'neither a sarkd-diag run directory nor a compare-precision
    directory'. check, report and load_run now all say what it is: a run's logs whose config.json is missing."""
    from sarkd_diag import load_run

    run = tmp_path / "run"
    run.mkdir()
    if config is not None:
        (run / "config.json").write_text(config)
    (run / "events.jsonl").write_text('{"step": 1, "time": 0, "kind": "x", "severity": "info", "message": "m"}\n')
    code, out, _ = cli("check", "--expect", "no-critical,completed", str(run))
    assert code == 1 and out.startswith(f"{run}: completed: no summary.json, and `sarkd-diag report` cannot write one")
    report_code, _, refusal = cli("report", str(run))
    said = refusal.strip().removeprefix("sarkd-diag: error: ")
    assert report_code == 2 and said.startswith(f"{run} holds a run's logs but ") and "neither" not in said
    assert out.strip().endswith(said)
    with pytest.raises(ValueError) as loading:
        load_run(run)
    assert str(loading.value) == said


def _cache_as_hub_model(model: Path, hf_home: Path, repo_id: str) -> None:
    """Put a saved model in a Hugging Face cache at `hf_home` as the hub download of `repo_id` leaves it."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


@pytest.mark.parametrize("command", ["train", "estimate-memory"])
def test_a_cached_hub_model_of_another_kind_is_named_as_a_local_one_is(tiny_world, tmp_path, command):
    """A T5 named by its hub id, found in the local cache (offline), ended in transformers' "Unrecognized
    configuration class" where the same model in a local directory got one clear line: its config is read first."""
    from transformers import T5Config, T5ForConditionalGeneration

    saved = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=257, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(saved)
    (saved / "tokenizer.json").write_bytes((tiny_world["student"] / "tokenizer.json").read_bytes())
    (saved / "tokenizer_config.json").write_bytes((tiny_world["student"] / "tokenizer_config.json").read_bytes())
    _cache_as_hub_model(saved, tmp_path / "hf", "acme/t5-tiny")
    env = {**{k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}, "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = ["--teacher-model", "acme/t5-tiny"]
    if command == "train":
        args += ["--student-model", str(tiny_world["student"]), "--train-file", str(tiny_world["train"]),
                 "--block-size", "16", "--train-steps", "1", "--output-dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-m", "sarkd_diag", command, *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("sarkd-diag: error: hub model acme/t5-tiny is a t5 model (T5ForConditionalGeneration, "
                             "an encoder-decoder), not a causal language model: sarkd-diag distils decoder-only LMs "
                             "(GPT-2, Llama, Mistral, Qwen, Mixtral, ...); give one of those\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("call", "typed", "meant"), [
    ("distill", "learning_rate", "student_lr"), ("distill", "train_step", "train_steps"),
    ("compare_precision", "max_steps", "train_steps"), ("DistillConfig", "learning_rate", "student_lr"),
    ("DistillConfig", "batch_size", "per_device_batch_size"), ("DistillConfig", "train_step", "train_steps"),
])
def test_an_option_of_another_name_given_to_the_python_api_names_the_option_meant(call, typed, meant):
    """`sarkd_diag.distill(learning_rate=1e-3)` raised a bare TypeError (DistillConfig's "unexpected keyword
    argument"), where the CLI's `--learning-rate` says to write --student-lr: the API names the option meant too,
    before anything loads or is written; so does the DistillConfig a notebook builds itself."""
    import sarkd_diag

    with pytest.raises(TypeError) as raised:
        getattr(sarkd_diag, call)(**{typed: 3})
    assert str(raised.value) == f"{call}() got an unexpected keyword argument {typed!r}: did you mean {meant}?"


@pytest.mark.parametrize(("call", "typed", "write"), [
    ("distill", "fp16", "`precision='mixed'`"), ("distill", "bf16", "`precision='bf16-mixed'`"),
    ("distill", "gpu", "`device='cuda'`"),
    ("compare_precision", "epochs", "`train_steps=N`: a run counts optimizer steps, not passes over the data"),
    ("distill", "half", "`precision='mixed'` (fp16 compute, fp32 master weights; `precision='pure-fp16'` is the "
                        "model.half() run)"),
])
def test_a_switch_of_another_tool_given_to_the_python_api_names_this_tools_setting(call, typed, write):
    """`distill(fp16=True)` and `distill(epochs=3)` got "its options are DistillConfig's fields", where the command
    line's `--fp16` and `--epochs` say what to write: the API says it too, as keyword arguments."""
    import sarkd_diag

    with pytest.raises(TypeError) as raised:
        getattr(sarkd_diag, call)(**{typed: True})
    assert str(raised.value) == f"{call}() got an unexpected keyword argument {typed!r}: write {write}"


def test_a_config_file_switch_of_another_tool_names_the_setting_meant(cli, tmp_path):
    """A --config file's `bf16: true` (transformers' switch) was only 'unknown'."""
    config = tmp_path / "c.yaml"
    config.write_text("bf16: true\n")
    code, _, err = cli("train", "--config", str(config))
    assert code == 2 and err == f"sarkd-diag: error: --config {config}: unknown option bf16 (write `precision: " \
                                "bf16-mixed`)\n"


def test_a_config_file_key_of_another_tool_names_the_option_meant(cli, tmp_path):
    """A --config file's `learning_rate:` (transformers' name) was only 'unknown': it names student_lr, as
    `--learning-rate` on the command line does."""
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.001\n")
    code, _, err = cli("train", "--config", str(config))
    assert code == 2 and err == f"sarkd-diag: error: --config {config}: unknown option learning_rate (did you mean " \
                                "student_lr?)\n"


def test_commands_offered_for_a_run_in_a_path_with_spaces_run_as_printed(cli, tmp_path, monkeypatch):
    """`--resume-from 'my runs/a'` answered `(or continue the run itself: --output-dir my runs/a --resume)`, and a
    resume with other options `(--config my runs/a/config.json)`: pasted, the shell split the path in two. The
    commands offered are whole, the path quoted."""
    from sarkd_diag.contract.config import DistillConfig

    monkeypatch.chdir(tmp_path)
    run = Path("my runs") / "ä"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "meta.json").write_text('{"step": 2}')
    (run / "config.json").write_text(json.dumps({"options": DistillConfig().to_dict(), "precision": {"mode": "fp32"}}))
    code, _, err = cli("train", "--resume-from", run, "--output-dir", "new")
    assert code == 2 and "(or continue the run itself: sarkd-diag train --output-dir 'my runs/ä' --resume)" in err, err
    code, _, err = cli("train", "--output-dir", run, "--resume", "--temperature", "3")
    assert code == 2 and "(sarkd-diag train --config 'my runs/ä/config.json' --resume)" in err, err
