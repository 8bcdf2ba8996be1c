"""SAR-KD's teacher routers: find them, shape them with router terms, save and reapply them.

The teacher's MoE router weights are its only trainable parameters. Routers are found by
structure (a 2-D ``weight`` of shape [num_experts, hidden_size] as the config states), never by
name alone: names like ``gate`` also match every expert's ``gate_proj``.
"""

from __future__ import annotations

import functools
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.config import user_path
from ..contract.shards import is_sharded
from .distributed import full_tensor

DEFAULT_PATTERNS = ["gate", "router"]

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "num_selected_experts")
DEFAULT_TOP_K = 2


@dataclass(frozen=True)
class RouterInfo:
    """One router: where it lives and how it routes (plain data, fit for a `router_found` event)."""

    name: str  # module name, e.g. "model.layers.3.mlp.gate"
    param_names: tuple[str, ...]  # full names in the model, e.g. ("model.layers.3.mlp.gate.weight",)
    num_experts: int
    top_k: int
    layer: int  # the first integer in `name` (the decoder layer), else the router's ordinal


def _config_int(config, keys) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _compile_patterns(patterns: list[str] | None) -> list[re.Pattern]:
    compiled = []
    for pattern in DEFAULT_PATTERNS if patterns is None else patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"router pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return compiled


def _under_experts(name: str) -> bool:
    """True for anything inside an expert container (`experts.3.gate_proj`, `shared_expert.gate_proj`)."""
    return any("expert" in part for part in name.split(".")[:-1])


def find_routers(model: nn.Module, patterns: list[str] | None = None) -> list[RouterInfo]:
    """The model's MoE routers, identified by weight shape [num_experts, hidden_size] from its config.

    `patterns` (regexes searched in the module name; they replace the defaults ``gate``/``router``)
    only narrow the structural choice; a module must match at least one. Modules inside expert
    containers are never routers. Returns [] when the model is not an MoE or nothing matches.
    """
    compiled = _compile_patterns(patterns)
    config = getattr(model, "config", None)
    if config is None:
        return []
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_experts = _config_int(config, _EXPERT_COUNT_KEYS)
    hidden = _config_int(config, _HIDDEN_KEYS)
    if num_experts is None or hidden is None:
        return []
    config_top_k = _config_int(config, _TOP_K_KEYS)

    routers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (num_experts, hidden):
            continue
        if isinstance(module, nn.Embedding) or _under_experts(name):
            continue
        if not any(p.search(name) for p in compiled):
            continue
        params = tuple(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        top_k = config_top_k or getattr(module, "top_k", None) or DEFAULT_TOP_K
        digits = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        layer = int(digits.group(1)) if digits else len(routers)
        routers.append(RouterInfo(name, params, num_experts, int(top_k), layer))
    return routers


@dataclass
class RouterLoss:
    """The router terms of one forward. `layer_entropy` stays on the device (metrics, no grad)."""

    total: torch.Tensor
    anchor: torch.Tensor
    load_balance: torch.Tensor
    entropy: torch.Tensor
    layer_entropy: dict[str, torch.Tensor] = field(default_factory=dict)


def _hidden_from_call(args, kwargs) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if torch.is_tensor(v))


class RouterTerms:
    """Capture each router's logits every forward and turn them into SAR's router loss.

    The logits are recomputed in the hook as ``F.linear(hidden.detach(), weight, bias)`` with grad
    enabled, whatever the router module returns (a tensor, or Mixtral's (logits, scores, indices)
    tuple). So each term's graph reaches only its own router's weights — the teacher may run under
    ``torch.no_grad()`` (or inference mode) and keep no activations — and nothing is detached from
    the weights, so every term trains them. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        model: nn.Module,
        routers: list[RouterInfo],
        anchor_weight: float = 0.0,
        load_balance_weight: float = 0.0,
        entropy_weight: float = 0.0,
    ):
        self.routers = list(routers)
        self.weights = (anchor_weight, load_balance_weight, entropy_weight)
        self._modules = {r.name: model.get_submodule(r.name) for r in self.routers}
        # W0: a frozen fp32 copy of every router parameter, by (module name, attribute); of a sharded router, a
        # DTensor of this rank's shard
        self._initial = {
            (r.name, attr): p.detach().to(torch.float32, copy=True)
            for r in self.routers
            for attr, p in self._modules[r.name].named_parameters(recurse=False)
        }
        self._logits: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True) for name, module in self._modules.items()
        ]

    def _hook(self, name: str):
        def capture(module, args, kwargs, output):
            hidden = _hidden_from_call(args, kwargs).detach()
            with torch.inference_mode(False), torch.enable_grad():
                if hidden.is_inference():
                    hidden = hidden.clone()
                hidden = hidden.reshape(-1, module.weight.shape[-1]).to(module.weight.dtype)
                self._logits[name] = F.linear(hidden, module.weight, getattr(module, "bias", None))

        return capture

    def anchor(self) -> torch.Tensor:
        """Σ‖W − W0‖² over all router parameters (fp32, with grad). Of sharded routers (read outside the
        teacher's forward, where they are DTensors) each rank sums its shards and one all-reduce adds them up:
        the anchor of the full weights, its gradient landing on each rank's shard."""
        terms = [
            (getattr(self._modules[name], attr).float() - initial).pow(2).sum()
            for (name, attr), initial in self._initial.items()
        ]
        if is_sharded(terms[0]):  # partial sums, one per rank: added up locally, then over ranks
            return functools.reduce(operator.add, terms).full_tensor()
        return torch.stack(terms).sum()

    def loss(self, attention_mask: torch.Tensor | None = None) -> RouterLoss:
        """Router loss of the last forward: anchor_w·anchor + lb_w·load_balance − entropy_w·entropy.

        `attention_mask` [batch, length] (1 = real token) is the mask of the teacher's input;
        padding tokens count in neither load balance nor entropy. Load balance is Switch's
        N·Σᵢ fᵢ·Pᵢ with fᵢ the share of top-k dispatches to expert i (Σfᵢ = 1, so a perfectly
        balanced router scores 1) and Pᵢ the mean gate probability; both it and the entropy are
        per-layer means over real tokens, averaged over layers.
        """
        missing = [r.name for r in self.routers if r.name not in self._logits]
        if missing:
            raise RuntimeError(f"no router logits captured for {missing}: run the teacher forward first")
        balances, entropies, layer_entropy = [], [], {}
        for router in self.routers:
            logits = self._logits[router.name].float()
            with torch.autocast(logits.device.type, enabled=False):  # the terms' matmuls stay fp32
                balance, entropy = self._layer_terms(router, logits, attention_mask)
            balances.append(balance)
            entropies.append(entropy)
            layer_entropy[f"expert_entropy_layer{router.layer}"] = entropy.detach()
        anchor, balance, entropy = self.anchor(), torch.stack(balances).mean(), torch.stack(entropies).mean()
        anchor_w, balance_w, entropy_w = self.weights
        total = anchor_w * anchor + balance_w * balance - entropy_w * entropy
        return RouterLoss(total, anchor, balance, entropy, layer_entropy)

    def _layer_terms(self, router: RouterInfo, logits: torch.Tensor, attention_mask: torch.Tensor | None):
        keep = self._token_weights(attention_mask, logits)
        count = keep.sum().clamp(min=1.0)
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        mean_prob = (keep @ probs) / count
        with torch.no_grad():
            chosen = logits.topk(router.top_k, dim=-1).indices
            dispatched = keep @ torch.zeros_like(logits).scatter_(1, chosen, 1.0)  # no host sync
            share = dispatched / (count * router.top_k)
        balance = router.num_experts * (share * mean_prob).sum()
        entropy = (keep @ -(probs * log_probs).sum(-1)) / count
        return balance, entropy

    @staticmethod
    def _token_weights(attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        if attention_mask is None:
            return logits.new_ones(logits.shape[0])
        keep = attention_mask.reshape(-1).to(device=logits.device, dtype=logits.dtype)
        if keep.numel() != logits.shape[0]:
            raise ValueError(f"attention mask has {keep.numel()} tokens but the router saw {logits.shape[0]}")
        return keep

    def clear(self) -> None:
        """Drop the captured logits (and their graphs); call once per step after backward."""
        self._logits.clear()

    def close(self) -> None:
        """Remove the hooks and drop captures."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> RouterTerms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def router_state(model: nn.Module, routers: list[RouterInfo]) -> dict[str, torch.Tensor]:
    """The trained router parameters as {name in the model: fp32 CPU tensor}, full: a sharded teacher's are
    gathered from every rank (a collective: every rank calls it). fp32 is lossless for fp16/bf16/fp32 router
    weights whatever precision mode trained them."""
    params = dict(model.named_parameters())
    return {
        name: full_tensor(params[name].detach()).to(device="cpu", dtype=torch.float32, copy=True)
        for router in routers
        for name in router.param_names
    }


def save_router_update(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `router_state`'s tensors (`router_update.pt`), to a temporary file renamed into place, so a crash
    never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def apply_router_update(model: nn.Module, path_or_state: str | os.PathLike | dict) -> list[str]:
    """Copy a saved router update into a freshly loaded teacher, in place; returns the names applied.

    This is how a user gets the SAR-trained teacher back: load the original teacher, then apply
    `router_update.pt`. Each tensor is cast to the target parameter's dtype and device. Every name
    must exist with the same shape, else ValueError and nothing is changed.
    """
    if isinstance(path_or_state, dict):
        state = path_or_state
    else:
        state = torch.load(user_path(path_or_state), map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = sorted(name for name in state if name not in params)
    mismatched = sorted(
        f"{name}: saved {tuple(t.shape)}, model {tuple(params[name].shape)}"
        for name, t in state.items()
        if name in params and t.shape != params[name].shape
    )
    if missing or mismatched:
        raise ValueError(
            "router update does not fit this model"
            + (f"; unknown parameters: {missing}" if missing else "")
            + (f"; shape mismatches: {mismatched}" if mismatched else "")
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return sorted(state)
