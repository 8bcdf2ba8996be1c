"""The training loop: a run built in parts, then executed step by step.

Read it top to bottom. `build_run` turns a validated config into a `Run`: the compute (ranks, device,
precision mode), the models, the data, the objective, the optimization (optimizer, scheduler, the trained
parameters) and the training state a checkpoint holds — each made by one function, in the order that
matters. `Trainer` executes a Run: `train` opens the run directory's logs (`open_logs`), attaches the
probes and runs the steps; `_step` is one optimizer step in nanoGPT's order (forward → scaled backward →
unscale → clip → step → update). Probes watch through hooks and never steer; the loop's own guard checks
after every step that the weights are finite, and `--on-nonfinite` (policy.py) decides what a non-finite
step does. Where a run goes on from a checkpoint and what one holds is resume.py's; what an out-of-memory
failure says, out_of_memory.py's.

Under torchrun (`distributed.py`) every rank runs this same loop on its shard of each global batch: the
student is wrapped in DDP, gradients DDP does not hold are averaged, and the step's figures and the
non-finite flag are all-reduced with the readings the step moves anyway, so every rank takes the same
policy action on the same step. Rank 0 evaluates and writes config, metrics, checkpoints and the summary;
each rank appends its own events.rank{N}.jsonl. In a single process those calls do nothing.

Host syncs: one per step at steady state (`to_host`). `--on-nonfinite skip` adds one more (the gradient
norm's finiteness, read before the optimizer step so a step with non-finite gradients never runs), and a
device-side copy of the trainable weights and optimizer state before each step (`NonFinitePolicy`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..contract.config import DistillConfig, refuse_unknown_options, with_config_options, worded_for_distill
from ..contract.errors import BadInput, no_space_left
from ..contract.events import EventLog, JsonlLog, NullLog, events_file_name
from ..contract.modes import Capabilities, detect_capabilities, resolve_mode, slow_half_precision
from ..contract.numerics import KD_TARGETS_WARNING, KD_TEMPERATURE_FLOOR, dtype_name, perplexity
from ..contract.rundir import STUDENT, built_then_moved, causes_and_findings, resume_command, write_json_atomic
from ..contract.version import __version__
from ..contract.wording import counted, shell_command
from ..contract.writers import RunClaim
from ..presentation.closing import finalize_run
from ..presentation.ui import TrainingDisplay
from ..probes import ProbeSet
from ..probes.base import abs_max, to_host
from . import checkpoint as ckpt
from . import distributed as dist
from .data import BatchStream, Corpus, TokenBlocks, eval_batches, load_corpus, split_validation, tokenize_blocks
from .distributed import World
from .fused_loss import unfusable_reason
from .models import (
    check_block_fits,
    check_causal,
    check_ids_fit,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    shared_vocabulary,
)
from .objective import HiddenStateKD, LogitKD, LossParts
from .out_of_memory import Phase, is_out_of_memory, out_of_memory_message
from .policy import NonFinitePolicy
from .precision import Precision, make_precision
from .resume import Resumed, TrainingState, locate_run, log_offsets, resume_run
from .router import RouterInfo, RouterTerms, find_routers, router_state, save_router_update
from .signals import StopRequests


@dataclass
class RunResult:
    run_dir: Path
    status: str
    summary: dict
    exit_code: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name}: only cpu and cuda are supported")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    import transformers

    return {"sarkd_diag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": ".".join(map(str, __import__("sys").version_info[:3]))}


# ---------------------------------------------------------------------------------- the parts of a run
@dataclass
class Compute:
    """Where and how this process computes: its place among the ranks, its device and what the device does
    well, the precision mode (and why), the mode's strategy, and how the ranks hold the teacher."""

    world: World
    device: torch.device
    capabilities: Capabilities
    mode: str
    mode_reason: str
    precision: Precision
    teacher_holding: dist.WholeTeacher | dist.ShardedTeacher


@dataclass
class Models:
    """The student (training) and the teacher (frozen but for its routers), on their devices in the mode's
    dtypes; their tokenizers; whether the two tokenize differently (`dual`); the routers that train; and the
    setup events loading them gave, recorded once the event log exists."""

    student: nn.Module
    teacher: nn.Module
    student_tokenizer: object
    teacher_tokenizer: object
    dual: bool
    routers: list[RouterInfo]
    notes: list[dict]
    kd_vocab: int | None = None  # the logit columns logit KD compares (`models.shared_vocabulary`); None: dual


@dataclass
class Data:
    """The training batches (this rank's shard of each global batch), the evaluation batches, and what
    config.json records of them: block counts, the corpus and where the validation data came from."""

    batches: BatchStream
    eval_set: list[dict]
    sizes: dict[str, int]
    source: str
    validation_source: str


@dataclass
class Optimization:
    """The optimizer (the student and a dual-mode projection at --student-lr, routers at --router-lr), its
    scheduler, every trained parameter in the optimizer's order (the guard's and the probes' order), and
    those DDP does not hold (their gradients are averaged by `World.average_gradients`, a sharded teacher's
    routers by FSDP's reduce-scatter)."""

    optimizer: torch.optim.Optimizer
    scheduler: object | None
    trainable: list[nn.Parameter]
    outside_ddp: list[nn.Parameter]


@dataclass
class Run:
    """A run as built from its config, before anything runs or is written: `build_run` makes it, `Trainer`
    executes it. `state` is what a checkpoint of it holds (resume.py)."""

    config: DistillConfig
    compute: Compute
    run_dir: Path
    resume_source: Path | None  # the run directory of the checkpoint to resume from; None for a new run
    models: Models
    data: Data
    objective: LogitKD | HiddenStateKD
    optimization: Optimization
    state: TrainingState
    claim: RunClaim | None = None  # rank 0's hold on run_dir, from its check until the run has closed


def build_run(config: DistillConfig) -> Run:
    """Everything a run needs, in the order that matters: the compute first (the mode decides the dtypes), the
    run directory checked before anything in it changes, the data files read before a large model loads, the
    models before the data (tokenized by the student's tokenizer), the objective before the optimizer (a
    dual-mode projection trains too)."""
    compute = set_up_compute(config)
    run_dir, resume_source, claim = locate_run(config, compute.world, compute.mode)
    try:
        corpus = load_corpus(config.dataset_name, config.dataset_config_name, config.train_file,
                             config.validation_file)
        models = load_models(config, compute)
        data = load_data(config, corpus, models, compute.world)
        objective = make_objective(config, models, compute)
        optimization = make_optimization(config, models, objective)
    except BaseException:
        if claim is not None:  # nothing was written: a directory the claim created goes again
            claim.release(unused=True)
        if not (config.output_dir or config.resume_from):  # the default directory, made for this run: none is left
            with contextlib.suppress(OSError):  # rmdir removes only an empty directory
                run_dir.rmdir()
                run_dir.parent.rmdir()  # runs/, when this run was to be its first
        raise
    state = TrainingState(models.student, models.teacher, objective.projection, optimization.optimizer,
                          compute.precision, optimization.scheduler, data.batches)
    return Run(config, compute, run_dir, resume_source, models, data, objective, optimization, state, claim)


def set_up_compute(cfg: DistillConfig) -> Compute:
    """Join the ranks (under torchrun), pick the device and the precision mode."""
    world, device = dist.init(resolve_device(cfg.device))
    if world.distributed:
        if cfg.nproc > 1 and cfg.nproc != world.size:
            raise BadInput(f"--nproc {cfg.nproc}, but torchrun started {counted(world.size, 'process')}")
        cfg.nproc = world.size  # recorded, so a resume with another number of ranks is refused
    elif cfg.nproc > 1:
        raise BadInput(f"--nproc {cfg.nproc} runs under torchrun: `sarkd-diag train --nproc {cfg.nproc}` "
                       f"launches it, or `torchrun --nproc_per_node {cfg.nproc} -m sarkd_diag train ...`")
    if cfg.shard_teacher and not world.distributed:
        raise BadInput("--shard-teacher shards the teacher over several ranks: add --nproc N (N ≥ 2), or run "
                       "under torchrun with --nproc_per_node N")
    capabilities = detect_capabilities(device)
    mode, reason = resolve_mode(cfg.precision, cfg.model_dtype, capabilities)
    return Compute(world, device, capabilities, mode, reason, make_precision(mode, device),
                   dist.teacher_holding(world, device, cfg.shard_teacher))


def load_models(cfg: DistillConfig, compute: Compute) -> Models:
    """Tokenizers and models, loaded in the dtypes the mode holds them in, checked, then converted by the mode;
    the teacher's routers made trainable (SAR)."""
    notes: list[dict] = [{"kind": "setup_note", "severity": "warning", "message": unused}
                         for unused in cfg.unused_options()]
    slow = slow_half_precision(compute.mode, compute.capabilities)
    if slow:
        notes.append({"kind": "setup_note", "code": "slow_precision", "severity": "warning", "message": slow})
    student_tokenizer = load_tokenizer(cfg.student_model, cfg.trust_remote_code)
    teacher_tokenizer = load_tokenizer(cfg.teacher_model, cfg.trust_remote_code)
    for tok, name in ((student_tokenizer, cfg.student_model), (teacher_tokenizer, cfg.teacher_model)):
        note = ensure_pad_token(tok, name)
        if note:
            notes.append({"kind": "setup_note", "message": note})
    seed_everything(cfg.seed)
    student = load_causal_lm(cfg.student_model, cfg.trust_remote_code, compute.precision.trainable_dtype)
    teacher = load_causal_lm(cfg.teacher_model, cfg.trust_remote_code, compute.precision.frozen_dtype)
    sizes = (teacher.config.vocab_size, student.config.vocab_size)
    kd_vocab = shared_vocabulary(teacher_tokenizer, student_tokenizer, *sizes)
    dual = kd_vocab is None
    if not dual and sizes[0] != sizes[1]:
        notes.append({"kind": "setup_note", "code": "padded_vocabulary",
                      "message": f"teacher {cfg.teacher_model} ({sizes[0]} logits) and student {cfg.student_model} "
                                 f"({sizes[1]}) share one tokenizer, their heads padded past it: KD compares the "
                                 f"first {kd_vocab} logits, the ids both have"})
    for model, name in ((student, cfg.student_model), (teacher, cfg.teacher_model)):
        if model is student or not dual:  # in dual-tokenizer mode the teacher's tokens are its own
            check_block_fits(cfg.block_size, max_positions(model), name)
    if dual:
        for tok, name in ((student_tokenizer, cfg.student_model), (teacher_tokenizer, cfg.teacher_model)):
            if not getattr(tok, "is_fast", False):
                raise BadInput(f"dual-tokenizer mode needs character offsets, but the tokenizer of {name} is a "
                               "slow (Python) tokenizer without offset mappings")
    teacher.requires_grad_(False).eval()
    routers = _train_routers(cfg, teacher, dual, notes)
    student.train()
    if cfg.gradient_checkpointing:  # transformers 5 renamed it activation checkpointing
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    compute.precision.convert(student.to(compute.device))
    teacher.to(_teacher_home(cfg, compute.device, notes))
    compute.precision.convert(teacher)
    with compute.precision.forward_context():  # as the loop runs them: under mixed, fp16 weights beside fp32 ones
        check_causal(student, "--student-model", cfg.student_model)
        check_causal(teacher, "--teacher-model", cfg.teacher_model)
    compute.teacher_holding.hold(teacher)  # sharded: the routers become DTensors (every use of them follows)
    return Models(student, teacher, student_tokenizer, teacher_tokenizer, dual, routers, notes, kd_vocab)


def _train_routers(cfg: DistillConfig, teacher: nn.Module, dual: bool, notes: list[dict]) -> list[RouterInfo]:
    """The teacher's routers, made trainable (SAR); none in dual mode, where the teacher is a fixed target."""
    try:
        routers = find_routers(teacher, cfg.router_patterns)
    except ValueError as exc:
        raise BadInput(f"--router-patterns: {exc}") from None
    if cfg.router_patterns and not routers:
        raise BadInput(f"--router-patterns {' '.join(cfg.router_patterns)} match no router of "
                       f"{cfg.teacher_model}")
    if dual:
        notes.append({"kind": "dual_tokenizer", "message": f"teacher {cfg.teacher_model} and student "
                      f"{cfg.student_model} tokenize differently: the student matches the teacher's last "
                      "hidden states, aligned by character spans"})
        if routers:
            stay = "stays" if len(routers) == 1 else "stay"
            notes.append({"kind": "router_frozen_dual", "model": "teacher",
                          "message": f"{counted(len(routers), 'router')} {stay} frozen in dual-tokenizer mode: the "
                          "teacher's hidden states are a fixed target"})
        return []
    if not routers:
        notes.append({"kind": "no_router", "severity": "warning", "model": "teacher",
                      "message": f"teacher {cfg.teacher_model} has no MoE router: plain KD"})
    names = dict(teacher.named_parameters())
    for router in routers:
        for name in router.param_names:
            names[name].requires_grad_(True)
        notes.append({"kind": "router_found", "model": "teacher", "module": router.name,
                      "tensor": ",".join(router.param_names), "probe": "router",
                      "message": f"router {router.name}: {router.num_experts} experts, top-{router.top_k}; "
                      f"trains at --router-lr {cfg.router_lr}"})
    return routers


def _teacher_home(cfg: DistillConfig, device: torch.device, notes: list[dict]) -> torch.device:
    if device.type != "cuda":
        for flag, on in (("--offload-teacher-to-cpu", cfg.offload_teacher_to_cpu),
                         ("--clear-cache-every-step", cfg.clear_cache_every_step)):
            if on:
                notes.append({"kind": "setup_note", "message": f"{flag} is a no-op on {device.type}"})
    return torch.device("cpu") if cfg.offload_teacher_to_cpu else device


def _check_ids_fit(cfg: DistillConfig, models: Models, blocks: tuple[TokenBlocks, ...]) -> None:
    """The student's token ids index the student's embeddings, and the teacher's too, unless it tokenizes the
    blocks' text for itself (dual-tokenizer mode: then its own ids, for the whole corpus — read only when its
    tokenizer has more tokens than the teacher has embeddings: otherwise no id it gives can be out of range, and
    the corpus, which training tokenizes batch by batch, is not tokenized once more at setup)."""
    largest = max(int(b.ids.max()) for b in blocks)
    check_ids_fit(largest, models.student, "--student-model", cfg.student_model, cfg.student_model)
    if models.dual:
        if len(models.teacher_tokenizer) <= models.teacher.get_input_embeddings().num_embeddings:
            return
        texts = [text for b in blocks for text in b.texts]
        encoded = models.teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
        teacher_largest = max((max(row, default=0) for row in encoded), default=0)
        check_ids_fit(teacher_largest, models.teacher, "--teacher-model", cfg.teacher_model, cfg.teacher_model)
    else:
        check_ids_fit(largest, models.teacher, "--teacher-model", cfg.teacher_model, cfg.student_model)


def load_data(cfg: DistillConfig, corpus: Corpus, models: Models, world: World) -> Data:
    """The corpus in blocks of the student's tokens (with their text in dual mode), a validation set held out
    when none is given, this rank's batch stream and the evaluation batches."""
    train_blocks = tokenize_blocks(corpus.train, models.student_tokenizer, cfg.block_size, keep_text=models.dual,
                                   what=corpus.train_origin)
    if corpus.validation is None:
        train_blocks, val_blocks = split_validation(train_blocks, cfg.seed)
        validation_source = f"held out {len(val_blocks)} of {len(train_blocks) + len(val_blocks)} blocks"
    else:
        val_blocks = tokenize_blocks(corpus.validation, models.student_tokenizer, cfg.block_size,
                                     keep_text=models.dual, what=corpus.validation_origin)
        validation_source = "given"
    _check_ids_fit(cfg, models, (train_blocks, val_blocks))
    batches = BatchStream(train_blocks, cfg.per_device_batch_size, cfg.seed, world.size, world.shard)
    return Data(batches, eval_batches(val_blocks, cfg.per_device_batch_size, cfg.eval_max_batches),
                {"train_blocks": len(train_blocks), "validation_blocks": len(val_blocks)}, corpus.source,
                validation_source)


def make_objective(cfg: DistillConfig, models: Models, compute: Compute) -> LogitKD | HiddenStateKD:
    """Logit KD (with the router terms when routers train), or hidden-state KD across two tokenizers; either
    trains through the student as DDP wraps it under torchrun."""
    trained = compute.world.wrap(models.student, compute.device)  # itself in one process
    weights = dict(alpha_kd=cfg.alpha_kd, alpha_ce=cfg.alpha_ce)
    if models.dual:
        objective = HiddenStateKD(models.teacher, trained, models.teacher_tokenizer,
                                  student_hidden_size=models.student.config.hidden_size,
                                  teacher_max_tokens=max_positions(models.teacher), device=compute.device, **weights)
        compute.precision.convert(objective.projection)  # trained with the student: held as the mode holds it
        return objective
    fused = cfg.fused_loss and _fuses(models, compute)
    _note_low_temperature(cfg, models.notes)
    router_terms = None
    if models.routers:
        router_terms = RouterTerms(models.teacher, models.routers, cfg.router_anchor_weight,
                                   cfg.router_load_balance_weight, cfg.router_entropy_weight)
    return LogitKD(models.teacher, trained, kind=cfg.kd_loss, temperature=cfg.temperature, jsd_beta=cfg.jsd_beta,
                   fused=fused, router_terms=router_terms, vocab=models.kd_vocab, **weights)


def _note_low_temperature(cfg: DistillConfig, notes: list[dict]) -> None:
    """A KD temperature below KD_TEMPERATURE_FLOOR (`contract.numerics`): the KD term's gradient, T · (p_student −
    p_teacher) per logit at T, is a sliver of its size at T = 1 and the teacher's softmax at T is one-hot, while its
    value, T² · KL, reads as a KD term near its minimum."""
    if cfg.alpha_kd and cfg.temperature < KD_TEMPERATURE_FLOOR:
        notes.append({"kind": "setup_note", "code": "kd_temperature_low", "severity": "warning", "phase": "loss",
                      "step": 1, "model": "student", "tensor": "kd", "value": cfg.temperature,
                      "message": f"--temperature {cfg.temperature:g}: the KD term's gradient per logit is "
                                 f"T · (p_student − p_teacher) at T, {cfg.temperature:g}× its size at T = 1, and the "
                                 "teacher's softmax at T is all but one-hot: the KD term matches the teacher's "
                                 "argmax, not its distribution, and next to the cross-entropy it trains next to "
                                 "nothing"})


def _fuses(models: Models, compute: Compute) -> bool:
    """Whether both models' logits can be taken chunk by chunk inside the loss; if not, a setup note says why.
    Checked under the mode's autocast, the way the loop will call them; heads of two sizes (a padded vocabulary)
    do not fuse: the KD term compares only the logits of the ids both have."""
    padded = models.teacher.config.vocab_size != models.student.config.vocab_size
    for name, model in (("student", models.student), ("teacher", models.teacher)):
        with compute.precision.forward_context():
            reason = "its head's size differs from the other's (a padded vocabulary)" if padded else (
                unfusable_reason(model))
        if reason is not None:
            models.notes.append({"kind": "setup_note", "code": "loss_unfused", "severity": "warning", "model": name,
                                 "message": f"--fused-loss: the {name} does not fuse, {reason}; the loss takes both "
                                            "models' complete logits instead (more memory, same result)"})
            return False
    return True


def make_optimization(cfg: DistillConfig, models: Models, objective: LogitKD | HiddenStateKD) -> Optimization:
    """AdamW over the student (and a dual-mode projection) at --student-lr and the routers at --router-lr, and
    the scheduler (--use-scheduler)."""
    groups = [{"params": list(models.student.parameters()) + objective.extra_parameters(),
               "lr": cfg.student_lr, "name": "student"}]
    router_params = [p for p in models.teacher.parameters() if p.requires_grad]
    if router_params:
        groups.append({"params": router_params, "lr": cfg.router_lr, "weight_decay": 0.0, "name": "router"})
    optimizer = torch.optim.AdamW(groups, lr=cfg.student_lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = None
    if cfg.use_scheduler:
        from transformers import get_scheduler

        scheduler = get_scheduler(cfg.scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.train_steps)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Optimization(optimizer, scheduler, trainable, objective.extra_parameters() + router_params)


# ------------------------------------------------------------------------------- the run directory
@dataclass
class Logs:
    """The run directory's logs, open for appending and flushed per record: this rank's events (and their
    file's name, whose size a checkpoint keeps), rank 0's metrics."""

    events: EventLog
    metrics: JsonlLog | NullLog
    events_name: str

    def close(self) -> None:
        self.events.close()
        self.metrics.close()


def open_logs(run: Run, world: World, resumed: Resumed | None, notes: list[dict], display: TrainingDisplay) -> Logs:
    """Create (or continue) the run directory and open its logs; a new run's setup events, or a resumed run's.

    Under torchrun rank 0 prepares the directory and writes config.json and metrics.jsonl; every rank appends
    its own events.rank{N}.jsonl.
    """
    world.barrier()  # every rank has checked the directory (and loaded its checkpoint) before it changes
    if world.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed is None and run.config.overwrite:
            ckpt.clear_run_files(run.run_dir)
    world.barrier()  # ... and no rank opens its log before the previous run's are gone
    events_name = events_file_name(world.rank, world.size)
    if resumed is not None:
        resumed.continue_logs(run.run_dir, events_name, world.is_main)
    if world.is_main:
        _write_config(run)
    logs = Logs(EventLog(run.run_dir / events_name, rank=world.rank),
                JsonlLog(run.run_dir / "metrics.jsonl") if world.is_main else NullLog(), events_name)
    logs.events.on_event(display.alert)
    if resumed is None:
        master = dtype_name(run.compute.precision.master_dtype)
        logs.events.record("precision_setup", "info", f"precision {run.compute.mode} ({run.compute.mode_reason}); "
                           f"trainable weights held in {master}", probe="precision", dtype=master)
        for note in notes:
            logs.events.record(**note)
        return logs
    record_fallbacks(logs.events, resumed.fallbacks, resumed.checkpoint, resumed.step)
    logs.events.record("setup_note", "info", f"resumed from {resumed.checkpoint} at step {resumed.step} of "
                       f"{run.config.train_steps}", step=resumed.step, code="resumed")
    return logs


def record_fallbacks(events: EventLog, problems: list[str], used: Path | None, step: int) -> None:
    """Checkpoints that did not load, and the one used instead (or none)."""
    instead = f"using {used.name} instead" if used is not None else "no older checkpoint loads"
    for problem in problems:
        events.record("checkpoint_fallback", "warning", f"{problem}; {instead}", step=step, phase="setup")


def _write_config(run: Run) -> None:
    """config.json: the options, the precision and the dtypes every parameter is held in, the device, the data,
    the objective, the routers and the versions."""
    cfg, compute, models = run.config, run.compute, run.models
    param_dtypes = {}
    for name, model in (("student", models.student), ("teacher", models.teacher)):
        counts: dict[str, dict[str, int]] = {}
        for p in model.parameters():
            role = "trainable" if p.requires_grad else "frozen"
            key = dtype_name(p.dtype)
            counts.setdefault(role, {}).setdefault(key, 0)
            counts[role][key] += p.numel()
        param_dtypes[name] = counts
    extra = [p for p in run.objective.extra_parameters()]
    if extra:
        param_dtypes["projection"] = {"trainable": {dtype_name(extra[0].dtype): sum(p.numel() for p in extra)}}
    trainable_dtypes = {dtype_name(p.dtype) for p in run.optimization.trainable}
    precision = compute.precision
    config = {
        "options": cfg.to_dict(),
        "precision": {
            "mode": compute.mode, "requested": cfg.precision, "model_dtype": cfg.model_dtype,
            "reason": compute.mode_reason,
            "master_dtype": dtype_name(precision.master_dtype),
            "trainable_dtypes": sorted(trainable_dtypes),
            "compute_dtype": dtype_name(precision.autocast_dtype or precision.trainable_dtype),
            "loss_scaling": precision.loss_scaling,
            "param_dtypes": param_dtypes,
        },
        "distributed": {"ranks": compute.world.size, "backend": compute.world.backend,
                        "teacher": compute.teacher_holding.name},
        "device": {"type": compute.device.type, "name": compute.capabilities.name,
                   "native_bf16": compute.capabilities.native_bf16, "threads": torch.get_num_threads()},
        "data": {"source": run.data.source, "validation": run.data.validation_source, **run.data.sizes,
                 "block_size": cfg.block_size},
        "objective": {"kind": "hidden-state-kd (dual tokenizer)" if models.dual else "logit-kd",
                      "kd_loss": "mse of projected hidden states" if models.dual else cfg.kd_loss,
                      "fused_loss": run.objective.fused},
        "routers": [{"module": r.name, "parameters": list(r.param_names), "num_experts": r.num_experts,
                     "top_k": r.top_k} for r in models.routers],
        "versions": _versions(),
    }
    write_json_atomic(run.run_dir / "config.json", config)


def exit_code(status: str, *, internal_error: bool, no_space: bool, critical: bool, stops: StopRequests) -> int:
    """How `train` ends (docs/run-directory.md, Exit codes): 3 after an internal error; 1 failed (out of memory, no
    space left — also to close a run that completed its steps: its summary and report are missing), stopped, or
    completed with a critical cause; 0 completed cleanly; 130/143 interrupted by a signal."""
    if internal_error:
        return 3
    return {"completed": 1 if critical or no_space else 0, "stopped": 1, "failed": 1}.get(status, stops.exit_code)


@dataclass
class StepSums:
    """A step's loss sums over its micro-batches, on the device, and what they are divided by: the global
    target count (every rank knows it from the global batch's indices) and the number of ranks (DDP averages
    gradients over ranks, so each rank's share of the loss is scaled back up by it)."""

    targets: int
    ranks: int
    objective: torch.Tensor  # alpha_kd · kd + alpha_ce · ce, as the objective weighs them
    kd: torch.Tensor
    ce: torch.Tensor
    router: torch.Tensor
    readings: dict[str, torch.Tensor]  # the router's, of the last micro-batch
    kd_targets: torch.Tensor | None = None  # the target tokens the KD term covered, where the objective counts them

    @classmethod
    def of(cls, micro: list[dict], ranks: int, device: torch.device) -> StepSums:
        zero = torch.zeros((), device=device)
        return cls(sum(b["global_targets"] for b in micro), ranks, zero, zero, zero, zero, {})

    @property
    def denominator(self) -> int:
        return max(self.targets, 1)

    def add(self, parts: LossParts, micro_batches: int) -> None:
        if parts.router_loss is not None:
            self.router = self.router + parts.router_loss.detach() / micro_batches
        self.readings = parts.readings
        self.objective = self.objective + parts.objective.detach()
        self.kd, self.ce = self.kd + parts.kd_sum.detach(), self.ce + parts.ce_sum.detach()
        if parts.kd_targets is not None:
            self.kd_targets = parts.kd_targets + (0 if self.kd_targets is None else self.kd_targets)

    def per_step(self) -> dict[str, torch.Tensor]:
        """This rank's figures that sum over ranks into the step's: the router's readings (each rank's mean over
        its tokens, so a share of the mean) and the KD term's target count."""
        counts = {} if self.kd_targets is None else {"kd_targets": self.kd_targets}
        return {**{name: r / self.ranks for name, r in self.readings.items()}, **counts}


# ----------------------------------------------------------------------------------- executing a run
class Trainer:
    """One distillation run, built from a validated config (`build_run`); `train()` runs it and closes the run
    directory. The Trainer holds what changes as the run goes: the step, the policy, the logs and probes."""

    def __init__(self, config: DistillConfig, display: TrainingDisplay | None = None):
        self.config = config
        self.display = display or TrainingDisplay(log_every=config.log_every)
        self.run = run = build_run(config)
        self.world = run.compute.world  # a failure of this rank alone makes it close on its own (`_failed`)
        if not self.world.is_main:
            self.display = TrainingDisplay(quiet=True)  # one progress display: rank 0's
        self.step, self.step_start, self.last_eval = 0, {}, (None, None)
        self.phase = Phase("setup")  # `with self.phase("forward"):`; where an out-of-memory failure happened
        opt = run.optimization
        self.policy = NonFinitePolicy(config.on_nonfinite, opt.optimizer, opt.scheduler,
                                      max_rollbacks=config.max_rollbacks, save_steps=config.save_steps,
                                      loss_scaling=run.compute.precision.loss_scaling,
                                      named_trainable=run.state.named_trainable(), world=self.world,
                                      restore=self._restore_before)
        self.notes = run.models.notes + self.policy.setup_notes(run.compute.device.type)  # recorded by open_logs
        self.out_of_memory: str | None = None
        self.internal_error = False
        self.no_space = False  # a write failed for want of disk space (ENOSPC, EDQUOT): a failure, not a bug
        self.stopped_at_once = False  # a second Ctrl-C: nothing more is saved, the run closes as it stands
        self.resumed: Resumed | None = None
        if run.resume_source is not None:
            try:
                self.resumed = resume_run(config, run.run_dir, run.resume_source, run.compute.mode, self._load_state)
            except BaseException:
                self._release(unused=True)  # refused before any log opened: a directory the claim made goes again
                raise

    def _release(self, unused: bool = False) -> None:
        if self.run.claim is not None:
            self.run.claim.release(unused=unused)

    # the parts a test or a hook reaches for, by their usual names
    student = property(lambda self: self.run.models.student)
    teacher = property(lambda self: self.run.models.teacher)
    student_tokenizer = property(lambda self: self.run.models.student_tokenizer)
    routers = property(lambda self: self.run.models.routers)
    batches = property(lambda self: self.run.data.batches)
    optimizer = property(lambda self: self.run.optimization.optimizer)
    trainable = property(lambda self: self.run.optimization.trainable)
    precision = property(lambda self: self.run.compute.precision)

    # ----------------------------------------------------------------------------------------- run
    def train(self) -> RunResult:
        """Run the steps and close the run directory; the exit code is docs/run-directory.md's (Exit codes)."""
        self.logs = open_logs(self.run, self.world, self.resumed, self.notes, self.display)
        status = "failed"
        self.probes = ProbeSet.for_trainer(self.run, self.logs.events)
        with StopRequests() as stops:  # until the run is closed: a second Ctrl-C while it closes stops that too
            self.display.when_closed(stops.output_closed)  # `train | head`: stop after the step, as on SIGPIPE
            try:
                status = self._run(stops)
            except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; the newest checkpoint is kept as it was
                self.logs.events.record("interrupted", "warning", self._stopped_at_once(), step=self.step,
                                        phase="policy")
                status, self.stopped_at_once = "interrupted", True
            except Exception as exc:
                status = self._failed(exc)
            finally:
                self.display.stop()
                self.probes.close(completed=status == "completed")
            if self.out_of_memory is not None:  # handled out here, where the failed step's tensors are freed
                self._handle_out_of_memory(self.out_of_memory)
            try:
                return self._close(status, stops)
            finally:
                self.run.objective.close()  # router hooks off; DDP's wrapper goes before its process group
                dist.teardown(self.world)
                self._release()  # closed: the directory is free for a resume, a report, another run

    def _run(self, stops: StopRequests) -> str:
        """The steps, with evaluations and checkpoints on schedule; returns the run's status."""
        with self.phase("policy"):  # between steps: stop requests, the policy, evaluations and checkpoints
            return self._steps(stops)

    def _steps(self, stops: StopRequests) -> str:
        cfg, events = self.config, self.logs.events
        self.display.start(cfg.train_steps, self.step, self.run.run_dir)
        if self.step == 0:
            self._evaluate()
        while self.step < cfg.train_steps:
            if self._stop_requested(stops):
                # under torchrun every rank stops after the same step, some before their own signal arrives
                why = stops.signal.name if stops.signal is not None else "a stop signal on another rank"
                saved = "state saved" if self._checkpointable(self.step) else \
                    "no checkpoint (none is written of step 0 or of non-finite weights)"
                events.record("interrupted", "warning", f"{why}: stopped after step {self.step}; {saved}",
                              step=self.step, phase="policy")
                self._save_checkpoint()
                return "interrupted"
            row = self._step()
            action = self.policy.decide(self.step, row, events)
            self.logs.metrics.write_line(json.dumps(row))
            self.display.update(row["step"], row)
            if action == "stop":
                self._save_checkpoint()  # of finite weights only: a stop after skipped steps keeps the work
                return "stopped"
            if action == "rollback":
                continue
            if self.step % cfg.eval_steps == 0 and self.step < cfg.train_steps:
                self._evaluate()
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.train_steps:
                self._save_checkpoint()
        if self.last_eval[0] != self.step:
            self._evaluate()
        self._save_checkpoint()
        return "completed"

    def _stopped_at_once(self) -> str:
        """What a second Ctrl-C left, as the directory shows it: the step it came during (or after: between steps, in
        an evaluation or a checkpoint's save) and the checkpoint a resume starts from — none, when none was written
        yet (it said "nothing saved since the newest checkpoint" of a run that had none)."""
        between = self.phase.current in ("policy", "eval")
        newest = ckpt.list_checkpoints(self.run.run_dir)
        kept = f"nothing saved since {newest[-1].name}" if newest else "no checkpoint was written yet to resume from"
        return f"a second Ctrl-C: stopped {'after' if between else 'during'} step {self.step}; {kept}; the student " \
               "was not saved"

    def _left_at_once(self, student_saved: bool) -> str:
        """What a run stopped at once (a second Ctrl-C) has and has not: the events and metrics so far, the student
        (saved or not), no summary or report yet — and the commands that build them and continue the run."""
        run_dir = self.run.run_dir
        student = "after saving the student" if student_saved else "without saving the student"
        resume = resume_command(run_dir)
        then = f"; `{resume}` continues it from its newest checkpoint" if resume else \
            "; it has no checkpoint to continue from"
        return (f"a second Ctrl-C: stopped at once, {student}; its events and metrics so far are in {run_dir}: "
                f"`{shell_command('report', run_dir)}` writes its summary and report{then}")

    def _stop_requested(self, stops: StopRequests) -> bool:
        """A stop signal, acted on by all ranks after the same step (each rank receives it at its own moment)."""
        return self.world.any_host_flag(stops.signal is not None)

    def _close(self, status: str, stops: StopRequests) -> RunResult:
        """Close the logs; rank 0 saves the student and writes the summary; every rank ends with rank 0's exit
        code, or with its own when it failed alone."""
        self.logs.close()
        self.world.barrier()  # every rank's events are on disk before rank 0 merges them
        saved = status in ("completed", "interrupted") and not self.stopped_at_once
        routers = router_state(self.run.models.teacher, self.run.models.routers) \
            if saved and self.run.models.routers else None  # every rank: a sharded router is gathered from all
        summary = self._summarize(status, routers) if self.world.is_main else {}
        status = "interrupted" if self.stopped_at_once else status  # also of a run stopped while it closed
        critical = any(d["severity"] == "critical" for d in causes_and_findings(summary))
        code = exit_code(status, internal_error=self.internal_error, no_space=self.no_space, critical=critical,
                         stops=stops)
        shared = self.world.broadcast(code if self.world.is_main else None)  # None: this rank failed on its own
        return RunResult(self.run.run_dir, status, summary, code if shared is None else shared)

    def _summarize(self, status: str, routers: dict[str, torch.Tensor] | None) -> dict:
        """Rank 0: the student (and the `routers`' update) saved, the summary written and shown; {} when that
        fails (an internal error, its traceback saved) or a second Ctrl-C stopped it (nothing more is saved)."""
        run_dir, models, student_saved = self.run.run_dir, self.run.models, False
        if self.stopped_at_once:
            self.display.error(self._left_at_once(student_saved=False))
            return {}
        try:
            if status in ("completed", "interrupted"):  # built aside and moved in: student/ is there only whole
                with built_then_moved(run_dir) as staging:
                    models.student.save_pretrained(staging / STUDENT)
                    models.student_tokenizer.save_pretrained(staging / STUDENT)
                    if routers is not None:  # moved before student/ (sorted): a whole student/ proves it too
                        save_router_update(routers, staging / "router_update.pt")
                student_saved = True
            summary = finalize_run(run_dir, status)
        except KeyboardInterrupt:  # a second Ctrl-C while closing: what is written stays as it is
            self.stopped_at_once = True
            self.display.error(self._left_at_once(student_saved))
            return {}
        except Exception as exc:
            self._save_traceback(exc, completed=status == "completed")
            return {}
        self.display.summary(summary)
        return summary

    def _failed(self, exc: Exception) -> str:
        """An exception out of the run: out of memory (exit 1, handled by the caller) or an internal error (exit 3).

        Under torchrun it may be this rank's alone: from here on it closes without collectives."""
        self.world = self.world.on_its_own()
        if is_out_of_memory(exc):
            text = str(exc).strip()
            self.out_of_memory = text.splitlines()[0] if text else type(exc).__name__
        else:
            traceback_file = self._save_traceback(exc)
            if self.internal_error:  # not a full disk: the events log takes the error too
                where = f"; traceback in {traceback_file}" if traceback_file else ""
                said = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, as the console's
                self.logs.events.record("run_error", "critical", f"{said}{where}",
                                        step=self.step, phase=self.phase.current, probe="loop")
        return "failed"

    def _save_traceback(self, exc: Exception, completed: bool = False) -> str | None:
        """The error's traceback in the run directory, one line on the console; returns the file's name (None when
        it could not be written). A second error of the run — closing it failed too, as on a full disk — goes after
        the first, which is the cause: it replaced it before. A disk that is full is no bug of this tool (a
        failure, exit 1, as out of memory is): the line says so, and what brings the run back once there is
        space — for a run that `completed` its steps and failed to close, its summary and report alone."""
        name = "traceback.txt" if self.world.size == 1 else f"traceback.rank{self.world.rank}.txt"
        path = self.run.run_dir / name
        second = self.internal_error or self.no_space
        try:
            with path.open("a" if second else "w") as file:
                file.write(traceback.format_exc())
            where = f" (traceback in {path})"
        except OSError:  # the disk that is full takes no traceback either
            where, name = "", None
        full = no_space_left(exc)
        what = "closing the run failed too" if second else "no space left on device" if full else "internal error"
        if full:
            self.no_space = True
            report = shell_command("report", self.run.run_dir)
            resume = resume_command(self.run.run_dir)
            then = f"`{report}` writes its summary and report" if completed else \
                f"`{report}` rebuilds its summary and `--resume` continues it from its last checkpoint" if resume \
                else f"`{report}` rebuilds its summary (it has no checkpoint to continue from)"
            where += f" — free space, then {then}" if not second else ""
        else:
            self.internal_error = True
        self.display.error(f"{what}: {type(exc).__name__}: {exc}{where}")
        return name

    def _handle_out_of_memory(self, error: str) -> None:
        """Record the run's memory breakdown, keep the last good step in a checkpoint, say what to change."""
        phase, step, run = self.phase.current, self.step, self.run
        run.optimization.optimizer.zero_grad(set_to_none=True)
        if run.compute.device.type == "cuda":
            torch.cuda.empty_cache()
        rewind = phase in ("forward", "backward")  # the step had not touched weights or optimizer state yet
        keep = step - 1 if rewind else step
        savable = phase in ("forward", "backward", "eval") and keep > 0 and self.policy.weights_finite \
            and not run.state.sharded  # this rank failed alone: sharded routers cannot be gathered without the rest
        message = out_of_memory_message(self.config, run.compute.mode, run.models.teacher, run.models.student,
                                        run.compute.device, dual=run.models.dual, fused=run.objective.fused,
                                        error=error, phase=phase, step=step,
                                        saved=keep if savable else None,
                                        teacher_shards=run.compute.teacher_holding.size)
        self.logs.events.record("out_of_memory", "critical", message, step=step, phase=phase, probe="loop")
        if savable:
            self._save_checkpoint(rewind=rewind)
        self.display.error(message)

    # ------------------------------------------------------------------------------------ one step
    def _step(self) -> dict:
        """One optimizer step in nanoGPT's order; returns its metrics row (`_record_step`)."""
        cfg, run, started = self.config, self.run, time.perf_counter()
        precision, opt = run.compute.precision, run.optimization
        with self.phase("forward"):  # a failure from here to the optimizer rewinds to the step before
            self.step_start = {"data": run.data.batches.state_dict(), "rng": ckpt.capture_rng()}
            self.step += 1
            self.probes.begin_step(self.step)
            micro = [run.data.batches.next() for _ in range(cfg.grad_accum_steps)]
            sums = StepSums.of(micro, self.world.size, run.compute.device)
            for i, batch in enumerate(micro):
                sums.add(self._forward_backward(batch, sums, sync=i == len(micro) - 1), cfg.grad_accum_steps)
        with self.phase("optimizer"):
            self.world.average_gradients(opt.outside_ddp)  # DDP averaged the student's during the last backward
            precision.unscale_gradients(opt.optimizer)
            self.world.agree_on_overflow(precision.loss_scaler, opt.optimizer)
            self.probes.gradients_ready()  # before clipping: a NaN total norm would make every gradient NaN
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = self.world.clip_grad_norm(opt.trainable, max_norm)
            if self.policy.runs_step(self.step, grad_norm, self.logs.events):
                skipped = precision.optimizer_step(opt.optimizer)
            else:  # --on-nonfinite skip: non-finite gradients, the step never runs
                skipped = torch.ones((), device=run.compute.device)
            lr = opt.optimizer.param_groups[0]["lr"]
            if opt.scheduler is not None:
                opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            row = self._record_step(sums, grad_norm, skipped, lr, started, first_batch=micro[0])
        if run.compute.device.type == "cuda" and cfg.clear_cache_every_step:
            torch.cuda.empty_cache()
        return row

    def _forward_backward(self, batch: dict, sums: StepSums, *, sync: bool) -> LossParts:
        """One micro-batch: forward and loss under the mode's autocast, then the backward of this rank's share
        of the step's loss (DDP all-reduces the gradients on the last micro-batch, `sync`)."""
        cfg, run = self.config, self.run
        batch = self._on_device(batch)
        with dist.gradient_sync(run.objective.student, sync=sync):
            precision, share = run.compute.precision, sums.ranks / sums.denominator  # this rank's share of the loss
            with precision.forward_context():
                parts = run.objective(batch, grad_factor=precision.backward_factor() * share)
            loss = parts.objective * share
            if parts.router_loss is not None:
                loss = loss + parts.router_loss / cfg.grad_accum_steps
            self.probes.observe_terms({"kd": parts.kd_sum, "ce": parts.ce_sum, "router": parts.router_loss},
                                      parts.targets)
            with self.phase("backward"):
                run.compute.precision.backward(loss)
        return parts

    def _record_step(self, sums: StepSums, grad_norm: torch.Tensor, skipped: torch.Tensor, lr: float,
                     started: float, first_batch: dict) -> dict:
        """The step on record: the guard's reading of the weights, one all-reduce, the step's one host transfer,
        the probes' events and columns, the metrics row; and a replayed forward when a loss turned non-finite."""
        cfg, device = self.config, self.run.compute.device
        weights_amax = abs_max(self.run.optimization.trainable)  # the guard's per-tensor reading
        weights_finite = weights_amax.isfinite().all()
        # global figures and one decision for all ranks: a single all-reduce (none in one process)
        per_step = sums.per_step()
        objective, kd, ce, router, weights_bad, *readings = self.world.all_sum(
            sums.objective / sums.denominator, sums.kd / sums.denominator, sums.ce / sums.denominator,
            sums.router / sums.ranks, (~weights_finite).float(), *per_step.values())
        device_values = {
            "loss": objective + router, "kd_loss": kd, "ce_loss": ce,
            "router_loss": router, "grad_norm": grad_norm, "skipped": skipped,
            "weights_finite": weights_bad == 0, **dict(zip(per_step, readings, strict=True)),
        }
        scale = self.run.compute.precision.loss_scale()
        if scale is not None:
            device_values["loss_scale"] = scale
        readings = {**self.probes.take_readings(), "param_amax": weights_amax}  # the parameter probe: the guard's
        host, probe_values = to_host(device_values, readings)  # the step's one host sync
        elapsed = time.perf_counter() - started
        tokens = cfg.per_device_batch_size * cfg.block_size * cfg.grad_accum_steps * sums.ranks  # all ranks' tokens
        row = {"step": self.step, "split": "train", **host, "lr": lr, "tokens": tokens,
               "tokens_per_s": tokens / elapsed, "targets": sums.targets, "peak_memory_mb": peak_memory_mb(device),
               "weights_finite": bool(host["weights_finite"]), "skipped": int(host["skipped"])}
        row.setdefault("loss_scale", None)
        if "kd_targets" in row:
            row["kd_targets"] = round(row["kd_targets"])
            self._note_few_kd_targets(row["kd_targets"], sums.targets)
        if sums.targets == 0:
            for key in ("loss", "kd_loss", "ce_loss"):
                row[key] = math.nan  # 0/0: no target tokens; recorded as such, never as 0
        row.update(self.probes.record(probe_values))
        if row["weights_finite"] and self.probes.needs_replay(row["loss"]):  # the loss of all ranks: all replay
            self._replay_forward(first_batch)
        return row

    def _note_few_kd_targets(self, covered: int, targets: int) -> None:
        """A KD term over few of the step's target tokens (dual-tokenizer alignment nearly empty), said once: its
        kd_loss, a mean over every target, would otherwise read as a small loss rather than a missing one."""
        if not (self.world.is_main and targets and covered < KD_TARGETS_WARNING * targets
                and self.logs.events.say_once("kd_targets_few")):
            return
        self.logs.events.record(
            "setup_note", "warning", f"the KD term covered {covered} of the step's {targets} target tokens: "
            f"{self.run.objective.few_targets_reason()}; the kd_loss is a mean over every target token, so it reads "
            "small, and the tokens it misses learn from the cross-entropy alone", code="kd_targets_few",
            step=self.step, phase="loss", probe="loop", tensor="kd", value=covered / targets, numel=targets,
            model="teacher" if self.run.objective.teacher_cut_short else None)  # where the targets were lost

    def _on_device(self, batch: dict) -> dict:
        device = self.run.compute.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _replay_forward(self, batch: dict) -> None:
        """A loss turned non-finite on a step without per-module statistics: rerun its first forward — same
        weights (the scaler skipped the step), same RNG — with statistics on, to name the module where it
        began. The failure path only; the RNG is put back, so the replay changes nothing that follows."""
        after = ckpt.capture_rng()
        ckpt.set_rng_state(ckpt.rng_state(self.step_start["rng"]))
        batch = self._on_device(batch)
        with self.run.compute.precision.forward_context():
            self.probes.replay_forward(lambda: self.run.objective(batch))
        ckpt.set_rng_state(ckpt.rng_state(after))

    @torch.no_grad()
    def _evaluate(self) -> None:
        if not self.world.is_main:  # the weights are the same on every rank: rank 0 evaluates and records
            return
        student, precision = self.run.models.student, self.run.compute.precision
        with self.phase("eval"):
            student.eval()
            ce_sum, targets = torch.zeros((), device=self.run.compute.device), 0
            for batch in self.run.data.eval_set:
                batch = self._on_device(batch)
                with precision.forward_context():
                    ce_sum = ce_sum + self.run.objective.eval_ce_sum(student, batch)
                targets += batch["n_targets"]
            student.train()
            eval_loss = (ce_sum / max(targets, 1)).item()
        ppl = perplexity(eval_loss)
        row = {"step": self.step, "split": "eval", "eval_loss": eval_loss, "eval_ppl": ppl, "eval_tokens": targets}
        self.logs.metrics.write_line(json.dumps(row))
        self.display.eval_line(self.step, ppl, eval_loss)
        self.last_eval = (self.step, ppl)
        release_free_host_memory()

    # ------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, rewind: bool = False) -> None:
        """A checkpoint of this step or, after a failure mid-step, of the one before it (`rewind`), when there is
        one to write (`_checkpointable`)."""
        step, run_dir = self.step - 1 if rewind else self.step, self.run.run_dir
        if not self._checkpointable(step):
            return
        event_sizes = self.world.gather((run_dir / self.logs.events_name).stat().st_size)
        trained = self.run.state.state_dict()  # on every rank: a sharded teacher's routers are gathered whole
        if self.world.is_main:  # the weights are the same on every rank: rank 0 writes, every rank may read it
            state = {"step": step, **trained, "policy": self.policy.state_dict(),
                     "log_offsets": log_offsets(run_dir, event_sizes)}
            if rewind:
                state.update(data=self.step_start["data"], rng=ckpt.rng_state(self.step_start["rng"]))
            cfg = self.config
            eval_step, eval_ppl = self.last_eval
            ckpt.save(run_dir, step, state, cfg.save_total_limit, eval_ppl if eval_step == step else None,
                      meta={"mode": self.run.compute.mode, "options": cfg.to_dict()})
        self.world.barrier()

    def _checkpointable(self, step: int) -> bool:
        """Whether a checkpoint of `step` is written: not of step 0 (nothing trained yet) nor of non-finite weights
        (nothing to resume)."""
        return step > 0 and self.policy.weights_finite

    def _load_state(self, state: dict) -> None:
        """Put a checkpoint back: weights, optimizer, loss scaler, scheduler, data position, RNG, step, policy."""
        self.run.state.load_state_dict(state)
        self.step = int(state["step"])
        if state["meta"].get("eval_ppl") is not None:  # evaluated at that step: the end of a run is not evaluated twice
            self.last_eval = (self.step, state["meta"]["eval_ppl"])
        self.policy.load_state_dict(state["policy"])

    def _restore_before(self, step: int) -> tuple[Path, int] | None:
        """A rollback: the newest checkpoint before `step` that loads, put back; its path and step, or None."""
        path, state, problems = ckpt.load_newest(self.run.run_dir, before_step=step)
        record_fallbacks(self.logs.events, problems, path, self.step)
        if state is None:
            return None
        self._load_state(state)
        return path, self.step


def release_free_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it, and a long run's resident set creeps up ~20%
    over a thousand steps with nothing leaked); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@with_config_options
def distill(config: DistillConfig | None = None, *, quiet: bool = False, display: TrainingDisplay | None = None,
            **options) -> RunResult:
    """Distil a teacher into a student (the embedded default without arguments); returns the run's result.

    `distill(student_model="gpt2", precision="mixed", train_steps=100)`, or a DistillConfig — with options, a copy of it
    with those changed (they were ignored: `distill(config, train_steps=2)` trained config's steps). `quiet`: no
    console output (the run directory is written as always).
    """
    refuse_unknown_options(options, "distill()")
    config = (replace(config, **options) if config is not None else DistillConfig(**options)).validate()
    display = display or TrainingDisplay(quiet=quiet, log_every=config.log_every, wording=worded_for_distill(config))
    return Trainer(config, display).train()
