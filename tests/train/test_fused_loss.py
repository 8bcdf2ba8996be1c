"""The fused loss pinned to float64 references, to the unfused path, and to its promise: no full logits."""

import math
import weakref

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sarkd_diag.train import fused_loss
from sarkd_diag.train.fused_loss import fused_kd_ce, unfusable_reason
from sarkd_diag.train.losses import KD_KINDS, ce_loss_sum, kd_loss_sum
from sarkd_diag.train.objective import LogitKD

BATCH, LENGTH, VOCAB, S_HIDDEN, T_HIDDEN = 3, 5, 37, 12, 16
OPTIONS = dict(temperature=2.0, jsd_beta=0.3, alpha_kd=0.7, alpha_ce=0.2)


def reference_objective(logits_s, logits_t, labels, kind, temperature, jsd_beta, alpha_kd, alpha_ce):
    """alpha_kd · T² · D(teacher ‖ student) + alpha_ce · CE over target rows, in float64, the obvious way."""
    mask = labels != -100
    log_s = F.log_softmax(logits_s[mask] / temperature, dim=-1)
    log_t = F.log_softmax(logits_t[mask] / temperature, dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward-kl":
        per_row = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse-kl":
        per_row = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(jsd_beta), log_s + math.log(1 - jsd_beta)]), dim=0)
        per_row = jsd_beta * (p_t * (log_t - log_m)).sum(-1) + (1 - jsd_beta) * (p_s * (log_s - log_m)).sum(-1)
    kd = temperature**2 * per_row.sum()
    ce = F.cross_entropy(logits_s[mask], labels[mask], reduction="sum")
    return alpha_kd * kd + alpha_ce * ce, kd, ce


def inputs(bias: bool, tied: bool = False, with_ignored: bool = True, seed: int = 0):
    """Hidden states and heads of both models, labels with ignored positions; the student head may have a bias,
    or share its weight with an embedding (a tied head) that also gets a gradient of its own."""
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(BATCH, LENGTH, S_HIDDEN, generator=generator).requires_grad_()
    h_t = torch.randn(BATCH, LENGTH, T_HIDDEN, generator=generator).requires_grad_()
    head_s, head_t = nn.Linear(S_HIDDEN, VOCAB, bias=bias), nn.Linear(T_HIDDEN, VOCAB, bias=True)
    for head in (head_s, head_t):
        head.weight.data = torch.randn(head.weight.shape, generator=generator)
        if head.bias is not None:
            head.bias.data = torch.randn(head.bias.shape, generator=generator)
    head_t.requires_grad_(False)
    embedding = nn.Embedding(VOCAB, S_HIDDEN)
    if tied:
        head_s.weight = embedding.weight
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    if with_ignored:
        labels[0, :2] = -100
        labels[2, 4] = -100
    return h_s, head_s, h_t, head_t, labels, embedding


def student_params(h_s, head_s, h_t):
    return [h_s, head_s.weight, h_t] + ([head_s.bias] if head_s.bias is not None else [])


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 4])
def test_value_and_gradients_match_the_float64_reference(kind, bias, chunk_tokens):
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias)
    params = student_params(h_s, head_s, h_t)
    sums = fused_kd_ce(h_s, head_s, h_t, head_t, labels, kind=kind, chunk_tokens=chunk_tokens, **OPTIONS)
    grads = torch.autograd.grad(sums.objective, params)

    double = [p.detach().double().requires_grad_() for p in params]
    h_s64, w_s64, h_t64 = double[:3]
    b_s64 = double[3] if bias else None
    reference, kd, ce = reference_objective(
        F.linear(h_s64, w_s64, b_s64), F.linear(h_t64, head_t.weight.double(), head_t.bias.double()), labels,
        kind, **OPTIONS)
    expected = torch.autograd.grad(reference, double)

    for got, want in ((sums.objective, reference), (sums.kd_sum, kd), (sums.ce_sum, ce)):
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_equals_the_unfused_losses_on_the_heads_logits(kind):
    """The same sums and gradients as today's path, with a tied head whose embedding also trains."""
    h_s, head_s, h_t, head_t, labels, embedding = inputs(bias=False, tied=True)
    options = {k: v for k, v in OPTIONS.items() if not k.startswith("alpha")}
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))

    def gradients(objective):
        params = [h_s, embedding.weight, h_t]
        return torch.autograd.grad(objective + embedding(ids).square().sum(), params)

    fused = fused_kd_ce(h_s, head_s, h_t, head_t, labels, kind=kind, chunk_tokens=4, **OPTIONS)
    logits_s = head_s(h_s)
    kd = kd_loss_sum(logits_s, head_t(h_t), labels != -100, kind=kind, **options)
    ce = ce_loss_sum(logits_s, labels)
    unfused = OPTIONS["alpha_kd"] * kd + OPTIONS["alpha_ce"] * ce
    assert torch.allclose(fused.objective, unfused, rtol=1e-6)
    for got, want in zip(gradients(fused.objective), gradients(unfused), strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_any_grad_factor_gives_the_same_gradient():
    """The factor only says what backward will bring; a wrong guess is corrected in backward."""
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=True)
    params = student_params(h_s, head_s, h_t)
    reference = torch.autograd.grad(fused_kd_ce(h_s, head_s, h_t, head_t, labels, **OPTIONS).objective * 8.0, params)
    for factor in (8.0, 1.0, torch.tensor(1024.0)):
        sums = fused_kd_ce(h_s, head_s, h_t, head_t, labels, grad_factor=factor, **OPTIONS)
        for got, want in zip(torch.autograd.grad(sums.objective * 8.0, params), reference, strict=True):
            assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_fp16_products_carry_the_loss_scale_like_the_unfused_backward():
    """Under a loss scale the fp16 gradient products see scaled values, as the unfused fp16 backward does: with
    a scale that keeps them finite both give the same gradients; with a scale that overflows fp16, both give Inf."""
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=False)
    h_s16, h_t16 = h_s.detach().half().requires_grad_(), h_t.detach().half()
    head_s.half(), head_t.half()

    def fused_grads(scale):
        objective = fused_kd_ce(h_s16, head_s, h_t16, head_t, labels, grad_factor=scale, **OPTIONS).objective
        return torch.autograd.grad(objective * scale, [h_s16, head_s.weight])

    def unfused_grads(scale):
        logits_s = head_s(h_s16)
        kd = kd_loss_sum(logits_s, head_t(h_t16), labels != -100, kind="forward-kl", temperature=2.0)
        objective = OPTIONS["alpha_kd"] * kd + OPTIONS["alpha_ce"] * ce_loss_sum(logits_s, labels)
        return torch.autograd.grad(objective * scale, [h_s16, head_s.weight])

    for got, want in zip(fused_grads(256.0), unfused_grads(256.0), strict=True):
        assert got.dtype == torch.float16 and torch.isfinite(want).all()
        assert (got.float() - want.float()).abs().max() <= 4e-3 * want.float().abs().max()
    overflowing = 2.0**24
    assert not all(torch.isfinite(g).all() for g in unfused_grads(overflowing))
    assert not all(torch.isfinite(g).all() for g in fused_grads(overflowing))


class MostLiveVocabBytes(TorchDispatchMode):
    """The most bytes of [rows, vocab] floating tensors alive at once, by storage (the heads' weights aside): what
    the loss holds of vocabulary width at its peak."""

    def __init__(self, vocab: int, weights: list[torch.Tensor]):
        super().__init__()
        self.vocab, self.refs, self.most = vocab, [], 0
        self.weight_storages = {w.untyped_storage().data_ptr() for w in weights}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dim() == 2 and t.shape[-1] == self.vocab and t.is_floating_point() \
                    and t.untyped_storage().data_ptr() not in self.weight_storages:
                self.refs.append(weakref.ref(t))
        alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                 for t in (r() for r in self.refs) if t is not None}
        self.most = max(self.most, sum(alive.values()))
        return out


@pytest.mark.parametrize(("kind", "dtype"), [("forward-kl", torch.float32), ("reverse-kl", torch.float32),
                                             ("forward-kl", torch.float16)])
def test_a_chunk_holds_its_student_logits_half_its_teacher_logits_and_a_row_group_workspace(kind, dtype,
                                                                                           monkeypatch):
    """Forward and backward, with the teacher side training (SAR): the student's logits of the chunk, which become
    their own gradient in place, the teacher's for half of its rows at a time, and four fp32 buffers of one row
    group (scratch, the CE gradient, both log-softmaxes) — nothing else of vocabulary width, in any dtype."""
    monkeypatch.setattr(fused_loss, "ROW_GROUP_VALUES", VOCAB)  # one row a group
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=True)
    if dtype != torch.float32:
        h_s, h_t = h_s.detach().to(dtype).requires_grad_(), h_t.detach().to(dtype).requires_grad_()
        head_s, head_t = head_s.to(dtype), head_t.to(dtype)
    with MostLiveVocabBytes(VOCAB, [head_s.weight, head_t.weight]) as held:
        fused_kd_ce(h_s, head_s, h_t, head_t, labels, kind=kind, chunk_tokens=4, **OPTIONS).objective.backward()
    logits = (5 + 3) * VOCAB * dtype.itemsize  # 15 rows: three chunks of 5 rows, the teacher's 3 at a time at most
    assert held.most == logits + 4 * VOCAB * 4


@pytest.mark.parametrize("n_rows", [15, 64, 84, 167, 168, 3])
def test_no_chunk_is_narrower_than_the_chunk_rows(n_rows):
    """The heads' forward products never run on fewer rows than a chunk's, where they slow down (MIN_CHUNK_ROWS):
    the rows are cut into as many chunks as hold that many each, in training and in evaluation alike."""
    generator = torch.Generator().manual_seed(1)
    h_s = torch.randn(1, n_rows, S_HIDDEN, generator=generator).requires_grad_()
    h_t = torch.randn(1, n_rows, T_HIDDEN, generator=generator)
    head_s, head_t = nn.Linear(S_HIDDEN, VOCAB), nn.Linear(T_HIDDEN, VOCAB).requires_grad_(False)
    labels = torch.randint(0, VOCAB, (1, n_rows), generator=generator)
    widths = []
    head_s.register_forward_hook(lambda _module, args, _out: widths.append(args[0].shape[-2]))
    fused_kd_ce(h_s, head_s, h_t, head_t, labels, chunk_tokens=10, **OPTIONS).objective.backward()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_loss, "chunk_rows", lambda *_: 10)
        fused_loss.fused_ce_sum(h_s, head_s, labels)
    training, evaluation = widths[:len(widths) // 2], widths[len(widths) // 2:]
    assert training == evaluation and sum(training) == n_rows
    assert min(training) >= min(10, n_rows) and max(training) - min(training) <= 1


@pytest.mark.parametrize(("dtype", "autocast", "rows"), [(torch.float32, False, 10), (torch.bfloat16, False, 20),
                                                          (torch.float32, True, 20)])
def test_a_chunk_holds_the_same_bytes_of_logits_in_every_dtype(monkeypatch, dtype, autocast, rows):
    """Half-precision logits (bf16 weights, or fp32 ones under bf16 autocast) come in chunks of twice the rows of
    fp32 ones: the same memory, and wider products, which run faster."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 10 * VOCAB * 4)
    monkeypatch.setattr(fused_loss, "MIN_CHUNK_ROWS", 1)
    generator = torch.Generator().manual_seed(2)
    h_s = torch.randn(1, 60, S_HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    h_t = torch.randn(1, 60, T_HIDDEN, generator=generator, dtype=dtype)
    head_s = nn.Linear(S_HIDDEN, VOCAB, dtype=dtype)
    head_t = nn.Linear(T_HIDDEN, VOCAB, dtype=dtype).requires_grad_(False)
    labels = torch.randint(0, VOCAB, (1, 60), generator=generator)
    widths = []
    head_s.register_forward_hook(lambda _module, args, _out: widths.append(args[0].shape[-2]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused_kd_ce(h_s, head_s, h_t, head_t, labels, **OPTIONS).objective.backward()
        fused_loss.fused_ce_sum(h_s, head_s, labels)
    assert widths == [rows] * (2 * 60 // rows)


def test_evaluations_cross_entropy_from_hidden_states_equals_the_unfused_one():
    h_s, head_s, _, _, labels, _ = inputs(bias=True)
    want = ce_loss_sum(head_s(h_s), labels)
    for rows in (None, 4):
        with pytest.MonkeyPatch.context() as patch:
            if rows:
                patch.setattr(fused_loss, "chunk_rows", lambda *_, rows=rows: rows)
            got = fused_loss.fused_ce_sum(h_s, head_s, labels)
        assert not got.requires_grad and abs(got.item() - want.item()) <= 1e-6 * abs(want.item())


def test_without_gradients_it_only_sums():
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=False)
    with torch.no_grad():
        sums = fused_kd_ce(h_s, head_s, h_t, head_t, labels, **OPTIONS)
    assert not sums.objective.requires_grad and math.isfinite(sums.objective.item())


def test_second_backward_through_a_retained_graph_is_refused():
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=False)
    objective = fused_kd_ce(h_s, head_s, h_t, head_t, labels, **OPTIONS).objective
    objective.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        objective.backward()


def test_a_trainable_teacher_head_is_refused():
    h_s, head_s, h_t, head_t, labels, _ = inputs(bias=False)
    head_t.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher head"):
        fused_kd_ce(h_s, head_s, h_t, head_t, labels, **OPTIONS)


# ------------------------------------------------------------------------------ through the objective
class LargestVocabTensor(TorchDispatchMode):
    """The most rows of any tensor an op produces whose last dimension is the vocabulary (views of the models'
    weights aside: a head's transposed weight is not logits)."""

    def __init__(self, vocab: int, weights: list[torch.Tensor]):
        super().__init__()
        self.vocab, self.largest = vocab, 0
        self.weight_storages = {w.untyped_storage().data_ptr() for w in weights}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dim() and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in self.weight_storages:
                self.largest = max(self.largest, t.numel() // self.vocab)
        return out


def objective_pair(world, fused: bool, routers: bool):
    """LogitKD on the tiny GPT-2 student and the tiny Mixtral teacher (routers training or not), fp32."""
    from transformers import AutoModelForCausalLM

    from sarkd_diag.train.router import RouterTerms, find_routers

    student = AutoModelForCausalLM.from_pretrained(world["student"]).train()
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"]).requires_grad_(False).eval()
    terms = None
    if routers:
        found = find_routers(teacher)
        names = dict(teacher.named_parameters())
        for router in found:
            for name in router.param_names:
                names[name].requires_grad_(True)
        terms = RouterTerms(teacher, found, 0.01, 0.01, 0.001)
    return LogitKD(teacher, student, kind="forward-kl", temperature=2.0, jsd_beta=0.5, alpha_kd=0.5,
                   alpha_ce=0.5, fused=fused, router_terms=terms), student, teacher


def a_batch(vocab: int, batch: int = 4, length: int = 16) -> dict:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "n_targets": int((labels != -100).sum())}


@pytest.mark.parametrize("routers", [False, True])
def test_the_objective_fused_equals_unfused_and_never_holds_full_logits(tiny_world, monkeypatch, routers):
    """Through LogitKD on real models: the same sums and the same gradients (student, and the teacher's routers
    when they train), and no tensor of [batch, length, vocab] elements exists in the fused forward or backward."""
    monkeypatch.setattr(fused_loss, "chunk_rows", lambda *_: 10)  # 64 rows in six chunks of 10 or 11
    results = {}
    for fused in (False, True):
        objective, student, teacher = objective_pair(tiny_world, fused, routers)
        vocab = student.config.vocab_size
        batch = a_batch(vocab)
        watched = [p for p in [*student.parameters(), *teacher.parameters()] if p.requires_grad]
        with LargestVocabTensor(vocab, [*student.parameters(), *teacher.parameters()]) as largest:
            parts = objective(batch)
            (parts.objective + (parts.router_loss if routers else 0)).backward()
        results[fused] = (parts, [p.grad.clone() for p in watched], largest.largest)
        objective.close()
    (plain, plain_grads, plain_largest), (fused, fused_grads, fused_largest) = results[False], results[True]
    rows = 4 * 16
    assert plain_largest == rows  # the unfused path holds full logits: the measure sees them
    assert fused_largest <= 11
    for name in ("objective", "kd_sum", "ce_sum"):
        want = getattr(plain, name).item()
        assert abs(getattr(fused, name).item() - want) <= 1e-5 * abs(want)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class LiveHiddenStates(TorchDispatchMode):
    """Weak references to every tensor of one shape that an op produces: how many of them are still alive, counted
    by storage (a view of a live state is the same state)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape, self.refs = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and tuple(t.shape) == self.shape:
                self.refs.append(weakref.ref(t))
        return out

    def alive(self) -> int:
        return len({t.untyped_storage().data_ptr() for t in (r() for r in self.refs) if t is not None})


@pytest.mark.parametrize("fused", [False, True])
def test_a_frozen_teacher_keeps_no_layer_states_but_the_last(tiny_world, fused):
    """Under no_grad the teacher frees each layer's states as the next runs; the fused loss asks it for its last
    hidden state only (asking for `output_hidden_states` would keep every layer's until the loss is done)."""
    objective, student, teacher = objective_pair(tiny_world, fused, routers=False)
    batch = a_batch(student.config.vocab_size)
    alive_after_teacher = []
    shape = (*batch["input_ids"].shape, teacher.config.hidden_size)
    with LiveHiddenStates(shape) as states:
        handle = teacher.register_forward_hook(lambda *_: alive_after_teacher.append(states.alive()))
        objective(batch)
        handle.remove()
    objective.close()
    assert teacher.config.num_hidden_layers >= 2
    assert alive_after_teacher == [1 if fused else 0]  # the last state for the fused loss; the unfused keeps logits


# ------------------------------------------------------------------------------------ which models fuse
def test_gpt2_and_mixtral_fuse(tiny_world):
    from transformers import AutoModelForCausalLM

    for name in ("student", "teacher"):
        assert unfusable_reason(AutoModelForCausalLM.from_pretrained(tiny_world[name])) is None


def test_a_model_whose_forward_is_already_nan_still_fuses():
    """A Llama-style student whose MLP overflows: its logits are NaN both ways, which is no projection in between
    (torch.equal calls two NaNs unequal, and the run fell back with a false `loss_unfused` warning)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(math.inf)
    assert model(input_ids=torch.arange(4).unsqueeze(0)).logits.isnan().any()
    assert unfusable_reason(model) is None


def test_a_soft_capped_head_does_not_fuse():
    """Gemma 2 caps its logits (tanh) after the head: the head applied to the last hidden state is not the logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config).train()
    assert "soft cap" in unfusable_reason(model)
    assert model.training  # checked in evaluation mode, put back


def test_opt_whose_forward_skips_its_base_model_fuses():
    """OPT's forward calls its decoder (`model.decoder`) past its base model: a hook on the base model never fired,
    and every OPT student or teacher crashed before step 1 (IndexError)."""
    from transformers import OPTConfig, OPTForCausalLM

    from sarkd_diag.train.fused_loss import last_hidden_state

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                     num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval()
    assert unfusable_reason(model) is None
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        caught = last_hidden_state(model, input_ids=ids)  # the decoder's output, caught as it leaves
    read = last_hidden_state(model, input_ids=ids)  # under autograd: the last of the hidden states
    assert torch.equal(caught, read.detach())
    assert torch.allclose(model.lm_head(caught), model(input_ids=ids).logits)


def test_a_forward_that_never_runs_its_decoder_does_not_fuse():
    model = tiny.make_gpt2(64)
    model.get_decoder = lambda: nn.Linear(2, 2)  # a decoder the forward never calls
    assert "never runs its decoder" in unfusable_reason(model)


def test_a_projection_between_the_state_and_the_head_does_not_fuse():
    model = tiny.make_gpt2(64)
    model.lm_head.register_forward_pre_hook(lambda _module, args: (args[0] * 2,))
    assert "does not read its last hidden state" in unfusable_reason(model)


def test_scaled_logits_do_not_fuse_on_the_meta_device_either():
    """Identity of tensors, not values: the check gives the same answer on weights that have none (estimate-memory
    builds its models on the meta device), for a scale on the logits (Cohere) and for an MoE teacher."""
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.5, pad_token_id=None)
    with torch.device("meta"):
        cohere = CohereForCausalLM(config)
    assert "a scale on the logits" in unfusable_reason(cohere) == unfusable_reason(CohereForCausalLM(config))
    with torch.device("meta"):
        mixtral = tiny.make_mixtral(64)
    assert unfusable_reason(mixtral.to(torch.bfloat16)) is None  # meta's grouped matrix products take bf16 only


def test_a_head_that_is_not_linear_does_not_fuse():
    model = tiny.make_gpt2(64)
    model.lm_head = nn.Sequential(nn.Linear(32, 64, bias=False))
    assert "not a linear layer" in unfusable_reason(model)
