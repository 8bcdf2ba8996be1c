"""The training loop: setup, one optimizer step, evaluation, checkpoints, closing.

Read it top to bottom: `Trainer.__init__` builds everything from the config (models + data →
precision.convert → optimizer, and the checkpoint to resume from), `train` runs the steps, `_step` is one
optimizer step in nanoGPT's order (forward → scaled backward → unscale → clip → step → update). Probes
watch through hooks and never steer; the loop's own guard checks after every step that the weights are
finite, and `--on-nonfinite` (policy.py) decides what a non-finite step does. Where a run goes on from a
checkpoint and what one holds is resume.py's; what an out-of-memory failure says, out_of_memory.py's.

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

import ctypes
import json
import math
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import DistillConfig
from ..errors import BadInput
from ..events import EventLog, JsonlLog, NullLog, events_file_name
from ..numerics import dtype_name
from ..precision import detect_capabilities, make_precision, resolve_mode
from ..probes import ProbeSet
from ..probes.base import abs_max, to_host
from ..rundir import finalize_run, write_json_atomic
from ..ui import TrainingDisplay
from . import checkpoint as ckpt
from . import distributed as dist
from .data import BatchStream, eval_batches, load_corpus, split_validation, tokenize_blocks
from .losses import ce_loss_sum
from .models import ensure_pad_token, load_causal_lm, load_tokenizer, max_positions, same_vocabulary
from .objective import HiddenStateKD, LogitKD
from .out_of_memory import is_out_of_memory, out_of_memory_message
from .policy import NonFinitePolicy
from .resume import Resumed, TrainingState, locate_run, log_offsets, resume_run
from .router import RouterInfo, RouterTerms, find_routers, save_router_update
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
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _versions() -> dict:
    import transformers

    return {"sarkd_diag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": ".".join(map(str, __import__("sys").version_info[:3]))}


class Trainer:
    """One distillation run, built from a validated config; `train()` runs it and closes the run directory."""

    def __init__(self, config: DistillConfig, display: TrainingDisplay | None = None):
        self.config = cfg = config
        self.display = display or TrainingDisplay(log_every=cfg.log_every)
        self.world, self.device = dist.init(resolve_device(cfg.device))  # under torchrun: joins the ranks
        if not self.world.is_main:
            self.display = TrainingDisplay(quiet=True)  # one progress display: rank 0's
        if self.world.distributed:
            if cfg.nproc > 1 and cfg.nproc != self.world.size:
                raise BadInput(f"--nproc {cfg.nproc}, but torchrun started {self.world.size} processes")
            cfg.nproc = self.world.size  # recorded, so a resume with another number of ranks is refused
        elif cfg.nproc > 1:
            raise BadInput(f"--nproc {cfg.nproc} runs under torchrun: `sarkd-diag train --nproc {cfg.nproc}` "
                           f"launches it, or `torchrun --nproc_per_node {cfg.nproc} -m sarkd_diag train ...`")
        self.capabilities = detect_capabilities(self.device)
        self.mode, self.mode_reason = resolve_mode(cfg.precision, cfg.model_dtype, self.capabilities)
        self.precision = make_precision(self.mode, self.device)
        self.run_dir, resume_source = locate_run(cfg, self.world, self.mode)
        self.notes: list[dict] = []  # setup events, recorded once the event log exists
        corpus = load_corpus(cfg.dataset_name, cfg.dataset_config_name, cfg.train_file, cfg.validation_file)

        # models and tokenizers: loaded in the dtype the mode holds them in, then converted by the mode
        self.student_tokenizer = load_tokenizer(cfg.student_model, cfg.trust_remote_code)
        self.teacher_tokenizer = load_tokenizer(cfg.teacher_model, cfg.trust_remote_code)
        for tok, name in ((self.student_tokenizer, cfg.student_model), (self.teacher_tokenizer, cfg.teacher_model)):
            note = ensure_pad_token(tok, name)
            if note:
                self.notes.append({"kind": "setup_note", "message": note})
        seed_everything(cfg.seed)
        self.student = load_causal_lm(cfg.student_model, cfg.trust_remote_code, self.precision.trainable_dtype)
        self.teacher = load_causal_lm(cfg.teacher_model, cfg.trust_remote_code, self.precision.frozen_dtype)
        self.dual = not same_vocabulary(self.teacher_tokenizer, self.student_tokenizer, self.teacher, self.student)
        for model, name in ((self.student, cfg.student_model), (self.teacher, cfg.teacher_model)):
            limit = max_positions(model)
            if limit is not None and cfg.block_size > limit and (model is self.student or not self.dual):
                raise BadInput(f"--block-size {cfg.block_size} exceeds {name}'s {limit} positions")
        if self.dual:
            for tok, name in ((self.student_tokenizer, cfg.student_model), (self.teacher_tokenizer, cfg.teacher_model)):
                if not getattr(tok, "is_fast", False):
                    raise BadInput(f"dual-tokenizer mode needs character offsets, but the tokenizer of {name} is a "
                                   "slow (Python) tokenizer without offset mappings")
        self.teacher.requires_grad_(False).eval()
        self.routers = self._find_routers()
        self.student.train()
        if cfg.gradient_checkpointing:  # transformers 5 renamed it activation checkpointing
            getattr(self.student, "activation_checkpointing_enable", self.student.gradient_checkpointing_enable)()
        self.precision.convert(self.student.to(self.device))
        self.teacher.to(self._teacher_home())
        self.precision.convert(self.teacher)

        # data (the files were read first, so a bad file fails before a large model loads)
        train_blocks = tokenize_blocks(corpus.train, self.student_tokenizer, cfg.block_size, keep_text=self.dual)
        if corpus.validation is None:
            train_blocks, val_blocks = split_validation(train_blocks, cfg.seed)
            self.validation_source = f"held out {len(val_blocks)} of {len(train_blocks) + len(val_blocks)} blocks"
        else:
            val_blocks = tokenize_blocks(corpus.validation, self.student_tokenizer, cfg.block_size,
                                         keep_text=self.dual, what="validation data")
            self.validation_source = "given"
        self.corpus_source = corpus.source
        self.batches = BatchStream(train_blocks, cfg.per_device_batch_size, cfg.seed, self.world.size,
                                   self.world.shard)
        self.eval_set = eval_batches(val_blocks, cfg.per_device_batch_size, cfg.eval_max_batches)
        self.data_sizes = {"train_blocks": len(train_blocks), "validation_blocks": len(val_blocks)}

        # objective and optimizer: the student (and a dual-mode projection) at --student-lr, routers at --router-lr
        self.router_terms = None
        if self.routers:
            self.router_terms = RouterTerms(self.teacher, self.routers, cfg.router_anchor_weight,
                                            cfg.router_load_balance_weight, cfg.router_entropy_weight)
        trained = self.world.wrap(self.student, self.device)  # DDP under torchrun
        if self.dual:
            self.objective = HiddenStateKD(self.teacher, trained, self.teacher_tokenizer,
                                           student_hidden_size=self.student.config.hidden_size,
                                           teacher_max_tokens=max_positions(self.teacher), device=self.device)
        else:
            self.objective = LogitKD(self.teacher, trained, kind=cfg.kd_loss, temperature=cfg.temperature,
                                     jsd_beta=cfg.jsd_beta, router_terms=self.router_terms)
        groups = [{"params": list(self.student.parameters()) + self.objective.extra_parameters(),
                   "lr": cfg.student_lr, "name": "student"}]
        router_params = [p for p in self.teacher.parameters() if p.requires_grad]
        if router_params:
            groups.append({"params": router_params, "lr": cfg.router_lr, "weight_decay": 0.0, "name": "router"})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.student_lr, weight_decay=cfg.weight_decay,
                                           eps=cfg.adam_eps)
        self.scheduler = self._make_scheduler()
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.events_name = events_file_name(self.world.rank, self.world.size)
        self.outside_ddp = self.objective.extra_parameters() + router_params  # their gradients: average_gradients
        self.step, self.phase, self.step_start, self.last_eval = 0, "setup", {}, (None, None)
        self.training_state = TrainingState(self.student, self.teacher, self.objective.projection, self.optimizer,
                                            self.precision, self.scheduler, self.batches)
        self.policy = NonFinitePolicy(cfg.on_nonfinite, self.optimizer, self.scheduler,
                                      max_rollbacks=cfg.max_rollbacks, save_steps=cfg.save_steps,
                                      loss_scaling=self.precision.loss_scaling,
                                      named_trainable=self.training_state.named_trainable(), world=self.world,
                                      restore=self._restore_before)
        self.out_of_memory: str | None = None
        self.internal_error = False
        self.notes += self.policy.setup_notes(self.device.type)
        self.resumed: Resumed | None = None
        if resume_source is not None:
            self.resumed = resume_run(cfg, self.run_dir, resume_source, self.mode, self._load_state)

    def _find_routers(self) -> list[RouterInfo]:
        """The teacher's routers, made trainable (SAR); none in dual mode, where the teacher is a fixed target."""
        cfg = self.config
        try:
            routers = find_routers(self.teacher, cfg.router_patterns)
        except ValueError as exc:
            raise BadInput(f"--router-patterns: {exc}") from None
        if cfg.router_patterns and not routers:
            raise BadInput(f"--router-patterns {' '.join(cfg.router_patterns)} match no router of "
                           f"{cfg.teacher_model}")
        if self.dual:
            self.notes.append({"kind": "dual_tokenizer", "message": f"teacher {cfg.teacher_model} and student "
                               f"{cfg.student_model} tokenize differently: the student matches the teacher's last "
                               "hidden states, aligned by character spans"})
            if routers:
                self.notes.append({"kind": "router_frozen_dual", "model": "teacher",
                                   "message": f"{len(routers)} router(s) stay frozen in dual-tokenizer mode: the "
                                   "teacher's hidden states are a fixed target"})
            return []
        if not routers:
            self.notes.append({"kind": "no_router", "severity": "warning", "model": "teacher",
                               "message": f"teacher {cfg.teacher_model} has no MoE router: plain KD"})
        names = dict(self.teacher.named_parameters())
        for router in routers:
            for name in router.param_names:
                names[name].requires_grad_(True)
            self.notes.append({"kind": "router_found", "model": "teacher", "module": router.name,
                               "tensor": ",".join(router.param_names), "probe": "router",
                               "message": f"router {router.name}: {router.num_experts} experts, top-{router.top_k}; "
                               f"trains at --router-lr {cfg.router_lr}"})
        return routers

    def _teacher_home(self) -> torch.device:
        offload, clear = self.config.offload_teacher_to_cpu, self.config.clear_cache_every_step
        if self.device.type != "cuda":
            for flag, on in (("--offload-teacher-to-cpu", offload), ("--clear-cache-every-step", clear)):
                if on:
                    self.notes.append({"kind": "setup_note", "message": f"{flag} is a no-op on {self.device.type}"})
        return torch.device("cpu") if offload else self.device

    def _make_scheduler(self):
        if not self.config.use_scheduler:
            return None
        from transformers import get_scheduler

        return get_scheduler(self.config.scheduler_type, self.optimizer,
                             num_warmup_steps=self.config.warmup_steps, num_training_steps=self.config.train_steps)

    # ----------------------------------------------------------------------------------------- run
    def train(self) -> RunResult:
        """Run the steps and close the run directory; the exit code is docs/run-directory.md's (Exit codes)."""
        self._open_run_dir()
        status = "failed"
        self.probes = ProbeSet.for_trainer(self)
        with StopRequests() as stops:
            try:
                status = self._run(stops)
            except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step; the newest checkpoint is kept as it was
                self.events.record("interrupted", "warning", f"stopped during step {self.step}; nothing saved since "
                                   "the newest checkpoint", step=self.step, phase="policy")
                status = "interrupted"
            except Exception as exc:
                status = self._failed(exc)
            finally:
                self.display.stop()
                self.probes.close()
        if self.out_of_memory is not None:  # handled out here, where the failed step's tensors are freed
            self._handle_out_of_memory(self.out_of_memory)
        try:
            return self._close(status, stops)
        finally:
            self.objective.close()  # router hooks off; DDP's wrapper goes before its process group
            dist.teardown(self.world)

    def _run(self, stops: StopRequests) -> str:
        """The steps, with evaluations and checkpoints on schedule; returns the run's status."""
        cfg = self.config
        self.display.start(cfg.train_steps, self.step, self.run_dir)
        if self.step == 0:
            self._evaluate()
        while self.step < cfg.train_steps:
            if self._stop_requested(stops):
                self.events.record("interrupted", "warning", f"{stops.signal.name}: stopped after step {self.step}; "
                                   "state saved", step=self.step, phase="policy")
                self._save_checkpoint()
                return "interrupted"
            row = self._step()
            action = self.policy.decide(self.step, row, self.events)
            self.metrics.write_line(json.dumps(row))
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
        self._evaluate()
        self._save_checkpoint()
        return "completed"

    def _stop_requested(self, stops: StopRequests) -> bool:
        """A stop signal, acted on by all ranks after the same step (each rank receives it at its own moment)."""
        return self.world.any_host_flag(stops.signal is not None)

    def _close(self, status: str, stops: StopRequests) -> RunResult:
        self.events.close()
        self.metrics.close()
        self.world.barrier()  # every rank's events are on disk before rank 0 merges them
        if not self.world.is_main:
            return self._result_of_main(status, stops)
        try:
            if status in ("completed", "interrupted"):
                self.student.save_pretrained(self.run_dir / "student")
                self.student_tokenizer.save_pretrained(self.run_dir / "student")
                if self.routers:
                    save_router_update(self.teacher, self.routers, self.run_dir / "router_update.pt")
            summary = finalize_run(self.run_dir, status)
        except Exception as exc:
            self._save_traceback(exc)
            self.world.broadcast(3)
            return RunResult(self.run_dir, status, {}, 3)
        self.display.summary(summary)
        critical = any(d["severity"] == "critical" for d in summary["diagnosis"])
        failed = 3 if self.internal_error else 1
        exit_code = {"completed": 1 if critical else 0, "stopped": 1, "failed": failed}.get(status, stops.exit_code)
        self.world.broadcast(exit_code)
        return RunResult(self.run_dir, status, summary, exit_code)

    def _result_of_main(self, status: str, stops: StopRequests) -> RunResult:
        """A rank other than 0 ends with rank 0's exit code (rank 0 writes the summary for all)."""
        exit_code = self.world.broadcast(None)
        if exit_code is None:  # this rank failed on its own
            exit_code = {"failed": 3 if self.internal_error else 1}.get(status, stops.exit_code)
        return RunResult(self.run_dir, status, {}, exit_code)

    def _failed(self, exc: Exception) -> str:
        """An exception out of the run: out of memory (exit 1, handled by the caller) or an internal error (exit 3).

        Under torchrun it may be this rank's alone: from here on it closes without collectives."""
        self.world = self.world.on_its_own()
        if is_out_of_memory(exc):
            text = str(exc).strip()
            self.out_of_memory = text.splitlines()[0] if text else type(exc).__name__
        else:
            self._save_traceback(exc)
        return "failed"

    def _save_traceback(self, exc: Exception) -> None:
        self.internal_error = True
        path = self.run_dir / ("traceback.txt" if self.world.size == 1 else f"traceback.rank{self.world.rank}.txt")
        path.write_text(traceback.format_exc())
        self.display.error(f"internal error: {type(exc).__name__}: {exc} (traceback in {path})")

    def _handle_out_of_memory(self, error: str) -> None:
        """Record the run's memory breakdown, keep the last good step in a checkpoint, say what to change."""
        phase, step = self.phase, self.step
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rewind = phase in ("forward", "backward")  # the step had not touched weights or optimizer state yet
        keep = step - 1 if rewind else step
        savable = phase in ("forward", "backward", "eval") and keep > 0 and self.policy.weights_finite
        message = out_of_memory_message(self.config, self.mode, self.teacher, self.student, self.device,
                                        error=error, phase=phase, step=step, saved=keep if savable else None)
        self.events.record("out_of_memory", "critical", message, step=step, phase=phase, probe="loop")
        if savable:
            self._save_checkpoint(rewind=rewind)
        self.display.error(message)

    # ------------------------------------------------------------------------------------ one step
    def _step(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        self.phase = "forward"
        self.step_start = {"data": self.batches.state_dict(), "rng": ckpt.capture_rng()}  # to rewind a failed step
        self.step += 1
        self.probes.begin_step(self.step)
        micro = [self.batches.next() for _ in range(cfg.grad_accum_steps)]
        total_targets = sum(b["global_targets"] for b in micro)  # of all ranks: every rank knows it
        denominator = max(total_targets, 1)
        ranks = self.world.size  # DDP averages gradients over ranks: each rank's share of the loss is scaled back up
        kd_sum = ce_sum = router_sum = torch.zeros((), device=self.device)
        router_readings: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            self.phase = "forward"
            batch = self._on_device(batch)
            with dist.gradient_sync(self.objective.student, sync=i == len(micro) - 1):
                with self.precision.forward_context():
                    parts = self.objective(batch)
                loss = (cfg.alpha_kd * parts.kd_sum + cfg.alpha_ce * parts.ce_sum) * ranks / denominator
                if parts.router_loss is not None:
                    loss = loss + parts.router_loss / cfg.grad_accum_steps
                    router_sum = router_sum + parts.router_loss.detach() / cfg.grad_accum_steps
                self.probes.observe_terms({"kd": parts.kd_sum, "ce": parts.ce_sum, "router": parts.router_loss},
                                          parts.targets)
                self.phase = "backward"
                self.precision.backward(loss)
            router_readings = parts.readings
            kd_sum, ce_sum = kd_sum + parts.kd_sum.detach(), ce_sum + parts.ce_sum.detach()
        self.phase = "optimizer"
        self.world.average_gradients(self.outside_ddp)
        self.precision.unscale_gradients(self.optimizer)
        self.world.agree_on_overflow(self.precision.loss_scaler, self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if self.policy.runs_step(self.step, grad_norm, self.events):
            skipped = self.precision.optimizer_step(self.optimizer)
        else:
            skipped = torch.ones((), device=self.device)  # --on-nonfinite skip: non-finite gradients, not run
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        weights_amax = abs_max(self.trainable)  # the guard's per-tensor reading
        weights_finite = weights_amax.isfinite().all()
        # global figures and one decision for all ranks: a single all-reduce (none in one process)
        kd, ce, router_sum, weights_bad = self.world.all_sum(
            kd_sum / denominator, ce_sum / denominator, router_sum / ranks, (~weights_finite).float())
        weights_finite = weights_bad == 0
        device_values = {
            "loss": cfg.alpha_kd * kd + cfg.alpha_ce * ce + router_sum, "kd_loss": kd, "ce_loss": ce,
            "router_loss": router_sum, "grad_norm": grad_norm, "skipped": skipped,
            "weights_finite": weights_finite, **router_readings,
        }
        scale = self.precision.loss_scale()
        if scale is not None:
            device_values["loss_scale"] = scale
        readings = {**self.probes.take_readings(), "param_amax": weights_amax}  # the parameter probe: the guard's
        host, probe_values = to_host(device_values, readings)  # the step's one host sync
        elapsed = time.perf_counter() - started
        tokens = cfg.per_device_batch_size * cfg.block_size * cfg.grad_accum_steps * ranks  # all ranks' tokens
        row = {"step": self.step, "split": "train", **host, "lr": lr, "tokens": tokens,
               "tokens_per_s": tokens / elapsed, "targets": total_targets,
               "peak_memory_mb": peak_memory_mb(self.device),
               "weights_finite": bool(host["weights_finite"]), "skipped": int(host["skipped"])}
        row.setdefault("loss_scale", None)
        if total_targets == 0:
            for key in ("loss", "kd_loss", "ce_loss"):
                row[key] = math.nan  # 0/0: no target tokens; recorded as such, never as 0
        row.update(self.probes.record(probe_values))
        if self.probes.needs_replay and row["weights_finite"]:
            self._replay_forward(micro[0])
        if self.device.type == "cuda" and cfg.clear_cache_every_step:
            torch.cuda.empty_cache()
        return row

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _replay_forward(self, batch: dict) -> None:
        """A loss turned non-finite on a step without per-module statistics: rerun its first forward — same
        weights (the scaler skipped the step), same RNG — with statistics on, to name the module where it
        began. The failure path only; the RNG is put back, so the replay changes nothing that follows."""
        after = ckpt.capture_rng()
        ckpt.set_rng_state(ckpt.rng_state(self.step_start["rng"]))
        batch = self._on_device(batch)
        with self.precision.forward_context():
            self.probes.replay_forward(lambda: self.objective(batch))
        ckpt.set_rng_state(ckpt.rng_state(after))

    @torch.no_grad()
    def _evaluate(self) -> None:
        if not self.world.is_main:  # the weights are the same on every rank: rank 0 evaluates and records
            return
        self.phase = "eval"
        self.student.eval()
        ce_sum, targets = torch.zeros((), device=self.device), 0
        for batch in self.eval_set:
            batch = self._on_device(batch)
            with self.precision.forward_context():
                logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ce_sum = ce_sum + ce_loss_sum(logits, batch["labels"])
            targets += batch["n_targets"]
        self.student.train()
        eval_loss = (ce_sum / max(targets, 1)).item()
        ppl = math.exp(eval_loss) if eval_loss < 700 else math.inf
        row = {"step": self.step, "split": "eval", "eval_loss": eval_loss, "eval_ppl": ppl, "eval_tokens": targets}
        self.metrics.write_line(json.dumps(row))
        self.display.eval_line(self.step, ppl, eval_loss)
        self.last_eval = (self.step, ppl)
        release_free_host_memory()

    # ------------------------------------------------------------------------ records and state
    def _write_config(self) -> None:
        cfg = self.config
        param_dtypes = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            counts: dict[str, dict[str, int]] = {}
            for p in model.parameters():
                role = "trainable" if p.requires_grad else "frozen"
                key = dtype_name(p.dtype)
                counts.setdefault(role, {}).setdefault(key, 0)
                counts[role][key] += p.numel()
            param_dtypes[name] = counts
        extra = [p for p in self.objective.extra_parameters()]
        if extra:
            param_dtypes["projection"] = {"trainable": {dtype_name(extra[0].dtype): sum(
                p.numel() for p in extra)}}
        trainable_dtypes = {dtype_name(p.dtype) for p in self.trainable}
        config = {
            "options": cfg.to_dict(),
            "precision": {
                "mode": self.mode, "requested": cfg.precision, "model_dtype": cfg.model_dtype,
                "reason": self.mode_reason,
                "master_dtype": dtype_name(self.precision.master_dtype),
                "trainable_dtypes": sorted(trainable_dtypes),
                "compute_dtype": dtype_name(self.precision.autocast_dtype or self.precision.trainable_dtype),
                "loss_scaling": self.precision.loss_scaling,
                "param_dtypes": param_dtypes,
            },
            "distributed": {"ranks": self.world.size, "backend": self.world.backend},
            "device": {"type": self.device.type, "name": self.capabilities.name,
                       "native_bf16": self.capabilities.native_bf16, "threads": torch.get_num_threads()},
            "data": {"source": self.corpus_source, "validation": self.validation_source, **self.data_sizes,
                     "block_size": cfg.block_size},
            "objective": {"kind": "hidden-state-kd (dual tokenizer)" if self.dual else "logit-kd",
                          "kd_loss": "mse of projected hidden states" if self.dual else cfg.kd_loss},
            "routers": [{"module": r.name, "parameters": list(r.param_names), "num_experts": r.num_experts,
                         "top_k": r.top_k} for r in self.routers],
            "versions": _versions(),
        }
        write_json_atomic(self.run_dir / "config.json", config)

    def _record_setup(self) -> None:
        master = dtype_name(self.precision.master_dtype)
        self.events.record("precision_setup", "info",
                           f"precision {self.mode} ({self.mode_reason}); trainable weights held in {master}",
                           probe="precision", dtype=master)
        for note in self.notes:
            self.events.record(**note)

    # ---------------------------------------------------------------------------- run directory
    def _open_run_dir(self) -> None:
        """Create (or continue) the run directory and open its logs, appended and flushed per record.

        Under torchrun rank 0 prepares the directory and writes config.json and metrics.jsonl; every rank
        appends its own events.rank{N}.jsonl.
        """
        world = self.world
        world.barrier()  # every rank has checked the directory (and loaded its checkpoint) before it changes
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed is None and self.config.overwrite:
                ckpt.clear_run_files(self.run_dir)
        world.barrier()  # ... and no rank opens its log before the previous run's are gone
        if self.resumed is not None:
            self.resumed.continue_logs(self.run_dir, self.events_name, world.is_main)
        if world.is_main:
            self._write_config()
        self.events = EventLog(self.run_dir / self.events_name, rank=world.rank)
        self.events.on_event(self.display.alert)
        self.metrics = JsonlLog(self.run_dir / "metrics.jsonl") if world.is_main else NullLog()
        if self.resumed is None:
            self._record_setup()
            return
        r = self.resumed
        self._record_fallbacks(r.fallbacks, r.checkpoint)
        self.events.record("setup_note", "info", f"resumed from {r.checkpoint} at step {r.step} of "
                           f"{self.config.train_steps}", step=r.step)

    def _record_fallbacks(self, problems: list[str], used: Path | None) -> None:
        instead = f"using {used.name} instead" if used is not None else "no older checkpoint loads"
        for problem in problems:
            self.events.record("checkpoint_fallback", "warning", f"{problem}; {instead}", step=self.step,
                               phase="setup")

    # ------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, rewind: bool = False) -> None:
        """A checkpoint of this step or, after a failure mid-step, of the one before it (`rewind`).

        None is written of step 0 (nothing trained yet) or of non-finite weights (nothing to resume).
        """
        step = self.step - 1 if rewind else self.step
        if step == 0 or not self.policy.weights_finite:
            return
        event_sizes = self.world.gather((self.run_dir / self.events_name).stat().st_size)
        if self.world.is_main:  # the weights are the same on every rank: rank 0 writes, every rank may read it
            state = {"step": step, **self.training_state.state_dict(), "policy": self.policy.state_dict(),
                     "log_offsets": log_offsets(self.run_dir, event_sizes)}
            if rewind:
                state.update(data=self.step_start["data"], rng=ckpt.rng_state(self.step_start["rng"]))
            cfg = self.config
            eval_step, eval_ppl = self.last_eval
            ckpt.save(self.run_dir, step, state, cfg.save_total_limit, eval_ppl if eval_step == step else None,
                      meta={"mode": self.mode, "options": cfg.to_dict()})
        self.world.barrier()

    def _load_state(self, state: dict) -> None:
        """Put a checkpoint back: weights, optimizer, loss scaler, scheduler, data position, RNG, step, policy."""
        self.training_state.load_state_dict(state)
        self.step = int(state["step"])
        self.policy.load_state_dict(state["policy"])

    def _restore_before(self, step: int) -> tuple[Path, int] | None:
        """A rollback: the newest checkpoint before `step` that loads, put back; its path and step, or None."""
        path, state, problems = ckpt.load_newest(self.run_dir, before_step=step)
        self._record_fallbacks(problems, path)
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


def distill(config: DistillConfig | None = None, *, display: TrainingDisplay | None = None,
            **options) -> RunResult:
    """Distil a teacher into a student (the embedded default without arguments); returns the run's result.

    Options are DistillConfig's fields: `distill(student_model="gpt2", precision="mixed", train_steps=100)`.
    """
    config = (config or DistillConfig(**options)).validate()
    return Trainer(config, display).train()
