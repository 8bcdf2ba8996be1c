"""Every knob of a run in one dataclass, validated once at the edge.

The CLI's options are generated from these fields (help text in the field metadata), so `train`,
`compare-precision`, `--config FILE` and a run's own config.json all speak the same names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import BadInput
from .wording import closest, did_you_mean

KD_LOSSES = ("forward-kl", "reverse-kl", "jsd")
PROBE_LEVELS = ("off", "standard", "full")  # --probes; the probes use this tuple too (probes.LEVELS)
# config.json's `caller`, whose words a fix is written in: `train`'s (cli), and those of each caller of the probes
CALLERS = ("cli", "loop", "trainer", "accelerate", "lightning")
NONFINITE_POLICIES = ("stop", "skip", "rollback", "continue")
SCHEDULERS = ("linear", "cosine")
MODEL_DTYPES = ("float16", "bfloat16", "float32")
REPORT_TO = ("none", "tensorboard")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DistillConfig:
    """One run of knowledge distillation: models, data, precision, schedule, probes and outputs."""

    # models
    teacher_model: str = _opt("embedded:tiny-mixtral", "Teacher: hub id, local directory or embedded:NAME.")
    student_model: str = _opt("embedded:tiny-gpt2", "Student: hub id, local directory or embedded:NAME.")
    trust_remote_code: bool = _opt(False, "Allow model repositories to run their own code (off unless asked).")
    # precision
    precision: str = _opt("auto", "fp32 | mixed | bf16-mixed | pure-fp16 | pure-bf16 | auto (or an alias).")
    model_dtype: str | None = _opt(None, "The original scripts' flag: float16 | bfloat16 | float32.")
    # data
    dataset_name: str | None = _opt(None, "A datasets-hub corpus (e.g. wikitext).")
    dataset_config_name: str | None = _opt(None, "The datasets-hub configuration (e.g. wikitext-2-raw-v1).")
    train_file: str | None = _opt(None, "Local training text: .txt (one document a line), .jsonl (text field) or "
                                  ".csv (text column).")
    validation_file: str | None = _opt(None, "Local validation text (with --dataset-name too); without it the hub "
                                       "set's validation split, or ~5% held out.")
    block_size: int = _opt(64, "Tokens per training sequence (student tokens).")
    # schedule
    train_steps: int = _opt(120, "Optimizer steps.")
    per_device_batch_size: int = _opt(8, "Sequences per micro-batch.")
    grad_accum_steps: int = _opt(1, "Micro-batches per optimizer step.")
    eval_steps: int = _opt(60, "Evaluate validation perplexity every N steps (and before the first, and at the end).")
    eval_max_batches: int = _opt(50, "At most this many validation batches per evaluation.")
    save_steps: int = _opt(0, "Write a resumable checkpoint every N steps (0: only at the end).")
    save_total_limit: int = _opt(2, "Keep the newest N checkpoints (plus the best by validation perplexity).")
    # optimisation
    student_lr: float = _opt(2e-3, "Student learning rate (AdamW).")
    router_lr: float = _opt(1e-4, "Learning rate of the teacher's router weights.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_eps: float = _opt(1e-8, "AdamW eps (1e-8 is 0.0 in fp16: the pure-fp16 failure).")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm (after unscaling); 0 disables clipping.")
    use_scheduler: bool = _opt(False, "Use a learning-rate schedule with warmup.")
    scheduler_type: str = _opt("cosine", " | ".join(SCHEDULERS) + ".")
    warmup_steps: int = _opt(0, "Warmup optimizer steps of the schedule.")
    # the distillation objective
    kd_loss: str = _opt("forward-kl", " | ".join(KD_LOSSES) + ".")
    jsd_beta: float = _opt(0.5, "Mixture weight of the generalized JSD, in (0, 1).")
    temperature: float = _opt(2.0, "Softmax temperature of the KD term (the term is scaled by T²).")
    alpha_kd: float = _opt(0.5, "Weight of the KD term.")
    alpha_ce: float = _opt(0.5, "Weight of the next-token cross-entropy.")
    router_anchor_weight: float = _opt(0.01, "Weight of the L2 anchor of router weights to their initial values.")
    router_load_balance_weight: float = _opt(0.01, "Weight of the Switch-style load-balance term.")
    router_entropy_weight: float = _opt(0.001, "Weight of the gate-entropy bonus (subtracted from the loss).")
    router_patterns: list[str] | None = _opt(None, "Regexes narrowing which routers train (repeat the option for "
                                             "several).", metavar="REGEX", default_text="gate, router")
    # devices and memory
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N.")
    offload_teacher_to_cpu: bool = _opt(False, "Keep the teacher on the CPU (CUDA runs; a recorded no-op on CPU).")
    clear_cache_every_step: bool = _opt(False, "Empty the CUDA cache after each step (a recorded no-op on CPU).")
    gradient_checkpointing: bool = _opt(False, "Recompute student activations in backward to save memory.")
    fused_loss: bool = _opt(True, "Take both models' logits a chunk of rows at a time inside the loss, never whole.")
    nproc: int = _opt(1, "Processes (launches torchrun when above 1).")
    shard_teacher: bool = _opt(False, "Shard the teacher over the ranks with FSDP2 (torchrun, --nproc ≥ 2): 1/N of "
                               "its weights per GPU.")
    # probes and policy
    probes: str = _opt("standard", " | ".join(PROBE_LEVELS) + ".")
    probe_every: int = _opt(10, "At standard, per-module statistics on step 1 and every N-th step.")
    on_nonfinite: str = _opt("stop", "stop | skip | rollback | continue, on a non-finite step.")
    max_rollbacks: int = _opt(3, "Rollbacks before the rollback policy stops.")
    # console
    log_every: int | None = _opt(None, "A log line (step, loss, eval ppl, lr, tokens/s, ETA) every N steps; by "
                                 "default none in a terminal (the progress bar shows them) and about ten per run "
                                 "elsewhere (CI, nohup, a notebook); 0: none.", default_text="auto")
    # run directory
    seed: int = _opt(42, f"Seed of weights init, data order and dropout (0 to {2**32 - 1:,}).")
    output_dir: str | None = _opt(None, "Run directory (default: a new runs/<date-time>-<mode>/).")
    overwrite: bool = _opt(False, "Replace an existing run directory that holds a different run.")
    resume: bool = _opt(False, "Continue from the newest checkpoint of --output-dir.")
    resume_from: str | None = _opt(None, "Continue from this checkpoint directory.")
    report_to: str | None = _opt(None, "Also write the metrics and events for: tensorboard (RUN_DIR/tensorboard/, "
                                 "needs the tensorboard extra) | none.", default_text="none")

    def __new__(cls, *args: Any, **options: Any) -> DistillConfig:
        """An option of another name (`learning_rate`) refused with the one meant, as `distill()` and the CLI do:
        the dataclass's bare TypeError left a notebook's user to find `student_lr` alone."""
        refuse_unknown_options(options, f"{cls.__name__}()")
        return super().__new__(cls)

    @property
    def resume_option(self) -> str:
        """How this run was asked to continue, as errors about it name it: `--resume-from` or `--resume`."""
        return resume_option(self.to_dict())

    def unused_options(self) -> list[str]:
        """Options set away from their default that this run will not read, or not as meant, each as one sentence:
        `--warmup-steps 10` without `--use-scheduler` trains without warmup, and a warm-up as long as the run never
        reaches `--student-lr`; each should say so rather than pass in silence."""
        read_only_with = {  # option: (what makes this run read it, as the user would write that)
            "warmup_steps": (self.use_scheduler, "--use-scheduler"),
            "scheduler_type": (self.use_scheduler, "--use-scheduler"),
            "jsd_beta": (self.kd_loss == "jsd", "--kd-loss jsd"),
            "max_rollbacks": (self.on_nonfinite == "rollback", "--on-nonfinite rollback"),
            "probe_every": (self.probes == "standard", "--probes standard"),
        }
        defaults = DistillConfig()
        notes = [f"--{_flag(name)} {getattr(self, name)} has no effect without {needed}"
                 for name, (read, needed) in read_only_with.items()
                 if not read and getattr(self, name) != getattr(defaults, name)]
        if self.use_scheduler and self.warmup_steps >= self.train_steps:  # the lr climbs to the last step
            notes.append(f"--warmup-steps {self.warmup_steps} is not below --train-steps {self.train_steps}: the "
                         f"learning rate rises for the whole run and never reaches --student-lr {self.student_lr:g}")
        return notes

    def validate(self) -> DistillConfig:
        """Reject settings that cannot work, with a message that says what to change."""
        for f in fields(self):
            setattr(self, f.name, _as_declared(f.name, getattr(self, f.name)))
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise BadInput(f"--{_flag(f.name)} must be a finite number, got {value}")
            if isinstance(value, str) and not value.strip():  # `--train-file "$DATA"`, DATA unset: the default corpus
                raise BadInput(empty_value(f"--{_flag(f.name)}", value))
        for name in PATH_OPTIONS:
            if getattr(self, name) is not None:
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        _positive(self, "block_size", "train_steps", "per_device_batch_size", "grad_accum_steps", "eval_steps",
                  "eval_max_batches", "probe_every", "nproc", "save_total_limit")
        if self.log_every is not None:
            _non_negative(self, "log_every")
        _non_negative(self, "save_steps", "warmup_steps", "max_rollbacks", "weight_decay", "max_grad_norm",
                      "router_anchor_weight", "router_load_balance_weight", "router_entropy_weight", "adam_eps")
        _above_zero(self, "temperature", "student_lr", "router_lr")
        if not 0 <= self.seed < 2**32:  # numpy's range (torch's is wider): `--seed $(date +%s%N)` was exit 3
            raise BadInput(f"--seed must lie in 0 … {2**32 - 1}, got {self.seed}")
        if self.alpha_kd < 0 or self.alpha_ce < 0:
            raise BadInput(f"--alpha-kd and --alpha-ce must be ≥ 0, got {self.alpha_kd} and {self.alpha_ce}")
        if self.alpha_kd == 0 and self.alpha_ce == 0:
            raise BadInput("--alpha-kd and --alpha-ce are both 0: nothing would be trained")
        if not 0 < self.jsd_beta < 1:
            raise BadInput(f"--jsd-beta must lie in (0, 1), got {self.jsd_beta}")
        _choice(self, "kd_loss", KD_LOSSES)
        _choice(self, "probes", PROBE_LEVELS)
        _choice(self, "on_nonfinite", NONFINITE_POLICIES)
        _choice(self, "scheduler_type", SCHEDULERS)
        if self.model_dtype is not None:
            _choice(self, "model_dtype", MODEL_DTYPES)
        if self.report_to is not None:
            _choice(self, "report_to", REPORT_TO)
            import importlib.util

            if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
                raise BadInput("--report-to tensorboard needs the tensorboard package: "
                               "pip install 'sarkd-diag[tensorboard]'")
        if self.dataset_name and self.train_file:
            raise BadInput("give either --dataset-name or --train-file, not both")
        if self.dataset_config_name and not self.dataset_name:
            raise BadInput(f"--dataset-config-name {self.dataset_config_name} configures a --dataset-name, and none is "
                           "given (e.g. --dataset-name 'wikitext' --dataset-config-name 'wikitext-2-raw-v1')")
        if self.resume and self.resume_from:
            raise BadInput("give either --resume or --resume-from, not both")
        if self.resume and not self.output_dir:
            raise BadInput("--resume needs --output-dir (the run to continue)")
        if (self.resume or self.resume_from) and self.overwrite:
            raise BadInput(f"--overwrite would delete the run that {self.resume_option} continues; give one of them")
        if self.shard_teacher and self.offload_teacher_to_cpu:
            raise BadInput("--shard-teacher and --offload-teacher-to-cpu: give one of them (a sharded teacher "
                           "already keeps 1/N of its weights per GPU)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def empty_value(option: str, value: str) -> str:
    """The refusal of an option given nothing (`--train-file "$DATA"` with DATA unset): read as left out, it would
    quietly mean the default — the default corpus, every mode, every event."""
    return f"{option} is empty ({value!r}: an unset shell variable?); give a value, or leave the option out"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _positive(cfg: DistillConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise BadInput(f"--{_flag(name)} must be ≥ 1, got {getattr(cfg, name)}")


def _non_negative(cfg: DistillConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise BadInput(f"--{_flag(name)} must be ≥ 0, got {getattr(cfg, name)}")


def _above_zero(cfg: DistillConfig, *names: str) -> None:
    """A real number that must be positive: the message names the one option typed wrong and its value."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise BadInput(f"--{_flag(name)} must be > 0, got {getattr(cfg, name)}")


def _choice(cfg: DistillConfig, name: str, allowed: tuple[str, ...]) -> None:
    """One of `allowed`, in whatever case it was typed (`--probes Full`, a YAML file's `Stop`), as --precision and the
    names `events` filters by are read; recorded as allowed spells it."""
    typed = getattr(cfg, name)
    chosen = next((choice for choice in allowed if choice == typed.strip().lower()), None)
    if chosen is None:
        raise BadInput(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {typed!r}"
                       + did_you_mean(str(typed), allowed))
    setattr(cfg, name, chosen)


# options that name a file or directory (a model's too, when it is local): `~` is expanded in them
PATH_OPTIONS = ("teacher_model", "student_model", "train_file", "validation_file", "output_dir", "resume_from")


def user_path(path: str | os.PathLike) -> Path:
    """A path as a user gives it, `~` expanded. The shell leaves `--output-dir=~/runs/a` and a config file's
    `~/data.txt` as they are, and pathlib does not expand them while pandas does: a run trained into ./~/runs/a
    and then failed to write its parquet files into $HOME/runs/a."""
    return Path(os.path.expanduser(os.fspath(path)))


FIELD_NAMES = frozenset(f.name for f in fields(DistillConfig))
# what other tools (transformers' TrainingArguments, run_clm.py, ...) call an option, and the option meant here
OTHER_TOOLS_NAMES = {
    "learning_rate": "student_lr", "lr": "student_lr", "max_steps": "train_steps", "steps": "train_steps",
    "num_steps": "train_steps", "batch_size": "per_device_batch_size",
    "per_device_train_batch_size": "per_device_batch_size", "train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "lr_scheduler_type": "scheduler_type",
    "logging_steps": "log_every", "max_seq_length": "block_size", "seq_len": "block_size",
    "teacher": "teacher_model", "student": "student_model", "model_name_or_path": "student_model",
    "output": "output_dir", "out": "output_dir", "eval_every": "eval_steps", "save_every": "save_steps",
    "dataset": "dataset_name", "data": "train_file", "bs": "per_device_batch_size",
    "logging_dir": "output_dir", "log_dir": "output_dir", "save_dir": "output_dir", "out_dir": "output_dir",
    "max_length": "block_size", "max_seq_len": "block_size", "context_length": "block_size",
    "grad_clip": "max_grad_norm", "clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "T": "temperature", "kd_temperature": "temperature", "kd_alpha": "alpha_kd", "ce_alpha": "alpha_ce",
    "overwrite_output_dir": "overwrite",
}
# other tools' switches and counts, answered with this tool's option and value, in the command line's words (each
# caller's words by `option_spans`: `precision='mixed'` to distill(), `precision: mixed` in a --config file)
OTHER_TOOLS_SETTINGS = {
    **dict.fromkeys(("fp16", "amp"), "`--precision mixed`"), "bf16": "`--precision bf16-mixed`",
    "fp32": "`--precision fp32`",
    "half": "`--precision mixed` (fp16 compute, fp32 master weights; `--precision pure-fp16` is the model.half() run)",
    "cpu": "`--device cpu`", **dict.fromkeys(("cuda", "gpu"), "`--device cuda`"),
    **dict.fromkeys(("epochs", "num_epochs", "num_train_epochs"),
                    "`--train-steps N`: a run counts optimizer steps, not passes over the data"),
}


def meant_option(typed: str) -> str | None:
    """The option a name DistillConfig lacks means: another tool's name for it (`learning_rate`: student_lr), or
    a near miss (`train_step`, `--train-steps`); None when neither."""
    name = str(typed).lstrip("-").replace("-", "_")
    return OTHER_TOOLS_NAMES.get(name) or closest(name, FIELD_NAMES)


def other_tools_setting(typed: str) -> str | None:
    """This tool's option and value for another tool's switch or count (`--fp16`, `epochs=3`), in the command
    line's words; None when `typed` is none of them."""
    return OTHER_TOOLS_SETTINGS.get(str(typed).lstrip("-").replace("-", "_"))


def refuse_unknown_options(options: dict, caller: str) -> None:
    """Options given to `caller` (`distill()`) that DistillConfig lacks, refused as Python refuses an unexpected
    keyword argument, with the option meant: the bare TypeError left its user to find `student_lr` alone."""
    unknown = sorted(name for name in options if name not in FIELD_NAMES)
    if not unknown:
        return
    setting = other_tools_setting(unknown[0]) if len(unknown) == 1 else None
    meant = meant_option(unknown[0]) if len(unknown) == 1 else None
    arguments = "an unexpected keyword argument" if len(unknown) == 1 else "unexpected keyword arguments"
    hint = (f": write {option_spans(setting, as_keyword)}" if setting else f": did you mean {meant}?" if meant
            else "; its options are DistillConfig's fields")
    raise TypeError(f"{caller} got {arguments} {', '.join(map(repr, unknown))}{hint}")


FIELD_TYPES: dict[str, Any] = get_type_hints(DistillConfig)  # each field's type (`int`, `str | None`, ...)


COMMANDS_IN_A_MESSAGE = re.compile(r"(`[^`]*`|sarkd-diag [^;`)]*)")  # quoted or offered commands: kept as written
# an option, and the word after it (a value the message shows, or the message's next word): `--precision fp16 is`
CLI_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)( ('[^']*'|[^\s,;()]*[^\s,;:()]))?")


# an option in backticks, alone or with its value: `--max-grad-norm`, `--precision mixed`, `--train-steps N`
QUOTED_OPTION = re.compile(r"`--([a-z][a-z0-9-]*)(?: ([^`\s]+))?`")


def option_spans(text: str, render, names: frozenset[str] | set[str] = FIELD_NAMES) -> str:
    """`text` with each option in backticks among `names` (DistillConfig's fields: `--precision mixed`) written by
    `render(name, value)` — `name` the field, `value` the word after it or None; other spans kept as written."""
    def span(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return f"`{render(name, match.group(2))}`" if name in names else match.group(0)
    return QUOTED_OPTION.sub(span, text)


def as_keyword(name: str, value: str | None) -> str:
    """An option as a call to distill() writes it: `precision='mixed'`, `train_steps=N` (a number or a placeholder
    as shown), `resume=True`; bare, `max_grad_norm=`, when the message shows no value of a value option."""
    if value is None:
        return f"{name}=True" if FIELD_TYPES.get(name) is bool else f"{name}="
    if FIELD_TYPES.get(name) is bool and value.lower() in ("true", "false"):
        return f"{name}={value.capitalize()}"
    shown_as_is = value.isupper() or _number(value) is not None or value.startswith(("'", '"'))
    return f"{name}={value if shown_as_is else repr(value)}"


def in_keyword_terms(message: str, given: dict[str, Any] | None = None) -> str:
    """A refusal worded for the command line (`--student-lr must be > 0`, `--precision fp16 is ambiguous`), reworded
    for a caller of the Python API: each option becomes the keyword argument as the call writes it — with the value
    the message shows (`precision='fp16'`), else bare (`student_lr=`; a switch to pass, `resume=True`); the commands
    it offers to run are left as they are, an option quoted with its value becomes the keyword with it
    (`` `--precision mixed` ``: `` `precision='mixed'` ``). `given`: the call's keyword arguments, DistillConfig's
    fields and its own (compare_precision's `modes`): a value the message shows is matched against what the caller
    passed."""
    given = given or {}

    def keyword(match: re.Match) -> str:
        name, word, value = match.group(1).replace("-", "_"), match.group(2) or "", match.group(3)
        if name not in FIELD_NAMES and name not in given:
            return match.group(0)
        shown = _as_passed(name, value, given) if value else None
        if shown is not None:
            return shown
        return (f"{name}=True" if FIELD_TYPES.get(name) is bool and value != "must" else f"{name}=") + word

    return "".join(option_spans(part, as_keyword, FIELD_NAMES | set(given)) if i % 2 else CLI_OPTION.sub(keyword, part)
                   for i, part in enumerate(COMMANDS_IN_A_MESSAGE.split(message)))


def worded_for_distill(config: DistillConfig) -> Callable[[str], str]:
    """How a caller of `distill()` reads the run's console: the options in its messages and fixes as keyword
    arguments, with the run's values (`on_nonfinite='stop'`, `precision='mixed'`), `train` as `distill()`."""
    given = {f.name: getattr(config, f.name) for f in fields(config)}
    return lambda text: in_keyword_terms(text, given).replace("`train`", "`distill()`")


def _as_passed(name: str, word: str, given: dict[str, Any]) -> str | None:
    """`name=VALUE` as a call writes it, when `word` (the word after the option in a refusal) is its value: the one
    the caller passed (`output_dir='/tmp/x'`, followed by what the message adds to it: `train_file='a.jsonl':3`; one
    item of several: `'fp16' (of modes=)`), or a number or quoted example the message shows for it
    (`train_steps=120`); None when `word` is the message's next word."""
    value = given.get(name)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    items = value if isinstance(value, (list, tuple)) else value.split(",") if isinstance(value, str) else [value]
    if value is not None:
        for text in (str(value), repr(value), *([str(items[0])] if len(items) == 1 else [])):
            if word == text or word.startswith(text + ":"):
                return f"{name}={value!r}{word[len(text):]}"
        if _number(word) is not None and _number(word) == _number(str(value)):
            return f"{name}={value!r}"
        if word in (str(item).strip() for item in items):
            return f"{word!r} (of {name}=)"
    if word.startswith("'") or (value_type(FIELD_TYPES.get(name)) in (int, float) and _number(word) is not None):
        return f"{name}={word}"
    return None


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def value_type(hint: Any) -> Any:
    """A field's type without its `| None`: int for `int | None`, list[str] for `list[str] | None`."""
    if get_origin(hint) not in (Union, UnionType):
        return hint
    members = [a for a in get_args(hint) if a is not NoneType]
    return members[0] if len(members) == 1 else hint


KIND_WORDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string",
              list[str]: "a list of strings"}


def _as_declared(name: str, value: Any) -> Any:
    """`value` as field `name`'s declared type — a Path for a str, a numpy integer for an int, an int for a float —
    or BadInput naming the option: the Python API's `train_steps="2"` or `2.5` failed as a TypeError deep in
    training, or trained; a numpy integer passed and was recorded in config.json as a string ("3")."""
    hint = FIELD_TYPES[name]
    kind = value_type(hint)
    if value is None and kind is not hint:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if not isinstance(value, bool):  # bool is an Integral too, never meant as a count or a rate
        if kind is int and isinstance(value, numbers.Integral):
            return int(value)
        if kind is float and isinstance(value, numbers.Real):
            return float(value)
    if kind is str and isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if kind == list[str] and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadInput(f"--{_flag(name)} must be {KIND_WORDS[kind]}{' or None' if kind is not hint else ''}, "
                   f"got {value!r}")


def whole_number(text: str) -> int:
    """A count as it is typed on the command line: `1000`, `1_000`, `1e3`, `3.0` — a number whose value is whole, as a
    --config file's count is read; anything else (`2.5`, `abc`) is ValueError."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
    if not number.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


RESUME_OPTIONS = ("resume", "resume_from")  # continue a run rather than start one


def resume_option(options: dict) -> str:
    """The option a resume was asked with (`options`: a config's fields), as its errors must name it: the
    user who typed --resume-from PATH is not told about --resume."""
    return "--resume-from" if options.get("resume_from") else "--resume"


RUN_LOCATION = ("output_dir", "overwrite", *RESUME_OPTIONS)  # where a run is written, not how it trains
# compare-precision sets these itself for every mode (one precision each, --on-nonfinite continue, a fresh
# start): the CLI parses them only to refuse them, and a --config file's values are ignored
SET_BY_COMPARE = ("precision", "on_nonfinite", *RESUME_OPTIONS)
# compare-precision's own defaults, which a given value overrides (and its --help shows): lost updates
# measured often enough in a short comparison
COMPARE_DEFAULTS = {"probe_every": 5}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file; a run's own config.json (options under "options") works too."""
    data = _parsed_config_file(path)
    if isinstance(data, dict) and isinstance(data.get("options"), dict):  # a run's config.json: what ran, not how
        data = {k: v for k, v in data["options"].items() if k not in ("overwrite", *RESUME_OPTIONS)}
    if not isinstance(data, dict):
        raise BadInput(f"--config {path}: expected a mapping of option names to values")
    options = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(str(key) for key in data if str(key).replace("-", "_") not in FIELD_NAMES)
    if unknown:  # named as the file spells them; a near miss (`train_step`, `--train-steps`) with the key meant
        setting = other_tools_setting(unknown[0]) if len(unknown) == 1 else None
        meant = meant_option(unknown[0]) if len(unknown) == 1 else None
        hint = (f" (write {option_spans(setting, lambda name, value: f'{name}: {value or True}')})" if setting
                else f" (did you mean {meant}?)" if meant else "")
        raise BadInput(f"--config {path}: unknown {'option' if len(unknown) == 1 else 'options'} "
                       f"{', '.join(unknown)}{hint}")
    return {name: _file_value(path, name, value) for name, value in options.items()}


def comparison_modes(path: str | Path) -> list[str] | None:
    """The modes of a compare-precision directory's compare_options.json given as a --config file (its `options`
    beside its `modes`), None for any other file: its options alone would train one run, in no mode of them."""
    data = _parsed_config_file(path)
    if isinstance(data, dict) and isinstance(data.get("options"), dict) and isinstance(data.get("modes"), list):
        return [str(mode) for mode in data["modes"]]
    return None


def _parsed_config_file(path: str | Path) -> Any:
    """A --config file's content as parsed (YAML or JSON), or the reason it cannot be."""
    p = user_path(path)
    if p.is_dir():  # a run directory, given where its config.json was meant
        recorded = p / "config.json"
        hint = f"; the options this run was given are in {recorded}" if recorded.is_file() else ""
        raise BadInput(f"--config {path} is a directory, not a YAML or JSON file{hint}")
    if not p.is_file():
        raise BadInput(f"--config {path}: " + ("not a regular file" if p.exists() else "no such file"))
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) would fail json.loads
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:  # not JSON: a notes file, or YAML under another extension
        hint = "" if p.suffix.lower() == ".json" else "; a YAML file needs the extension .yaml or .yml"
        raise BadInput(f"--config {path}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}){hint}") \
            from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"--config {path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") \
            from None
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        raise BadInput(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return data


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _file_value(path: str | Path, name: str, value: Any) -> Any:
    """A config file's `value` for option `name`, as the command line would have parsed it.

    YAML reads `1e-3` as a string (it wants `1.0e-3`), `off` and `no` as booleans, and a single pattern as a
    string where a list is meant; JSON may quote a number or a boolean. Each is taken as meant; a value that
    cannot be is refused with the file and option named — not passed on (a quoted 'no' was a true flag)."""
    kind = value_type(FIELD_TYPES[name])
    where = f"--config {path}: {name}"
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise BadInput(f"{where}: {value!r} is not true or false")
    if kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise BadInput(f"{where}: {value!r} is not a number")
        if kind is int:
            if not float(number).is_integer():
                raise BadInput(f"{where}: {value!r} is not a whole number")
            return int(number)
        return float(number)
    if kind is str:
        if isinstance(value, bool):  # YAML's reading of a bare off / on (yes / no)
            return "on" if value else "off"
        if isinstance(value, int | float):
            return str(value)
        if not isinstance(value, str):
            raise BadInput(f"{where}: {value!r} is not a single value")
        return value
    if get_origin(kind) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise BadInput(f"{where}: {value!r} is not a list of strings")
        return items
    return value


def recorded_options(given: dict[str, Any]) -> dict[str, Any]:
    """The options a resumed run was trained with: `--output-dir RUN --resume` needs nothing else.

    Read from RUN/config.json for --resume, from the checkpoint's meta.json for --resume-from; {} when
    there is nothing readable (the run directory's own checks then say what is wrong).
    """
    if given.get("resume_from"):
        checkpoint = user_path(str(given["resume_from"]))
        sources = [checkpoint / "meta.json", checkpoint.parent.parent / "config.json"]
    elif given.get("resume") and given.get("output_dir"):
        sources = [user_path(str(given["output_dir"])) / "config.json"]
    else:
        return {}
    for path in sources:
        try:
            options = json.loads(path.read_text(encoding="utf-8")).get("options")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(options, dict):
            return {k: v for k, v in options.items() if k in FIELD_NAMES and k not in RUN_LOCATION}
    return {}


def build_config(cli_options: dict[str, Any], config_file: str | Path | None = None) -> DistillConfig:
    """Defaults < a resumed run's recorded options < config file < options given on the command line.

    (None means 'not given'.)
    """
    given = read_config_file(config_file) if config_file else {}
    given.update({k: v for k, v in cli_options.items() if v is not None})
    merged = {**recorded_options(given), **given}
    try:
        return DistillConfig(**merged).validate()
    except TypeError as exc:
        raise BadInput(f"invalid options: {exc}") from None


def with_config_options(func):
    """Give `func(config=None, *, ..., **options)` the explicit keyword signature of DistillConfig's fields
    (name, type, default) and a docstring that lists them: what `help()`, IPython's `?` and notebook
    completion show, from the one place the options are defined."""
    import inspect

    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    keyword = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter(f.name, keyword, default=f.default, annotation=FIELD_TYPES[f.name])
               for f in fields(DistillConfig) if f.name not in taken]
    func.__signature__ = signature.replace(parameters=params)
    lines = [f"    {f.name} = {f.default!r}: {f.metadata.get('help', '')}" for f in fields(DistillConfig)]
    func.__doc__ = (func.__doc__ or "").rstrip() + "\n\n    Options (DistillConfig's fields):\n" + "\n".join(lines)
    return func
