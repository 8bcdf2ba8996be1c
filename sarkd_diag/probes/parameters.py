"""Weights: which tensors turned non-finite after each optimizer step (how many elements, first step) — and,
once, before the run's first step, whether any weight of any watched model already holds NaN/Inf as loaded, or a
finite value beyond fp16's range that a cast to float16 (autocast's, or `.half()`) makes Inf; and each model's
largest weight as loaded (`loaded_amax_<model>`, in the first step's row). At the run's first non-finite weight,
its optimizer state is read too (once): a state tensor non-finite with it (a momentum buffer, Adam's moments) is an
`optimizer_state_nonfinite` note — from finite gradients, the state overflowed its own dtype.

The check as loaded reads every floating parameter of every model (the frozen teacher's too, which nothing else
reads: its weights never change, so a NaN there came with the checkpoint) in one absolute-max pass, moved to the
host with the first step's readings. A weight that is non-finite before any update is a corrupt checkpoint (a
torn download, a conversion that overflowed float16) — every later NaN follows from it, and no learning rate,
precision or loss explains it.

In a caller's loop the trainable weights are read once more, at each step's first training forward: nothing but
the optimizer should change them between its step and that forward, so a tensor whose largest absolute value
differs from the one read after the last optimizer step was written by the caller's code in between (a rescale
under `torch.no_grad()`, a weight copied or tied, an EMA or average written back, a NaN). Read there, a NaN is
placed at the edit and its step, not one step late at the next update (`nonfinite_between_steps`); a finite edit is
recorded once as information and once, as a warning, where it rescales a tensor beyond `WEIGHT_EDIT_FACTOR`
(`weights_edited`). sarkd-diag's own loop writes no weights between steps (its policy's rollback is its own) and
takes no such reading. The read costs a pass over the weights, so it is taken where a write may have happened: a
tensor's version counter moves with every in-place write to it (under no_grad or not: `mul_`, `copy_`,
`load_state_dict`) and its storage with `.data = ...`; a write through `.data` (`p.data.mul_(...)`) moves neither,
and is read on statistics steps, where the weights are read again whatever their marks say.

A frozen model that the caller's code writes between steps (an EMA teacher, t ← m·t + (1 − m)·s in place) moves only
where a change survives its dtype's rounding: in float16/bfloat16, (1 − m) × the distance to the student is far below
half an ulp, and the teacher silently stays the student's first copy. Its 16-bit weights' write marks are read at each
step's first training forward; where they moved, a fixed sample of each written tensor against the one held from
before tells the share the write left unchanged (`frozen_writes_lost`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..contract.numerics import LOST_UPDATE_WARNING, WEIGHT_EDIT_FACTOR, dtype_name
from ..contract.shards import local_shard, local_shards
from .base import FP16_MAX, Probe, abs_max, eager, nonfinite_count_tensor, nonfinite_counts, optimizers_of, sample

NARROW_DTYPES = (torch.float16, torch.bfloat16)  # where a write's small change can round away


class ParameterProbe(Probe):
    name = "parameters"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._amax: torch.Tensor | None = None
        self._params = [w.param for w in ctx.watched]
        self._reported: set[str] = set()
        self._loaded_checked = False
        self._loaded: list[tuple[str, str, torch.Tensor]] = []  # (model, name, weight) read as loaded
        self._loaded_amax: torch.Tensor | None = None
        self._after_step: tuple[int, list[float]] | None = None  # the step and per-tensor amax of the last update
        self._at_forward: torch.Tensor | None = None  # per-tensor amax at this step's first training forward
        self._forward_read = False
        self._marks: list[tuple[int, int]] = []  # each weight's version and storage after the last update
        self._edits_noted: set[str] = set()  # severities of `weights_edited` recorded (each once)
        # a frozen model's 16-bit weights, which the caller's code may write between steps (an EMA teacher): their
        # write marks and samples as last read, and the written tensors' (changed, sampled) counts of this step
        self._frozen = [] if ctx.weights_read_by_owner else [
            (model, name, p) for model, m in ctx.models.items() if not ctx.trains(model)
            for name, p in m.named_parameters() if p.dtype in NARROW_DTYPES and p.numel()]
        self._frozen_marks: list[tuple[int, int]] | None = None
        self._frozen_samples: list[torch.Tensor] = []
        self._frozen_written: list[tuple[int, int]] = []  # (index, sampled values) of each tensor written this step
        self._frozen_changed: torch.Tensor | None = None
        self._handles = [] if ctx.weights_read_by_owner else [
            module.register_forward_pre_hook(eager(self._before_forward(name)))
            for name, module in ctx.whole_forward_hooks() if ctx.trains(name)]

    def begin_step(self) -> None:
        self._forward_read = False
        if not self._loaded_checked:
            self._loaded_checked = True
            self._read_as_loaded()
            self._check_norm_eps()

    def _before_forward(self, model_name: str):
        """At the step's first training forward, after a step whose weights were read: the weights again."""
        def hook(_model, _args) -> None:
            if self._forward_read or not self.ctx.training_forward.get(model_name):
                return
            self._forward_read = True
            if self._frozen:
                self._read_frozen_writes()
            if self._after_step is not None and (self.ctx.stats_step or _write_marks(self._params) != self._marks):
                self._at_forward = abs_max(self._params)
        return hook

    def _read_frozen_writes(self) -> None:
        """At the step's first training forward: a frozen model's 16-bit weights whose write marks moved since the last
        step were written by the caller's code in between (an EMA teacher: t ← m·t + (1 − m)·s, in place). Their
        samples against the ones held from before the write: the share the write left unchanged. A frozen weight
        nobody writes costs a version read a step; the samples are read only where a write happened."""
        params = [p for _, _, p in self._frozen]
        marks = _write_marks(params)
        if self._frozen_marks is None:
            self._frozen_samples = [sample(p).clone() for p in params]
        elif marks != self._frozen_marks:
            written = [i for i, (a, b) in enumerate(zip(marks, self._frozen_marks, strict=True)) if a != b]
            now = [sample(params[i]).clone() for i in written]
            self._frozen_changed = torch.stack([(new != self._frozen_samples[i]).sum()
                                                for i, new in zip(written, now, strict=True)]).float()
            self._frozen_written = [(i, new.numel()) for i, new in zip(written, now, strict=True)]
            for i, new in zip(written, now, strict=True):
                self._frozen_samples[i] = new
        self._frozen_marks = marks

    def _check_norm_eps(self) -> None:
        """Once, before the first step: per model, the first normalisation held in float16 (its own weights float16)
        whose eps (`eps`, or transformers' `variance_epsilon`) float16 cannot serve — a row whose variance is 0 (a
        constant or zeroed row: padding, a dropped position) is divided by √eps, and 1/√eps beyond 65504 is Inf in
        float16 (an eps below 2⁻²⁴ is 0 there: 0/0). Information: it matters where a fault is placed at that norm."""
        for model_name, model in self.ctx.models.items():
            for name, module in model.named_modules():
                eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
                weights = list(module.parameters(recurse=False))
                if isinstance(eps, float) and 0 < eps < FP16_MAX ** -2 and weights \
                        and all(w.dtype == torch.float16 for w in weights):
                    self.ctx.events.record(
                        "setup_note", "info",
                        f"{model_name} {name} normalises in float16 with eps {eps:g}: a row of variance 0 is "
                        f"divided by {eps ** -0.5:.3g}, beyond float16's {FP16_MAX:.0f}",
                        step=self.ctx.step, phase="setup", probe=self.name, model=model_name, module=name,
                        dtype="float16", value=eps, code="norm_eps_beyond_fp16")
                    break

    def _read_as_loaded(self) -> None:
        """Every floating weight of every model, before the first step: one absolute max per tensor, on the
        device (grouped by device: an offloaded teacher's lie on the CPU), gathered where the readings go."""
        self._loaded = [(model, name, p) for model, m in self.ctx.models.items() for name, p in m.named_parameters()
                        if p.is_floating_point() and not p.is_meta and p.numel()]
        if not self._loaded:
            return
        target = self._params[0].device if self._params else self._loaded[0][2].device
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, p) in enumerate(self._loaded):
            by_device.setdefault(p.device, []).append(i)
        amax = torch.empty(len(self._loaded), device=target)
        for indices in by_device.values():
            values = abs_max([self._loaded[i][2] for i in indices]).float().to(target)
            amax[torch.tensor(indices, device=target)] = values
        # NaN, +Inf and -Inf counted now, as loaded: by the time the host reads them the first step has changed
        # the trainable weights (an Inf that float16 made at load is NaN after one update)
        counts = torch.stack([nonfinite_count_tensor(p).float().to(target) for _, _, p in self._loaded])
        self._loaded_amax = torch.cat([amax, counts.reshape(-1)])

    def after_optimizer_step(self) -> None:
        if not self.ctx.weights_read_by_owner:  # sarkd-diag's loop reads them for its guard and hands them over
            self._amax = abs_max(self._params)
            self._marks = _write_marks(self._params)

    def take_readings(self) -> dict[str, torch.Tensor]:
        amax, self._amax = self._amax, None
        out = {"param_amax": amax} if amax is not None else {}
        if self._at_forward is not None:
            out["param_amax_at_forward"], self._at_forward = self._at_forward, None
        if self._loaded_amax is not None:
            out["loaded_amax"], self._loaded_amax = self._loaded_amax, None
        if self._frozen_changed is not None:
            out["frozen_writes"], self._frozen_changed = self._frozen_changed, None
        return out

    def record(self, host: dict) -> dict:
        as_loaded = self._record_loaded(host["loaded_amax"]) if host.get("loaded_amax") is not None else {}
        if host.get("frozen_writes") is not None:
            self._record_frozen_writes(host["frozen_writes"])
        if host.get("param_amax_at_forward") is not None and self._after_step is not None:
            self._record_edits(*self._after_step, host["param_amax_at_forward"])
        amax = host.get("param_amax")
        if amax is None:
            return as_loaded
        self._after_step = self.ctx.step, amax
        bad = [i for i, v in enumerate(amax) if not math.isfinite(v)]
        for i in bad:
            w = self.ctx.watched[i]
            if w.tensor in self._reported:
                continue
            self._reported.add(w.tensor)
            counts = nonfinite_counts(w.param.detach())
            self.ctx.events.record(
                "nonfinite_param", "critical",
                f"{w.model} weight {w.tensor} is non-finite after optimizer step {self.ctx.step} "
                f"({counts['nan_count']} NaN, {counts['posinf_count']} +Inf, {counts['neginf_count']} -Inf "
                f"of {counts['numel']})",
                step=self.ctx.step, phase="optimizer", probe=self.name, model=w.model, module=w.module,
                tensor=w.tensor, dtype=self.ctx.dtype_of(w.param), value=amax[i], **counts)
            if self.ctx.events.say_once("optimizer_state_nonfinite"):
                self._read_state_of(w)
        finite = [v for v in amax if math.isfinite(v)]
        return {**as_loaded, "param_amax": max(finite) if finite else math.nan, "nonfinite_param_tensors": len(bad)}

    def _read_state_of(self, w) -> None:
        """The optimizer state of the run's first non-finite weight: a state tensor that holds NaN/Inf too (read
        once, on a failing step) is noted with its key and dtype — what the rules need to tell a state that overflowed
        its dtype (a float16 momentum buffer past 65504, from finite gradients) from an update that overflowed the
        weight."""
        for optimizer in optimizers_of(self.ctx.optimizer):
            for key, value in optimizer.state.get(w.param, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() \
                        and not bool(torch.isfinite(local_shard(value)).all()):
                    self.ctx.events.record(
                        "setup_note", "warning",
                        f"the optimizer's {key} of {w.model} {w.tensor} ({dtype_name(value.dtype)}) is non-finite "
                        f"after step {self.ctx.step}, with the weight", step=self.ctx.step, phase="optimizer",
                        probe=self.name, model=w.model, module=w.module, tensor=w.tensor, dtype=dtype_name(value.dtype),
                        code="optimizer_state_nonfinite")
                    return

    def _record_edits(self, updated_at: int, after_step: list[float], at_forward: list[float]) -> None:
        """Compare each tensor's largest absolute value after the last optimizer step with the one at this step's
        first training forward: a tensor finite then and non-finite now is `nonfinite_between_steps` (critical, the
        first such tensor, once); a finite change is `weights_edited` — information the first time, a warning the
        first time it multiplies or divides a tensor's largest value by more than WEIGHT_EDIT_FACTOR."""
        step = self.ctx.step
        where = f"after optimizer step {updated_at} and before step {step}'s first training forward"
        poisoned = [i for i, (a, b) in enumerate(zip(after_step, at_forward, strict=True))
                    if math.isfinite(a) and not math.isfinite(b)]
        if poisoned and "critical" not in self._edits_noted:
            self._edits_noted.add("critical")
            w = self.ctx.watched[poisoned[0]]
            holds = "NaN" if math.isnan(at_forward[poisoned[0]]) else "Inf"
            # not counted: by now this step's update has spread the value through the tensor (value: NaN or Inf)
            self.ctx.events.record(
                "nonfinite_between_steps", "critical",
                f"{w.model} weight {w.tensor} turned {holds} {where} ({len(poisoned)} tensor(s)): code outside the "
                "optimizer wrote it", step=step, phase="forward", probe=self.name, model=w.model, module=w.module,
                tensor=w.tensor, dtype=self.ctx.dtype_of(w.param), value=at_forward[poisoned[0]], nan_count=None,
                posinf_count=None, neginf_count=None, numel=w.param.numel())
        factors = {i: _change_factor(a, b) for i, (a, b) in enumerate(zip(after_step, at_forward, strict=True))
                   if math.isfinite(a) and math.isfinite(b) and a != b}
        if not factors:
            return
        i = max(factors, key=factors.get)
        severity = "warning" if factors[i] > WEIGHT_EDIT_FACTOR else "info"
        if severity in self._edits_noted:
            return
        self._edits_noted.add(severity)
        w = self.ctx.watched[i]
        self.ctx.events.record(
            "weights_edited", severity,
            f"{len(factors)} weight tensor(s) changed {where}, outside the optimizer; {w.model} {w.tensor} most: its "
            f"largest absolute value went from {after_step[i]:.4g} to {at_forward[i]:.4g}",
            step=step, phase="forward", probe=self.name, model=w.model, module=w.module, tensor=w.tensor,
            dtype=self.ctx.dtype_of(w.param), value=factors[i], numel=w.param.numel())

    def _record_frozen_writes(self, changed_counts: list[float]) -> None:
        """The caller's writes to a frozen model's 16-bit weights that came back unchanged: beyond LOST_UPDATE_WARNING
        of the written values (sampled), the write asked for changes below half an ulp (an EMA's (1 − m) × the
        distance to the student) and float16/bfloat16 rounded them away — `frozen_writes_lost`, once, at the written
        tensor that kept least."""
        written, self._frozen_written = self._frozen_written, []
        kept = [changed / n for changed, (_, n) in zip(changed_counts, written, strict=True)]
        unchanged = 1 - sum(changed_counts) / sum(n for _, n in written)
        if unchanged <= LOST_UPDATE_WARNING or not self.ctx.events.say_once("frozen_writes_lost"):
            return
        model, name, p = self._frozen[written[min(range(len(kept)), key=kept.__getitem__)][0]]
        self.ctx.events.record(
            "lost_updates", "warning",
            f"{model}'s weights were written between step {self.ctx.step - 1}'s update and step {self.ctx.step}'s "
            f"first training forward ({len(written)} tensor(s)), not by an optimizer, and {unchanged:.0%} of the "
            f"written values came back unchanged: in {dtype_name(p.dtype)} the changes asked were below half an ulp "
            f"({name} kept least)", step=self.ctx.step, phase="forward", probe=self.name, model=model,
            module=name.rpartition(".")[0], tensor=name, dtype=dtype_name(p.dtype), value=unchanged,
            numel=len(written), code="frozen_writes_lost")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _record_loaded(self, readings: list[float]) -> dict:
        """One event per model whose weights hold NaN/Inf as loaded: its first such tensor, with how many (counted
        as loaded); one per model whose largest finite weight lies beyond fp16's range in a wider dtype. Returns
        each model's largest finite absolute weight as loaded (`loaded_amax_<model>`)."""
        loaded, self._loaded = self._loaded, []
        amax, counted = readings[:len(loaded)], readings[len(loaded):]
        bad: dict[str, list[int]] = {}
        largest: dict[str, int] = {}
        for i, value in enumerate(amax):
            model = loaded[i][0]
            if not math.isfinite(value):
                bad.setdefault(model, []).append(i)
            elif model not in largest or value > amax[largest[model]]:
                largest[model] = i
        for model, i in largest.items():
            _, name, p = loaded[i]
            if amax[i] > FP16_MAX and p.dtype != torch.float16:
                self.ctx.events.record(
                    "weight_beyond_fp16", "warning",
                    f"{model} weight {name} holds {amax[i]:.4g} as loaded, beyond fp16's {FP16_MAX:.0f} (in "
                    f"{dtype_name(p.dtype)}): cast to float16 — by autocast or `.half()` — it is Inf",
                    step=self.ctx.step, phase="setup", probe=self.name, model=model,
                    module=name.rpartition(".")[0], tensor=name, dtype=dtype_name(p.dtype), value=amax[i],
                    numel=p.numel())
        for model, indices in bad.items():
            first = indices[0]
            _, name, p = loaded[first]
            nan, posinf, neginf = (int(c) for c in counted[3 * first:3 * first + 3])
            counts = {"nan_count": nan, "posinf_count": posinf, "neginf_count": neginf, "numel": p.numel()}
            total = sum(1 for m, _, _ in loaded if m == model)
            held_in_fp16 = any(q.dtype == torch.float16 for m, _, q in loaded if m == model)
            stored = stored_tensor(self.ctx.models[model], name) if held_in_fp16 and not nan else None
            code = "nonfinite_at_load"
            if stored is not None and not bool(torch.isfinite(stored).all()):
                code, verdict = "nonfinite_in_checkpoint", (
                    f"the checkpoint file holds it so ({dtype_name(stored.dtype)}, non-finite as stored): the "
                    "checkpoint is corrupt, not float16's cast")
            elif stored is not None:
                verdict = (f"stored finite in {dtype_name(stored.dtype)} (largest {float(stored.abs().max()):.4g}): "
                           "values beyond fp16's 65504, made Inf by the cast to float16 — the file is sound")
            elif held_in_fp16 and not nan:
                verdict = ("Inf alone, in a model held in float16: values beyond fp16's 65504 in a checkpoint saved "
                           "wider, made Inf by the cast to float16 (the file may be sound), or a corrupt checkpoint")
            else:
                verdict = "the checkpoint is corrupt"
            self.ctx.events.record(
                "nonfinite_at_load", "critical",
                f"{model} weight {name} holds {counts['nan_count']} NaN, {counts['posinf_count']} +Inf and "
                f"{counts['neginf_count']} -Inf of {counts['numel']} before the first optimizer step, as loaded "
                f"({len(indices)} of {total} weight tensors of {model} non-finite): {verdict}",
                step=self.ctx.step, phase="setup", probe=self.name, model=model, module=name.rpartition(".")[0],
                tensor=name, dtype=dtype_name(p.dtype), value=amax[first], code=code, **counts)
        return {f"loaded_amax_{model}": amax[i] for model, i in largest.items()}


def stored_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor `name` as the file the model was loaded from holds it — safetensors in the directory of its
    `name_or_path` (transformers' `from_pretrained` sets it), or in the Hugging Face cache for a hub id, never the
    network — in its stored dtype; None where there is no such file or tensor. Read once, on the failure path, to
    tell a value the cast to float16 made Inf (stored finite, wider) from an Inf the checkpoint itself holds."""
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open

    model, name = _as_saved(model, name)
    source = getattr(model, "name_or_path", None)
    if not isinstance(source, str) or not source:
        return None

    def located(filename: str) -> Path | None:
        if Path(source).is_dir():
            return Path(source, filename) if Path(source, filename).is_file() else None
        try:
            found = try_to_load_from_cache(source, filename)
        except Exception:  # noqa: BLE001 — not a hub id either: no file to read
            return None
        return Path(found) if isinstance(found, str) else None

    prefix = getattr(model, "base_model_prefix", "")
    keys = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]
    try:
        index = located("model.safetensors.index.json")
        if index is not None:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            key = next((k for k in keys if k in weight_map), None)
            path = index.with_name(weight_map[key]) if key else None
        else:
            path = located("model.safetensors")
        if path is None:
            return None
        with safe_open(path, framework="pt") as stored:
            key = next((k for k in keys if k in stored.keys()), None)
            return stored.get_tensor(key) if key else None
    except Exception:  # noqa: BLE001 — a file torn or of another format tells nothing; the probes never break a run
        return None


def _as_saved(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The pretrained model inside `model` that holds tensor `name` (the outermost one), and the tensor's name in it
    as its file knows it: wrappers around it add a prefix (PEFT's `base_model.model.`, a LightningModule's attribute)
    and an adapter layer adds its base layer's name (PEFT's `get_base_layer()`: `c_fc.base_layer.weight` was saved
    as `c_fc.weight`). `model` and `name` as given where no pretrained model holds it."""
    from transformers import PreTrainedModel

    *path, leaf = name.split(".")
    module, owner, saved = model, None, []
    for segment in path:
        child = module._modules.get(segment)
        if child is None:
            return model, name
        if owner is None and isinstance(module, PreTrainedModel):
            owner = module
        base_layer = getattr(module, "get_base_layer", None)
        if owner is not None and not (callable(base_layer) and base_layer() is child):
            saved.append(segment)
        module = child
    if owner is None and isinstance(module, PreTrainedModel):
        owner = module
    return (owner, ".".join([*saved, leaf])) if owner is not None else (model, name)


def _write_marks(params: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Each tensor's version counter and storage address (of a sharded one, its local shard's): what a write to it
    outside the optimizer moves — any in-place op bumps the first, `.data = ...` moves the second."""
    return [(t._version, t.data_ptr()) for t in local_shards(params)]


def _change_factor(before: float, after: float) -> float:
    """By how many times a largest absolute value grew or shrank (infinite from or to 0)."""
    low, high = sorted((before, after))
    return high / low if low > 0 else math.inf
