"""--on-nonfinite: what the loop does when a step's gradients or weights are non-finite.

`stop` ends the run on the first non-finite weight; `skip` puts back a pre-step copy of the weights and the
optimizer state (or, with non-finite gradients and no loss scaler, never runs the step); `rollback` returns
to the newest good checkpoint at half the learning rate; `continue` only records. Any policy but `continue`
also stops after MAX_SKIPPED_IN_A_ROW skipped steps in a row (a loss scaler that keeps skipping, or the skip
policy itself): training has stopped progressing. Nothing is ever reset to the initial weights and no loss
is replaced: every action is an event.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..contract.events import EventLog
from ..contract.shards import local_shard
from ..contract.wording import counted
from .checkpoint import StepSnapshot
from .distributed import World

MAX_SKIPPED_IN_A_ROW = 20  # skipped steps in a row (loss scaler or policy): training has stopped progressing


class NonFinitePolicy:
    """One run's --on-nonfinite, asked just before each optimizer step (`runs_step`) and, once the step is
    recorded, what to do next (`decide`).

    `restore(step)` puts back the newest good checkpoint before `step` (weights, optimizer, data, RNG, the
    step, and this policy's `state_dict`) and returns its path and step, or None when none loads; a rollback
    needs nothing else of the run. `weights_finite` says whether the weights are finite once the policy has
    acted: no checkpoint is written of non-finite ones.
    """

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, scheduler, *, max_rollbacks: int,
                 save_steps: int, loss_scaling: bool, named_trainable: list[tuple[str, str, nn.Parameter]],
                 world: World, restore: Callable[[int], tuple[Path, int] | None]):
        self.name, self.optimizer, self.scheduler = name, optimizer, scheduler
        self.max_rollbacks, self.save_steps, self.loss_scaling = max_rollbacks, save_steps, loss_scaling
        self.named_trainable, self.world, self.restore = named_trainable, world, restore
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.snapshot = StepSnapshot(params, optimizer) if name == "skip" else None
        self.weights_finite, self.skip_streak, self.rollbacks, self.lr_factor = True, 0, 0, 1.0

    def setup_notes(self, device_type: str) -> list[dict]:
        """What the policy costs or cannot do in this run, as setup events."""
        notes = []
        if self.name == "rollback" and not self.save_steps:
            notes.append({"kind": "setup_note", "severity": "warning", "message": "--on-nonfinite rollback "
                          "without --save-steps: there is no checkpoint to roll back to before the end, so a "
                          "non-finite step stops the run"})
        if self.snapshot is not None:
            size = self.snapshot.bytes_needed() / 2**20
            notes.append({"kind": "setup_note", "message": f"--on-nonfinite skip keeps a pre-step copy of the "
                          f"trainable weights and the optimizer state: {size:.1f} MiB more on {device_type}"})
        return notes

    # ---------------------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict) -> None:
        """The policy as a checkpoint left it; the weights it restored are finite, and no skip is in a row."""
        self.rollbacks, self.lr_factor = int(state["rollbacks"]), float(state["lr_factor"])
        self.weights_finite, self.skip_streak = True, 0

    # ------------------------------------------------------------------------------------- the step
    def runs_step(self, step: int, grad_norm: torch.Tensor, events: EventLog) -> bool:
        """--on-nonfinite skip, just before the optimizer step: False skips a step with non-finite gradients
        before it runs (reading the norm is the one extra host sync skip costs); otherwise a pre-step copy is
        kept, to put back if the step makes the weights non-finite. A loss scaler skips such steps itself
        (and must see them to lower its scale), so with one only the copy is taken."""
        if self.snapshot is None:
            return True
        if not self.loss_scaling and bool(self.world.any_flag(~torch.isfinite(grad_norm))):
            bad = [(model, name) for model, name, p in self.named_trainable
                   if p.grad is not None and not bool(torch.isfinite(local_shard(p.grad)).all())]  # this rank's
            model, name = bad[-1] if bad else (None, None)  # the last registered is the first reached in backward
            where = f"{counted(len(bad), 'gradient tensor')} non-finite, first in backward order {model} {name}" \
                if bad \
                else "the norm overflows its dtype" if not torch.isfinite(grad_norm) else \
                "a non-finite gradient on another rank"
            events.record("policy_skip", "warning", f"gradient norm {float(grad_norm)} at step {step} "
                          f"({where}): the step was skipped before the optimizer ran", step=step,
                          phase="policy", model=model, tensor=name, value=float(grad_norm),
                          code="skip_nonfinite_gradients")
            return False
        self.snapshot.take()
        return True

    def decide(self, step: int, row: dict, events: EventLog) -> str | None:
        """What the loop does after a step (its metrics `row`): None to go on, "rollback" (done) or "stop".
        The policy acts first: with `skip` it undoes a step that left non-finite weights."""
        self.weights_finite = row["weights_finite"]
        if not self.weights_finite and self.name == "skip":
            self.snapshot.restore()
            self.weights_finite, row["skipped"] = True, 1
            events.record("policy_skip", "warning", f"non-finite weights after step {step}: the step's update "
                          "was undone (weights and optimizer state put back from the pre-step copy)",
                          step=step, phase="policy", code="skip_undone_update")
        self.skip_streak = self.skip_streak + 1 if row["skipped"] else 0
        if not self.weights_finite and self.name == "rollback":
            why_not = self._rollback(step, events)
            if why_not is None:
                return "rollback"
            return _stop(events, step, f"non-finite weights after step {step} and {why_not}: stopping; see the "
                         "diagnosis")
        if not self.weights_finite and self.name == "stop":
            return _stop(events, step, f"non-finite weights after step {step}: stopping (--on-nonfinite stop); "
                         "see the diagnosis")
        if self.skip_streak >= MAX_SKIPPED_IN_A_ROW and self.name != "continue":
            return _stop(events, step, f"{self.skip_streak} skipped steps in a row up to step {step}: training "
                         "has stopped progressing; see the diagnosis")
        return None

    def _rollback(self, failed_step: int, events: EventLog) -> str | None:
        """Back to the newest good checkpoint with the learning rate halved; None, or why it cannot."""
        if self.rollbacks >= self.max_rollbacks:
            return f"--max-rollbacks {self.max_rollbacks} are used up"
        rollbacks, factor = self.rollbacks + 1, self.lr_factor * 0.5
        restored = self.restore(failed_step)
        if restored is None:
            return "there is no good checkpoint to roll back to" + ("" if self.save_steps else " (see --save-steps)")
        path, step = restored
        self._scale_learning_rates(factor / self.lr_factor)  # the checkpoint's own factor, now in self.lr_factor
        self.rollbacks, self.lr_factor, self.skip_streak = rollbacks, factor, 0
        lrs = ", ".join(f"{g.get('name', i)} {g['lr']:.3g}" for i, g in enumerate(self.optimizer.param_groups))
        events.record("policy_rollback", "warning", f"non-finite weights after step {failed_step}: rolled back "
                      f"to {path.name} (step {step}) with the learning rate halved (×{factor:g} of the "
                      f"original: {lrs}); rollback {rollbacks} of --max-rollbacks {self.max_rollbacks}",
                      step=failed_step, phase="policy", value=factor)
        return None

    def _scale_learning_rates(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]


def _stop(events: EventLog, step: int, message: str) -> str:
    events.record("policy_stop", "critical", message, step=step, phase="policy")
    return "stop"
