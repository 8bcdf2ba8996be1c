import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import sarkd_diag.train.align as align_module
from sarkd_diag.train.align import align_teacher_to_student

TEXTS = [
    "The teacher routes tokens to experts; the student follows.",
    "Mixed precision keeps fp32 master weights beside fp16 compute.",
    "Character spans line up two tokenizers that never agree on words.",
    "Numbers like 3.14159 and 1e-8 underflow in half precision!",
    "Short one.",
]


def reference_align(teacher_hidden, teacher_offsets, teacher_mask, student_offsets, student_mask):
    """The obvious per-token loop the vectorized version must equal."""
    batch, length = student_offsets.shape[:2]
    aligned = torch.zeros(batch, length, teacher_hidden.shape[-1], dtype=teacher_hidden.dtype)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        t_spans, t_mask = teacher_offsets[b].tolist(), teacher_mask[b].tolist()
        for i, (s0, s1) in enumerate(student_offsets[b].tolist()):
            if not student_mask[b, i] or s1 <= s0:
                continue
            hits = [j for j, (t0, t1) in enumerate(t_spans) if t_mask[j] and t1 > t0 and t0 < s1 and s0 < t1]
            if hits:
                aligned[b, i] = teacher_hidden[b, hits].float().mean(0).to(teacher_hidden.dtype)
                valid[b, i] = True
    return aligned, valid


def random_partition_offsets(text_len, n_tokens, generator):
    """Contiguous spans over [0, text_len) with some gaps, like a tokenizer that trims spaces."""
    cuts = torch.randperm(text_len - 1, generator=generator)[: n_tokens - 1].add(1).sort().values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([text_len])])
    starts, ends = bounds[:-1].clone(), bounds[1:]
    trimmed = torch.rand(n_tokens, generator=generator) < 0.3
    starts[trimmed & (ends - starts > 1)] += 1
    return torch.stack([starts, ends], -1)


def random_case(batch=3, ls=40, lt=55, hidden=8, text_len=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    t_off = torch.stack([random_partition_offsets(text_len, lt, g) for _ in range(batch)])
    s_off = torch.stack([random_partition_offsets(text_len, ls, g) for _ in range(batch)])
    # special tokens with (0, 0) spans, and padding at the end of row 0 / masked tokens
    t_off[:, 0] = 0
    s_off[:, -1] = 0
    t_mask = torch.rand(batch, lt, generator=g) > 0.1
    s_mask = torch.ones(batch, ls, dtype=torch.bool)
    s_mask[0, -10:] = False
    return torch.randn(batch, lt, hidden, generator=g), t_off, t_mask, s_off, s_mask


@pytest.fixture(params=["search", "comparison"])
def pair_path(request, monkeypatch):
    """Run a test once per way of finding the pairs: the binary search (which the sorted spans of these
    tests allow) and the general [B, Ls, Lt] comparison (forced by making the search decline)."""
    taken, search = [], align_module._pairs_by_search

    def spy(*args):
        pairs = search(*args) if request.param == "search" else None
        taken.append("comparison" if pairs is None else "search")
        return pairs

    monkeypatch.setattr(align_module, "_pairs_by_search", spy)
    yield
    assert taken and set(taken) == {request.param}


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_partitions(seed, pair_path):
    args = random_case(seed=seed)
    aligned, valid = align_teacher_to_student(*args)
    ref_aligned, ref_valid = reference_align(*args)
    assert torch.equal(valid, ref_valid)
    assert valid.sum() > 0
    torch.testing.assert_close(aligned, ref_aligned)


def test_matches_reference_on_arbitrary_overlapping_spans():
    g = torch.Generator().manual_seed(5)
    starts_t = torch.randint(0, 50, (2, 30), generator=g)
    starts_s = torch.randint(0, 50, (2, 20), generator=g)
    t_off = torch.stack([starts_t, starts_t + torch.randint(0, 8, (2, 30), generator=g)], -1)
    s_off = torch.stack([starts_s, starts_s + torch.randint(0, 8, (2, 20), generator=g)], -1)
    args = (torch.randn(2, 30, 4, generator=g), t_off, torch.ones(2, 30), s_off, torch.ones(2, 20))
    aligned, valid = align_teacher_to_student(*args)
    ref_aligned, ref_valid = reference_align(*args)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(aligned, ref_aligned)
    ok_t, ok_s = t_off[..., 1] > t_off[..., 0], s_off[..., 1] > s_off[..., 0]
    assert align_module._pairs_by_search(t_off, ok_t, s_off, ok_s) is None  # nested spans: the comparison answers


def test_search_handles_sorted_overlapping_spans(pair_path):
    """Sliding-window teacher spans overlap each other, but starts and ends are both sorted: one run each."""
    g = torch.Generator().manual_seed(7)
    starts = torch.arange(40).repeat(2, 1)
    t_off = torch.stack([starts, starts + 4], -1)
    s_off = random_partition_offsets(44, 15, g).repeat(2, 1, 1)
    args = (torch.randn(2, 40, 6, generator=g), t_off, torch.rand(2, 40, generator=g) > 0.2, s_off, None)
    aligned, valid = align_teacher_to_student(*args)
    ref_aligned, ref_valid = reference_align(*args[:4], torch.ones(2, 15))
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(aligned, ref_aligned)


def test_gradient_reaches_teacher_hidden(pair_path):
    hidden, *rest = random_case(seed=4)
    got, want = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    weights = torch.randn(hidden.shape[0], rest[2].shape[1], hidden.shape[2])
    (align_teacher_to_student(got, *rest)[0] * weights).sum().backward()
    (reference_align(want, *rest)[0] * weights).sum().backward()
    torch.testing.assert_close(got.grad, want.grad)


def test_empty_spans_and_masked_tokens_take_no_part(pair_path):
    hidden = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
    t_off = torch.tensor([[[0, 0], [0, 3], [3, 6], [2, 5]]])  # a special token, two words, a masked span
    t_mask = torch.tensor([[1, 1, 1, 0]])
    s_off = torch.tensor([[[0, 0], [1, 4], [4, 4], [0, 6], [6, 9]]])
    s_mask = torch.tensor([[1, 1, 1, 0, 1]])
    aligned, valid = align_teacher_to_student(hidden, t_off, t_mask, s_off, s_mask)
    assert valid.tolist() == [[False, True, False, False, False]]
    assert aligned[0, :, 0].tolist() == [0.0, 55.0, 0.0, 0.0, 0.0]


def test_no_overlap_at_all_gives_zeros(pair_path):
    hidden, t_off, t_mask, s_off, _ = random_case(seed=3)
    aligned, valid = align_teacher_to_student(hidden, t_off, t_mask, s_off, torch.zeros(s_off.shape[:2]))
    assert not valid.any() and not aligned.any()


def test_masks_may_be_omitted():
    args = random_case(seed=1)
    hidden, t_off, _, s_off, _ = args
    ones_t, ones_s = torch.ones(t_off.shape[:2]), torch.ones(s_off.shape[:2])
    for got, want in zip(
        align_teacher_to_student(hidden, t_off, None, s_off, None),
        align_teacher_to_student(hidden, t_off, ones_t, s_off, ones_s),
        strict=True,
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_hidden_states_keep_their_dtype(dtype):
    hidden, *rest = random_case(seed=2)
    hidden = hidden.to(dtype)
    aligned, _ = align_teacher_to_student(hidden, *rest)
    assert aligned.dtype == dtype
    want, _ = align_teacher_to_student(hidden.float(), *rest)
    assert torch.equal(aligned, want.to(dtype))  # fp32 sums, one rounding at the end
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(align_teacher_to_student(hidden, *rest)[0], aligned)


def train_bpe(vocab_size, pre_tokenizer, bos=None):
    specials = ["[PAD]", "[UNK]"] + ([bos] if bos else [])
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_matches_reference_on_real_tokenizers(pair_path):
    student = train_bpe(80, pre_tokenizers.Whitespace())
    teacher = train_bpe(
        160, pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]), bos="<s>"
    )
    s_enc = student(TEXTS, return_offsets_mapping=True, padding=True, return_tensors="pt")
    t_enc = teacher(TEXTS, return_offsets_mapping=True, padding=True, return_tensors="pt")
    assert s_enc["input_ids"].shape != t_enc["input_ids"].shape  # the tokenizations really differ
    hidden = torch.randn(*t_enc["input_ids"].shape, 16)
    args = (hidden, t_enc["offset_mapping"], t_enc["attention_mask"], s_enc["offset_mapping"])
    aligned, valid = align_teacher_to_student(*args, s_enc["attention_mask"])
    ref_aligned, ref_valid = reference_align(*args, s_enc["attention_mask"])
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(aligned, ref_aligned)
    # every real student token covers text the teacher also covers; padding is never valid
    assert torch.equal(valid, s_enc["attention_mask"].bool())
