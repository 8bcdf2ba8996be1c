import json

import pytest
import torch

from sarkd_diag.contract.errors import BadInput
from sarkd_diag.train.data import BatchStream, make_batch, read_text_file, split_validation, tokenize_blocks


class CharTokenizer:
    """One id per character; eos = 0 (enough to check the block arithmetic exactly)."""

    eos_token_id = 0

    def __call__(self, docs, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [[ord(c) for c in d] for d in docs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [[(i, i + 1) for i in range(len(d))] for d in docs]
        return out


def test_labels_are_the_next_token_shifted_once():
    blocks = tokenize_blocks(["abcdefgh", "ijk"], CharTokenizer(), block_size=4)
    batch = make_batch(blocks, torch.tensor([0, 1]))
    stream = [ord(c) for c in "abcdefgh"] + [0] + [ord(c) for c in "ijk"] + [0]
    assert batch["input_ids"].tolist() == [stream[0:4], stream[4:8]]
    assert batch["labels"].tolist() == [stream[1:5], stream[5:9]]
    assert batch["n_targets"] == 8


def test_blocks_keep_their_text_for_a_second_tokenizer():
    blocks = tokenize_blocks(["abcdefgh", "ijk"], CharTokenizer(), block_size=4, keep_text=True)
    assert blocks.texts[0] == "abcde"
    assert blocks.texts[1] == "efgh\n"  # the eos stands for the newline between documents
    assert blocks.offsets[1, 0].tolist() == [0, 1]


def test_too_little_text_is_bad_input():
    with pytest.raises(BadInput, match="fewer than one block"):
        tokenize_blocks(["ab"], CharTokenizer(), block_size=8)
    with pytest.raises(BadInput, match="empty"):
        tokenize_blocks([], CharTokenizer(), block_size=8)


def test_held_out_validation_is_about_five_percent_and_disjoint():
    blocks = tokenize_blocks(["x" * 4000], CharTokenizer(), block_size=10)
    train, val = split_validation(blocks, seed=0)
    assert len(val) == round(len(blocks) * 0.05) and len(train) + len(val) == len(blocks)
    seen = {tuple(r) for r in train.ids.tolist()}
    assert all(tuple(r) not in seen or r.count(r[0]) == len(r) for r in val.ids.tolist())


def test_epochs_reshuffle_and_the_position_resumes_exactly():
    blocks = tokenize_blocks(["".join(chr(65 + i % 26) for i in range(400))], CharTokenizer(), block_size=7)
    stream = BatchStream(blocks, batch_size=4, seed=3)
    per_epoch = len(blocks) // 4
    first_epoch = [stream.next()["input_ids"] for _ in range(per_epoch)]
    second_epoch = [stream.next()["input_ids"] for _ in range(per_epoch)]
    assert stream.epoch == 1
    assert not all(torch.equal(a, b) for a, b in zip(first_epoch, second_epoch, strict=True))
    state = stream.state_dict()
    expected = stream.next()["input_ids"]
    resumed = BatchStream(blocks, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next()["input_ids"], expected)


@pytest.mark.parametrize("content, suffix, message", [
    (b"\x00\x01\x02binary", ".txt", "binary"),
    (b"caf\xe9", ".txt", "not UTF-8"),
    (b'{"text": "ok"}\n{broken', ".jsonl", ":2: not valid JSON"),
    (b'{"body": "x"}\n', ".jsonl", "`text` field"),
    (b'{"text": 5}\n', ".jsonl", "must be a string"),
])
def test_bad_files_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        read_text_file(str(path))


def test_jsonl_and_txt_are_read(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_text_file(str(tmp_path / "a.jsonl")) == read_text_file(str(tmp_path / "a.txt")) == ["one", "two"]
    with pytest.raises(BadInput, match="directory"):
        read_text_file(str(tmp_path))
