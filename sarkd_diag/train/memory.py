"""`estimate-memory`: device bytes per precision mode, before a run — what a 16 GB-card user wants to know.

Shapes come from the models' configs alone: the model is built on the meta device (parameters without
storage), so a 7B teacher is counted, not loaded. Weights, gradients, fp32 master copies and AdamW's two
moments are exact byte counts for the way each mode holds them (train/precision.py). Activations are an
estimate for one micro-batch (batch × block), with attention through SDPA (no seq² score matrix kept):

    per layer and token, in the compute dtype:  8·hidden + 3·intermediate·experts_per_token elements
    logits, fused (--fused-loss, the default): one chunk of rows at a time, whatever the batch — the
        student's logits of a chunk (fused_loss.widest_chunk rows, which become their own gradient), the
        teacher's of half of them, the fp32 buffers of one row group of the loss rows (fused_loss.group_rows
        rows × vocab × 5 × 4: the JSD's four and the CE gradient's), plus the student's last hidden states'
        gradient
    logits, unfused, per token:  vocab × (compute bytes + 4 + 4) for the student — the logits, their fp32
        log-softmax and its gradient — and vocab × compute bytes for the teacher
    dual-tokenizer mode, per token: the student's unfused logits, and the teacher's last hidden state (hidden ×
        compute bytes) instead of its logits, which are not computed

The student's activations are kept for backward (only layer inputs plus one layer with gradient
checkpointing); the teacher's are kept too when its routers train (SAR-KD backpropagates through the
teacher to them), else only what the loss reads of it (above). The CUDA context (~0.3–0.5 GB) and allocator
slack come on top.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..contract.config import DistillConfig
from ..contract.errors import BadInput
from ..contract.modes import MODE_NAMES, canonical_mode, parse_modes
from ..contract.wording import counted
from .fused_loss import TEACHER_PARTS, group_rows, unfusable_reason, widest_chunk
from .models import check_block_fits, load_tokenizer, max_positions, shared_vocabulary
from .precision import MODES

GIB = 2**30
PARTS = ("teacher_weights", "student_weights", "gradients", "master_weights", "optimizer_state", "activations")
PART_TITLES = {"teacher_weights": "teacher weights", "student_weights": "student weights",
               "gradients": "gradients", "master_weights": "fp32 masters", "optimizer_state": "optimizer state",
               "activations": "activations (est.)"}
SHORT_TITLES = ("teacher", "student", "grads", "masters", "optimizer", "activ.*", "total")


def _config_value(config, *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: parameter counts (tied weights once) and its dimensions."""

    name: str
    params: int
    router_params: int
    layers: int
    hidden: int
    intermediate: int
    experts_per_token: int
    vocab: int
    layer_params: int  # the largest decoder layer's: what a sharded teacher gathers at a time
    positions: int | None = None  # the longest sequence its position table holds (None: no table)
    unfused: str | None = None  # why its logits cannot be taken chunk by chunk (fused_loss.unfusable_reason)


def model_shape(model: nn.Module, name: str = "model", router_patterns: list[str] | None = None,
                unfused: str | None = None) -> ModelShape:
    """The shape of a model, loaded or on the meta device; router parameters as SAR-KD finds them."""
    from .distributed import decoder_layers
    from .router import find_routers

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model", default=0)
    routers = find_routers(model, router_patterns)
    shapes = dict(model.named_parameters())
    return ModelShape(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        router_params=sum(shapes[n].numel() for r in routers for n in r.param_names if n in shapes),
        layers=_config_value(config, "num_hidden_layers", "n_layer", "num_layers", default=0),
        hidden=hidden,
        intermediate=_config_value(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        experts_per_token=routers[0].top_k if routers else 1,
        vocab=_config_value(config, "vocab_size", default=0),
        layer_params=max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)), default=0),
        positions=max_positions(model),
        unfused=unfused,
    )


def shape_from_config(name: str, trust_remote_code: bool = False,
                      router_patterns: list[str] | None = None, option: str = "model") -> ModelShape:
    """A model's shape from its config alone: built on the meta device, no weights read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import model_load_error, resolve_model_source

    source = resolve_model_source(name, weights=False)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError (offline, not on the hub, no config.json), ValueError (unknown architecture)
        raise model_load_error(option, name, exc) from None
    return model_shape(model, name, router_patterns, _unfused_on_meta(model))


def _unfused_on_meta(model: nn.Module) -> str | None:
    """`fused_loss.unfusable_reason` of a model on the meta device, which follows tensors, not values: in bf16 (the
    experts' grouped matrix products on meta take no other dtype) and with no padding id (a forward warns of
    padding by reading ids, which meta tensors cannot). None where its forward cannot run there: counted fused."""
    model.config.pad_token_id = None
    try:
        return unfusable_reason(model.to(torch.bfloat16))
    except Exception:  # an architecture whose forward reads values (a data-dependent shape, .item())
        return None


@dataclass
class MemoryEstimate:
    """Device bytes of one mode, part by part; `host` holds what --offload-teacher-to-cpu keeps off the device."""

    mode: str
    teacher_weights: int
    student_weights: int
    gradients: int
    master_weights: int
    optimizer_state: int
    activations: int
    host: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in PARTS)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _activation_elements(shape: ModelShape, tokens: int, checkpointing: bool) -> int:
    per_layer = 8 * shape.hidden + 3 * shape.intermediate * shape.experts_per_token
    if checkpointing:  # layer inputs are kept; one layer's activations exist while it is recomputed
        return tokens * (shape.layers * shape.hidden + per_layer)
    return tokens * shape.layers * per_layer


def sharded_teacher_params(teacher: ModelShape, shards: int) -> tuple[int, int]:
    """A teacher sharded over `shards` ranks (--shard-teacher), in parameters per rank, its routers included (they
    are sharded with their layer): what a rank holds (1/N of the teacher, rounded up, and the output head whole)
    and the most it holds gathered at once (the rest of the root — embeddings, final norm —, gathered for the
    whole forward, and one decoder layer)."""
    head = teacher.vocab * teacher.hidden
    return (-(-(teacher.params - head) // shards) + head,
            teacher.params - teacher.layers * teacher.layer_params - head + teacher.layer_params)


def _logits_bytes(student: ModelShape, teacher: ModelShape, tokens: int, compute: int, teacher_compute: int,
                  fused: bool, dual: bool) -> int:
    """What the logits and the loss over them hold at their peak (the module docstring has the formulas)."""
    if dual:
        return tokens * student.vocab * (compute + 4 + 4) + tokens * teacher.hidden * teacher_compute
    if fused:
        rows = widest_chunk(tokens, student.vocab, compute)
        teacher_rows, group = -(-rows // TEACHER_PARTS), min(rows, group_rows(student.vocab))
        return (student.vocab * (rows * compute + teacher_rows * teacher_compute + group * 5 * 4)
                + tokens * student.hidden * compute)
    return tokens * student.vocab * (compute + 4 + 4) + tokens * teacher.vocab * teacher_compute


def estimate_mode(mode: str, teacher: ModelShape, student: ModelShape, batch: int, block: int, *,
                  gradient_checkpointing: bool = False, offload_teacher: bool = False, fused_loss: bool = True,
                  teacher_shards: int = 1, dual: bool = False) -> MemoryEstimate:
    """The breakdown of one precision mode for these shapes and one micro-batch of batch × block tokens, on one
    GPU; `teacher_shards` > 1: the teacher sharded over that many ranks (--shard-teacher); `dual`: two tokenizers,
    hidden-state KD (where `models.shared_vocabulary` finds no shared ids, as `train` decides it)."""
    strategy = MODES[canonical_mode(mode)]
    keep, frozen = strategy.trainable_dtype.itemsize, strategy.frozen_dtype.itemsize
    compute = (strategy.autocast_dtype or strategy.trainable_dtype).itemsize
    teacher_compute = (strategy.autocast_dtype or strategy.frozen_dtype).itemsize
    mixed = strategy.autocast_dtype is not None
    unfused = [shape for shape in (student, teacher) if shape.unfused]  # as train checks them: the student first
    fused = fused_loss and not dual and teacher.vocab == student.vocab and not unfused  # nor do heads of two sizes
    routers = 0 if dual else teacher.router_params
    projection = student.hidden * teacher.hidden + teacher.hidden if dual else 0
    trainable_student = student.params + projection
    tokens = batch * block
    # sharded (--shard-teacher), a rank holds 1/N of the routers, and so of their gradients, masters and moments
    routers_held = -(-routers // teacher_shards)
    trainable = trainable_student + routers_held

    # trainable weights are held in `keep`; under autocast their compute-dtype casts live until backward
    working = compute if mixed else keep
    teacher_frozen = (teacher.params - routers) * frozen
    estimate = MemoryEstimate(
        mode=strategy.name,
        teacher_weights=teacher_frozen + routers * working,
        student_weights=trainable_student * working,
        gradients=trainable * keep,
        master_weights=trainable * keep if mixed else 0,
        optimizer_state=2 * trainable * keep,  # AdamW's exp_avg and exp_avg_sq, in the weights' dtype
        activations=_activation_elements(student, tokens, gradient_checkpointing) * compute
        + (_activation_elements(teacher, tokens, False) * teacher_compute if routers else 0)
        + _logits_bytes(student, teacher, tokens, compute, teacher_compute, fused, dual),
    )
    if fused_loss and not dual and unfused:
        role = "student" if unfused[0] is student else "teacher"
        estimate.notes.append(f"--fused-loss: the {role} ({unfused[0].name}) does not fuse, {unfused[0].unfused}; "
                              "counted as train runs it, with every token's logits")
    if fused:
        rows = counted(widest_chunk(tokens, student.vocab, compute), "row")
        estimate.notes.append(f"--fused-loss: the logits exist {rows} at a time (--no-fused-loss: every token's "
                              "at once)")
    if offload_teacher:
        estimate.host, estimate.teacher_weights = teacher_frozen, estimate.teacher_weights - teacher_frozen
        estimate.notes.append("--offload-teacher-to-cpu: the teacher's frozen weights are on the host")
    if teacher_shards > 1:
        held, gathered = sharded_teacher_params(teacher, teacher_shards)
        layer_routers = routers // teacher.layers if teacher.layers else 0  # gathered with their layer
        if mixed:  # the held shards are the fp32 masters; autocast keeps each gathered router's cast until backward
            router_bytes = layer_routers * keep + routers * compute
        else:
            router_bytes = (routers_held + layer_routers) * keep
        estimate.teacher_weights = (held - routers_held + gathered - layer_routers) * frozen + router_bytes
        estimate.notes.append(f"--shard-teacher over {counted(teacher_shards, 'rank')}: teacher = "
                              f"1/{teacher_shards} of its weights, routers included + its output head (whole) + "
                              "its embeddings and one decoder layer, gathered during the forward")
    return estimate


@dataclass
class MemoryReport:
    """The estimate of every requested mode for one pair of models and one micro-batch."""

    teacher: ModelShape
    student: ModelShape
    batch: int
    block: int
    estimates: list[MemoryEstimate]
    ranks: int = 1  # --nproc: the figures are per GPU

    @property
    def notes(self) -> list[str]:
        notes = sorted({n for e in self.estimates for n in e.notes})
        return notes + ["activations are an estimate (see sarkd_diag/train/memory.py); the CUDA context "
                        "(~0.3-0.5 GiB) and allocator slack come on top"]

    def to_dict(self) -> dict:
        return {"teacher": asdict(self.teacher), "student": asdict(self.student), "batch": self.batch,
                "block": self.block, "ranks": self.ranks, "modes": [e.to_dict() for e in self.estimates],
                "notes": self.notes}


def estimate_memory(config: DistillConfig | None = None, modes: list[str] | None = None,
                    **options) -> MemoryReport:
    """Per-mode device memory for a run's models and batch, read from configs without loading weights.

    Other parts call it too (a CUDA out-of-memory error can print `format_breakdown` of the mode that ran);
    with models already loaded, `estimate_mode(mode, model_shape(teacher), model_shape(student), ...)`.
    """
    cfg = (config or DistillConfig(**options)).validate()
    chosen = parse_modes(modes) or list(MODE_NAMES)
    if cfg.shard_teacher and cfg.nproc < 2:
        raise BadInput("--shard-teacher shards the teacher over several ranks: add --nproc N (N ≥ 2)")
    for pattern in cfg.router_patterns or []:  # checked first: any later error is about loading a model
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BadInput(f"--router-patterns {pattern!r} is not a valid regular expression: {exc}") from None
    teacher = shape_from_config(cfg.teacher_model, cfg.trust_remote_code, cfg.router_patterns, "--teacher-model")
    student = shape_from_config(cfg.student_model, cfg.trust_remote_code, option="--student-model")
    tokenizers = (load_tokenizer(cfg.teacher_model, cfg.trust_remote_code, weights=False),
                  load_tokenizer(cfg.student_model, cfg.trust_remote_code, weights=False))
    dual = shared_vocabulary(*tokenizers, teacher.vocab, student.vocab) is None  # as train decides: its own tokens
    for shape in (student,) if dual else (student, teacher):
        check_block_fits(cfg.block_size, shape.positions, shape.name)
    estimates = [estimate_mode(m, teacher, student, cfg.per_device_batch_size, cfg.block_size,
                               gradient_checkpointing=cfg.gradient_checkpointing,
                               offload_teacher=cfg.offload_teacher_to_cpu, fused_loss=cfg.fused_loss,
                               teacher_shards=cfg.nproc if cfg.shard_teacher else 1, dual=dual)
                 for m in dict.fromkeys(chosen)]
    return MemoryReport(teacher, student, cfg.per_device_batch_size, cfg.block_size, estimates, cfg.nproc)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def breakdown_table(estimates: list[MemoryEstimate], title: str = "estimated device memory"):
    """A rich table of the estimates (one row per mode, one unit for all cells), for the terminal."""
    from rich import box
    from rich.table import Table

    unit, size = ("GiB", GIB) if max(e.total for e in estimates) >= GIB else ("MiB", 2**20)
    table = Table(title=f"{title} ({unit})", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="teacher, student: weights as the mode holds them; masters: fp32 master copies; "
                          "optimizer: AdamW's two moments; activ.*: activations, estimated")
    table.add_column("mode", no_wrap=True)
    for header in SHORT_TITLES:
        table.add_column(header, justify="right", no_wrap=True)
    for e in estimates:
        table.add_row(e.mode, *(f"{getattr(e, p) / size:.2f}" for p in PARTS), f"[bold]{e.total / size:.2f}[/]")
    return table


def format_breakdown(estimate: MemoryEstimate) -> str:
    """One mode's breakdown as one line of text (for an out-of-memory message)."""
    parts = ", ".join(f"{PART_TITLES[p]} {human_bytes(getattr(estimate, p))}" for p in PARTS)
    return f"estimated device memory for {estimate.mode}: {human_bytes(estimate.total)} ({parts})"
