"""The optimizer, checked against the dtype of the weights it updates.

Before every step: is each parameter group's learning rate finite (a schedule can make it NaN at any step; the
optimizer then fills every weight of the group with NaN, whatever the gradients), and not negative (a linear decay
run past its end: the optimizer then climbs the loss, every value finite).
After the first step, once its state shows the dtype the optimizer computes in (before it where a resumed run's
state or a fused kernel says so already): is eps set to 0 (then Adam divides 0 by 0 wherever a second moment is
0), is it representable in that dtype (AdamW's 1e-8 is 0.0 in fp16, where torch's Adam keeps its moments;
transformers' Adafactor keeps fp32 state for fp16 weights, and torch's fused kernels do their arithmetic in
fp32). Before the first step: does weight decay change the weights at all — a decay that multiplies each weight
by 1 − lr × weight_decay (AdamW's, SGD's) is lost wherever that factor rounds back to the weight in its dtype
(bf16 keeps 8 significant bits: any lr × weight_decay below ~2e-3, AdamW's usual 1e-5 included) — and how
many weights are so large that an Adam-sized update (≈ lr) is below half their ulp and will round away —
the last two only for a group that steps (lr > 0): a frozen group's decay and updates are 0 in any dtype.
On statistics steps: second-moment entries that flushed to zero although their gradient was not zero.
Fractions are estimated on a fixed sample of each tensor (`base.sample`).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..contract.numerics import LOST_UPDATE_WARNING, WEIGHT_HALVING_STEPS
from ..contract.numerics import dtype_name as _dtype_name
from ..contract.shards import local_shard
from .base import Probe, abs_max, per_tensor_sum, sample, sample_lengths, sampled

STATE_UNDERFLOW_WARNING = 0.01  # fraction of nonzero-gradient entries whose second moment is 0
# of the second moments a 16-bit state flushed, the share that a float32 state would flush too from which the gradients
# themselves, not the state's dtype, are the problem (`gradients_below_fp32`)
FLUSHED_IN_FP32_TOO = 0.5
# lr × weight_decay at which decay alone halves the weights within WEIGHT_HALVING_STEPS steps
LARGE_DECAY = 1 - 0.5 ** (1 / WEIGHT_HALVING_STEPS)


def decays_multiplicatively(group: dict) -> bool:
    """Whether the group's weight decay multiplies each weight by 1 − lr × weight_decay every step: AdamW's
    decoupled decay (`decoupled_weight_decay`), or SGD's (its L2 term is not normalised away: momentum only
    amplifies it). Adam's, RMSprop's and Adagrad's coupled L2 is divided by the second moment: no fixed factor."""
    return bool(group.get("decoupled_weight_decay")) or {"momentum", "dampening", "nesterov"} <= group.keys()


def group_label(index: int, group: dict, watched: dict) -> str:
    """A parameter group as a person knows it: its own name, else what it holds (the Trainer's groups are
    unnamed: "student: 14 tensors, transformer.h.0.attn.c_attn.weight … lm_head.weight")."""
    if group.get("name"):
        return str(group["name"])
    names = [watched[id(p)] for p in group["params"] if id(p) in watched]
    if not names:
        return f"parameter group {index}"
    models = sorted({w.model for w in names})
    return f"{'/'.join(models)}: {tensor_span(names)}"


def tensor_span(names: list) -> str:
    """`14 tensors, first.weight … last.weight` of watched tensors, in their order."""
    span = names[0].tensor if len(names) == 1 else f"{names[0].tensor} … {names[-1].tensor}"
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}, {span}"


def scheduled_lr(group: dict) -> tuple[float, str]:
    """The lr a group trains at, and its name: a scheduler's `initial_lr` (its base lr) where one is attached —
    under warmup the first step's `lr` is 0 or tiny, which would hide a real problem and invent others — else
    `lr`. A group at lr 0 throughout is frozen."""
    if group.get("initial_lr") is not None:
        return float(group["initial_lr"]), "the scheduler's initial_lr"
    return float(group.get("lr") or 0.0), "lr"  # None: an optimizer that picks its own lr (Adafactor's relative step)


class OptimizerProbe(Probe):
    name = "optimizer"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._checked = False
        self._underflow = None
        self._half: list = []  # watched tensors whose second moment is held below fp32, this statistics step
        self._moments: list = []  # watched tensors with a second moment (Adam's), this statistics step
        self._moments_amax = None  # their second moments' largest values: Inf freezes those entries
        self._reported_frozen = False
        self._reported_state = False
        self._reported_lr: set[tuple[str, int]] = set()  # (event kind, parameter group) recorded once
        self._zero_lr_since: int | None = None  # first step of the current stretch with every group at lr 0
        self._reported_zero_lr = False
        self._eps_pending: list[int] = []  # parameter groups whose eps is checked once the first step made the state

    def before_optimizer_step(self) -> None:
        if self.ctx.optimizer is None:
            return
        if not self._checked:
            self._checked = True
            self._preflight()
        self._check_learning_rates()

    def _check_learning_rates(self) -> None:
        """A group's lr that is NaN/Inf or negative (a Python number: a tensor lr would cost a host sync), once per
        group and kind; and every group that holds trainable weights at lr 0 on two optimizer steps in a row (a
        warm-up starts at 0 for one step), once: the optimizer changes nothing from there."""
        self._check_zero_lr()
        for index, group in enumerate(self.ctx.optimizer.param_groups):
            lr = group.get("lr")
            if not isinstance(lr, (int, float)):
                continue
            if not math.isfinite(lr):
                self._record_lr(index, group, "nonfinite_lr", "critical",
                                "the optimizer fills every weight it updates with NaN, whatever the gradients (a "
                                "schedule that divides by 0 or runs past its end?)")
            elif lr < 0:  # torch's optimizers refuse one at construction: a schedule made it so
                self._record_lr(index, group, "negative_lr", "warning",
                                "the optimizer steps up the gradient and the loss rises, every value finite (a "
                                "linear decay run past its end, or a sign error in the schedule?)")

    def _record_lr(self, index: int, group: dict, kind: str, severity: str, consequence: str) -> None:
        if (kind, index) in self._reported_lr:
            return
        self._reported_lr.add((kind, index))
        names = {id(w.param): w for w in self.ctx.watched}
        label = group_label(index, group, names)
        model = next((names[id(p)].model for p in group["params"] if id(p) in names), None)
        self.ctx.events.record(
            kind, severity, f"{label}: the learning rate is {group['lr']} at step {self.ctx.step}: {consequence}",
            probe=self.name, phase="optimizer", model=model, tensor=label, value=float(group["lr"]),
            step=self.ctx.step)

    def _check_zero_lr(self) -> None:
        every = self.ctx.optimizer.param_groups
        # no group at lr 0 (every step of a run that trains): no need to find which groups hold trainable weights
        groups = [g for g in every if any(p.requires_grad for p in g["params"])] if any(
            isinstance(g.get("lr"), (int, float)) and g["lr"] == 0 for g in every) else []
        zero = bool(groups) and all(isinstance(g.get("lr"), (int, float)) and g["lr"] == 0 for g in groups)
        if not zero:
            self._zero_lr_since = None
            return
        if self._zero_lr_since is None:
            self._zero_lr_since = self.ctx.step
        elif not self._reported_zero_lr:
            self._reported_zero_lr = True
            names = {id(w.param): w for w in self.ctx.watched}
            index = self.ctx.optimizer.param_groups.index(groups[0])
            label = group_label(index, groups[0], names) if len(groups) == 1 else f"all {len(groups)} parameter groups"
            model = next((names[id(p)].model for g in groups for p in g["params"] if id(p) in names), None)
            self.ctx.events.record(
                "zero_lr", "warning",
                f"{label}: the learning rate is 0 on every step since step {self._zero_lr_since}: the optimizer "
                "changes no weight (a schedule sized for 0 steps, or one that ended before the run?)",
                probe=self.name, phase="optimizer", model=model, tensor=label, value=0.0, step=self._zero_lr_since)

    def _preflight(self) -> None:
        names = {id(w.param): w for w in self.ctx.watched}
        for index, group in enumerate(self.ctx.optimizer.param_groups):
            params = _updated(group, self.ctx.optimizer.state)
            if not params:
                continue
            dtype = Counter(p.dtype for p in params).most_common(1)[0][0]
            label = group_label(index, group, names)
            model = next((names[id(p)].model for p in params if id(p) in names), None)
            wd = float(group.get("weight_decay", 0.0))
            lr, lr_name = scheduled_lr(group)
            if _state_dtype(self.ctx.optimizer.state, params) is not None or group.get("fused"):
                self._check_eps(index, group)  # the state (a resumed run's) or the kernel says what eps is added in
                self._check_second_moment_decay(index, group)
            else:
                self._eps_pending.append(index)  # known once the first step has made the state
            rounded = self._fraction_decay_rounded(params, 1 - lr * wd) if wd > 0 and lr > 0 else 0.0
            if rounded > LOST_UPDATE_WARNING and decays_multiplicatively(group):  # lr 0: a frozen group
                self.ctx.events.record(
                    "optimizer_preflight", "warning",
                    f"{label}: {lr_name}×weight_decay={lr * wd:g}: multiplying by {1 - lr * wd:.10g} rounds back to "
                    f"the weight for {rounded:.0%} of the {_dtype_name(dtype)} weights: weight decay does nothing",
                    probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype),
                    value=lr * wd, step=self.ctx.step, code="weight_decay_zero")
            if wd > 0 and lr * wd >= LARGE_DECAY and decays_multiplicatively(group):
                self.ctx.events.record(
                    "optimizer_preflight", "warning",
                    f"{label}: {lr_name}×weight_decay={lr * wd:g}: every step multiplies each weight by "
                    f"{1 - lr * wd:g}, so weight decay alone halves the weights within {WEIGHT_HALVING_STEPS} steps "
                    "(healthy: ~1e-5 per step)",
                    probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype),
                    value=lr * wd, step=self.ctx.step, code="weight_decay_large")
            lost = self._fraction_below_half_ulp(params, lr) if lr > 0 else 0.0
            if lost > LOST_UPDATE_WARNING:
                self.ctx.events.record(
                    "optimizer_preflight", "warning",
                    f"{label}: an update of size {lr_name}={lr:g} is below half an ulp for {lost:.0%} of the "
                    f"{_dtype_name(dtype)} weights: those updates will round away (stagnation)",
                    probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype),
                    value=lost, step=self.ctx.step, code="update_below_half_ulp")
                self._check_lr_below_fp32(params, lr, lr_name, label, model, dtype)

    def _check_lr_below_fp32(self, params: list[torch.Tensor], lr: float, lr_name: str, label: str,
                             model: str | None, dtype: torch.dtype) -> None:
        """16-bit weights that lose lr-sized updates: would fp32 master weights keep them? Not where the lr is below
        half an ulp of the same values in float32 too — then the lr is too small for any precision, and a fix that
        only widens the weights would leave the run as stuck as it is."""
        if torch.finfo(dtype).bits > 16:
            return
        lost = self._fraction_below_half_ulp(params, lr, as_dtype=torch.float32)
        if lost > LOST_UPDATE_WARNING:
            self.ctx.events.record(
                "optimizer_preflight", "warning",
                f"{label}: an update of size {lr_name}={lr:g} is below half an ulp for {lost:.0%} of these weights "
                "even in float32: fp32 master weights would lose those updates too — the lr is too small",
                probe=self.name, phase="optimizer", model=model, tensor=label, dtype="float32", value=lost,
                step=self.ctx.step, code="update_below_fp32_half_ulp")

    def _check_eps(self, index: int, group: dict) -> None:
        """eps against each dtype the optimizer adds it in: that of the state it keeps for a weight (torch's Adam keeps
        its moments in the weight's dtype; transformers' Adafactor upcasts fp16 weights and keeps fp32 state), the
        weight's where it keeps none; fp32 in torch's fused kernels. Each dtype of a group is checked, not its most
        common one: a group of fp32 norms and biases with a few fp16 matrices divides by zero in those matrices. Only
        the tensors it updates (`_updated`)."""
        params = _updated(group, self.ctx.optimizer.state)
        names = {id(w.param): w for w in self.ctx.watched}
        eps = group.get("eps")
        if isinstance(eps, tuple):  # Adafactor-style (eps1, eps2)
            eps = eps[0]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            by_dtype.setdefault(_state_dtype(self.ctx.optimizer.state, [param]) or param.dtype, []).append(param)
        for dtype, held in sorted(by_dtype.items(), key=lambda kv: torch.finfo(kv[0]).tiny, reverse=True):
            finding = _eps_finding(eps, dtype, fused=bool(group.get("fused")))
            if finding is None:
                continue
            severity, code, text = finding
            label = group_label(index, group, names)
            watched = [names[id(p)] for p in held if id(p) in names]
            if len(held) < len(params) and watched:  # say which of the group's tensors
                label += f" (its {_dtype_name(dtype)} state: {tensor_span(watched)})"
            self.ctx.events.record(
                "optimizer_preflight", severity, f"{label}: {text}", probe=self.name, phase="optimizer",
                model=next((names[id(p)].model for p in held if id(p) in names), None), tensor=label,
                dtype=_dtype_name(dtype), value=float(eps), step=self.ctx.step, code=code)
            return  # the dtype of least range first: its finding is the one that matters

    def _check_second_moment_decay(self, index: int, group: dict) -> None:
        """Adam's second moment decays by β2 each step (`exp_avg_sq.mul_(beta2)`), computed in the state's dtype: where
        1 − β2 is below half an ulp of the state's values, v × β2 rounds back to v — in bfloat16 (8 significant bits)
        for torch's default 0.999 — so the moment never decays: it only grows, and once (1 − β2)·g² falls below half
        its ulp too (within a few hundred steps) it freezes, no longer following the gradients' scale. Measured on
        the state the first step made (its nonzero sampled entries), once per group; a float32 state keeps it."""
        betas = group.get("betas")
        state = self.ctx.optimizer.state
        params = _updated(group, state)  # the model named is one the optimizer updates, not a teacher it holds
        moments = [state[p]["exp_avg_sq"] for p in params if torch.is_tensor(state.get(p, {}).get("exp_avg_sq"))]
        if not (isinstance(betas, (tuple, list)) and len(betas) > 1 and moments) or moments[0].dtype == torch.float32:
            return
        beta2, dtype = float(betas[1]), moments[0].dtype
        kept = self._fraction_decay_rounded(moments, beta2)  # the decay of the moments, as a weight decay's
        if kept <= LOST_UPDATE_WARNING:
            return
        names = {id(w.param): w for w in self.ctx.watched}
        label = group_label(index, group, names)
        model = next((names[id(p)].model for p in params if id(p) in names), None)
        self.ctx.events.record(
            "optimizer_preflight", "warning",
            f"{label}: Adam's second moment × β2={beta2:g} rounds back to itself for {kept:.0%} of its "
            f"{_dtype_name(dtype)} entries: it never decays, and freezes once its additions round away too",
            probe=self.name, phase="optimizer", model=model, tensor=label, dtype=_dtype_name(dtype), value=beta2,
            step=self.ctx.step, code="second_moment_decay_zero")

    @staticmethod
    def _fraction_decay_rounded(params: list[torch.Tensor], factor: float) -> float:
        """The share of nonzero entries that one step's decay, w × factor in the tensor's dtype (as the optimizer
        computes it), leaves exactly as they were."""
        kept = total = 0
        for p in params:
            w = sample(p.detach())
            w = w[w != 0]
            kept += int((w * factor == w).sum())
            total += w.numel()
        return kept / total if total else 0.0

    @staticmethod
    def _fraction_below_half_ulp(params: list[torch.Tensor], lr: float, as_dtype: torch.dtype | None = None) -> float:
        """Adam moves each weight by about lr; that is lost where lr < ulp(|w|)/2 in the weight's dtype (or in
        `as_dtype`, the same values held wider)."""
        lost = total = 0
        for p in params:
            w = sample(p.detach()).to(as_dtype or p.dtype)
            ulp = torch.nextafter(w.abs(), torch.full_like(w, float("inf"))) - w.abs()
            lost += int((ulp.float() / 2 > lr).sum())
            total += w.numel()
        return lost / total if total else 0.0

    def after_optimizer_step(self) -> None:
        if self.ctx.optimizer is None:
            return
        pending, self._eps_pending = self._eps_pending, []
        for index in pending:
            self._check_eps(index, self.ctx.optimizer.param_groups[index])
            self._check_second_moment_decay(index, self.ctx.optimizer.param_groups[index])
        if not self.ctx.stats_step:
            return
        state = self.ctx.optimizer.state
        self._moments = [w for w in self.ctx.watched if state.get(w.param, {}).get("exp_avg_sq") is not None]
        if self._moments and not self._reported_frozen:  # Inf there freezes those entries for good: m / √Inf = 0
            self._moments_amax = abs_max([state[w.param]["exp_avg_sq"] for w in self._moments])
        self._half = [w for w in self.ctx.watched
                      if (v := state.get(w.param, {}).get("exp_avg_sq")) is not None and w.param.grad is not None
                      and v.dtype != torch.float32]
        if self._half:  # a gradient and its second moment share a shape: their samples line up
            grads = sampled([w.param.grad for w in self._half])
            live = grads != 0
            flushed = (sampled([state[w.param]["exp_avg_sq"] for w in self._half]) == 0) & live
            lengths = sample_lengths([w.param for w in self._half])
            # the moment's first term, (1 - beta2)·g², zero in float32 too: a gradient so small (below ~1e-21) that no
            # state dtype keeps it — the loss's weight or the clipping shrank it, not the state's precision
            beta2 = self._beta2_by_tensor()
            decay = torch.tensor([1 - beta2.get(id(w.param), 0.999) for w in self._half], device=grads.device)
            wide = flushed & (grads.float().square() * decay.repeat_interleave(lengths) == 0)
            self._underflow = torch.cat([per_tensor_sum(flushed.float(), lengths),
                                         per_tensor_sum(live.float(), lengths), per_tensor_sum(wide.float(), lengths)])

    def _record_frozen(self, amax: list[float]) -> None:
        """A second moment (Adam's `exp_avg_sq`) that holds Inf while its weight is finite: a squared gradient entry
        once passed the state dtype's range (a gradient beyond its square root: ~1.8e19 in float32, ~256 in float16),
        and from then on the update of those entries is m / √Inf = 0 — they never move again, and nothing else shows
        it but updates lost. Said once (a `second_moment_inf` note)."""
        for w, value in zip(self._moments, amax, strict=True):
            if math.isfinite(value) or not bool(torch.isfinite(local_shard(w.param.detach())).all()):
                continue  # a non-finite weight is the parameter probe's to report, with its state
            if not self.ctx.events.say_once("second_moment_inf"):
                return
            self._reported_frozen = True
            moment = self.ctx.optimizer.state[w.param]["exp_avg_sq"]
            frozen = int((~torch.isfinite(local_shard(moment))).sum())
            self.ctx.events.record(
                "setup_note", "warning",
                f"the optimizer's exp_avg_sq of {w.model} {w.tensor} ({_dtype_name(moment.dtype)}) holds Inf in "
                f"{frozen} of {local_shard(moment).numel()} entries by step {self.ctx.step}, its weight finite: a "
                "gradient entry once squared past the state's range, and those entries never update again (m / √Inf "
                "= 0)", step=self.ctx.step, phase="optimizer", probe=self.name, model=w.model, module=w.module,
                tensor=w.tensor, dtype=_dtype_name(moment.dtype), value=frozen, numel=local_shard(moment).numel(),
                code="second_moment_inf")
            return

    def _beta2_by_tensor(self) -> dict[int, float]:
        """Each tensor's second-moment decay, by id: its group's Adam betas[1] (torch's default where a group has
        none) — one pass over the groups, not a search of them per tensor."""
        decays = {}
        for group in self.ctx.optimizer.param_groups:
            betas = group.get("betas")
            beta2 = float(betas[1]) if isinstance(betas, (tuple, list)) and len(betas) > 1 else 0.999
            decays.update(dict.fromkeys(map(id, group["params"]), beta2))
        return decays

    def take_readings(self) -> dict[str, torch.Tensor]:
        out = {"state_underflow": self._underflow} if self._underflow is not None else {}
        if self._moments_amax is not None:
            out["second_moment_amax"] = self._moments_amax
        self._underflow = self._moments_amax = None
        return out

    def record(self, host: dict) -> dict:
        if host.get("second_moment_amax") is not None:
            self._record_frozen(host["second_moment_amax"])
        flat = host.get("state_underflow")
        if flat is None:
            return {}
        n = len(flat) // 3
        flushed, live, wide = flat[:n], flat[n:2 * n], flat[2 * n:]
        fraction = sum(flushed) / sum(live) if sum(live) else 0.0
        if fraction > STATE_UNDERFLOW_WARNING and not self._reported_state:
            self._reported_state = True
            worst = self._half[max(range(n), key=lambda i: flushed[i] * local_shard(self._half[i].param).numel()
                                   / max(sample(self._half[i].param).numel(), 1))]
            state_dtype = _dtype_name(self.ctx.optimizer.state[worst.param]["exp_avg_sq"].dtype)
            self.ctx.events.record(
                "optimizer_state_underflow", "warning",
                f"{fraction:.1%} of second-moment entries are 0 although their gradient is not: the squared "
                f"gradient flushed to zero in the optimizer state's {state_dtype}; most in {worst.model} "
                f"{worst.tensor}. Adam then divides by eps alone: those updates are inflated, not lost",
                step=self.ctx.step, phase="optimizer", probe=self.name, value=fraction, numel=int(sum(live)),
                model=worst.model, module=worst.module, tensor=worst.tensor, dtype=state_dtype)
            in_fp32 = sum(wide) / sum(flushed)
            if in_fp32 > FLUSHED_IN_FP32_TOO:
                self.ctx.events.record(
                    "setup_note", "warning",
                    f"{in_fp32:.0%} of those second-moment entries would be 0 in a float32 state too: the gradients "
                    "themselves are vanishingly small (their squares below float32's smallest value), so no precision "
                    "keeps them — a loss weighted all but 0, or a clip threshold that shrinks every gradient",
                    step=self.ctx.step, phase="optimizer", probe=self.name, value=in_fp32, numel=int(sum(flushed)),
                    model=worst.model, module=worst.module, tensor=worst.tensor, dtype="float32",
                    code="gradients_below_fp32")
        return {"state_underflow_fraction": fraction}


def _updated(group: dict, state) -> list[torch.Tensor]:
    """The tensors of a parameter group the optimizer updates, where the preflight checks run (just before its first
    step; eps, where the state decides its dtype, just after): those with a gradient, or with the state an update made.
    torch's optimizers skip a tensor without a gradient — a teacher left `requires_grad=True` in a module the optimizer
    was built over whole, run under no_grad — and neither decay it nor add eps there: its dtype decides nothing."""
    return [p for p in group["params"] if p.requires_grad and (p.grad is not None or p in state)]


def _eps_finding(eps, dtype: torch.dtype, fused: bool) -> tuple[str, str, str] | None:
    """(severity, code, what happens) when eps added in `dtype` is 0 or subnormal there; None when it is fine."""
    if eps == 0:  # set so: in every dtype and kernel, a zero second moment divides 0 by 0
        return ("warning", "eps_zero", "optimizer eps is 0: any entry whose second moment is 0 (a gradient entry "
                "exactly 0 — an embedding row not in the batch, a dead unit) divides 0 by 0 and turns the weight NaN")
    if not isinstance(eps, (int, float)) or eps < 0 or fused:  # fused kernels add eps in fp32
        return None
    rounded = torch.tensor(eps, dtype=dtype).item()
    if rounded == 0.0:
        return ("critical", "eps_zero", f"optimizer eps={eps:g} is 0.0 in {_dtype_name(dtype)}: any entry whose "
                "squared gradient also rounds to 0 divides by zero and fills the weights with Inf/NaN")
    if abs(rounded) < torch.finfo(dtype).tiny:
        return ("warning", "eps_subnormal", f"optimizer eps={eps:g} is subnormal in {_dtype_name(dtype)} (stored as "
                f"{rounded:g})")
    return None


def _state_dtype(state, params: list[torch.Tensor]) -> torch.dtype | None:
    """The dtype an optimizer keeps its per-element state in for these weights (its moments: floating tensors of one
    dimension or more, not a 0-dim step count), the most common; None before it has any."""
    dtypes = Counter(v.dtype for p in params for v in state.get(p, {}).values()
                     if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0)
    return dtypes.most_common(1)[0][0] if dtypes else None
