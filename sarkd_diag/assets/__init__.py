"""The embedded default assets: a dialogue corpus, two tokenizers and three tiny models.

They let every command run offline, with no hub download, in seconds on a CPU: the
MoE teacher is pretrained on the corpus, the students are untrained, so a short
distillation run visibly lowers the student's perplexity. All of it is generated,
byte for byte reproducibly, by ``scripts/make_assets.py``; ``manifest.json`` records
what that script measured (parameter counts, validation perplexities).

A model argument of the form ``embedded:NAME`` (e.g. ``--teacher-model
embedded:tiny-mixtral``) names one of :data:`EMBEDDED_MODELS`; each directory holds
both the model and its tokenizer, so ``from_pretrained(path)`` works for either.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).parent
EMBEDDED_PREFIX = "embedded:"

EMBEDDED_MODELS: dict[str, str] = {
    "tiny-mixtral": "MoE teacher (Mixtral, 4 experts top-2, routers at layers.N.mlp.gate) "
    "pretrained on the embedded dialogues; byte-level BPE vocab 512",
    "tiny-gpt2": "untrained GPT-2 student sharing the teacher's tokenizer (vocab 512)",
    "tiny-gpt2-dual": "untrained GPT-2 student with a different tokenizer (Metaspace BPE, vocab 384), "
    "for dual-tokenizer distillation",
}
DEFAULT_TEACHER = EMBEDDED_PREFIX + "tiny-mixtral"
DEFAULT_STUDENT = EMBEDDED_PREFIX + "tiny-gpt2"
DUAL_STUDENT = EMBEDDED_PREFIX + "tiny-gpt2-dual"

CORPUS_SPLITS = ("train", "validation")


class UnknownAssetError(KeyError, ValueError):
    """An asset name that does not exist; a ValueError (bad input) and a KeyError (lookup)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def is_embedded(spec: str) -> bool:
    """Whether a model argument names an embedded model (``embedded:NAME``)."""
    return isinstance(spec, str) and spec.startswith(EMBEDDED_PREFIX)


def embedded_model_path(name: str) -> Path:
    """Directory of an embedded model and its tokenizer; accepts ``NAME`` or ``embedded:NAME``."""
    key = name[len(EMBEDDED_PREFIX):] if is_embedded(name) else name
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        raise UnknownAssetError(f"unknown embedded model {name!r}; the embedded models are: {known}")
    return ASSETS_DIR / key


def corpus_path(split: str) -> Path:
    """Path of the embedded corpus split: one two-speaker dialogue per line."""
    if split not in CORPUS_SPLITS:
        raise UnknownAssetError(f"unknown corpus split {split!r}; use one of: {', '.join(CORPUS_SPLITS)}")
    return ASSETS_DIR / "corpus" / f"{split}.txt"
