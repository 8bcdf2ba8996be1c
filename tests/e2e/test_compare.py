"""compare-precision end to end on the tiny world: each mode in its own process, one table, every verdict kind,
the files of the contract, and exit codes (0 once every mode ran, 2 for bad input)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from contract import assert_conforms
from images import png_size

from sarkd_diag import compare_precision
from sarkd_diag.compare import COLUMNS


def world_options(world, out: Path, lr: str, steps: int = 6) -> list[str]:
    return ["--teacher-model", world["teacher"], "--student-model", world["student"], "--train-file", world["train"],
            "--validation-file", world["valid"], "--block-size", "32", "--per-device-batch-size", "4",
            "--steps", str(steps), "--eval-steps", "3", "--student-lr", lr, "--output-dir", out]


@pytest.fixture(scope="module")
def compared(tiny_world, tmp_path_factory):
    """fp32, pure-fp16 and pure-bf16 at the original's lr=5e-6: stable, corrupted and stagnant."""
    import contextlib
    import io

    from sarkd_diag.cli import main

    out = tmp_path_factory.mktemp("compare") / "cmp"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_:
        main([str(a) for a in ["compare-precision", *world_options(tiny_world, out, "5e-6"),
                               "--modes", "fp32,pure-fp16", "--modes", "pure-bf16"]])
    return out, exit_.value.code, stdout.getvalue()


def test_a_short_comparison_whose_loss_scaler_warms_up_is_not_called_stagnant(cli, tiny_world, tmp_path):
    """`mixed` over 5 steps with a loss term weighted 20x: GradScaler halves its scale on steps 1-4 while it finds
    one that fits, then trains. compare-precision called the mode `stagnant` (80% of the steps skipped), where the
    diagnosis reads those skips as the scaler's warm-up: the verdict now counts only the skips after it."""
    out = tmp_path / "cmp"
    code, _, err = cli("compare-precision", *world_options(tiny_world, out, "2e-3", steps=5), "--modes", "mixed",
                       "--alpha-ce", "20")
    assert code == 0, err
    mixed = pd.read_csv(out / "comparison.csv").set_index("mode").loc["mixed"]
    events = pd.read_json(out / "runs" / "mixed" / "events.jsonl", lines=True)
    warmup = int((events["code"] == "scaler_skip_warmup").sum())
    assert mixed["skipped_steps"] == warmup + 1 >= 3  # step 1's skip, then the warm-up's events
    assert not mixed["verdict"].startswith("stagnant"), mixed["verdict"]
    # a CPU has no fast float16: `mixed` trained ~50x slower than fp32 here without a word; said once, at setup
    slow = events[events["code"] == "slow_precision"]
    assert list(slow["severity"]) == ["warning"] and "mixed computes in float16" in slow["message"].iloc[0]


def test_every_mode_ran_and_the_command_exits_0(compared):
    out, code, stdout = compared
    assert code == 0
    for mode in ("fp32", "pure-fp16", "pure-bf16"):
        assert (out / "runs" / mode / "summary.json").is_file()
        assert mode in stdout
    assert "stagnant" in stdout and "corrupted@1" in stdout  # the rich table
    assert "recommendation: train in `fp32` (`--precision fp32`): the only stable mode" in " ".join(stdout.split())


def test_verdicts_at_the_originals_learning_rate(compared):
    table = pd.read_csv(compared[0] / "comparison.csv").set_index("mode")
    assert list(table.reset_index().columns) == COLUMNS
    assert table.loc["fp32", "verdict"] == "stable"
    corrupted = table.loc["pure-fp16"]
    assert corrupted["verdict"].startswith("corrupted@1 (") and corrupted["first_nonfinite_step"] == 1
    assert corrupted["nonfinite_param_events"] > 0
    assert table.loc["pure-bf16", "verdict"] == "stagnant (update_underflow)"
    assert table.loc["pure-bf16", "lost_update_fraction"] > 0.5
    assert table.loc["fp32", "drift_vs_fp32"] == 0.0
    assert (table["peak_memory_mb"] > 0).all() and (table["tokens_per_s"] > 0).all()


def test_the_same_start_in_every_mode(compared):
    """Same initial weights, data and seed: the first validation perplexity agrees across modes."""
    first = [json.loads((compared[0] / "runs" / m / "summary.json").read_text())["final"]["first_eval_ppl"]
             for m in ("fp32", "pure-fp16", "pure-bf16")]
    assert max(first) / min(first) < 1.02
    options = [json.loads((compared[0] / "runs" / m / "config.json").read_text())["options"]
               for m in ("fp32", "pure-bf16")]
    assert options[0]["seed"] == options[1]["seed"] and options[0]["on_nonfinite"] == "continue"
    assert options[0]["probe_every"] == 5  # compare's default, so short runs measure lost updates


def test_output_files_conform_to_the_contract(compared):
    out = compared[0]
    assert_conforms(out)
    parquet = pd.read_parquet(out / "comparison.parquet")
    assert list(parquet.columns) == COLUMNS and parquet["drift_vs_fp32"].dtype == float
    for name in ("loss_curves.png", "loss_scale.png"):  # loss_scale.png: the contract's, a note without data
        width, height = png_size(out / name)
        assert width >= 640 and height >= 400
    markdown = (out / "comparison.md").read_text()
    assert "corrupted@1" in markdown and "loss_scale" not in markdown  # no mode scaled the loss: no figure shown
    html = (out / "comparison.html").read_text()
    assert html.startswith("<!doctype html>") and "stagnant (update_underflow)" in html
    assert "`" not in html and "<code>corrupted@STEP</code>" in html and "loss_scale" not in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"] == ["fp32", "pure-fp16", "pure-bf16"] and summary["fp32_reference"]
    assert {r["mode"]: r["verdict"] for r in summary["rows"]}["fp32"] == "stable"
    assert summary["recommendation"]["mode"] == "fp32"
    assert f"Recommendation: {summary['recommendation']['text']}" in markdown
    assert all(0 <= run["other_load"] <= 1 for run in summary["runs"].values())  # Linux: /proc/stat read
    assert "`pure-fp16` is `corrupted@1 (" in summary["recommendation"]["text"]
    assert png_size(out / "runs" / "fp32" / "loss_curves.png")[0] >= 640  # each run's own plots


def test_a_comparison_whose_rebuild_fails_keeps_its_files_as_they_were(cli, compared, tmp_path, monkeypatch):
    """`report` of a comparison wrote comparison.csv/.parquet/.md/.html and the figures one by one: a failure in the
    last page left a new table beside an old report.html and summary.json. They are now built first and moved into
    place together, so a failure leaves the comparison's files as they were."""
    import sarkd_diag.presentation.report as report

    out = Path(shutil.copytree(compared[0], tmp_path / "cmp"))
    shutil.rmtree(out / "runs" / "pure-bf16")  # the table `report` builds differs from the one on disk
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("a renderer's bug")

    monkeypatch.setattr(report, "write_comparison_report", broken)
    monkeypatch.chdir(tmp_path)  # where an internal error leaves its traceback
    code, _, err = cli("report", out)
    assert code == 3 and "a renderer's bug" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_report_rebuilds_an_interrupted_comparison(cli, compared, tmp_path):
    """A comparison stopped before its last mode: `report` compares the modes that ran."""
    out = tmp_path / "cmp"
    shutil.copytree(compared[0], out)
    shutil.rmtree(out / "runs" / "pure-bf16")
    for name in ("comparison.csv", "comparison.parquet", "comparison.md", "comparison.html", "loss_curves.png",
                 "loss_scale.png", "summary.json"):
        (out / name).unlink()
    code, stdout, err = cli("report", out)
    assert code == 0, err
    assert "2 modes compared" in stdout
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["mode"]) == ["fp32", "pure-fp16"] and table["verdict"][0] == "stable"
    assert table["verdict"][1] == pd.read_csv(compared[0] / "comparison.csv")["verdict"][1]
    assert_conforms(out)
    # the mode asked for and never run is said, not hidden: report, its files and `check --expect completed`
    assert "; not run: pure-bf16 (asked for; the comparison stopped before it)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requested_modes"] == ["fp32", "pure-fp16", "pure-bf16"] and summary["not_run"] == ["pure-bf16"]
    note = "Not run: pure-bf16 — asked for (fp32, pure-fp16, pure-bf16), but the comparison stopped before it"
    assert note in (out / "comparison.md").read_text() and note in (out / "comparison.html").read_text()
    assert note in (out / "report.html").read_text()
    code, stdout, err = cli("check", out, "--expect", "completed")
    assert (code, err) == (1, "")
    assert stdout.splitlines()[-1].startswith("pure-bf16: completed: did not run — the comparison asked for fp32, "
                                              "pure-fp16, pure-bf16")
    assert not json.loads((compared[0] / "summary.json").read_text())["not_run"]  # the whole comparison: none


def test_drifting_and_failed_without_fp32(tiny_world, tmp_path, monkeypatch, capsys):
    """pure-bf16 at lr=5e-5 loses a moderate share of its updates (drifting); a mode whose process dies is
    `failed (reason)` and the others still run; without fp32 the drift is n/a. Through the Python API, whose
    console names keyword arguments (it said `add it to --modes`)."""
    import sarkd_diag.compare as compare

    real = compare._train_command

    def command(mode, config_file, run_dir):
        if mode == "mixed":
            return [sys.executable, "-c", "import sys; print('sarkd-diag: internal error: boom'); sys.exit(3)"]
        return real(mode, config_file, run_dir)

    monkeypatch.setattr(compare, "_train_command", command)
    result = compare_precision(["mixed", "pure-bf16"], teacher_model=str(tiny_world["teacher"]),
                               student_model=str(tiny_world["student"]), train_file=str(tiny_world["train"]),
                               validation_file=str(tiny_world["valid"]), block_size=32, per_device_batch_size=4,
                               steps=6, eval_steps=3, student_lr=5e-5, output_dir=str(tmp_path / "cmp"))
    assert result.exit_code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "run fp32 too (add it to modes=)" in printed and "--" not in printed.split("recommendation")[1], printed
    verdicts = dict(zip(result.table["mode"], result.table["verdict"], strict=True))
    assert verdicts == {"mixed": "failed (exit 3: internal error: boom)", "pure-bf16": "drifting (update_underflow)"}
    assert [(v.kind, v.cause) for v in result.verdicts] == [("failed", "exit 3: internal error: boom"),
                                                            ("drifting", "update_underflow")]
    assert result.table["drift_vs_fp32"].isna().all()
    csv = pd.read_csv(tmp_path / "cmp" / "comparison.csv", keep_default_na=False)
    assert set(csv["drift_vs_fp32"]) == {"n/a"}
    assert "n/a" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert not result.summary["fp32_reference"]
    assert result.recommendation.mode is None and "run fp32 too" in result.recommendation.text
    assert result.summary["recommendation"] == {"mode": None, "text": result.recommendation.text}


@pytest.mark.parametrize(("flag", "named", "advice"), [
    (["--precision", "fp32"], "sets --precision itself", "--modes"),
    (["--on-nonfinite", "stop"], "--on-nonfinite continue", "cannot be changed"),
    (["--on_nonfinite", "skip"], "--on-nonfinite continue", "cannot be changed"),
    (["--resume"], "cannot --resume", "train --output-dir OUT/runs/MODE --resume"),
    (["--resume-from", "x"], "cannot --resume-from", "--resume-from CHECKPOINT"),
])
def test_options_compare_sets_itself_are_refused(cli, tiny_world, tmp_path, flag, named, advice):
    """Each refusal names the option the user typed, not --precision's message for all of them."""
    code, _, err = cli("compare-precision", *world_options(tiny_world, tmp_path / "cmp", "1e-3"), *flag)
    assert code == 2 and err.count("\n") == 1 and named in err and advice in err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--modes", "fp16"], "--modes fp16 is ambiguous"),
    (["--modes", "fp8"], "--modes"),
    (["--modes", "auto"], "not auto"),
    (["--train-steps", "9"], "disagree"),
    (["--student-model", "/nonexistent/model"], "no such directory"),
])
def test_bad_input_exits_2_before_any_mode_runs(cli, tiny_world, tmp_path, extra, message):
    code, _, err = cli("compare-precision", *world_options(tiny_world, tmp_path / "cmp", "1e-3"), *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.parametrize("out", ["new/cmp", "empty", "default"])
def test_bad_input_found_by_the_first_mode_stops_the_comparison_and_leaves_nothing(cli, tiny_world, tmp_path,
                                                                                 monkeypatch, out):
    """It left OUT/compare_options.json and OUT/logs/ behind: the same command, its input fixed, was refused with
    `holds a comparison already; pass --overwrite`. And its line said `error: fp32: error: ...`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    options = world_options(tiny_world, tmp_path / out, "1e-3")
    options = options[:-2] if out == "default" else options
    code, _, err = cli("compare-precision", *options, "--modes", "fp32,pure-bf16", "--block-size", "4096")
    assert (code, err) == (2, f"sarkd-diag: error: fp32: --block-size 4096 exceeds {tiny_world['student']}'s 128 "
                              "positions\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_an_existing_comparison_needs_overwrite(cli, compared, tiny_world):
    code, _, err = cli("compare-precision", *world_options(tiny_world, compared[0], "1e-3"))
    assert code == 2 and "--overwrite" in err


@pytest.mark.slow
def test_five_modes_on_the_embedded_default(tmp_path):
    """The original's lr=5e-6 on the embedded default, every mode, 30 steps: pure-fp16 corrupts through eps
    underflow, pure-bf16 loses its updates, the three modes with fp32 weights train — within 10 minutes."""
    out = tmp_path / "cmp"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sarkd_diag", "compare-precision", "--steps", "30",
                             "--student-lr", "5e-6", "--output-dir", str(out)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    verdicts = dict(pd.read_csv(out / "comparison.csv")[["mode", "verdict"]].itertuples(index=False))
    assert list(verdicts) == ["fp32", "mixed", "bf16-mixed", "pure-fp16", "pure-bf16"]
    assert re.fullmatch(r"corrupted@\d+ \(optimizer_eps_underflow\)", verdicts["pure-fp16"])
    assert verdicts["pure-bf16"] in ("stagnant (update_underflow)", "drifting (update_underflow)")
    assert {verdicts[m] for m in ("fp32", "mixed", "bf16-mixed")} == {"stable"}
    assert_conforms(out)
    assert elapsed < 600, f"{elapsed:.0f} s"


def test_the_cpu_time_other_processes_take_while_a_mode_runs_is_measured():
    """The share of the machine's CPU time that processes other than the comparison's own took: a process busy for
    the whole second measured is counted; the comparison's finished children are not (`run_mode` waits for its
    mode's process before it reads the share)."""
    from sarkd_diag.compare import CpuTime

    cpu = CpuTime()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    time.sleep(1.0)
    share = cpu.others_share()
    busy.wait()
    assert share is not None and 0.3 / os.cpu_count() <= share <= 1.0, share


def test_overwrite_clears_only_the_previous_comparison(tmp_path):
    from sarkd_diag.compare import _prepare_output

    out = tmp_path / "cmp"
    (out / "runs" / "fp32").mkdir(parents=True)
    (out / "compare_options.json").write_text("{}")
    (out / "comparison.csv").write_text("mode\n")
    (out / "notes.txt").write_text("mine")
    _prepare_output(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_steps_on_the_command_line_wins_over_the_config_file(tiny_world, tmp_path, monkeypatch):
    """`--config c.yaml --steps 2` with train_steps: 20 in the file trains 2 steps (as --train-steps would)."""
    import sarkd_diag.compare as compare
    from sarkd_diag.cli import main

    seen = {}

    def fake(modes, *, steps=None, **options):
        seen.update(options, steps=steps)
        return compare.CompareResult(tmp_path, None, {}, 0)

    monkeypatch.setattr(compare, "compare_precision", fake)
    config = tmp_path / "c.yaml"
    config.write_text("train_steps: 20\nstudent_lr: 0.001\n")
    with pytest.raises(SystemExit) as exit_:
        main(["compare-precision", "--config", str(config), "--steps", "2", "--output-dir", str(tmp_path / "o")])
    assert exit_.value.code == 0
    assert seen["steps"] == 2 and "train_steps" not in seen and seen["student_lr"] == 0.001


def test_steps_and_a_config_train_steps_through_the_python_api(tmp_path):
    """The API resolves the same way: steps wins over a config's train_steps; only an explicit, different
    train_steps disagrees (checked before anything runs)."""
    from sarkd_diag import DistillConfig
    from sarkd_diag.contract.errors import BadInput

    with pytest.raises(BadInput, match="disagree"):
        compare_precision(["fp32"], steps=2, train_steps=20, output_dir=str(tmp_path / "o"), quiet=True)
    with pytest.raises(BadInput, match=r"modes=\['fp8'\]"):  # got past the steps check with config's 120 and steps 2
        compare_precision(["fp8"], config=DistillConfig(train_steps=120), steps=2, output_dir=str(tmp_path / "o"),
                          quiet=True)


@pytest.mark.parametrize("modes, steps, said", [
    (5, 2, "modes= takes mode names (a string, comma-separated, or a list of them), got 5"),
    ([5], 2, "modes= takes mode names (a string, comma-separated, or a list of them), got [5]"),
    ("", 2, "modes= is empty"),
    (["fp32"], "3", "train_steps= must be a whole number, got '3'"),
], ids=["a number", "a list of numbers", "an empty string", "steps as text"])
def test_modes_and_steps_of_the_wrong_kind_through_the_python_api_are_bad_input(tmp_path, modes, steps, said):
    """compare_precision(5) raised TypeError ('int' object is not iterable), ([5]) AttributeError, and ("") compared
    every mode; each is refused as the CLI refuses it, before any directory is made."""
    from sarkd_diag.contract.errors import BadInput

    with pytest.raises(BadInput) as caught:
        compare_precision(modes, steps=steps, output_dir=str(tmp_path / "o"), quiet=True)
    assert str(caught.value).startswith(said) and not (tmp_path / "o").exists()


def _comparison_options(tmp_path: Path) -> Path:
    """A compare-precision directory's compare_options.json, as compare-precision writes it."""
    from sarkd_diag.contract.config import SET_BY_COMPARE, DistillConfig

    options = {k: v for k, v in DistillConfig(train_steps=3).to_dict().items() if k not in SET_BY_COMPARE}
    path = tmp_path / "my cmp" / "compare_options.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"options": options, "modes": ["fp32", "bf16-mixed"]}))
    return path


def test_train_with_a_comparisons_options_is_refused_and_pointed_to_compare(cli, tmp_path, monkeypatch):
    """`train --config CMP/compare_options.json` trained one run in `auto` and dropped the file's modes without a
    word; now it says the file is a comparison's and what to run (one mode of it still trains, with --precision)."""
    monkeypatch.chdir(tmp_path)
    options = _comparison_options(tmp_path)
    code, out, err = cli("train", "--config", options)
    assert (code, out) == (2, "")
    quoted = f"'{options}'"  # the commands offered run as printed: the path has a space
    assert err == (f"sarkd-diag: error: --config {options} holds a comparison's options (modes fp32, bf16-mixed): "
                   f"compare them with `sarkd-diag compare-precision --config {quoted}`, or train one mode with "
                   f"`sarkd-diag train --config {quoted} --precision fp32`\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my cmp"]  # no run directory was made


def test_compare_precision_with_a_comparisons_options_compares_its_modes(tmp_path, monkeypatch):
    """`compare-precision --config CMP/compare_options.json` took the options and compared every mode the device
    runs, not the file's; its modes are taken, unless --modes is given."""
    import sarkd_diag.compare as compare
    from sarkd_diag.cli import main

    seen = []
    monkeypatch.setattr(compare, "compare_precision",
                        lambda modes, **options: seen.append(modes) or compare.CompareResult(tmp_path, None, {}, 0))
    options = _comparison_options(tmp_path)
    for extra in ([], ["--modes", "mixed"]):
        with pytest.raises(SystemExit) as exit_:
            main(["compare-precision", "--config", str(options), *extra])
        assert exit_.value.code == 0
    assert seen == [["fp32", "bf16-mixed"], ["mixed"]]


def test_a_long_failure_is_cut_at_a_word_and_says_so(tmp_path, monkeypatch):
    """A mode stopped by a second Ctrl-C failed as `exit 130: a second Ctrl-C: ... it has no checkpoin`: its reason
    cut at 200 characters, mid-word, with nothing to tell the reader that more was said (in logs/<mode>.log)."""
    import sarkd_diag.compare as compare

    said = "sarkd-diag: error: " + " ".join(["checkpoint"] * 40)
    monkeypatch.setattr(compare, "_train_command", lambda mode, config_file, run_dir: [
        sys.executable, "-c", f"import sys; print({said!r}); sys.exit(3)"])
    result = compare.run_mode("fp32", tmp_path / "compare_options.json", tmp_path)
    assert result.failure.startswith("exit 3: checkpoint checkpoint") and result.failure.endswith("checkpoint …")
    assert len(result.failure) <= len("exit 3: ") + compare.MAX_FAILURE_CHARS
