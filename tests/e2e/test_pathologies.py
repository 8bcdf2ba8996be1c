"""The pathology catalog (scripts/pathologies.py), one real training run per scenario.

Two tests per scenario, from the same run: the run physically provoked what it claims (weights that grew,
a NaN loss from finite logits, a loss scale below 1 — measured outside the tool), and the diagnosis names
the expected root cause, severity, model, module or tensor and first step (clean runs: no warning or
critical cause), with fixes that name only what the caller has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import pathologies as catalog  # noqa: E402
from contract import CAUSES as CONTRACT_CAUSES  # noqa: E402
from contract import assert_run_dir  # noqa: E402

CAUSES = ("optimizer_eps_underflow", "optimizer_state_underflow", "optimizer_nonfinite", "lr_negative", "lr_zero",
          "weight_collapse", "activation_overflow", "gradient_overflow", "loss_scale_collapse", "no_gradients",
          "update_underflow", "teacher_overflow", "nonfinite_input", "divergence", "weights_edited",
          "clip_before_unscale", "optimizer_stepped_twice", "weight_decay_lost", "scaler_fp16_weights",
          "gradients_not_cleared")

_runs: dict[str, tuple[catalog.Outcome, float]] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> catalog.World:
    catalog.quiet_transformers()
    return catalog.build_world(tmp_path_factory.mktemp("pathology_world"))


@pytest.fixture
def run_of(world, tmp_path_factory):
    """Each scenario runs once; both of its tests read the same outcome."""
    def run(scenario: catalog.Scenario) -> catalog.Outcome:
        if scenario.name not in _runs:
            _runs[scenario.name] = catalog.run_scenario(scenario, world, tmp_path_factory.mktemp(scenario.slug))
        return _runs[scenario.name][0]
    return run


def test_the_catalog_covers_every_cause_and_clean_runs():
    names = [s.name for s in catalog.SCENARIOS]
    assert len(names) >= 20 and len(set(names)) == len(names)
    assert len({s.slug for s in catalog.SCENARIOS}) == len(names)
    expected = {s.expected.cause for s in catalog.SCENARIOS}
    assert set(CAUSES) <= expected
    assert sum(s.expected.cause is None for s in catalog.SCENARIOS) >= 5
    assert {s.via for s in catalog.SCENARIOS} == {"CLI", "user loop"}


def test_the_expectations_are_checked_as_stated():
    """The checker itself: a clean expectation fails on a warning, a located one on another module."""
    cause = {"cause": "gradient_overflow", "severity": "critical", "model": "student", "module": "mid",
             "tensor": "mid.weight", "first_step": 2, "evidence": {"update_ratio": 1.0}, "fix": "lower the lr"}
    located = catalog.Expected("gradient_overflow", "critical", "student", "mid", first_step=2)
    assert catalog.mismatches(located, [cause], "user loop") == []
    assert catalog.mismatches(located, [{**cause, "fix": "?'s mid.weight overflows"}], "user loop") != []
    assert catalog.mismatches(catalog.Expected(None), [cause]) != []
    assert catalog.mismatches(catalog.Expected(None), [{**cause, "severity": "info"}]) == []
    assert catalog.mismatches(catalog.Expected("gradient_overflow", "critical", "student", "out"), [cause]) != []
    assert catalog.mismatches(catalog.Expected("gradient_overflow", first_step=(3, 4)), [cause]) != []
    named_anything = catalog.Expected("gradient_overflow", module=catalog.ANY)
    assert catalog.mismatches(named_anything, [{**cause, "module": None}]) == []
    assert catalog.mismatches(named_anything, [{**cause, "module": None, "tensor": None}]) != []
    assert catalog.mismatches(located, [{**cause, "fix": "lower --student-lr"}], "user loop") != []
    assert catalog.mismatches(located, [{**cause, "fix": "lower --student-lr"}], "CLI") == []
    assert catalog.mismatches(located, [{**cause, "fix": "use --no-such-flag"}], "CLI") != []
    assert catalog.mismatches(catalog.Expected("gradient_overflow", evidence_contains="ratio"), [cause]) == []
    assert catalog.mismatches(catalog.Expected("gradient_overflow", fix_lacks="LR"), [cause]) != []
    assert catalog.mismatches(catalog.Expected("gradient_overflow", fix_lacks="autocast"), [cause]) == []
    # a cause `explained_by` the root is the root's failure shown among the causes, not a claim of its own
    explained = {**cause, "cause": "divergence", "evidence": {"explained_by": "gradient_overflow@2 (student mid)"}}
    besides = catalog.Expected("gradient_overflow", absent=("divergence",))
    assert catalog.mismatches(besides, [cause, explained]) == []
    assert catalog.mismatches(besides, [cause, {**explained, "evidence": {}}]) != []


@pytest.mark.parametrize("scenario", catalog.SCENARIOS, ids=lambda s: s.slug)
def test_the_run_provokes_what_it_claims(scenario, run_of):
    outcome = run_of(scenario)
    assert outcome.checks, "every scenario confirms its provocation"
    failed = [name for name, ok in outcome.checks.items() if not ok]
    assert not failed, f"not provoked: {failed}; facts {outcome.facts}; error {outcome.error}"


@pytest.mark.parametrize("scenario", catalog.SCENARIOS, ids=lambda s: s.slug)
def test_the_diagnosis_is_as_expected(scenario, run_of):
    outcome = run_of(scenario)
    assert outcome.error is None, outcome.error
    wrong = catalog.mismatches(scenario.expected, outcome.diagnosis, scenario.via)
    summary = [(c.get("cause"), c.get("severity"), c.get("model"), catalog.where(c), c.get("first_step"))
               for c in outcome.diagnosis]
    assert not wrong, f"expected {scenario.expected.describe()}; {'; '.join(wrong)}; diagnosis {summary}"
    # whatever it found, summary.json lists it as the contract says: the nine codes' causes apart from the findings,
    # each list in the one order `rank` gave them
    summary = assert_run_dir(outcome.run_dir)
    assert summary["diagnosis"] == [c for c in outcome.diagnosis if c["cause"] in CONTRACT_CAUSES]
    assert summary["findings"] == [c for c in outcome.diagnosis if c["cause"] not in CONTRACT_CAUSES]


def test_the_script_prints_the_table(tmp_path, capsys):
    """`python scripts/pathologies.py --only NAME --markdown FILE`: the README's table, one row per scenario."""
    table = tmp_path / "table.md"
    assert catalog.main(["--only", "clean-fp32", "--markdown", str(table)]) == 0
    text = table.read_text()
    assert text.startswith("| pathology | how provoked | mode |") and text.count("\n| clean fp32 |") == 1
    assert "| clean fp32 |" in capsys.readouterr().out


def test_the_readme_table_has_one_row_per_scenario_all_as_expected():
    """README's table is the script's output (`--markdown`): a scenario added, renamed or failing shows here
    without running the catalog — regenerate it with `python scripts/pathologies.py --markdown FILE`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index(catalog.HEADER)
    rows = readme[start:readme.index("\n\n", start)].splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [s.name for s in catalog.SCENARIOS]
    assert all(row.endswith("| yes |") for row in rows)
