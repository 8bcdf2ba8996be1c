"""Every snippet of README's "In your own training loop" runs as written, on tiny local models.

A snippet is the ```python block right after a `<!-- readme-snippet: NAME -->` line; it may use the names
the section says are the reader's own (`model`, `teacher`, `tokenizer`, `train_dataset`, `prompts`,
`optimizer`, `loader`, `device`), which the test provides.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny
import torch
from contract import nothing_found
from frameworks import Sequences, tiny_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- readme-snippet: (\w+) -->\n```python\n(.*?)```", re.S)
EXPECTED = {"trainer": "runs/trainer", "trl": "runs/trl", "accelerate": "runs/accelerate", "loop": "runs/loop",
            "lightning": "runs/lightning", "fabric": "runs/fabric"}


def snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(README.read_text()))


def test_the_section_has_a_snippet_per_framework():
    assert set(snippets()) == set(EXPECTED)


def _names(tmp_path: Path) -> dict:
    from datasets import Dataset

    tokenizer, corpus = tiny_tokenizer(tmp_path)
    vocab = len(tokenizer)
    model = tiny.make_gpt2(vocab, seed=0)
    data = Sequences(vocab, n=16)
    prompts = [line.split(" B:")[0] + " B:" for line in corpus.read_text().splitlines()[:16]]
    return {"model": model, "teacher": tiny.make_gpt2(vocab, seed=3), "tokenizer": tokenizer,
            "train_dataset": data, "prompts": Dataset.from_dict({"prompt": prompts}),
            "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
            "loader": torch.utils.data.DataLoader(data, batch_size=4), "device": "cpu"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_runs_as_written(name, tmp_path, monkeypatch, capsys):
    if name in ("trl", "lightning", "fabric"):
        pytest.importorskip({"trl": "trl", "lightning": "pytorch_lightning", "fabric": "lightning_fabric"}[name])
    if name in ("trainer", "trl", "accelerate"):
        pytest.importorskip("accelerate")
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    namespace = _names(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippets()[name], f"README.md:{name}", "exec"), namespace)  # noqa: S102 - the README's own code

    run_dir = tmp_path / EXPECTED[name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_completed"] == 4
    assert (run_dir / "config.json").is_file()
    assert nothing_found(summary) or name == "loop"  # fp16 autocast may warn about the tiny model; it ran
    if name == "loop":  # the norm the loop clipped by, read before clipping, is each row's grad_norm
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(row["grad_norm"] is not None and row["grad_norm"] > 0 for row in rows)
