"""Numerical events as data: one schema, an append-only log that survives a crash, pandas views.

An event is an observation worth a row (a first occurrence, a threshold crossed, a skipped step, a
policy action). Per-step readings are metrics columns, not events.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

SEVERITIES = ("info", "warning", "critical")
PHASES = ("setup", "forward", "backward", "optimizer", "loss", "eval", "policy")
KINDS = (
    "precision_setup", "router_found", "no_router", "dual_tokenizer", "optimizer_preflight",
    "nonfinite_param", "nonfinite_at_load", "nonfinite_grad", "zero_gradients", "nonfinite_activation",
    "nonfinite_batch", "fp16_overflow_risk", "weight_beyond_fp16", "nonfinite_lr", "negative_lr", "zero_lr",
    "optimizer_state_underflow", "lost_updates", "extreme_update", "update_lr", "scaler_skip", "scaler_backoff",
    "scale_below_one", "nonfinite_loss", "empty_targets", "policy_skip", "policy_rollback", "policy_stop",
    "interrupted", "router_frozen_dual", "out_of_memory", "setup_note", "checkpoint_fallback",
    "nonfinite_between_steps", "weights_edited", "caller_skip", "wide_replay", "forward_replay",
    "run_error", "zero_activation", "singular_derivative", "checkpoint_nonfinite", "nonfinite_eval",
)
# What exactly was checked: the closed vocabulary the diagnosis reads (never a message). A kind whose check
# has one meaning uses its own name as its code; kinds with several checks have one code per check.
CODES = {
    "precision_setup": "the precision mode the run uses, and why",
    "router_found": "an MoE router of the teacher that trains (SAR)",
    "no_router": "the teacher has no MoE router: plain KD",
    "dual_tokenizer": "teacher and student tokenize differently: hidden-state KD",
    "router_frozen_dual": "routers stay frozen in dual-tokenizer mode",
    "eps_zero": "optimizer_preflight: the optimizer's eps rounds to 0 in the weights' dtype (or is set to 0)",
    "eps_subnormal": "optimizer_preflight: the optimizer's eps is subnormal in the weights' dtype",
    "weight_decay_zero": "optimizer_preflight: lr x weight_decay rounds to 0 in the weights' dtype",
    "second_moment_decay_zero": "optimizer_preflight: Adam's second moment × β2 rounds back to itself in the "
                                "state's dtype (bfloat16 and β2 = 0.999): the moment never decays",
    "update_below_half_ulp": "optimizer_preflight: an lr-sized update is below half an ulp of many weights",
    "update_below_fp32_half_ulp": "optimizer_preflight: an lr-sized update is below half an ulp of many 16-bit "
                                  "weights even held in float32",
    "weight_decay_large": "optimizer_preflight: lr x weight_decay alone halves the weights within a few steps",
    "nonfinite_param": "a weight holds NaN/Inf after an optimizer step",
    "nonfinite_at_load": "a weight of a watched model (trainable or frozen) holds NaN/Inf before the first step",
    "nonfinite_in_checkpoint": "nonfinite_at_load: a float16 weight Inf before the first step, and the file the model "
                               "was loaded from holds it so: the checkpoint's, not the cast to float16's",
    "nonfinite_between_steps": "a weight finite after an optimizer step holds NaN/Inf at the next training forward: "
                               "written by code outside the optimizer",
    "weights_edited": "finite weights changed between an optimizer step and the next training forward: code "
                      "outside the optimizer edited them",
    "weight_beyond_fp16": "a finite weight as loaded beyond fp16's range, in a wider dtype: Inf once cast to float16",
    "nonfinite_lr": "a parameter group's learning rate is NaN/Inf when the optimizer is about to step",
    "negative_lr": "a parameter group's learning rate is below 0 when the optimizer is about to step: it climbs "
                   "the loss",
    "zero_lr": "every parameter group's learning rate is 0 on consecutive optimizer steps: nothing trains",
    "grad_nonfinite_applied": "nonfinite_grad: a non-finite gradient reached an optimizer with no loss scaler, or "
                              "ended a loop that raised on it",
    "grad_nonfinite_skipped": "nonfinite_grad: a non-finite gradient on a step the loss scaler skips",
    "zero_gradients": "most trainable tensors that have a gradient have an all-zero one (flushed, or unreached)",
    "nonfinite_activation": "a module's forward output holds NaN/Inf (the first such module in forward order)",
    "wide_replay": "a module whose float16 output turned non-finite (or was 0 everywhere, `zero_activation`), run "
                   "again in float32 on the same finite inputs: finite there (float16's range) or not (an operation "
                   "undefined on its inputs); above 0 there or 0 (the code's zero)",
    "forward_replay": "a step's forwards, replayed with per-module statistics after a non-finite loss (or non-finite "
                      "gradients), made every module output finite (value: the model's largest): the loss or backward "
                      "made it after them",
    "nonfinite_batch": "a floating-point input of the model holds NaN (bad data)",
    "zero_activation": "a module's forward output is exactly 0 everywhere where an earlier module output of the "
                       "same model in the step was not, and again at its next training forward (the first such module "
                       "in forward order, once; step: where first seen)",
    "singular_derivative": "the gradients turned non-finite and the caller's own loss computation (between the "
                           "trained models' outputs and the loss) holds an operation whose derivative is infinite "
                           "or undefined at some input (sqrt, pow below 1, log, division, acos/asin)",
    "fp16_overflow_risk": "a finite forward output, or a value a module's own code makes, beyond fp16's range in "
                          "a wider dtype",
    "optimizer_state_underflow": "second-moment entries flushed to zero although their gradient is not",
    "second_moment_inf": "setup_note: a second moment (Adam's exp_avg_sq) holds Inf while its weight is finite: "
                         "those entries never update again",
    "lost_updates": "intended weight updates lost to rounding (the weight did not change)",
    "frozen_writes_lost": "lost_updates: the caller's code wrote a frozen model's 16-bit weights between steps (an EMA "
                          "teacher) and most written values came back unchanged: the changes rounded away",
    "lost_updates_whole_tensors": "lost_updates: every intended update of 16-bit tensors lost, where the run and "
                                  "each parameter group lose few",
    "extreme_update": "an optimizer step changed the weights by more than EXTREME_UPDATE_RATIO of their size",
    "update_lr": "the lr the parameter group of an extreme update's largest change stepped at",
    "scaler_skip_warmup": "scaler_skip: a skip among the first steps, while the scaler finds its scale",
    "scaler_skip_overflow": "scaler_skip: a skip after the scale was found: an overflow",
    "scaler_growth_too_fast": "setup_note: many settled steps skipped while growths win back every halving: "
                              "growth_interval too short",
    "skip_streak": "scaler_backoff: more skipped steps in a row than the limit",
    "skip_fraction": "scaler_backoff: more than the limit's fraction of the steps after the warm-up skipped",
    "warmup_scale_low": "scaler_backoff: the first steps' skips brought the scale down to the warm-up's floor",
    "scaler_never_settled": "setup_note: the run ended while the loss scaler was still finding its scale: it skipped "
                            "every step, no update was applied",
    "scale_below_one": "the loss scale fell below 1: gradients overflow even unscaled",
    "loss_nonfinite": "nonfinite_loss: the loss the caller optimises is non-finite",
    "loss_term_nonfinite": "nonfinite_loss: one term of the loss (sarkd-diag's kd, ce, router; a caller's, named by "
                           "`Probes.step(terms=...)`) is non-finite",
    "empty_targets": "a micro-batch without target tokens: its per-token loss is 0/0",
    "skip_nonfinite_gradients": "policy_skip: --on-nonfinite skip did not run a step whose gradients are non-finite",
    "skip_undone_update": "policy_skip: --on-nonfinite skip undid a step whose update made the weights non-finite",
    "caller_skipped_step": "caller_skip: the caller's loop skipped the step's backward and update on purpose "
                           "(`Probes.step(skipped=True)`; Lightning: `training_step` returned None)",
    "policy_rollback": "--on-nonfinite rollback: weights put back from a checkpoint",
    "policy_stop": "the non-finite policy stopped the run",
    "interrupted": "a stop signal: the run stopped after a step, state saved",
    "out_of_memory": "the device ran out of memory",
    "run_error": "an exception other than out of memory ended the run: its type and message, and the file that holds "
                 "its traceback",
    "setup_note": "a setup fact worth knowing (a pad token added, an option that is a no-op here)",
    "loss_unfused": "setup_note: --fused-loss falls back to complete logits: a model's head does not fuse",
    "padded_vocabulary": "setup_note: one tokenizer, heads padded to different sizes: KD compares the shared ids",
    "slow_precision": "setup_note: the mode computes in a 16-bit dtype the device has no fast arithmetic for",
    "gradients_below_fp32": "setup_note: most second moments that flushed to zero in a 16-bit optimizer state would "
                            "flush in float32 too: the gradients are vanishingly small, whatever the precision",
    "kd_targets_few": "setup_note: the KD term covered under KD_TARGETS_WARNING of a step's target tokens "
                      "(dual-tokenizer mode: student tokens no teacher token's characters overlap)",
    "every_step_skipped": "setup_note: every step the caller closed was one its loop skipped: nothing trained",
    "resumed": "setup_note: the run continues from a checkpoint (which one, at which step)",
    "step_order": "setup_note: the optimizer stepped before any training forward of the step: Probes.step() is "
                  "called before optimizer.step()",
    "unwatched_params": "setup_note: trainable tensors of a model the optimizer trains are in none of its parameter "
                        "groups (a second optimizer the probes were not given)",
    "optimizer_tensors_unwatched": "setup_note: the optimizer trains tensors of no model the probes were given (a "
                                   "projection beside the student): their gradients and weights are not read",
    "loss_unseen": "setup_note: a step that trained closed with no loss: Probes.step() was given none and the "
                   "model's outputs hold none (a loop that computes its own loss)",
    "optimizer_never_stepped": "setup_note: steps were closed, and not one of them reached the optimizer the probes "
                               "were given: optimizer.step() is never called",
    "optimizer_stepped_twice": "setup_note: an optimizer stepped twice within one step with no training forward "
                               "between: optimizer.step() called twice per batch (scaler.step and optimizer.step "
                               "both)",
    "steps_left_open": "setup_note: an optimizer stepped again within one step after another training forward: "
                       "Probes.step() is not called after every optimizer step (one row holds several updates)",
    "norm_eps_beyond_fp16": "setup_note: a normalisation held in float16 whose eps float16 cannot serve: 1/sqrt(eps) "
                            "beyond 65504 (a row of variance 0 divides by it)",
    "optimizer_state_nonfinite": "setup_note: the optimizer state of the run's first non-finite weight (a momentum "
                                 "buffer, Adam's moments) is non-finite with it",
    "scaler_bypassed": "setup_note: an optimizer stepped on gradients the loss scaler scaled and never unscaled: "
                       "optimizer.step() called instead of scaler.step(optimizer)",
    "clip_before_unscale": "setup_note: the loop clips gradients the loss scaler still scales (clip_grad_norm_ "
                           "or clip_grad_value_ before scaler.unscale_): updates ~scale x smaller than the threshold "
                           "meant",
    "scaler_fp16_weights": "setup_note: a loss scaler over float16 trainable weights: GradScaler refuses to unscale "
                           "their float16 gradients, so the first optimizer step raises",
    "gradients_not_cleared": "setup_note: a step's backward added to gradients the previous step had already used: "
                             "optimizer.zero_grad() is not called between optimizer steps",
    "num_items_ignored": "setup_note: a Trainer's compute_loss override is handed num_items_in_batch and never reads "
                         "it, while the Trainer leaves the loss undivided for gradient accumulation",
    "micro_batches_summed": "setup_note: a step backpropagated several losses of one model's forwards each at full "
                            "weight: micro-batches accumulated without dividing each loss by their count",
    "loss_term_negative": "setup_note: a loss term named kd or ce is below 0, where no divergence or cross-entropy "
                          "goes: it is no such thing (a sign flipped, log p and log q swapped)",
    "kl_div_mean_over_support": "setup_note: F.kl_div averaged over every element (reduction='mean') in a training "
                                "step: the divergence per distribution divided by the distribution's size",
    "kl_target_not_log_probs": "setup_note: F.kl_div's target held a value above 0 with log_target=True in a "
                               "training step: it takes it as log-probabilities, and given probabilities returns no "
                               "divergence",
    "kl_input_not_log_probs": "setup_note: F.kl_div's input held a value above 0 in a training step: it takes "
                              "log-probabilities, and given probabilities or logits returns no divergence",
    "teacher_dropout_on": "setup_note: a frozen model (a teacher) runs its training forwards in train() mode with "
                          "dropout on: its outputs, the KD targets, are drawn through a random mask",
    "targets_on_padding": "setup_note: a tenth or more of a training step's target tokens sit where the attention "
                          "mask is 0: padding kept as labels, which the loss trains the model to predict",
    "kl_target_one_hot": "setup_note: F.kl_div's target, the teacher's distribution, is one-hot on most of a "
                         "training step's tokens: a temperature far below 1, and the KD term carries its argmax alone",
    "kd_temperature_low": "setup_note: a KD temperature below KD_TEMPERATURE_FLOOR: the KD term's gradient is T× its "
                          "size at T = 1 and the teacher's softmax at T is all but one-hot",
    "loss_backpropagated_twice": "setup_note: one forward's loss was backpropagated by several backwards that add "
                                 "to .grad, each at full weight: its gradient is applied that many times",
    "accumulation_unmatched": "setup_note: the optimizer stepped after fewer batches than the Accelerator's "
                              "gradient_accumulation_steps, by which accelerator.backward divides each loss: the loop "
                              "never enters accelerator.accumulate, and each update has a fraction of the gradient",
    "optimizer_holds_frozen": "setup_note: the optimizer holds a model's tensors and none of them requires grad: the "
                              "model was frozen, and nothing of it trains",
    "unoptimized_models": "setup_note: the optimizer holds none of the trainable tensors of the models the probes "
                          "were given: it was built from other parameters, and nothing of them trains",
    "frozen_model_unseen": "setup_note: the first statistics step that trained read no module of a watched frozen "
                           "model (a teacher, a reference): its outputs were computed before the probes watched "
                           "(precomputed, cached), and a non-finite value it made shows only in the loss",
    "compiled_before_probes": "setup_note: torch.compile had compiled the forward of a watched model's class (that "
                              "model's, or another's of its class) before the probes' hooks existed (compiled code "
                              "runs without hooks added later): dynamo's caches reset, one recompile",
    "loss_handed_once": "setup_note: under accelerate's gradient accumulation a step's loss was handed to its only "
                        "step() call, after several training forwards: the micro-batches' losses were not handed over",
    "loss_without_teacher": "setup_note: a caller's loop handed no loss to step() while a frozen model (a teacher) ran "
                            "in its training: the rows hold the student's own loss output, not the distillation "
                            "objective",
    "compiled_fullgraph": "setup_note: a watched model compiled with fullgraph=True: the probes' hooks stay outside "
                          "its compiled forward (a graph break is an error there); its modules' outputs are read only "
                          "in a replay of a failing step",
    "run_continued": "setup_note: a new training run (a second train() or fit, a search trial) continues the run "
                     "directory from this step on: its loss starts afresh, and the loss rules do not judge across it",
    "trainer_restarted": "setup_note: the Trainer began its training loop again inside the same train() "
                         "(auto_find_batch_size after an out-of-memory error): the abandoned attempt's steps are cut, "
                         "the record numbered as the Trainer numbers its steps",
    "stale_probes_closed": "setup_note: a Probes of this process still open on the run directory (never closed) was "
                           "closed as interrupted, and its hooks removed, by a new Probes on it",
    "checkpoint_fallback": "a checkpoint that does not load, and what was used instead",
    "nonfinite_eval": "an evaluation's loss is NaN/Inf while training's last loss and every weight are finite",
    "checkpoint_nonfinite": "a framework saved a checkpoint while a weight held NaN/Inf: not written (training stopped "
                            "on it), or written and said",
}


@dataclass
class Event:
    kind: str
    severity: str = "info"
    message: str = ""
    step: int = 0
    micro_step: int = 0
    rank: int = 0
    phase: str = "setup"
    probe: str = "loop"
    model: str | None = None
    module: str | None = None
    tensor: str | None = None
    dtype: str | None = None
    value: float | None = None
    nan_count: int | None = 0  # None: present but not counted (activations, see probes/activations.py)
    posinf_count: int | None = 0
    neginf_count: int | None = 0
    numel: int = 0
    code: str | None = None  # what was checked, from CODES; the kind's own name where it has one check
    time: float = 0.0

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")
        if self.kind not in KINDS:
            raise ValueError(f"event kind {self.kind!r} is not in the schema")
        self.code = self.code or self.kind
        if self.code not in CODES or (self.code in KINDS and self.code != self.kind):
            raise ValueError(f"event code {self.code!r} is not in the vocabulary")
        self.time = self.time or time.time()

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)  # Inf/NaN values are written as Infinity/NaN


EVENT_COLUMNS = [f.name for f in fields(Event)]


class JsonlLog:
    """Append-only JSON-lines file, flushed after every record so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def write_line(self, line: str) -> None:
        self.write_lines([line])

    def write_lines(self, lines: list[str]) -> None:
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLog:
    """A JsonlLog that writes nothing: what a rank other than 0 holds for the files rank 0 alone writes."""

    def write_line(self, line: str) -> None:
        pass

    def write_lines(self, lines: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


def events_file_name(rank: int = 0, ranks: int = 1) -> str:
    """events.jsonl of a single process; under torchrun one file per rank, events.rank{N}.jsonl."""
    return "events.jsonl" if ranks <= 1 else f"events.rank{rank}.jsonl"


class EventLog:
    """Where probes and the loop record events; listeners (the terminal alert) see each as it happens."""

    def __init__(self, path: Path | None = None, rank: int = 0):
        self.rank = rank
        self.events: list[Event] = []
        self._file = JsonlLog(path) if path else None
        self._listeners: list[Callable[[Event], None]] = []
        self._said: set[str] = set()  # the codes of the checks said once per run (`say_once`)

    def on_event(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def record(self, kind: str, severity: str = "info", message: str = "", **fields_: Any) -> Event:
        event = Event(kind=kind, severity=severity, message=message, rank=self.rank, **fields_)
        self.events.append(event)
        if self._file:
            self._file.write_line(event.to_json())
        for listener in self._listeners:
            listener(event)
        return event

    def said_before(self, codes) -> None:
        """The codes a run already holds, from the log this one continues: a check said once per run is not said again
        by the next Probes on it (a notebook cell run again, a second `train()`)."""
        self._said.update(codes)

    def say_once(self, code: str) -> bool:
        """True the first time a check said once per run asks with its `code`, False after — whichever probe found
        it (an optimizer stepped twice is seen by the step hooks and by the loss scaler alike). Asked before the
        message is built: building it may cost a read of the device."""
        if code in self._said:
            return False
        self._said.add(code)
        return True

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.events))

    def close(self) -> None:
        if self._file:
            self._file.close()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a crash mid-write) is dropped, any other bad line raises."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def events_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Events as a DataFrame with the schema's columns in order (value as float: 'inf' back to inf; the
    non-finite counts nullable, null where a probe saw the values but did not count them)."""
    frame = pd.DataFrame(list(rows), columns=EVENT_COLUMNS)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    for col in ("step", "micro_step", "rank", "numel"):
        frame[col] = frame[col].fillna(0).astype("int64")
    for col in ("nan_count", "posinf_count", "neginf_count"):
        frame[col] = frame[col].astype("Int64")  # null: not counted
    frame["code"] = frame["code"].astype("object").where(frame["code"].notna(), frame["kind"])  # older logs
    return frame
