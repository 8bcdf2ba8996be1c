"""Probes watch a training loop through hooks and record numerical events; they never steer it.

Usable on their own, in anyone's loop:

    with Probes(model, optimizer=opt, scaler=scaler, run_dir="runs/mine") as probes:
        for batch in data:
            loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update()
            probes.step(loss=loss)        # after the optimizer step, before zero_grad
            opt.zero_grad()
    print(probes.diagnosis())

Gradients and weights are read through the optimizer's step pre/post hooks, activations through
forward hooks attached on statistics steps only; every probe keeps its statistics on the device, and
`step()` moves all of them to the host in one transfer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..events import EventLog, JsonlLog
from .activations import ActivationProbe
from .base import ProbeContext, Watched, to_host
from .gradients import GradientProbe
from .loss import LossProbe
from .optimizer import OptimizerProbe
from .parameters import ParameterProbe
from .scaler import ScalerProbe
from .updates import LostUpdateProbe

PROBE_TYPES = (LossProbe, ActivationProbe, GradientProbe, OptimizerProbe, LostUpdateProbe, ParameterProbe,
               ScalerProbe)


# metrics columns of the run-directory contract that Probes cannot know in someone else's loop: null, not 0
NOT_SEEN_IN_A_USER_LOOP = ("kd_loss", "ce_loss", "grad_norm", "tokens_per_s", "eval_ppl")


class Probes:
    def __init__(self, models: nn.Module | dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None,
                 scaler: torch.amp.GradScaler | None = None, *, run_dir: str | Path | None = None,
                 events: EventLog | None = None, level: str = "standard", every: int = 10,
                 watched: list[Watched] | None = None, weights_read_by_owner: bool = False):
        if level not in ("off", "standard", "full"):
            raise ValueError(f"probe level must be off, standard or full, got {level!r}")
        models = models if isinstance(models, dict) else {"student": models}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._own_logs = events is None and self.run_dir is not None
        if self._own_logs:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            events = EventLog(self.run_dir / "events.jsonl")
            self._metrics = JsonlLog(self.run_dir / "metrics.jsonl")
        self.events = events or EventLog()
        self.ctx = ProbeContext(models, self.events, optimizer, scaler, level, every, watched=watched or [],
                                weights_read_by_owner=weights_read_by_owner)
        self._probes = [] if level == "off" else [cls(self.ctx) for cls in PROBE_TYPES]
        self._loss_probe = next((p for p in self._probes if isinstance(p, LossProbe)), None)
        self._activation_probe = next((p for p in self._probes if isinstance(p, ActivationProbe)), None)
        self._handles = []
        if optimizer is not None and self._probes:
            self._handles = [optimizer.register_step_pre_hook(self._before_optimizer_step),
                             optimizer.register_step_post_hook(self._after_optimizer_step)]
        self._pending_loss: torch.Tensor | None = None
        self.begin_step(1)

    @classmethod
    def for_trainer(cls, trainer) -> Probes:
        """The probes of sarkd-diag's own loop, sharing its event log.

        They watch the optimizer's parameters in its own order, so the loop's guard — a per-tensor absolute
        max of the weights after every step, which it takes anyway — is the parameter probe's reading too
        (handed over as `param_amax`) instead of a second pass over the weights.
        """
        models = {"student": trainer.student, "teacher": trainer.teacher}
        names = {id(p): (model, name) for model, m in models.items() for name, p in m.named_parameters()}
        names.update({id(p): ("projection", name) for name, p in
                      getattr(trainer.objective, "projection", nn.Identity()).named_parameters()})
        watched = []
        for p in trainer.trainable:
            model, name = names[id(p)]
            watched.append(Watched(model, name.rpartition(".")[0], name, p))
        return cls(models, trainer.optimizer, getattr(trainer.precision, "scaler", None), events=trainer.events,
                   level=trainer.config.probes, every=trainer.config.probe_every, watched=watched,
                   weights_read_by_owner=True)

    # ----------------------------------------------------------------------------------- the clock
    def begin_step(self, step: int) -> None:
        ctx = self.ctx
        ctx.step = step
        ctx.stats_step = ctx.level == "full" or (ctx.level == "standard" and (step == 1 or step % ctx.every == 0))
        for probe in self._probes:
            probe.begin_step()

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        for probe in self._probes:
            probe.before_optimizer_step()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        for probe in self._probes:
            probe.after_optimizer_step()

    def observe_loss(self, parts, loss: torch.Tensor | None = None) -> None:
        """The loop's per-micro-batch loss terms (LossParts: kd_sum, ce_sum, router_loss, targets)."""
        if self._loss_probe is not None:
            self._loss_probe.observe(parts.kd_sum, parts.ce_sum, parts.router_loss, parts.targets)

    def readings(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for probe in self._probes:
            out.update(probe.readings())
        return out

    def after_step(self, step: int, host: dict, row: dict | None = None) -> dict:
        """Turn the step's host readings into events and metrics columns, and start the next step."""
        metrics: dict = {}
        for probe in self._probes:
            metrics.update(probe.after_step(host))
        return metrics

    @property
    def needs_replay(self) -> bool:
        """A loss turned non-finite on a step without per-module statistics: no module is named yet."""
        return (self._loss_probe is not None and self._loss_probe.nonfinite_this_step
                and not self.ctx.stats_step and self._activation_probe is not None)

    def replay_forward(self, forward) -> None:
        """Re-run one forward with per-module statistics, to name the module where a non-finite loss began.

        `standard` keeps per-module statistics off on most steps; when a loss turns non-finite there, the
        loop replays the step's first micro-batch — from weights that are still the pre-step ones (the
        loss scaler skipped the step, or the policy restored them) — and the first non-finite module is
        recorded as if the statistics had been on. The failure path only: it costs one forward and a sync.
        """
        probe = self._activation_probe
        probe.attach()
        with torch.no_grad():
            forward()
        readings = probe.readings()
        host = {"activation_extremes": readings["activation_extremes"].tolist()} if readings else {}
        probe.after_step(host, note=" (replayed with per-module statistics after a non-finite loss)")

    # ------------------------------------------------------------------------- standalone use
    def step(self, loss: torch.Tensor | None = None) -> dict:
        """Close the current step of a user's loop (after optimizer.step): one host transfer, events recorded."""
        if loss is not None and self._loss_probe is not None:
            self._loss_probe.observe(None, loss, None, None)
        (host,) = to_host(self.readings())
        step = self.ctx.step
        metrics = self.after_step(step, host)
        self.begin_step(step + 1)
        optimizer = self.ctx.optimizer
        row = {"step": step, "split": "train", "loss": float(loss.detach().float()) if loss is not None else None,
               "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else None, "loss_scale": None,
               **dict.fromkeys(NOT_SEEN_IN_A_USER_LOOP), **metrics}
        if self._own_logs:
            self._metrics.write_line(json.dumps(row))
        return row

    def diagnosis(self) -> list[dict]:
        from ..diagnose import diagnose
        from ..events import events_frame

        frame = events_frame(e.__dict__ for e in self.events.events)
        return diagnose(frame, None, {"precision": self._precision_info()})

    def _precision_info(self) -> dict:
        dtypes = sorted({self.ctx.dtype_of(w.param) for w in self.ctx.watched})
        scaled = self.ctx.scaler is not None and self.ctx.scaler.is_enabled()
        mode = {("float32",): "mixed" if scaled else "fp32", ("float16",): "pure-fp16",
                ("bfloat16",): "pure-bf16"}.get(tuple(dtypes), "external")
        return {"mode": mode, "requested": "external loop", "reason": "inferred from the watched weights",
                "master_dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes), "param_dtypes": dtypes}

    def close(self, status: str = "completed") -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for probe in self._probes:
            probe.close()
        if self._own_logs:
            from ..rundir import finalize_run, write_json_atomic

            self.events.close()
            self._metrics.close()
            config = self.run_dir / "config.json"
            if not config.exists():
                write_json_atomic(config, {"options": {}, "precision": self._precision_info(),
                                           "source": "sarkd_diag.Probes in a user loop"})
            finalize_run(self.run_dir, status)
            self._own_logs = False

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("completed" if exc_type is None else "interrupted" if exc_type is KeyboardInterrupt
                   else "failed")


__all__ = ["Probes"]
