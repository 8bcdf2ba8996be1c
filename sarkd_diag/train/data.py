"""Text in, fixed-length blocks of token ids out; labels are shifted here and nowhere else.

A block holds block_size + 1 tokens: inputs are the first block_size, labels the last block_size, so
labels[t] is the target of position t. Batches come in a seeded order that is reshuffled every epoch
and whose position (epoch, index) is part of a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..contract.errors import BadInput
from ..contract.wording import counted

IGNORE_INDEX = -100
HELD_OUT_FRACTION = 0.05


@dataclass
class Corpus:
    """The documents, and where each part came from as the user named it, for a message about that part."""

    train: list[str]
    validation: list[str] | None
    source: str
    train_origin: str = "the training data"
    validation_origin: str = "the validation data"


PLAIN_SUFFIXES = (".txt", ".text")
TEXT_FORMATS = "`.txt` (one document a line), `.jsonl` (a `text` field a line) or `.csv` (a `text` column)"


def _kind_of(path: Path) -> str:
    """What a path that exists and is neither a file nor a directory is, in words."""
    import stat

    mode = path.stat().st_mode
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def read_text_file(path: str, option: str = "") -> list[str]:
    """Documents of a .txt file (one per non-empty line), a .jsonl file (a string `text` field per line) or a
    .csv file (a `text` column); any other extension is refused rather than read as something it is not. A refusal
    names the `option` that gave the file (`--validation-file x.txt: no such file`): there may be two."""
    p, named = Path(path), f"{option} {path}" if option else path
    if p.is_dir():
        raise BadInput(f"{named} is a directory, expected a .txt, .jsonl or .csv file")
    if not p.is_file():
        if p.exists():  # a pipe (`<(cat x)`: /dev/fd/63), a FIFO, /dev/null: the text is read twice (a pipe once)
            raise BadInput(f"{named} exists but is not a regular file ({_kind_of(p)}); give a file on disk, which the "
                           "run reads more than once")
        raise BadInput(f"{named}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (*PLAIN_SUFFIXES, ".jsonl", ".csv"):
        raise BadInput(f"{named}: unknown text format {suffix or '(no extension)'!r}; give {TEXT_FORMATS}"
                       + (_json_advice(p) if suffix == ".json" else ""))
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BadInput(f"{named}: cannot be read ({exc.strerror})") from None
    if b"\x00" in raw:
        raise BadInput(f"{named} looks binary (it holds NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Excel's "CSV UTF-8", Notepad) is not text
    except UnicodeDecodeError as exc:
        raise BadInput(f"{named} is not UTF-8 text (byte {exc.start})") from None
    if suffix == ".csv":
        return _csv_documents(named, text)
    if suffix != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{named}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{named}:{number}: expected an object with a `text` field, got {_json_kind(row)}")
        if "text" not in row:
            raise BadInput(f"{named}:{number}: expected an object with a `text` field; this one has "
                           f"{_named('field', list(row))}; {NO_TEXT_ADVICE.format(part='field')}")
        if not isinstance(row["text"], str):
            raise BadInput(f"{named}:{number}: `text` must be a string, got {type(row['text']).__name__}")
        if row["text"].strip():  # an empty or blank `text` is skipped, as a .txt's blank line and a .csv's value are
            docs.append(row["text"])
    return docs


def _json_advice(path: Path) -> str:
    """What to do with a .json file, from how it begins: JSON Lines under a .json name (what `datasets`' to_json
    writes) only needs renaming; a JSON array, one object a line."""
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as file:
            first = next((line.strip() for line in file if line.strip()), "")
    except OSError:
        return ""
    if first.startswith("["):
        return f" — it holds a JSON array: write one object a line as .jsonl (`jq -c '.[]' {path} > data.jsonl`)"
    try:
        is_object = isinstance(json.loads(first), dict)
    except ValueError:
        is_object = False
    return f" — it holds one JSON object a line (JSON Lines): rename it to {path.with_suffix('.jsonl').name}" \
        if is_object else ""


NO_TEXT_ADVICE = ("the documents are read from `text` only: rename the {part} that holds them to `text`, or give a "
                  ".txt file of one document a line")
JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}


def _json_kind(value) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


def _named(part: str, names: list) -> str:
    """The fields or columns a record has, by name, so the user sees which one holds the documents."""
    if not names:
        return f"no {part}s"
    return counted(len(names), part) + " (" + ", ".join(f"`{name}`" for name in names) + ")"


def _csv_documents(path: str, text: str) -> list[str]:
    """The `text` column of a CSV file with a header row (quoted fields may span lines)."""
    import csv
    import io

    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if "text" not in columns:
            raise BadInput(f"{path}: a .csv needs a header row with a `text` column; its header has "
                           f"{_named('column', columns)}; {NO_TEXT_ADVICE.format(part='column')}")
        return [row["text"] for row in reader if isinstance(row.get("text"), str) and row["text"].strip()]
    except csv.Error as exc:
        raise BadInput(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _read_validation(validation_file: str | None) -> list[str] | None:
    """The --validation-file's documents, None without one."""
    return read_text_file(validation_file, "--validation-file") if validation_file else None


def load_corpus(dataset_name: str | None, dataset_config_name: str | None,
                train_file: str | None, validation_file: str | None) -> Corpus:
    """The training text from a datasets-hub set, local files, or the embedded dialogues; a --validation-file is
    the validation text whichever the training text (a hub set's own validation split otherwise)."""
    if dataset_name:
        validation = _read_validation(validation_file)  # read first: no network for a typo
        corpus = _load_hub_corpus(dataset_name, dataset_config_name)
        return corpus if validation is None else replace(corpus, validation=validation,
                                                         validation_origin=f"--validation-file {validation_file}")
    given_validation = {"validation_origin": f"--validation-file {validation_file}"} if validation_file else {}
    if train_file:
        validation = _read_validation(validation_file)
        return Corpus(read_text_file(train_file, "--train-file"), validation, f"file:{train_file}",
                      train_origin=f"--train-file {train_file}", **given_validation)
    from ..assets import corpus_path

    validation = _read_validation(validation_file) if validation_file else read_text_file(corpus_path("validation"))
    return Corpus(read_text_file(corpus_path("train")), validation, "embedded:dialogues", **given_validation)


def _load_hub_corpus(name: str, config_name: str | None) -> Corpus:
    import datasets

    from .models import check_hub_reachable

    check_hub_reachable(name, repo_type="dataset")
    try:
        splits = datasets.load_dataset(name, config_name)
    except Exception as exc:  # network, missing set, bad config: all are the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot load dataset {name!r}" + (f" ({config_name})" if config_name else "")
                       + f": {first}") from None
    if "train" not in splits:
        raise BadInput(f"dataset {name!r} has no train split (it has {', '.join(splits)})")
    text_column = "text" if "text" in splits["train"].column_names else None
    if text_column is None:
        raise BadInput(f"dataset {name!r} has no `text` column (columns: {splits['train'].column_names})")
    docs = [t for t in splits["train"][text_column] if isinstance(t, str) and t.strip()]
    validation = None
    if "validation" in splits:
        validation = [t for t in splits["validation"][text_column] if isinstance(t, str) and t.strip()]
    named = f"dataset {name!r}" + (f" ({config_name})" if config_name else "")
    return Corpus(docs, validation, f"hub:{name}" + (f"/{config_name}" if config_name else ""),
                  train_origin=f"{named}'s train split", validation_origin=f"{named}'s validation split")


@dataclass
class TokenBlocks:
    """[N, block_size + 1] token ids, and, for dual-tokenizer KD, each block's character span and text."""

    ids: torch.Tensor
    texts: list[str] | None = field(default=None, repr=False)
    offsets: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, index: torch.Tensor) -> TokenBlocks:
        texts = [self.texts[i] for i in index.tolist()] if self.texts is not None else None
        offsets = self.offsets[index] if self.offsets is not None else None
        return TokenBlocks(self.ids[index], texts, offsets)


def tokenize_blocks(docs: list[str], tokenizer, block_size: int, keep_text: bool = False,
                    what: str = "the training data") -> TokenBlocks:
    """Concatenate documents (eos between them) and cut windows of block_size + 1 tokens, stride block_size.

    With keep_text, each block also keeps its characters and the student tokens' offsets into them, so a
    second tokenizer can see exactly the same text (dual-tokenizer mode).
    `what` names the text as the user gave it (`--train-file PATH`), so a refusal says which file to fix.
    """
    if not docs:
        raise BadInput(f"{what} holds no text (blank lines and empty `text` values are skipped); give at least "
                       "one document")
    eos = tokenizer.eos_token_id
    encoded = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=keep_text)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    joined: list[str] = []
    base = 0
    for i, doc_ids in enumerate(encoded["input_ids"]):
        ids.extend(doc_ids)
        if keep_text:
            spans.extend((base + a, base + b) for a, b in encoded["offset_mapping"][i])
            joined.append(docs[i] + "\n")
            spans.append((base + len(docs[i]), base + len(docs[i]) + 1))  # the eos stands for the newline
            base += len(docs[i]) + 1
        ids.append(eos)
    window = block_size + 1
    count = (len(ids) - 1) // block_size
    if count < 1 or len(ids) < window:
        raise BadInput(f"{what} has {counted(len(ids), 'token')}, fewer than one block of --block-size "
                       f"{block_size} + 1; give more text or a smaller --block-size")
    all_ids = torch.tensor(ids, dtype=torch.long)
    starts = torch.arange(count) * block_size
    block_ids = torch.stack([all_ids[s:s + window] for s in starts.tolist()])
    if not keep_text:
        return TokenBlocks(block_ids)
    text = "".join(joined)
    all_spans = torch.tensor(spans, dtype=torch.long)
    texts, offsets = [], []
    for s in starts.tolist():
        block_spans = all_spans[s:s + window]
        lo, hi = int(block_spans[0, 0]), int(block_spans[-1, 1])
        texts.append(text[lo:hi])
        offsets.append(block_spans - lo)
    return TokenBlocks(block_ids, texts, torch.stack(offsets))


def split_validation(blocks: TokenBlocks, seed: int) -> tuple[TokenBlocks, TokenBlocks]:
    """Hold out ~5% of the blocks (at least one) when no validation text was given."""
    if len(blocks) < 2:
        raise BadInput(f"the training data makes {counted(len(blocks), 'block')}: too few to hold out a validation "
                       "split (give --validation-file or more text)")
    held = max(1, round(len(blocks) * HELD_OUT_FRACTION))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks.subset(order[held:].sort().values), blocks.subset(order[:held].sort().values)


def make_batch(blocks: TokenBlocks, index: torch.Tensor) -> dict:
    """Inputs and next-token labels of the chosen blocks (the one place labels are shifted)."""
    window = blocks.ids[index]
    batch = {
        "input_ids": window[:, :-1].contiguous(),
        "labels": window[:, 1:].contiguous(),
        "attention_mask": torch.ones_like(window[:, :-1]),
    }
    batch["n_targets"] = int((batch["labels"] != IGNORE_INDEX).sum())
    if blocks.texts is not None:
        batch["texts"] = [blocks.texts[i] for i in index.tolist()]
        batch["offsets"] = blocks.offsets[index][:, :-1]
    return batch


class BatchStream:
    """Endless batches in a seeded order, reshuffled each epoch; (epoch, position) resumes it exactly.

    Under torchrun every rank walks the same order in global batches of batch_size × ranks and takes its
    own rows of each (`shard`, rows rank::ranks), so the ranks partition every global batch and a single
    process with the global batch size sees the same blocks step by step. Each batch also carries
    `global_targets`, the global batch's target count, known without communicating.
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int, ranks: int = 1,
                 shard: Callable[[torch.Tensor], torch.Tensor] | None = None):
        global_size = batch_size * ranks
        if len(blocks) < global_size:
            per = f" × {counted(ranks, 'rank')}" if ranks > 1 else ""
            raise BadInput(f"the training data makes {counted(len(blocks), 'block')}, fewer than one batch of "
                           f"--per-device-batch-size {batch_size}{per}")
        self.blocks, self.batch_size, self.seed = blocks, global_size, seed
        self.shard = shard or (lambda index: index)
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.blocks), generator=generator)

    def next(self) -> dict:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        index = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        rows = self.shard(index)
        batch = make_batch(self.blocks, rows)
        batch["global_targets"] = batch["n_targets"] if len(rows) == len(index) else \
            int((self.blocks.ids[index, 1:] != IGNORE_INDEX).sum())
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def eval_batches(blocks: TokenBlocks, batch_size: int, max_batches: int) -> list[dict]:
    """Validation batches in a fixed order (the last one may be smaller)."""
    index = torch.arange(len(blocks))
    chunks = list(index.split(batch_size))[:max_batches]
    return [make_batch(blocks, chunk) for chunk in chunks]
