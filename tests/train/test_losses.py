"""The loss math pinned to plain full-vocabulary references written out below."""

import math

import pytest
import tiny
import torch
import torch.nn.functional as F

from sarkd_diag.train.losses import KD_KINDS, ce_loss_sum, default_chunk_tokens, kd_loss_sum
from sarkd_diag.train.objective import LogitKD

BATCH, LENGTH, VOCAB = 3, 5, 37


def reference_kd(student, teacher, mask, kind, temperature, beta):
    """T² · D(teacher ‖ student) summed over target rows, in float64, the obvious way."""
    log_s = F.log_softmax(student.double()[mask] / temperature, dim=-1)
    log_t = F.log_softmax(teacher.double()[mask] / temperature, dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward-kl":
        per_row = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse-kl":
        per_row = (p_s * (log_s - log_t)).sum(-1)
    else:  # TRL's GKD: m = beta·p_T + (1-beta)·p_S, JSD = beta·KL(p_T‖m) + (1-beta)·KL(p_S‖m)
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        per_row = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    return temperature**2 * per_row.sum()


def random_logits(seed, dtype=torch.float32, shape=(BATCH, LENGTH, VOCAB)):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=generator)).to(dtype)


def target_mask(with_ignored):
    """All 15 positions, or 10 in three runs of consecutive flat rows (2-6, 8-9, 11-13)."""
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    if with_ignored:
        mask[0, :2] = False
        mask[1, 2] = False
        mask[2, 0] = False
        mask[2, 4] = False
    return mask


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("with_ignored", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 4])
def test_kd_matches_reference_value_and_gradients(kind, with_ignored, chunk_tokens):
    student = random_logits(0).requires_grad_()
    teacher = random_logits(1).requires_grad_()
    mask = target_mask(with_ignored)  # chunks of 4 leave uneven chunks at the ends of runs
    options = dict(kind=kind, temperature=2.0, jsd_beta=0.3)

    loss = kd_loss_sum(student, teacher, mask, chunk_tokens=chunk_tokens, **options)
    grad_s, grad_t = grads_of(loss, student, teacher)

    ref_student = student.detach().double().requires_grad_()
    ref_teacher = teacher.detach().double().requires_grad_()
    ref = reference_kd(ref_student, ref_teacher, mask, kind, 2.0, 0.3)
    ref_grad_s, ref_grad_t = grads_of(ref, ref_student, ref_teacher)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_s.double(), ref_grad_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_t.double(), ref_grad_t, rtol=1e-5, atol=1e-7)
    assert (grad_s[~mask] == 0).all() and (grad_t[~mask] == 0).all()
    with torch.no_grad():  # the evaluation path gives the same value
        assert kd_loss_sum(student, teacher, mask, chunk_tokens=chunk_tokens, **options) == loss


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("trained", ["student", "teacher"])
def test_gradient_of_one_side_when_the_other_is_detached(kind, trained):
    logits = {"student": random_logits(2), "teacher": random_logits(3)}
    logits[trained].requires_grad_()
    mask = target_mask(True)
    loss = kd_loss_sum(logits["student"], logits["teacher"], mask, kind=kind, chunk_tokens=3)
    (grad,) = grads_of(loss, logits[trained])
    reference_logits = dict(logits, **{trained: logits[trained].detach().double().requires_grad_()})
    ref = reference_kd(reference_logits["student"], reference_logits["teacher"], mask, kind, 2.0, 0.5)
    (ref_grad,) = grads_of(ref, reference_logits[trained])
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identical_logits_give_exactly_zero(kind, dtype):
    logits = random_logits(4, dtype).requires_grad_()
    loss = kd_loss_sum(logits, logits.detach().clone(), target_mask(True), kind=kind, chunk_tokens=4)
    assert loss.item() == 0.0
    (grad,) = grads_of(loss, logits)
    assert (grad == 0).all()


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_scaling(kind, temperature):
    student, teacher, mask = random_logits(5), random_logits(6), target_mask(True)
    loss = kd_loss_sum(student, teacher, mask, kind=kind, temperature=temperature)
    ref = reference_kd(student, teacher, mask, kind, temperature, 0.5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    # Dividing logits scaled by T by T gives back the T=1 divergence, times T².
    scaled = kd_loss_sum(student * temperature, teacher * temperature, mask, kind=kind, temperature=temperature)
    unscaled = kd_loss_sum(student, teacher, mask, kind=kind, temperature=1.0)
    torch.testing.assert_close(scaled, temperature**2 * unscaled, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize(
    "student_dtype, teacher_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]
)
def test_low_precision_logits_are_upcast(kind, student_dtype, teacher_dtype):
    student = random_logits(7, student_dtype).requires_grad_()
    teacher = random_logits(8, teacher_dtype).requires_grad_()
    mask = target_mask(True)
    loss = kd_loss_sum(student, teacher, mask, kind=kind, chunk_tokens=4)
    grad_s, grad_t = grads_of(loss, student, teacher)
    # The exact upcast of the low-precision values is what the loss must see.
    ref_student = student.detach().double().requires_grad_()
    ref_teacher = teacher.detach().double().requires_grad_()
    ref = reference_kd(ref_student, ref_teacher, mask, kind, 2.0, 0.5)
    ref_grad_s, ref_grad_t = grads_of(ref, ref_student, ref_teacher)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    assert grad_s.dtype == student_dtype and grad_t.dtype == teacher_dtype
    torch.testing.assert_close(grad_s, ref_grad_s.to(student_dtype))
    torch.testing.assert_close(grad_t, ref_grad_t.to(teacher_dtype))


def test_fp16_gradient_keeps_small_entries_under_a_loss_scale():
    """As under GradScaler: the scale must be applied before the gradient is rounded to fp16."""
    student = (4 * random_logits(9)).half().requires_grad_()
    teacher = (4 * random_logits(10)).half()
    mask, scale = target_mask(False), 2.0**16
    (grad,) = grads_of(kd_loss_sum(student, teacher, mask) * scale, student)
    ref_student = student.detach().double().requires_grad_()
    (ref_grad,) = grads_of(reference_kd(ref_student, teacher, mask, "forward-kl", 2.0, 0.5) * scale, ref_student)
    tiny = (ref_grad.abs() < 2**-24 * scale) & (ref_grad.abs() > 2**-14)  # would flush to 0 unscaled
    assert tiny.any()
    torch.testing.assert_close(grad, ref_grad.to(torch.float16))


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logit_gives_nonfinite_loss(kind, side, bad):
    student, teacher = random_logits(11), random_logits(12)
    (student if side == "student" else teacher)[1, 3, 7] = bad
    mask = target_mask(True)
    assert mask[1, 3]
    assert not torch.isfinite(kd_loss_sum(student, teacher, mask, kind=kind, chunk_tokens=4))


@pytest.mark.parametrize("with_ignored", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_sum_matches_cross_entropy(with_ignored, dtype):
    logits = random_logits(13, dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(14))
    labels[~target_mask(with_ignored)] = -100
    loss = ce_loss_sum(logits, labels)
    (grad,) = grads_of(loss, logits)

    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100, reduction="sum")
    (ref_grad,) = grads_of(ref, ref_logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    assert grad.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}  # else bf16's defaults
    torch.testing.assert_close(grad, ref_grad.to(dtype), **tolerance)


def test_ce_nonfinite_logit_gives_nonfinite_loss():
    logits = random_logits(15)
    logits[0, 0, 3] = float("nan")
    assert not torch.isfinite(ce_loss_sum(logits, torch.zeros(BATCH, LENGTH, dtype=torch.long)))


def test_empty_mask_returns_zero_sum():
    student, teacher = random_logits(16).requires_grad_(), random_logits(17)
    empty = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    for kind in KD_KINDS:
        loss = kd_loss_sum(student, teacher, empty, kind=kind)
        assert loss.item() == 0.0
        assert (grads_of(loss, student)[0] == 0).all()
    ce = ce_loss_sum(student, torch.full((BATCH, LENGTH), -100))
    assert ce.item() == 0.0
    assert (grads_of(ce, student)[0] == 0).all()


def test_sums_over_micro_batches_add_up_to_the_whole_batch():
    """The loop divides the summed micro-batch losses once by the global target count."""
    student, teacher, mask = random_logits(18), random_logits(19), target_mask(True)
    whole = kd_loss_sum(student, teacher, mask)
    parts = sum(kd_loss_sum(student[i : i + 1], teacher[i : i + 1], mask[i : i + 1]) for i in range(BATCH))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)


def test_gpt2_own_loss_equals_ce_sum_over_shifted_labels():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    input_ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    shifted = torch.full_like(input_ids, -100)
    shifted[:, :-1] = input_ids[:, 1:]
    count = (shifted != -100).sum()
    torch.testing.assert_close(ce_loss_sum(out.logits, shifted) / count, out.loss, rtol=1e-6, atol=0)


def test_default_chunk_is_about_32_mib_of_fp32():
    assert default_chunk_tokens(50257) == 166
    assert 2**25 - 50257 * 4 < default_chunk_tokens(50257) * 50257 * 4 <= 2**25
    assert default_chunk_tokens(2**24) == 1


def test_second_backward_through_a_retained_graph_is_refused():
    student = random_logits(20).requires_grad_()
    loss = kd_loss_sum(student, random_logits(21), target_mask(False))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kind="kl"), "kind"),
        (dict(temperature=0.0), "temperature"),
        (dict(kind="jsd", jsd_beta=1.0), "jsd_beta"),
        (dict(chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        kd_loss_sum(random_logits(22), random_logits(23), target_mask(False), **options)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss_sum(random_logits(24), random_logits(25, shape=(BATCH, LENGTH, VOCAB + 1)), target_mask(False))
    with pytest.raises(ValueError, match="target_mask"):
        kd_loss_sum(random_logits(24), random_logits(25), target_mask(False).long())


def test_a_teacher_padded_past_the_tokenizer_gives_the_kd_of_its_unpadded_self():
    """Logit KD over the shared ids: a teacher with 32 padding rows beyond the student's 96 (any values there) gives
    exactly the KD and CE of the same teacher without them — the padding takes no probability from the real ids."""
    torch.manual_seed(0)
    padded = tiny.make_llama(128, seed=5)
    unpadded = tiny.make_llama(96, seed=5)
    with torch.no_grad():
        for name, p in unpadded.named_parameters():
            p.copy_(padded.get_parameter(name)[:96] if p.shape[0] == 96 else padded.get_parameter(name))
        padded.lm_head.weight[96:].normal_(std=5.0)  # padding rows the tokenizer never uses
    student = tiny.make_llama(96, seed=0)
    ids = torch.arange(32).reshape(2, 16) % 96
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "n_targets": 30}
    options = dict(kind="forward-kl", temperature=2.0, jsd_beta=0.5, alpha_kd=1.0, alpha_ce=1.0, fused=False)
    parts = [LogitKD(teacher, student, vocab=96, **options)(batch) for teacher in (padded, unpadded)]
    assert parts[0].kd_sum > 0 and torch.equal(parts[0].kd_sum, parts[1].kd_sum)
    assert torch.equal(parts[0].ce_sum, parts[1].ce_sum)
