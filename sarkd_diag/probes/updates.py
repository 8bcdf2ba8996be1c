"""What each optimizer step did to the weights: how large it was (the update-to-weight ratio) and which
intended updates were lost to rounding.

Every step the probe keeps a pre-step copy of a fixed sample of each trainable tensor (at most ~4096
elements, `base.sample`) and compares it with the weights after the step, on the device:

- The update-to-weight ratio, ‖Δw‖ / ‖w‖ over the weight matrices (2-D and up; biases and norm gains start
  at 0 or 1 and their relative change says nothing): healthy training moves weights by about 1e-3 of their
  size per step (the rule of thumb of cs231n's "babysitting the learning process", read off SGD and Adam
  runs); Adam's first steps move every weight by about lr, 1e-2..1e-1 of a freshly initialised matrix. A
  ratio of EXTREME_UPDATE_RATIO — a step as large as the weights themselves, a thousand times healthy —
  replaced the weights rather than trained them: nothing that follows is a precision limit. It is a warning
  (`extreme_update`) before anything is non-finite, and the evidence that tells a blow-up from a precision
  limit afterwards. Also per model (`update_ratio_<model>`), leaving out the steps a schedule holds far below its base
  lr: SAR's routers train beside the student at an lr of their own, and a student whose steps are ten thousand times
  too small to train (an lr typed 1e-9) hides behind them in the mixed ratio.
- Lost updates (statistics steps): sampled elements whose intended update was non-zero (a non-zero
  gradient or, for Adam, a non-zero first moment of a tensor that has a gradient this step: the optimizer
  skips one without) but whose stored value did not change — the update was
  below half an ulp of the weight's dtype: the stagnation of pure-bf16 and pure-fp16 training. Counted per
  tensor, so the event names the tensor that loses the largest share. Where the run and every group lose few, a
  16-bit tensor can still lose every update — an RMSNorm's gain at 1.0 in bfloat16 (half an ulp 0.0039) under an lr
  of 1e-3 never moves while the matrices around it, near 0.02, train —: such tensors are named too, once
  (`lost_updates_whole_tensors`). Not where a schedule has brought the
  group's lr below SCHEDULED_LR_FLOOR of its base (`initial_lr`, set by torch's schedulers): a warm-up's first
  steps and an annealing tail (OneCycleLR ends at 1/250,000 of its peak, a linear decay at 0) are meant to move
  the weights by almost nothing, and those updates lost are the schedule's design, not a precision fault.
"""

from __future__ import annotations

import math

import torch

from ..contract.numerics import EXTREME_UPDATE_RATIO, LOST_UPDATE_WARNING, SCHEDULED_LR_FLOOR
from ..contract.shards import local_shard
from ..contract.wording import counted
from .base import Probe, SampleViews, intends_no_update, per_tensor_sum, sample, sample_lengths
from .optimizer import group_label


class UpdateProbe(Probe):
    name = "updates"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._moving: list = []  # this step's tensors meant to move, weight matrices first
        self._moving_params: list[torch.Tensor] = []  # their tensors
        self._layout: tuple | None = None  # of the moving tensors: (sample lengths, matrices, numel per sample)
        self._models: list[str] = []  # the models the moving matrices belong to, in `update_ratio_<model>`'s order
        self._model_index: torch.Tensor | None = None  # each moving matrix's index into `_models`
        self._model_groups: dict[str, list[dict]] = {}  # each model's optimizer groups that hold its moving matrices
        self._group_of: dict[int, dict] = {}  # id of a parameter: its optimizer parameter group
        self._lr_used: dict[int, object] = {}  # id of a group: the lr of this step's update
        self._frozen_groups: tuple | None = None  # which parameter groups had lr 0 when `_moving` was chosen
        self._before: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (before, after) samples of the last step
        self._weights = SampleViews()
        self._ratio = self._lost = None
        self._reported_lost = self._reported_extreme = self._reported_untrained = False

    def before_optimizer_step(self) -> None:
        self._moving = self._meant_to_move()
        self._before = self._weights.cat(self._moving_params) if self._moving else None
        # the lr each group's update uses (a scheduler moves it on before `record`)
        groups = self.ctx.optimizer.param_groups if self.ctx.optimizer is not None else []
        self._lr_used = {id(g): g.get("lr") for g in groups}

    def _meant_to_move(self) -> list:
        """The watched tensors the optimizer means to change (none of a group at lr 0: `intends_no_update`), weight
        matrices first so that their samples are one slice of the concatenated sample."""
        groups = self.ctx.optimizer.param_groups if self.ctx.optimizer is not None else []
        frozen = tuple(intends_no_update(g) for g in groups)
        if frozen != self._frozen_groups or not self._moving:  # chosen again only when a group starts or stops
            self._frozen_groups = frozen
            self._group_of = {id(p): g for g in groups for p in g["params"]}
            watched = [w for w in self.ctx.watched if not intends_no_update(self._group_of.get(id(w.param), {}))]
            self._moving = sorted(watched, key=lambda w: w.param.dim() < 2)
            self._moving_params, self._layout = [w.param for w in self._moving], None
        return self._moving

    def _layout_of_moving(self) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """Sample lengths per tensor, how many tensors are matrices and how many sampled elements they hold
        (all tensors where none is a matrix), and each tensor's numel per sampled element: made once per choice of
        the moving tensors. Also the models the matrices belong to (`_models`), each matrix's model index and each
        model's optimizer groups."""
        if self._layout is None:
            params = self._moving_params
            lengths = sample_lengths(params)
            matrices = sum(p.dim() >= 2 for p in params) or len(params)
            per_sample = torch.tensor([local_shard(p).numel() / sample(p).numel() for p in params],
                                      device=params[0].device)
            self._models = list(dict.fromkeys(w.model for w in self._moving[:matrices]))
            self._model_index = torch.tensor([self._models.index(w.model) for w in self._moving[:matrices]],
                                             device=params[0].device)
            self._model_groups = {model: list({id(g): g for w in self._moving[:matrices] if w.model == model
                                               and (g := self._group_of.get(id(w.param))) is not None}.values())
                                  for model in self._models}
            self._layout = (lengths, matrices, int(lengths[:matrices].sum()), per_sample)
        return self._layout

    def after_optimizer_step(self) -> None:
        if self._before is None:
            return
        after = self._weights.cat(self._moving_params)
        lengths, matrices, matrix_elements, per_sample = self._layout_of_moving()
        before, moved = self._before[:matrix_elements].float(), after[:matrix_elements].float()
        if len(self._models) == 1:  # one model's ratio is the run's: two norms, paid every step, no sums per model
            self._ratio = torch.linalg.vector_norm(moved - before) / torch.linalg.vector_norm(before)
        else:
            self._ratio = self._ratios(per_tensor_sum((moved - before).square(), lengths[:matrices]),
                                       per_tensor_sum(before.square(), lengths[:matrices]))
        if self.ctx.stats_step:
            self._lost = self._count_lost(after, lengths, per_sample)
        self._last, self._before = (self._before, after), None

    def _ratios(self, delta2: torch.Tensor, weight2: torch.Tensor) -> torch.Tensor:
        """‖Δw‖/‖w‖ over all the moving matrices, then over each model's (`_models`): one model's step is not
        another's — SAR's teacher routers train at an lr of their own beside the student, and a mixture of both
        would hide a model that does not move behind one that does."""
        per_model = torch.zeros(len(self._models), 2, device=delta2.device)
        per_model.index_add_(0, self._model_index, torch.stack([delta2, weight2], dim=1))
        sums = torch.cat([torch.stack([delta2.sum(), weight2.sum()])[None], per_model])
        return (sums[:, 0] / sums[:, 1]).sqrt()

    def _largest_change(self) -> tuple[int, float]:
        """The weight matrix that changed most relative to its size in the last step, and by how much: read
        only when the step was extreme (one more transfer, on the failure path)."""
        before, after = self._last
        lengths, matrices, _, _ = self._layout_of_moving()
        delta2 = per_tensor_sum((after.float() - before.float()).square(), lengths)[:matrices]
        weight2 = per_tensor_sum(before.float().square(), lengths)[:matrices]
        ratios = torch.where(weight2 > 0, (delta2 / weight2).sqrt(), torch.zeros_like(delta2)).tolist()
        index = max(range(len(ratios)), key=lambda i: ratios[i] if math.isfinite(ratios[i]) else -1.0)
        return index, ratios[index]

    def _count_lost(self, after: torch.Tensor, lengths: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        """[lost, intended, estimated lost elements] per moving tensor, concatenated."""
        state = self.ctx.optimizer.state if self.ctx.optimizer is not None else {}
        # a tensor without a gradient is skipped by the optimizer (torch's step only updates those with one), and so
        # is one whose optimizer did not step (several on cadences of their own): its gradient and its first moment,
        # left from earlier steps, intend nothing this step — no update of it can be lost
        used = self.ctx.gradients_used()
        grads = [w.param.grad if used is None or id(w.param) in used else None for w in self._moving]
        meant = torch.cat([_sample_or_zeros(g, w.param) for g, w in zip(grads, self._moving, strict=True)]) != 0
        moments = [state.get(w.param, {}).get("exp_avg") if g is not None else None
                   for g, w in zip(grads, self._moving, strict=True)]
        if any(m is not None for m in moments):
            meant |= torch.cat([_sample_or_zeros(m, w.param) for m, w in zip(moments, self._moving, strict=True)]) != 0
        lost = per_tensor_sum(((after == self._before) & meant).float(), lengths)
        intended = per_tensor_sum(meant.float(), lengths)
        return torch.cat([lost, intended, lost * per_sample])

    def take_readings(self) -> dict[str, torch.Tensor]:
        out = {}
        if self._ratio is not None:
            out["update_ratio"] = self._ratio
        if self._lost is not None:
            out["lost_updates"] = self._lost
        self._ratio = self._lost = None
        return out

    def record(self, host: dict) -> dict:
        metrics: dict = {}
        if host.get("update_ratio") is not None:
            ratios = host["update_ratio"]  # the run's, then each model's; one number where one model moves
            overall, *per_model = ratios if isinstance(ratios, list) else [ratios, ratios]
            metrics.update(self._record_ratio(overall))
            metrics.update(self._per_model_ratios(per_model))
        if host.get("lost_updates") is not None:
            metrics.update(self._record_lost(host["lost_updates"]))
        return metrics

    def _per_model_ratios(self, ratios: list[float]) -> dict:
        """`update_ratio_<model>`, but not for a model whose every moving matrix stepped at an lr a scheduler held
        below SCHEDULED_LR_FLOOR of its base: a warm-up's first steps are meant to be tiny, and a column that holds
        only the steps taken at the lr meant lets the diagnosis judge a model's step size without knowing the
        schedule."""
        return {f"update_ratio_{model}": ratio for model, ratio in zip(self._models, ratios, strict=True)
                if not self._held_below_base(model)}

    def _held_below_base(self, model: str) -> bool:
        """Every optimizer group holding the model's moving matrices stepped at an lr a scheduler held below
        SCHEDULED_LR_FLOOR of its base (a group no scheduler set knows no base: never held)."""
        groups = self._model_groups[model]
        return bool(groups) and all(map(self._far_below_base, groups))

    def _record_ratio(self, overall: float) -> dict:
        if math.isfinite(overall) and overall > EXTREME_UPDATE_RATIO and not self._reported_extreme:
            self._reported_extreme = True
            index, largest = self._largest_change()
            w = self._moving[index]
            lr = self._lr_used.get(id(self._group_of.get(id(w.param))))  # the lr its group stepped at
            lr = None if lr is None else float(lr)
            where = {"step": self.ctx.step, "phase": "optimizer", "probe": self.name, "model": w.model,
                     "module": w.module, "tensor": w.tensor}
            self.ctx.events.record(
                "extreme_update", "warning",
                f"step {self.ctx.step} changed the weight matrices by {overall:.3g}× their size (‖Δw‖/‖w‖; healthy "
                f"training ~1e-3, limit {EXTREME_UPDATE_RATIO:g}); most in {w.model} {w.tensor} ({largest:.3g}×)"
                + (f" at lr {lr:g}" if lr is not None else ""),
                dtype=self.ctx.dtype_of(w.param), value=overall, **where)
            if lr is not None:  # a row's lr is the first group's: a head or router may step at its own
                self.ctx.events.record("update_lr", "info", f"{w.model} {w.tensor}'s parameter group stepped at lr "
                                       f"{lr:g} in step {self.ctx.step}", value=lr, **where)
        return {"update_ratio": overall}

    def _record_lost(self, flat: list[float]) -> dict:
        n = len(flat) // 3
        lost, intended, estimated = flat[:n], flat[n:2 * n], flat[2 * n:]
        total_intended = sum(intended)
        fraction = sum(lost) / total_intended if total_intended else 0.0
        if self._reported_lost:
            return {"lost_update_fraction": fraction}
        members, share_lost, what = list(range(n)), fraction, "intended weight updates"
        if fraction <= LOST_UPDATE_WARNING:  # the run loses few: a group of its own may still lose all of its
            members, share_lost, label = self._group_losing_most(lost, intended)
            what = f"the intended updates of parameter group {label} (of the run's, {fraction:.0%})"
        worst = max(members, key=lambda i: estimated[i]) if members else None
        if share_lost > LOST_UPDATE_WARNING and not self._scheduled_far_below_base(worst):
            self._reported_lost = True
            w = self._moving[worst]
            total = sum(estimated[i] for i in members)
            share = estimated[worst] / total if total else 0.0
            own = lost[worst] / intended[worst] if intended[worst] else 0.0
            self.ctx.events.record(
                "lost_updates", "warning",
                f"{share_lost:.0%} of {what} were lost to rounding at step {self.ctx.step}; {w.model} {w.tensor} "
                f"({self.ctx.dtype_of(w.param)}) loses the largest share, {share:.0%} of them ({own:.0%} of its own)",
                step=self.ctx.step, phase="optimizer", probe=self.name, value=share_lost,
                numel=int(sum(intended[i] for i in members)), model=w.model, module=w.module, tensor=w.tensor,
                dtype=self.ctx.dtype_of(w.param))
        elif share_lost <= LOST_UPDATE_WARNING and not self._reported_untrained:
            self._report_untrained(lost, intended, fraction)
        return {"lost_update_fraction": fraction}

    def _report_untrained(self, lost: list[float], intended: list[float], fraction: float) -> None:
        """The 16-bit tensors that lost every intended update of this step, where the run and each group lose few."""
        untrained = [i for i, w in enumerate(self._moving) if intended[i] and lost[i] == intended[i]
                     and w.param.dtype in (torch.float16, torch.bfloat16) and not self._scheduled_far_below_base(i)]
        if not untrained:
            return
        self._reported_untrained = True
        w = self._moving[max(untrained, key=lambda i: intended[i])]
        others = f" and {counted(len(untrained) - 1, 'other tensor')}" if len(untrained) > 1 else ""
        self.ctx.events.record(
            "lost_updates", "warning",
            f"every intended update of {w.model} {w.tensor}{others} ({self.ctx.dtype_of(w.param)}) was lost to "
            f"rounding at step {self.ctx.step}: they do not train, though the run loses {fraction:.0%} of its updates",
            step=self.ctx.step, phase="optimizer", probe=self.name, value=1.0,
            numel=int(sum(intended[i] for i in untrained)), model=w.model, module=w.module, tensor=w.tensor,
            dtype=self.ctx.dtype_of(w.param), code="lost_updates_whole_tensors")

    def _scheduled_far_below_base(self, index: int) -> bool:
        """A scheduler had brought the lr of the `index`-th moving tensor's group below SCHEDULED_LR_FLOOR of its
        base lr (`initial_lr`) for this step's update."""
        return self._far_below_base(self._group_of.get(id(self._moving[index].param), {}))

    def _far_below_base(self, group: dict) -> bool:
        """A scheduler had brought the group's lr below SCHEDULED_LR_FLOOR of its base lr for this step's update."""
        lr, base = self._lr_used.get(id(group)), group.get("initial_lr")
        if lr is None or base is None:
            return False
        return float(lr) < SCHEDULED_LR_FLOOR * float(base)

    def _group_losing_most(self, lost: list[float], intended: list[float]) -> tuple[list[int], float, str]:
        """The optimizer parameter group that loses the largest share of its own intended updates — a group at an lr
        of its own (SAR's routers, adapters, a head at a smaller lr) can lose every update while the run as a whole
        loses few: the run's fraction hides a part that does not train. Its tensors (indices into the moving ones),
        that share and the group's name."""
        groups = list(self.ctx.optimizer.param_groups) if self.ctx.optimizer is not None else []
        index_of = {id(g): i for i, g in enumerate(groups)}
        members: dict[int | None, list[int]] = {}
        for i, w in enumerate(self._moving):
            members.setdefault(index_of.get(id(self._group_of.get(id(w.param)))), []).append(i)
        watched = {id(w.param): w for w in self.ctx.watched}
        best: tuple[list[int], float, str] = ([], 0.0, "")
        for index, indices in members.items():
            wanted = sum(intended[i] for i in indices)
            share = sum(lost[i] for i in indices) / wanted if wanted else 0.0
            if share > best[1]:
                best = (indices, share, group_label(index, groups[index], watched) if index is not None else "?")
        return best


def _sample_or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The sample of `t`, or zeros where `like` has no such tensor (no gradient, no optimizer state yet)."""
    return sample(t) if t is not None else torch.zeros_like(sample(like))
