"""The training loop: setup, one optimizer step, evaluation, checkpoints, and closing the run.

Read it top to bottom: `Trainer.__init__` builds everything from the config (models + data →
precision.convert → optimizer), `train` runs the steps, `_step` is one optimizer step in nanoGPT's
order (forward → scaled backward → unscale → clip → step → update). Probes watch through hooks and
never steer; the loop's own guard checks after every step that the weights are finite.
"""

from __future__ import annotations

import json
import math
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import DistillConfig
from ..errors import BadInput
from ..events import EventLog, JsonlLog
from ..precision import detect_capabilities, make_precision, resolve_mode
from ..probes import Probes
from ..rundir import check_output_dir, default_run_dir, finalize_run, write_json_atomic
from ..ui import TrainingDisplay
from . import checkpoint as ckpt
from .data import BatchStream, eval_batches, load_corpus, split_validation, tokenize_blocks
from .losses import ce_loss_sum
from .models import ensure_pad_token, load_causal_lm, load_tokenizer, max_positions, same_vocabulary
from .objective import HiddenStateKD, LogitKD
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
        self.display = display or TrainingDisplay()
        self.device = resolve_device(cfg.device)
        self.capabilities = detect_capabilities(self.device)
        self.mode, self.mode_reason = resolve_mode(cfg.precision, cfg.model_dtype, self.capabilities)
        self.precision = make_precision(self.mode, self.device)
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(self.mode)
        check_output_dir(self.run_dir, cfg.to_dict(), cfg.overwrite, cfg.resume or bool(cfg.resume_from))
        self.notes: list[dict] = []  # setup events, recorded once the event log exists

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
        if cfg.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        self.precision.convert(self.student.to(self.device))
        self.teacher.to(self._teacher_home())
        self.precision.convert(self.teacher)

        # data
        corpus = load_corpus(cfg.dataset_name, cfg.dataset_config_name, cfg.train_file, cfg.validation_file)
        train_blocks = tokenize_blocks(corpus.train, self.student_tokenizer, cfg.block_size, keep_text=self.dual)
        if corpus.validation is None:
            train_blocks, val_blocks = split_validation(train_blocks, cfg.seed)
            self.validation_source = f"held out {len(val_blocks)} of {len(train_blocks) + len(val_blocks)} blocks"
        else:
            val_blocks = tokenize_blocks(corpus.validation, self.student_tokenizer, cfg.block_size,
                                         keep_text=self.dual, what="validation data")
            self.validation_source = "given"
        self.corpus_source = corpus.source
        self.batches = BatchStream(train_blocks, cfg.per_device_batch_size, cfg.seed)
        self.eval_set = eval_batches(val_blocks, cfg.per_device_batch_size, cfg.eval_max_batches)
        self.data_sizes = {"train_blocks": len(train_blocks), "validation_blocks": len(val_blocks)}

        # objective and optimizer: the student (and a dual-mode projection) at --student-lr, routers at --router-lr
        self.router_terms = None
        if self.routers:
            self.router_terms = RouterTerms(self.teacher, self.routers, cfg.router_anchor_weight,
                                            cfg.router_load_balance_weight, cfg.router_entropy_weight)
        if self.dual:
            self.objective = HiddenStateKD(self.teacher, self.student, self.teacher_tokenizer,
                                           teacher_max_tokens=max_positions(self.teacher), device=self.device)
        else:
            self.objective = LogitKD(self.teacher, self.student, kind=cfg.kd_loss, temperature=cfg.temperature,
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
        self.step = 0

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
        cfg = self.config
        resuming = cfg.resume or bool(cfg.resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not resuming:
            ckpt.clear_run_files(self.run_dir)
        self._write_config()
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.events.on_event(self.display.alert)
        self.metrics = JsonlLog(self.run_dir / "metrics.jsonl")
        if resuming:
            self._resume()
        else:
            self._record_setup()
        status = "completed"
        with StopRequests() as stops, Probes.for_trainer(self) as self.probes:
            try:
                self.display.start(cfg.train_steps, self.step, self.run_dir)
                if self.step == 0:
                    self._evaluate()
                while self.step < cfg.train_steps:
                    row = self._step()
                    if not row["weights_finite"] and self._stops_on_nonfinite():
                        status = "stopped"
                        break
                    if self.step % cfg.eval_steps == 0 and self.step < cfg.train_steps:
                        self._evaluate()
                    if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.train_steps:
                        self._save_checkpoint()
                    if stops.signal is not None:
                        self.events.record("interrupted", "warning", f"{stops.signal.name}: state saved at step "
                                           f"{self.step}", step=self.step, phase="policy")
                        status = "interrupted"
                        break
                if status == "completed":
                    self._evaluate()
                if status != "stopped":
                    self._save_checkpoint()
            except KeyboardInterrupt:
                status = "interrupted"
            except Exception as exc:
                (self.run_dir / "traceback.txt").write_text(traceback.format_exc())
                self.display.error(f"internal error: {type(exc).__name__}: {exc} "
                                   f"(traceback in {self.run_dir / 'traceback.txt'})")
                status = "failed"
            finally:
                self.display.stop()
        return self._close(status, stops)

    def _close(self, status: str, stops: StopRequests) -> RunResult:
        self.events.close()
        self.metrics.close()
        if status in ("completed", "interrupted"):
            self.student.save_pretrained(self.run_dir / "student")
            self.student_tokenizer.save_pretrained(self.run_dir / "student")
            if self.routers:
                save_router_update(self.teacher, self.routers, self.run_dir / "router_update.pt")
        if self.router_terms is not None:
            self.router_terms.close()
        summary = finalize_run(self.run_dir, status)
        self.display.summary(summary)
        critical = any(d["severity"] == "critical" for d in summary["diagnosis"])
        exit_code = {"completed": 1 if critical else 0, "stopped": 1, "failed": 3}.get(status, stops.exit_code)
        return RunResult(self.run_dir, status, summary, exit_code)

    def _stops_on_nonfinite(self) -> bool:
        if self.config.on_nonfinite == "continue":
            return False
        self.events.record("policy_stop", "critical", f"non-finite weights after step {self.step}: stopping "
                           "(--on-nonfinite stop); see the diagnosis", step=self.step, phase="policy")
        return True

    # ------------------------------------------------------------------------------------ one step
    def _step(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        self.step += 1
        self.probes.begin_step(self.step)
        micro = [self.batches.next() for _ in range(cfg.grad_accum_steps)]
        total_targets = sum(b["n_targets"] for b in micro)
        denominator = max(total_targets, 1)
        kd_sum = ce_sum = router_sum = torch.zeros((), device=self.device)
        router_readings: dict[str, torch.Tensor] = {}
        for batch in micro:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.precision.forward_context():
                parts = self.objective(batch)
            loss = (cfg.alpha_kd * parts.kd_sum + cfg.alpha_ce * parts.ce_sum) / denominator
            if parts.router_loss is not None:
                loss = loss + parts.router_loss / cfg.grad_accum_steps
                router_sum = router_sum + parts.router_loss.detach() / cfg.grad_accum_steps
            self.probes.observe_loss(parts, loss)
            self.precision.backward(loss)
            router_readings = parts.readings
            kd_sum, ce_sum = kd_sum + parts.kd_sum.detach(), ce_sum + parts.ce_sum.detach()
        self.precision.unscale_gradients(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        skipped = self.precision.optimizer_step(self.optimizer)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        weights_finite = torch.stack(torch._foreach_norm(self.trainable, math.inf)).isfinite().all()
        kd, ce = kd_sum / denominator, ce_sum / denominator
        device_values = {
            "loss": cfg.alpha_kd * kd + cfg.alpha_ce * ce + router_sum, "kd_loss": kd, "ce_loss": ce,
            "router_loss": router_sum, "grad_norm": grad_norm, "skipped": skipped,
            "weights_finite": weights_finite, **router_readings,
        }
        scale = self.precision.loss_scale()
        if scale is not None:
            device_values["loss_scale"] = scale
        host, probe_values = _to_host(device_values, self.probes.readings())  # the step's one host sync
        elapsed = time.perf_counter() - started
        tokens = cfg.per_device_batch_size * cfg.block_size * cfg.grad_accum_steps
        row = {"step": self.step, "split": "train", **host, "lr": lr, "tokens": tokens,
               "tokens_per_s": tokens / elapsed, "targets": total_targets,
               "peak_memory_mb": peak_memory_mb(self.device),
               "weights_finite": bool(host["weights_finite"]), "skipped": int(host["skipped"])}
        row.setdefault("loss_scale", None)
        if total_targets == 0:
            for key in ("loss", "kd_loss", "ce_loss"):
                row[key] = math.nan  # 0/0: no target tokens; recorded as such, never as 0
        row.update(self.probes.after_step(self.step, probe_values, row))
        self.metrics.write_line(json.dumps(row))
        self.display.update(self.step, row)
        if self.device.type == "cuda" and cfg.clear_cache_every_step:
            torch.cuda.empty_cache()
        return row

    @torch.no_grad()
    def _evaluate(self) -> None:
        self.student.eval()
        ce_sum, targets = torch.zeros((), device=self.device), 0
        for batch in self.eval_set:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
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
        self.last_eval_ppl = ppl

    # ------------------------------------------------------------------------ records and state
    def _write_config(self) -> None:
        cfg = self.config
        param_dtypes = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            counts: dict[str, dict[str, int]] = {}
            for p in model.parameters():
                role = "trainable" if p.requires_grad else "frozen"
                key = str(p.dtype).removeprefix("torch.")
                counts.setdefault(role, {}).setdefault(key, 0)
                counts[role][key] += p.numel()
            param_dtypes[name] = counts
        extra = [p for p in self.objective.extra_parameters()]
        if extra:
            param_dtypes["projection"] = {"trainable": {str(extra[0].dtype).removeprefix("torch."): sum(
                p.numel() for p in extra)}}
        trainable_dtypes = {str(p.dtype).removeprefix("torch.") for p in self.trainable}
        config = {
            "options": cfg.to_dict(),
            "precision": {
                "mode": self.mode, "requested": cfg.precision, "model_dtype": cfg.model_dtype,
                "reason": self.mode_reason,
                "master_dtype": str(self.precision.master_dtype).removeprefix("torch."),
                "trainable_dtypes": sorted(trainable_dtypes),
                "compute_dtype": str(self.precision.autocast_dtype or self.precision.trainable_dtype)
                .removeprefix("torch."),
                "loss_scaling": self.precision.loss_scaling,
                "param_dtypes": param_dtypes,
            },
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
        master = str(self.precision.master_dtype).removeprefix("torch.")
        self.events.record("precision_setup", "info",
                           f"precision {self.mode} ({self.mode_reason}); trainable weights held in {master}",
                           probe="precision", dtype=master)
        for note in self.notes:
            self.events.record(**note)

    def _save_checkpoint(self) -> None:
        ckpt.save(self.run_dir, self.step, self._state(), self.config.save_total_limit,
                  getattr(self, "last_eval_ppl", None))

    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "data": self.batches.state_dict(),
            "rng": ckpt.rng_state(),
            "log_offsets": {name: (self.run_dir / name).stat().st_size
                            for name in ("events.jsonl", "metrics.jsonl")},
        }

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Every weight a checkpoint must restore: the student, trained routers, a dual-mode projection."""
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"teacher.{n}": p for n, p in self.teacher.named_parameters() if p.requires_grad})
        state.update({f"projection.{n}": p for n, p in getattr(self.objective, "projection", nn.Identity())
                      .named_parameters()})
        return state

    def _resume(self) -> None:
        raise BadInput("--resume is not supported yet")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _to_host(*groups: dict[str, torch.Tensor]) -> list[dict[str, float | list[float]]]:
    """Every device reading of a step in one transfer: one host sync instead of one per value.

    0-dim readings come back as floats, 1-D ones (per-tensor vectors) as lists; one dict per group.
    """
    flat = [v.detach().reshape(-1).float() for group in groups for v in group.values()]
    values = torch.cat(flat).tolist() if flat else []
    out, i = [], 0
    for group in groups:
        host = {}
        for name, value in group.items():
            size = value.numel()
            host[name] = values[i] if value.dim() == 0 else values[i:i + size]
            i += size
        out.append(host)
    return out


def distill(config: DistillConfig | None = None, *, display: TrainingDisplay | None = None,
            **options) -> RunResult:
    """Distil a teacher into a student (the embedded default without arguments); returns the run's result.

    Options are DistillConfig's fields: `distill(student_model="gpt2", precision="mixed", train_steps=100)`.
    """
    config = (config or DistillConfig(**options)).validate()
    return Trainer(config, display).train()
