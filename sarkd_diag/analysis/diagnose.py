"""From events to causes: the root cause first, each with where, when, the evidence and the fix.

The diagnosis is a set of small rules, one per cause (`RULES`). Each reads event codes and numbers —
never a message — and returns the causes it finds, located (model, module or tensor, first step) wherever
the data has a place, with its evidence. `rank` then chooses among them, in this one place:

1. Critical before warning; then by when the cause showed — its step, and within a step the phase
   (forward, backward, then optimizer: a step's forward runs before its update); ties by `CAUSE_ORDER`,
   which puts explanations before the failures they produce (bad data, a teacher that overflows, an eps
   that is 0 before the non-finite weights they cause).
2. The first cause is the root. A later cause that a non-finite value or a blow-up can produce
   (`SYMPTOM_CAPABLE`: an activation or gradient overflow, a loss-scale collapse, a divergence, gradients
   that stop reaching the weights) is taken
   for its symptom: it leaves the list and is named in the root's evidence (`followed_by`).
3. The causes are split by code. `CAUSES` — the numerical failures a precision run can show, the run-directory
   contract's nine codes — make `diagnosis`; every other code is a finding about the loop or the setup (a
   gradient never cleared, an lr of 0, a KD temperature below 1) and goes to `findings`. A run that failed
   because of a finding still shows its failure among the causes: the first numerical symptom of a finding's
   root stays, explained by it (`explained_by`), with the root's fix.

Fixes are written in the caller's own terms (`PHRASES`): `train`'s options on the command line, torch and
`Probes` arguments in a hand-written loop, `TrainingArguments` fields under the Trainer, the Accelerator's
settings under accelerate — never an option the caller does not have.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pandas as pd

from ..contract.config import CALLERS
from ..contract.numerics import (
    EXTREME_UPDATE_RATIO,
    FP16_MAX,
    FP16_TINY,
    HEALTHY_UPDATE_RATIO,
    KD_TARGETS_WARNING,
    NONNEGATIVE_TERMS,
    TINY_UPDATE_RATIO,
    number_or_none,
)

# The numerical causes: what summary.json's `diagnosis` lists (docs/run-directory.md, the contract's nine codes).
# Every other rule's code is a finding about the loop or the setup — it can explain a numerical failure, and is
# listed apart (`Diagnosis.findings`, summary.json's `findings`)
CAUSES = frozenset({"optimizer_eps_underflow", "optimizer_state_underflow", "activation_overflow", "gradient_overflow",
                    "loss_scale_collapse", "update_underflow", "teacher_overflow", "nonfinite_input", "divergence"})
CAUSE_ORDER = (
    "nonfinite_input", "weights_edited", "scaler_fp16_weights", "scaler_bypassed", "optimizer_stepped_twice",
    "gradients_not_cleared", "micro_batches_summed", "accumulation_unmatched", "loss_backpropagated_twice",
    "teacher_overflow", "teacher_dropout",
    "optimizer_eps_underflow", "optimizer_state_underflow", "optimizer_nonfinite", "lr_negative", "lr_zero",
    "weight_collapse", "weight_decay_lost", "clip_before_unscale", "divergence", "activation_overflow",
    "gradient_overflow", "loss_scale_collapse", "no_gradients", "update_underflow", "updates_too_small",
    "second_moment_decay", "kd_targets_few", "kd_temperature_low", "kd_input_invalid", "loss_term_negative",
    "kd_reduction_mean", "padding_in_targets",
)
# no gradients after a critical non-finite failure: a loop that guards its loss (`if not torch.isfinite(loss): return
# None` in Lightning, `continue` in a loop) skips the backward of every batch the failure poisons
SYMPTOM_CAPABLE = {"activation_overflow", "gradient_overflow", "loss_scale_collapse", "divergence", "no_gradients"}
PHASE_ORDER = {"setup": 0, "forward": 1, "loss": 2, "backward": 3, "optimizer": 4, "policy": 5, "eval": 6}
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
DIVERGENCE_FACTOR = 3.0  # a training loss above 3x its first value is a blow-up
# ... unless the run's losses scatter more than that from batch to batch (a regression loss over a few samples varies
# tenfold): then the blow-up must stand LOSS_SCATTER_Z robust spreads of the step-to-step log changes above the first
# value (`RunRecord.blow_up_factor`), judged once there are LOSS_SCATTER_MIN_CHANGES changes — a blow-up makes one
# change, which a median over three leaves out (a recovered spike makes two: over three or four changes it reads as
# scatter, as it may be — a 4-step run at batch 1 can find its first batch easy and its third 4x harder). Over two
# (a 3-step run) a lone jump reads as scatter too — three losses cannot tell a blow-up from one harder batch — while
# a steady climb, two changes alike, has none and is still a blow-up
LOSS_SCATTER_Z = 4.0
LOSS_SCATTER_MIN_CHANGES = 2
# A steady rise below the blow-up (`RunRecord.loss_trend`): the least-squares slope of the training loss over a
# window of at least LOSS_TREND_MIN_STEPS finite steps (the whole run, then its second half), LOSS_TREND_T standard
# errors above 0 — the step-to-step noise of a healthy run's losses (small batches) is what the standard error
# measures, and iid noise reaches 5 standard errors by chance about once in a thousand windows of 8 — and a fitted
# rise over the window of at least LOSS_TREND_RISE of the fitted start (a real climb, not a drift of a plateau)
LOSS_TREND_MIN_STEPS = 8
LOSS_TREND_T = 5.0
LOSS_TREND_RISE = 0.1
# A loss unbounded below (`_falling_below_zero`) keeps falling: its second half's slope at least this fraction of its
# first half's. A loss bounded below (-cosine similarity, a log-density) slows as it settles toward its floor — an
# approach at rate k over n steps keeps e^(-k n / 2) of its first half's slope, below this once k n / 2 > 0.29
SLOWEST_UNBOUNDED_FALL = 0.75
UPDATE_RATIO_MIN_STEPS = 3  # steps of a model's update ratio before its step size is judged
WEIGHT_GROWTH_FACTOR = 2.0  # the largest weight doubling within WEIGHT_GROWTH_WINDOW steps: inflated updates
WEIGHT_GROWTH_WINDOW = 10  # steps; a long healthy run may double a weight, ten steps of one do not
# The largest finite value of each dtype a run computes in other than float16 (whose overflows have their own rule)
DTYPE_MAX = {"float32": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38, "float64": 1.7976931348623157e308}
# A non-finite module output from values below DTYPE_MAX ** RANGE_EXPONENT (√max: not even a product of two of
# them overflows) is no overflow: an operation undefined on its inputs made it (0/0, log 0, inf − inf)
RANGE_EXPONENT = 0.5
# weights as wide as mixed precision's master weights (no wider dtype to train in): half an ulp relative to the weight
WIDE_WEIGHT_DTYPES = {"float32": 2.0**-24, "float64": 2.0**-53}
NARROW_WEIGHT_DTYPES = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # half an ulp, relative to the weight's value
# callers whose non-finite loss on a step without module statistics may stay so: `train` and the Trainer's callback
# replay that forward from its loss (and place it, or find every module finite); the others replay it only where the
# optimizer's pre-step hook saw its gradients non-finite (`ProbeSet.replays_steps`: no scaler skipped it, one process)
UNREPLAYED = ("loop", "accelerate", "lightning")
ROUTER_NAMES = ("gate", "router")  # an MoE router's module name ends so, or its parent's (never an expert's gate_proj)

# a loss cut off from the weights in code that calls backward itself
LOSS_CUT_OFF_IN_CODE = ("the loss is cut off from them — logits `.detach()`ed or computed under `torch.no_grad()` (a "
                        "`loss.requires_grad_()` hides that), a frozen path — or the gradients are cleared between "
                        "`backward()` and the optimizer step (`zero_grad()` before `step()`)")


# A model trained through adapters (`precision.adapted_models`: its trainable tensors hold under half its weights, the
# rest frozen — LoRA): its master weights are the trainable tensors alone, so fp32 master weights mean fp32 adapters,
# not the whole model loaded in fp32 (twice the memory of the frozen base for nothing the base needs). Each caller's
# mixed precision: its autocast (and loss scaler), over the adapters' fp32 and the frozen base's dtype
ADAPTERS_IN_FP32 = ("the trainable tensors in fp32 (LoRA adapters: PEFT's default, `get_peft_model(..., "
                    "autocast_adapter_dtype=True)`; any other: `.float()` on it)")
AUTOCAST_FP16 = {"loop": "`torch.autocast(dtype=torch.float16)` and a `torch.amp.GradScaler`",
                 "trainer": "`TrainingArguments(fp16=True)`", "accelerate": "`Accelerator(mixed_precision=\"fp16\")`",
                 "lightning": "`Trainer(precision=\"16-mixed\")`"}
AUTOCAST_BF16 = {"loop": "`torch.autocast(dtype=torch.bfloat16)`", "trainer": "`TrainingArguments(bf16=True)`",
                 "accelerate": "`Accelerator(mixed_precision=\"bf16\")`",
                 "lightning": "`Trainer(precision=\"bf16-mixed\")`"}

# what a fix tells each kind of caller to do, by concept
PHRASES = {
    "mixed": {
        "cli": "`--precision mixed`",
        "loop": "fp32 weights, `torch.autocast(dtype=torch.float16)` and a `torch.amp.GradScaler`",
        "trainer": "`TrainingArguments(fp16=True)` with the model loaded in fp32",
        "accelerate": "`Accelerator(mixed_precision=\"fp16\")` with the model in fp32",
        "lightning": "`Trainer(precision=\"16-mixed\")` with the module's weights in fp32",
    },
    "bf16_mixed": {
        "cli": "`--precision bf16-mixed`",
        "loop": "fp32 weights and `torch.autocast(dtype=torch.bfloat16)`",
        "trainer": "`TrainingArguments(bf16=True)` with the model loaded in fp32",
        "accelerate": "`Accelerator(mixed_precision=\"bf16\")` with the model in fp32",
        "lightning": "`Trainer(precision=\"bf16-mixed\")` with the module's weights in fp32",
    },
    "mixed_adapters": {"cli": "`--precision mixed`",
                       **{caller: f"{autocast} with {ADAPTERS_IN_FP32} over the frozen weights in float16"
                          for caller, autocast in AUTOCAST_FP16.items()}},
    "bf16_mixed_adapters": {"cli": "`--precision bf16-mixed`",
                            **{caller: f"{autocast} with {ADAPTERS_IN_FP32} over the frozen weights in bfloat16"
                               for caller, autocast in AUTOCAST_BF16.items()}},
    # how a frozen teacher is kept in eval mode, where the caller's code switches modes
    "teacher_eval": {
        "cli": "`train` holds the teacher in eval mode itself: report this",
        "loop": "call `teacher.eval()` before the loop, and again after any `.train()` that reaches it (a module "
                "holding both models switches the teacher with the student)",
        "trainer": "call `teacher.eval()` before `trainer.train()`; a teacher held inside the trained model is "
                   "switched to train mode with it at every step — hold it outside the model",
        "accelerate": "call `teacher.eval()` before the loop, and again after any `.train()` that reaches it (a "
                      "module holding both models switches the teacher with the student)",
        "lightning": "call `self.teacher.eval()` in `on_train_epoch_start` and `on_validation_end`: Lightning's "
                     "`train()` on the LightningModule reaches a teacher held as its attribute",
    },
    # the KD term's softmax temperature
    "temperature_option": {caller: "--temperature" if caller == "cli" else "the KD loss's temperature"
                           for caller in CALLERS},
    # the length of the text blocks the models read
    "block_size": {caller: "--block-size" if caller == "cli" else "the sequence length" for caller in CALLERS},
    # the weights a loss scaler needs in fp32, where a model's were loaded in float16
    "fp32_weights": dict.fromkeys(CALLERS, "load the model in fp32 (no `.half()`, no `torch_dtype=torch.float16`) and "
                                           "let autocast compute in float16"),
    "fp32_weights_adapters": dict.fromkeys(CALLERS, "keep the trainable tensors (the adapters) in fp32 over the "
                                                    "frozen float16 weights"),
    "fp32_teacher": {
        "cli": "`--precision bf16-mixed` (the teacher in bf16) or `--precision fp32`",
        "loop": "the teacher loaded in bfloat16 or float32 instead of float16",
        "trainer": "the teacher model loaded in bfloat16 or float32 instead of float16",
        "accelerate": "the teacher loaded in bfloat16 or float32 instead of float16",
        "lightning": "the teacher loaded in bfloat16 or float32 instead of float16",
    },
    # a teacher whose weights are wider than float16 overflows float16 only where a float16 autocast computes its
    # forward: taking that forward out of the autocast is the remedy, not loading the teacher in another dtype
    "teacher_out_of_fp16_autocast": {
        "cli": "compute the teacher in a wider dtype — `--precision bf16-mixed` (the teacher in bf16) or `--precision "
               "fp32`",
        "loop": "its weights are wider already, but its forward runs under the loop's float16 autocast, which casts "
                "them to float16 at each matmul: take the teacher's forward out of it — under "
                "`torch.autocast(device_type, enabled=False)` — or give it `torch.autocast(dtype=torch.bfloat16)`",
        "trainer": "its weights are wider already, but `TrainingArguments(fp16=True)` autocasts all of `compute_loss`, "
                   "the teacher's forward with it: run that forward under `torch.autocast(device_type, "
                   "enabled=False)`, or train with `TrainingArguments(bf16=True)`",
        "accelerate": "its weights are wider already, but its forward runs under the float16 autocast of "
                      "`Accelerator(mixed_precision=\"fp16\")` (a model it prepared, or `accelerator.autocast()`): "
                      "take the teacher's forward out of it — under `torch.autocast(device_type, enabled=False)`, the "
                      "teacher not prepared — or use `Accelerator(mixed_precision=\"bf16\")`",
        "lightning": "its weights are wider already, but `Trainer(precision=\"16-mixed\")` autocasts all of "
                     "`training_step`, the teacher's forward with it: run that forward under "
                     "`torch.autocast(device_type, enabled=False)`, or train with `Trainer(precision=\"bf16-mixed\")`",
    },
    "wide_compute": {
        "cli": "`--precision bf16-mixed` or `--precision fp32`",
        "loop": "the model loaded in float32 (or bfloat16) and no float16 autocast — "
                "`torch.autocast(dtype=torch.bfloat16)` if you want one",
        "trainer": "`TrainingArguments(bf16=True)` (or neither fp16 nor bf16) with the model loaded in fp32",
        "accelerate": "`Accelerator(mixed_precision=\"bf16\")` (or \"no\") with the model in fp32",
        "lightning": "`Trainer(precision=\"bf16-mixed\")` (or \"32-true\") with the module's weights in fp32",
    },
    "weight_decay": {"cli": "`--weight-decay`", "loop": "the optimizer's `weight_decay`",
                     "trainer": "`weight_decay`", "accelerate": "the optimizer's `weight_decay`",
                     "lightning": "the optimizer's `weight_decay` (`configure_optimizers`)"},
    "lr": {"cli": "`--student-lr`", "loop": "the optimizer's `lr`", "trainer": "`learning_rate`",
           "accelerate": "the optimizer's `lr`", "lightning": "the optimizer's `lr` (`configure_optimizers`)"},
    # the lr of what a teacher trains: in `train` its routers (SAR), at their own option, never the student's
    "teacher_lr": {"cli": "`--router-lr`", "loop": "the lr of the teacher's parameter group",
                   "trainer": "the lr of the teacher's parameter group (`optimizers=`)",
                   "accelerate": "the lr of the teacher's parameter group",
                   "lightning": "the lr of the teacher's parameter group (`configure_optimizers`)"},
    "clip": {"cli": "`--max-grad-norm`", "loop": "`torch.nn.utils.clip_grad_norm_`", "trainer": "`max_grad_norm`",
             "accelerate": "`accelerator.clip_grad_norm_`", "lightning": "`Trainer(gradient_clip_val=...)`"},
    "loss_weights": {"cli": "`--alpha-kd`/`--alpha-ce`", "loop": "the weights of the loss's terms",
                     "trainer": "the weights of the loss's terms", "accelerate": "the weights of the loss's terms",
                     "lightning": "the weights of the loss's terms"},
    # the weights of what reaches a teacher's trainable tensors: in `train` the router terms (SAR) and the KD term
    "teacher_loss_weights": {
        "cli": "`--router-load-balance-weight`/`--router-entropy-weight`/`--router-anchor-weight` (the router terms) "
               "and `--alpha-kd`",
        "loop": "the weights of the loss's terms that reach the teacher",
        "trainer": "the weights of the loss's terms that reach the teacher",
        "accelerate": "the weights of the loss's terms that reach the teacher",
        "lightning": "the weights of the loss's terms that reach the teacher",
    },
    "unscale_then_clip": {
        "cli": "`train`'s own order (it unscales before it clips)",
        "loop": "`scaler.unscale_(optimizer)` right before `torch.nn.utils.clip_grad_norm_`",
        "trainer": "the Trainer's own clipping (`max_grad_norm`), which unscales first",
        "accelerate": "`accelerator.clip_grad_norm_`, which unscales first, instead of torch's",
        "lightning": "`Trainer(gradient_clip_val=...)`, which unscales first, instead of clipping in the module — "
                     "with manual optimization (which that option does not serve), `self.clip_gradients(...)` in the "
                     "module's `on_before_optimizer_step`, which Lightning calls once it has unscaled, not before "
                     "`opt.step()`",
    },
    # where a loss scaler's starting scale is set
    "init_scale": {
        "cli": "`train` starts its loss scaler at 2**16 itself and lowers it only on overflow: report this",
        "loop": "`torch.amp.GradScaler(init_scale=...)` (its default, 2**16)",
        "trainer": "the scaler's `init_scale` (accelerate's `GradScalerKwargs`; its default, 2**16)",
        "accelerate": "`GradScalerKwargs(init_scale=...)` in `Accelerator(kwargs_handlers=[...])` (its default, 2**16)",
        "lightning": "the `torch.amp.GradScaler(init_scale=...)` given to `MixedPrecision(..., scaler=...)` (its "
                     "default, 2**16)",
    },
    # where the gradients a step used are cleared before the next backward adds to them
    "clear_gradients": {
        "cli": "`train`'s own `zero_grad()` after each step",
        "loop": "`optimizer.zero_grad()` after each `optimizer.step()` (`scaler.step(optimizer)`), or before each "
                "step's first `backward()`",
        "trainer": "the Trainer's own `model.zero_grad()` after each optimizer step — an override of `training_step` "
                   "or of the optimizer's step that skips it keeps them",
        "accelerate": "`optimizer.zero_grad()` after each `optimizer.step()` (inside `accelerator.accumulate`, on "
                      "every batch: the wrapper clears only when it steps)",
        "lightning": "Lightning's own `zero_grad()` after each step — with manual optimization, `opt.zero_grad()` "
                     "in `training_step`",
    },
    # where each micro-batch's loss is divided by their count before its backward
    "divide_micro_batch_losses": {
        "cli": "`train`'s own division of each micro-batch's loss by their count",
        "loop": "`(loss / accumulation_steps).backward()`",
        "trainer": "the Trainer's own division by `gradient_accumulation_steps` — an override of `training_step` that "
                   "backpropagates the loss itself skips it: `self.accelerator.backward(loss / "
                   "self.args.gradient_accumulation_steps)`",
        "accelerate": "`accelerator.backward(loss)` inside `with accelerator.accumulate(model):`, which divides it by "
                      "the Accelerator's `gradient_accumulation_steps`",
        "lightning": "`Trainer(accumulate_grad_batches=N)` with automatic optimization, which divides each batch's "
                     "loss — with manual optimization, `self.manual_backward(loss / accumulation_steps)`",
    },
    # what cuts a loss off from the weights, in the code each caller writes around the backward
    "loss_cut_off": {
        # `train`'s own loss is never detached: what reaches the student is its loss times the options' weights
        "cli": "`train` cuts no loss off itself — its loss reaches the student weighted by `--alpha-kd`/`--alpha-ce`, "
               "and weights that small make every gradient round to 0 (float16 holds nothing below 6e-8, even times "
               "the loss scale) — raise them; or the model's own code (`--trust-remote-code`) detaches its outputs",
        "loop": LOSS_CUT_OFF_IN_CODE,
        "trainer": "the loss your `compute_loss` returns is cut off from them — the model's outputs `.detach()`ed or "
                   "computed under `torch.no_grad()` (a `loss.requires_grad_()` hides that), or returned as a new "
                   "tensor (`torch.tensor(loss.item())`) — or a callback clears the gradients before the optimizer "
                   "step (`model.zero_grad()` in `on_pre_optimizer_step`)",
        "accelerate": "the loss is cut off from them — outputs `.detach()`ed or computed under `torch.no_grad()` (a "
                      "`loss.requires_grad_()` hides that), a frozen path — or the gradients are cleared between "
                      "`accelerator.backward(loss)` and `optimizer.step()`",
        "lightning": "the loss your `training_step` returns is cut off from them — outputs `.detach()`ed or computed "
                     "under `torch.no_grad()` (a `loss.requires_grad_()` hides that) — or the gradients are cleared "
                     "before the optimizer step (`zero_grad()` in `on_before_optimizer_step`)",
    },
    "skip_call": {"cli": "`--on-nonfinite skip` skipped each one",
                  "loop": "the loop called `probes.step(skipped=True)` on each (a guard that drops every batch)",
                  "trainer": "each step was closed as skipped (a guard that drops every batch)",
                  "accelerate": "the loop called `probes.step(skipped=True)` on each (a guard that drops every batch)",
                  "lightning": "`training_step` returned None on every batch (a missing `return loss`, or a guard "
                               "that drops every batch)"},
    # a change to the model's code: offered where the caller writes it, not to `train`, which runs checkpoints as
    # they are
    "op_in_fp32": {"cli": "", **dict.fromkeys(("loop", "trainer", "accelerate", "lightning"),
                                              ", or keep this op in fp32 under autocast (`torch.autocast(..., "
                                              "enabled=False)` around it, its inputs `.float()`)")},
    "router_in_fp32": {"cli": "", **dict.fromkeys(("loop", "trainer", "accelerate", "lightning"),
                                                  ", or compute the router in fp32 (its weights and matmul outside "
                                                  "float16 autocast, as MoE training in float16 does)")},
    # how a schedule advances once per optimizer step, where a warm-up stepped once per epoch holds its lr at 0
    "schedule_per_step": {
        "cli": "`train`'s own schedule, which advances every optimizer step",
        "loop": "`scheduler.step()` after every `optimizer.step()`, not once per epoch",
        "trainer": "a scheduler the Trainer steps (`optimizers=(optimizer, scheduler)`), not one a callback steps once "
                   "per epoch",
        "accelerate": "`scheduler.step()` after every `optimizer.step()`, not once per epoch",
        "lightning": "`\"interval\": \"step\"` in the `lr_scheduler` dict `configure_optimizers` returns (its default, "
                     "`\"epoch\"`, steps a warm-up once per epoch)",
    },
    "full_probes": {"cli": "`--probes full`", "loop": "`Probes(..., level=\"full\")`",
                    "trainer": "`SarkdDiagCallback(..., level=\"full\")`",
                    "accelerate": "`Probes.from_accelerator(..., level=\"full\")`",
                    "lightning": "`SarkdDiagLightningCallback(..., level=\"full\")`"},
    "hand_loss": {"cli": "`probes.step(loss=loss)`", "loop": "`probes.step(loss=loss)`",
                  "trainer": "the loss `compute_loss` returns", "accelerate": "`probes.step(loss=loss)`",
                  "lightning": "the loss `training_step` returns"},
}

# every gradient non-finite at once, from values far from the dtype's range: what came from the loss, not an overflow
# where a loss far above a per-token mean could be either: a sum, or a mean of outputs gone that large
SUM_TOO = "; or, if the loss is a sum over the tokens (`reduction=\"sum\"`), divide it by the number of target tokens"
AT_LOSS_END = ("every gradient turned {{holds}} at once in backward, in {{dtype}}, from values nowhere near "
               "{{dtype}}'s range (the largest measured up to it {{amax}}): not an overflow — the non-finite value "
               "entered at the loss end, {origin}; keep the loss's inputs off such points (`x.clamp_min(eps)`, "
               "`(x + eps).sqrt()`, `log_softmax` rather than the log of a softmax); a precision change, a loss "
               "scaler or lowering {{lr}} will not help")

# where the loss's own operation (`singular_derivative`) meets its singular point, and how to keep it off: the text the
# fixes naming that operation share
SINGULAR_POINTS = ("(sqrt or pow below 1 of exactly 0: an RMSE or a distance between equal tensors, as when a student "
                   "starts from its teacher's weights{never_moved}; a log or division at 0)")
KEEP_OFF_THE_POINT = ("keep its input off it (`(x + eps).sqrt()`, `x.clamp_min(eps)`, the squared distance instead of "
                      "the distance)")
UNDER_A_SCALER = ", which the skipped steps never move"  # a loss scaler skips every step: the student stays the copy
# skips that no scale ends: the loss's own operation at its singular point
SINGULAR_AT_ANY_SCALE = (" — unless the loss's own computation makes them: it applies {operation}, whose gradient is "
                         "non-finite at any scale where its input sits at its singular point "
                         + SINGULAR_POINTS.format(never_moved=UNDER_A_SCALER) + " — check that input first")

# what float16 cannot hold in a module's own code, and the fix: the text two fixes of `activation_overflow` share
FP16_CONSTANTS = ("a constant of its code that float16 cannot hold — a mask's fill value beyond 65504 "
                  "(`masked_fill(mask, -1e9)`, `torch.finfo(torch.float32).min`, an additive mask `(1 - mask) * -1e9`) "
                  "is -inf in float16, and a row whose every position is masked is then 0/0 in the softmax; an eps "
                  "below 6e-8 (a norm's 1e-12) is 0 and a division by it Inf — fill with "
                  "`torch.finfo(scores.dtype).min` (or a constant float16 holds, such as -1e4) and use an eps float16 "
                  "holds (1e-5); if its code writes no such constant, a sum of many products overflowed: compute with "
                  "fp32's range — {wide_compute}")

FIXES = {
    "optimizer_eps_underflow": "train with {mixed}: fp32 master weights and optimizer state keep eps={eps} "
                               "representable (in pure fp16 a larger eps avoids the NaNs but updates stagnate)",
    "optimizer_eps_zero": "the optimizer's eps is 0: wherever a second moment is 0 (a gradient entry exactly 0 — an "
                          "embedding row not in the batch, a dead unit) Adam divides 0 by 0 and the weight turns NaN — "
                          "set eps > 0 (1e-8 is the default); precision and the learning rate are not the cause",
    "optimizer_lr_nonfinite": "the learning rate of {group} is {lr_value} from step {step}: the optimizer turns every "
                              "weight it updates NaN whatever the gradients — check the schedule (a division by a "
                              "warm-up or total of 0, a decay run past its end) and the value given to {lr}",
    "optimizer_state_overflow": "the optimizer's state of {tensor} (a momentum buffer, Adam's moments) overflowed "
                                "float16 though every gradient was finite: held in float16, a momentum buffer sums "
                                "gradients past 65504 (and a second moment squares any above 256) — keep the "
                                "optimizer state in fp32: train with {mixed} (fp32 master weights and optimizer "
                                "state); the learning rate is not the cause",
    "optimizer_state_frozen": "{model}'s {tensor}: Adam's second moment (exp_avg_sq, in {dtype}) holds Inf in {frozen} "
                              "of its entries by step {step}, the weight finite — a gradient entry once squared past "
                              "{dtype}'s range (a gradient beyond ~{limit}), and from then on those entries' update is "
                              "m / √Inf = 0: they never train again, silently (their updates read as lost). Find what "
                              "made a gradient that large (a loss scaled by a huge factor, a gradient hook), clip with "
                              "{clip}, and start the optimizer state afresh — rebuild the optimizer, or resume from a "
                              "checkpoint before it; a lower {lr} will not help",
    "optimizer_nonfinite": "the optimizer step made the weights NaN from finite gradients: its own numbers did, not "
                           "the model or the data — check its hyperparameters ({lr}, eps > 0, betas below 1) and its "
                           "state (moments loaded from elsewhere, a custom optimizer's arithmetic)",
    "lr_zero": "the learning rate of {group} is 0 on every step since step {step}: the optimizer changes no weight "
               "and the loss cannot move — check the schedule (a total or warm-up step count of 0, such as a "
               "`num_training_steps` computed from an empty or mis-sized loader; a decay that ended before the run) "
               "and the value given to {lr}",
    "lr_zero_ended": "the learning rate of {group} was 0 on every step from {step} to {last} ({steps} steps) and "
                     "rose only at step {rose} (to {lr_after}): those steps changed no weight — a warm-up that starts "
                     "at 0 and advances once per epoch instead of once per optimizer step, or a delay longer than "
                     "meant; advance it every step — {schedule_per_step} — or start it above 0",
    "lr_negative": "the learning rate of {group} is {lr_value}, below 0, from step {step}: the optimizer steps up "
                   "the gradient and the loss climbs ({loss_then} at step {step}, {loss_last} at step {last}) with "
                   "every value finite — check the schedule (a linear decay such as `1 - step / total` run past its "
                   "total, a total computed for fewer steps or epochs than the run: clamp it with `max(0.0, ...)`; a "
                   "sign error) and the value given to {lr}; precision is not the cause",
    "weight_collapse_decay": "weight decay collapses the weights of {group}: each step multiplies every weight "
                             "by 1 − lr × weight_decay = {factor} (lr × weight_decay = {decay}; "
                             "healthy ~1e-5), and the largest weight fell from {before} to {after} by step "
                             "{step} — lower {weight_decay} (AdamW's usual 0.01–0.1 at lr 1e-4–1e-3); precision "
                             "is not the cause",
    "weight_collapse": "the weights shrink toward zero instead of training: the largest weight fell from "
                       "{before} to {after} within {window} steps by step {step}, every weight finite and no "
                       "update extreme — weight decay too strong for the learning rate (with Adam's coupled L2 the "
                       "decay term outweighs the gradient), or code that rescales the weights: lower "
                       "{weight_decay}; precision is not the cause",
    "weight_decay_lost": "weight decay does nothing: each step multiplies the {dtype} weights of {group} by {factor} "
                         "(lr × weight_decay = {decay}), a change below half an ulp of most of them, so they round "
                         "back unchanged — keep fp32 master weights, where the decay applies: train with {mixed} or "
                         "{bf16_mixed}; or set {weight_decay} to 0 and say so",
    "weight_decay_lost_wide": "weight decay does nothing: lr × weight_decay = {decay} is below half an ulp of the "
                              "{dtype} weights of {group} (~{half_ulp} of a weight), so each step's decay rounds "
                              "away — a mistyped {weight_decay} (an exponent off); precision is not the cause",
    "second_moment_decay_lost": "Adam's second moment never decays: each step multiplies the {dtype} exp_avg_sq of "
                                "{group} by β2 = {beta2}, a change below half an ulp of its values, so it rounds back "
                                "unchanged — the moment only grows, and freezes once (1 − β2)·g² rounds away too, so "
                                "Adam stops following the gradients' scale and its steps shrink as the gradients do — "
                                "keep the optimizer state in fp32 (fp32 master weights: train with {bf16_mixed}), or "
                                "a β2 of {keeps} or below (0.95 is common for LLMs), whose decay {dtype} keeps",
    "optimizer_state_underflow": "keep the optimizer state in fp32 — train with {mixed} or {bf16_mixed}: fp32 "
                                 "master weights and fp32 Adam moments; with the state in {dtype}, Adam divides by eps "
                                 "alone and its updates grow instead of shrinking",
    "optimizer_state_underflow_warning": "keep the optimizer state in fp32 — train with {mixed} or {bf16_mixed}: "
                                         "fp32 master weights and fp32 Adam moments",
    "gradients_below_fp32": "the squared gradients of {tensor} flush to zero in the {dtype} optimizer state, and "
                            "{share} of them would in a float32 state too: the gradients themselves are vanishingly "
                            "small, so no precision keeps them (and an update below half an ulp of the weights is "
                            "lost in fp32 master weights as well) — the step size is the problem, not the precision: "
                            "check {loss_weights} (a weight all but 0), {clip_option} (a threshold that shrinks every "
                            "gradient to almost nothing) and {lr}",
    "activation_overflow": "{module} overflows {dtype}: train with {bf16_mixed} (fp32's range){op_in_fp32}; a loss "
                           "scaler cannot fix a forward overflow",
    "activation_overflow_fp16": "{module} overflows float16 — a value beyond its 65504, or a division by a value "
                                "that rounds to 0 in it (an eps below 6e-8, such as a norm's 1e-12, is 0 in "
                                "float16): train with {bf16_mixed} (fp32's range and smallest values){op_in_fp32}; a "
                                "loss scaler cannot fix a forward overflow",
    "activation_zeroed_fp16": "{module}'s float16 output is exactly 0 everywhere from finite inputs, yet run again "
                              "in float32 on the same inputs and weights it reaches {wide_amax}: an intermediate it "
                              "computes leaves float16's range with no NaN to show it — the square of a value above "
                              "256 is Inf (a norm's mean(x²)), and x / √Inf is 0 — so nothing after it depends on the "
                              "input and no gradient passes back through it: train with {bf16_mixed} (fp32's "
                              "range){op_in_fp32} — transformers' norms square their input `.float()` —, "
                              "or scale down what makes its inputs that large",
    "router_overflow_fp16": "{module}, an MoE router, overflows float16: its logits need fp32's range — train with "
                            "{bf16_mixed}{router_in_fp32}; a loss scaler cannot fix a forward overflow",
    "activation_fp16_constant": "{module} made {holds} in float16 from values far below float16's range (the "
                                "largest measured {amax}): most likely " + FP16_CONSTANTS + "; or an operation "
                                "undefined on its inputs made it in any precision (the sqrt or log of a negative, "
                                "0/0): where the same run under {wide_compute} is NaN at {module} too, guard that "
                                "operation (`clamp_min`) instead",
    "activation_fp16_constant_replayed": "{module} made {holds} in float16 from values far below float16's range "
                                         "(the largest measured {amax}), and run again in float32 on the same inputs "
                                         "and weights it is finite (largest {wide_amax}): not an operation undefined "
                                         "on its inputs but " + FP16_CONSTANTS,
    "activation_overflow_unplaced": "the loss turned non-finite under float16 compute on a step without module "
                                    "statistics — most likely a forward output beyond float16's range: "
                                    "{full_probes} names the module; {bf16_mixed} avoids it (fp32's range); a loss "
                                    "scaler cannot fix a forward overflow",
    "fp16_risk": "{module} exceeds fp16's range in {dtype}: prefer {bf16_mixed} over fp16 compute for this model",
    "gradient_overflow": "gradients overflow {dtype} with nothing to catch them: train with {mixed} (dynamic "
                         "loss scaling skips overflowing steps) or {bf16_mixed}; lower {lr} or clip with {clip} if "
                         "it persists",
    "gradient_overflow_norm_eps": "the gradients turn non-finite first at {module}, a float16 normalisation with eps "
                                  "{eps}: a row whose variance is 0 (a constant or zeroed row — padding, a dropped "
                                  "position) is normalised by 1/√eps = {divisor}, beyond float16's 65504, and its "
                                  "backward makes Inf and NaN — raise the eps to one float16 serves (1e-5: the "
                                  "config's `layer_norm_eps` / `rms_norm_eps`, or the module's `eps`), or keep the "
                                  "norms in fp32: train with {mixed}",
    "loss_scale_collapse": "gradients overflow fp16 even at a small loss scale, from {module} backwards: the "
                           "loss or its gradients are too large for fp16 — lower {loss_weights} or {lr}, or "
                           "train with {bf16_mixed} (fp32's range)",
    "loss_scale_collapse_sum": "gradients overflow fp16 even at a small loss scale, from {module} backwards, and the "
                               "loss itself reaches {largest} — far above a per-token mean (a cross-entropy or a KL "
                               "per token is at most about the log of the vocabulary): a sum over the tokens "
                               "(`reduction=\"sum\"`, or a sum over the vocabulary and the tokens), whose gradients "
                               "are as many times a mean's — divide it by the number of target tokens "
                               "(`reduction=\"mean\"`, or the sum over the vocabulary divided by the tokens), or "
                               "lower {loss_weights} if a term is weighted that high; precision is not the cause",
    "loss_scale_collapse_large_outputs": "gradients overflow fp16 even at a small loss scale, from {module} "
                                         "backwards, and the loss itself reaches {largest} while {output_model}'s "
                                         "module outputs reach {outputs}: a cross-entropy or a KL per token can be as "
                                         "large as the spread of its logits, so outputs that large make a per-token "
                                         "loss that large, no sum needed — find what made them so large (weights "
                                         "initialised or scaled far beyond the rest, such as new embedding rows after "
                                         "`resize_token_embeddings` given a large init; a checkpoint loaded wrong) "
                                         "and bring them to the others' size{sum_too}; precision is not the cause",
    "loss_scale_collapse_singular": "the loss scale fell below 1 and the gradients stay non-finite, from {module} "
                                    "backwards, while the loss is at most {largest}: at such a scale no such loss's "
                                    "gradients overflow fp16 — the loss's own computation applies {operation}, whose "
                                    "gradient is non-finite at any scale where its input sits at its singular point "
                                    + SINGULAR_POINTS.format(never_moved=UNDER_A_SCALER) + "; " + KEEP_OFF_THE_POINT
                                    + "; precision is not the cause",
    "loss_scale_collapse_unplaced": "gradients overflow fp16 every few steps: lower {loss_weights} or {lr}, or "
                                    "train with {bf16_mixed}; {full_probes} names the overflowing module",
    "gradient_underflow": "gradients flush to zero in {dtype} without a loss scaler ({tensor} backwards): scale the "
                          "loss — train with {mixed} — or with {bf16_mixed} (fp32's range)",
    "frozen_writes_lost": "{model} is written between steps by the loop's own code, not by an optimizer — an EMA or "
                          "average of the student's weights written into it in place — and {share} of the written "
                          "values came back unchanged: in {dtype} a change below half an ulp of a weight (~{half_ulp} "
                          "of its value) rounds away, and an EMA with momentum m moves each weight by (1 − m) × its "
                          "distance to the student's, far below that, so {model} stays where it started — keep the "
                          "average in fp32 (an fp32 copy of {model}'s weights updated in place and cast to {dtype} for "
                          "its forward, or the whole of {model} in fp32)",
    "gradient_underflow_low_scale": "gradients flush to zero in {dtype} ({tensor} backwards, from step {step}): the "
                                    "loss scaler ran at a scale of {scale}, which multiplies nothing up, so the "
                                    "backward flushes what it would flush unscaled (below 6e-8) — start the scale high "
                                    "and let it back off on overflow: {init_scale}; or train with {bf16_mixed} "
                                    "(fp32's range)",
    "no_gradients": "no gradient reaches the weights ({tensor} and most others: none, or all zero, at the optimizer "
                    "step since step {step}) and no flush of an unscaled float16 backward explains it: {loss_cut_off}; "
                    "nothing trains",
    "no_gradients_zero_activation": "no gradient reaches most weights, and {module}'s output is exactly 0 everywhere "
                                    "(from step {step}) where the modules before it were not: nothing after it "
                                    "depends on the input, so the loss is constant and no gradient passes back "
                                    "through it — look at what zeroes it: a Dropout with p=1.0 on its input (a "
                                    "dropout probability of 1, or a keep-probability passed as `p`), a mask or gate "
                                    "that multiplies by 0, a scale of 0, ReLUs that all died; the learning rate and "
                                    "the precision are not the cause",
    "no_gradients_zero_loss": "the loss is exactly 0 from step {step}, where every gradient is 0, so nothing trains — "
                              "and nothing is broken: that is the loss's minimum (a student identical to its teacher "
                              "has a KD term of exactly 0; a cross-entropy whose probabilities saturated at 1 is 0). "
                              "If the run should learn, check what makes it 0: a teacher that is the student itself, "
                              "or {loss_weights} set to 0",
    "no_gradients_zero_loss_alone": "the loss is exactly 0 from step {step}, where every gradient is 0, so "
                                    "nothing trains: with no teacher to match, a loss of exactly 0 from the start is "
                                    "a product with 0 — {loss_weights} set to 0, or a policy-gradient objective "
                                    "(GRPO, RLOO) whose advantages are all 0: every completion of a prompt earned the "
                                    "same reward, so none is preferred — check what the reward function returns (a "
                                    "format it never matches scores every completion 0) and that its rewards differ "
                                    "between completions",
    "no_gradients_unoptimized": "the optimizer holds none of {model}'s trainable tensors ({tensor} and the rest): it "
                                "was built from other parameters — another model, a copy, or the model before it was "
                                "re-created or wrapped (adapters added after the optimizer was made) — so its steps "
                                "change nothing of {model} and the loss cannot move; build the optimizer from this "
                                "model's `parameters()` after the last wrap",
    "no_gradients_frozen": "{model} is frozen: the optimizer holds its tensors ({tensor} and the rest) but none "
                           "requires grad, so backward gives them no gradient and its steps change nothing — a "
                           "`requires_grad_(False)` (or `p.requires_grad = False`; often one meant for the teacher) "
                           "reached it, or a wrapper froze it; make what should train trainable again "
                           "(`requires_grad_(True)` on it, or on the adapters meant to train) before the optimizer "
                           "steps",
    "no_gradients_no_step": "the optimizer never stepped in the {steps} steps of the run: the gradients reached the "
                            "weights but nothing applied them — call `optimizer.step()` after `backward()` (with "
                            "gradient accumulation, check that the condition that steps it holds within the run), "
                            "and `probes.step()` after it",
    "no_gradients_clip_zero": "the loop clips the gradients at {threshold} ({steps} steps, from step {step}): "
                              "{how}, so at 0 every gradient reaching the optimizer is 0 and nothing trains — clip at "
                              "a positive threshold (1.0 is usual), or not at all; the lr, the precision and the data "
                              "are not the cause",
    "no_gradients_every_step_skipped": "the training loop skipped every one of the {steps} steps of the run — no "
                                       "backward, no update: {skip_call} — so nothing trained; if a guard skips "
                                       "non-finite losses, the first non-finite value is the cause (see the causes "
                                       "above), else return the loss",
    "no_gradients_scaler_never_settled": "the loss scaler skipped all {steps} steps of the run while finding its "
                                         "scale — each one overflowed, so no update was applied and nothing "
                                         "trained; it started too high for a run this short: start it at or below "
                                         "{scale} (GradScaler's `init_scale`; its default is 2**16) or run more "
                                         "steps; precision and the learning rate are not the cause{singular}",
    "optimizer_stepped_twice": "the optimizer steps twice per batch (from step {step}): every gradient is applied "
                               "twice — about twice the learning rate —{scaler} — call the optimizer's step once per "
                               "batch ({one_step}); if it is called once, call `probes.step()` after every optimizer "
                               "step",
    "scaler_bypassed": "the optimizer steps on gradients the loss scaler scaled and never unscaled (from step "
                       "{step}, scale {scale}): `optimizer.step()` is called where `scaler.step(optimizer)` "
                       "belongs, so every update applies the gradient × {scale} — SGD's and momentum's update "
                       "{scale}× too large (Adam's divides most of it away, its eps {scale}× smaller) — and a step "
                       "whose gradients overflowed is applied, not skipped: call `scaler.step(optimizer)` (it "
                       "unscales, skips an overflowing step, else calls `optimizer.step()`), then `scaler.update()`; "
                       "the learning rate is not the cause",
    "scaler_fp16_weights": "{model}'s trainable weights are float16 ({tensor} and {others} more) under a loss "
                           "scaler: GradScaler refuses to unscale float16 gradients ('Attempting to unscale FP16 "
                           "gradients' at the first optimizer step) — a loss scaler is for fp32 weights computing in "
                           "float16: {fp32_weights} — {mixed}",
    "gradients_not_cleared": "the gradients are not cleared between optimizer steps (from step {step}): each "
                             "backward adds to the gradients the step before already used, so every update applies "
                             "the sum of all gradients so far and grows with the step count{scaler} — clear them: "
                             "{clear_gradients}; the learning rate and the precision are not the cause",
    "kd_input_invalid": "F.kl_div's input holds values up to {amax}, but it takes log-probabilities (≤ 0): given "
                        "probabilities or logits, it returns no divergence — negative, or flat however the student "
                        "learns — pass `F.log_softmax(student_logits / T, dim=-1)` as its input and the teacher's "
                        "`F.softmax(teacher_logits / T, dim=-1)` as its target (or its `log_softmax` with "
                        "`log_target=True`); precision and the learning rate are not the cause",
    "loss_term_negative": "the {term} loss term is {value} at step {step}, below 0, where no {what} goes: it is no "
                          "such thing, and minimising it pushes the student away from {away} — {remedy}; "
                          "precision and the learning rate are not the cause",
    "kd_reduction_mean": "F.kl_div averages over every element (reduction='mean', its default): the KD term is the "
                         "divergence per token divided by the vocabulary's {support}, so beside the cross-entropy it "
                         "carries 1/{support} of the weight meant and the student learns from the cross-entropy "
                         "alone — pass `reduction=\"batchmean\"` with the logits flattened to (tokens, vocabulary), "
                         "the KL per token; precision and the learning rate are not the cause",
    "padding_in_targets": "{share} of the target tokens at step {step} sit where the attention mask is 0: the "
                          "labels keep the padding (copied from `input_ids` with the pads left in), so the loss trains "
                          "the model to predict pad tokens — easy targets that pull the loss down while the text's own "
                          "tokens weigh less in it — set the labels to -100 where the attention mask is 0 (`labels["
                          "attention_mask == 0] = -100`); precision and the learning rate are not the cause",
    "kd_target_invalid": "F.kl_div's target holds values up to {amax} with `log_target=True`, which takes it as "
                         "log-probabilities (≤ 0): given the teacher's probabilities, it computes Σ e^q·(q − log p), "
                         "no divergence — large, and flat however the student learns — pass the teacher's "
                         "`F.log_softmax(teacher_logits / T, dim=-1)` as the target, or its softmax without "
                         "`log_target=True`; precision and the learning rate are not the cause",
    "teacher_dropout": "{model} runs in train() mode with dropout on ({module}, p={p}) though nothing of it trains: "
                       "every forward draws a new dropout mask, so the KD targets are noisy and differ from forward to "
                       "forward — {teacher_eval}; precision and the learning rate are not the cause",
    "kd_temperature_low": "the KD temperature {temperature} scales the KD term's gradient by T (T² · KL at logits / "
                          "T has a gradient of T · (p_student − p_teacher) per logit) and makes the teacher's softmax "
                          "at T all but one-hot: the KD term matches the teacher's argmax, not its distribution, and "
                          "next to the cross-entropy it carries next to nothing of the gradient, while kd_loss reads "
                          "small as if the student matched its teacher — set {temperature_option} to 1 or more (1 to "
                          "4 is usual; the T² factor keeps the KD gradient comparable across such temperatures); "
                          "precision and the learning rate are not the cause",
    "kd_targets_one_hot": "the KD term's target — the teacher's distribution handed to `F.kl_div` — is one-hot (its "
                          "top probability within 1e-6 of 1) on {share} of the tokens at step {step}: the teacher's "
                          "logits divided by a temperature far below 1 (a gap of 0.02 between its top logits does that "
                          "at T = 1e-3), so the KD term matches the teacher's argmax, not its distribution, and its "
                          "gradient, T · (p_student − p_teacher) per logit under the T² factor, is T× its size at T = "
                          "1 — set {temperature_option} to 1 or more (1 to 4 is usual); precision and the learning "
                          "rate are not the cause",
    "kd_targets_few": "the KD term covers {fraction} of the student's target tokens (from step {step}; {steps} "
                      "short of {threshold}): {why} — those tokens learn from the cross-entropy alone, and kd_loss, "
                      "a mean over every target token, reads small rather than missing; precision and the learning "
                      "rate are not the cause",
    "kd_targets_few_teacher_context": "the teacher reads fewer tokens than its tokenizer needs for the characters of "
                                      "one student block, so the text past its position table has no teacher target "
                                      "— a smaller {block_size} (now {length}) keeps each block's text within "
                                      "the teacher's context (the note gives its size)",
    "kd_targets_few_spans": "student tokens that no teacher token's character span overlaps have no teacher target "
                            "— check that both tokenizers give character offsets (fast tokenizers; "
                            "`return_offsets_mapping`) that cover the text",
    "loss_backpropagated_twice": "one forward's loss of {model} is backpropagated {count} times at full weight (from "
                                 "step {step}): each `backward()` through it adds its gradient to `.grad` again, so "
                                 "the step applies it {count}× — SGD's update with it (Adam's barely changes), and the "
                                 "norm a clipping threshold meets — call `backward()` once per forward, on the sum of "
                                 "its terms (`(kd + ce).backward()`); a backward only to read a gradient belongs in "
                                 "`torch.autograd.grad`, which adds nothing to `.grad`; the learning rate and the "
                                 "precision are not the cause",
    "micro_batches_summed": "{model}'s gradient is the sum of {count} losses, not their mean (from step {step}): each "
                            "micro-batch's loss is backpropagated at full weight, so each step's gradient is {count}× "
                            "the batch's — SGD's update {count}× with it (Adam's barely changes: it divides by the "
                            "gradient's size), a clipping threshold meets a {count}× norm, and L2 weight decay in "
                            "the gradient is outweighed {count}× — divide each micro-batch's loss by the number of "
                            "micro-batches before its backward: {divide_micro_batch_losses}; the "
                            "learning rate and the precision are not the cause",
    "num_items_ignored": "{model}'s gradient is the sum of {count} micro-batches' losses, not their mean (from step "
                         "{step}): your `compute_loss` is handed `num_items_in_batch` — the step's target count over "
                         "all {count} micro-batches — and never reads it, while the Trainer, counting on it (the "
                         "model accepts loss kwargs), no longer divides each loss by `gradient_accumulation_steps`: "
                         "each step's gradient is {count}× the batch's — SGD's update {count}× with it, a clipping "
                         "threshold meets a {count}× norm — sum the loss over the target tokens and divide by "
                         "`num_items_in_batch`, or set `trainer.model_accepts_loss_kwargs = False` so the Trainer "
                         "divides by `gradient_accumulation_steps` itself; the learning rate and the precision are "
                         "not the cause",
    "accumulation_unmatched": "the optimizer steps after fewer batches than `Accelerator(gradient_accumulation_steps="
                              "{steps})` divides each loss by (from step {step}): the loop never enters `with "
                              "accelerator.accumulate(model):`, so accelerate steps the optimizer on every batch, each "
                              "update from a gradient up to {steps}× smaller than the batches' — SGD's update with it "
                              "(Adam's barely changes: it divides by the gradient's size), and a clipping threshold "
                              "meets that smaller norm — run each batch's forward, `accelerator.backward` and "
                              "`optimizer.step()` inside `with accelerator.accumulate(model):`, or pass the number of "
                              "batches the loop accumulates as `gradient_accumulation_steps` (1 if it steps on every "
                              "batch); the learning rate and the precision are not the cause",
    "clip_before_unscale": "the gradients are clipped while the loss scaler still scales them (by {scale}): the "
                           "clipping sees their norm × the scale, cuts gradients the threshold should leave alone, "
                           "and once unscaled every update is ~{scale}× smaller than the threshold meant (SGD barely "
                           "moves; Adam sees only the gradient's direction) — clip after unscaling: "
                           "{unscale_then_clip}",
    "update_underflow": "updates are below half an ulp of the {dtype} weights ({tensor} loses most): train with "
                        "{mixed} or {bf16_mixed} (fp32 master weights), or raise {lr}",
    "update_underflow_whole_tensors": "every update of {tensor} ({dtype}) and of the tensors named with it rounds "
                                      "away while the rest of the run trains: an update below ~{half_ulp} of a "
                                      "weight's value is lost in {dtype}, and under Adam each step moves a weight by "
                                      "about the lr, so values near 1 (a norm's gain) would need {lr} above "
                                      "~{half_ulp} — far above what trains the rest; keep them in fp32 master "
                                      "weights instead: train with {mixed} or {bf16_mixed}",
    "update_underflow_lr": "updates are below half an ulp of the {dtype} weights ({tensor} loses most), and the lr "
                           "is below half an ulp of {share} of them even in float32 (an update below ~6e-08 of the "
                           "weight, far below healthy training's ~1e-3 of it per step): fp32 master weights would "
                           "lose them too, so the step size is the problem, not the precision: raise {lr} (too "
                           "small, or a schedule that decayed it to ~0)",
    "update_underflow_tiny_gradients": "updates are below half an ulp of the {dtype} weights ({tensor} loses most), "
                                       "and the gradients are so small that their squares are 0 even in float32 (an "
                                       "`optimizer_state_underflow` in fp32 too): Adam divides them by eps alone, "
                                       "and fp32 master weights would lose those updates as well — the step size "
                                       "is the problem, not the precision: check {loss_weights} (a weight all but 0), "
                                       "{clip_option} (a threshold that shrinks every gradient to almost nothing) "
                                       "and {lr}",
    "update_underflow_wide": "updates are below half an ulp of the {dtype} weights ({tensor} loses most): in "
                             "{dtype} that is an update below ~{half_ulp} of the weight, far below healthy "
                             "training's ~1e-3 of it per step, so the step size is the problem, not the precision: "
                             "check {lr} (too small, or a schedule that decayed it to ~0), {clip_option} (a threshold "
                             "that shrinks every gradient to almost nothing) and {loss_weights} (weights so small that "
                             "the gradients fall below the optimizer's eps, which Adam divides by, and the updates "
                             "with them)",
    "update_underflow_loss_factor": "updates are below half an ulp of the {dtype} weights ({tensor} loses most) "
                                    "because the gradients themselves are vanishingly small — the largest entry "
                                    "of any gradient is {grad_amax} (below 6e-8: float16 could not even hold it), "
                                    "while the loss is {loss}: the loss is multiplied by a tiny factor before "
                                    "`backward()` — {loss_weights} (a weight such as 1e-30), a division by a huge "
                                    "count — fix that factor; the learning rate and the precision are not the cause",
    "updates_too_small": "{model}'s optimizer steps change its weights by ~{ratio} of their size per step (‖Δw‖/‖w‖, "
                         "the median over {steps}), {below}× below healthy training's ~1e-3: ten thousand such steps "
                         "move them less than one healthy step does, so the loss stays where it started: the step "
                         "size is the problem, not the precision — raise "
                         "{lr}{lr_value}; if it is as meant, something shrinks every gradient to almost nothing — "
                         "{clip_option} or {loss_weights} near 0",
    "teacher_overflow": "the teacher's {module} is non-finite in {dtype}: {teacher_wider}",
    "teacher_overflow_wide": "the teacher's {module} is non-finite in {dtype}, whose range is float32's: no wider "
                             "dtype holds what float16 could not here — the values themselves are out of scale: check "
                             "the teacher's checkpoint (its largest weights, `torch.isfinite`) and what your code "
                             "hands its forward (inputs, masks, a scaling of its outputs); the student's precision "
                             "is not the cause",
    "teacher_loss_fp16": "the teacher computes in float16 and the {term} turned non-finite from its finite outputs "
                         "(the largest {amax}): a softmax of float16 logits underflows to 0 and the log of 0 is -inf "
                         "(0 × -inf is NaN in the KL) — cast the teacher's logits with `.float()` before the softmax "
                         "(and take log_softmax, not log(softmax)), or hold the teacher in a wider dtype — "
                         "{fp32_teacher}",
    "teacher_unseen_fp16": "the teacher computes in float16 and the {term} turned non-finite while no forward of it "
                           "ran in the steps the probes watched: what it hands the loss was computed before them "
                           "(precomputed before training: DPO's reference log-probabilities, cached teacher logits), "
                           "where float16 overflows unseen — hold the teacher in a wider dtype — {fp32_teacher} — and "
                           "compute those outputs again",
    "teacher_router_overflow": "the teacher's MoE router {module} overflows {dtype}: its logits need fp32's range — "
                               "{teacher_wider}{router_in_fp32}",
    "nonfinite_input": "fix the data: every batch needs target tokens (labels other than -100) and finite inputs",
    "nonfinite_weights_loaded": "{model}'s {tensor} holds {holds} before the first optimizer step — as loaded: the "
                                "checkpoint is corrupt, not the precision, the learning rate or the data; load it "
                                "again or re-export it (a torn download or write, an export that overflowed), and "
                                "check a checkpoint's weights with `torch.isfinite` before training from it",
    "nonfinite_weights_latent": "{model}'s {tensor} holds {holds} before the first optimizer step — as loaded — yet "
                                "nothing it feeds turned non-finite in this run's {steps} steps (every loss and "
                                "module output finite): entries no batch reached so far, such as the embedding rows "
                                "of tokens the data never holds; the checkpoint is still corrupt, and the first batch "
                                "that reaches them will be NaN — load it again or re-export it, and check a "
                                "checkpoint's weights with `torch.isfinite` before training from it",
    "weights_edited_nonfinite": "{model}'s {tensor} was finite after optimizer step {after} and holds {holds} at "
                                "step {step}'s first training forward: code between the optimizer step and the next "
                                "forward wrote it — an in-place edit under `torch.no_grad()` (a rescale, a weight "
                                "copied or tied from another tensor, an EMA or model average written back, a mask "
                                "or clamp with a NaN in it) — find that code; the optimizer, the data and the "
                                "precision are not the cause",
    "weights_edited_nonfinite_frozen": "{model}'s {tensor} was finite as loaded and holds {holds} at step {step}'s "
                                       "forward: nothing trains it, so code outside the optimizer wrote it — an "
                                       "in-place edit under `torch.no_grad()` (an EMA or average written back, a "
                                       "weight copied or tied from another tensor, a mask or clamp with a NaN in "
                                       "it) — find that code; the precision, the data and the teacher's dtype are "
                                       "not the cause",
    "weights_edited": "code outside the optimizer changed {model}'s {tensor} between optimizer step {after} and step "
                      "{step}'s first training forward, its largest absolute value {factor}× larger or smaller in "
                      "one go — an in-place rescale under `torch.no_grad()`, a weight copied or tied from another "
                      "tensor, an average written back; check that code: training did not make the change",
    "nonfinite_weights_fp16": "{model}'s {tensor} holds {holds} in float16 before the first optimizer step: the "
                              "checkpoint holds values beyond float16's 65504 (it was saved wider) and the cast to "
                              "float16 at load made them Inf (the file is sound): load and compute it with fp32's "
                              "range — {wide_compute} — or rescale those weights into float16's range; fp32 weights "
                              "under float16 autocast are cast again at each matmul and overflow the same way",
    "weights_beyond_fp16": "{model}'s {tensor} holds {amax} as loaded, beyond float16's 65504: the checkpoint holds "
                           "values float16 cannot, and computing in float16 casts them to Inf ({module} overflows "
                           "first) — compute with fp32's range — {wide_compute} — or rescale that weight into "
                           "float16's range; a loss scaler cannot fix it",
    "teacher_weights_fp16": "the teacher's {module} weights exceed float16's range: the checkpoint holds values "
                            "beyond 65504, Inf once cast to float16 — hold the teacher in a wider dtype — "
                            "{fp32_teacher} — or rescale those weights into float16's range",
    "divergence_update": "one optimizer step changed the weights by {ratio}× their size ({tensor} most; healthy "
                         "steps are ~1e-3×){at_lr}: the learning rate is far too high for this model — lower {lr} and "
                         "clip with {clip}; precision is not the cause",
    "loss_computation": "check the loss computation: the {term} turned non-finite from finite weights and module "
                        "outputs (the largest {amax}) — look for a division by zero (a temperature or token count "
                        "of 0), the log of 0 or of a negative number (`F.kl_div` handed log-probabilities as its "
                        "target without `log_target=True` takes their log), an exp that overflows (e^x is Inf "
                        "above x ≈ {exp_limit} in {dtype}: a softmax written as exp()/sum() without subtracting each "
                        "row's max, or logits divided by a small temperature first — Inf/Inf is NaN), or an input "
                        "the probes do not watch, "
                        "such as a teacher's logits (watch it as `teacher`); lowering {lr} will not help",
    "loss_computation_fp16": "check the loss computation: the {term} turned non-finite from finite weights and module "
                             "outputs (the largest {amax}), and this run computes in float16, so the models' outputs "
                             "reach the loss as float16, where whatever the loss does to them before a `.float()` "
                             "overflows past 65504 — outputs up to {amax} divided by a temperature below "
                             "{temperature_limit} (÷ 65504) are Inf, and their softmax NaN: cast the logits with "
                             "`.float()` first, then divide by T; if it persists, look for a division by zero (a "
                             "temperature or token count of 0) or the log of 0; lowering {lr} will not help",
    "loss_fp16_cast": "the {term} turned non-finite from finite module outputs, and {model}'s reached {amax} "
                      "({module} first beyond it), beyond float16's 65504: a cast of them to float16 on the way to "
                      "the loss — `.half()` or `.to(torch.float16)` on its logits or hidden states (often to save "
                      "memory), a float16 buffer they are copied into — makes them Inf, and the loss Inf or NaN; keep "
                      "them in float32 (or bfloat16, fp32's range) up to the loss, or scale them down first; if "
                      "nothing casts them, look for a division by zero or the log of 0 in the loss; lowering {lr} "
                      "will not help",
    "loss_computation_low": "compute the loss in fp32: the {term} turned non-finite in {dtype} from finite weights "
                            "and module outputs (the largest {amax}) — cast the logits with `.float()` before the "
                            "softmax and the divergence; if it persists, look for a division by zero or the log "
                            "of 0; lowering {lr} will not help",
    "loss_sum_low": "the {term} itself left {dtype}'s range: its finite values reach {largest}, where {dtype} holds at "
                    "most {limit} — far above a per-token mean (a cross-entropy is at most the log of the vocabulary): "
                    "a sum over the tokens (`reduction=\"sum\"`), or a term weighted that high; take the mean (a sum's "
                    "gradient is as many times larger too, and so is each step), or compute the loss in fp32 with "
                    "`.float()`",
    "nonfinite_op": "{module} made {holds} in {dtype} from values nowhere near {dtype}'s range (the largest "
                    "measured {amax}): an operation undefined on its inputs, not an overflow — a softmax over a row "
                    "whose every position is masked (0/0), the log of 0, a division by zero, inf − inf; guard the "
                    "mask (keep at least one position per row, or zero the fully masked rows) and clamp before a log "
                    "or a division (`x.clamp_min(eps)`); a precision change or lowering {lr} will not help",
    "nonfinite_op_replayed": "{module} made {holds} in float16, and run again in float32 on the same finite inputs "
                             "and weights it made {wide_holds} too: an operation undefined on its inputs, not "
                             "float16's range — the sqrt or log of a negative, a softmax over a row whose every "
                             "position is masked (0/0), a division by zero; guard it (`x.clamp_min(eps)` before a "
                             "sqrt, a log or a division; keep at least one position per row unmasked); "
                             "a wider precision ({wide_compute}) will not help, nor will lowering {lr}",
    "nonfinite_grad_op": "the gradients turned {holds} in backward — first at {tensor} in backward order — in {dtype}, "
                         "from {loss} and finite values nowhere near {dtype}'s range (the largest measured "
                         "{amax}): not an overflow but an operation whose derivative is infinite or undefined at its "
                         "input — sqrt of exactly 0 (an RMSE, or a distance written as the sqrt of a sum of "
                         "squares, between equal tensors, as when a student starts from its teacher's weights), "
                         "pow(x, p < 1) at 0, acos/asin at ±1, a log or division at 0 in a branch `torch.where` "
                         "discards (its gradient is still 0 × inf); keep "
                         "the input off that point (`(x + eps).sqrt()`, `x.clamp_min(eps)`, the squared distance "
                         "instead of the distance); a precision change, a loss scaler or lowering {lr} will not help",
    "nonfinite_grad_singular": "the gradients turned {holds} in backward — first at {tensor} in backward order — in "
                               "{dtype}, from a finite loss and values nowhere near {dtype}'s range (the largest "
                               "measured {amax}), and the loss's own computation applies {operation}, whose derivative "
                               "is infinite or undefined at some input: not an overflow — it entered at the loss end, "
                               "where {operation} met such a point " + SINGULAR_POINTS.format(never_moved="") + "; "
                               + KEEP_OFF_THE_POINT + "; a precision change, a loss scaler or lowering {lr} will not "
                               "help",
    "nonfinite_grad_at_loss": AT_LOSS_END.format(
        origin="from a finite loss: an operation in the loss's own computation whose derivative is infinite or "
               "undefined at its input (sqrt of exactly 0, a log or division at 0)"),
    "nonfinite_grad_loss_unseen": AT_LOSS_END.format(
        origin="where the probes saw no loss: a loss gone non-finite, or an operation in the loss whose derivative "
               "is undefined at its input (sqrt of exactly 0, a log or division at 0) — hand the loss over "
               "({hand_loss}) and the run tells which"),
    "divergence": "the loss blows up without a precision cause: lower {lr}, clip with {clip}, or check the data",
    "loss_unplaced": "the loss grew from {first} to {top} (beyond {factor}× by step {step}) with every value "
                     "finite and no update as large as the weights: no module, weight or update places it — lower "
                     "{lr} and clip with {clip}; if it still climbs at a small lr, check the loss code (its sign — a "
                     "loss maximised instead of minimised — and the weights of its terms) and the data",
    "loss_rise_unjudged": "the loss grew from {first} to {top} (beyond {factor}× by step {step}) with every value "
                          "finite, in a run of {losses} losses — too few to measure how far its losses scatter from "
                          "batch to batch, and a batch several times harder than the first (a few samples each) does "
                          "as much: run more steps to tell; if it keeps climbing, lower {lr} and clip with {clip}, "
                          "and check the loss code's sign and its terms' weights",
    "loss_spike": "the loss jumped from {before} to {top} at step {step} (beyond {factor}× its first, {first}) with "
                  "every value finite, then came back ({last} at step {last_step}): a transient spike, not a "
                  "divergence — an outlier batch or one step too large; if spikes recur or grow, lower {lr} and clip "
                  "with {clip}, and look at the batches of step {step}",
    "loss_rising": "the training loss climbs steadily from step {first} to {last} (the fitted line from {start} to "
                   "{end}, {t} standard errors of its step-to-step noise above flat) with every value finite: an "
                   "optimizer that steps too far — {lr} a little too high for this model, or a schedule that raises "
                   "it — or a loss that is being maximised (a sign error in a term, a term's weight); nothing places "
                   "it — lower {lr} (and clip with {clip}), and check the loss code and its terms' weights",
    "loss_unbounded_below": "the training loss falls steadily from {start} (step {first}) to {end} (step {last}), {t} "
                            "standard errors of its step-to-step noise below flat, every value finite: far below 0, "
                            "where no cross-entropy, KL divergence or squared error goes — the loss is unbounded "
                            "below: a term is being maximised (a sign error: a KL or CE subtracted, a term's weight "
                            "below 0) and the outputs grow without limit; the precision and {lr} are not the cause — "
                            "check the loss code's signs and its terms' weights",
    "loss_unplaced_nonfinite": "the {term} turned non-finite at step {step}, the run's first non-finite value, on a "
                               "step that took no module statistics: nothing places it — {full_probes} tells whether a "
                               "module or the loss code made it; meanwhile check the loss code for what can reach 0 "
                               "on that step (a temperature or token count annealed or computed to 0, a log of 0) and "
                               "that batch; if the weights grew fast before it, lower {lr} and clip with {clip}",
}
# A fix's wording where the run already computes in bfloat16 (`RunRecord.computes_in_bf16`): the templates above
# advise bf16 or fp16 compute, which such a run already has (bf16) or which would narrow its range (fp16). bf16
# has fp32's range: what overflows there blows up in any precision, and the fix is the step's size. What bf16
# weights or state lose to rounding, fp32 master weights under the same bf16 compute keep: fp16 compute would
# trade the range the run has for nothing it lacks.
BF16_FIXES = {
    "update_underflow": "updates are below half an ulp of the {dtype} weights ({tensor} loses most): keep the "
                        "bfloat16 compute and give it fp32 master weights — train with {bf16_mixed} — or raise {lr}",
    "update_underflow_whole_tensors": "every update of {tensor} ({dtype}) and of the tensors named with it rounds "
                                      "away while the rest of the run trains: an update below ~{half_ulp} of a "
                                      "weight's value is lost in {dtype}, and under Adam each step moves a weight by "
                                      "about the lr, so values near 1 (a norm's gain) would need {lr} above "
                                      "~{half_ulp} — far above what trains the rest; keep the bfloat16 compute and "
                                      "give it fp32 master weights: train with {bf16_mixed}",
    "optimizer_state_underflow": "keep the optimizer state in fp32 — train with {bf16_mixed}: the bfloat16 compute "
                                 "kept, fp32 master weights and fp32 Adam moments; with the state in {dtype}, Adam "
                                 "divides by eps alone and its updates grow instead of shrinking",
    "optimizer_state_underflow_warning": "keep the optimizer state in fp32 — train with {bf16_mixed}: the bfloat16 "
                                         "compute kept, fp32 master weights and fp32 Adam moments",
    "weight_decay_lost": "weight decay does nothing: each step multiplies the {dtype} weights of {group} by {factor} "
                         "(lr × weight_decay = {decay}), a change below half an ulp of most of them, so they round "
                         "back unchanged — keep the bfloat16 compute over fp32 master weights, where the decay "
                         "applies: train with {bf16_mixed}; or set {weight_decay} to 0 and say so",
    "activation_overflow": "{module} overflows {dtype}, whose range is fp32's: no precision setting holds it — its "
                           "outputs blow up; lower {lr}, clip with {clip}, or keep this op's inputs bounded",
    "fp16_risk": "{module} exceeds fp16's range in {dtype}: bfloat16, as this run computes, holds it — keep this "
                 "model off fp16 compute",
    "gradient_overflow": "gradients overflow {dtype} in a run that computes in bfloat16 (fp32's range): no "
                         "precision setting catches this — the gradients blow up; lower {lr}, clip with {clip}, "
                         "or lower {loss_weights}",
}


@dataclass
class Cause:
    """One conclusion: what, how sure, where, since when, on what evidence, and what to do."""

    cause: str
    severity: str
    first_step: int | None
    phase: str = "optimizer"
    model: str | None = None
    module: str | None = None
    tensor: str | None = None
    rank: int = 0
    evidence: dict = field(default_factory=dict)
    fix: str = ""
    ranks_as: str | None = None  # its CAUSE_ORDER entry, where a lesser finding of a code ranks after its main one

    @property
    def order(self) -> str:
        return self.ranks_as or self.cause

    @property
    def when(self) -> tuple:
        return (self.first_step if self.first_step is not None else math.inf, PHASE_ORDER.get(self.phase, 4))

    def summary(self) -> str:
        where = " ".join(x for x in (self.model, self.module or self.tensor) if x)
        return f"{self.cause}@{self.first_step}" + (f" ({where})" if where else "")

    def as_dict(self) -> dict:
        return {"cause": self.cause, "severity": self.severity, "model": self.model, "module": self.module,
                "tensor": self.tensor, "rank": self.rank, "first_step": self.first_step,
                "evidence": {k: _plain(v) for k, v in self.evidence.items() if _plain(v) is not None},
                "fix": self.fix}


def _plain(value):
    """Evidence as JSON and a person read it: numpy and pandas scalars become int/float, NaN is missing."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    number = number_or_none(value)
    if number is not None and number.is_integer() and abs(number) < 2**53 and "int" in type(value).__name__:
        return int(number)
    return number


class Diagnosis(list):
    """The numerical causes, most important first: a list of dicts (summary.json's `diagnosis`) that prints readably.

    `findings`: what the loop or the setup gets wrong that the nine codes do not name (`lr_zero`,
    `gradients_not_cleared`, `kd_temperature_low`, `weight_decay_lost`, …), in the same form and order —
    summary.json's `findings`. `ranked`: causes and findings together, the root first, as `rank` ordered them.
    `notes`: the run's warnings that no rule read — how the loop calls the probes (`step()` before
    `optimizer.step()`, no loss given), what they could not watch — one per check. No cause, yet each makes the
    figures less than they seem; printed last, since a loop's `print(probes.diagnosis())` is all its author reads
    (`train` prints them as they happen, the report lists them with the events)."""

    def __init__(self, ranked=(), notes=()):
        self.ranked = list(ranked)
        super().__init__(c for c in self.ranked if c["cause"] in CAUSES)
        self.findings = [c for c in self.ranked if c["cause"] not in CAUSES]
        self.notes = list(notes)

    def __repr__(self) -> str:
        return "\n".join([self._causes(), *_numbered("Findings (the loop or the setup):",
                                                      self.findings), *self._notes()])

    def _notes(self) -> list[str]:
        if not self.notes:
            return []
        return ["Warnings (no numerical cause):",
                *(f"- step {n['step']} {n['code']}: {n['message']}" for n in self.notes)]

    def _causes(self) -> str:
        if not self:
            return "Diagnosis: no numerical problems found"
        return "\n".join(_numbered("Diagnosis:", self))

    __str__ = __repr__


def _numbered(title: str, causes: list[dict]) -> list[str]:
    """Causes as numbered lines under `title` — where, evidence, fix —; nothing for none."""
    lines = [title] if causes else []
    for i, c in enumerate(causes, start=1):
        where = " ".join(x for x in (c.get("model"), c.get("module") or c.get("tensor")) if x)
        lines.append(f"{i}. {c['cause']} ({c['severity']}) at step {c.get('first_step')}"
                     + (f" in {where}" if where else ""))
        evidence = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in c.get("evidence", {}).items())
        if evidence:
            lines.append(f"   evidence: {evidence}")
        lines.append(f"   fix: {c['fix']}")
    return lines


class RunRecord:
    """What the rules read: the run's events by kind and code, its metrics and how it was set up."""

    def __init__(self, events: pd.DataFrame | None, metrics: pd.DataFrame | None, config: dict):
        if events is None or len(events) == 0:
            events = pd.DataFrame(columns=["kind", "code", "severity", "model", "module", "tensor", "step", "rank",
                                           "time", "phase", "value", "dtype"])
        if "code" not in events:
            events = events.assign(code=events["kind"])
        self.events = events
        self.metrics = metrics if metrics is not None else pd.DataFrame()
        self.config = config
        self.mode = (config.get("precision") or {}).get("mode")
        self.caller = config.get("caller") or "cli"
        self.routers = {r.get("module") for r in config.get("routers") or []}
        # the teacher, and the other frozen models a caller watches beside the student (several teachers, an RL
        # reference): their outputs are targets computed by weights no one trains
        self.teachers = {"teacher", *((config.get("precision") or {}).get("frozen_models") or [])}
        # the models trained through adapters over a frozen base (LoRA): fp32 master weights are fp32 adapters there
        self.adapted_models = set((config.get("precision") or {}).get("adapted_models") or [])
        self.notes_read: set[str] = set()  # the setup notes' codes some rule read (`of`)
        self.events = self._outputs_of_an_unseen_teacher_apart(events)

    def _outputs_of_an_unseen_teacher_apart(self, events: pd.DataFrame) -> pd.DataFrame:
        """The events, less the non-finite data the loss was handed (`nonfinite_batch` of phase `loss`) where a float16
        teacher alone ran no forward in any step (a `frozen_model_unseen` note): that data is its outputs, computed
        before training (DPO's `precompute_ref_log_probs`) — the teacher's fault (`teacher_overflow`), not the
        dataset's."""
        teacher = self.teacher_alone_in_fp16()
        unseen = (events["kind"] == "setup_note") & (events["code"] == "frozen_model_unseen") \
            & (events["model"] == teacher)
        if teacher is None or not unseen.any():
            return events
        return events[~((events["kind"] == "nonfinite_batch") & (events["phase"] == "loss"))]

    def unread_warnings(self) -> list[dict]:
        """The first of each setup note's warnings that no rule read (`Diagnosis.notes`)."""
        events = self.events
        notes = events[(events["kind"] == "setup_note") & events["severity"].isin(["warning", "critical"])
                       & ~events["code"].isin(self.notes_read)]
        return [{"step": _plain(row["step"]), "code": row["code"], "message": row.get("message")}
                for _, row in notes.drop_duplicates("code").iterrows()]

    def is_teacher(self, model) -> bool:
        return model in self.teachers

    def watches_no_teacher(self) -> bool:
        """The run is known to hold no frozen model to match (a caller's models, `precision.model_dtypes`, without a
        teacher): its loss has no KD term whose minimum is 0."""
        models = (self.config.get("precision") or {}).get("model_dtypes")
        return models is not None and not set(models) & self.teachers

    def of(self, kind: str, *codes: str) -> pd.DataFrame:
        if kind == "setup_note":
            self.notes_read.update(codes)
        rows = self.events[self.events["kind"] == kind]
        return rows[rows["code"].isin(codes)] if codes else rows

    def first_nonfinite_param_step(self) -> int | None:
        params = self.of("nonfinite_param")
        return int(params["step"].min()) if len(params) else None

    def weight_written_nonfinite(self) -> pd.Series | None:
        """The run's first non-finite value when code between an optimizer step and the next forward wrote it into a
        weight (the first critical `nonfinite_between_steps`): nothing non-finite at an earlier step. Every non-finite
        value from its step on follows from it — a module that multiplies by a NaN or Inf weight makes NaN or Inf
        whatever its dtype's range, so its output is no overflow."""
        written = self.of("nonfinite_between_steps")
        written = written[written["severity"] == "critical"]
        if not len(written):
            return None
        row = _first(written)
        earlier = [self.of(kind) for kind in ("nonfinite_param", "nonfinite_activation", "nonfinite_loss",
                                              "nonfinite_grad", "nonfinite_batch", "nonfinite_at_load")]
        return None if any((frame["step"] < row["step"]).any() for frame in earlier) else row

    def contained(self, step: int) -> bool:
        """A fault at `step` the run contained: that step's loss was non-finite (so a loss scaler or the loop skipped
        it, and nothing of it reached the weights), no weight turned non-finite, and the run's last training step had a
        finite loss — training went on. A non-finite value whose loss stayed finite was absorbed somewhere unseen (a
        router's overflowing logits still route): not contained; nor where no loss was recorded."""
        loss = self.train_column("loss")  # finite values only: NaN rows are dropped
        if self.first_nonfinite_param_step() is not None or not len(loss) or step in loss.index:
            return False
        train_steps = self.metrics.loc[self.metrics["split"] == "train", "step"]
        return bool(step in train_steps.values and loss.index[-1] == train_steps.max())

    def train_column(self, name: str, unfinished: bool = False) -> pd.Series:
        """A column of the train rows, by step (non-finite values kept, unmeasured ones dropped); `unfinished`: with
        the row of the step a caller's loop raised in (`split` = `unfinished`), for what the probes measured there —
        the magnitudes beside a NaN its clipping refused — never for what a completed step means (a loss curve, the
        last step)."""
        if name not in self.metrics or "split" not in self.metrics:
            return pd.Series(dtype="float64")
        train = self.metrics[self.metrics["split"].isin(("train", "unfinished") if unfinished else ("train",))]
        return pd.to_numeric(train.set_index("step")[name], errors="coerce").dropna()

    def train_loss_runs(self) -> list[pd.Series]:
        """The finite training loss, split where a new training run continued the directory (`run_continued`: a second
        train() or fit, a hyperparameter-search trial; `trainer_restarted`: the Trainer's loop begun again at a smaller
        batch size): each starts afresh from its own first loss, so a rise or a blow-up is judged within one, never
        from one's last loss to the next one's first."""
        loss = self.train_column("loss")
        loss = loss[loss.map(math.isfinite)]
        starts = sorted(int(step) for step in self.of("setup_note", "run_continued", "trainer_restarted")["step"])
        edges = [-math.inf, *starts, math.inf]
        parts = [loss[(loss.index >= start) & (loss.index < end)] for start, end in itertools.pairwise(edges)]
        return [part for part in parts if len(part)]

    def blown_up_losses(self) -> pd.Series:
        """The finite training losses above `blow_up_factor`× the first of their training run (a positive one: "three
        times" a negative loss means nothing) and risen at least `loss_floor_rise` above it, in step order."""
        factor, floor = self.blow_up_factor(), self.loss_floor_rise()
        runs = self.train_loss_runs()
        blown = (part[(part > factor * part.iloc[0]) & (part - part.iloc[0] >= floor)] for part in runs
                 if part.iloc[0] > 0)
        return pd.concat([pd.Series(dtype=float), *blown])

    def blow_up_factor(self) -> float:
        """How many times its first value a training loss must reach to be a blow-up: DIVERGENCE_FACTOR, or more where
        the run's positive finite losses scatter from step to step by more — e^(LOSS_SCATTER_Z × the robust spread,
        1.4826 × the median absolute deviation, of their log changes). A steady climb or fall changes by the same
        amount each step (no spread); a few samples per batch make losses that differ tenfold, the first among them."""
        return max(DIVERGENCE_FACTOR, math.exp(LOSS_SCATTER_Z * self.loss_scatter()))

    def loss_changes(self) -> pd.Series:
        """The step-to-step changes of the log of the run's positive finite training losses, within each training
        run (`train_loss_runs`)."""
        return pd.concat([pd.Series(part[part > 0].map(math.log).to_numpy()).diff().dropna()
                          for part in self.train_loss_runs()] or [pd.Series(dtype="float64")])

    def loss_scatter(self) -> float:
        """The robust spread (1.4826 × the median absolute deviation) of `loss_changes`: how far one step's loss
        strays from the last by chance. 0 where there are fewer than LOSS_SCATTER_MIN_CHANGES changes."""
        changes = self.loss_changes()
        if len(changes) < LOSS_SCATTER_MIN_CHANGES:
            return 0.0
        return 1.4826 * float((changes - changes.median()).abs().median())

    def loss_floor_rise(self) -> float:
        """The least rise of the training loss that can be a blow-up, whatever its factor: LOSS_TREND_RISE of the
        objective's natural scale where its terms are known — `train`'s logit KD weighs KD and CE in nats per token,
        and KD (the excess of the student's cross-entropy on the teacher's distribution over the teacher's entropy)
        is of the order of the student's own cross-entropy on the data, so (alpha_kd + alpha_ce) × the first
        `ce_loss`. A loss that starts at its floor (a student distilled from its own copy: KD ≈ 1e-7, rounding's
        doing) grows by any factor from there without the student's predictions changing by anything that shows;
        elsewhere (a caller's own loss, hidden-state KD) no scale is known: 0."""
        objective = (self.config.get("objective") or {}).get("kind")
        ce = self.train_column("ce_loss")
        ce = ce[ce.map(math.isfinite)]
        if self.caller != "cli" or objective != "logit-kd" or not len(ce):
            return 0.0
        options = self.config.get("options") or {}
        weights = sum(number_or_none(options.get(name)) or 0.0 for name in ("alpha_kd", "alpha_ce"))
        return LOSS_TREND_RISE * weights * float(ce.iloc[0])

    def clip_threshold(self) -> float | None:
        """The gradient-norm threshold the run clipped at: `train`'s `--max-grad-norm` (0: none), elsewhere the last
        `clip_max_norm` the probes read at the loop's `clip_grad_norm_` (the Trainer, accelerate and Lightning clip
        through it); None where nothing clipped."""
        if self.caller == "cli":
            value = number_or_none((self.config.get("options") or {}).get("max_grad_norm"))
            return value if value else None
        thresholds = self.train_column("clip_max_norm")
        return float(thresholds.iloc[-1]) if len(thresholds) else None

    def loss_scale_at(self, step: int) -> float | None:
        """The loss scale after a step, where recorded (`loss_scale`): a step whose gradients all flushed to zero
        neither overflowed nor backed off, so its backward ran at that scale (at half of it where the scaler grew
        then)."""
        scales = self.train_column("loss_scale")
        return number_or_none(scales.loc[[step]].iloc[-1]) if step in scales.index else None

    def lr_at(self, step: int, model: str | None, tensor: str | None = None) -> float | None:
        """The lr that trained `model`'s tensors (`tensor`'s, where given) at `step`. Where an `update_lr` event names
        the tensor at that step (an extreme update's largest change), its parameter group's. Else a row's `lr`, the
        first parameter group's, the student's; a teacher's trainable tensors — the routers `train` trains — are a
        group of their own, in `train` at `--router-lr` scheduled by the same factor as the student's; elsewhere
        their lr is not recorded (None)."""
        told = self.of("update_lr")
        told = told[(told["step"] == step) & (told["tensor"] == tensor)]
        if tensor is not None and len(told):
            return float(_first(told)["value"])
        lrs = self.train_column("lr")
        row_lr = number_or_none(lrs.loc[[step]].iloc[-1]) if step in lrs.index else None
        if model != "teacher" or row_lr is None:
            return row_lr
        options = self.config.get("options") or {}
        if self.caller == "cli" and options.get("student_lr") and options.get("router_lr") is not None:
            return row_lr * options["router_lr"] / options["student_lr"]
        return None

    def computes_in_bf16(self) -> bool:
        """Whether the forwards ran in bfloat16: bf16 weights, or bf16 autocast over wider ones."""
        precision = self.config.get("precision") or {}
        return self.mode in ("bf16-mixed", "pure-bf16") or precision.get("compute_dtype") == "bfloat16"

    def held_in_fp16(self, model: str | None) -> bool:
        """Whether this run holds some of a model's weights in float16: `precision.model_dtypes` (a user's loop) or
        `precision.param_dtypes` ({model: {role: {dtype: count}}}, `train`)."""
        precision = self.config.get("precision") or {}
        listed = (precision.get("model_dtypes") or {}).get(model) or []
        held = precision.get("param_dtypes")  # a caller's loop lists the trained weights' dtypes alone, for no model
        held = (held.get(model) or {}) if isinstance(held, dict) else {}
        roles = held.values() if isinstance(held, dict) else []
        return "float16" in listed or any(isinstance(d, dict) and "float16" in d for d in roles)

    def autocast_made_fp16(self, model: str | None) -> bool:
        """Whether a frozen model (`model`, else the teacher) computed in float16 only through a float16 autocast: the
        run computes in float16 while that model's weights, as a caller's loop lists them (`precision.model_dtypes`),
        hold no float16 — so loading it in another dtype changes nothing; its forward must leave the autocast."""
        teacher = model if self.is_teacher(model) else "teacher"
        listed = ((self.config.get("precision") or {}).get("model_dtypes") or {}).get(teacher) or []
        return bool(listed) and "float16" not in listed and self.computes_in_fp16()

    def updates_wide_weights(self) -> bool:
        """Whether the optimizer updates fp32 weights: fp32, or mixed precision's fp32 master weights (the
        `precision.master_dtype`, else the mode). Precision then inflates no update — a forward overflow is
        non-finite, and a step a loss scaler skips changes nothing — so a finite loss that triples is the step's
        size. In weights held in fp16 or bf16 it may be precision's doing (state underflow inflates updates):
        the rules for those speak."""
        master = (self.config.get("precision") or {}).get("master_dtype")
        return master in WIDE_WEIGHT_DTYPES if master else self.mode in ("fp32", "mixed", "bf16-mixed")

    def computes_in_fp16(self) -> bool:
        """Whether the forwards ran in float16: fp16 weights, or fp16 autocast over wider ones."""
        precision = self.config.get("precision") or {}
        return self.mode in ("mixed", "pure-fp16") or precision.get("compute_dtype") == "float16"

    def first_nonfinite_loss(self) -> pd.Series | None:
        """The run's first non-finite loss when it is the run's first non-finite value: nothing went wrong on an
        earlier step, nor on its own step before the loss (a forward output, the data) — only after it (the
        gradients and weights a non-finite loss makes non-finite, the update)."""
        losses = self.of("nonfinite_loss")
        if not len(losses):
            return None
        row = _first(losses)
        step = int(row["step"])
        limits = {"nonfinite_param": step, "nonfinite_grad": step, "extreme_update": step,
                  "nonfinite_activation": step + 1, "nonfinite_batch": step + 1, "empty_targets": step + 1,
                  "nonfinite_at_load": step + 1, "nonfinite_between_steps": step + 1}
        return None if any((self.of(kind)["step"] < limit).any() for kind, limit in limits.items()) else row

    def optimizer_made_nonfinite(self) -> pd.Series | None:
        """The first `nonfinite_param` event holding NaN — or Inf where its optimizer state overflowed float16 with
        it (`fp16_state_overflow`) — when the step that made it had every gradient measured finite
        (`nonfinite_grad_tensors` 0 in its row) and nothing non-finite or extreme came before — bad data, a loss, a
        gradient, an update as large as the weights: then the optimizer's own arithmetic made it. (Inf alone can be
        an update that overflows the weights' dtype: a learning-rate problem, `divergence`'s.)"""
        params = self.of("nonfinite_param")
        if not len(params):
            return None
        step = int(params["step"].min())
        limits = {"nonfinite_grad": step + 1, "nonfinite_loss": step + 1, "nonfinite_batch": step + 1,
                  "empty_targets": step + 1, "extreme_update": step, "nonfinite_at_load": step + 1,
                  "nonfinite_between_steps": step + 1}
        if any((self.of(kind)["step"] < before).any() for kind, before in limits.items()):
            return None
        bad_grads = self.train_column("nonfinite_grad_tensors")
        if step not in bad_grads.index or float(bad_grads.loc[[step]].iloc[-1]) != 0:
            return None
        state = self.fp16_state_overflow()
        made = params[(params["step"] == step) & ((params["nan_count"].fillna(0) > 0)
                                                  | params["tensor"].eq(None if state is None else state["tensor"]))]
        return _first(made) if len(made) else None

    def frozen_second_moment(self) -> pd.Series | None:
        """The `second_moment_inf` note: a second moment that holds Inf while its weight is finite, entries the
        optimizer never updates again — unless that weight turned non-finite by then (the state ruined it: another
        rule's)."""
        note = self.of("setup_note", "second_moment_inf")
        if not len(note):
            return None
        row = _first(note)
        params = self.of("nonfinite_param")
        ruined = params[(params["tensor"] == row.get("tensor")) & (params["step"] <= row["step"])]
        return None if len(ruined) else row

    def fp16_state_overflow(self) -> pd.Series | None:
        """The `optimizer_state_nonfinite` note where the state is float16: a momentum buffer or moment held in
        float16 that accumulated past 65504 (or a squared gradient beyond 256) — values no wider state overflows."""
        note = self.of("setup_note", "optimizer_state_nonfinite")
        note = note[note["dtype"] == "float16"]
        return _first(note) if len(note) else None

    def loss_from_finite_outputs(self) -> tuple[pd.Series, dict[str, float]] | None:
        """The run's first non-finite loss, first of the run, on a step whose module outputs were all measured
        finite — with those outputs' largest values per model: the non-finite value was made between the models'
        outputs and the loss."""
        row = self.first_nonfinite_loss()
        outputs = self.module_outputs_at(int(row["step"])) if row is not None else {}
        if not outputs or not all(math.isfinite(v) for v in outputs.values()):
            return None
        return row, outputs

    def teacher_alone_in_fp16(self) -> str | None:
        """A caller's own loss (sarkd-diag's `train` computes its KD term in fp32 whatever the teacher holds) over a
        teacher whose weights are all float16 while the student computes wider: its outputs reach the loss in
        float16. That teacher's name, or None."""
        precision = self.config.get("precision") or {}
        dtypes = precision.get("model_dtypes") or {}
        student_fp16 = "float16" in dtypes.get("student", []) or precision.get("compute_dtype") == "float16"
        if self.caller == "cli" or student_fp16:
            return None
        return next((t for t in sorted(self.teachers) if dtypes.get(t) == ["float16"]), None)

    def nonfinite_op(self, teachers: bool = False) -> tuple[pd.Series, float] | None:
        """The run's first non-finite module output when an operation undefined on its inputs made it, not an
        overflow — with the largest value measured up to it: nothing non-finite or extreme before it (bad data,
        weights, gradients, an update), and either nothing computed in float16 (its overflows are
        `activation_overflow`'s) and every module output and weight measured up to its step nowhere near its
        dtype's range (below DTYPE_MAX ** RANGE_EXPONENT), or a float16 output that, run again in float32 on the
        same finite inputs (`wide_replay`), was non-finite there too, or — computed in float16 elsewhere — a wider
        output (a float32 norm under float16 autocast) with every value measured nowhere near float16's range.
        Unmeasured magnitudes prove nothing: then None. `teachers`: also a frozen model's output — whose weights
        no probe reads after the first step, so only where they were read as loaded (`loaded_amax_<model>`): a
        frozen model's weights stay as loaded, and an average written into them (an EMA teacher) is bounded by the
        student's, which are read every step. A float16 output is judged by its float32 replay also in a run that
        computes nothing else in float16 (a teacher loaded in float16 beside an fp32 student)."""
        acts = self.of("nonfinite_activation")
        if not self.computes_in_fp16() and not (len(acts) and _first(acts).get("dtype") == "float16"):
            return self._nonfinite_from_small_values(DTYPE_MAX, teachers)
        replay = self.wide_replay()
        if replay is None:  # a wider output (a norm autocast runs in float32) is no float16 output to replay: judged
            # against float16's range, which what it computes inside may have run in
            return self._nonfinite_from_small_values({"float32": FP16_MAX, "bfloat16": FP16_MAX}, teachers)
        if math.isfinite(float(replay["value"])):
            return None
        return self._nonfinite_from_small_values({"float16": math.inf}, teachers)

    def wide_replay(self) -> pd.Series | None:
        """The `wide_replay` event of the run's first non-finite module output: that float16 module run again in
        float32 on finite inputs (its value: what it made there, NaN/Inf or its largest finite output)."""
        acts, replays = self.of("nonfinite_activation"), self.of("wide_replay")
        if not len(acts) or not len(replays):
            return None
        row = _first(acts)
        same = replays[(replays["model"] == row.get("model")) & (replays["module"] == row.get("module"))]
        return _first(same) if len(same) else None

    def zeroed_by_fp16(self) -> tuple[pd.Series, float] | None:
        """The run's lasting zero output (`zero_activation`) of a float16 module that, run again in float32 on the
        inputs and weights of a forward that made it (`wide_replay`, after it), is not 0 there — an intermediate
        float16 could not hold zeroed it (mean(x²) over values above 256 is Inf, and x · rsqrt(Inf) is 0) — with that
        float32 largest output. A zero that float32 makes too is the code's (a Dropout of 1, a gate of 0)."""
        dead, replays = self.of("zero_activation"), self.of("wide_replay")
        for _, row in dead[dead["dtype"] == "float16"].iterrows():
            same = replays[(replays["model"] == row["model"]) & (replays["module"] == row["module"])
                           & (replays["step"] >= row["step"])]
            wide = float(_first(same)["value"]) if len(same) else 0.0
            if math.isfinite(wide) and wide > 0:
                return row, wide
        return None

    def fp16_constant_op(self) -> tuple[pd.Series, float] | None:
        """The same reading in a run computing in float16: a float16 module output non-finite although every value
        measured up to it is below FP16_MAX ** RANGE_EXPONENT — no product of the data overflowed, so a constant of
        the code that float16 cannot hold did: a mask's fill value beyond 65504 (-1e9, float32's min) turns -inf and
        a fully masked row's softmax 0/0, an eps below 6e-8 turns 0 and a division by it Inf."""
        if not self.computes_in_fp16() or self.nonfinite_op() is not None:
            return None
        return self._nonfinite_from_small_values({"float16": FP16_MAX})

    def _nonfinite_from_small_values(self, maxima: dict[str, float],
                                     teachers: bool = False) -> tuple[pd.Series, float] | None:
        acts = self.of("nonfinite_activation")
        if not len(acts):
            return None
        row = _first(acts)
        if self.is_teacher(row.get("model")) and not (teachers and f"loaded_amax_{row.get('model')}" in self.metrics):
            return None  # its frozen weights unread: an Inf weight is as likely
        step, limit = int(row["step"]), maxima.get(row.get("dtype"))
        began = self.forward_fault_began(row)  # the steps before it that failed alike are its own
        limits = {"nonfinite_param": began, "nonfinite_grad": began, "extreme_update": began,
                  "nonfinite_loss": began, "nonfinite_batch": began + 1, "empty_targets": began + 1,
                  "nonfinite_at_load": began + 1, "nonfinite_between_steps": began + 1}
        if limit is None or any((self.of(kind)["step"] < before).any() for kind, before in limits.items()):
            return None
        if "step" not in self.metrics or "split" not in self.metrics:
            return None
        train = self.metrics[(self.metrics["split"] == "train") & (self.metrics["step"] <= step)]
        columns = [c for c in train.columns if c.startswith("act_amax_")]
        if not columns:
            return None
        outputs = pd.to_numeric(train[columns].stack(), errors="coerce").dropna()
        if not len(outputs):
            return None
        loaded = [c for c in train.columns if c.startswith("loaded_amax_")]  # the weights before any update
        weights = self.train_column("param_amax")
        measured = pd.concat([outputs, weights[weights.index < step],
                              pd.to_numeric(train[loaded].stack(), errors="coerce").dropna()])
        largest = float(measured[measured.map(math.isfinite)].max())
        return (row, largest) if largest < limit ** RANGE_EXPONENT else None

    def nonfinite_grad_op(self) -> tuple[pd.Series, float] | None:
        """The run's first non-finite gradient that reached the optimizer when an operation whose derivative is
        undefined (or infinite) at its input made it, not an overflow — with the largest value measured up to it:
        nothing computed in float16 (its backward overflows are the other rules'), it is the run's first
        non-finite value (no weight, loaded or updated, no activation, loss or batch at or before its step, no
        extreme update before it), and every magnitude measured up to it — the finite gradients of its own step and
        those before, module outputs, weights — is nowhere near the gradient dtype's range (below
        DTYPE_MAX ** RANGE_EXPONENT: no product of two of them overflows). A backward overflow needs huge values
        somewhere; a derivative at its singular point (d√x/dx at 0 = inf, times the 0 of an equal distance: NaN)
        needs none. Every gradient of its step non-finite (no finite one measured on it): the value entered at the
        loss end, and the gradients' scale is that of the steps before it — none measured then, None. Unmeasured
        magnitudes prove nothing: then None — unless the loss's own computation holds an operation singular at
        some input (`singular_derivative`, read off the loss's graph): then the loss and the forward's magnitudes up
        to it stand for the gradients' (a student that starts from its teacher's weights makes every gradient of
        step 1 NaN through the sqrt of an RMSE of 0)."""
        grads = self.of("nonfinite_grad", "grad_nonfinite_applied")
        if not len(grads) or self.computes_in_fp16():
            return None
        row = _first(grads)
        step, limit = int(row["step"]), DTYPE_MAX.get(row.get("dtype"))
        limits = {"nonfinite_grad": step, "nonfinite_param": step, "extreme_update": step,
                  "nonfinite_at_load": step + 1, "nonfinite_between_steps": step + 1,
                  "nonfinite_activation": step + 1, "nonfinite_loss": step + 1,
                  "nonfinite_batch": step + 1, "empty_targets": step + 1}
        if limit is None or any((self.of(kind)["step"] < before).any() for kind, before in limits.items()):
            return None
        # its step read as far as it got where the loop raised in it (`clip_grad_norm_(..., error_if_nonfinite=True)`)
        grad_amax = self.train_column("grad_amax", unfinished=True)
        grads_up_to_it = grad_amax[grad_amax.index <= step]  # finite ones: a step whose every gradient is not, none
        singular = self.singular_operation(step) is not None
        if step not in self.train_column("nonfinite_grad_tensors", unfinished=True).index \
                or not (len(grads_up_to_it) or singular):
            return None  # its step's gradients unmeasured, or no finite gradient measured on it or before it
        measured = [grads_up_to_it, self.train_column("param_amax").loc[lambda s: s.index < step]]
        if singular:  # no gradient measured: the loss's own magnitude bounds its gradient's scale instead
            measured.append(self.train_column("loss", unfinished=True).loc[lambda s: s.index <= step].abs())
        measured += [self.train_column(c, unfinished=True).loc[lambda s: s.index <= step]
                     for c in self.metrics.columns if str(c).startswith("act_amax_")]
        values = pd.concat(measured)
        values = values[values.map(math.isfinite)]
        largest = float(values.max())
        return (row, largest) if largest < limit ** RANGE_EXPONENT else None

    def loss_per_target(self, loss: float) -> float | None:
        """`loss` over the target tokens of the step whose finite loss was that large (`loss_targets` — a caller's
        loop, all its micro-batches' — or `train`'s `targets`): what each would carry were the loss their sum. None
        where no count was recorded."""
        losses = self.train_column("loss")
        steps = losses[losses.abs() == loss].index
        counts = pd.concat([self.train_column("loss_targets"), self.train_column("targets")])
        counts = counts[counts.index.isin(steps) & (counts > 0)]
        return loss / float(counts.iloc[0]) if len(counts) else None

    def largest_outputs(self) -> tuple[str, float] | None:
        """The model whose module outputs were measured largest over the run (finite `act_amax_<model>`), and that
        value; None where none was measured."""
        columns = (str(c) for c in self.metrics.columns if str(c).startswith("act_amax_"))
        found = {c.removeprefix("act_amax_"): v[v.map(math.isfinite)] for c in columns
                 if len(v := self.train_column(c))}
        found = {model: float(v.max()) for model, v in found.items() if len(v)}
        return max(found.items(), key=lambda item: item[1]) if found else None

    def singular_operation(self, step: int | None = None) -> str | None:
        """The operation of the caller's loss computation, singular at some input, that the probes read off the loss's
        graph when the run's gradients first turned non-finite (`singular_derivative`) — at `step` when one is given;
        None where none was."""
        rows = self.of("singular_derivative")
        rows = rows if step is None else rows[rows["step"] == step]
        return str(rows["tensor"].iloc[0]) if len(rows) else None

    def unplaced_fp16_loss(self) -> pd.Series | None:
        """The first non-finite loss of a float16-compute run, first of the run, on a step that took no module
        statistics (a `standard` step between statistics steps, in a loop that cannot replay it): in float16 the
        likeliest cause is a forward overflow, though no module can be named."""
        row = self.first_nonfinite_loss()
        if row is None or not self.computes_in_fp16() or self.module_outputs_at(int(row["step"])):
            return None
        return row

    def loss_trend(self, before: int | None = None) -> dict | None:
        """A training loss that climbs steadily (finite, below the blow-up): over a whole training run (each of
        `train_loss_runs` on its own), else its second half
        (a loss that fell, then climbed), the least-squares slope per step is LOSS_TREND_T standard errors above 0
        and the fitted rise over the window is at least LOSS_TREND_RISE of the fitted start's magnitude. Losses from
        step `before` on are left out. A healthy run's loss falls or levels off, its noise around that
        (small batches) measured by the residuals: only a rise that stands out of that noise is a trend."""
        for loss in self.train_loss_runs():  # each training run on its own
            if before is not None:
                loss = loss[loss.index < before]
            for window in (loss, loss.iloc[len(loss) // 2:]):
                fit = _rising(window)
                if fit is not None:
                    return fit
        return None

    def loss_unbounded_below(self, before: int | None = None) -> dict | None:
        """A training loss that falls steadily far below 0 (`_falling_below_zero`), its finite losses before step
        `before`."""
        loss = self.train_column("loss")
        loss = loss[loss.map(math.isfinite)]
        return _falling_below_zero(loss if before is None else loss[loss.index < before])

    def module_outputs_at(self, step: int) -> dict[str, float]:
        """Each model's largest module output on a training step that measured them: a statistics step's
        `act_amax_<model>` columns, or the `forward_replay` events of a step replayed after its non-finite loss
        (every output finite there); empty where neither measured them."""
        replayed = self.of("forward_replay")
        replayed = replayed[replayed["step"] == step]
        if len(replayed):
            return {str(e["model"]): float(e["value"]) for _, e in replayed.iterrows()}
        if "step" not in self.metrics or "split" not in self.metrics:
            return {}
        rows = self.metrics[(self.metrics["split"] == "train") & (self.metrics["step"] == step)]
        columns = [c for c in rows.columns if c.startswith("act_amax_")]
        values = {c.removeprefix("act_amax_"): number_or_none(rows[c].iloc[-1]) for c in columns if len(rows)}
        return {model: v for model, v in values.items() if v is not None}

    def forward_fault_began(self, act: pd.Series) -> int:
        """The step a non-finite module output (`act`, a `nonfinite_activation` event) began: the first of the steps
        just before it, back to the run's first non-finite loss at most, that had a non-finite loss, took no module
        statistics and changed no weight (a loss scaler, or the loop, skipped each), when the event's own loss is
        non-finite too: those steps ran the weights the event's step ran and failed alike, where no module could be
        named — a caller's loop does not replay a step, so the module shows only at the next statistics step."""
        step, first = int(act["step"]), self.first_nonfinite_loss()
        if first is None or int(first["step"]) >= step or "loss" not in self.metrics:
            return step
        train = self.metrics[self.metrics["split"] == "train"].drop_duplicates("step", keep="last").set_index("step")
        loss = pd.to_numeric(train["loss"], errors="coerce")
        skipped = set(self.of("scaler_skip")["step"].astype(int))
        if "skipped" in train:
            skipped |= set(train.index[pd.to_numeric(train["skipped"], errors="coerce") == 1].astype(int))
        if step not in loss.index or math.isfinite(loss[step]):
            return step
        began = step
        while (began > int(first["step"]) and began - 1 in loss.index and not math.isfinite(loss[began - 1])
               and began - 1 in skipped and not self.module_outputs_at(began - 1)):
            began -= 1
        return began

    def forward_fault_began_at(self, step: int) -> bool:
        """Whether either model's first non-finite module output began at `step` (`forward_fault_began`): a loss
        that failed there is placed, in the student (`activation_overflow`) or the teacher (`teacher_overflow`)."""
        acts = self.of("nonfinite_activation")
        by_model = acts.groupby(acts["model"].astype(str))
        return any(self.forward_fault_began(_first(rows)) == step for _, rows in by_model)

    def weight_growth(self) -> float | None:
        """How many times the largest weight grew, at most, within WEIGHT_GROWTH_WINDOW steps (finite readings)."""
        amax = self.train_column("param_amax")
        amax = amax[amax.map(math.isfinite) & (amax > 0)]
        if len(amax) < 2:
            return None
        earlier = amax.rolling(WEIGHT_GROWTH_WINDOW, min_periods=1).min().shift(1)
        return float((amax / earlier).max())

    def weight_shrink(self) -> tuple[int, float, float] | None:
        """The first step at which the largest weight (`param_amax`, finite readings before any weight turned
        non-finite — then the largest finite one says nothing) fell below 1/WEIGHT_GROWTH_FACTOR of its largest
        value within the WEIGHT_GROWTH_WINDOW steps before: (step, that value, the fallen one). The mirror of
        `weight_growth`: healthy training does not halve its largest weight in ten steps."""
        amax = self.train_column("param_amax")
        bad = self.first_nonfinite_param_step()
        if bad is not None:
            amax = amax[amax.index < bad]
        amax = amax[amax.map(math.isfinite) & (amax > 0)]
        if len(amax) < 2:
            return None
        earlier = amax.rolling(WEIGHT_GROWTH_WINDOW, min_periods=1).max().shift(1)
        fallen = amax[amax * WEIGHT_GROWTH_FACTOR < earlier]
        if not len(fallen):
            return None
        step = fallen.index[0]
        return int(step), float(earlier.loc[step]), float(fallen.iloc[0])

    def updates_inflated(self) -> bool:
        """An optimizer step far beyond healthy training, or the weights growing: updates are not being lost."""
        growth = self.weight_growth()
        return len(self.of("extreme_update")) > 0 or (growth is not None and growth > WEIGHT_GROWTH_FACTOR)

    def gradients_below_fp32(self, model: str | None) -> float | None:
        """Of `model`'s second moments a 16-bit state flushed, the share a float32 state would flush too (a
        `gradients_below_fp32` note): gradients too small for any precision. None where no such note was recorded."""
        note = self.of("setup_note", "gradients_below_fp32")
        note = note[note["model"] == model]
        return float(note["value"].max()) if len(note) else None

    def is_router(self, module: str | None) -> bool:
        """A module `train` found as a router, or one named as routers are — or the layer a router holds (Switch
        Transformers' and NLLB-MoE's `router.classifier`, DeepSpeed-MoE's `gate.wg`: the first to overflow is that
        layer) — outside any expert (whose `gate_proj` is no router)."""
        if not module:
            return False
        if module in self.routers:
            return True
        *parents, last = module.split(".")
        return not any("expert" in p for p in parents) and (
            last in ROUTER_NAMES or (bool(parents) and parents[-1] in ROUTER_NAMES))

    def fix(self, template: str, *, model: str | None = None, **values) -> str:
        """A fix in the caller's words, for the precision the run computes in (`BF16_FIXES` under bfloat16). `model`:
        the model of the tensor the fix is about (the student where none is named) — a teacher's trainable tensors train
        at the teacher's lr, from the loss terms that reach the teacher, so those are the lr and the weights the fix
        names; a model trained through adapters gets its mixed precision from fp32 adapters, its base left frozen."""
        words = {concept: phrases[self.caller] for concept, phrases in PHRASES.items()}
        words["clip_option"] = words["clip"]  # the option alone, where a fix suspects a threshold that is too low
        threshold = self.clip_threshold()
        if threshold is not None and threshold > 0:  # "clip with X" to a run that clips: at what, what it cannot do
            words["clip"] += (f" (the run clips at {threshold:g} already: a lower threshold bounds the gradient, but "
                              "an Adam-type step is about the lr whatever the gradient)")
        if model == "teacher":
            words["lr"], words["loss_weights"] = words["teacher_lr"], words["teacher_loss_weights"]
        if (model or "student") in self.adapted_models:
            words["mixed"], words["bf16_mixed"] = words["mixed_adapters"], words["bf16_mixed_adapters"]
            words["fp32_weights"] = words["fp32_weights_adapters"]
        words["teacher_wider"] = (words["teacher_out_of_fp16_autocast"] if self.autocast_made_fp16(model)
                                  else "hold the teacher in a wider dtype — " + words["fp32_teacher"])
        words.update({k: ("?" if v is None else v) for k, v in {**values, "model": model}.items()})
        text = BF16_FIXES.get(template) if self.computes_in_bf16() else None
        return (text or FIXES[template]).format_map(_Blank(words))


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def _first(frame: pd.DataFrame) -> pd.Series:
    return frame.sort_values(["step", "time"], kind="stable").iloc[0]


def _rising(loss: pd.Series) -> dict | None:
    """The least-squares line through a window of losses when it rises by LOSS_TREND_T standard errors and by
    LOSS_TREND_RISE of its start: its first and last step, slope per step, t, start and rise; else None."""
    if len(loss) < LOSS_TREND_MIN_STEPS or (loss <= 0).any():
        return None  # a loss that reaches 0 or below is no CE/KD/MSE falling toward a floor (an RL surrogate, a
        # log-ratio: GRPO's starts at 0 and wanders): its rise says nothing, and 10% of a start near 0 is no bar
    fit = _line(loss)
    return fit if fit["t"] >= LOSS_TREND_T and fit["rise"] >= LOSS_TREND_RISE * abs(fit["start"]) else None


def _falling_below_zero(loss: pd.Series) -> dict | None:
    """The least-squares line through the run's losses when it ended below 0, fell by at least twice its first
    value's magnitude — from above 0 to as far below it, or, wholly negated (`-(ce + kd)`), from below 0 to three
    times its first value, the mirror of a blow-up — fell LOSS_TREND_T standard errors of its noise below flat, and
    did not slow: a loss unbounded below. A CE, KL or squared error never goes below 0; an RL surrogate that wanders
    around 0 falls no steady line that far; else None."""
    first, last = loss.iloc[0] if len(loss) else 0.0, loss.iloc[-1] if len(loss) else 0.0
    if len(loss) < LOSS_TREND_MIN_STEPS or first == 0 or not last < 0 or first - last < 2 * abs(first):
        return None
    fit = _line(loss)
    # and it keeps falling: a loss bounded below slows as it settles toward its floor (SLOWEST_UNBOUNDED_FALL)
    early, late = _line(loss.iloc[:len(loss) // 2 + 1]), _line(loss.iloc[len(loss) // 2:])
    return fit if fit["t"] <= -LOSS_TREND_T and late["slope"] <= SLOWEST_UNBOUNDED_FALL * early["slope"] else None


def _line(loss: pd.Series) -> dict:
    """The least-squares line through losses by step: first and last step, slope per step, its standard errors
    (`t`, against the residuals' noise), fitted start and rise over the window."""
    steps, values = loss.index.to_numpy(dtype=float), loss.to_numpy(dtype=float)
    centred = steps - steps.mean()
    spread = float((centred**2).sum())
    slope = float((centred * (values - values.mean())).sum() / spread)
    residuals = values - values.mean() - slope * centred
    noise = math.sqrt(float((residuals**2).sum()) / (len(values) - 2))
    t = slope / (noise / math.sqrt(spread)) if noise > 0 else math.copysign(math.inf, slope) if slope else 0.0
    start = float(values.mean() + slope * centred[0])
    rise = slope * float(steps[-1] - steps[0])
    return {"first": int(steps[0]), "last": int(steps[-1]), "slope": slope, "t": t, "start": start, "rise": rise,
            "noise": noise}


def _holds(row: pd.Series) -> str:
    """Which of NaN, +Inf and -Inf an event's tensor holds, from its counts ("NaN/Inf" where none was counted)."""
    held = [kind for kind, column in (("NaN", "nan_count"), ("+Inf", "posinf_count"), ("-Inf", "neginf_count"))
            if number_or_none(row.get(column)) or 0]
    return ", ".join(held) or "NaN/Inf"


def _holds_value(row: pd.Series) -> str:
    """NaN or Inf, from an uncounted event's value (an activation's: NaN where its one-pass min/max was NaN)."""
    value = number_or_none(row.get("value"))
    return "NaN" if value is None or math.isnan(value) else "Inf"


def _where(row: pd.Series) -> dict:
    """The place an event names: its model, module and tensor, its first step, phase and rank."""
    def text(value):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return {"model": text(row.get("model")), "module": text(row.get("module")), "tensor": text(row.get("tensor")),
            "first_step": int(row["step"]), "phase": text(row.get("phase")) or "optimizer",
            "rank": int(row.get("rank") or 0)}


def _where_began(r: RunRecord, act: pd.Series) -> tuple[dict, dict]:
    """Where a non-finite module output is placed — its model and module, at the step its fault began
    (`RunRecord.forward_fault_began`) — and, where that is before the step that named the module, the evidence
    that says so."""
    where, named = _where(act), int(act["step"])
    began = r.forward_fault_began(act)
    return {**where, "first_step": began}, ({"loss_nonfinite_since": began, "module_named_at_step": named}
                                            if began < named else {})


# ------------------------------------------------------------------------------------------------ rules
def _cast_to_fp16(r: RunRecord, row: pd.Series) -> bool:
    """A weight non-finite as loaded that float16 itself made: ±Inf and no NaN, in a model this run holds in float16
    (the tensor itself, or the model's other weights: mixed precision loads the teacher in float16 and only then
    gives its routers fp32 master weights) — a value beyond 65504 in a checkpoint saved wider, cast to float16 at
    load. The checkpoint may be sound; its dtype here is not — unless the file it was loaded from was read and holds
    the Inf itself (`nonfinite_in_checkpoint`: an fp16 export that overflowed, a torn write): then it is the file's."""
    inf_only = not number_or_none(row.get("nan_count")) and \
        bool(number_or_none(row.get("posinf_count")) or number_or_none(row.get("neginf_count")))
    return inf_only and row.get("code") != "nonfinite_in_checkpoint" and (
        row.get("dtype") == "float16" or r.held_in_fp16(row.get("model")))


def nonfinite_input(r: RunRecord) -> list[Cause]:
    """Bad data: NaN in a batch's inputs, or a batch without target tokens (0/0) — critical when its loss
    turned non-finite, a warning while it did not. Or bad weights: a model's weight non-finite before the first
    optimizer step (`nonfinite_at_load`), as loaded — a corrupt checkpoint, the earliest thing any run can get
    wrong; every non-finite value after it follows from it. (The teacher's float16 weights that are Inf only, which
    the cast to float16 made, are `teacher_overflow`'s: its dtype, not its checkpoint.)"""
    causes = []
    loaded = r.of("nonfinite_at_load")
    loaded = loaded[~loaded.apply(lambda row: r.is_teacher(row.get("model")) and _cast_to_fp16(r, row), axis=1)] \
        if len(loaded) else loaded
    if len(loaded):
        row = _first(loaded)
        holds, cast = _holds(row), _cast_to_fp16(r, row)
        # a bad weight that reached nothing — no non-finite value anywhere over steps whose losses were all finite
        # (entries no batch used: the embedding rows of tokens the data never holds) — has harmed no step yet
        loss = r.train_column("loss")
        latent = len(loss) > 0 and bool(loss.map(math.isfinite).all()) and not any(
            len(r.of(kind)) for kind in ("nonfinite_activation", "nonfinite_loss", "nonfinite_grad", "nonfinite_param"))
        template = "nonfinite_weights_latent" if latent else \
            "nonfinite_weights_fp16" if cast else "nonfinite_weights_loaded"
        causes.append(Cause("nonfinite_input", "warning" if latent else "critical", **_where(row),
                            evidence={"nonfinite_before_first_step": True, "holds": holds, "dtype": row.get("dtype"),
                                      "cast_to_float16": cast, "nan_count": row.get("nan_count"),
                                      "numel": row.get("numel"),
                                      "models": ", ".join(sorted(set(loaded["model"].dropna()))),
                                      **({"reached_nothing_in_steps": len(loss)} if latent else {})},
                            fix=r.fix(template, model=row.get("model"), tensor=row.get("tensor"), holds=holds,
                                      steps=len(loss))))
    batch = r.of("nonfinite_batch")
    if len(batch):
        causes.append(Cause("nonfinite_input", "critical", **_where(_first(batch)),
                            evidence={"nan_input_batches": len(batch)}, fix=r.fix("nonfinite_input")))
    empty, losses = r.of("empty_targets"), r.of("nonfinite_loss")
    if len(empty):
        hit = losses[losses["step"].isin(empty["step"])]
        row = _first(empty[empty["step"].isin(hit["step"])] if len(hit) else empty)  # the batch that made the NaN
        causes.append(Cause("nonfinite_input", "critical" if len(hit) else "warning", **_where(row),
                            evidence={"empty_target_batches": len(empty), "nonfinite_loss_events": len(losses),
                                      "nonfinite_loss_on_empty_step": bool(len(hit))},
                            fix=r.fix("nonfinite_input")))
    return causes


# what a blow-up leaves in the events: a non-finite value anywhere, or an update as large as the weights
BLOW_UPS = ("nonfinite_param", "nonfinite_activation", "nonfinite_loss", "nonfinite_grad", "extreme_update")


def weights_edited(r: RunRecord) -> list[Cause]:
    """The caller's code changed the weights between an optimizer step and the next training forward: critical where
    it made a weight non-finite (`nonfinite_between_steps`: every NaN after it follows from it, placed at the edit
    and the step whose forward first saw it, not at the next update), a warning where it rescaled a tensor by more
    than WEIGHT_EDIT_FACTOR (a `weights_edited` warning) — critical once something blew up from its step on (a
    non-finite value, an update as large as the weights: the rescaled weights' doing, which `rank` folds into it).
    A smaller edit (a clamp, an EMA swap) is the event alone."""
    causes = []
    for kind, severity in (("nonfinite_between_steps", "critical"), ("weights_edited", "warning")):
        events = r.of(kind)
        events = events[events["severity"] == severity]
        if not len(events):
            continue
        row = _first(events)
        step, after, holds = int(row["step"]), _finite_after(r, row), _holds_value(row)
        fix = r.fix("weights_edited", model=row.get("model"), tensor=row.get("tensor"), after=after, step=step,
                    factor=f"{float(row['value']):.3g}")
        evidence = {"finite_after_optimizer_step": after, "edited_before_forward_of_step": step}
        if kind == "weights_edited":
            then = [f"{later}@{int(r.of(later)['step'].min())}" for later in BLOW_UPS
                    if (r.of(later)["step"] >= step).any()]
            blown = r.blown_up_losses()
            blown = blown[blown.index >= step]
            if len(blown):  # a finite loss that blew up from the edit on is the rescaled weights' doing too
                then.append(f"loss_blow_up@{int(blown.index[0])}")
            severity = "critical" if then else severity
            evidence.update(largest_value_factor=row["value"], then=", ".join(then) or None)
        else:
            after, fix = _written_nonfinite(r, row)
            evidence.update(holds=holds, finite_after_optimizer_step=after)
        causes.append(Cause("weights_edited", severity, **_where(row), evidence=evidence, fix=fix))
    return causes


def _finite_after(r: RunRecord, edit: pd.Series) -> int | None:
    """The last optimizer step whose weights were read before the edit the `edit` event saw at its step's forward."""
    updated = r.train_column("param_amax").index
    before = updated[updated < int(edit["step"])]
    return int(before.max()) if len(before) else None


def _written_nonfinite(r: RunRecord, row: pd.Series) -> tuple[int | None, str]:
    """A weight written NaN/Inf (a `nonfinite_between_steps` event): the optimizer step after which it was last read
    finite, and the fix — in a model nothing trains (a teacher), whose weights were last read as loaded, none."""
    frozen = r.is_teacher(row.get("model"))
    after = None if frozen else _finite_after(r, row)
    return after, r.fix("weights_edited_nonfinite_frozen" if frozen else "weights_edited_nonfinite",
                        model=row.get("model"), tensor=row.get("tensor"), holds=_holds_value(row), after=after,
                        step=int(row["step"]))


def teacher_dropout(r: RunRecord) -> list[Cause]:
    """A frozen model's training forwards in train() mode with dropout on (a `teacher_dropout_on` note): the KD targets
    come through a random mask each forward — noisy, not deterministic — while nothing of it trains. A warning:
    nothing non-finite, and the loss reads as any noisy loss."""
    note = r.of("setup_note", "teacher_dropout_on")
    if not len(note):
        return []
    row = _first(note)
    return [Cause("teacher_dropout", "warning", **_where(row),
                  evidence={"dropout_p": float(row["value"]), "dropout_modules": int(row.get("numel") or 0)},
                  fix=r.fix("teacher_dropout", model=row.get("model"), module=row.get("module"),
                            p=f"{float(row['value']):g}"))]


def kd_input_invalid(r: RunRecord) -> list[Cause]:
    """`F.kl_div` handed an input that is no log-probability (a `kl_input_not_log_probs` note), or probabilities as the
    target it takes as log-probabilities under `log_target=True` (`kl_target_not_log_probs`): what it returns is no
    divergence — negative, or flat however the student learns — and nothing non-finite shows it. Critical: the KD
    objective the run optimises is not the one meant."""
    note = r.of("setup_note", "kl_input_not_log_probs", "kl_target_not_log_probs")
    if not len(note):
        return []
    row = _first(note)
    target = row.get("code") == "kl_target_not_log_probs"
    return [Cause("kd_input_invalid", "critical", **_where(row),
                  evidence={"target_max" if target else "input_max": float(row["value"])},
                  fix=r.fix("kd_target_invalid" if target else "kd_input_invalid", amax=f"{float(row['value']):.3g}"))]


NEGATIVE_TERM_REMEDIES = {
    "kd": "compute KL(teacher ‖ student) as Σ q·(log q − log p), q the teacher's softmax and log p the student's "
          "log_softmax (`F.kl_div(log_p, log_q, log_target=True)`): a sign flipped or the two logs swapped makes it "
          "negative",
    "ce": "compute it as −Σ y·log p over the student's log_softmax (`F.cross_entropy(logits, labels)`): a minus sign "
          "lost, or a log of values that are no probabilities, makes it negative",
}


def loss_term_negative(r: RunRecord) -> list[Cause]:
    """A term named a divergence (`kd`) or a cross-entropy (`ce`) below 0 (a `loss_term_negative` note): it is no such
    thing, and nothing non-finite shows it — a negated KD term even lets the total fall as a loss should while the
    student moves away from its teacher. Critical: the objective the run optimises is not the one meant. Not where
    `F.kl_div` was handed probabilities (`kd_input_invalid`, which makes such a term negative and says why)."""
    note = r.of("setup_note", "loss_term_negative")
    if not len(note) or len(r.of("setup_note", "kl_input_not_log_probs")):
        return []
    row = _first(note)
    term, value = row.get("tensor"), float(row["value"])
    return [Cause("loss_term_negative", "critical", **_where(row), evidence={"term_value": value},
                  fix=r.fix("loss_term_negative", term=term, value=f"{value:.4g}", step=int(row["step"]),
                            what=NONNEGATIVE_TERMS.get(term, "divergence or cross-entropy"),
                            away="its teacher" if term == "kd" else "its labels",
                            remedy=NEGATIVE_TERM_REMEDIES.get(term, "check the term's sign")))]


def teacher_overflow(r: RunRecord) -> list[Cause]:
    """The teacher's forward turns non-finite: its outputs poison the KD target, whatever the student does. Or, in
    a caller's own loss, a float16 teacher alone whose finite outputs the loss made non-finite: the KD term's
    softmax of float16 logits underflows and its log is -inf (`RunRecord.teacher_alone_in_fp16`). A teacher output
    made NaN/Inf from values nowhere near its dtype's range (its weights as loaded, every output measured) is no
    overflow but an operation undefined on its inputs (`RunRecord.nonfinite_op`): a left-padded batch under a causal
    mask leaves a padded row's softmax nothing to attend to — its fix is the mask, not a wider dtype."""
    acts = r.of("nonfinite_activation")
    acts = acts[acts["model"].isin(r.teachers)]
    written = r.weight_written_nonfinite()  # a weight the loop wrote NaN/Inf: what follows is `divergence`'s
    if written is not None:
        acts = acts[acts["step"] < written["step"]]
    loaded = r.of("nonfinite_at_load")
    loaded = loaded[loaded["model"].isin(r.teachers)]
    if len(loaded):
        row = _first(loaded)
        if not _cast_to_fp16(r, row):
            acts = acts[:0]  # corrupt as loaded (`nonfinite_input`): no overflow made its outputs
        else:  # float16 made its weights Inf at load: the same remedy as an overflow, placed at the weight
            where = _where(row)
            router = r.is_router(where["module"])
            return [Cause("teacher_overflow", "critical", **where,
                          evidence={"dtype": "float16", "holds": _holds(row), "weights_beyond_float16": True,
                                    "router": router},
                          fix=r.fix("teacher_router_overflow" if router else "teacher_weights_fp16",
                                    model=where["model"], module=where["module"], dtype="float16"))]
    measured = r.loss_from_finite_outputs()
    teacher = r.teacher_alone_in_fp16()
    if not len(acts) and measured is not None and teacher:
        row, outputs = measured
        term = "loss" if row.get("tensor") == "loss" else f"{row.get('tensor')} loss term"
        # a teacher that ran no forward on that step (its outputs precomputed) made them where no probe looked
        seen = teacher in outputs
        fix = (r.fix("teacher_loss_fp16", term=term, amax=f"{outputs[teacher]:.3g}") if seen
               else r.fix("teacher_unseen_fp16", term=term))
        return [Cause("teacher_overflow", "critical", **{**_where(row), "model": teacher},
                      evidence={"teacher_dtype": "float16", "loss_term": row.get("tensor"),
                                "module_outputs_finite": True, "teacher_outputs_measured": seen,
                                **{f"act_amax_{model}": v for model, v in outputs.items()}},
                      fix=fix)]
    if not len(acts):
        return []
    row = _first(acts)
    beyond = _loaded_beyond_fp16(r, row)
    if beyond is not None:
        return [beyond]
    where, named = _where_began(r, row)
    op = r.nonfinite_op(teachers=True)
    if op is not None and op[0].get("model") == row.get("model"):  # no overflow: an operation undefined on its inputs
        evidence, fix = _undefined_op(r, row, op[1], f"the teacher's {row.get('module') or 'forward'}")
        return [Cause("teacher_overflow", "critical", **where,
                      evidence={"teacher_nonfinite_modules": len(acts), "dtype": row.get("dtype"),
                                "undefined_operation": True, **evidence, **named}, fix=fix)]
    router = r.is_router(where["module"])
    return [Cause("teacher_overflow", "critical", **where,
                  evidence={"teacher_nonfinite_modules": len(acts), "dtype": row.get("dtype"), "router": router,
                            **named},
                  fix=r.fix("teacher_router_overflow" if router else "teacher_overflow_wide"
                            if row.get("dtype") in ("float32", "bfloat16", "float64") else "teacher_overflow",
                            model=where["model"], module=where["module"], dtype=row.get("dtype")))]


def optimizer_eps_underflow(r: RunRecord) -> list[Cause]:
    """An eps that is 0 in the weights' dtype: the first entry whose squared gradient is also 0 divides by zero."""
    eps = r.of("optimizer_preflight", "eps_zero")
    if not len(eps):
        return []
    row = _first(eps)
    where = _where(row)
    first_bad = r.first_nonfinite_param_step()
    if first_bad is not None:
        where["first_step"] = first_bad
    set_to_zero = row["value"] == 0  # the caller's setting, not a rounding: no dtype makes it representable
    return [Cause("optimizer_eps_underflow", "critical" if first_bad is not None or not set_to_zero else "warning",
                  **where,
                  evidence={"eps": row["value"], "dtype": row["dtype"], "first_nonfinite_param_step": first_bad,
                            "nonfinite_param_events": len(r.of("nonfinite_param")), "eps_set_to_zero": set_to_zero},
                  fix=r.fix("optimizer_eps_zero" if set_to_zero else "optimizer_eps_underflow",
                            eps=f"{row['value']:g}"))]


def _second_moment_frozen(r: RunRecord) -> list[Cause]:
    """`optimizer_nonfinite`'s other half: a second moment that holds Inf while its weight stays finite
    (`RunRecord.frozen_second_moment`): those entries never update again (m / √Inf = 0) — critical, placed at the
    tensor and the statistics step that found it (it happened at or before it); the updates it loses are its
    evidence, not `update_underflow`'s."""
    row = r.frozen_second_moment()
    if row is None:
        return []
    dtype = row.get("dtype")
    limit = DTYPE_MAX.get(dtype, FP16_MAX if dtype == "float16" else None)
    return [Cause("optimizer_nonfinite", "critical", **_where(row),
                  evidence={"state": "exp_avg_sq", "state_dtype": dtype, "weights_finite": True,
                            "frozen_entries": number_or_none(row.get("value"))},
                  fix=r.fix("optimizer_state_frozen", model=row.get("model"), tensor=row.get("tensor"), dtype=dtype,
                            frozen=int(row["value"]) if number_or_none(row.get("value")) is not None else None,
                            step=int(row["step"]), limit=f"{math.sqrt(limit):.3g}" if limit else None))]


def optimizer_nonfinite(r: RunRecord) -> list[Cause]:
    """The optimizer's own numbers made the weights non-finite: a parameter group's learning rate that is NaN/Inf
    (a `nonfinite_lr` event), or NaN weights after a step whose gradients were all finite
    (`RunRecord.optimizer_made_nonfinite`). An eps that is 0 and a flushed state have rules of their own. Before them,
    a second moment gone Inf under a finite weight (`_second_moment_frozen`): the optimizer's numbers froze it."""
    return _second_moment_frozen(r) + _weights_made_nonfinite(r)


def _weights_made_nonfinite(r: RunRecord) -> list[Cause]:
    lrs, made = r.of("nonfinite_lr"), r.optimizer_made_nonfinite()
    if (not len(lrs) and made is None) or len(r.of("optimizer_preflight", "eps_zero")) \
            or len(r.of("optimizer_state_underflow")):
        return []
    where = _where(made if made is not None else _first(lrs))
    evidence = {"gradients_finite": made is not None, "nonfinite_param_events": len(r.of("nonfinite_param"))}
    if made is not None:
        evidence["grad_amax"] = number_or_none(r.train_column("grad_amax").get(where["first_step"]))
    if len(lrs):
        lr = _first(lrs)
        evidence.update(lr_nonfinite=lr.get("tensor"), lr_value=str(lr["value"]), lr_step=int(lr["step"]))
        return [Cause("optimizer_nonfinite", "critical", **where, evidence=evidence,
                      fix=r.fix("optimizer_lr_nonfinite", model=lr.get("model"), group=lr.get("tensor"),
                                lr_value=str(lr["value"]), step=int(lr["step"])))]
    state = r.fp16_state_overflow()
    if state is not None and state["tensor"] == where["tensor"]:
        evidence["state_dtype"] = "float16"
        return [Cause("optimizer_nonfinite", "critical", **where, evidence=evidence,
                      fix=r.fix("optimizer_state_overflow", model=where["model"], tensor=where["tensor"]))]
    return [Cause("optimizer_nonfinite", "critical", **where, evidence=evidence, fix=r.fix("optimizer_nonfinite"))]


def lr_zero(r: RunRecord) -> list[Cause]:
    """Every parameter group that holds trainable weights at lr 0 on consecutive optimizer steps (a `zero_lr` event:
    a warm-up's lr is 0 for its first step only): nothing trains from there, whatever the numerics — or, where the
    recorded lr rose from 0 later in the run, nothing trained on those steps (a warm-up from 0 stepped once per
    epoch): the fix says which steps, not that the run cannot move."""
    zero = r.of("zero_lr")
    if not len(zero):
        return []
    row = _first(zero)
    step, lr = int(row["step"]), r.train_column("lr")
    since = lr[lr.index >= step]
    rose = since[since != 0]
    held = since[since.index < rose.index[0]] if len(rose) else since
    steps = int((held == 0).sum()) if len(lr) else None
    words = {"model": row.get("model"), "group": row.get("tensor"), "step": step}
    fix = r.fix("lr_zero_ended", **words, last=int(held.index[-1]), steps=steps, rose=int(rose.index[0]),
                lr_after=f"{float(rose.iloc[0]):.3g}") if len(rose) and len(held) else r.fix("lr_zero", **words)
    return [Cause("lr_zero", "warning", **_where(row),
                  evidence={"lr": 0.0, "steps_at_lr_0": steps,
                            "lr_rose_at_step": int(rose.index[0]) if len(rose) else None}, fix=fix)]


def lr_negative(r: RunRecord) -> list[Cause]:
    """A parameter group's learning rate below 0 (a `negative_lr` event): the optimizer climbs the loss, every value
    finite — the schedule's doing (torch's optimizers refuse a negative lr at construction), not the numerics. A
    warning: an ascent can be meant (unlearning); the evidence says what the loss did from there."""
    negative = r.of("negative_lr")
    if not len(negative):
        return []
    row = _first(negative)
    step = int(row["step"])
    lr, loss = r.train_column("lr"), r.train_column("loss")
    loss = loss[loss.index >= step]
    then, last = (number_or_none(loss.iloc[0]), number_or_none(loss.iloc[-1])) if len(loss) else (None, None)
    return [Cause("lr_negative", "warning", **_where(row),
                  evidence={"lr_value": float(row["value"]), "steps_at_negative_lr": int((lr < 0).sum()),
                            "loss_at_first_negative_step": then, "last_loss": last},
                  fix=r.fix("lr_negative", model=row.get("model"), group=row.get("tensor"),
                            lr_value=f"{float(row['value']):.3g}", step=step,
                            loss_then=f"{then:.4g}" if then is not None else "?",
                            loss_last=f"{last:.4g}" if last is not None else "?",
                            last=int(loss.index[-1]) if len(loss) else "?"))]


def weight_collapse(r: RunRecord) -> list[Cause]:
    """The weights shrink toward zero (`RunRecord.weight_shrink`: the largest weight halved within
    WEIGHT_GROWTH_WINDOW steps) with nothing extreme before it — measured, never predicted alone; placed at a
    group whose lr × weight_decay alone halves its weights that fast (a `weight_decay_large` preflight event),
    when there is one."""
    shrink = r.weight_shrink()
    if shrink is None:
        return []
    step, before, after = shrink
    if (r.of("extreme_update")["step"] <= step).any():
        return []  # steps as large as the weights: `divergence`
    decay = r.of("optimizer_preflight", "weight_decay_large")
    evidence = {"largest_weight_before": before, "largest_weight_after": after, "window": WEIGHT_GROWTH_WINDOW}
    if len(decay):
        row = _first(decay)
        value = float(row["value"])
        return [Cause("weight_collapse", "warning", **{**_where(row), "first_step": step},
                      evidence={**evidence, "lr_times_weight_decay": value},
                      fix=r.fix("weight_collapse_decay", group=row.get("tensor"), factor=f"{1 - value:.3g}",
                                decay=f"{value:.3g}", before=f"{before:.3g}", after=f"{after:.3g}", step=step))]
    return [Cause("weight_collapse", "warning", first_step=step, model="student", evidence=evidence,
                  fix=r.fix("weight_collapse", before=f"{before:.3g}", after=f"{after:.3g}", step=step,
                            window=WEIGHT_GROWTH_WINDOW))]


def weight_decay_lost(r: RunRecord) -> list[Cause]:
    """Weight decay that rounds away (a `weight_decay_zero` preflight event): each step's factor 1 − lr × weight_decay
    leaves the weights as they were in their dtype — predicted before the first step, measured on the weights. In
    low-precision weights fp32 master weights keep it; in fp32 weights the value given is the mistake. Where updates
    are lost to rounding too (`update_underflow`), the lr is too small for the weights and the decay, lr × a
    weight_decay below 1, goes with them: that cause and its fix cover both — not where only a few whole tensors
    lose their updates (a norm's gain at 1.0), while the decay of every weight rounds away. A finding, not
    `update_underflow`: the updates themselves may be intact, or inflated (Adam's flushed second moment), and a
    cause that says updates are lost would contradict them."""
    lost = r.of("optimizer_preflight", "weight_decay_zero")
    if (not len(lost) or len(r.of("lost_updates", "lost_updates"))
            or len(r.of("optimizer_preflight", "update_below_half_ulp"))):
        return []
    row = _first(lost)
    decay, dtype = float(row["value"]), row.get("dtype")
    half_ulp = WIDE_WEIGHT_DTYPES.get(dtype)
    return [Cause("weight_decay_lost", "warning", **_where(row),
                  evidence={"lr_times_weight_decay": decay, "dtype": dtype},
                  fix=r.fix("weight_decay_lost" if half_ulp is None else "weight_decay_lost_wide",
                            model=row.get("model"), group=row.get("tensor"), dtype=dtype, factor=f"{1 - decay:.10g}",
                            decay=f"{decay:.3g}", half_ulp=None if half_ulp is None else f"{half_ulp:.0e}"))]


def _second_moment_decay_lost(r: RunRecord) -> Cause | None:
    """Adam's second moment that cannot decay (a `second_moment_decay_zero` preflight event): v × β2 rounds back to v
    in the state's dtype — its decrement underflows, as a flushed entry does — so v only grows and then freezes:
    Adam's normaliser stops following the gradients' scale, and as they shrink over training its steps shrink with no
    schedule asking for it. A warning, predicted from the state the first step made; the fix: an fp32 state, or a β2
    whose decay the dtype keeps."""
    lost = r.of("optimizer_preflight", "second_moment_decay_zero")
    if not len(lost):
        return None
    row = _first(lost)
    dtype, beta2 = row.get("dtype"), float(row["value"])
    keeps = 1 - 2 * NARROW_WEIGHT_DTYPES.get(dtype, 2.0**-11)  # 1 − β2 above the largest relative half ulp
    return Cause("optimizer_state_underflow", "warning", **_where(row),
                 evidence={"decay_lost": True, "beta2": beta2, "state_dtype": dtype}, ranks_as="second_moment_decay",
                 fix=r.fix("second_moment_decay_lost", model=row.get("model"), group=row.get("tensor"), dtype=dtype,
                           beta2=f"{beta2:g}", keeps=f"{keeps:.3g}"))


def optimizer_state_underflow(r: RunRecord) -> list[Cause]:
    """The second moment's arithmetic underflows in a half-precision state. Entries flushed to zero: Adam's denominator
    is eps alone, so the updates of those entries are inflated — critical once the weights show it (an extreme update,
    growth). A decay × β2 that rounds back in the same state (`_second_moment_decay_lost`) is its evidence: the same
    state, the same fix."""
    state = r.of("optimizer_state_underflow")
    if not len(state):
        return []
    decay = _second_moment_decay_lost(r)
    row = _first(state)
    inflated = r.updates_inflated()
    tiny = r.gradients_below_fp32(row.get("model"))
    template = "gradients_below_fp32" if tiny is not None else (
        "optimizer_state_underflow" if inflated else "optimizer_state_underflow_warning")
    return [Cause("optimizer_state_underflow", "critical" if inflated else "warning", **_where(row),
                  evidence={"zeroed_fraction": row["value"], "weight_growth": r.weight_growth(),
                            "extreme_updates": len(r.of("extreme_update")),
                            **({} if tiny is None else {"zeroed_in_float32_too": tiny}),
                            **({} if decay is None else {"decay_lost": True, "beta2": decay.evidence["beta2"]})},
                  fix=r.fix(template, model=row.get("model"), dtype=row.get("dtype"), tensor=row.get("tensor"),
                            share=None if tiny is None else f"{tiny:.0%}"))]


def second_moment_decay(r: RunRecord) -> list[Cause]:
    """Alone — no entry flushed — a second moment that cannot decay is `optimizer_state_underflow` too, a lesser
    finding: a warning predicted from the state, ranked after the weights' own lost updates and decay (CAUSE_ORDER)."""
    if len(r.of("optimizer_state_underflow")):
        return []  # that cause's evidence
    decay = _second_moment_decay_lost(r)
    return [] if decay is None else [decay]


def _loaded_beyond_fp16(r: RunRecord, act: pd.Series) -> Cause | None:
    """A float16 forward overflow of a model whose weights, as loaded, already hold a value beyond float16's range
    (a `weight_beyond_fp16` event): the checkpoint's doing, not the data's or the step's — placed at that weight, the
    fix a dtype with fp32's range or a rescaled weight (fp32 master weights under fp16 autocast overflow the same)."""
    beyond = r.of("weight_beyond_fp16")
    beyond = beyond[beyond["model"] == act.get("model")]
    if act.get("dtype") != "float16" or not len(beyond):
        return None
    row = _first(beyond)
    cause = "teacher_overflow" if r.is_teacher(act.get("model")) else "activation_overflow"
    began, named = _where_began(r, act)
    return Cause(cause, "critical", **{**_where(row), "first_step": began["first_step"], "phase": "forward"},
                 evidence={"loaded_weight_amax": float(row["value"]), "weight_dtype": row.get("dtype"),
                           "weight_beyond_float16": True, "first_nonfinite_module": act.get("module"),
                           "dtype": "float16", **named},
                 fix=r.fix("weights_beyond_fp16", model=row.get("model"), tensor=row.get("tensor"),
                           amax=f"{float(row['value']):.4g}", module=act.get("module")))


def activation_overflow(r: RunRecord) -> list[Cause]:
    """A student module's forward output is non-finite (critical; a warning where the run contained it — a loss scaler
    skipped the step, the weights stayed finite and the last step's loss is finite), or beyond fp16's range in a wider
    dtype (a warning: where fp16 compute would overflow). Outputs that turned bad after the weights did are not
    looked at: once weights are non-finite every activation is."""
    causes = []
    acts = r.of("nonfinite_activation")
    acts = acts[~acts["model"].isin(r.teachers)]
    first_bad = r.first_nonfinite_param_step()
    if first_bad is not None:
        acts = acts[acts["step"] <= first_bad]
    written = r.weight_written_nonfinite()  # a weight the loop wrote NaN/Inf: what follows is `divergence`'s
    if written is not None:
        acts = acts[acts["step"] < written["step"]]
    if len(acts) and r.nonfinite_op() is None:  # else not an overflow: an undefined operation (`divergence`)
        row = _first(acts)
        beyond = _loaded_beyond_fp16(r, row)
        if beyond is not None:
            causes.append(beyond)
    constant = r.fp16_constant_op()
    if constant is not None and not causes:
        row, largest = constant
        where, named = _where_began(r, row)
        replay = r.wide_replay()  # finite in float32 where it ran: float16's doing, no undefined operation
        replayed = {"float32_replay": float(replay["value"])} if replay is not None else {}
        severity = "warning" if r.contained(where["first_step"]) else "critical"
        causes.append(Cause("activation_overflow", severity, **where,
                            evidence={"nonfinite_modules": len(acts), "dtype": "float16", "holds": _holds_value(row),
                                      "largest_measured": largest, "range_limit": FP16_MAX ** RANGE_EXPONENT,
                                      **replayed, **named},
                            fix=r.fix("activation_fp16_constant_replayed" if replayed else "activation_fp16_constant",
                                      module=row.get("module"), holds=_holds_value(row), amax=f"{largest:.3g}",
                                      wide_amax=f"{float(replay['value']):.3g}" if replayed else None)))
    if len(acts) and r.nonfinite_op() is None and not causes:
        row = _first(acts)
        fp16, router = row.get("dtype") == "float16", r.is_router(row.get("module"))
        template = ("router_overflow_fp16" if router else "activation_overflow_fp16") if fp16 else "activation_overflow"
        where, named = _where_began(r, row)
        causes.append(Cause("activation_overflow", "warning" if r.contained(where["first_step"]) else "critical",
                            **where,
                            evidence={"nonfinite_modules": len(acts), "dtype": row.get("dtype"), "router": router,
                                      **named},
                            fix=r.fix(template, module=row.get("module"), dtype=row.get("dtype"))))
    unplaced = r.unplaced_fp16_loss()
    if unplaced is not None and not r.forward_fault_began_at(int(unplaced["step"])):
        step = int(unplaced["step"])
        corrupted = first_bad is not None
        skipped = r.of("scaler_skip")
        causes.append(Cause("activation_overflow", "critical" if corrupted else "warning",
                            **{**_where(unplaced), "phase": "forward"},
                            evidence={"module_statistics": False, "compute_dtype": "float16",
                                      "weights_finite": not corrupted,
                                      "loss_scaler_skipped": bool((skipped["step"] == step).any())},
                            fix=r.fix("activation_overflow_unplaced")))
    zeroed = r.zeroed_by_fp16()
    if zeroed is not None:
        row, wide = zeroed
        causes.append(Cause("activation_overflow", "warning", **_where(row),
                            evidence={"dtype": "float16", "output_amax": 0.0, "float32_replay": wide},
                            fix=r.fix("activation_zeroed_fp16", module=row.get("module"), wide_amax=f"{wide:.3g}")))
    risk = r.of("fp16_overflow_risk")
    if len(risk):
        row = _first(risk)
        causes.append(Cause("activation_overflow", "warning", **_where(row),
                            evidence={"modules_beyond_fp16": len(risk), "max_value": float(risk["value"].max())},
                            fix=r.fix("fp16_risk", module=row.get("module"), dtype=row.get("dtype"))))
    return causes


def gradient_overflow(r: RunRecord) -> list[Cause]:
    """A non-finite gradient reached an optimizer that nothing protects (no loss scaler to skip the step)."""
    grads = r.of("nonfinite_grad", "grad_nonfinite_applied")
    if not len(grads) or r.nonfinite_grad_op() is not None:  # else not an overflow: an undefined derivative
        return []
    row = _first(grads)
    norm = r.of("setup_note", "norm_eps_beyond_fp16")
    norm = norm[(norm["model"] == row.get("model")) & (norm["module"] == row.get("module"))]
    if len(norm):  # it began at a float16 norm whose eps float16 cannot serve: that eps, not the scale of the loss
        eps = float(_first(norm)["value"])
        return [Cause("gradient_overflow", "critical", **_where(row),
                      evidence={"nonfinite_grad_events": len(grads), "norm_eps": eps},
                      fix=r.fix("gradient_overflow_norm_eps", model=row.get("model"), module=row.get("module"),
                                eps=f"{eps:g}", divisor=f"{eps ** -0.5:.3g}"))]
    return [Cause("gradient_overflow", "critical", **_where(row), evidence={"nonfinite_grad_events": len(grads)},
                  fix=r.fix("gradient_overflow", model=row.get("model"), dtype=row.get("dtype")))]


def loss_scale_collapse(r: RunRecord) -> list[Cause]:
    """The dynamic loss scale keeps falling: overflow every few steps, or even unscaled (scale below 1).

    Located at the first module in backward order whose gradient was non-finite when the scale collapsed:
    the latest such reading on skipped steps at or before the collapse (the scaler's first skips overflow at
    the output end while it finds its scale), else the first after it."""
    below, backoff = r.of("scale_below_one"), r.of("scaler_backoff")
    collapse = pd.concat([below, backoff])
    if not len(collapse):
        return []
    row = _first(collapse)
    grads = r.of("nonfinite_grad", "grad_nonfinite_skipped").sort_values(["step", "time"], kind="stable")
    before = grads[grads["step"] <= row["step"]]
    located = before.iloc[-1] if len(before) else (grads.iloc[0] if len(grads) else None)
    where = _where(row)
    if located is not None:
        where.update(model=_where(located)["model"], module=_where(located)["module"],
                     tensor=_where(located)["tensor"])
    evidence = {"backoff_warnings": len(backoff), "skipped_steps": len(r.of("scaler_skip")),
                "min_scale": float(collapse["value"].min()),
                "overflowing_gradient_step": int(located["step"]) if located is not None else None}
    losses = r.train_column("loss")
    largest = float(losses[losses.map(math.isfinite)].abs().max()) if len(losses) else math.nan
    # the caller's own loss (`train`'s is a per-token mean by construction, its weights its options), its size near
    # float16's range as `loss_sum_low` judges it: a sum, whose gradients are as large
    if r.caller != "cli" and largest > FP16_MAX ** RANGE_EXPONENT:
        return [_loss_too_large(r, "critical" if len(below) else "warning", where, evidence, largest)]
    operation = r.singular_operation()
    if len(below) and operation is not None and largest < FP16_MAX ** RANGE_EXPONENT:  # NaN at any scale
        return [Cause("loss_scale_collapse", "critical", **where,
                      evidence={**evidence, "largest_finite_loss": largest, "loss_operation": operation},
                      fix=r.fix("loss_scale_collapse_singular", model=where["model"], largest=f"{largest:.3g}",
                                operation=operation, module=where["module"] or where["tensor"] or "the loss"))]
    return [Cause("loss_scale_collapse", "critical" if len(below) else "warning", **where, evidence=evidence,
                  fix=r.fix("loss_scale_collapse" if located is not None else "loss_scale_collapse_unplaced",
                            model=where["model"], module=where["module"] or where["tensor"]))]


def _loss_too_large(r: RunRecord, severity: str, where: dict, evidence: dict, largest: float) -> Cause:
    """A loss scale collapsed under a caller's loss far above any per-token mean: a sum over the tokens, or a mean of
    outputs gone that large — each named where the evidence allows it. A cross-entropy or KL per token is at most about
    the spread of its logits (the largest minus the target's, plus the log of the vocabulary), so outputs measured
    (`act_amax_<model>`) at half the loss or more can make it a per-token mean (new embedding rows initialised far
    beyond the others, weights scaled up); and a sum over the step's targets (`loss_targets`, `train`'s `targets`)
    must leave a per-token loss below the same bar — a loss that stays far above it per target is no sum of sane
    per-token losses, and dividing by the tokens is no fix. Neither ruled out, both are named."""
    outputs = r.largest_outputs()
    fix_words = {"model": where["model"], "largest": f"{largest:.5g}",
                 "module": where["module"] or where["tensor"] or "the loss"}
    evidence = {**evidence, "largest_finite_loss": largest}
    if outputs is None or 2 * outputs[1] < largest:
        return Cause("loss_scale_collapse", severity, **where, evidence=evidence,
                     fix=r.fix("loss_scale_collapse_sum", **fix_words))
    per_target = r.loss_per_target(largest)
    summed = per_target is None or per_target <= FP16_MAX ** RANGE_EXPONENT  # a sum of sane per-token losses fits
    evidence.update(largest_output=outputs[1], output_model=outputs[0], loss_per_target=per_target)
    return Cause("loss_scale_collapse", severity, **where, evidence=evidence,
                 fix=r.fix("loss_scale_collapse_large_outputs", **fix_words, output_model=outputs[0],
                           outputs=f"{outputs[1]:.3g}", sum_too=SUM_TOO if summed else ""))


def _flushed_by_fp16(r: RunRecord, zero: pd.DataFrame) -> pd.DataFrame:
    """The `zero_gradients` events that an unscaled float16 backward explains (its flush to zero) — not those of a
    step whose loss was exactly 0, which the loss explains (`_at_zero_loss`). Unscaled: no loss scaler, or one whose
    scale at that step was at most 1 (`GradScaler(init_scale=1.0)`, a scale collapsed there), which multiplies
    nothing above float16's flush."""
    zero = zero[~zero.index.isin(_at_zero_loss(r, zero).index) & ~zero.index.isin(_behind_zero_output(r, zero).index)]
    zero = zero[zero["dtype"] == "float16"]
    if not (r.config.get("precision") or {}).get("loss_scaling"):
        return zero
    return zero[zero["step"].map(lambda step: (r.loss_scale_at(int(step)) or math.inf) <= 1)]


def _behind_zero_output(r: RunRecord, zero: pd.DataFrame) -> pd.DataFrame:
    """The `zero_gradients` events of a model whose forward already zeroed a module's output everywhere
    (`zero_activation`, at or before their step): no gradient passes back through an output that depends on nothing,
    whatever the dtype — the forward explains them, not a float16 backward's flush."""
    dead = r.of("zero_activation")
    if not len(dead) or not len(zero):
        return zero.iloc[:0]
    return zero[zero.apply(lambda row: ((dead["model"] == row.get("model")) & (dead["step"] <= row["step"])).any(),
                           axis=1).astype(bool)]


def _at_zero_loss(r: RunRecord, zero: pd.DataFrame) -> pd.DataFrame:
    """The `zero_gradients` events of a step whose training loss was exactly 0: a loss at 0 — the minimum of a KD
    term between identical distributions, of a cross-entropy whose probabilities saturated at 1, or a loss weighted
    0 — has a gradient of exactly 0 everywhere, so nothing was cut off or flushed on the way to the weights."""
    loss = r.train_column("loss")
    zero_steps = set(loss[loss == 0].index)
    return zero[zero["step"].astype(int).isin(zero_steps)]


def optimizer_stepped_twice(r: RunRecord) -> list[Cause]:
    """An optimizer stepped twice within one step (an `optimizer_stepped_twice` note): each gradient applied twice,
    and under a loss scaler the second `optimizer.step()` applies even the non-finite gradients the scaler skipped —
    critical once a weight turned non-finite at or after it (the blow-up that follows is folded into it), else a
    warning."""
    note = r.of("setup_note", "optimizer_stepped_twice")
    if not len(note):
        return []
    row = _first(note)
    step = int(row["step"])
    bad = r.of("nonfinite_param")
    bad = bad[bad["step"] >= step]
    scaled = bool((r.config.get("precision") or {}).get("loss_scaling"))
    return [Cause("optimizer_stepped_twice", "critical" if len(bad) else "warning", **_where(row),
                  evidence={"loss_scaling": scaled,
                            "first_nonfinite_param_step": int(bad["step"].min()) if len(bad) else None},
                  fix=r.fix("optimizer_stepped_twice", step=step,
                            scaler=" and a gradient the loss scaler skipped as non-finite is applied anyway, making "
                                   "the weights NaN" if scaled else "",
                            one_step="`scaler.step(optimizer)` alone: it calls `optimizer.step()` itself" if scaled
                            else "one `optimizer.step()` after each `backward()`"))]


def scaler_bypassed(r: RunRecord) -> list[Cause]:
    """The optimizer stepped on gradients its loss scaler scaled and never unscaled (a `scaler_bypassed` note): every
    update is the scale times too large for SGD (a blow-up that reads as an lr far too high) and overflowing steps are
    applied — critical once something goes wrong at or after it (what follows is folded into it), else a warning
    (Adam divides the scale away)."""
    note = r.of("setup_note", "scaler_bypassed")
    if not len(note):
        return []
    row = _first(note)
    step = int(row["step"])
    then = _went_wrong_from(r, step)
    scale = number_or_none(row.get("value"))
    return [Cause("scaler_bypassed", "critical" if then else "warning", **_where(row),
                  evidence={"loss_scale": scale, "then": ", ".join(then) or None},
                  fix=r.fix("scaler_bypassed", step=step, scale=f"{scale:g}" if scale is not None else None))]


def scaler_fp16_weights(r: RunRecord) -> list[Cause]:
    """A loss scaler over float16 trainable weights (a `scaler_fp16_weights` note): GradScaler raises at the first
    `unscale_`, so the run ends before its first step completes — critical when no step completed from the note on
    (the crash it predicts, which the logs cannot otherwise explain), else a warning (a scaler that took them)."""
    note = r.of("setup_note", "scaler_fp16_weights")
    if not len(note):
        return []
    row = _first(note)
    steps = r.metrics["step"][r.metrics["split"] == "train"] if {"step", "split"} <= set(r.metrics) else []
    completed = int((pd.to_numeric(pd.Series(steps), errors="coerce") >= int(row["step"])).sum())
    return [Cause("scaler_fp16_weights", "warning" if completed else "critical", **_where(row),
                  evidence={"float16_trainable_tensors": int(row.get("numel") or 0), "steps_completed": completed},
                  fix=r.fix("scaler_fp16_weights", model=row.get("model"), tensor=row.get("tensor"),
                            others=max(int(row.get("numel") or 1) - 1, 0)))]


def gradients_not_cleared(r: RunRecord) -> list[Cause]:
    """A step's backward added to gradients the step before had already used (a `gradients_not_cleared` note): every
    update is the sum of all gradients so far, and under a loss scaler one overflow stays in them and every later step
    is skipped — critical once something goes wrong at or after it (what follows is folded into it), else a
    warning."""
    note = r.of("setup_note", "gradients_not_cleared")
    if not len(note):
        return []
    row = _first(note)
    step = int(row["step"])
    then = _went_wrong_from(r, step)
    scaled = bool((r.config.get("precision") or {}).get("loss_scaling"))
    return [Cause("gradients_not_cleared", "critical" if then else "warning", **_where(row),
                  evidence={"loss_scaling": scaled, "then": ", ".join(then) or None},
                  fix=r.fix("gradients_not_cleared", step=step,
                            scaler=", and a gradient the loss scaler found non-finite stays in them, so it skips "
                                   "every later step as its scale falls" if scaled else ""))]


def _went_wrong_from(r: RunRecord, step: int) -> list[str]:
    """What went wrong at or after `step` (a blow-up, a loss scale that fell), as `kind@first step`: what a loop bug
    that inflates the updates is blamed for — before a fault no update's size makes, which explains what follows it
    on its own: bad data, a weight the loop wrote, a frozen model's forward (its weights and inputs no update
    touches)."""
    acts = r.of("nonfinite_activation")
    apart = [r.of("nonfinite_batch"), r.of("empty_targets"), r.of("nonfinite_between_steps"),
             acts[acts["model"].isin(r.teachers)]]
    until = min((int(frame["step"].min()) for frame in apart if len(frame)), default=math.inf)
    went = {kind: r.of(kind)["step"] for kind in (*BLOW_UPS, "scale_below_one", "scaler_backoff")}
    return [f"{kind}@{int(steps[steps >= step].min())}" for kind, steps in went.items()
            if ((steps >= step) & (steps < until)).any()]


def micro_batches_summed(r: RunRecord) -> list[Cause]:
    """A step backpropagated several losses of one model's forwards each at full weight (a `micro_batches_summed`
    note): gradient accumulation that sums the micro-batches' losses instead of averaging them, so the gradient is
    that many times the batch's (SGD's update with it)."""
    return _gradient_multiplied(r, "micro_batches_summed", "losses_per_step") \
        or _gradient_multiplied(r, "num_items_ignored", "gradient_accumulation_steps", cause="micro_batches_summed")


def loss_backpropagated_twice(r: RunRecord) -> list[Cause]:
    """One forward's loss brought at full weight by several backwards that add to `.grad` (a
    `loss_backpropagated_twice` note): its gradient is applied that many times (SGD's update with it)."""
    return _gradient_multiplied(r, "loss_backpropagated_twice", "backwards_per_loss")


def _gradient_multiplied(r: RunRecord, code: str, counted_as: str, cause: str | None = None) -> list[Cause]:
    """A loop bug that multiplies the step's gradient by the count its note (`code`) holds (`value`): critical once
    something goes wrong at or after it (the blow-up, which reads as an lr far too high, is folded into it), else a
    warning; `cause`: the finding it is, where the note is one of its forms (the fix is the note's)."""
    note = r.of("setup_note", code)
    if not len(note):
        return []
    row = _first(note)
    then = _went_wrong_from(r, int(row["step"]))
    count = int(row["value"])
    return [Cause(cause or code, "critical" if then else "warning", **_where(row),
                  evidence={counted_as: count, "then": ", ".join(then) or None},
                  fix=r.fix(code, step=int(row["step"]), count=count, model=row.get("model")))]


def kd_targets_few(r: RunRecord) -> list[Cause]:
    """A dual-tokenizer KD term over few of a step's target tokens (a `kd_targets_few` note, at the teacher
    where its position table cut the text short): most tokens learn from the cross-entropy alone while kd_loss reads
    as a small loss — a warning, nothing non-finite, and nothing else names it."""
    note = r.of("setup_note", "kd_targets_few")
    if not len(note):
        return []
    row = _first(note)
    fraction = (r.train_column("kd_targets") / r.train_column("targets")).dropna()
    short = int((fraction < KD_TARGETS_WARNING).sum())
    block_size = (r.config.get("options") or {}).get("block_size")
    why = r.fix("kd_targets_few_teacher_context" if row.get("model") == "teacher" else "kd_targets_few_spans",
                length=block_size)
    return [Cause("kd_targets_few", "warning", **_where(row),
                  evidence={"kd_target_fraction": float(row["value"]), "targets": int(row.get("numel") or 0),
                            "steps_under_threshold": short, "steps": len(fraction)},
                  fix=r.fix("kd_targets_few", step=int(row["step"]), fraction=f"{float(row['value']):.0%}",
                            steps=f"{short} of {len(fraction)} steps", why=why,
                            threshold=f"{KD_TARGETS_WARNING:.0%}"))]


def kd_temperature_low(r: RunRecord) -> list[Cause]:
    """A KD temperature below KD_TEMPERATURE_FLOOR (a `kd_temperature_low` note): the KD term's gradient is T× its
    size at T = 1 and the teacher's softmax one-hot, while kd_loss, T² · KL, reads as a KD term near its minimum — a
    warning, nothing non-finite, and nothing else names it. Evidence: the losses measured. In a caller's own loss the
    temperature is not known, but what it does is measured: `F.kl_div`'s target one-hot on most tokens (a
    `kl_target_one_hot` note), evidence its share."""
    note = r.of("setup_note", "kd_temperature_low")
    if not len(note):
        return _kd_targets_one_hot(r)
    row = _first(note)
    kd, ce = r.train_column("kd_loss"), r.train_column("ce_loss")
    return [Cause("kd_temperature_low", "warning", **_where(row),
                  evidence={"temperature": float(row["value"]),
                            "mean_kd_loss": float(kd.mean()) if len(kd) else None,
                            "mean_ce_loss": float(ce.mean()) if len(ce) else None},
                  fix=r.fix("kd_temperature_low", temperature=f"{float(row['value']):g}"))]


def _kd_targets_one_hot(r: RunRecord) -> list[Cause]:
    """`kd_temperature_low` where the temperature is a caller's number the run never saw: the teacher's distribution
    `F.kl_div` was handed, one-hot on most tokens (a `kl_target_one_hot` note), is what such a temperature makes."""
    note = r.of("setup_note", "kl_target_one_hot")
    if not len(note):
        return []
    row = _first(note)
    share = float(row["value"])
    return [Cause("kd_temperature_low", "warning", **_where(row), evidence={"one_hot_target_share": share},
                  fix=r.fix("kd_targets_one_hot", share=f"{share:.0%}", step=int(row["step"])))]


def kd_reduction_mean(r: RunRecord) -> list[Cause]:
    """`F.kl_div` with `reduction="mean"` (a `kl_div_mean_over_support` note): the KD term is divided by the
    vocabulary's size, a KD term in name only — a warning, nothing non-finite, and nothing else names it."""
    note = r.of("setup_note", "kl_div_mean_over_support")
    if not len(note):
        return []
    row = _first(note)
    return [Cause("kd_reduction_mean", "warning", **_where(row), evidence={"divided_by": int(row["value"])},
                  fix=r.fix("kd_reduction_mean", support=int(row["value"])))]


def padding_in_targets(r: RunRecord) -> list[Cause]:
    """Padding kept as labels (a `targets_on_padding` note): a share of the targets sits where the attention mask is 0,
    so the loss trains the model to predict pad tokens — easy targets that pull the loss down while the text's own
    tokens weigh less in it. A warning, nothing non-finite, and nothing else names it."""
    note = r.of("setup_note", "targets_on_padding")
    if not len(note):
        return []
    row = _first(note)
    share = float(row["value"])
    return [Cause("padding_in_targets", "warning", **_where(row),
                  evidence={"padded_target_share": share, "targets": int(row.get("numel") or 0)},
                  fix=r.fix("padding_in_targets", share=f"{share:.0%}", step=int(row["step"])))]


def accumulation_unmatched(r: RunRecord) -> list[Cause]:
    """An accelerate loop stepped the optimizer after fewer backwards than the Accelerator divides each loss by (an
    `accumulation_unmatched` note): every update is a fraction of the gradient — a warning: slow training, not a
    blow-up, and not the lr."""
    note = r.of("setup_note", "accumulation_unmatched")
    if not len(note):
        return []
    row = _first(note)
    steps = int(row["value"])
    return [Cause("accumulation_unmatched", "warning", **_where(row), evidence={"gradient_accumulation_steps": steps},
                  fix=r.fix("accumulation_unmatched", step=int(row["step"]), steps=steps))]


def clip_before_unscale(r: RunRecord) -> list[Cause]:
    """The loop clipped gradients its loss scaler still scaled (a `clip_before_unscale` note): the threshold is
    compared with the scaled norm, and every update shrinks by the scale — a loop-order bug, not the lr or the
    precision (what looks like lost updates follows from it: `update_underflow` leaves them to this)."""
    note = r.of("setup_note", "clip_before_unscale")
    if not len(note):
        return []
    row = _first(note)
    scale = number_or_none(row.get("value"))
    return [Cause("clip_before_unscale", "warning", **_where(row), evidence={"loss_scale": scale},
                  fix=r.fix("clip_before_unscale", scale=f"{scale:g}" if scale is not None else None))]


# what a loop's clipping at a threshold of 0 or below does (the column the probes record it in): every gradient 0
CLIPS_AT_ZERO = {"clip_max_norm": "`clip_grad_norm_` multiplies every gradient by max_norm / total_norm (capped at 1; "
                                  "below 0 it reverses each, and the loss is climbed)",
                 "clip_value": "`clip_grad_value_` clamps every gradient entry into [-clip_value, clip_value]"}


def no_gradients(r: RunRecord) -> list[Cause]:
    """Most trainable tensors get no gradient, or an all-zero one, step after step, where no float16 flush explains
    it (the backward ran wider, or a loss scaler kept the gradients above the flush): nothing reaches the weights.
    Or, known before the first step, the optimizer holds none of the models' trainable tensors: the gradients
    reach tensors it never updates. Or the loop clips at a max_norm or clip_value of 0 (`CLIPS_AT_ZERO`), which
    zeroes every gradient after the probes read it."""
    frozen = r.of("setup_note", "optimizer_holds_frozen")
    if len(frozen):
        row = _first(frozen)
        return [Cause("no_gradients", "warning", **_where(row),
                      evidence={"frozen_tensors_in_optimizer": row.get("numel"), "trainable_tensors_in_optimizer": 0},
                      fix=r.fix("no_gradients_frozen", model=row.get("model"), tensor=row.get("tensor")))]
    unoptimized = r.of("setup_note", "unoptimized_models")
    if len(unoptimized):
        row = _first(unoptimized)
        return [Cause("no_gradients", "warning", **_where(row),
                      evidence={"trainable_tensors_in_optimizer": 0, "trainable_tensors": row.get("numel")},
                      fix=r.fix("no_gradients_unoptimized", model=row.get("model"), tensor=row.get("tensor")))]
    every = r.of("setup_note", "every_step_skipped")
    if len(every):
        row = _first(every)
        return [Cause("no_gradients", "warning", **{**_where(row), "first_step": 1},
                      evidence={"steps_skipped": row.get("numel"), "steps_closed": row.get("numel")},
                      fix=r.fix("no_gradients_every_step_skipped", steps=row.get("numel")))]
    unsettled = r.of("setup_note", "scaler_never_settled")
    if len(unsettled):
        row = _first(unsettled)
        operation = r.singular_operation()
        singular = "" if operation is None else SINGULAR_AT_ANY_SCALE.format(operation=operation)
        return [Cause("no_gradients", "warning", **{**_where(row), "first_step": 1},
                      evidence={"steps_skipped": row.get("numel"), "loss_scale": row["value"],
                                **({"loss_operation": operation} if operation is not None else {})},
                      fix=r.fix("no_gradients_scaler_never_settled", steps=row.get("numel"),
                                scale=f"{row['value']:g}", singular=singular))]
    never = r.of("setup_note", "optimizer_never_stepped")
    if len(never):
        row = _first(never)
        return [Cause("no_gradients", "warning", **{**_where(row), "first_step": 1},
                      evidence={"optimizer_steps": 0, "steps_closed": row.get("numel")},
                      fix=r.fix("no_gradients_no_step", steps=row.get("numel")))]
    for column, how in CLIPS_AT_ZERO.items():
        thresholds = r.train_column(column)
        zeroed = thresholds[thresholds <= 0]
        if len(zeroed):
            step, value = int(zeroed.index[0]), float(zeroed.iloc[0])
            return [Cause("no_gradients", "warning", model="student", first_step=step, phase="backward",
                          evidence={column: value, "steps_clipped_at_or_below_0": len(zeroed)},
                          fix=r.fix("no_gradients_clip_zero", threshold=f"{column.removeprefix('clip_')} {value:g}",
                                    how=how, steps=len(zeroed), step=step))]
    zero = r.of("zero_gradients")
    zero = zero[~zero.index.isin(_flushed_by_fp16(r, zero).index)]
    at_zero_loss = _at_zero_loss(r, zero)
    if len(at_zero_loss) == len(zero) and len(zero):  # nothing to learn, nothing broken: said, as information
        row = _first(at_zero_loss)
        loss = r.train_column("loss")
        # no KD term to reach its minimum, and no training yet to saturate a cross-entropy: a loss multiplied by 0
        alone = r.watches_no_teacher() and len(loss) > 0 and int(row["step"]) == int(loss.index.min())
        return [Cause("no_gradients", "warning" if alone else "info", **_where(row),
                      evidence={"loss_zero": True, "steps_at_zero_loss": int((loss == 0).sum()),
                                "zero_gradient_tensor_fraction": row["value"]},
                      fix=r.fix("no_gradients_zero_loss_alone" if alone else "no_gradients_zero_loss",
                                step=int(row["step"])))]
    zero = zero[~zero.index.isin(at_zero_loss.index)]
    if not len(zero):
        return []
    row = _first(zero)
    dead = r.of("zero_activation")
    dead = dead[(dead["model"] == row.get("model")) & (dead["step"] <= row["step"])]
    if len(dead):  # the forward itself zeroes everything from a module on: nothing is cut off in the loss's code
        at = _first(dead)
        zeroed = r.zeroed_by_fp16()
        if zeroed is not None and zeroed[0].name == at.name:
            return []  # float16 zeroed it: `activation_overflow`'s
        return [Cause("no_gradients", "warning", **{**_where(at), "first_step": int(row["step"])},
                      evidence={"zero_gradient_tensor_fraction": row["value"], "zero_output_step": int(at["step"])},
                      fix=r.fix("no_gradients_zero_activation", module=at.get("module"), step=int(at["step"])))]
    return [Cause("no_gradients", "warning", **_where(row),
                  evidence={"zero_gradient_tensor_fraction": row["value"], "tensors_with_a_gradient": row.get("numel"),
                            "compute_dtype": row.get("dtype")},
                  fix=r.fix("no_gradients", tensor=row.get("tensor"), step=int(row["step"])))]


def update_underflow(r: RunRecord) -> list[Cause]:
    """Updates lost to underflow: the optimizer's (`_updates_lost`), and the caller's own writes to a frozen model's
    16-bit weights (an EMA teacher) that rounded away (`frozen_writes_lost`) — each a cause of its own."""
    writes = r.of("lost_updates", "frozen_writes_lost")
    if not len(writes):
        return _updates_lost(r)
    row = _first(writes)
    half_ulp = NARROW_WEIGHT_DTYPES.get(row.get("dtype"))
    return _updates_lost(r) + [Cause(
        "update_underflow", "warning", **_where(row),
        evidence={"written_values_unchanged": row["value"], "written_tensors": row.get("numel"),
                  "dtype": row.get("dtype"), "by_optimizer": False},
        fix=r.fix("frozen_writes_lost", model=row.get("model"), dtype=row.get("dtype"), share=f"{row['value']:.0%}",
                  half_ulp=f"{half_ulp or 0:.0e}"))]


def _updates_lost(r: RunRecord) -> list[Cause]:
    """Updates lost to underflow (stagnation). Upstream first: gradients flushed to zero by a float16 backward
    that no loss scaler protects (a `zero_gradients` event computed in float16) never reach the optimizer.
    Else updates lost to rounding in low-precision weights: claimed from measured lost updates — or, where
    nothing was measured, from the optimizer's preflight prediction — and never while updates are inflated
    (an optimizer state that flushed to zero makes them larger, not lost). Lost in fp32 (or float64) weights —
    already what mixed precision's master weights are — the steps are too small for any dtype: the fix is the
    learning rate, its schedule or the clipping, never a precision change."""
    flushed = _flushed_by_fp16(r, r.of("zero_gradients"))
    if len(flushed):
        row = _first(flushed)
        scale = r.loss_scale_at(int(row["step"])) if (r.config.get("precision") or {}).get("loss_scaling") else None
        evidence = {"zero_gradient_tensor_fraction": row["value"], "compute_dtype": "float16",
                    "loss_scaling": scale is not None, **({"loss_scale": scale} if scale is not None else {})}
        fix = (r.fix("gradient_underflow", dtype="float16", tensor=row.get("tensor")) if scale is None else
               r.fix("gradient_underflow_low_scale", dtype="float16", tensor=row.get("tensor"),
                     step=int(row["step"]), scale=f"{scale:g}"))
        return [Cause("update_underflow", "warning", **_where(row), evidence=evidence, fix=fix)]
    if r.updates_inflated() or len(r.of("setup_note", "clip_before_unscale")):
        return []  # inflated: not lost; clipped while scaled: shrunk by the scale (`clip_before_unscale`)
    lost = r.of("lost_updates")
    lost = lost[lost["code"] != "frozen_writes_lost"]  # the caller's writes, not the optimizer's updates
    frozen = r.frozen_second_moment()
    if frozen is not None and len(lost) and _first(lost).get("tensor") == frozen.get("tensor"):
        return []  # lost to a second moment gone Inf (`optimizer_state_frozen`), not to rounding
    predicted = r.of("optimizer_preflight", "update_below_half_ulp")
    predicted_fraction = float(predicted["value"].iloc[0]) if len(predicted) else None
    # the lr below half an ulp of those 16-bit weights even held in float32: no wider dtype keeps the updates
    below_fp32 = r.of("optimizer_preflight", "update_below_fp32_half_ulp")
    if len(lost):
        row = _first(lost)
        # in weights of fp32's precision or more there is no wider dtype to train in: only smaller steps lose updates
        half_ulp = WIDE_WEIGHT_DTYPES.get(row.get("dtype"))
        # whole tensors lost while the run trains: an lr that moved them would overshoot the rest
        whole = row.get("code") == "lost_updates_whole_tensors" and half_ulp is None
        lr_too_small = half_ulp is None and (below_fp32["model"] == row.get("model")).any()
        tiny_gradients = half_ulp is None and r.gradients_below_fp32(row.get("model")) is not None
        template = "update_underflow_wide" if half_ulp is not None else "update_underflow_lr" if lr_too_small else (
            "update_underflow_tiny_gradients" if tiny_gradients else
            "update_underflow_whole_tensors" if whole else "update_underflow")
        # no healthy loss has a largest gradient entry this small: the step size is not lr × a normal gradient
        grad_amax = number_or_none(r.train_column("grad_amax").get(int(row["step"])))
        if half_ulp is not None and grad_amax is not None and grad_amax < FP16_TINY:
            loss = number_or_none(r.train_column("loss").get(int(row["step"])))
            return [Cause("update_underflow", "warning", **_where(row),
                          evidence={"lost_update_fraction": row["value"], "dtype": row.get("dtype"),
                                    "grad_amax": grad_amax, "loss": loss},
                          fix=r.fix("update_underflow_loss_factor", dtype=row.get("dtype"),
                                    tensor=row.get("tensor"), grad_amax=f"{grad_amax:.3g}",
                                    loss=f"{loss:.4g}" if loss is not None else "unknown"))]
        half_ulp = half_ulp if half_ulp is not None else NARROW_WEIGHT_DTYPES.get(row.get("dtype"))
        return [Cause("update_underflow", "warning", **_where(row),
                      evidence={"lost_update_fraction": row["value"], "predicted_fraction": predicted_fraction,
                                "dtype": row.get("dtype"), **_lost_in_fp32_too(below_fp32, row.get("model"))},
                      fix=r.fix(template, model=row.get("model"), dtype=row.get("dtype"), tensor=row.get("tensor"),
                                half_ulp=f"{half_ulp or 0:.0e}", share=_share(below_fp32, row.get("model"))))]
    measured = r.train_column("lost_update_fraction")
    if len(predicted) and not len(measured) and r.mode in ("pure-fp16", "pure-bf16"):
        row = _first(predicted)
        lr_too_small = (below_fp32["model"] == row.get("model")).any()
        return [Cause("update_underflow", "warning", **_where(row),
                      evidence={"predicted_fraction": predicted_fraction, "measured": False,
                                **_lost_in_fp32_too(below_fp32, row.get("model"))},
                      fix=r.fix("update_underflow_lr" if lr_too_small else "update_underflow", model=row.get("model"),
                                dtype=row.get("dtype"), tensor=row.get("tensor"),
                                share=_share(below_fp32, row.get("model"))))]
    return []


def updates_too_small(r: RunRecord) -> list[Cause]:
    """A model whose optimizer steps are too small to train: the median of its `update_ratio_<model>` — its own
    weight matrices, not mixed with another model's (SAR's routers train beside the student at an lr of their own),
    and only steps at the lr its schedule means (the probe leaves out a warm-up's first steps) — below
    TINY_UPDATE_RATIO over at least UPDATE_RATIO_MIN_STEPS steps that moved it. Nothing non-finite and no gradient
    missing (a step that moves nothing is left out: other causes name it): the loss stays flat because each step is
    ten thousand times smaller than a healthy one — an lr typed orders of magnitude too small, or gradients shrunk
    to almost nothing by a clip threshold or a loss weight. A warning: nothing breaks, nothing trains. Evidence: the
    median ratio, the steps judged and the model's lr on its first."""
    causes = []
    for column in (c for c in r.metrics.columns if str(c).startswith("update_ratio_")):
        ratios = r.train_column(column)
        ratios = ratios[(ratios > 0) & ratios.map(math.isfinite)]
        if len(ratios) < UPDATE_RATIO_MIN_STEPS or ratios.median() >= TINY_UPDATE_RATIO:
            continue
        model, step, median = column.removeprefix("update_ratio_"), int(ratios.index[0]), float(ratios.median())
        lr = r.lr_at(step, model)
        steps = f"{len(ratios)} steps from step {step}"
        causes.append(Cause("updates_too_small", "warning", step, model=model,
                            evidence={"update_ratio": median, "healthy_update_ratio": HEALTHY_UPDATE_RATIO,
                                      "steps_judged": len(ratios), "lr": lr},
                            fix=r.fix("updates_too_small", model=model, ratio=f"{median:.1g}", steps=steps,
                                      below=f"{float(f'{HEALTHY_UPDATE_RATIO / median:.2g}'):,.0f}",
                                      lr_value=f" (now {lr:g})" if lr is not None else "")))
    return causes


def _lost_in_fp32_too(below_fp32: pd.DataFrame, model: str | None) -> dict:
    """Evidence: the share of `model`'s 16-bit weights whose lr-sized update float32 would lose too, where recorded."""
    rows = below_fp32[below_fp32["model"] == model]
    return {"lost_in_float32_too": float(rows["value"].max())} if len(rows) else {}


def _share(below_fp32: pd.DataFrame, model: str | None) -> str | None:
    lost = _lost_in_fp32_too(below_fp32, model).get("lost_in_float32_too")
    return None if lost is None else f"{lost:.0%}"


def divergence(r: RunRecord) -> list[Cause]:
    """A blow-up that precision does not explain.

    First, NaN or Inf the loop's own code wrote into a weight between steps (`RunRecord.weight_written_nonfinite`):
    located at that weight and the step whose forward read it — every module that multiplies by it makes NaN or
    Inf whatever its dtype's range, which is no overflow (`weights_edited` is the finding that explains it).

    Then, a module output that an operation undefined on its inputs made non-finite (`RunRecord.nonfinite_op`:
    NaN or Inf from values nowhere near their dtype's range, nothing computed in float16): located at that module,
    the fix in the operation's terms (the mask, a clamp before a log), not a precision change or the lr.

    After an extreme update (an optimizer step as large as the weights) whatever goes wrong next — in any
    mode — is divergence, with the update-to-weight ratio as evidence; an extreme update with nothing
    wrong yet is a warning. Otherwise: non-finite weights or loss (any mode; `rank` folds them into an
    explanation when one exists), or a training loss above `RunRecord.blow_up_factor`× its first value (3×, more
    where batches scatter more) where the optimizer updates fp32 weights (`RunRecord.updates_wide_weights`: fp32,
    or a mixed mode's master weights). Below that, a finite loss that climbs steadily (`RunRecord.loss_trend`), or
    one unbounded below (`RunRecord.loss_unbounded_below`: no CE, KL or squared error falls below 0) — warnings.
    """
    written = r.weight_written_nonfinite()
    if written is not None:  # the blow-up began in a weight the loop wrote: at that weight and the step that read it
        after, fix = _written_nonfinite(r, written)
        return [Cause("divergence", "critical", **_where(written),
                      evidence={"mode": r.mode, "dtype": written.get("dtype"), "holds": _holds_value(written),
                                "weight_written_between_steps": True, "finite_after_optimizer_step": after},
                      fix=fix)]
    op = r.nonfinite_op()
    if op is not None:
        row, largest = op
        evidence, fix = _undefined_op(r, row, largest, row.get("module") or row.get("model"))
        return [Cause("divergence", "critical", **_where(row),
                      evidence={"mode": r.mode, "dtype": row.get("dtype"), **evidence}, fix=fix)]
    grad_op = r.nonfinite_grad_op()
    if grad_op is not None:
        row, largest = grad_op
        holds, step = _holds(row), int(row["step"])
        every = step not in r.train_column("grad_amax", unfinished=True).index  # no finite gradient on its step: from
        # the loss end
        seen = step in r.train_column("loss", unfinished=True).index  # finite: a non-finite loss before it leaves no
        # `grad_op`
        operation = r.singular_operation(step)
        template = ("nonfinite_grad_singular" if operation is not None else "nonfinite_grad_op" if not every else
                    "nonfinite_grad_at_loss" if seen else "nonfinite_grad_loss_unseen")
        return [Cause("divergence", "critical", **_where(row),
                      evidence={"mode": r.mode, "dtype": row.get("dtype"), "holds": holds, "in_backward": True,
                                "every_gradient": every, "loss_finite": True if seen else None,
                                "largest_measured": largest,
                                "range_limit": DTYPE_MAX[row["dtype"]] ** RANGE_EXPONENT,
                                **({"loss_operation": operation} if operation is not None else {})},
                      fix=r.fix(template, tensor=row.get("tensor"), holds=holds, dtype=row.get("dtype"),
                                operation=operation,
                                amax=f"{largest:.3g}", loss="a finite loss" if seen else
                                "a loss the probes never saw (hand it over: " + PHRASES["hand_loss"][r.caller] +
                                "; then the run tells whether it was finite)"))]
    loss = r.train_column("loss")
    finite_loss = loss[loss.map(math.isfinite)]
    # "three times the first loss" means something only for a positive first loss: a negative one (a log-density,
    # a term subtracted) is above three times itself from the start. Each training run against its own first loss
    factor, runs, blown = r.blow_up_factor(), r.train_loss_runs(), r.blown_up_losses()
    # the run whose loss blew up (else the first): the first loss it is judged against, the losses before the blow-up
    blown_run = next((part for part in runs if len(blown) and blown.index[0] in part.index), runs[0] if runs else None)
    first_loss = float(blown_run.iloc[0]) if blown_run is not None else None
    extreme = r.of("extreme_update")
    computed = _nonfinite_loss_computation(r)  # the run's first non-finite value: at or before any extreme update
    if computed is not None and len(extreme):
        computed.evidence["then"] = f"extreme_update@{int(extreme['step'].min())}"
    if len(extreme) and computed is None:
        row = _first(extreme)
        step = int(row["step"])
        state = r.of("optimizer_state_underflow")
        if len(state) and int(state["step"].min()) <= step:
            return []  # second moments flushed to 0 inflated the step: precision's doing (`optimizer_state_underflow`)
        after = []
        for kind in ("nonfinite_param", "nonfinite_activation", "nonfinite_loss", "nonfinite_grad", "scale_below_one",
                     "scaler_backoff"):
            later = r.of(kind)
            later = later[later["step"] >= step]
            if len(later):
                after.append(f"{kind}@{int(later['step'].min())}")
        if len(blown[blown.index >= step]):
            after.append(f"loss_above_{factor:.3g}x@{int(blown[blown.index >= step].index[0])}")
        ratio = float(row["value"])
        lr_at = r.lr_at(step, row.get("model"), row.get("tensor"))  # the lr of the group that moved most
        return [Cause("divergence", "critical" if after else "warning", **_where(row),
                      evidence={"update_ratio": ratio, "update_ratio_limit": EXTREME_UPDATE_RATIO, "mode": r.mode,
                                "lr": lr_at,
                                "then": ", ".join(after) or None, "first_loss": first_loss,
                                "max_loss": float(finite_loss.max()) if len(finite_loss) else None},
                      fix=r.fix("divergence_update", model=row.get("model"), ratio=f"{ratio:.3g}",
                                tensor=row.get("tensor"),
                                at_lr=f" at lr {lr_at:.3g}" if lr_at is not None else ""))]
    blowups = pd.concat([r.of("nonfinite_param"), r.of("nonfinite_loss")])
    if len(blowups) and (len(r.of("nonfinite_lr")) or r.optimizer_made_nonfinite() is not None):
        return []  # the optimizer's own numbers: `optimizer_nonfinite`
    if len(blowups):
        row = _first(blowups)
        if computed is not None:
            return [computed]
        overflowed = r.of("nonfinite_activation")  # a student module's at the step: `activation_overflow` tells it
        overflowed = overflowed[~overflowed["model"].isin(r.teachers)]
        losses = r.of("nonfinite_loss")
        at = int(_first(losses)["step"]) if len(losses) else None
        if (r.unplaced_fp16_loss() is not None and not len(r.of("nonfinite_param"))) \
                or (at is not None and (overflowed["step"] == at).any() and r.contained(at)):
            return []  # a contained overflow (activation_overflow, a warning): nothing blew up
        loss = r.first_nonfinite_loss()
        if loss is not None and r.caller in UNREPLAYED and not r.computes_in_fp16() \
                and not r.module_outputs_at(int(loss["step"])):
            term = "loss" if loss.get("tensor") == "loss" else f"{loss.get('tensor')} loss term"
            return [Cause("divergence", "critical", **_where(loss),
                          evidence={"mode": r.mode, "unplaced": True, "module_statistics": False,
                                    "nonfinite_param_events": len(r.of("nonfinite_param"))},
                          fix=r.fix("loss_unplaced_nonfinite", term=term, step=int(loss["step"])))]
        return [Cause("divergence", "critical", **_where(row),
                      evidence={"mode": r.mode, "nonfinite_param_events": len(r.of("nonfinite_param")),
                                "nonfinite_loss_events": len(r.of("nonfinite_loss"))}, fix=r.fix("divergence"))]
    negative = r.of("negative_lr")
    if len(negative):  # a loss that climbs under a negative learning rate is the ascent it asked for: `lr_negative`
        blown = blown[blown.index < negative["step"].min()]
    if r.updates_wide_weights() and len(blown):
        step, top = int(blown.index[0]), float(blown_run.max())
        evidence = {"first_loss": first_loss, "max_loss": top, "factor": factor, "unplaced": True}
        before = blown_run[blown_run.index < step]
        settled, last = float(before.iloc[-1]) if len(before) else first_loss, float(blown_run.iloc[-1])
        # back to where it was before the spike, within the run's step-to-step scatter (a noisy plateau's last loss
        # is above its loss before the spike half the time)
        back = last <= settled * math.exp(LOSS_SCATTER_Z * r.loss_scatter())
        if blown_run.index[-1] > blown[blown.index <= blown_run.index[-1]].index[-1] and back:
            return [Cause("divergence", "warning", first_step=step, phase="loss", model="student",
                          evidence={**evidence, "recovered": True, "loss_before": settled, "last_loss": last},
                          fix=r.fix("loss_spike", before=f"{settled:.4g}", top=f"{top:.4g}", first=f"{first_loss:.4g}",
                                    factor=f"{factor:.3g}", step=step, last=f"{last:.4g}",
                                    last_step=int(blown_run.index[-1])))]
        if len(r.loss_changes()) < LOSS_SCATTER_MIN_CHANGES:  # one change (two losses): no scatter to judge it by
            return [Cause("divergence", "warning", first_step=step, phase="loss", model="student",
                          evidence={**evidence, "scatter_measured": False, "losses": len(finite_loss)},
                          fix=r.fix("loss_rise_unjudged", first=f"{first_loss:.4g}", top=f"{top:.4g}",
                                    factor=f"{factor:.3g}", step=step, losses=len(finite_loss)))]
        return [Cause("divergence", "critical", first_step=step, phase="loss", model="student", evidence=evidence,
                      fix=r.fix("loss_unplaced", first=f"{first_loss:.4g}", top=f"{top:.4g}",
                                factor=f"{factor:.3g}", step=step))]
    trend = r.loss_trend(before=int(negative["step"].min()) if len(negative) else None)
    if trend is not None and not len(blown):
        return [Cause("divergence", "warning", first_step=trend["first"], phase="loss", model="student",
                      evidence={"unplaced": True, "rising": True, "window": f"{trend['first']}-{trend['last']}",
                                "loss_slope_per_step": trend["slope"], "slope_standard_errors": trend["t"],
                                "fitted_start": trend["start"], "fitted_rise": trend["rise"],
                                "step_noise": trend["noise"]},
                      fix=r.fix("loss_rising", first=trend["first"], last=trend["last"], start=f"{trend['start']:.4g}",
                                end=f"{trend['start'] + trend['rise']:.4g}", t=f"{trend['t']:.3g}"))]
    falling = r.loss_unbounded_below(before=int(negative["step"].min()) if len(negative) else None)
    if falling is not None:
        return [Cause("divergence", "warning", first_step=falling["first"], phase="loss", model="student",
                      evidence={"unplaced": True, "unbounded_below": True,
                                "window": f"{falling['first']}-{falling['last']}", "first_loss": first_loss,
                                "last_loss": float(finite_loss.iloc[-1]), "loss_slope_per_step": falling["slope"],
                                "slope_standard_errors": falling["t"], "step_noise": falling["noise"]},
                      fix=r.fix("loss_unbounded_below", first=falling["first"], last=falling["last"],
                                start=f"{first_loss:.4g}", end=f"{float(finite_loss.iloc[-1]):.4g}",
                                t=f"{-falling['t']:.3g}"))]
    return []


def _undefined_op(r: RunRecord, row: pd.Series, largest: float, module: str) -> tuple[dict, str]:
    """The evidence and fix of a module output an operation undefined on its inputs made (`RunRecord.nonfinite_op`),
    the student's or a teacher's: what its float32 replay made where one ran (float16's NaN, NaN in float32 too), else
    the largest value measured before it against its dtype's range."""
    holds, replay = _holds_value(row), r.wide_replay()
    if replay is not None:
        return ({"holds": holds, "float32_replay": _holds_value(replay), "replay_step": int(replay["step"])},
                r.fix("nonfinite_op_replayed", module=module, holds=holds, wide_holds=_holds_value(replay)))
    return ({"holds": holds, "largest_measured_before": largest,
             "range_limit": DTYPE_MAX[row["dtype"]] ** RANGE_EXPONENT},
            r.fix("nonfinite_op", module=module, holds=holds, dtype=row.get("dtype"), amax=f"{largest:.3g}"))


def _nonfinite_loss_computation(r: RunRecord) -> Cause | None:
    """The loss is the first thing non-finite, on a step whose module outputs were measured and finite: the
    non-finite value was made between the models' outputs and the loss (the loss's own arithmetic, or an input
    nobody watched), not by the weights, an update or the data — so no learning rate explains it either."""
    measured = r.loss_from_finite_outputs()
    if measured is None or r.teacher_alone_in_fp16():  # a float16 teacher's outputs: `teacher_overflow`
        return None
    row, outputs = measured
    dtype = row.get("dtype") if isinstance(row.get("dtype"), str) else None
    term = "loss" if row.get("tensor") == "loss" else f"{row.get('tensor')} loss term"
    wide = max(outputs, key=outputs.get)
    if outputs[wide] > FP16_MAX:
        # finite, measured beyond float16's range, then a non-finite loss: a float16 cast on the way to it makes Inf
        risk = r.of("fp16_overflow_risk")
        risk = risk[(risk["model"] == wide) & (risk["step"] <= row["step"])]
        where = {**_where(row), "model": wide, "module": _where(_first(risk))["module"] if len(risk) else None}
        return Cause("divergence", "critical", **where,
                     evidence={"mode": r.mode, "loss_term": row.get("tensor"), "loss_dtype": dtype,
                               "module_outputs_finite": True, "beyond_float16": True,
                               **{f"act_amax_{model}": v for model, v in outputs.items()}},
                     fix=r.fix("loss_fp16_cast", term=term, model=wide, amax=f"{outputs[wide]:.3g}",
                               module=where["module"] or wide))
    evidence = {"mode": r.mode, "loss_term": row.get("tensor"), "loss_dtype": dtype, "module_outputs_finite": True,
                **{f"act_amax_{model}": v for model, v in outputs.items()}}
    losses = r.train_column("loss")
    largest = float(losses[losses.map(math.isfinite)].abs().max()) if len(losses) else math.nan
    limit = FP16_MAX if dtype == "float16" else DTYPE_MAX.get(dtype or "", math.inf)
    if largest > limit ** RANGE_EXPONENT:  # the loss's own size is near its dtype's range: the sum, not one value
        return Cause("divergence", "critical", **_where(row), evidence={**evidence, "largest_finite_loss": largest},
                     fix=r.fix("loss_sum_low", term=term, dtype=dtype, largest=f"{largest:.5g}", limit=f"{limit:.5g}"))
    # a loss finished in fp32 from a run computing in float16: the outputs it started from were float16
    template = "loss_computation_low" if dtype in ("float16", "bfloat16") \
        else "loss_computation_fp16" if r.computes_in_fp16() else "loss_computation"
    amax = max(outputs.values())
    return Cause("divergence", "critical", **_where(row), evidence=evidence,
                 fix=r.fix(template, term=term, dtype=dtype, amax=f"{amax:.3g}",
                           exp_limit=f"{math.log(DTYPE_MAX.get(dtype or 'float32', DTYPE_MAX['float32'])):.1f}",
                           temperature_limit=f"{amax / FP16_MAX:.2g}"))


RULES = (nonfinite_input, weights_edited, scaler_fp16_weights, scaler_bypassed, optimizer_stepped_twice,
         gradients_not_cleared, micro_batches_summed, accumulation_unmatched, loss_backpropagated_twice,
         teacher_overflow, teacher_dropout, optimizer_eps_underflow, optimizer_state_underflow, optimizer_nonfinite,
         lr_negative, lr_zero, weight_collapse, weight_decay_lost, activation_overflow, gradient_overflow,
         loss_scale_collapse, clip_before_unscale, no_gradients, update_underflow, updates_too_small,
         second_moment_decay, divergence,
         kd_targets_few, kd_temperature_low, kd_input_invalid, loss_term_negative, kd_reduction_mean,
         padding_in_targets)


def rank(causes: list[Cause]) -> list[Cause]:
    """The root cause first, then the rest by severity and time; symptoms of the root folded into it, and so is a
    lesser finding of the root's own cause at its own place (an fp16 overflow's forecast beside the overflow). A root
    that is a finding (not one of `CAUSES`) keeps its first numerical symptom, which names it (`explained_by`) and
    takes its fix: the diagnosis shows how the run failed, the findings why."""
    order = {cause: i for i, cause in enumerate(CAUSE_ORDER)}
    causes = sorted(causes, key=lambda c: (SEVERITY_ORDER[c.severity], *c.when, order[c.order]))
    if not causes or causes[0].severity != "critical":
        return causes
    root, kept, symptoms = causes[0], [causes[0]], []
    shown = root.cause in CAUSES  # a finding's first numerical symptom stays among the causes, explained by it
    for cause in causes[1:]:
        later = (cause.when, order[cause.order]) >= (root.when, order[root.order])
        restated = (cause.cause, cause.model, cause.module) == (root.cause, root.model, root.module)
        if later and restated or cause.cause in SYMPTOM_CAPABLE and later \
                and (cause.severity == "critical" or cause.when > root.when) and not _forward_apart(cause, root):
            if shown or cause.cause not in CAUSES:
                symptoms.append(cause.summary())
                continue
            shown = True
            cause.evidence["explained_by"] = root.summary()
            cause.fix = root.fix
        kept.append(cause)
    if symptoms:
        root.evidence["followed_by"] = "; ".join(symptoms)
    return kept


def _forward_apart(cause: Cause, root: Cause) -> bool:
    """`cause` is a fault of one model's forward in the step where `root`, in another model, began: a model's forward
    reads its own weights and inputs, never another model's outputs — those reach it only through a backward and an
    update, from the next step on. A policy and the frozen copy DPO holds as its reference, both loaded in fp16,
    overflow alike in the same step: each is a cause to fix, neither the other's symptom."""
    return (cause.phase == "forward" and cause.first_step == root.first_step
            and None not in (cause.model, root.model) and cause.model != root.model)


def diagnose(events: pd.DataFrame | None, metrics: pd.DataFrame | None, config: dict) -> Diagnosis:
    """Causes, most important first, as dicts {cause, severity, model, module, tensor, rank, first_step,
    evidence, fix}; the findings and the unread warnings beside them (`Diagnosis`)."""
    record = RunRecord(events, metrics, config)
    causes = rank([c for rule in RULES for c in rule(record)])
    return Diagnosis((cause.as_dict() for cause in causes), record.unread_warnings())
