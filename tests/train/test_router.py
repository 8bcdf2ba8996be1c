import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from sarkd_diag.train.router import RouterTerms, apply_router_update, find_routers, router_state, save_router_update

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


def tiny_mixtral(seed=0, experts=4):
    torch.manual_seed(seed)
    config = MixtralConfig(
        **TINY, intermediate_size=32, num_hidden_layers=2, num_local_experts=experts, num_experts_per_tok=2
    )
    return MixtralForCausalLM(config).eval()


def tiny_qwen2_moe():
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **TINY,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config).eval()


def tiny_olmoe():
    torch.manual_seed(0)
    config = OlmoeConfig(**TINY, intermediate_size=8, num_hidden_layers=2, num_experts=4, num_experts_per_tok=3)
    return OlmoeForCausalLM(config).eval()


class OldStyleExpert(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)


class OldStyleMoe(nn.Module):
    """A pre-fusion layout: an nn.Linear gate beside per-expert Linears. The experts' inner size
    equals the expert count, so each `gate_proj` has a router's shape and name."""

    def __init__(self, hidden=16, experts=4, layers=2):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden, num_local_experts=experts, num_experts_per_tok=1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "gate": nn.Linear(hidden, experts),
                    "experts": nn.ModuleList(OldStyleExpert(hidden, experts) for _ in range(experts)),
                }
            )
            for _ in range(layers)
        )

    def forward(self, hidden):
        for block in self.blocks:
            hidden = hidden + block["gate"](hidden).softmax(-1) @ block["gate"].weight
        return hidden


def router_weights(model, routers):
    return [model.get_submodule(r.name).weight for r in routers]


def freeze_all_but_routers(model, routers):
    names = {n for r in routers for n in r.param_names}
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


# --- find_routers ---------------------------------------------------------------------------


def test_find_routers_mixtral():
    model = tiny_mixtral()
    routers = find_routers(model)
    assert [r.name for r in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert [r.param_names for r in routers] == [(f"model.layers.{i}.mlp.gate.weight",) for i in range(2)]
    assert {(r.num_experts, r.top_k) for r in routers} == {(4, 2)}
    assert [r.layer for r in routers] == [0, 1]


def test_find_routers_qwen2_moe_skips_shared_expert_gate_and_dense_layers():
    routers = find_routers(tiny_qwen2_moe())
    assert [r.name for r in routers] == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert [r.layer for r in routers] == [0, 2]


def test_find_routers_olmoe_reads_top_k_from_config():
    routers = find_routers(tiny_olmoe())
    assert [r.name for r in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert {(r.num_experts, r.top_k) for r in routers} == {(4, 3)}


def test_find_routers_old_style_never_takes_expert_gate_proj():
    routers = find_routers(OldStyleMoe())
    assert [r.name for r in routers] == ["blocks.0.gate", "blocks.1.gate"]
    assert routers[0].param_names == ("blocks.0.gate.weight", "blocks.0.gate.bias")
    assert routers[0].top_k == 1
    assert not any("expert" in name for r in routers for name in r.param_names)


def test_find_routers_on_dense_model_finds_nothing():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=32, num_hidden_layers=1))
    assert find_routers(model) == []


def test_patterns_replace_defaults_and_only_narrow():
    model = tiny_mixtral()
    assert [r.name for r in find_routers(model, [r"layers\.1\."])] == ["model.layers.1.mlp.gate"]
    assert find_routers(model, ["router"]) == []  # the module is named "gate", whatever its class
    # a pattern matching everything still yields only structural routers
    assert len(find_routers(model, [".*"])) == 2


def test_bad_pattern_raises_value_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_routers(tiny_mixtral(), ["gate(["])


# --- RouterTerms ----------------------------------------------------------------------------


def test_captured_logits_are_the_models_router_logits():
    model = tiny_mixtral()
    routers = find_routers(model)
    ids = torch.randint(0, 64, (2, 6))
    with RouterTerms(model, routers) as terms, torch.no_grad():
        out = model(ids, output_router_logits=True)
        for router, expected in zip(routers, out.router_logits, strict=True):
            torch.testing.assert_close(terms._logits[router.name], expected)


@pytest.mark.parametrize("term", ["anchor", "load_balance", "entropy"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad, torch.inference_mode])
def test_each_term_alone_trains_the_router(term, grad_mode):
    model = tiny_mixtral()
    routers = find_routers(model)
    freeze_all_but_routers(model, routers)
    weights = {"anchor_weight": 0.0, "load_balance_weight": 0.0, "entropy_weight": 0.0}
    weights[f"{term}_weight"] = 1.0
    with RouterTerms(model, routers, **weights) as terms:
        with torch.no_grad():  # move off W0, else the anchor's gradient is exactly zero
            for weight in router_weights(model, routers):
                weight.add_(0.1 * torch.randn_like(weight))
        ids = torch.randint(0, 64, (2, 8))
        with grad_mode():
            model(ids)
        terms.loss(torch.ones(2, 8)).total.backward()
    for weight in router_weights(model, routers):
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_anchor_is_zero_at_init_and_terms_are_exact_for_a_uniform_router():
    model = tiny_mixtral()
    routers = find_routers(model)
    with torch.no_grad():
        for weight in router_weights(model, routers):
            weight.zero_()
    with RouterTerms(model, routers, 1.0, 1.0, 1.0) as terms, torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
        loss = terms.loss()
    assert loss.anchor.item() == 0.0
    torch.testing.assert_close(loss.load_balance, torch.tensor(1.0))  # Σfᵢ = 1, Pᵢ = 1/N
    torch.testing.assert_close(loss.entropy, torch.tensor(math.log(4)))
    assert set(loss.layer_entropy) == {"expert_entropy_layer0", "expert_entropy_layer1"}
    assert all(not v.requires_grad for v in loss.layer_entropy.values())


def test_padding_is_excluded_from_load_balance_and_entropy():
    model = tiny_mixtral()
    routers = find_routers(model)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ids = torch.randint(0, 64, (2, 6))
    other = ids.clone()
    other[1, 3:] = (ids[1, 3:] + 7) % 64  # different tokens only where padded (right padding, causal)
    with RouterTerms(model, routers) as terms, torch.no_grad():
        model(ids)
        masked, unmasked = terms.loss(mask), terms.loss()
        model(other)
        masked_other, unmasked_other = terms.loss(mask), terms.loss()
    torch.testing.assert_close(masked.load_balance, masked_other.load_balance, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked.entropy, masked_other.entropy, rtol=0, atol=1e-6)
    # the test has teeth: without the mask the padded tokens do change the terms
    assert (unmasked.entropy - unmasked_other.entropy).abs() > 1e-6


def test_loss_errors_are_clear():
    model = tiny_mixtral()
    with RouterTerms(model, find_routers(model)) as terms:
        with pytest.raises(RuntimeError, match="run the teacher forward first"):
            terms.loss()
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 6)))
        with pytest.raises(ValueError, match="attention mask has 6 tokens"):
            terms.loss(torch.ones(1, 6))


def test_close_removes_hooks_and_clear_drops_captures():
    model = tiny_mixtral()
    terms = RouterTerms(model, find_routers(model))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4)))
    assert len(terms._logits) == 2
    terms.clear()
    assert not terms._logits
    terms.close()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4)))
    assert not terms._logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_router_in_a_half_teacher_under_autocast(dtype):
    model = tiny_mixtral().to(dtype)
    routers = find_routers(model)
    freeze_all_but_routers(model, routers)
    for router in routers:
        model.get_submodule(router.name).float()
    with RouterTerms(model, routers, 1.0, 1.0, 1.0) as terms:
        with torch.autocast("cpu", dtype=dtype):
            with torch.no_grad():
                out = model(torch.randint(0, 64, (2, 8)))
            loss = terms.loss()
        loss.total.backward()
    assert out.logits.dtype == dtype
    assert loss.load_balance.dtype == loss.entropy.dtype == torch.float32
    for weight in router_weights(model, routers):
        assert weight.dtype == weight.grad.dtype == torch.float32
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


# --- router_update.pt -----------------------------------------------------------------------


def test_saved_update_reproduces_the_trained_teacher(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "teacher")
    routers = find_routers(model)
    freeze_all_but_routers(model, routers)
    ids = torch.randint(0, 64, (2, 8))
    with RouterTerms(model, routers, 0.1, 1.0, 1.0) as terms:
        optimizer = torch.optim.SGD(router_weights(model, routers), lr=1.0)
        for _ in range(3):
            with torch.no_grad():
                model(ids)
            terms.loss().total.backward()
            optimizer.step()
            optimizer.zero_grad()
            terms.clear()
        assert terms.anchor().item() > 0

    path = save_router_update(router_state(model, routers), tmp_path / "router_update.pt")
    state = torch.load(path, weights_only=True)
    assert sorted(state) == sorted(n for r in routers for n in r.param_names)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())

    fresh = MixtralForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, model(ids).logits)
        assert apply_router_update(fresh, path) == sorted(state)
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_apply_rejects_an_update_for_another_model(tmp_path):
    model = tiny_mixtral()
    path = save_router_update(router_state(model, find_routers(model)), tmp_path / "router_update.pt")
    other = tiny_mixtral(experts=3)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="shape mismatches"):
        apply_router_update(other, path)
    with pytest.raises(ValueError, match="unknown parameters"):
        apply_router_update(other, {"model.layers.9.mlp.gate.weight": torch.zeros(3, 16)})
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_a_router_update_path_given_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    """A path as a notebook user types it: `~` is the home directory, as for every other path sarkd-diag takes."""
    model = tiny_mixtral()
    save_router_update(router_state(model, find_routers(model)), tmp_path / "router_update.pt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert apply_router_update(tiny_mixtral(), "~/router_update.pt")
