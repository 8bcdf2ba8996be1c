"""The embedded default assets: registry, loadability, tokenizer contract, teacher quality, size."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sarkd_diag.assets import (
    ASSETS_DIR,
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    DUAL_STUDENT,
    EMBEDDED_MODELS,
    corpus_path,
    embedded_model_path,
    is_embedded,
)

hf_logging.disable_progress_bar()

NAMES = ("tiny-mixtral", "tiny-gpt2", "tiny-gpt2-dual")
PROBES = ["A: hi , what is your favourite colour ? B: my favourite colour is blue .",
          "Hello World 123, héllo!"]


@pytest.fixture(scope="module")
def loaded():
    out = {}
    for name in NAMES:
        path = embedded_model_path(name)
        out[name] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    return out


def test_registry_lists_the_three_models():
    assert set(EMBEDDED_MODELS) == set(NAMES)
    assert all(EMBEDDED_MODELS[n] for n in NAMES)
    for spec in (DEFAULT_TEACHER, DEFAULT_STUDENT, DUAL_STUDENT):
        assert is_embedded(spec)
        assert embedded_model_path(spec).is_dir()
    assert embedded_model_path("tiny-gpt2") == embedded_model_path("embedded:tiny-gpt2") == ASSETS_DIR / "tiny-gpt2"
    assert not is_embedded("gpt2")


def test_unknown_names_raise_a_clear_error():
    with pytest.raises(ValueError, match="embedded:tiny-mixtral"):
        embedded_model_path("embedded:nope")
    with pytest.raises(KeyError):
        embedded_model_path("nope")
    with pytest.raises(ValueError, match="validation"):
        corpus_path("test")


def test_corpus_is_dialogues_with_a_disjoint_validation_split():
    train = corpus_path("train").read_text(encoding="utf-8").splitlines()
    val = corpus_path("validation").read_text(encoding="utf-8").splitlines()
    assert train and val
    assert 0.03 <= len(val) / (len(train) + len(val)) <= 0.07
    assert not set(val) & set(train)
    assert all(line.startswith("A: ") and " B: " in line for line in train + val)


@pytest.mark.parametrize("name", NAMES)
def test_each_model_loads_with_its_tokenizer(loaded, name):
    model, tok = loaded[name]
    path = embedded_model_path(name)
    assert (path / "model.safetensors").is_file()
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings >= 256
    # eos, but no pad: the training core uses eos as pad and records that it did
    assert tok.eos_token is not None and tok.eos_token_id is not None
    assert tok.pad_token is None
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id is None


def test_teacher_is_a_mixtral_with_routers(loaded):
    model, _ = loaded["tiny-mixtral"]
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.output_router_logits is False
    gates = {n: m for n, m in model.named_modules() if n.endswith("mlp.gate")}
    assert len(gates) == model.config.num_hidden_layers
    for gate in gates.values():
        assert type(gate).__name__ == "MixtralTopKRouter"
        assert tuple(gate.weight.shape) == (model.config.num_local_experts, model.config.hidden_size)


def test_teacher_and_student_share_a_vocabulary_the_dual_student_does_not(loaded):
    t_tok, s_tok, d_tok = (loaded[n][1] for n in NAMES)
    assert loaded["tiny-mixtral"][0].config.vocab_size == loaded["tiny-gpt2"][0].config.vocab_size
    assert loaded["tiny-gpt2-dual"][0].config.vocab_size != loaded["tiny-gpt2"][0].config.vocab_size
    for text in PROBES:
        assert t_tok(text).input_ids == s_tok(text).input_ids
        assert d_tok(text).input_ids != s_tok(text).input_ids
        assert d_tok.unk_token_id not in d_tok(text.replace("é", "e")).input_ids  # printable ASCII is covered


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gpt2-dual"])
def test_offsets_mapping_points_back_into_the_text(loaded, name):
    tok = loaded[name][1]
    text = PROBES[0]
    enc = tok(text, return_offsets_mapping=True)
    assert len(enc.offset_mapping) == len(enc.input_ids)
    assert all(0 <= a < b <= len(text) for a, b in enc.offset_mapping)
    spans = [text[a:b].strip() for a, b in enc.offset_mapping]
    assert "".join(spans) == text.replace(" ", "")
    assert tok.decode(enc.input_ids) == text


def _val_ppl(model, tok, n_tokens: int = 384, block: int = 128) -> float:
    ids: list[int] = []
    for line in corpus_path("validation").read_text(encoding="utf-8").splitlines():
        ids += tok(line).input_ids + [tok.eos_token_id]
        if len(ids) >= n_tokens:
            break
    x = torch.tensor(ids[:n_tokens]).view(-1, block)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item())


def test_teacher_perplexity_is_at_most_half_the_untrained_students(loaded):
    teacher_ppl = _val_ppl(*loaded["tiny-mixtral"])
    student_ppl = _val_ppl(*loaded["tiny-gpt2"])
    assert teacher_ppl <= student_ppl / 2, (teacher_ppl, student_ppl)
    assert teacher_ppl < 5  # it really learnt the dialogues
    assert student_ppl > 100  # and the student really is untrained


def test_assets_fit_in_8_mb():
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total <= 8 * 1024 * 1024, total


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }


@pytest.mark.slow
def test_generator_reproduces_the_committed_assets(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_assets.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, timeout=600)
    assert _digests(tmp_path) == _digests(ASSETS_DIR)
