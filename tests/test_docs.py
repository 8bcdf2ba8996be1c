"""docs/ cannot silently drift from the code: every event kind and code, cause, metrics column, summary field
and threshold the code has is named in docs/run-directory.md (with the threshold's current value).

The metrics columns are collected two ways: from what a real run and a user's loop write (every column a run
reaches), and from the source of every probe's `record` (columns only a rare branch writes).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import contract
import pytest
import torch
from contract import CHECKER
from torch import nn

from sarkd_diag.analysis import diagnose, verdicts
from sarkd_diag.compare import COLUMNS, OUTPUTS
from sarkd_diag.contract import events
from sarkd_diag.contract.rundir import STATUSES
from sarkd_diag.probes import CALLERS, NOT_SEEN_IN_A_USER_LOOP, Probes
from sarkd_diag.train.checkpoint import META, RUN_FILES, STATE, WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
RUN_DIRECTORY = ROOT / "docs" / "run-directory.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PROBES_SOURCE = ROOT / "sarkd_diag" / "probes"

# columns whose name carries a value: the doc names the pattern
PATTERNS = [(re.compile(r"act_amax_\w+"), "act_amax_<model>"),
            (re.compile(r"update_ratio_\w+"), "update_ratio_<model>"),
            (re.compile(r"expert_entropy_layer\w+"), "expert_entropy_layer<N>")]
# modules whose module-level numeric constants are thresholds the doc's table must carry, with their values
THRESHOLD_MODULES = ("contract.numerics", "analysis.diagnose", "analysis.verdicts", "probes.base", "probes.gradients",
                     "probes.loss", "probes.loss_graph", "probes.optimizer", "probes.scaler", "probes.updates",
                     "train.policy")


def named(path: Path) -> set[str]:
    """Everything the page writes as code (`name`)."""
    return set(re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")))


def column_name(name: str) -> str:
    for pattern, shown in PATTERNS:
        if pattern.fullmatch(name):
            return shown
    return name


def missing(names, doc: Path = RUN_DIRECTORY) -> list[str]:
    mentioned = named(doc)
    return sorted({column_name(n) for n in names} - mentioned)


# ------------------------------------------------------------------------------------ what runs write
@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    """Two steps of the embedded default in pure-fp16 with every probe on every step: it writes the loop's
    columns, every probe's (the optimizer state is fp16: its underflow is measured) and an evaluation."""
    from sarkd_diag.presentation.ui import TrainingDisplay
    from sarkd_diag.train.loop import distill

    out = tmp_path_factory.mktemp("docs") / "run"
    distill(train_steps=2, eval_steps=1, precision="pure-fp16", probes="full", on_nonfinite="continue",
            output_dir=str(out), display=TrainingDisplay(quiet=True))
    return out


@pytest.fixture(scope="module")
def user_loop(tmp_path_factory) -> Path:
    """A user's AMP loop with a GradScaler, on the CPU: the loss-scaler columns and a user loop's row."""
    out = tmp_path_factory.mktemp("docs") / "loop"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    with Probes(model, optimizer=optimizer, scaler=scaler, run_dir=out, level="full") as probes:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(4, 8)).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            probes.step(loss=loss)
            optimizer.zero_grad()
    return out


def written_columns(run_dir: Path) -> set[str]:
    columns = set()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        columns |= set(json.loads(line))
    import pandas as pd

    return columns | set(pd.read_parquet(run_dir / "metrics.parquet").columns)


def recorded_columns() -> set[str]:
    """The metrics columns each probe's `record` (and its `_record*` helpers) can return, from the source:
    string keys of the dicts it returns, and keys it stores into `metrics[...]` (an f-string as `<name>`)."""
    def key(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else f"<{ast.unparse(v.value)}>"
                           for v in node.values)
        return None

    found = set()
    for path in PROBES_SOURCE.glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(fn, ast.FunctionDef) and (fn.name == "record" or fn.name.startswith("_record"))):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and node.value is not None:
                    found |= {key(k) for d in ast.walk(node.value) if isinstance(d, ast.Dict) for k in d.keys}
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                    if isinstance(node, ast.AugAssign) else []
                for t in targets:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "metrics":
                        found.add(key(t.slice))
    found.discard(None)
    return {re.sub(r"<[^>]+>", "x", name) for name in found}  # `act_amax_<model>` → a name PATTERNS maps


# ---------------------------------------------------------------------------------------------- tests
def test_every_event_kind_code_and_field_is_documented():
    assert missing(events.KINDS) == []
    assert missing(events.CODES) == []
    assert missing(events.EVENT_COLUMNS) == []
    assert missing(events.SEVERITIES) == []
    assert missing(events.PHASES) == []


def test_every_code_has_a_row_in_the_codes_table():
    """One table row per code, naming its kind: `| `code` | `kind` |`."""
    text = RUN_DIRECTORY.read_text(encoding="utf-8")
    for code, what in events.CODES.items():
        kind = code if code in events.KINDS else what.split(":")[0]
        assert f"| `{code}` | `{kind}` |" in text, f"no row for event code {code} (kind {kind})"


def test_every_cause_and_how_it_is_ranked_is_documented():
    rules = {rule.__name__ for rule in diagnose.RULES}
    assert rules == set(diagnose.CAUSE_ORDER), "a rule per cause: the doc's causes table follows RULES"
    assert missing(diagnose.CAUSE_ORDER) == []
    assert missing(diagnose.SYMPTOM_CAPABLE) == []
    assert missing(diagnose.PHRASES) == []
    assert missing(CALLERS) == []
    text = RUN_DIRECTORY.read_text(encoding="utf-8")
    order = ", ".join(f"`{c}`" for c in diagnose.CAUSE_ORDER)
    assert order in " ".join(text.split()), "the doc lists CAUSE_ORDER in its current order"


def test_every_threshold_is_in_the_table_with_its_value():
    text = RUN_DIRECTORY.read_text(encoding="utf-8")
    for name in THRESHOLD_MODULES:
        module = importlib.import_module(f"sarkd_diag.{name}")
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            if not (isinstance(target, ast.Name) and target.id.isupper()):
                continue
            value = getattr(module, target.id)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            row = f"| `{name}.{target.id}` | {shown} |"
            assert row in text, f"the thresholds table lacks {row}"


def test_every_metrics_column_a_run_writes_is_documented(train_run, user_loop):
    assert missing(written_columns(train_run)) == []
    assert missing(written_columns(user_loop)) == []
    assert missing(recorded_columns()) == []
    assert missing(NOT_SEEN_IN_A_USER_LOOP) == []
    assert "scaler_grew" in written_columns(user_loop)  # the loop above reached the loss scaler's columns


def test_every_file_and_summary_field_is_documented(train_run, user_loop):
    for run_dir in (train_run, user_loop):
        names = {p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()}
        assert missing(names) == []
        summary = json.loads((run_dir / "summary.json").read_text())
        assert missing(summary) == []
        assert missing(summary["final"]) == []
        assert missing(summary["precision"]) == []
        assert missing(json.loads((run_dir / "config.json").read_text())) == []
    assert missing(RUN_FILES) == []
    assert missing((WEIGHTS, STATE, META)) == []
    assert missing(STATUSES) == []


def test_compare_precision_is_documented():
    assert missing(COLUMNS) == []
    assert missing(OUTPUTS) == []
    assert missing(verdicts.THRESHOLDS) == []


def test_the_docs_are_cited_and_design_notes_outside_the_repository_are_not():
    assert ARCHITECTURE.is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/run-directory.md" in readme and "docs/architecture.md" in readme
    files = [ROOT / "README.md"] + [p for top in ("sarkd_diag", "tests", "benchmarks", "scripts", "docs")
                                    for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md")]
    citing = [p for p in files if p != Path(__file__) and "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert citing == [], f"cite docs/ instead of a design file the repository does not hold: {citing}"


def test_the_readmes_causes_table_says_where_each_code_is_listed():
    """Every code a rule can claim has its README row, and the row says whether summary.json lists it among the
    causes (`diagnosis`: the contract's nine) or among the findings."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("| cause | listed in | meaning |")
    rows = readme[start:readme.index("\n\n", start)].splitlines()[2:]
    listed = dict(re.match(r"\| `(\w+)` \| `(\w+)` \|", row).groups() for row in rows)
    assert set(listed) == set(diagnose.CAUSE_ORDER) - {"second_moment_decay"}  # a rule whose code is another's
    assert {code for code, where in listed.items() if where == "diagnosis"} == diagnose.CAUSES
    assert {where for code, where in listed.items() if code not in diagnose.CAUSES} == {"findings"}


def test_the_docs_name_the_cause_codes_the_shared_checker_accepts():
    """docs/run-directory.md lists the nine codes shared/tools/check_run_dir.py accepts (beside the checkout, where
    there is one): a finding filed under a code of the project's own fails that checker, so which is which is said."""
    text = " ".join(RUN_DIRECTORY.read_text(encoding="utf-8").split())
    listed = re.search(r"Nine codes are the product sketch.s.*? accepts exactly these\): (.*?)\. The others", text)
    assert listed, "the causes section names the nine contract codes"
    nine = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert nine == diagnose.CAUSES == contract.CAUSES
    if CHECKER.is_file():
        source = CHECKER.read_text(encoding="utf-8")
        accepted = ast.literal_eval(re.search(r"^CAUSES = (\{.*?\})", source, re.S | re.M).group(1))
        assert nine == accepted
