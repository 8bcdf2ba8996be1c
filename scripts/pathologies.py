"""A catalog of numerical pathologies, each provoked in a real training run, and what the diagnosis says.

Every scenario is a small, fast run on tiny models built with tests/tiny.py (CPU, one torch thread), provoked
the way a user would hit it: through the real CLI (`sarkd_diag.cli.main(["train", ...])`, in-process) or
through a hand-written PyTorch loop watched by `sarkd_diag.Probes`. Each scenario states the diagnosis the
tool must give (root cause, severity, model, module or tensor, first step) or, for a clean run, that no
warning or critical cause is claimed; and it measures the physical facts that show the run really provoked
what it claims (weights that grew, a loss that is NaN, a loss scale that fell), independently of the tool.

    python scripts/pathologies.py                   # run all, print a Markdown table
    python scripts/pathologies.py --only NAME       # one scenario (repeatable)
    python scripts/pathologies.py --markdown FILE   # also write the table to FILE

tests/e2e/test_pathologies.py asserts the same expectations, scenario by scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tiny  # noqa: E402

FP16_MAX = float(torch.finfo(torch.float16).max)
ANY = "<any>"  # an expected module or tensor that must be named, whichever it is


# ------------------------------------------------------------------------------------------ expectations
@dataclass(frozen=True)
class Expected:
    """What the diagnosis must say. None in a field: not asserted (not knowable from the provocation)."""

    cause: str | None  # the root cause (first in the diagnosis); None: a clean run
    severity: str | None = None
    model: str | None = None
    module: str | tuple[str, ...] | None = None  # exact name, accepted names, ANY, or None (not asserted)
    first_step: int | tuple[int, int] | None = None  # exact, or an inclusive range
    absent: tuple[str, ...] = ()  # causes that must not be claimed at all
    not_critical: tuple[str, ...] = ()  # causes that must not be claimed as critical
    fix_contains: str | None = None
    fix_lacks: str | None = None  # advice the root cause's fix must not give (the wrong remedy for this run)
    evidence_contains: str | None = None  # some evidence key contains this

    def describe(self) -> str:
        if self.cause is None:
            return "no warning or critical diagnosis"
        parts = [f"`{self.cause}` {self.severity}"]
        if self.model or self.module:
            parts.append(f"at {self.model or '?'}/{_where_text(self.module)}")
        if self.first_step is not None:
            parts.append(f"step {_step_text(self.first_step)}")
        return " ".join(parts)


def _where_text(module) -> str:
    if module is None:
        return "-"
    if isinstance(module, tuple):
        return " or ".join(module)
    return "a named tensor" if module == ANY else module


def _step_text(step) -> str:
    return f"{step[0]}–{step[1]}" if isinstance(step, tuple) else str(step)


def where(cause: dict) -> str | None:
    """The module a cause names, else its tensor."""
    return cause.get("module") or cause.get("tensor")


def _names(cause: dict, expected: str) -> bool:
    module, tensor = cause.get("module"), cause.get("tensor")
    if expected == ANY:
        return bool(module or tensor)
    return module == expected or (tensor is not None and (tensor == expected or tensor.startswith(expected + ".")))


def foreign_flags(diagnosis: list[dict], via: str) -> list[str]:
    """Command-line flags in the fixes that the caller does not have: any `--flag` in a user loop (it has
    `Probes(...)` arguments, not `train`'s options), in the CLI a flag that is no `train` option."""
    from sarkd_diag.contract.config import FIELD_NAMES

    found = []
    for cause in diagnosis:
        for flag in re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", cause.get("fix") or ""):
            name = flag.removeprefix("no-").replace("-", "_")
            if via != "CLI" or name not in FIELD_NAMES:
                found.append(f"--{flag}")
    return sorted(set(found))


def mismatches(expected: Expected, diagnosis: list[dict], via: str = "CLI") -> list[str]:
    """What differs from the expectation; empty when the diagnosis is as expected. A fix must name only what
    the caller has (`via`: "CLI" or "user loop")."""
    serious = [c for c in diagnosis if c.get("severity") in ("warning", "critical")]
    flags = foreign_flags(diagnosis, via)
    flags = [f"a fix names {', '.join(flags)}, which the {via} has not"] if flags else []
    if expected.cause is None:
        return [f"claims {c['cause']} ({c['severity']})" for c in serious] + flags
    if not diagnosis:
        return ["no diagnosis"]
    top = diagnosis[0]
    wrong = []
    if top.get("cause") != expected.cause:
        wrong.append(f"root cause {top.get('cause')}, not {expected.cause}")
    if expected.severity and top.get("severity") != expected.severity:
        wrong.append(f"severity {top.get('severity')}, not {expected.severity}")
    if expected.model and top.get("model") != expected.model:
        wrong.append(f"model {top.get('model')}, not {expected.model}")
    if expected.module is not None:
        accepted = expected.module if isinstance(expected.module, tuple) else (expected.module,)
        if not any(_names(top, m) for m in accepted):
            wrong.append(f"module {where(top)}, not {_where_text(expected.module)}")
    step = top.get("first_step")
    if isinstance(expected.first_step, tuple):
        if step is None or not expected.first_step[0] <= step <= expected.first_step[1]:
            wrong.append(f"first step {step}, not {_step_text(expected.first_step)}")
    elif expected.first_step is not None and step != expected.first_step:
        wrong.append(f"first step {step}, not {expected.first_step}")
    if expected.fix_contains and expected.fix_contains.lower() not in (top.get("fix") or "").lower():
        wrong.append(f"fix does not mention {expected.fix_contains!r}")
    if expected.fix_lacks and expected.fix_lacks.lower() in (top.get("fix") or "").lower():
        wrong.append(f"fix mentions {expected.fix_lacks!r}")
    if expected.evidence_contains and not any(expected.evidence_contains in k for k in top.get("evidence") or {}):
        wrong.append(f"no {expected.evidence_contains!r} in the evidence")
    for c in diagnosis:
        if "?" in (c.get("fix") or ""):  # no template holds one: a value the fix names was not found ("?")
            wrong.append(f"the fix of {c['cause']} leaves a value unfilled: {c['fix'][:120]!r}")
        if str((c.get("evidence") or {}).get("explained_by", "")).startswith(f"{top.get('cause')}@"):
            continue  # the root's failure, shown among the causes: no claim of its own
        if c.get("cause") in expected.absent:
            wrong.append(f"also claims {c['cause']} ({c['severity']})")
        elif c.get("cause") in expected.not_critical and c.get("severity") == "critical":
            wrong.append(f"also claims {c['cause']} as critical")
    return wrong + flags


# ------------------------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    diagnosis: list[dict] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # measured, printed: what the run physically did
    checks: dict[str, bool] = field(default_factory=dict)  # facts that must hold: the pathology was provoked
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int | None = None
    run_dir: Path | None = None

    def check(self, name: str, ok) -> None:
        self.checks[name] = bool(ok)

    def read_run(self, run_dir: Path) -> dict:
        """The run's summary.json; as the diagnosis, its causes and findings in the one order `rank` gave them, root
        first (`Diagnosis.ranked`: summary.json lists the two apart), drawn again from the run's logs."""
        from sarkd_diag.analysis.diagnose import diagnose
        from sarkd_diag.contract.rundir import load_events, load_metrics

        config = json.loads((run_dir / "config.json").read_text())
        self.run_dir, self.diagnosis = run_dir, diagnose(load_events(run_dir), load_metrics(run_dir), config).ranked
        return json.loads((run_dir / "summary.json").read_text())


@dataclass(frozen=True)
class Scenario:
    name: str
    how: str
    mode: str
    via: str  # "CLI" or "user loop"
    run: Callable[[World, Path], Outcome]
    expected: Expected

    @property
    def slug(self) -> str:
        return "-".join("".join(c if c.isalnum() else " " for c in self.name.lower()).split())


# ------------------------------------------------------------------------------------------ the tiny world
@dataclass
class World:
    root: Path
    train: Path
    valid: Path
    tokenizer: object
    student: Path
    teacher: Path
    dense_teacher: Path

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)


def build_world(root: Path) -> World:
    """The tests' tiny world (tests/tiny.py): corpus, tokenizer, student, MoE and dense teachers, on disk."""
    w = tiny.write_world(root)
    return World(root, w["train"], w["valid"], w["tokenizer"], w["student"], w["teacher"], w["dense_teacher"])


def token_batches(world: World, steps: int, batch: int = 2, block: int = 16) -> list[torch.Tensor]:
    ids = world.tokenizer(world.train.read_text())["input_ids"]
    need = steps * batch * block
    ids = (ids * (need // len(ids) + 1))[:need]
    return list(torch.tensor(ids).reshape(steps, batch, block))


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ running the CLI
def run_cli(world: World, out: Path, *extra: str, teacher: Path | None = None, student: Path | None = None,
            steps: int = 6) -> tuple[Outcome, dict]:
    """`sarkd-diag train` in-process on the tiny world; the run's summary.json diagnosis and its metrics rows."""
    from sarkd_diag.cli import main

    run_dir = out / "run"
    args = ["train", "--teacher-model", str(teacher or world.teacher), "--student-model", str(student or world.student),
            "--train-file", str(world.train), "--validation-file", str(world.valid), "--block-size", "16",
            "--per-device-batch-size", "2", "--train-steps", str(steps), "--eval-steps", "1000",
            "--eval-max-batches", "1", "--output-dir", str(run_dir), *extra]
    outcome = Outcome()
    stdout, stderr = io.StringIO(), io.StringIO()
    # in the scenario's directory: an internal error's traceback file lands there, not in the caller's
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), contextlib.chdir(out):
        try:
            main(args)
            outcome.exit_code = 0
        except SystemExit as exc:
            outcome.exit_code = exc.code if isinstance(exc.code, int) else 1
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        outcome.error = f"no summary.json (exit {outcome.exit_code}): {stderr.getvalue().strip()[-300:]}"
        return outcome, {"summary": {}, "metrics": [], "dir": run_dir}
    summary = outcome.read_run(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if m.get("split") == "train"]
    outcome.facts.update(exit=outcome.exit_code, status=summary.get("status"), steps=summary.get("steps_completed"))
    return outcome, {"summary": summary, "metrics": train_rows, "dir": run_dir}


def _losses(rows: list[dict]) -> list[float]:
    return [float(r["loss"]) if r.get("loss") is not None else math.nan for r in rows]


# ------------------------------------------------------------------------------------------ model surgery
def scaled_copy(model: nn.Module, weight: str, factor: float, tokenizer, path: Path) -> Path:
    """Save `model` with one weight multiplied by `factor`: a module whose output leaves fp16's range."""
    with torch.no_grad():
        model.get_parameter(weight).mul_(factor)
    return tiny.save(model, tokenizer, path)


def forward_extremes(model: nn.Module, ids: torch.Tensor, **inputs) -> list[tuple[str, float]]:
    """Each module's output absolute max in an fp32 forward, in forward order (outside any tool); `inputs`: what
    else the forward needs (an encoder-decoder's labels)."""
    seen: list[tuple[str, float]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Dropout)):
            continue

        def hook(_m, _i, out, name=name):
            t = out if torch.is_tensor(out) else next((o for o in (out if isinstance(out, (tuple, list)) else ())
                                                       if torch.is_tensor(o) and o.is_floating_point()), None)
            if t is not None and t.is_floating_point() and t.numel():
                seen.append((name, float(t.detach().abs().max())))
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.float()(ids, **inputs)
    for h in handles:
        h.remove()
    return seen


def first_beyond_fp16(extremes: list[tuple[str, float]]) -> tuple[str, float] | None:
    return next(((n, v) for n, v in extremes if v > FP16_MAX), None)


def named_mlp(seed: int = 0) -> nn.Sequential:
    """A small model of named Linear layers, as a user might write one: inp -> mid -> out."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(inp=nn.Linear(16, 32), act1=nn.ReLU(), mid=nn.Linear(32, 32), act2=nn.ReLU(),
                                     out=nn.Linear(32, 4)))


def blow_up_backward(module: nn.Module, when: Callable[[], bool] = lambda: True, factor: float = 1e30):
    """Multiply the gradient arriving at `module`'s output by `factor`: its own gradients overflow (a custom
    op with a bad backward), the modules after it in the forward stay finite."""
    def pre_hook(_m, grad_output):
        if not when():
            return None
        return tuple(g * factor if g is not None else None for g in grad_output)
    return module.register_full_backward_pre_hook(pre_hook)


def finite(t: torch.Tensor | None) -> bool:
    return t is not None and bool(torch.isfinite(t).all())


def max_weight(model: nn.Module) -> float:
    return max(float(p.detach().float().abs().max()) for p in model.parameters())


# ------------------------------------------------------------------------------------------ CLI scenarios
def pure_fp16_adamw_eps(world: World, tmp: Path) -> Outcome:
    outcome, run = run_cli(world, tmp, "--precision", "pure-fp16", steps=3)
    outcome.facts["eps_in_fp16"] = float(torch.tensor(1e-8, dtype=torch.float16))
    rows = run["metrics"]
    outcome.facts["weights_finite_after_step1"] = rows[0].get("weights_finite") if rows else None
    outcome.check("1e-8 is 0 in fp16", outcome.facts["eps_in_fp16"] == 0.0)
    outcome.check("the run stopped at step 1 with non-finite weights",
                  outcome.exit_code == 1 and run["summary"].get("steps_completed") == 1
                  and rows and rows[0].get("weights_finite") is False)
    return outcome


def pure_bf16_tiny_lr(world: World, tmp: Path, lr: str = "5e-6") -> Outcome:
    outcome, run = run_cli(world, tmp, "--precision", "pure-bf16", "--student-lr", lr, steps=4,
                           teacher=world.dense_teacher)
    from safetensors.torch import load_file

    before = load_file(str(world.student / "model.safetensors"))
    after = load_file(str(run["dir"] / "student" / "model.safetensors"))
    same = total = 0
    for name, w in after.items():
        if name in before:
            same += int((before[name].to(w.dtype) == w).sum())
            total += w.numel()
    outcome.facts["unchanged_weight_fraction"] = round(same / total, 3) if total else None
    outcome.check("most student weights did not move in 4 steps", total and same / total > 0.5)
    outcome.check("the run completed", outcome.exit_code == 0)
    return outcome


def pure_bf16_lr_too_small_for_fp32(world: World, tmp: Path) -> Outcome:
    """An lr of 1e-12 (a typo for 1e-4): below half an ulp of the weights in bfloat16 and in float32 alike."""
    return pure_bf16_tiny_lr(world, tmp, lr="1e-12")


def pure_bf16_weight_decay(world: World, tmp: Path) -> Outcome:
    outcome, _ = run_cli(world, tmp, "--precision", "pure-bf16", "--student-lr", "1e-3", "--weight-decay", "0.01",
                         steps=2, teacher=world.dense_teacher)
    weights = [p.detach().to(torch.bfloat16) for p in tiny.make_gpt2(world.vocab).parameters()]
    nonzero = [w[w != 0] for w in weights]
    kept = sum(int((w * (1 - 1e-3 * 0.01) == w).sum()) for w in nonzero) / sum(w.numel() for w in nonzero)
    outcome.facts["bf16_weights_one_decay_step_leaves_unchanged"] = f"{kept:.1%}"
    outcome.check("AdamW's decay factor 1 − 1e-5 rounds back to every nonzero bf16 weight of the student", kept == 1.0)
    outcome.check("the run completed", outcome.exit_code == 0)
    return outcome


def mixed_kd_weight_overflow(world: World, tmp: Path, tied: bool = False) -> Outcome:
    """`tied`: the student's lm_head is its token embedding (GPT-2's default), whose gradient arrives last."""
    student = world.student if tied else tiny.save(tiny_gpt2_untied(world.vocab), world.tokenizer,
                                                   tmp / "untied_student")
    outcome, run = run_cli(world, tmp, "--precision", "mixed", "--alpha-kd", "1e8",
                           steps=18, teacher=world.dense_teacher, student=student)
    rows = run["metrics"]
    scales = [r.get("loss_scale") for r in rows]
    losses = _losses(rows)
    outcome.facts.update(final_loss_scale=scales[-1] if scales else None, max_loss=max(losses) if losses else None,
                         skipped_steps=sum(1 for r in rows if r.get("skipped")))
    outcome.check("the loss itself is finite: the gradients overflow", losses and all(map(math.isfinite, losses)))
    grad = kd_lm_head_gradient(world, 1e8)
    outcome.facts["lm_head_grad_unscaled_finite"] = finite(grad)
    outcome.check("a KD loss ×1e8 overflows lm_head's fp16 gradient at loss scale 1", not finite(grad))
    outcome.check("the loss scale fell below 1", scales and scales[-1] is not None and scales[-1] < 1)
    return outcome


def mixed_kd_weight_overflow_tied(world: World, tmp: Path) -> Outcome:
    return mixed_kd_weight_overflow(world, tmp, tied=True)


def kd_lm_head_gradient(world: World, alpha: float, temperature: float = 2.0) -> torch.Tensor:
    """The untied student's lm_head gradient of alpha·T²·KL(teacher ‖ student) under autocast fp16, unscaled
    (a stand-in for train's KD term, outside the tool)."""
    student, teacher = tiny_gpt2_untied(world.vocab), tiny.make_gpt2(world.vocab, seed=3)
    ids = token_batches(world, 1)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        s, t = student(input_ids=ids).logits.float(), teacher(input_ids=ids).logits.float().detach()
    kl = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, -1),
                              nn.functional.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean")
    (alpha * temperature**2 * kl / ids.shape[1]).backward()
    return student.lm_head.weight.grad


def absurd_lr(mode: str):
    def run(world: World, tmp: Path) -> Outcome:
        outcome, run_ = run_cli(world, tmp, "--precision", mode, "--student-lr", "100", steps=4)
        rows = run_["metrics"]
        losses = _losses(rows)
        amax = [r.get("param_amax") for r in rows]
        initial = max_weight(tiny.make_gpt2(world.vocab))  # the saved student is this model
        outcome.facts.update(losses=[round(v, 3) for v in losses], weight_amax_before=round(initial, 3),
                             weight_amax_after_step1=amax[0] if amax else None)
        outcome.check("step 1's update made the weights ~100x larger", amax and amax[0] and amax[0] > 50 * initial)
        if mode == "mixed":
            outcome.check("the next forward overflows fp16: step 2's loss is non-finite",
                          len(losses) > 1 and not math.isfinite(losses[1]))
        else:
            outcome.check("the loss blows up (>3x its first value) and stays finite",
                          len(losses) > 1 and all(map(math.isfinite, losses)) and max(losses[1:]) > 3 * losses[0])
        return outcome
    return run


def student_activation_overflow(mode: str):
    def run(world: World, tmp: Path) -> Outcome:
        model = tiny.make_gpt2(world.vocab)
        student = scaled_copy(model, STUDENT_HOT + ".weight", STUDENT_FACTOR, world.tokenizer, tmp / "hot_student")
        first = first_beyond_fp16(forward_extremes(model, token_batches(world, 1)[0]))
        outcome, _ = run_cli(world, tmp, "--precision", mode, steps=4, student=student)
        outcome.facts["first_module_beyond_fp16_in_fp32"] = first and (first[0], f"{first[1]:.3g}")
        outcome.check(f"{STUDENT_HOT} is the first module beyond fp16's range, finite in fp32",
                      first and first[0] == STUDENT_HOT and math.isfinite(first[1]))
        return outcome
    return run


def dense_teacher_overflow(world: World, tmp: Path) -> Outcome:
    model = tiny.make_gpt2(world.vocab, seed=3)
    teacher = scaled_copy(model, TEACHER_HOT + ".weight", STUDENT_FACTOR, world.tokenizer, tmp / "hot_teacher")
    first = first_beyond_fp16(forward_extremes(model, token_batches(world, 1)[0]))
    outcome, run = run_cli(world, tmp, "--precision", "mixed", steps=4,
                           teacher=teacher)
    outcome.facts["first_teacher_module_beyond_fp16_in_fp32"] = first and (first[0], f"{first[1]:.3g}")
    outcome.check(f"teacher {TEACHER_HOT} is the first module beyond fp16's range",
                  first and first[0] == TEACHER_HOT and math.isfinite(first[1]))
    return outcome


def router_teacher_overflow(world: World, tmp: Path) -> Outcome:
    model = tiny.make_mixtral(world.vocab)
    teacher = scaled_copy(model, ROUTER + ".weight", ROUTER_FACTOR, world.tokenizer, tmp / "hot_router_teacher")
    first = first_beyond_fp16(forward_extremes(model, token_batches(world, 1)[0]))
    outcome, run = run_cli(world, tmp, "--precision", "mixed", steps=4,
                           teacher=teacher)
    outcome.facts["first_teacher_module_beyond_fp16_in_fp32"] = first and (first[0], f"{first[1]:.3g}")
    outcome.check(f"the router {ROUTER} is the first teacher module beyond fp16's range",
                  first and first[0] == ROUTER and math.isfinite(first[1]))
    return outcome


def moe_expert_teacher_overflow(world: World, tmp: Path) -> Outcome:
    """An expert MLP, not the router: layer 0's experts' weights ×300 (gate_up) and ×3e4 (down), every weight within
    fp16's range (the largest ~2.4e3), their output beyond it."""
    model = tiny.make_mixtral(world.vocab)
    with torch.no_grad():
        model.get_parameter(EXPERTS + ".gate_up_proj").mul_(300)
    teacher = scaled_copy(model, EXPERTS + ".down_proj", 3e4, world.tokenizer, tmp / "hot_expert_teacher")
    first = first_beyond_fp16(forward_extremes(model, token_batches(world, 1)[0]))
    outcome, _ = run_cli(world, tmp, "--precision", "mixed", steps=2, teacher=teacher)
    outcome.facts["largest_teacher_weight"] = f"{max_weight(model):.3g}"
    outcome.facts["first_teacher_module_beyond_fp16_in_fp32"] = first and (first[0], f"{first[1]:.3g}")
    outcome.check(f"every teacher weight fits fp16 and {EXPERTS} is the first module beyond its range",
                  max_weight(model) < FP16_MAX and first and first[0] == EXPERTS and math.isfinite(first[1]))
    return outcome


def sar_router_terms_weighted_too_high(world: World, tmp: Path) -> Outcome:
    outcome, run = run_cli(world, tmp, "--precision", "mixed", "--router-load-balance-weight", "1e6", steps=10)
    rows = run["metrics"]
    scales = [r.get("loss_scale") for r in rows]
    router, kd = [abs(r.get("router_loss") or 0.0) for r in rows], [abs(r.get("kd_loss") or 0.0) for r in rows]
    outcome.facts.update(loss_scales=scales, router_loss=f"{max(router, default=0):.3g}",
                         kd_loss=f"{max(kd, default=0):.3g}")
    outcome.check("every step skipped while the scale fell from 2**16 to 128 or below; the router term dwarfs KD",
                  rows and all(r.get("skipped") for r in rows[:9]) and min(scales) <= 128
                  and min(router) > 1e3 * max(kd))
    return outcome


def checkpoint_beyond_fp16(world: World, tmp: Path, value: float = 1e5) -> tuple[nn.Module, Path]:
    """The tiny student saved in fp32 with one weight of `STUDENT_HOT` at `value` (beyond fp16's 65504): a checkpoint
    trained or exported wide, sound in fp32."""
    model = tiny.make_gpt2(world.vocab)
    with torch.no_grad():
        model.get_parameter(STUDENT_HOT + ".weight")[0, 0] = value
    return model, tiny.save(model, world.tokenizer, tmp / "wide_student")


def checkpoint_beyond_fp16_mixed(world: World, tmp: Path) -> Outcome:
    _, student = checkpoint_beyond_fp16(world, tmp)
    outcome, run = run_cli(world, tmp, "--precision", "mixed", steps=3, student=student)
    half = torch.tensor(1e5).half()
    outcome.facts["weight_in_fp16"] = float(half)
    rows = run["metrics"]
    outcome.facts["losses"] = _losses(rows)
    outcome.check("1e5 is +Inf in fp16; every step's loss is non-finite under fp16 autocast",
                  float(half) == math.inf and rows and not any(map(math.isfinite, _losses(rows))))
    return outcome


def clean_cli(mode: str):
    def run(world: World, tmp: Path) -> Outcome:
        outcome, run_ = run_cli(world, tmp, "--precision", mode, "--student-lr", "3e-3", steps=6)
        losses = _losses(run_["metrics"])
        outcome.facts["losses"] = [round(v, 3) for v in losses]
        outcome.check("completed with finite losses", outcome.exit_code == 0 and losses
                      and all(map(math.isfinite, losses)))
        return outcome
    return run


def self_distillation_kd_only(world: World, tmp: Path) -> Outcome:
    """The student distilled from itself on KD alone (a pipeline's sanity check): the KD term is exactly 0, its
    minimum, and so is every gradient — nothing to learn, nothing broken."""
    outcome, run = run_cli(world, tmp, "--precision", "fp32", "--alpha-ce", "0", teacher=world.student, steps=4)
    losses = _losses(run["metrics"])
    outcome.facts["losses"] = losses
    outcome.check("completed with a loss of exactly 0 on every step", outcome.exit_code == 0 and losses
                  and all(v == 0.0 for v in losses))
    return outcome


def self_distillation_kd_only_mixed(world: World, tmp: Path) -> Outcome:
    """The same in mixed precision: the teacher is held in fp16, the student computes under fp16 autocast, so KD
    starts at rounding's ~1e-7, not 0; AdamW turns those noise gradients into lr-sized steps and KD settles at ~1e-3
    nats per token — thousands of times its first value, and nothing the student predicts has changed that shows."""
    outcome, run = run_cli(world, tmp, "--precision", "mixed", "--alpha-ce", "0", teacher=world.student, steps=8)
    rows = run["metrics"]
    losses, ce = _losses(rows), [r.get("ce_loss") for r in rows]
    outcome.facts.update(losses=[float(f"{v:.3g}") for v in losses], ce_loss=[round(v, 3) for v in ce if v])
    outcome.check("KD began at rounding's floor and grew far beyond 3x it, while the CE stayed within 5%",
                  outcome.exit_code is not None and losses and all(map(math.isfinite, losses)) and losses[0] < 1e-5
                  and max(losses) > 100 * losses[0] and max(ce) < 1.05 * ce[0])
    return outcome


def clean_mixed_early_skips(world: World, tmp: Path) -> Outcome:
    outcome, run = run_cli(world, tmp, "--precision", "mixed", "--alpha-kd", "1e3", steps=8)
    rows = run["metrics"]
    scales, losses = [r.get("loss_scale") for r in rows], _losses(rows)
    outcome.facts.update(loss_scales=scales, losses=[round(v, 2) for v in losses])
    skipped = [i + 1 for i, r in enumerate(rows) if r.get("skipped")]
    outcome.facts["skipped_steps"] = skipped
    outcome.check("the scaler skipped only the first steps, then the loss fell",
                  skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) <= 5
                  and all(map(math.isfinite, losses)) and losses[-1] < losses[0])
    return outcome


STUDENT_HOT = "transformer.h.1.mlp.c_fc"  # scaled so its forward output leaves fp16's range (finite in fp32)
TEACHER_HOT = "transformer.h.0.mlp.c_fc"
ROUTER = "model.layers.0.mlp.gate"
EXPERTS = "model.layers.0.mlp.experts"  # the Mixtral layer's experts: one module, their weights stacked
ROUTERS = tuple(f"model.layers.{i}.mlp.gate" for i in range(2))  # the tiny Mixtral teacher's two routers
STUDENT_FACTOR = 1e6
ROUTER_FACTOR = 1e7


def tiny_gpt2_untied(vocab: int) -> nn.Module:
    """The tiny GPT-2 with an lm_head of its own: its gradient is the first in backward order, whichever way
    backward order is read (registration or arrival)."""
    make = getattr(tiny, "make_gpt2_untied", None)
    if make is not None:
        return make(vocab)
    raise RuntimeError("tests/tiny.py lacks make_gpt2_untied")


# ------------------------------------------------------------------------------------------ user loops
def _probes(model, opt, scaler, run_dir):
    from sarkd_diag import Probes

    return Probes(model, optimizer=opt, scaler=scaler, run_dir=run_dir)


def scaled_update(loss: torch.Tensor, ids: torch.Tensor, scaler, opt, probes) -> None:
    """The rest of a GradScaler step once the loss is made: scaled backward, step, update, `probes.step()` with the
    loss and labels, `zero_grad()`."""
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    probes.step(loss=loss, labels=ids)
    opt.zero_grad()


def amp_user_loop(model: nn.Module, opt, batches: list[torch.Tensor], run_dir: Path,
                  dtype: torch.dtype = torch.float16) -> list[float]:
    """The AMP recipe a user writes: autocast, a GradScaler's scaled backward, step and update (bfloat16 needs no
    scaler: a plain backward and step), then `probes.step()` and `zero_grad()`; returns each step's loss."""
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    losses = []
    with _probes(model, opt, scaler if scaler.is_enabled() else None, run_dir) as probes:
        for ids in batches:
            with torch.autocast("cpu", dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            scaled_update(loss, ids, scaler, opt, probes)
    return losses


def plain_user_loop(model: nn.Module, opt, batches: list[torch.Tensor], run_dir: Path, schedule=None,
                    after_step: Callable[[], None] | None = None) -> list[float]:
    """The loop most people write, watched by Probes: forward, backward, the optimizer's step (`after_step()` right
    after it), `probes.step`, the schedule's step, zero_grad. Returns each step's loss."""
    losses = []
    with _probes(model, opt, None, run_dir) as probes:
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            probes.step(loss=loss, labels=ids)
            if schedule is not None:
                schedule.step()
            opt.zero_grad()
    return losses


def fused_adamw_pure_fp16(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab).half()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    before = max_weight(model)
    zero_v = live = 0
    with _probes(model, opt, None, tmp / "run") as probes:
        for step, ids in enumerate(token_batches(world, 4), start=1):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if step == 1:
                for p in model.parameters():
                    v = opt.state[p]["exp_avg_sq"]
                    nz = p.grad != 0
                    zero_v += int(((v == 0) & nz).sum())
                    live += int(nz.sum())
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    after = max_weight(model)
    outcome.read_run(tmp / "run")
    outcome.facts.update(second_moment_zero_fraction=round(zero_v / live, 3), max_weight_before=round(before, 3),
                         max_weight_after=round(after, 3), growth=round(after / before, 1))
    outcome.check("most second moments flushed to zero at step 1", zero_v / live > 0.5)
    outcome.check("the largest weight grew more than 10x in 4 steps, still finite",
                  after > 10 * before and all(finite(p) for p in model.parameters()))
    return outcome


def foreach_adamw_pure_fp16(world: World, tmp: Path) -> Outcome:
    """What `model.half()` + `torch.optim.AdamW(model.parameters())` does: eps=1e-8 is 0 in fp16."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab).half()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    finite_after = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            finite_after.append(all(finite(p) for p in model.parameters()))
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(eps_in_fp16=float(torch.tensor(1e-8, dtype=torch.float16)), weights_finite=finite_after)
    outcome.check("1e-8 is 0 in fp16 and step 1 leaves non-finite weights",
                  outcome.facts["eps_in_fp16"] == 0.0 and finite_after[0] is False)
    return outcome


def user_scaler_module_overflow(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = named_mlp()
    blow_up_backward(model.mid)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    grads_step1 = None
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for step in range(1, 19):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step == 1:
                grads_step1 = {n: finite(p.grad) for n, p in model.named_parameters()}
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(final_scale=scaler.get_scale(), loss=round(float(loss.detach()), 3),
                         finite_grads_step1=sorted(n for n, ok in grads_step1.items() if ok))
    outcome.check("the loss scale fell below 1", scaler.get_scale() < 1)
    outcome.check("out's gradients finite, mid's non-finite", grads_step1["out.weight"]
                  and not grads_step1["mid.weight"])
    outcome.check("the loss is finite", math.isfinite(float(loss.detach())))
    return outcome


def empty_targets_user_loop(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, logits_finite = [], []
    with _probes(model, opt, None, tmp / "run") as probes:
        for step, ids in enumerate(token_batches(world, 3), start=1):
            labels = torch.full_like(ids, -100) if step == 2 else ids
            out = model(input_ids=ids, labels=labels)
            losses.append(float(out.loss.detach()))
            logits_finite.append(finite(out.logits))
            out.loss.backward()
            opt.step()
            probes.step(loss=out.loss, labels=labels)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses], logits_finite=logits_finite)
    outcome.check("step 1's loss finite, step 2's (all labels -100) NaN from finite logits",
                  math.isfinite(losses[0]) and math.isnan(losses[1]) and logits_finite[1])
    return outcome


def prompt_only_micro_batch_kd_loop(world: World, tmp: Path) -> Outcome:
    """A KD loop that calls the student without labels (its logits feed the KD term) and computes the CE itself, two
    micro-batches a step: at step 2 one micro-batch is prompt-only (every label -100 after truncation), its CE mean
    0/0. No model was handed those labels; `F.cross_entropy` was."""
    outcome = Outcome()
    student, teacher = tiny.make_gpt2(world.vocab), kd_teacher(world)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batches, losses, logits_finite = token_batches(world, 6), [], []
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for step in range(1, 4):
            total = 0.0
            for micro in range(2):
                ids = batches[2 * (step - 1) + micro]
                labels = torch.full_like(ids, -100) if (step, micro) == (2, 1) else ids
                logits = student(input_ids=ids).logits
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits
                ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
                loss = (ce + kd_divergence(2.0)(logits, teacher_logits)) / 2
                loss.backward()
                total = total + loss.detach()
                logits_finite.append(finite(logits))
            opt.step()
            losses.append(float(total))
            probes.step(loss=total)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses], logits_finite=all(logits_finite))
    outcome.check("steps 1 and 3 finite, step 2's loss NaN from finite logits",
                  math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2])
                  and all(logits_finite))
    return outcome


def resized_embeddings_initialised_huge(world: World, tmp: Path) -> Outcome:
    """`resize_token_embeddings(+8)` on the tiny GPT-2 (its head tied to the embeddings), the 8 new rows initialised
    at 3e3 × N(0, 1) (within fp16's range), trained in an AMP loop; one batch in four holds a new token. The rows make
    the loss ~3e4 and gradients that overflow fp16 at every scale; the batches with a new token overflow the head's
    float16 logits (NaN loss)."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    model.resize_token_embeddings(world.vocab + 8)
    with torch.no_grad():
        model.transformer.wte.weight[-8:] = 3e3 * torch.randn(8, model.config.n_embd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for step, ids in enumerate(token_batches(world, 16), start=1):
            if step % 4 == 2:
                ids = ids.clone()
                ids[0, 3] = world.vocab + 2  # a new token
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            scaled_update(loss, ids, scaler, opt, probes)
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[f"{v:.4g}" for v in losses], final_scale=scaler.get_scale())
    outcome.check("the new rows fit fp16; the finite losses are above 1e4, those with a new token NaN; every step "
                  "skipped, the scale down to 1", float(model.transformer.wte.weight.abs().max()) < FP16_MAX
                  and all(math.isnan(v) == (step % 4 == 2) for step, v in enumerate(losses, start=1))
                  and min(v for v in losses if math.isfinite(v)) > 1e4 and scaler.get_scale() == 1.0)
    return outcome


def padded_batches(world: World, steps: int, pad: int, batch: int = 4, block: int = 32) -> list[tuple]:
    """(input_ids, attention_mask) per step as a collator pads texts of 8, 14, 20, 26 tokens to `block` on the right."""
    out = []
    for ids in token_batches(world, steps, batch=batch, block=block):
        lengths = torch.arange(batch) * 6 + 8
        mask = (torch.arange(block)[None] < lengths[:, None]).long()
        out.append((ids.masked_fill(mask == 0, pad), mask))
    return out


def padding_kept_as_labels(world: World, tmp: Path) -> Outcome:
    """`labels = input_ids.clone()` over right-padded batches (EOS as the pad, GPT-2 having none), the pads left in:
    every pad position is a target, nearly half of them — the loss falls as the model learns to predict padding."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = padded_batches(world, 4, pad=model.config.eos_token_id)
    losses = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids, mask in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.clone()).loss
            loss.backward()
            opt.step()
            probes.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    outcome.read_run(tmp / "run")
    mask = batches[0][1][:, 1:]
    share = float(((mask == 0).sum(-1) - 1).clamp(min=0).sum() / mask.numel())
    outcome.facts.update(losses=[f"{v:.4g}" for v in losses], padded_target_share_beyond_one_a_row=round(share, 3))
    outcome.check("over a third of the targets are padding beyond one a row; every loss finite",
                  share > 1 / 3 and all(map(math.isfinite, losses)))
    return outcome


def nan_embeds_user_loop(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, weights_finite_before = [], []
    with _probes(model, opt, None, tmp / "run") as probes:
        for step, ids in enumerate(token_batches(world, 3), start=1):
            embeds = model.transformer.wte(ids).detach().clone()
            if step == 2:
                embeds[0, 3] = math.nan  # a corrupted precomputed embedding
            weights_finite_before.append(all(finite(p) for p in model.parameters()))
            loss = model(inputs_embeds=embeds, labels=ids).loss
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses], weights_finite_before=weights_finite_before)
    outcome.check("weights finite until the bad batch, its loss NaN",
                  weights_finite_before[:2] == [True, True] and math.isfinite(losses[0]) and math.isnan(losses[1]))
    return outcome


def pure_bf16_adam_second_moment(world: World, tmp: Path) -> Outcome:
    """`model.to(torch.bfloat16)` under torch's AdamW (default betas): its moments are kept in bfloat16, where
    exp_avg_sq × 0.999 is a change below half an ulp of every value — the second moment never decays. Shown outside
    the tool: one more step on all-zero gradients, which decays every moment of an fp32 state, changes none."""
    outcome = Outcome()
    model = named_mlp().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(1)
    x, y = torch.randn(8, 16).to(torch.bfloat16), torch.randint(0, 4, (8,))
    with _probes(model, opt, None, tmp / "run") as probes:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    before = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = sum(int((opt.state[p]["exp_avg_sq"] != v).sum()) for p, v in zip(model.parameters(), before, strict=True))
    outcome.facts.update(state_dtype=str(before[0].dtype), moments_decayed_by_a_zero_gradient_step=decayed)
    outcome.check("the moments are bfloat16; a step on zero gradients decays none of them",
                  before[0].dtype == torch.bfloat16 and decayed == 0 and any(bool(v.any()) for v in before))
    return outcome


def pure_fp16_grad_overflow(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = named_mlp().half()
    step_no = [0]
    blow_up_backward(model.mid, when=lambda: step_no[0] >= 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    x, y = torch.randn(8, 16).half(), torch.randint(0, 4, (8,))
    grads = {}
    with _probes(model, opt, None, tmp / "run") as probes:
        for step in range(1, 5):
            step_no[0] = step
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            grads[step] = {n: finite(p.grad) for n, p in model.named_parameters()}
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts["nonfinite_grads_step2"] = sorted(n for n, ok in grads[2].items() if not ok)
    outcome.check("step 1 all gradients finite", all(grads[1].values()))
    outcome.check("step 2: out's gradients finite, mid's non-finite", grads[2]["out.weight"]
                  and not grads[2]["mid.weight"])
    return outcome


def kd_teacher(world: World, dtype: torch.dtype = torch.float32, confidence: float = 1.0) -> nn.Module:
    """The KD loops' frozen tiny GPT-2 teacher, in `dtype`; `confidence` scales its final LayerNorm's gain, and so
    its logits: the untrained teacher's logits span ~1, a trained LM's tens."""
    teacher = tiny.make_gpt2(world.vocab, seed=3).eval()
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(confidence)
    return teacher.to(dtype)


def kd_user_loop(world: World, tmp: Path, kd, steps: int, autocast: torch.dtype | None = None,
                 teacher: nn.Module | None = None, init_scale: float | None = None) -> Outcome:
    """A user's KD loop: an fp32 student learns from a frozen tiny GPT-2 teacher (`kd_teacher` unless given)
    through `kd(student_logits, teacher_logits)`, with AdamW and no loss scaler (a GradScaler from `init_scale` when
    given), under `autocast` when given; both models watched. The student's logits reach `kd` as fp32, the teacher's
    as its forward made them."""
    outcome = Outcome()
    student, teacher = tiny.make_gpt2(world.vocab), teacher if teacher is not None else kd_teacher(world)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if init_scale is not None else None
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    losses, zero_grads = [], []
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, scaler=scaler, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, steps, batch=4, block=32):
            with context():
                student_logits = student(input_ids=ids).logits
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits
                loss = kd(student_logits.float(), teacher_logits)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            losses.append(float(loss.detach()))
            zero_grads.append(all(p.grad is None or not p.grad.any() for p in student.parameters()))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[f"{v:.4g}" for v in losses], all_gradients_zero=zero_grads)
    return outcome


def teacher_overflow_under_amp_autocast(world: World, tmp: Path) -> Outcome:
    """The usual AMP KD loop — fp32 student and teacher, both forwards inside one `torch.autocast(float16)`, a
    GradScaler — over a teacher whose block-0 MLP (`c_fc` ×3e5: weights within fp16's range) makes outputs beyond
    65504: finite in the teacher's own fp32, Inf once autocast computes it in float16. Loading the teacher wider
    changes nothing (it is fp32): its forward must leave the autocast."""
    outcome = Outcome()
    teacher, student = kd_teacher(world), tiny.make_gpt2(world.vocab)
    with torch.no_grad():
        teacher.get_submodule(TEACHER_HOT).weight.mul_(3e5)
    ids = token_batches(world, 1)[0]
    beyond = first_beyond_fp16(forward_extremes(teacher, ids))
    with torch.no_grad():
        fp32_finite = finite(teacher(input_ids=ids).logits)
        with torch.autocast("cpu", dtype=torch.float16):
            fp16_finite = finite(teacher(input_ids=ids).logits)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, scaler=scaler, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 3):
            with torch.autocast("cpu", dtype=torch.float16):
                out = student(input_ids=ids, labels=ids)
                with torch.no_grad():
                    target = teacher(input_ids=ids).logits
                loss = out.loss + kd_divergence(2.0)(out.logits.float(), target.float())
            scaled_update(loss, ids, scaler, opt, probes)
    outcome.read_run(tmp / "run")
    outcome.facts.update(first_beyond_fp16=beyond, teacher_weight_amax=round(max_weight(teacher), 1),
                         fp32_forward_finite=fp32_finite, fp16_autocast_forward_finite=fp16_finite)
    outcome.check(f"the teacher's weights fit fp16, {TEACHER_HOT}'s fp32 output does not; its fp32 forward is finite, "
                  "under float16 autocast not", max_weight(teacher) < FP16_MAX and beyond is not None
                  and beyond[0] == TEACHER_HOT and fp32_finite and not fp16_finite)
    return outcome


def kd_divergence(temperature: float, weight: float = 1.0):
    """The usual logit-KD term: weight × T² × KL(teacher ‖ student) at temperature T, per token."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p = nn.functional.log_softmax(student_logits / temperature, -1).flatten(0, 1)
        log_q = nn.functional.log_softmax(teacher_logits / temperature, -1).flatten(0, 1)
        kl = nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        return weight * temperature**2 * kl
    return kd


def kd_of_softmax_log(temperature: float):
    """The KD term as often written by hand: KL(teacher ‖ student) = Σ q·(log q − log p) with q the teacher's
    softmax and its log taken as log(q), in the teacher's own dtype."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p = nn.functional.log_softmax(student_logits / temperature, -1)
        q = nn.functional.softmax(teacher_logits / temperature, -1)
        return (q * (q.log() - log_p)).sum(-1).mean() * temperature**2
    return kd


def kl_div_of_probabilities(world: World, tmp: Path) -> Outcome:
    """`F.kl_div(softmax(student / T), softmax(teacher / T))`: kl_div takes log-probabilities as its input, so the term
    is Σ q·(log q − p) — no divergence: below −H(q), flat however the student learns; nothing non-finite."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        p = nn.functional.softmax(student_logits / 2.0, -1).flatten(0, 1)
        q = nn.functional.softmax(teacher_logits / 2.0, -1).flatten(0, 1)
        return nn.functional.kl_div(p, q, reduction="batchmean") * 4.0
    outcome = kd_user_loop(world, tmp, kd, steps=4)
    losses = [float(v) for v in outcome.facts["losses"]]
    outcome.check("every KD loss is finite and below 0, which no divergence is", all(-math.inf < v < 0 for v in losses))
    return outcome


def kl_div_of_a_probability_log_target(world: World, tmp: Path) -> Outcome:
    """`F.kl_div(log_softmax(student / T), softmax(teacher / T), log_target=True)`: the target is taken as
    log-probabilities, so the term is Σ e^q·(q − log p) — no divergence: about |V|·log |V|, flat however the student
    learns; nothing non-finite."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p = nn.functional.log_softmax(student_logits / 2.0, -1).flatten(0, 1)
        q = nn.functional.softmax(teacher_logits / 2.0, -1).flatten(0, 1)
        return nn.functional.kl_div(log_p, q, log_target=True, reduction="batchmean") * 4.0
    outcome = kd_user_loop(world, tmp, kd, steps=4)
    losses = [float(v) for v in outcome.facts["losses"]]
    outcome.check("every KD loss is finite, above the vocabulary's size and within 0.1% of the first",
                  all(math.isfinite(v) and v > world.vocab for v in losses)
                  and max(losses) - min(losses) < 1e-3 * losses[0])
    return outcome


def kl_div_at_its_default_reduction(world: World, tmp: Path) -> Outcome:
    """T²·`F.kl_div(log_softmax(student / T), log_softmax(teacher / T), log_target=True)` at kl_div's default
    `reduction="mean"`: the mean over every element, the KL per token ÷ the vocabulary — a KD term in name only."""
    per_token = []

    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p = nn.functional.log_softmax(student_logits / 2.0, -1).flatten(0, 1)
        log_q = nn.functional.log_softmax(teacher_logits / 2.0, -1).flatten(0, 1)
        per_token.append(float(nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")))
        return nn.functional.kl_div(log_p, log_q, log_target=True) * 4.0
    outcome = kd_user_loop(world, tmp, kd, steps=3)
    losses = [float(v) for v in outcome.facts["losses"]]
    outcome.facts["kl_per_token"] = [f"{v:.4g}" for v in per_token]
    outcome.check("the KD term is the KL per token × T² ÷ the vocabulary", all(
        math.isclose(v, 4.0 * kl / world.vocab, rel_tol=1e-3) for v, kl in zip(losses, per_token, strict=True)))
    return outcome


def kd_term_with_its_logs_swapped(world: World, tmp: Path) -> Outcome:
    """CE + a hand-written KD term whose logs are swapped, Σ q·(log p − log q) = −KL(teacher ‖ student), handed to
    `probes.step(terms=...)` by name: the total stays positive and falls as a loss should, every value finite, while
    minimising −KL drives the student away from its teacher."""
    outcome = Outcome()
    student, teacher = tiny.make_gpt2(world.vocab), kd_teacher(world)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    totals, kds = [], []
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 6):
            out = student(input_ids=ids, labels=ids)
            with torch.no_grad():
                log_q = nn.functional.log_softmax(teacher(input_ids=ids).logits / 2.0, -1)
            log_p = nn.functional.log_softmax(out.logits / 2.0, -1)
            kd = (log_q.exp() * (log_p - log_q)).sum(-1).mean() * 4.0  # meant: (log_q - log_p)
            loss = out.loss + kd
            loss.backward()
            opt.step()
            totals.append(float(loss.detach()))
            kds.append(float(kd.detach()))
            probes.step(loss=loss, terms={"kd": kd, "ce": out.loss})
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in totals], kd=[f"{v:.4g}" for v in kds])
    outcome.check("the total is positive and falls, every value finite", all(map(math.isfinite, totals + kds))
                  and min(totals) > 0 and totals[-1] < totals[0])
    outcome.check("the KD term is below 0 on every step and falls: the KL to the teacher grows",
                  max(kds) < 0 and kds[-1] < kds[0])
    return outcome


def annealed_temperature_kd(world: World, tmp: Path) -> Outcome:
    """The KD temperature annealed linearly from 2 to 0 over 3 steps (`T = 2 · (1 − (step − 1) / 3)`): at step 4 —
    no statistics step — T is 0 and the KL is NaN; the optimizer's pre-step hook sees NaN gradients and the probes
    replay the step's forwards with statistics on: every output finite, so the loss's own arithmetic made it."""
    temperatures = []

    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        temperatures.append(2.0 * (1 - len(temperatures) / 3))
        return kd_divergence(temperatures[-1])(student_logits, teacher_logits)
    outcome = kd_user_loop(world, tmp, kd, steps=5)
    losses = [float(v) for v in outcome.facts["losses"]]
    outcome.facts["temperatures"] = [round(t, 3) for t in temperatures]
    outcome.check("finite losses on steps 1-3, NaN from step 4, where T is 0",
                  all(map(math.isfinite, losses[:3])) and math.isnan(losses[3]) and temperatures[3] == 0.0)
    return outcome


def tiny_temperature_under_fp16_autocast(world: World, tmp: Path) -> Outcome:
    """KD at T = 1e-3 under float16 autocast + GradScaler, the teacher confident (logits in the hundreds, as a trained
    LM's reach): its logits are finite float16, and divided by T in float16 they pass 65504 — Inf, the softmax NaN —
    though the loss ends in float32."""
    teacher = kd_teacher(world, confidence=1000.0)
    outcome = kd_user_loop(world, tmp, kd_divergence(1e-3), steps=2, autocast=torch.float16, teacher=teacher,
                           init_scale=2.0**16)
    ids = token_batches(world, 1, batch=4, block=32)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        logits = teacher(input_ids=ids).logits
    outcome.facts["teacher_logit_amax"] = round(float(logits.abs().max()), 1)
    outcome.check("the teacher's float16 logits are finite, divided by T = 1e-3 in float16 they are not; the loss is "
                  "NaN from step 1", finite(logits) and not finite(logits / 1e-3)
                  and math.isnan(float(outcome.facts["losses"][0])))
    return outcome


def tiny_temperature_under_bf16_autocast(world: World, tmp: Path) -> Outcome:
    """KD at T = 1e-3 under bfloat16 autocast, the teacher's logits spanning tens (a trained LM's): bfloat16's range
    holds logits / T, so nothing is non-finite — but the teacher's softmax at T is one-hot on almost every token and
    the KD gradient T× its size at T = 1: the term teaches the teacher's argmax alone while its loss reads ~1e-4."""
    teacher = kd_teacher(world, confidence=30.0)
    outcome = kd_user_loop(world, tmp, kd_divergence(1e-3), steps=3, autocast=torch.bfloat16, teacher=teacher)
    ids = token_batches(world, 1, batch=4, block=32)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher(input_ids=ids).logits.float()
    one_hot = {t: float((nn.functional.softmax(logits / t, -1).amax(-1) > 1 - 1e-6).float().mean())
               for t in (1e-3, 2.0)}
    outcome.facts.update(one_hot_rows_at_t=one_hot)
    outcome.check("every loss finite; the teacher's softmax one-hot on ≥ 90% of the tokens at T = 1e-3, none at T = 2",
                  all(math.isfinite(float(v)) for v in outcome.facts["losses"]) and one_hot[1e-3] >= 0.9
                  and one_hot[2.0] == 0)
    return outcome


def fp16_teacher_log_softmax(world: World, tmp: Path) -> Outcome:
    """A confident teacher (logits spanning ~30, as a trained LM's do) held in fp16: softmax(logits) in fp16 is 0
    wherever a logit is ~17 below its row's largest (e^-17 is below fp16's smallest subnormal), and log(0) = -inf."""
    teacher = kd_teacher(world, torch.float16, confidence=30.0)
    outcome = kd_user_loop(world, tmp, kd_of_softmax_log(1.0), steps=2, teacher=teacher)
    ids = token_batches(world, 1, batch=4, block=32)[0]
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    q16, q32 = nn.functional.softmax(logits, -1), nn.functional.softmax(logits.float(), -1)
    outcome.facts.update(teacher_logit_spread=round(float((logits.max(-1).values - logits.min(-1).values).max()), 2),
                         fp16_probs_zero=int((q16 == 0).sum()), fp32_probs_zero=int((q32 == 0).sum()))
    outcome.check("the fp16 teacher's logits are finite; its fp16 softmax has zeros (log: -inf), fp32's none",
                  finite(logits) and (q16 == 0).any() and not (q32 == 0).any())
    outcome.check("the loss is NaN from step 1", math.isnan(float(outcome.facts["losses"][0])))
    return outcome


def fp16_autocast_kd_without_scaler(world: World, tmp: Path) -> Outcome:
    outcome = kd_user_loop(world, tmp, kd_divergence(2.0, weight=1e-4), steps=4, autocast=torch.float16)
    outcome.check("every gradient of the student is exactly zero on every step",
                  all(outcome.facts["all_gradients_zero"]))
    return outcome


def fp16_autocast_kd_with_a_scaler_at_1(world: World, tmp: Path) -> Outcome:
    outcome = kd_user_loop(world, tmp, kd_divergence(2.0, weight=1e-4), steps=4, autocast=torch.float16,
                           init_scale=1.0)
    outcome.check("every gradient of the student is exactly zero on every step, a GradScaler running",
                  all(outcome.facts["all_gradients_zero"]))
    return outcome


def zero_temperature_kd(world: World, tmp: Path) -> Outcome:
    outcome = kd_user_loop(world, tmp, kd_divergence(0.0), steps=2)
    losses = [float(v) for v in outcome.facts["losses"]]
    outcome.check("the loss is NaN from step 1", math.isnan(losses[0]))
    return outcome


def amp_loop_with_overflowing_batches(world: World, tmp: Path, steps: int, overflows: Callable[[int], bool],
                                      outcome: Outcome, stops_on_nonfinite: bool = False) -> list[float]:
    """An AMP loop (GradScaler from 2**8) over the tiny GPT-2 whose `h.1.mlp.c_fc` output is ×1e6 on the steps
    `overflows` picks (batches whose activations leave fp16's range); returns the losses, the facts in `outcome`.
    `stops_on_nonfinite`: the loop raises on a non-finite loss before its backward (`if not torch.isfinite(loss):
    raise`), as many loops guard themselves."""
    model = tiny.make_gpt2(world.vocab)
    outlier = [False]
    model.transformer.h[1].mlp.c_fc.register_forward_hook(lambda _m, _i, out: out * 1e6 if outlier[0] else out)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = []
    with contextlib.suppress(FloatingPointError), _probes(model, opt, scaler, tmp / "run") as probes:
        for step, ids in enumerate(token_batches(world, steps), start=1):
            outlier[0] = overflows(step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss
            if stops_on_nonfinite and not torch.isfinite(loss):
                losses.append(float(loss.detach()))
                raise FloatingPointError(f"non-finite loss at step {step}")
            losses.append(float(loss.detach()))
            scaled_update(loss, ids, scaler, opt, probes)
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses], final_scale=scaler.get_scale(),
                         weights_finite=all(bool(p.isfinite().all()) for p in model.parameters()))
    return losses


def sporadic_fp16_overflow_amp_loop(world: World, tmp: Path) -> Outcome:
    """One outlier batch: at step 5 (between statistics steps) an MLP's output is ×1e6 for that batch only."""
    outcome = Outcome()
    losses = amp_loop_with_overflowing_batches(world, tmp, 8, lambda step: step == 5, outcome)
    outcome.check("the loss is non-finite at step 5 only; the weights stay finite",
                  [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)] == [5]
                  and outcome.facts["weights_finite"])
    return outcome


def amp_loop_stopping_on_a_nonfinite_loss(world: World, tmp: Path) -> Outcome:
    """The same outlier batch at step 5, in a loop that raises on a non-finite loss before its backward: the run ends
    there, with no update and no `probes.step()` — the probes record the step as far as it got, its forward replayed."""
    outcome = Outcome()
    losses = amp_loop_with_overflowing_batches(world, tmp, 8, lambda step: step == 5, outcome, stops_on_nonfinite=True)
    outcome.check("the loop stopped at step 5 on its non-finite loss; the weights stay finite",
                  len(losses) == 5 and not math.isfinite(losses[-1]) and all(map(math.isfinite, losses[:4]))
                  and outcome.facts["weights_finite"])
    return outcome


def fp16_overflow_from_step_4_amp_loop(world: World, tmp: Path) -> Outcome:
    """From step 4 on every batch overflows the MLP: the scaler skips each step; step 4 (no statistics step) closes
    with a NaN loss and no update, so the probes replay its forwards and name the module there."""
    outcome = Outcome()
    losses = amp_loop_with_overflowing_batches(world, tmp, 12, lambda step: step >= 4, outcome)
    outcome.check("the loss is non-finite from step 4 on, the scale fell below 1, the weights stay finite",
                  [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)] == list(range(4, 13))
                  and outcome.facts["final_scale"] < 1 and outcome.facts["weights_finite"])
    return outcome


def fp16_loss_summed_over_tokens_user_loop(world: World, tmp: Path) -> Outcome:
    """`model.half()` and a cross-entropy summed over the batch's ~15,000 tokens (`reduction="sum"`): ~5.5 each, the
    sum leaves float16's 65504 — Inf at step 1, while its gradient (the sum's, finite) is thousands of times a
    mean's, so SGD at 1e-4 soon takes a step as large as the weights."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    losses = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 4, batch=128, block=120):
            logits = model(input_ids=ids).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=losses, loss_dtype=str(loss.dtype), tokens=int(ids[:, 1:].numel()))
    outcome.check("the float16 sum is Inf at step 1; each token's loss (sum / tokens) is an ordinary ~5",
                  losses[0] == math.inf and any(3 < v / outcome.facts["tokens"] < 8 for v in losses
                                                if math.isfinite(v)))
    return outcome


def fp32_divergence_user_loop(world: World, tmp: Path) -> Outcome:
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    losses = plain_user_loop(model, opt, token_batches(world, 6), tmp / "run")
    outcome.read_run(tmp / "run")
    above = next((i + 1 for i, v in enumerate(losses) if v > 3 * losses[0]), None)
    outcome.facts.update(losses=[round(v, 2) for v in losses], first_step_above_3x=above)
    outcome.check("the loss exceeds 3x its first value and stays finite",
                  above is not None and all(map(math.isfinite, losses)))
    return outcome


def tiny_lr_fp32_user_loop(world: World, tmp: Path) -> Outcome:
    """fp32 weights, an lr far too small for them: AdamW moves every weight by ~lr = 1e-10, below half an fp32 ulp
    of any weight above ~2e-3 — lost in fp32, the widest dtype training uses: no precision change can help."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-10)
    plain_user_loop(model, opt, token_batches(world, 3), tmp / "run")
    outcome.read_run(tmp / "run")
    same = sum(int((before[n] == p).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    outcome.facts.update(unchanged_weight_fraction=round(same / total, 3),
                         dtypes=sorted({str(p.dtype) for p in model.parameters()}))
    outcome.check("fp32 weights, most unchanged after 3 steps", outcome.facts["dtypes"] == ["torch.float32"]
                  and same / total > 0.5)
    return outcome


def padded_batch(world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 8 tokens and the mask of the positions to keep: the second sequence is padding only."""
    ids = token_batches(world, 1, batch=2, block=8)[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1] = False
    return ids, keep


def fully_masked_row_user_loop(world: World, tmp: Path) -> Outcome:
    """A hand-written attention (`tiny.MaskedAttention`) whose masked softmax is its own code: a batch with one
    sequence that is all padding masks every key of its rows, and softmax over -inf alone is 0/0 — in fp32, from
    values of order 1, with no overflow anywhere."""
    outcome = Outcome()
    model = tiny.MaskedAttentionNet(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, keep = padded_batch(world)
    with torch.no_grad():  # outside the tool: where the first NaN is, and how large the values before it are
        x = model.embed(ids)
        scores = model.attn.q(x) @ model.attn.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        weights = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
    with _probes(model, opt, None, tmp / "run") as probes:
        logits = model(ids, keep)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        probes.step(loss=loss)
    outcome.read_run(tmp / "run")
    outcome.facts.update(largest_score=round(float(scores.abs().max()), 3), loss=float(loss.detach()),
                         nan_rows=int(weights.isnan().any(-1).sum()))
    outcome.check("fp32 scores of order 1, finite; the softmax NaN exactly on the padded sequence's rows",
                  finite(scores) and float(scores.abs().max()) < 100 and weights[1].isnan().all()
                  and finite(weights[0]))
    outcome.check("the loss is NaN", math.isnan(float(loss.detach())))
    return outcome



def teacher_fully_masked_row_kd(world: World, tmp: Path) -> Outcome:
    """KD from an fp32 teacher whose hand-written attention masks the padding (`tiny.MaskedAttentionNet`): a batch
    with one sequence that is all padding leaves the teacher's rows nothing to attend to, and its softmax over -inf
    alone is 0/0 — NaN from values of order 1. The student attends to every position. Only the teacher's forward is
    at fault, and no dtype is: its fix is the mask."""
    from sarkd_diag import Probes

    outcome = Outcome()
    student, teacher = tiny.MaskedAttentionNet(world.vocab), tiny.MaskedAttentionNet(world.vocab, seed=3)
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ids, keep = padded_batch(world)
    with torch.no_grad():  # outside the tool: the teacher's NaN rows, and how large its scores are
        x = teacher.embed(ids)
        scores = teacher.attn.q(x) @ teacher.attn.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        target = teacher(ids, keep)
    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        with torch.no_grad():
            teacher_logits = teacher(ids, keep)
        logits = student(ids, torch.ones_like(keep))
        loss = nn.functional.kl_div(logits.log_softmax(-1).flatten(0, 1), teacher_logits.log_softmax(-1).flatten(0, 1),
                                    log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        probes.step(loss=loss)
    outcome.read_run(tmp / "run")
    outcome.facts.update(largest_score=round(float(scores.abs().max()), 3), loss=float(loss.detach()))
    outcome.check("the teacher's scores are of order 1 and its logits NaN on the padded sequence alone",
                  float(scores.abs().max()) < 100 and target[1].isnan().all() and finite(target[0]))
    outcome.check("the loss is NaN", math.isnan(float(loss.detach())))
    return outcome


def head_at_an_lr_of_its_own(world: World, tmp: Path) -> Outcome:
    """The untied head trained at an lr of its own (`{"params": head, "lr": 50}`: a typo for 5e-4) beside the body's
    1e-4, SGD: the first step moves the head ten times its own size and the loss climbs. A row's lr is the first
    group's, the body's — the fix must name the head's."""
    outcome = Outcome()
    model = tiny_gpt2_untied(world.vocab)
    head = list(model.lm_head.parameters())
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    opt = torch.optim.SGD([{"params": body, "lr": 1e-4}, {"params": head, "lr": 50.0}])
    before = model.lm_head.weight.detach().clone()
    losses = plain_user_loop(model, opt, token_batches(world, 4), tmp / "run")
    outcome.read_run(tmp / "run")
    moved = float((model.lm_head.weight.detach() - before).norm() / before.norm())
    outcome.facts.update(losses=[round(v, 3) for v in losses], head_moved=round(moved, 3))
    outcome.check("the head moved by more than its own size and the loss climbed", moved > 1
                  and losses[-1] > 3 * losses[0])
    return outcome

def fully_masked_row_amp_loop(world: World, tmp: Path) -> Outcome:
    """The same attention and padding-only sequence under float16 autocast and a GradScaler: the softmax over -inf
    alone is 0/0 in float16 as in fp32, every step — no float16 range is at fault, so no precision helps."""
    outcome = Outcome()
    model = tiny.MaskedAttentionNet(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids, keep = padded_batch(world)
    losses = []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(ids, keep)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
            probes.step(loss=loss)
            opt.zero_grad()
    with torch.no_grad():  # outside the tool: the same softmax in fp32
        x = model.embed(ids)
        scores = model.attn.q(x) @ model.attn.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        weights = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=losses, largest_score=round(float(scores.abs().max()), 3))
    outcome.check("every loss NaN; in fp32 the padded rows' softmax is NaN too, from scores of order 1",
                  all(math.isnan(v) for v in losses) and weights[1].isnan().all() and finite(scores)
                  and float(scores.abs().max()) < 100)
    return outcome


def fully_masked_row_half_loop(world: World, tmp: Path) -> Outcome:
    """The same attention and padding-only sequence with float16 weights (`.half()`), SGD and no loss scaler: the
    softmax over -inf alone is 0/0 in float16 as in fp32, and the first update makes every weight NaN — no later
    forward is left to run the attention again on finite weights."""
    outcome = Outcome()
    model = tiny.MaskedAttentionNet(world.vocab).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids, keep = padded_batch(world)
    losses = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for _ in range(2):
            logits = model(ids, keep)
            loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=losses, weights_finite_after=all(finite(p) for p in model.parameters()))
    outcome.check("every loss NaN, and the weights NaN after the first step",
                  all(math.isnan(v) for v in losses) and not outcome.facts["weights_finite_after"])
    return outcome


class AdditiveMaskAttention(tiny.MaskedAttention):
    """The masked softmax with the mask added as `(1 - keep) * -1e9`, as much code written for fp32 does: in fp32 a
    row whose every key is masked is uniform (every score -1e9); in float16 -1e9 is -inf, and that row is 0/0."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        mask = (1 - keep[:, None, :].to(scores.dtype)) * -1e9
        return self.proj((scores + mask).softmax(-1) @ self.v(x))


def mask_fill_beyond_fp16_user_loop(world: World, tmp: Path) -> Outcome:
    """`tiny.MaskedAttentionNet` with `AdditiveMaskAttention`, trained in fp16 weights (`.half()`, SGD) on a batch
    whose second sequence is all padding: finite in fp32, NaN in float16 from scores of order 1."""
    outcome = Outcome()
    model = tiny.MaskedAttentionNet(world.vocab)
    model.attn = AdditiveMaskAttention(model.attn.q.in_features)
    ids = token_batches(world, 1, batch=2, block=8)[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1] = False
    with torch.no_grad():
        fp32_ok = finite(model(ids, keep))
    model.half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with _probes(model, opt, None, tmp / "run") as probes:
        logits = model(ids, keep)
        loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        probes.step(loss=loss)
    outcome.read_run(tmp / "run")
    fill = float(torch.tensor(-1e9).half())
    outcome.facts.update(fill_in_fp16=fill, fp32_finite=fp32_ok, nan_rows=int(logits.isnan().any(-1).sum()))
    outcome.check("-1e9 is -inf in fp16; the model is finite in fp32, NaN on the padded sequence alone in fp16",
                  fill == -math.inf and fp32_ok and logits[1].isnan().all() and finite(logits[0]))
    return outcome


def schedule_past_its_end_user_loop(world: World, tmp: Path) -> Outcome:
    """A decay schedule sized for 2 steps, run for 5: sqrt(1 − step/2) computed with tensors is NaN past its end
    (no error), so step 4's learning rate is NaN while the gradients are finite."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(torch.tensor(1.0 - s / 2).sqrt()))
    grads_finite, weights_finite = [], []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads_finite.append(all(finite(p.grad) for p in model.parameters() if p.grad is not None))
            opt.step()
            weights_finite.append(all(finite(p) for p in model.parameters()))
            probes.step(loss=loss, labels=ids)
            schedule.step()
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    lrs = [json.loads(line).get("lr") for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    outcome.facts.update(lr=lrs, gradients_finite=grads_finite, weights_finite=weights_finite)
    outcome.check("finite gradients through step 4, weights NaN first after step 4",
                  all(grads_finite[:4]) and weights_finite[:4] == [True, True, True, False])
    outcome.check("metrics.jsonl keeps step 4's lr as NaN", lrs[3] is not None and math.isnan(lrs[3]))
    return outcome


def linear_decay_past_its_end_user_loop(world: World, tmp: Path) -> Outcome:
    """A linear decay `1 - step / 3` sized for 3 steps (a total computed for one epoch) run for 8: from step 5 the
    lr is negative — no error, every value finite — and the optimizer climbs the loss."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 3)
    lrs = []  # the lr each optimizer step used: read right after it, before the schedule's step
    losses = plain_user_loop(model, opt, token_batches(world, 8), tmp / "run", schedule=schedule,
                             after_step=lambda: lrs.append(opt.param_groups[0]["lr"]))
    outcome.read_run(tmp / "run")
    outcome.facts.update(lr=[round(v, 5) for v in lrs], losses=[round(v, 3) for v in losses])
    outcome.check("lr below 0 from step 5; the loss fell until then and rose after, every loss finite",
                  min(lrs[:4]) >= 0 and max(lrs[4:]) < 0 and all(map(math.isfinite, losses))
                  and losses[4] < losses[0] and losses[-1] > losses[4])
    return outcome


def checkpoint_beyond_fp16_half_user_loop(world: World, tmp: Path) -> Outcome:
    """The same checkpoint loaded and trained in fp16 (`model.half()`, SGD): the cast makes the weight +Inf before any
    step; the first step turns it (and the rest of the tensor) NaN."""
    outcome = Outcome()
    model, _ = checkpoint_beyond_fp16(world, tmp)
    model.half()
    weight = model.get_parameter(STUDENT_HOT + ".weight")
    at_load = (int(weight.isnan().sum()), int((weight == math.inf).sum()))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = plain_user_loop(model, opt, token_batches(world, 2), tmp / "run")
    outcome.read_run(tmp / "run")
    outcome.facts.update(nan_and_inf_at_load=at_load, nan_after=int(weight.isnan().sum()), losses=losses)
    outcome.check("one +Inf and no NaN as loaded, NaN after the first step", at_load == (0, 1)
                  and outcome.facts["nan_after"] > 0)
    return outcome


def no_gradient_user_loop(bug: str):
    """fp32 GPT-2, AdamW: from step 2 on the weights get no gradient — `zero_grad()` between backward and step
    ("cleared"), or the logits detached with the loss's `requires_grad_()` silencing backward's error ("detached")."""
    def run(world: World, tmp: Path) -> Outcome:
        outcome = Outcome()
        model = tiny.make_gpt2(world.vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        before, reached = {}, []
        with _probes(model, opt, None, tmp / "run") as probes:
            for step, ids in enumerate(token_batches(world, 10), start=1):
                logits = model(input_ids=ids).logits
                if bug == "detached" and step > 1:
                    logits = logits.detach()
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                if not loss.requires_grad:
                    loss.requires_grad_(True)
                loss.backward()
                if bug == "cleared" and step > 1:
                    opt.zero_grad()
                reached.append(any(p.grad is not None and bool(p.grad.any()) for p in model.parameters()))
                if step == 2:
                    before = {n: p.detach().clone() for n, p in model.named_parameters()}
                opt.step()
                probes.step(loss=loss, labels=ids)
                opt.zero_grad()
        outcome.read_run(tmp / "run")
        moved = sum(int((before[n] != p).sum()) for n, p in model.named_parameters())
        outcome.facts.update(gradient_reached=reached, weights_changed_after_step_1=moved)
        outcome.check("a gradient at step 1 only; no weight changed from step 2 on",
                      reached == [True] + [False] * 9 and moved == 0)
        return outcome
    return run


def dropout_of_one_user_loop(world: World, tmp: Path) -> Outcome:
    """A GPT-2 student configured with `embd_pdrop=1.0` and `resid_pdrop=1.0` (a keep-probability typed where the
    drop probability belongs): past the embeddings' dropout every activation is 0, the logits are constant, and no
    gradient but the final norm's bias reaches the weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    outcome = Outcome()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=world.vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       embd_pdrop=1.0, resid_pdrop=1.0, attn_pdrop=0.0))
    losses = plain_user_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), token_batches(world, 4),
                             tmp / "run")
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 4) for v in losses])
    outcome.check("the loss stays at its first value (to 1e-3)", max(losses) - min(losses) < 1e-3)
    return outcome


def infinite_teacher_weight_bf16_loop(world: World, tmp: Path) -> Outcome:
    """A KD loop under bf16 autocast over a teacher whose float32 checkpoint holds one +Inf weight in
    `TEACHER_HOT` (no NaN, no float16 anywhere): its logits are NaN from step 1."""
    teacher = kd_teacher(world)
    with torch.no_grad():
        teacher.get_submodule(TEACHER_HOT).weight[3, 5] = math.inf
    outcome = kd_user_loop(world, tmp, kd_divergence(2.0), steps=3, autocast=torch.bfloat16, teacher=teacher)
    outcome.check("the teacher's weights are float32 with one +Inf; every loss is NaN",
                  {p.dtype for p in teacher.parameters()} == {torch.float32}
                  and all(math.isnan(float(v)) for v in outcome.facts["losses"]))
    return outcome


def momentum_buffer_overflow_half_loop(world: World, tmp: Path) -> Outcome:
    """`model.half()` and SGD with momentum 0.999 at lr 1e-7, the loss summed with a weight of 2e4: every gradient
    stays finite in float16 (~1e4), and the float16 momentum buffer sums them past 65504 within ten steps — Inf, and
    the weight with it."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.999)
    grads_finite, buffers = [], []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 12):
            loss = model(input_ids=ids, labels=ids).loss
            (loss * 2e4).backward()
            grads_finite.append(all(finite(p.grad) for p in model.parameters()))
            opt.step()
            buffers.append(max(float(opt.state[p]["momentum_buffer"].float().abs().max()) for p in model.parameters()))
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    first_inf = next((i for i, b in enumerate(buffers, start=1) if not math.isfinite(b)), None)
    outcome.facts.update(buffer_amax=buffers, first_nonfinite_buffer_step=first_inf)
    outcome.check("the gradients were finite up to the step the momentum buffer turned non-finite",
                  first_inf is not None and all(grads_finite[:first_inf]))
    return outcome


def clean_amp_user_loop(world: World, tmp: Path) -> Outcome:
    return _clean_user_loop(world, tmp, torch.float16, scaled=True)


def clean_bf16_user_loop(world: World, tmp: Path) -> Outcome:
    return _clean_user_loop(world, tmp, torch.bfloat16, scaled=False)


def _clean_user_loop(world: World, tmp: Path, dtype: torch.dtype, scaled: bool) -> Outcome:
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    losses = []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for ids in token_batches(world, 6):
            with torch.autocast("cpu", dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts["losses"] = [round(v, 3) for v in losses]
    if scaler is not None:
        outcome.facts["final_scale"] = scaler.get_scale()
    outcome.check("finite losses, falling", all(map(math.isfinite, losses)) and losses[-1] < losses[0])
    return outcome


# ------------------------------------------------------------------------------------------ more pathologies
def corrupted_teacher_checkpoint(world: World, tmp: Path) -> Outcome:
    """A teacher checkpoint with one NaN weight (a torn write): its fp32 forward is NaN from that module on, every
    step — nothing overflows; the checkpoint is bad."""
    from safetensors.torch import load_file

    model = tiny.make_gpt2(world.vocab, seed=3)
    with torch.no_grad():
        model.get_parameter(TEACHER_HOT + ".weight")[3, 5] = math.nan
    teacher = tiny.save(model, world.tokenizer, tmp / "corrupt_teacher")
    saved = load_file(str(teacher / "model.safetensors"))
    extremes = dict(forward_extremes(model, token_batches(world, 1)[0]))
    outcome, run = run_cli(world, tmp, "--precision", "fp32", steps=3, teacher=teacher)
    outcome.facts.update(nan_in_checkpoint=int(sum(int(t.isnan().sum()) for t in saved.values())),
                         teacher_c_fc_output=extremes.get(TEACHER_HOT))
    outcome.check("the saved teacher holds one NaN; its fp32 forward is NaN at that module",
                  outcome.facts["nan_in_checkpoint"] == 1 and math.isnan(extremes[TEACHER_HOT]))
    outcome.check("the run stopped at step 1", outcome.exit_code == 1 and run["summary"].get("steps_completed") == 1)
    return outcome


def nan_embedding_row_user_loop(world: World, tmp: Path) -> Outcome:
    """A student checkpoint whose embedding row of a token the corpus never uses is NaN: harmless until a batch holds
    that token (step 3 here, between statistics steps), then the loss is NaN."""
    outcome = Outcome()
    model = tiny.make_gpt2_untied(world.vocab)
    batches = token_batches(world, 4)
    used = set(torch.cat(batches).unique().tolist())
    rare = max(set(range(world.vocab)) - used)
    with torch.no_grad():
        model.transformer.wte.weight[rare] = math.nan
    batches[2][0, 5] = rare  # one rare token in step 3's batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = plain_user_loop(model, opt, batches, tmp / "run")
    outcome.read_run(tmp / "run")
    outcome.facts.update(rare_token=rare, losses=[round(v, 3) for v in losses])
    outcome.check("the loss is finite until the batch holding the token, NaN from step 3",
                  all(map(math.isfinite, losses[:2])) and math.isnan(losses[2]))
    return outcome


def rmse_feature_kd_user_loop(world: World, tmp: Path, whole_copy: bool = False, clip_raises: bool = False) -> Outcome:
    """Feature distillation with an RMSE, `sqrt(mse(student_hidden, teacher_hidden))`, the student initialised from
    the teacher's embeddings and first block (as DistilBERT's are), the distance taken after block 0: at step 1 those
    hidden states are equal, the mse exactly 0 — and d√x/dx at 0 is inf, times the difference's 0: NaN gradients from
    a finite loss. `whole_copy`: the student is the teacher's whole copy and the distance is taken on the last hidden
    states, so every gradient of step 1 is NaN and none was ever measured finite. `clip_raises`: the loop clips with
    `clip_grad_norm_(..., error_if_nonfinite=True)`, which raises on step 1's NaN before the optimizer step."""
    outcome = Outcome()
    teacher = tiny.make_gpt2(world.vocab, seed=3).eval()
    student = tiny.make_gpt2(world.vocab)
    copied = ("transformer.",) if whole_copy else ("transformer.wte", "transformer.wpe", "transformer.h.0.")
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if k.startswith(copied)}, strict=False)
    layer = -1 if whole_copy else 1
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses, mse, bad_grads, raised = [], [], [], None
    from sarkd_diag import Probes

    with contextlib.suppress(RuntimeError), \
            Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 2):
            out = student(input_ids=ids, labels=ids, output_hidden_states=True)
            with torch.no_grad():
                hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            distance = nn.functional.mse_loss(out.hidden_states[layer], hidden)
            loss = out.loss + distance.sqrt()
            losses.append(float(loss.detach()))
            mse.append(float(distance.detach()))
            loss.backward()
            bad_grads.append(sum(1 for p in student.parameters() if p.grad is not None and not finite(p.grad)))
            if clip_raises:
                raised = len(losses)  # until clipping returns
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, error_if_nonfinite=True)
                raised = None
            opt.step()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses], mse_step1=mse[0], nonfinite_grad_tensors=bad_grads,
                         clipping_raised_at_step=raised)
    outcome.check("step 1: the distance is exactly 0, the loss finite, gradients NaN",
                  mse[0] == 0.0 and math.isfinite(losses[0]) and bad_grads[0] > 0)
    if clip_raises:
        outcome.check("the clipping raised at step 1, before the optimizer step", raised == 1)
    return outcome


def weight_decay_typo_user_loop(world: World, tmp: Path) -> Outcome:
    """AdamW(lr=1e-3, weight_decay=1e2) — meant 1e-2: every step multiplies each weight by 1 − lr × wd = 0.9."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e2)
    amax = [max_weight(model)]
    plain_user_loop(model, opt, token_batches(world, 10), tmp / "run",
                    after_step=lambda: amax.append(max_weight(model)))
    outcome.read_run(tmp / "run")
    outcome.facts["max_weight"] = [round(v, 3) for v in amax]
    outcome.check("the largest weight fell below half its initial value in 10 steps, every weight finite",
                  amax[-1] < amax[0] / 2 and all(finite(p) for p in model.parameters()))
    return outcome


def zero_step_schedule_user_loop(world: World, tmp: Path) -> Outcome:
    """`get_linear_schedule_with_warmup(opt, 0, num_training_steps=0)` — a step count computed from an empty
    loader: the schedule's lr is 0 at every step."""
    from transformers import get_linear_schedule_with_warmup

    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=0)
    lrs = []  # the lr each optimizer step used: read right after it, before the schedule's step
    plain_user_loop(model, opt, token_batches(world, 4), tmp / "run", schedule=schedule,
                    after_step=lambda: lrs.append(opt.param_groups[0]["lr"]))
    outcome.read_run(tmp / "run")
    moved = sum(int((before[n] != p).sum()) for n, p in model.named_parameters())
    outcome.facts.update(lr=lrs, weights_changed=moved)
    outcome.check("lr 0 at every step; not one weight changed", lrs == [0.0] * 4 and moved == 0)
    return outcome


def warmup_to_mistyped_peak_user_loop(world: World, tmp: Path) -> Outcome:
    """AdamW(lr=1.0) — meant 1e-4 — under a 10-step linear warm-up: step 1's lr is 0, step 2's 0.1 already moves
    the weights by more than their size."""
    from transformers import get_linear_schedule_with_warmup

    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    ratios, lrs, losses = [], [], []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 6):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            before = [p.detach().clone() for p in matrices]
            opt.step()
            delta = math.sqrt(sum(float((p - b).pow(2).sum()) for p, b in zip(matrices, before, strict=True)))
            ratios.append(delta / math.sqrt(sum(float(b.pow(2).sum()) for b in before)))
            probes.step(loss=loss, labels=ids)
            schedule.step()
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(lr=[round(v, 2) for v in lrs], update_ratio=[round(v, 3) for v in ratios],
                         losses=[round(v, 2) for v in losses])
    outcome.check("step 2 (lr 0.1, a tenth of the peak) moves the weight matrices by more than their size",
                  lrs[1] == 0.1 and ratios[1] > 1 and max(ratios[:1]) < 1)
    return outcome


def fp16_attention_scores_overflow(world: World, tmp: Path) -> Outcome:
    """Autocast fp16 + GradScaler, eager attention; block 1's query and key projections ×700 (large q/k norms): every
    q, k fits fp16 (c_attn's output ~270), their dot products do not."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    model.config._attn_implementation = "eager"
    attn = model.transformer.h[1].attn
    with torch.no_grad():
        attn.c_attn.weight[:, :2 * attn.embed_dim].mul_(700.0)  # the query and key columns
    ids = token_batches(world, 1)[0]
    qkv = {}
    handle = attn.c_attn.register_forward_hook(lambda _m, _i, out: qkv.setdefault("out", out.detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    q, k, _ = qkv["out"].split(attn.embed_dim, -1)
    heads = (*q.shape[:2], attn.num_heads, attn.head_dim)
    scores = q.view(heads).transpose(1, 2) @ k.view(heads).transpose(1, 2).transpose(-1, -2)
    losses = amp_user_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), token_batches(world, 3), tmp / "run")
    outcome.read_run(tmp / "run")
    outcome.facts.update(c_attn_amax=round(float(qkv["out"].abs().max()), 1),
                         qk_amax_fp32=round(float(scores.abs().max()), 1), losses=losses)
    outcome.check("q and k within fp16's range, their products beyond it (fp32); the fp16 loss NaN",
                  float(qkv["out"].abs().max()) < FP16_MAX < float(scores.abs().max()) and math.isnan(losses[0]))
    return outcome


class RMSNorm(nn.Module):
    """RMSNorm as often written by hand, with no upcast: x · rsqrt(mean(x²) + eps)."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class NormedLM(nn.Module):
    """embed (padding row 0, zero-initialised as nn.Embedding does) -> norm (RMSNorm) -> head."""

    def __init__(self, vocab: int, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


class CosineLM(nn.Module):
    """embed (padding row 0) -> each vector divided by its norm in the model's own forward (no norm module) -> head:
    a cosine-similarity head, as a user writes one."""

    def __init__(self, vocab: int, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x / x.norm(dim=-1, keepdim=True))


def root_forward_division_user_loop(world: World, tmp: Path) -> Outcome:
    """`CosineLM.forward` divides each embedding by its norm itself: a padded position's embedding is 0, 0/0 is NaN,
    made by no module — the model's own code — and handed to `head`, whose own work is fine."""
    outcome = Outcome()
    model = CosineLM(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batches(world, 1)[0].clone()
    ids[:, -4:] = 0  # padded
    with torch.no_grad():  # outside the tool: NaN exactly on the padded positions, from embeddings of order 1
        x = model.embed(ids)
        unit = x / x.norm(dim=-1, keepdim=True)
    with _probes(model, opt, None, tmp / "run") as probes:
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        probes.step(loss=loss)
    outcome.read_run(tmp / "run")
    outcome.facts.update(largest_embedding=round(float(x.abs().max()), 3), loss=float(loss.detach()))
    outcome.check("the division is NaN exactly on the padded positions, finite elsewhere; the loss is NaN",
                  unit[:, -4:].isnan().all() and finite(unit[:, :-4]) and math.isnan(float(loss.detach())))
    return outcome


def rmsnorm_eps_pure_fp16(world: World, tmp: Path) -> Outcome:
    """A hand-written RMSNorm (eps 1e-12) in a model trained in fp16 weights: a padding position's embedding is 0,
    mean(x²) is 0, and 1e-12 is 0 in fp16 — rsqrt(0) = inf, 0 · inf = NaN; in fp32 the same model is finite."""
    outcome = Outcome()
    model = NormedLM(world.vocab)
    ids = token_batches(world, 1)[0].clone()
    ids[:, -4:] = 0  # padded
    with torch.no_grad():
        fp32_ok = finite(model(ids))
    model.half()
    with torch.no_grad():
        normed = model.norm(model.embed(ids))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 2):
            ids = ids.clone()
            ids[:, -4:] = 0
            logits = model(ids)
            loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                               ignore_index=0)
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(eps_in_fp16=float(torch.tensor(1e-12, dtype=torch.float16)), fp32_finite=fp32_ok,
                         losses=losses)
    outcome.check("1e-12 is 0 in fp16; the fp16 norm is NaN exactly on the padded positions; fp32 finite",
                  outcome.facts["eps_in_fp16"] == 0.0 and fp32_ok and normed[:, -4:].isnan().all()
                  and finite(normed[:, :-4]))
    return outcome


def rmsnorm_square_beyond_fp16(world: World, tmp: Path) -> Outcome:
    """The same hand-written RMSNorm (eps 1e-6, which float16 holds) in fp16 weights, over embeddings with one channel
    at 300 — a massive activation, as LLMs' residual streams carry: every input fits fp16, its square (9e4) does not.
    mean(x²) is Inf, x · rsqrt(Inf) is 0 — the norm's output is 0 everywhere, with no NaN anywhere, and nothing before
    the norm gets a gradient; in fp32 the same norm is healthy."""
    outcome = Outcome()
    model = NormedLM(world.vocab)
    model.norm.eps = 1e-6
    with torch.no_grad():
        model.embed.weight[1:, 0] = 300.0
    ids = token_batches(world, 1)[0]
    with torch.no_grad():
        x = model.embed(ids)
        wide = model.norm(x)
        model.half()
        narrow = model.norm(x.half())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # updates above half an ulp of the fp16 head's bias
    losses = []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in token_batches(world, 3):
            loss = nn.functional.cross_entropy(model(ids)[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            losses.append(float(loss.detach()))
            loss.backward()
            embed_grad = float(model.embed.weight.grad.abs().max())
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(input_amax=float(x.abs().max()), square_amax_fp32=float(x.pow(2).max()),
                         fp16_norm_amax=float(narrow.abs().max()), fp32_norm_amax=round(float(wide.abs().max()), 3),
                         embed_grad_amax=embed_grad, losses=[round(v, 4) for v in losses])
    outcome.check("inputs within fp16, their squares beyond it; the fp16 norm 0 everywhere, the fp32 one not; finite "
                  "losses and no gradient reaching the embeddings",
                  float(x.abs().max()) < FP16_MAX < float(x.pow(2).max()) and float(narrow.abs().max()) == 0
                  and float(wide.abs().max()) > 1 and all(map(math.isfinite, losses)) and embed_grad == 0)
    return outcome


def kd_masked_teacher_vocab(world: World, tmp: Path) -> Outcome:
    """The teacher's logits of tokens the student must never produce set to -inf before the KD term, which is taken
    as KL with `log_target=True`: exp(-inf) · (-inf − log p) = 0 · -inf = NaN."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        masked = teacher_logits.clone()
        masked[..., -8:] = -math.inf
        return nn.functional.kl_div(nn.functional.log_softmax(student_logits, -1).flatten(0, 1),
                                    nn.functional.log_softmax(masked, -1).flatten(0, 1), log_target=True,
                                    reduction="batchmean")

    outcome = kd_user_loop(world, tmp, kd, steps=2)
    outcome.check("the loss is NaN from step 1", math.isnan(float(outcome.facts["losses"][0])))
    return outcome


LOW_TEMPERATURE = 0.05


def kd_exp_softmax_low_temperature(world: World, tmp: Path) -> Outcome:
    """KD at T = 0.05 with the teacher's softmax written by hand, exp(z/T)/Σexp(z/T), without subtracting the max: a
    confident teacher's logits (~20, well below fp32's exp limit of 88.7) become ~400 at that temperature and exp
    overflows to inf — inf/inf = NaN."""
    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        e = (teacher_logits / LOW_TEMPERATURE).exp()
        q = e / e.sum(-1, keepdim=True)
        log_p = nn.functional.log_softmax(student_logits / LOW_TEMPERATURE, -1)
        return (q * (q.clamp_min(1e-30).log() - log_p)).sum(-1).mean() * LOW_TEMPERATURE**2

    teacher = kd_teacher(world, confidence=30.0)
    ids = token_batches(world, 1, batch=4, block=32)[0]
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    outcome = kd_user_loop(world, tmp, kd, steps=2, teacher=teacher)
    outcome.facts["teacher_logit_amax"] = round(float(logits.abs().max()), 2)
    outcome.check("the teacher's logits are below 88.7, exp of them at T = 0.05 is inf; the loss NaN",
                  float(logits.abs().max()) < math.log(torch.finfo(torch.float32).max)
                  and not finite((logits / LOW_TEMPERATURE).exp()) and math.isnan(float(outcome.facts["losses"][0])))
    return outcome


def unchanged_student_fraction(world: World, run: dict) -> float | None:
    """Of the student's weights as loaded (in the dtype the run held them in), the fraction its trained `student/`
    holds unchanged (None: none saved)."""
    from safetensors.torch import load_file

    trained = run["dir"] / "student" / "model.safetensors"
    if not trained.exists():
        return None
    before, after = load_file(str(world.student / "model.safetensors")), load_file(str(trained))
    same = sum(int((before[n].to(w.dtype) == w).sum()) for n, w in after.items() if n in before)
    total = sum(w.numel() for n, w in after.items() if n in before)
    return round(same / total, 3) if total else None


def mistyped_clip_threshold(world: World, tmp: Path) -> Outcome:
    """`--max-grad-norm 1e-12` (meant 1.0): every gradient is scaled to a norm of 1e-12, below AdamW's eps, and the
    updates vanish in the fp32 weights."""
    outcome, run = run_cli(world, tmp, "--precision", "fp32", "--max-grad-norm", "1e-12", steps=3,
                           teacher=world.dense_teacher)
    unchanged = unchanged_student_fraction(world, run)
    norms = [r.get("grad_norm") for r in run["metrics"]]
    outcome.facts.update(unchanged_weight_fraction=unchanged, grad_norm=norms)
    outcome.check("the gradients' norm is far above 1e-12; most weights did not move in 3 steps",
                  norms and all(n is not None and n > 1e-6 for n in norms) and unchanged and unchanged > 0.5)
    return outcome


def student_matrices_moved(world: World, run: dict) -> float | None:
    """‖w_trained − w_loaded‖ / ‖w_loaded‖ over the student's weight matrices, from its checkpoints (None: none
    saved)."""
    from safetensors.torch import load_file

    trained = run["dir"] / "student" / "model.safetensors"
    if not trained.exists():
        return None
    before, after = load_file(str(world.student / "model.safetensors")), load_file(str(trained))
    pairs = [(before[n].double(), w.double()) for n, w in after.items() if n in before and w.dim() >= 2]
    moved = sum(float((a - b).square().sum()) for b, a in pairs)
    return math.sqrt(moved / sum(float(b.square().sum()) for b, _ in pairs))


def student_lr_typed_1e_9_sar(world: World, tmp: Path) -> Outcome:
    """`--student-lr 1e-9` (meant 1e-4, say) beside SAR's routers at their default `--router-lr` 1e-4: every value
    finite, nothing lost to rounding in fp32, the loss flat; the routers' steps are 1e5 times the student's, and a
    ratio over both models together reads as healthy."""
    steps = 8
    outcome, run = run_cli(world, tmp, "--precision", "fp32", "--student-lr", "1e-9", steps=steps)
    moved = student_matrices_moved(world, run)
    outcome.facts.update(student_moved_per_step=moved and moved / steps, losses=[round(v, 4) for v in
                                                                                 _losses(run["metrics"])])
    outcome.check("the student's matrices moved by under 1e-6 of their size a step (healthy ~1e-3), all finite",
                  moved is not None and 0 < moved / steps < 1e-6 and outcome.exit_code == 0)
    return outcome


def loss_weighted_near_zero(mode: str):
    """`--alpha-kd 1e-30 --alpha-ce 0` (a sum of weights that is all but 0): the student's gradients are ~1e-30 of
    healthy ones — flushed to 0 in a float16 backward even times the loss scale, below AdamW's eps in fp32."""
    def run(world: World, tmp: Path) -> Outcome:
        outcome, run_ = run_cli(world, tmp, "--precision", mode, "--alpha-kd", "1e-30", "--alpha-ce", "0", steps=3,
                                teacher=world.dense_teacher)
        unchanged = unchanged_student_fraction(world, run_)
        outcome.facts["unchanged_weight_fraction"] = unchanged
        outcome.check("the run completed and most student weights did not move in 3 steps",
                      outcome.exit_code == 0 and unchanged and unchanged > 0.5)
        return outcome
    return run


def clean_warmup_with_weight_decay(world: World, tmp: Path) -> Outcome:
    """AdamW(lr=1e-3, weight_decay=0.01) under a linear warm-up from lr 0 (its first step updates nothing)."""
    from transformers import get_linear_schedule_with_warmup

    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=8)
    lrs = []  # the lr each optimizer step used: read right after it, before the schedule's step
    losses = plain_user_loop(model, opt, token_batches(world, 8), tmp / "run", schedule=schedule,
                             after_step=lambda: lrs.append(opt.param_groups[0]["lr"]))
    outcome.read_run(tmp / "run")
    outcome.facts.update(lr=[round(v, 5) for v in lrs], losses=[round(v, 3) for v in losses])
    outcome.check("lr 0 at step 1 only; finite losses, falling", lrs[0] == 0 and all(lrs[1:])
                  and all(map(math.isfinite, losses)) and losses[-1] < losses[0])
    return outcome


# ------------------------------------------------------------------------------------------ the catalog
def feature_kd_lr_above_stability(world: World, tmp: Path) -> Outcome:
    """Feature distillation through a linear projection (the student's features regressed onto the teacher's with
    MSE), full batch, SGD at 1.02× the stability limit 2/λmax of the loss's curvature: the loss falls along the
    flat directions, then the steepest one oscillates with a growing amplitude (×1.08 a step) — a slow climb,
    every value finite, well below three times the first loss."""
    outcome = Outcome()
    torch.manual_seed(0)
    student_features, teacher_features = torch.randn(64, 32), torch.randn(64, 16)
    student_features[:, 0] *= 4  # one direction much larger than the rest: the steepest curvature
    projection = nn.Linear(32, 16)
    with_bias = torch.cat([student_features, torch.ones(64, 1)], 1)
    curvature = float(torch.linalg.eigvalsh(2 * with_bias.T @ with_bias / teacher_features.numel()).max())
    lr = 1.02 * 2 / curvature
    opt = torch.optim.SGD(projection.parameters(), lr=lr)
    losses = []
    with _probes({"student": projection}, opt, None, tmp / "run") as probes:
        for _ in range(16):
            loss = nn.functional.mse_loss(projection(student_features), teacher_features)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    lowest = losses.index(min(losses))
    outcome.facts.update(lr=round(lr, 4), stability_limit=round(2 / curvature, 4), losses=[round(v, 3) for v in losses],
                         lowest_at_step=lowest + 1)
    outcome.check("lr above 2/λmax; the loss falls, then rises at every step after its lowest, all finite and "
                  "below 3x the first", lr > 2 / curvature and all(map(math.isfinite, losses))
                  and 0 < lowest < 8 and all(b > a for a, b in zip(losses[lowest:-1], losses[lowest + 1:], strict=True))
                  and losses[-1] > 1.2 * min(losses) and max(losses) < 3 * losses[0])
    return outcome


def unit_norm_embeddings_with_a_zero_row(world: World, tmp: Path) -> Outcome:
    """After each optimizer step the loop renormalises the student's token embeddings to unit norm, as cosine-
    similarity models do (`wte.weight.div_(wte.weight.norm(dim=1, keepdim=True))`); one row is all zero — a padding
    embedding, as `nn.Embedding(padding_idx=...)` initialises it, never in a batch, so no update moves it: 0/0 writes
    NaN into it between step 1's update and step 2's forward. The forwards never read that row: every loss and
    gradient stays finite, and the next update (weight decay multiplies the NaN) is the first to show it."""
    outcome = Outcome()
    model = tiny_gpt2_untied(world.vocab)
    batches = token_batches(world, 3)
    pad = next(i for i in range(world.vocab) if not any((b == i).any() for b in batches))
    with torch.no_grad():
        model.transformer.wte.weight[pad].zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    finite_after_update = []

    def renormalise() -> None:
        finite_after_update.append(finite(model.transformer.wte.weight))
        with torch.no_grad():
            weight = model.transformer.wte.weight
            weight.div_(weight.norm(dim=1, keepdim=True))
    losses = plain_user_loop(model, opt, batches, tmp / "run", after_step=renormalise)
    outcome.read_run(tmp / "run")
    outcome.facts.update(pad_token=pad, losses=[round(v, 3) for v in losses], finite_after_update=finite_after_update,
                         nan_rows_at_end=int(model.transformer.wte.weight.isnan().any(1).sum()))
    outcome.check("the embeddings are finite after step 1's update, the zero row NaN after the renormalisation; "
                  "every loss finite", finite_after_update[0] and outcome.facts["nan_rows_at_end"] == 1
                  and all(map(math.isfinite, losses)))
    return outcome


def head_retied_with_the_embedding_scale(world: World, tmp: Path) -> Outcome:
    """A student with its own head (untied) that the loop ties back to the embeddings after each optimizer step,
    copying `wte.weight * n_embd ** 0.5` — the √d scale some models (T5, Gemma) apply to the embeddings' outputs,
    applied here to the weights: between step 1's update and step 2's forward the head grows ~5.7×."""
    outcome = Outcome()
    model = tiny_gpt2_untied(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    head, embeddings = model.lm_head.weight, model.transformer.wte.weight
    head_before, head_after = [], []

    def retie() -> None:
        head_before.append(float(head.detach().abs().max()))
        with torch.no_grad():
            head.copy_(embeddings * model.config.n_embd ** 0.5)  # meant: the same tensor, or no scale
        head_after.append(float(head.detach().abs().max()))
    losses = plain_user_loop(model, opt, token_batches(world, 4), tmp / "run", after_step=retie)
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=[round(v, 3) for v in losses],
                         head_amax_after_update=[round(v, 3) for v in head_before],
                         head_amax_after_retie=[round(v, 3) for v in head_after])
    outcome.check("the first re-tie makes the head's largest weight > 2x what the update left; every loss finite",
                  head_after[0] > 2 * head_before[0] and all(map(math.isfinite, losses)))
    return outcome


def amp_loop_clips_before_unscaling(world: World, tmp: Path) -> Outcome:
    """The AMP loop with clipping in the wrong order: `clip_grad_norm_(model.parameters(), 1.0)` right after
    `scaler.scale(loss).backward()`, with no `scaler.unscale_(opt)` before it — the norm it clips by is the true one ×
    the loss scale (2**16), so every step is clipped, and once unscaled each gradient is ~65536× below the
    threshold."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    clipped_by, true_norms = [], []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for ids in token_batches(world, 3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            true_norms.append(float(torch.stack([p.grad.float().norm() for p in model.parameters()]).norm())
                              / scaler.get_scale())  # outside the tool: the norm the clipping was meant to see
            clipped_by.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))  # meant after unscale_
            scaler.step(opt)
            scaler.update()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    ratios = [c / t for c, t in zip(clipped_by, true_norms, strict=True)]
    outcome.facts.update(clipped_by=[f"{v:.3g}" for v in clipped_by], true_norms=[round(v, 3) for v in true_norms],
                         ratio=[round(v) for v in ratios])
    outcome.check("the clipping saw the true norm × 65536: every step clipped although the true norm is near the "
                  "threshold", all(abs(r / 65536 - 1) < 1e-2 for r in ratios) and all(c > 1.0 for c in clipped_by))
    return outcome


def hidden_state_kd_with_teacher_states_in_fp16(world: World, tmp: Path) -> Outcome:
    """Hidden-state KD whose loop keeps the teacher's hidden states in float16 to save memory (`.half()`, then
    `.float()` for the loss). The fp32 teacher has a massive-activation channel (one hidden unit at 1e5 after block 0,
    as large LMs have): finite in fp32, Inf once cast — the MSE is Inf at step 1, every module output finite."""
    outcome = Outcome()
    student, teacher = tiny.make_gpt2(world.vocab), kd_teacher(world)
    with torch.no_grad():  # a massive activation: channel 5 of block 0's MLP output is 1e5 whatever the input
        teacher.transformer.h[0].mlp.c_proj.weight[:, 5] = 0
        teacher.transformer.h[0].mlp.c_proj.bias[5] = 1e5
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses, states = [], []
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 2, batch=4, block=32):
            out = student(input_ids=ids, labels=ids, output_hidden_states=True)
            with torch.no_grad():
                kept = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1]
                states.append(kept)
                kept = kept.half()  # stored in float16 to save memory
            loss = out.loss + nn.functional.mse_loss(out.hidden_states[1], kept.float())
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=losses, teacher_state_amax=float(states[0].abs().max()))
    outcome.check("the teacher's fp32 hidden states are finite and beyond 65504, Inf in float16; the loss is not "
                  "finite from step 1", finite(states[0]) and float(states[0].abs().max()) > FP16_MAX
                  and not finite(states[0].half()) and not math.isfinite(losses[0]))
    return outcome


def amp_loop_that_also_calls_optimizer_step(world: World, tmp: Path) -> Outcome:
    """An fp32 loop converted to AMP that kept its `opt.step()` after the new `scaler.step(opt)`; the scaler starts
    at 2**24 (a larger initial scale than the default), so the first steps overflow float16 and the scaler skips them
    — and the leftover `opt.step()` applies those non-finite gradients: NaN weights at step 1."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    skipped, finite_after = [], []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for ids in token_batches(world, 3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < before)
            opt.step()  # left over from the fp32 loop
            finite_after.append(all(finite(p) for p in model.parameters()))
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(scaler_skipped=skipped, weights_finite=finite_after)
    outcome.check("the scaler skipped step 1 (overflow) and the weights are NaN after it",
                  skipped[0] and not finite_after[0])
    return outcome


def amp_loop_that_steps_past_its_scaler(world: World, tmp: Path) -> Outcome:
    """An AMP loop that scales its loss but steps with `opt.step()` itself, never `scaler.step(opt)` (nor
    `scaler.update()`, which would raise for want of an inf check): SGD applies the gradients × 65536 — an update
    hundreds of times the weights at step 1, which alone reads as an lr far too high."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for ids in token_batches(world, 3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            scaler.scale(loss).backward()
            opt.step()  # where scaler.step(opt) belongs
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(losses=losses, scale=scaler.get_scale())
    outcome.check("the scale stayed 65536 and the loss blew up after the first update",
                  scaler.get_scale() == 2.0**16 and not losses[1] < 3 * losses[0])
    return outcome


T5_FF_OUT = "encoder.block.1.layer.1.DenseReluDense.wo"


def t5_feed_forward_overflow_amp_loop(world: World, tmp: Path) -> Outcome:
    """T5's best-known fp16 failure: the encoder's feed-forward output projection `wo` leaves fp16's range (its
    ReLU(wi x) grows with training; here wi and wo ×300). An encoder-decoder whose answers are one token each (a class
    as text): every label is a target — the decoder's inputs are the labels shifted right — so no batch is empty."""
    from transformers import T5Config, T5ForConditionalGeneration

    outcome = Outcome()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=world.vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                dropout_rate=0.0))
    feed_forward = model.get_submodule(T5_FF_OUT.rpartition(".")[0])
    with torch.no_grad():
        feed_forward.wi.weight.mul_(300.0)
        feed_forward.wo.weight.mul_(300.0)
    texts = token_batches(world, 2, batch=4, block=12)
    ff_out = forward_extremes(model, texts[0][:, :-1], labels=texts[0][:, -1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for ids in texts:
            answers = ids[:, -1:]  # one token each
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids[:, :-1], labels=answers).loss
            losses.append(float(loss.detach()))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    first = first_beyond_fp16(ff_out)
    outcome.facts.update(first_beyond_fp16_fp32=first, losses=losses)
    outcome.check("in fp32, wo's output is the first beyond fp16's range; the fp16 loss is NaN",
                  first is not None and first[0] == T5_FF_OUT and math.isnan(losses[0]))
    return outcome


MOE_STUDENT_ROUTER = "model.layers.1.mlp.gate"


def moe_student_router_overflow_amp_loop(world: World, tmp: Path) -> Outcome:
    """An MoE student (Qwen2-MoE: routed experts, a shared expert, `output_router_logits=True` so the load-balancing
    aux loss is in its loss) whose router logits leave fp16's range while every weight fits it (gate ×4e5)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    outcome = Outcome()
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=world.vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01, pad_token_id=0))
    with torch.no_grad():
        model.get_parameter(MOE_STUDENT_ROUTER + ".weight").mul_(4e5)
    batches = token_batches(world, 2)
    first, largest_weight = first_beyond_fp16(forward_extremes(model, batches[0])), max_weight(model)
    amp_user_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches, tmp / "run")
    outcome.read_run(tmp / "run")
    outcome.facts.update(first_beyond_fp16_fp32=first, max_weight=round(largest_weight, 1))
    outcome.check("in fp32, the router's logits are the first output beyond fp16's range; every weight within it",
                  first is not None and first[0] == MOE_STUDENT_ROUTER and largest_weight < FP16_MAX)
    return outcome


def grad_scaler_over_half_weights(world: World, tmp: Path) -> Outcome:
    """The AMP recipe over a model already in float16: `model.half()`, autocast fp16 and a GradScaler. GradScaler
    refuses to unscale float16 gradients: `scaler.step(opt)` raises at step 1, before anything numerical shows."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab).half()
    raised = None
    try:
        amp_user_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), token_batches(world, 2), tmp / "run")
    except ValueError as exc:
        raised = str(exc)
    outcome.read_run(tmp / "run")
    outcome.facts.update(raised=raised, status=json.loads((tmp / "run" / "summary.json").read_text())["status"])
    outcome.check("scaler.step raised 'Attempting to unscale FP16 gradients' at step 1 and the run closed as failed",
                  raised is not None and "unscale FP16 gradients" in raised and outcome.facts["status"] == "failed")
    return outcome


def amp_loop_without_zero_grad(world: World, tmp: Path) -> Outcome:
    """An AMP loop that never calls `opt.zero_grad()`, and one batch whose backward overflows float16 at step 1 (a
    backward hook ×1e30 on `mid`, that step only). The scaler skips it as it should — but the Inf stays in `.grad`,
    each later backward adds to it, and every later step overflows and is skipped while the scale falls."""
    outcome = Outcome()
    model = named_mlp()
    step_no = [0]
    blow_up_backward(model.mid, when=lambda: step_no[0] == 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    finite_grads = {}
    with _probes(model, opt, scaler, tmp / "run") as probes:
        for step in range(1, 13):
            step_no[0] = step
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            finite_grads[step] = all(finite(p.grad) for p in model.parameters())
            scaler.step(opt)
            scaler.update()
            probes.step(loss=loss)  # and no opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(final_scale=scaler.get_scale(), finite_grads=[finite_grads[s] for s in sorted(finite_grads)])
    outcome.check("the overflow was made at step 1 only, yet every step's gradients are non-finite and the scale "
                  "fell below 128", not any(finite_grads.values()) and scaler.get_scale() < 128)
    return outcome


def accumulation_summing_micro_batches(world: World, tmp: Path) -> Outcome:
    """Gradient accumulation over 8 micro-batches that calls `loss.backward()` on each loss as the model returned it
    (no division by 8): every step's gradient is the sum of 8, and SGD at an lr their mean takes blows up."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = token_batches(world, 16)
    summed, averaged = _accumulated_gradient(model, batches[:8], 1), _accumulated_gradient(model, batches[:8], 8)
    with _probes(model, opt, None, tmp / "run") as probes:
        for start in (0, 8):
            for ids in batches[start:start + 8]:
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            probes.step()
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(summed_over_averaged_gradient=round(float(summed.norm() / averaged.norm()), 3))
    outcome.check("the step's gradient is 8x the mean's", abs(float(summed.norm() / averaged.norm()) - 8) < 1e-3)
    return outcome


def loss_backpropagated_twice(world: World, tmp: Path) -> Outcome:
    """`loss.backward(retain_graph=True)` and then `loss.backward()` on the same forward's loss: each adds its gradient
    to `.grad`, so every step applies it twice (one batch a step: no micro-batches summed)."""
    outcome = Outcome()
    model = tiny.make_gpt2(world.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = token_batches(world, 4)
    once, twice = (_head_gradient(model, batches[0], backwards) for backwards in (1, 2))
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward(retain_graph=True)
            loss.backward()
            opt.step()
            probes.step()
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(twice_over_once_gradient=round(float(twice.norm() / once.norm()), 3))
    outcome.check("the step's gradient is 2x one backward's", abs(float(twice.norm() / once.norm()) - 2) < 1e-3)
    return outcome


def _head_gradient(model: nn.Module, ids: torch.Tensor, backwards: int) -> torch.Tensor:
    """The lm_head's gradient after `backwards` backwards through one forward's loss (outside any tool)."""
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    for _ in range(backwards):
        loss.backward(retain_graph=True)
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    return grad


def ema_teacher_in_bf16(world: World, tmp: Path) -> Outcome:
    """Self-distillation from an EMA of the student, the teacher held in bfloat16 to save memory: after each step the
    loop writes t ← 0.999·t + 0.001·s in place — changes far below half a bfloat16 ulp, so most of the teacher never
    moves from the student's first copy."""
    from sarkd_diag import Probes

    outcome = Outcome()
    student = tiny.make_gpt2(world.vocab)
    teacher = tiny.make_gpt2(world.vocab).requires_grad_(False).eval().to(torch.bfloat16)
    teacher.load_state_dict(student.state_dict())
    first = [p.clone() for p in teacher.parameters()]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 5):
            out = student(input_ids=ids, labels=ids)
            with torch.no_grad():
                target = teacher(input_ids=ids).logits.float()
            loss = out.loss + kd_divergence(1.0)(out.logits, target)
            loss.backward()
            opt.step()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                    t.mul_(0.999).add_(s.to(torch.bfloat16), alpha=0.001)
    outcome.read_run(tmp / "run")
    moved = sum(int((a != b).sum()) for a, b in zip(first, teacher.parameters(), strict=True))
    total = sum(p.numel() for p in first)
    outcome.facts.update(teacher_values_moved=round(moved / total, 3))
    outcome.check("after 5 EMA writes most of the bfloat16 teacher holds its first values", moved < total / 2)
    return outcome


def teacher_left_in_train_mode(world: World, tmp: Path) -> Outcome:
    """A GPT-2 teacher (dropout 0.1, as GPT-2 ships) switched to `train()` with the student — a module holding both
    models does that —, then frozen: every forward draws a new dropout mask, so the KD targets are noisy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sarkd_diag import Probes

    outcome = Outcome()
    torch.manual_seed(0)
    student = tiny.make_gpt2(world.vocab)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=world.vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128))
    teacher.requires_grad_(False).train()
    batches = token_batches(world, 4)
    with torch.no_grad():
        differ = not torch.equal(teacher(input_ids=batches[0]).logits, teacher(input_ids=batches[0]).logits)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in batches:
            with torch.no_grad():
                target = teacher(input_ids=ids).logits.log_softmax(-1)
            loss = nn.functional.kl_div(student(input_ids=ids).logits.log_softmax(-1).flatten(0, 1),
                                        target.flatten(0, 1), log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    outcome.facts.update(teacher_outputs_differ_between_two_forwards=differ)
    outcome.check("two teacher forwards of the same batch differ", differ)
    return outcome


def _accumulated_gradient(model: nn.Module, batches: list[torch.Tensor], divide_by: int) -> torch.Tensor:
    """The gradient of the lm_head accumulated over `batches`, each loss divided by `divide_by` (outside any tool)."""
    model.zero_grad()
    for ids in batches:
        (model(input_ids=ids, labels=ids).loss / divide_by).backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    return grad


def student_frozen_instead_of_the_teacher(world: World, tmp: Path) -> Outcome:
    """A KD loop whose `requires_grad_(False)` went to the student instead of the teacher, and whose teacher forward
    has no `torch.no_grad()`: backward runs — through the teacher — and nothing of the student trains."""
    outcome = Outcome()
    student, teacher = tiny.make_gpt2(world.vocab), tiny.make_gpt2(world.vocab, seed=3)
    student.requires_grad_(False)  # meant: teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in student.parameters()]
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 3):
            student_logits, teacher_logits = student(input_ids=ids).logits, teacher(input_ids=ids).logits
            loss = nn.functional.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1),
                                        log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
            probes.step(loss=loss)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    unchanged = all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    outcome.facts.update(student_unchanged=unchanged, teacher_has_gradients=any(
        p.grad is not None for p in teacher.parameters()))
    outcome.check("the student did not change, the teacher got gradients",
                  unchanged and outcome.facts["teacher_has_gradients"])
    return outcome


def optimizer_over_the_frozen_teacher(world: World, tmp: Path) -> Outcome:
    """A KD loop whose optimizer was built from the teacher's parameters (`AdamW(teacher.parameters())`, meant the
    student's), the teacher frozen as teachers are: the student gets gradients nothing applies, the loss sits still."""
    outcome = Outcome()
    student = tiny.make_gpt2(world.vocab)
    teacher = tiny.make_gpt2(world.vocab, seed=3).requires_grad_(False).eval()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)  # meant: student.parameters()
    before = [p.detach().clone() for p in student.parameters()]
    from sarkd_diag import Probes

    with Probes({"student": student, "teacher": teacher}, optimizer=opt, run_dir=tmp / "run") as probes:
        for ids in token_batches(world, 3):
            out = student(input_ids=ids, labels=ids)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss = out.loss + kd_divergence(2.0)(out.logits, teacher_logits)
            loss.backward()
            opt.step()
            probes.step(loss=loss, labels=ids)
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    unchanged = all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    outcome.facts.update(student_unchanged=unchanged)
    outcome.check("the student did not change", unchanged)
    return outcome


# ------------------------------------------------------------------------------------------ Llama-style students
SWIGLU_MLP = "model.layers.1.mlp"  # silu(gate_proj(x)) * up_proj(x) is its own code, handed to down_proj


def swiglu_beyond_fp16(world: World) -> tuple[nn.Module, dict]:
    """A tiny Llama (RMSNorm, rotary, GQA, SwiGLU) whose block-1 MLP has gate and up ×2000, and what its fp32 forward
    shows: every module output within fp16's range, the SwiGLU product silu(gate)·up beyond it."""
    model = tiny.make_llama(world.vocab)
    mlp = model.get_submodule(SWIGLU_MLP)
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(2000.0)
        mlp.up_proj.weight.mul_(2000.0)
    product = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda _m, args: product.append(float(args[0].abs().max())))
    outputs = forward_extremes(model, token_batches(world, 1)[0])
    handle.remove()
    return model, {"largest_module_output": round(max(v for _, v in outputs), 1),
                   "swiglu_product": round(product[0], 1)}


def swiglu_overflow(dtype: torch.dtype):
    def run(world: World, tmp: Path) -> Outcome:
        outcome = Outcome()
        model, fp32 = swiglu_beyond_fp16(world)
        losses = amp_user_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), token_batches(world, 2),
                               tmp / "run", dtype=dtype)
        outcome.read_run(tmp / "run")
        outcome.facts.update(fp32, losses=losses)
        outcome.check("in fp32 every module output fits fp16, the SwiGLU product does not",
                      fp32["largest_module_output"] < FP16_MAX < fp32["swiglu_product"])
        outcome.check("the loss is NaN in fp16, finite in bf16",
                      math.isnan(losses[0]) if dtype == torch.float16 else all(map(math.isfinite, losses)))
        return outcome
    return run


def kd_weighted_too_high_tied_head(world: World, tmp: Path) -> Outcome:
    """The KD term ×1e8 under fp16 (as "KD loss weighted too high") for a Llama student whose head is tied to its
    token embedding, as small Llama, Qwen2 and Gemma checkpoints ship: one tensor, registered as the embedding."""
    student = tiny.save(tiny.make_llama(world.vocab, tied=True), world.tokenizer, tmp / "tied_student")
    outcome, run = run_cli(world, tmp, "--precision", "mixed", "--alpha-kd", "1e8", steps=18,
                           teacher=world.dense_teacher, student=student)
    scales, losses = [r.get("loss_scale") for r in run["metrics"]], _losses(run["metrics"])
    outcome.facts.update(final_loss_scale=scales[-1] if scales else None)
    outcome.check("finite losses, the loss scale below 1", losses and all(map(math.isfinite, losses))
                  and scales[-1] is not None and scales[-1] < 1)
    return outcome


RESIDUAL_CHANNEL = 5


def residual_stream_beyond_fp16(world: World, tmp: Path) -> Outcome:
    """A "massive activation": both blocks' MLPs write into one residual channel (down_proj's row 5 only), ~4.7e4 and
    ~2.7e4 — each fits fp16, their sum in the residual stream does not. The model in float16 (`.half()`), a loop that
    skips a step whose loss is not finite (so the weights stay finite and the fault comes back)."""
    outcome = Outcome()
    model = tiny.make_llama(world.vocab, attention="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(40.0)
            layer.mlp.up_proj.weight.mul_(40.0)
            layer.mlp.down_proj.weight.zero_()
            layer.mlp.down_proj.weight[RESIDUAL_CHANNEL] = 200.0
    batches = token_batches(world, 3)
    fp32 = dict(forward_extremes(model, batches[0]))
    model.half()
    opt, losses = torch.optim.SGD(model.parameters(), lr=1e-3), []
    with _probes(model, opt, None, tmp / "run") as probes:
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(float(loss.detach()))
            if math.isfinite(losses[-1]):
                loss.backward()
                opt.step()
            probes.step(loss=loss, labels=ids, skipped=not math.isfinite(losses[-1]))
            opt.zero_grad()
    outcome.read_run(tmp / "run")
    mlps = [round(fp32[f"model.layers.{i}.mlp"], 1) for i in (0, 1)]
    outcome.facts.update(mlp_outputs_fp32=mlps, layer1_output_fp32=round(fp32["model.layers.1"], 1), losses=losses)
    outcome.check("each MLP's output fits fp16, the residual sum does not; the fp16 loss is NaN",
                  max(mlps) < FP16_MAX < fp32["model.layers.1"] and all(map(math.isnan, losses)))
    return outcome


def clean_llama_cli(world: World, tmp: Path) -> Outcome:
    """`train` between Llama-style models (tied student head, untied teacher; GQA, sdpa, RMSNorm, SwiGLU)."""
    student = tiny.save(tiny.make_llama(world.vocab, tied=True), world.tokenizer, tmp / "llama_student")
    teacher = tiny.save(tiny.make_llama(world.vocab, seed=5, hidden=48), world.tokenizer, tmp / "llama_teacher")
    outcome, run = run_cli(world, tmp, "--precision", "bf16-mixed", "--student-lr", "3e-3", teacher=teacher,
                           student=student)
    losses = _losses(run["metrics"])
    outcome.facts["losses"] = [round(v, 3) for v in losses]
    outcome.check("completed with finite losses", outcome.exit_code == 0 and losses and all(map(math.isfinite, losses)))
    return outcome


def pure_bf16_norm_gains(world: World, tmp: Path) -> Outcome:
    """`train --precision pure-bf16 --student-lr 1e-3`, a Llama student: its matrices (near 0.02, half a bf16 ulp
    ~6e-5) take Adam's lr-sized steps, its RMSNorm gains (1.0, half an ulp 0.0039) lose every one."""
    from safetensors.torch import load_file

    student = tiny.save(tiny.make_llama(world.vocab, tied=True), world.tokenizer, tmp / "llama_student")
    outcome, run = run_cli(world, tmp, "--precision", "pure-bf16", "--student-lr", "1e-3", steps=4,
                           teacher=world.dense_teacher, student=student)
    before = load_file(str(student / "model.safetensors"))
    after = load_file(str(run["dir"] / "student" / "model.safetensors"))
    norms = [name for name in after if "norm" in name]
    moved = {name: not torch.equal(before[name].to(after[name].dtype), after[name]) for name in after if name in before}
    lost = [r.get("lost_update_fraction") for r in run["metrics"] if r.get("lost_update_fraction") is not None]
    outcome.facts.update(norm_gains_moved=sum(moved[n] for n in norms), norm_gains=len(norms),
                         other_tensors_moved=sum(v for n, v in moved.items() if n not in norms),
                         lost_update_fraction=lost)
    outcome.check("no norm gain moved, every other tensor did, the run lost under 10% of its updates",
                  norms and not any(moved[n] for n in norms) and all(v for n, v in moved.items() if n not in norms)
                  and lost and lost[0] < 0.1)
    return outcome


def padded_teacher_vocabulary(world: World, tmp: Path) -> Outcome:
    """`train --precision fp32` from a Llama teacher on the student's own tokenizer, its head padded 32 rows past it
    (as Qwen2.5-7B's 152064 rows against 0.5B's 151936)."""
    teacher = tiny.save(tiny.make_llama(world.vocab + 32, seed=5), world.tokenizer, tmp / "padded_teacher")
    outcome, run = run_cli(world, tmp, "--precision", "fp32", "--student-lr", "3e-3", teacher=teacher)
    config = json.loads((run["dir"] / "config.json").read_text()) if run["dir"].exists() else {}
    kd = [r.get("kd_loss") for r in run["metrics"]]
    outcome.facts.update(objective=(config.get("objective") or {}).get("kind"), kd_loss=kd)
    outcome.check("logit KD over the shared ids, finite", outcome.facts["objective"] == "logit-kd" and kd
                  and all(v is not None and math.isfinite(v) for v in kd))
    return outcome


CLEAN = Expected(None)

SCENARIOS: list[Scenario] = [
    Scenario("pure-fp16 AdamW eps", "`train --precision pure-fp16` (torch AdamW, eps=1e-8)", "pure-fp16", "CLI",
             pure_fp16_adamw_eps, Expected("optimizer_eps_underflow", "critical", "student", first_step=1)),
    Scenario("pure-fp16 fused AdamW", "user loop: fp16 GPT-2, `AdamW(fused=True)`, lr 1e-3, 4 steps", "pure-fp16",
             "user loop", fused_adamw_pure_fp16,
             Expected("optimizer_state_underflow", "critical", "student", first_step=(1, 4),
                      absent=("update_underflow",))),
    Scenario("pure-fp16 foreach AdamW, user loop", "user loop: `model.half()`, `AdamW(foreach=True)` (eps=1e-8)",
             "pure-fp16", "user loop", foreach_adamw_pure_fp16,
             Expected("optimizer_eps_underflow", "critical", "student", first_step=1)),
    Scenario("pure-bf16 tiny lr", "`train --precision pure-bf16 --student-lr 5e-6` (dense teacher)", "pure-bf16",
             "CLI", pure_bf16_tiny_lr, Expected("update_underflow", "warning", "student", ANY, first_step=1,
                                                  fix_contains="--precision bf16-mixed",
                                                  fix_lacks="--precision mixed")),
    Scenario("pure-bf16 lr too small for fp32 too", "`train --precision pure-bf16 --student-lr 1e-12` (dense teacher): "
             "updates below half an ulp even of fp32 master weights", "pure-bf16", "CLI",
             pure_bf16_lr_too_small_for_fp32,
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="--student-lr",
                      fix_lacks="--precision")),
    Scenario("pure-bf16 weight decay rounds away", "`train --precision pure-bf16 --student-lr 1e-3 --weight-decay "
             "0.01` (dense teacher): AdamW multiplies each bf16 weight by 1 − 1e-5", "pure-bf16", "CLI",
             pure_bf16_weight_decay, Expected("weight_decay_lost", "warning", "student", ANY, first_step=1,
                                              fix_contains="--precision bf16-mixed", fix_lacks="--precision mixed")),
    Scenario("KD loss weighted too high", "`train --precision mixed --alpha-kd 1e8` (untied lm_head), 18 steps",
             "mixed", "CLI", mixed_kd_weight_overflow,
             Expected("loss_scale_collapse", "critical", "student", "lm_head", first_step=(1, 17))),
    Scenario("KD loss weighted too high, tied lm_head", "`train --precision mixed --alpha-kd 1e8` (lm_head tied to "
             "wte, GPT-2's default), 18 steps", "mixed", "CLI", mixed_kd_weight_overflow_tied,
             Expected("loss_scale_collapse", "critical", "student", "lm_head", first_step=(1, 17))),
    Scenario("GradScaler loop, backward overflow in one module",
             "user loop: autocast fp16 + GradScaler; a backward hook ×1e30 on module `mid`, 18 steps", "mixed",
             "user loop", user_scaler_module_overflow,
             Expected("loss_scale_collapse", "critical", "student", "mid", first_step=(1, 17))),
    Scenario("absurd lr, mixed", "`train --precision mixed --student-lr 100`", "mixed", "CLI", absurd_lr("mixed"),
             Expected("divergence", "critical", "student", first_step=(1, 2), not_critical=("activation_overflow",),
                      evidence_contains="ratio")),
    Scenario("absurd lr, bf16-mixed", "`train --precision bf16-mixed --student-lr 100`", "bf16-mixed", "CLI",
             absurd_lr("bf16-mixed"),
             Expected("divergence", "critical", "student", first_step=(1, 2), not_critical=("activation_overflow",),
                      evidence_contains="ratio")),
    Scenario("absurd lr, fp32", "`train --precision fp32 --student-lr 100`", "fp32", "CLI", absurd_lr("fp32"),
             Expected("divergence", "critical", "student", first_step=(1, 2), evidence_contains="ratio")),
    Scenario("batch without targets", "user loop: step 2's labels all −100 (0/0 loss)", "fp32", "user loop",
             empty_targets_user_loop,
             Expected("nonfinite_input", "critical", "student", first_step=2, absent=("divergence",))),
    Scenario("KD loop's own CE over a prompt-only micro-batch", "user loop: student called without labels, "
             "`F.cross_entropy` by hand + KD, 2 micro-batches a step; step 2's second all −100 (0/0 loss)", "fp32",
             "user loop", prompt_only_micro_batch_kd_loop,
             Expected("nonfinite_input", "critical", "student", first_step=2, fix_contains="target tokens")),
    Scenario("resized embeddings' new rows initialised huge, AMP loop", "user loop: autocast fp16 + GradScaler; "
             "`resize_token_embeddings(+8)` (tied head), the new rows 3e3 × N(0, 1); one batch in four holds a new "
             "token", "mixed", "user loop", resized_embeddings_initialised_huge,
             Expected("activation_overflow", "warning", "student", "lm_head", first_step=2, absent=("no_gradients",))),
    Scenario("pure-bf16 Adam's second moment never decays", "user loop: a small MLP `.to(torch.bfloat16)`, torch "
             "`AdamW(lr=1e-2, weight_decay=0)` at its default betas (moments kept in bfloat16), 4 steps", "pure-bf16",
             "user loop", pure_bf16_adam_second_moment,
             Expected("optimizer_state_underflow", "warning", "student", first_step=1, fix_contains="β2",
                      evidence_contains="decay_lost")),
    Scenario("padding kept as labels", "user loop: fp32 GPT-2, AdamW; batches right-padded with EOS to 32 tokens "
             "(texts of 8 to 26), `labels=input_ids.clone()` with the pads left in", "fp32", "user loop",
             padding_kept_as_labels,
             Expected("padding_in_targets", "warning", "student", first_step=1, fix_contains="-100")),
    Scenario("NaN in inputs_embeds", "user loop: `model(inputs_embeds=...)` with a NaN row at step 2", "fp32",
             "user loop", nan_embeds_user_loop,
             Expected("nonfinite_input", "critical", "student", first_step=2, absent=("divergence",))),
    Scenario("student module overflows fp16", f"student's `{STUDENT_HOT}` weight ×1e6, `train --precision mixed`",
             "mixed", "CLI", student_activation_overflow("mixed"),
             Expected("activation_overflow", "critical", "student", STUDENT_HOT, first_step=1)),
    Scenario("student module beyond fp16, in bf16",
             f"student's `{STUDENT_HOT}` weight ×1e6, `train --precision bf16-mixed`", "bf16-mixed", "CLI",
             student_activation_overflow("bf16-mixed"),
             Expected("activation_overflow", "warning", "student", STUDENT_HOT, first_step=1,
                      not_critical=("activation_overflow", "divergence", "teacher_overflow"))),
    Scenario("teacher module overflows fp16", f"dense teacher's `{TEACHER_HOT}` weight ×1e6, `train --precision "
             "mixed`", "mixed", "CLI", dense_teacher_overflow,
             Expected("teacher_overflow", "critical", "teacher", TEACHER_HOT, first_step=1)),
    Scenario("MoE router overflows fp16", f"Mixtral teacher's router `{ROUTER}` ×1e7, `train --precision mixed`",
             "mixed", "CLI", router_teacher_overflow,
             Expected("teacher_overflow", "critical", "teacher", ROUTER, first_step=1, fix_contains="router",
                      fix_lacks="autocast")),
    Scenario("MoE expert overflows fp16", f"Mixtral teacher's experts `{EXPERTS}`: gate_up ×300, down ×3e4 (weights "
             "within fp16's range, outputs beyond), `train --precision mixed`", "mixed", "CLI",
             moe_expert_teacher_overflow, Expected("teacher_overflow", "critical", "teacher", EXPERTS, first_step=1,
                                                   fix_lacks="router")),
    Scenario("SAR router terms weighted too high, mixed", "`train --precision mixed --router-load-balance-weight 1e6` "
             "(meant 1e-2), 10 steps: the teacher's router gradients overflow fp16 down to a loss scale of 128",
             "mixed", "CLI", sar_router_terms_weighted_too_high,
             Expected("loss_scale_collapse", "warning", "teacher", ROUTERS, first_step=9,
                      fix_contains="--router-load-balance-weight", fix_lacks="--alpha-ce")),
    Scenario("pure-fp16 gradient overflow", "user loop: fp16 weights, SGD, no scaler; backward hook ×1e30 on `mid` "
             "from step 2", "pure-fp16", "user loop", pure_fp16_grad_overflow,
             Expected("gradient_overflow", "critical", "student", "mid", first_step=2)),
    Scenario("fp32 divergence", "user loop: fp32 GPT-2, AdamW lr 1.0, 6 steps", "fp32", "user loop",
             fp32_divergence_user_loop, Expected("divergence", "critical", "student", first_step=(1, 2))),
    Scenario("fp16 autocast KD without a GradScaler",
             "user loop: fp32 student + teacher, autocast fp16, KD term weighted 1e-4, no scaler", "mixed",
             "user loop", fp16_autocast_kd_without_scaler,
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="GradScaler",
                      evidence_contains="zero_gradient")),
    Scenario("fp16 autocast KD, GradScaler(init_scale=1.0)", "user loop: fp32 student + teacher, autocast fp16, KD "
             "term weighted 1e-4, a GradScaler started at scale 1 (taken for \"no scaling\")", "mixed", "user loop",
             fp16_autocast_kd_with_a_scaler_at_1,
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="init_scale",
                      fix_lacks="detach", evidence_contains="loss_scale")),
    Scenario("KD at temperature 0", "user loop: fp32 student + teacher, logits / T with T = 0 in the KD term",
             "fp32", "user loop", zero_temperature_kd,
             Expected("divergence", "critical", "student", "loss", first_step=1, fix_contains="loss computation",
                      absent=("gradient_overflow", "teacher_overflow", "activation_overflow"))),
    Scenario("KD temperature annealed to 0", "user loop: fp32 student + teacher; the KD temperature annealed "
             "linearly 2 → 0 over 3 steps: NaN at step 4, a step without module statistics", "fp32", "user loop",
             annealed_temperature_kd,
             Expected("divergence", "critical", "student", "loss", first_step=4, fix_contains="temperature",
                      evidence_contains="module_outputs_finite")),
    Scenario("teacher overflows under the loop's fp16 autocast", "user loop: fp32 student and teacher, both "
             f"forwards in one `torch.autocast(float16)` + GradScaler; the teacher's `{TEACHER_HOT}` ×3e5 (weights "
             "within fp16's range, outputs beyond)", "mixed", "user loop", teacher_overflow_under_amp_autocast,
             Expected("teacher_overflow", "critical", "teacher", TEACHER_HOT, first_step=1,
                      fix_contains="enabled=False", fix_lacks="instead of float16")),
    Scenario("KD as kl_div of probabilities", "user loop: fp32 KD, `F.kl_div(softmax(student / T), softmax(teacher / "
             "T))` — probabilities where kl_div takes log-probabilities", "fp32", "user loop", kl_div_of_probabilities,
             Expected("kd_input_invalid", "critical", "student", first_step=1, fix_contains="log_softmax")),
    Scenario("KD as kl_div of a probability log_target", "user loop: fp32 KD, `F.kl_div(log_softmax(student / T), "
             "softmax(teacher / T), log_target=True)` — probabilities where log_target takes log-probabilities", "fp32",
             "user loop", kl_div_of_a_probability_log_target,
             Expected("kd_input_invalid", "critical", "student", first_step=1, fix_contains="as the target")),
    Scenario("KD as kl_div at its default reduction", "user loop: fp32 KD, T²·`F.kl_div(log_softmax(student / T), "
             "log_softmax(teacher / T), log_target=True)` at `reduction=\"mean\"` (the default): ÷ the vocabulary",
             "fp32", "user loop", kl_div_at_its_default_reduction,
             Expected("kd_reduction_mean", "warning", "student", first_step=1, fix_contains="batchmean")),
    Scenario("KD term with its logs swapped", "user loop: fp32 CE + a hand-written KD Σ q·(log p − log q) (−KL: the "
             "logs swapped), handed over as `probes.step(loss=loss, terms={\"kd\": kd, \"ce\": ce})`", "fp32",
             "user loop", kd_term_with_its_logs_swapped,
             Expected("loss_term_negative", "critical", "student", "kd", first_step=1, fix_contains="log q − log p")),
    Scenario("KD at T = 1e-3 under fp16 autocast", "user loop: fp32 student and a confident teacher (logits in the "
             "hundreds) under `torch.autocast(float16)` + GradScaler; the KD term divides the float16 logits by "
             "T = 1e-3",
             "mixed", "user loop", tiny_temperature_under_fp16_autocast,
             Expected("divergence", "critical", "student", "loss", first_step=1, fix_contains="`.float()` first")),
    Scenario("KD at T = 1e-3 under bf16 autocast", "user loop: fp32 student, a teacher whose logits span tens, under "
             "`torch.autocast(bfloat16)`; the KD term T²·`F.kl_div` at T = 1e-3 (nothing non-finite)",
             "bf16-mixed", "user loop", tiny_temperature_under_bf16_autocast,
             Expected("kd_temperature_low", "warning", "student", first_step=1,
                      fix_contains="the KD loss's temperature",
                      evidence_contains="one_hot")),
    Scenario("fp16 teacher, KD as log(softmax)", "user loop: fp32 student, teacher held in fp16; the KD term takes "
             "log(softmax(teacher logits)) in fp16", "fp32", "user loop", fp16_teacher_log_softmax,
             Expected("teacher_overflow", "critical", "teacher", first_step=1, fix_contains=".float()",
                      absent=("divergence", "activation_overflow"))),
    Scenario("one outlier batch overflows fp16, AMP loop",
             "user loop: autocast fp16 + GradScaler; step 5's batch overflows an MLP (between statistics steps)",
             "mixed", "user loop", sporadic_fp16_overflow_amp_loop,
             Expected("activation_overflow", "warning", "student", "transformer.h.1.mlp.c_fc", first_step=5,
                      absent=("divergence",))),
    Scenario("AMP loop that stops on a NaN loss", "user loop: autocast fp16 + GradScaler; step 5's batch overflows an "
             "MLP (no statistics step) and the loop raises on its non-finite loss before the backward", "mixed",
             "user loop", amp_loop_stopping_on_a_nonfinite_loss,
             Expected("activation_overflow", "critical", "student", "transformer.h.1.mlp.c_fc", first_step=5)),
    Scenario("fp16 overflow from step 4, AMP loop",
             "user loop: autocast fp16 + GradScaler; from step 4 every batch overflows an MLP (step 4 no statistics "
             "step: the skipped step replayed)", "mixed", "user loop", fp16_overflow_from_step_4_amp_loop,
             Expected("activation_overflow", "critical", "student", "transformer.h.1.mlp.c_fc", first_step=4,
                      absent=("divergence", "loss_scale_collapse"))),
    Scenario("float16 loss summed over tokens", "user loop: `model.half()`, SGD lr 1e-4; cross-entropy with "
             "`reduction=\"sum\"` over ~15,000 tokens a batch", "pure-fp16", "user loop",
             fp16_loss_summed_over_tokens_user_loop,
             Expected("divergence", "critical", "student", "loss", first_step=1, fix_contains="take the mean",
                      evidence_contains="largest_finite_loss")),
    Scenario("softmax over a fully masked row", "user loop: fp32, a hand-written attention whose masked softmax is "
             "its own code; one sequence of the batch is all padding (0/0)", "fp32", "user loop",
             fully_masked_row_user_loop,
             Expected("divergence", "critical", "student", "attn", first_step=1, fix_contains="mask",
                      fix_lacks="autocast", absent=("activation_overflow",))),
    Scenario("a teacher's softmax over a fully masked row", "user loop: fp32 KD; the teacher's hand-written "
             "attention masks the padding, one sequence of the batch is all padding (0/0 in the teacher alone)",
             "fp32", "user loop", teacher_fully_masked_row_kd,
             Expected("teacher_overflow", "critical", "teacher", "attn", first_step=1, fix_contains="mask",
                      fix_lacks="wider dtype")),
    Scenario("a head at an lr of its own", "user loop: fp32 GPT-2 (untied head), SGD with the head in a parameter "
             "group at lr 50 beside the body's 1e-4", "fp32", "user loop", head_at_an_lr_of_its_own,
             Expected("divergence", "critical", "student", "lm_head", first_step=1, fix_contains="at lr 50")),
    Scenario("softmax over a fully masked row, AMP loop", "user loop: the same attention and padding-only "
             "sequence under autocast fp16 + GradScaler", "mixed", "user loop", fully_masked_row_amp_loop,
             Expected("divergence", "critical", "student", "attn", first_step=1, fix_contains="will not help",
                      evidence_contains="float32_replay", absent=("activation_overflow",))),
    Scenario("softmax over a fully masked row, model.half()", "user loop: the same attention and padding-only "
             "sequence with fp16 weights, SGD, no loss scaler", "pure-fp16", "user loop", fully_masked_row_half_loop,
             Expected("divergence", "critical", "student", "attn", first_step=1, fix_contains="will not help",
                      evidence_contains="float32_replay", absent=("activation_overflow",))),
    Scenario("mask fill -1e9 in fp16", "user loop: fp16 weights, SGD; a hand-written attention adds the mask as "
             "`(1 - keep) * -1e9` (-inf in fp16); one sequence of the batch is all padding", "pure-fp16", "user loop",
             mask_fill_beyond_fp16_user_loop,
             Expected("activation_overflow", "critical", "student", "attn", first_step=1,
                      fix_contains="torch.finfo(scores.dtype).min", evidence_contains="largest_measured")),
    Scenario("lr schedule past its end", "user loop: fp32 GPT-2, AdamW; a LambdaLR decay sqrt(1 − step/2) run "
             "for 5 steps: lr NaN at step 4", "fp32", "user loop", schedule_past_its_end_user_loop,
             Expected("optimizer_nonfinite", "critical", "student", ANY, first_step=4, fix_contains="schedule",
                      evidence_contains="lr_nonfinite", absent=("divergence",))),
    Scenario("linear lr decay run past its end", "user loop: fp32 GPT-2, AdamW; a LambdaLR decay 1 − step/3 run for "
             "8 steps: lr negative from step 5", "fp32", "user loop", linear_decay_past_its_end_user_loop,
             Expected("lr_negative", "warning", "student", ANY, first_step=5, fix_contains="max(0.0",
                      absent=("divergence",))),
    Scenario("gradients cleared before the step", "user loop: fp32 GPT-2, AdamW; `zero_grad()` between "
             "`backward()` and `step()` from step 2", "fp32", "user loop", no_gradient_user_loop("cleared"),
             Expected("no_gradients", "warning", "student", ANY, first_step=2, fix_contains="zero_grad",
                      absent=("update_underflow",))),
    Scenario("dropout of 1.0 in the student", "user loop: fp32 GPT-2 with `embd_pdrop=1.0`, `resid_pdrop=1.0`, "
             "AdamW", "fp32", "user loop", dropout_of_one_user_loop,
             Expected("no_gradients", "warning", "student", "transformer.h.0.ln_1", first_step=1,
                      fix_contains="Dropout with p=1.0", fix_lacks="detach")),
    Scenario("float16 momentum buffer overflows", "user loop: `model.half()`, SGD momentum 0.999, lr 1e-7; loss "
             "× 2e4: gradients ~1e4, finite", "pure-fp16", "user loop", momentum_buffer_overflow_half_loop,
             Expected("optimizer_nonfinite", "critical", "student", first_step=(8, 12),
                      fix_contains="keep the optimizer state in fp32", absent=("divergence",))),
    Scenario("logits detached", "user loop: fp32 GPT-2, AdamW; from step 2 the logits `.detach()`ed, "
             "`loss.requires_grad_()` silencing backward's error", "fp32", "user loop",
             no_gradient_user_loop("detached"),
             Expected("no_gradients", "warning", "student", ANY, first_step=2, fix_contains="detach",
                      absent=("update_underflow",))),
    Scenario("fp32 learning rate too small", "user loop: fp32 GPT-2, AdamW lr 1e-10 (updates below half an fp32 "
             "ulp)", "fp32", "user loop", tiny_lr_fp32_user_loop,
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="schedule",
                      fix_lacks="autocast")),
    Scenario("corrupted teacher checkpoint", f"a dense teacher saved with one NaN in `{TEACHER_HOT}`'s weight, "
             "`train --precision fp32`", "fp32", "CLI", corrupted_teacher_checkpoint,
             Expected("nonfinite_input", "critical", "teacher", TEACHER_HOT, first_step=1, fix_contains="checkpoint",
                      fix_lacks="--precision", absent=("teacher_overflow",))),
    Scenario("teacher checkpoint with an Inf weight, bf16 autocast loop", f"user loop: fp32 student and teacher "
             f"under `torch.autocast(bfloat16)`, KD; the teacher's float32 `{TEACHER_HOT}` weight holds one +Inf",
             "bf16-mixed", "user loop", infinite_teacher_weight_bf16_loop,
             Expected("nonfinite_input", "critical", "teacher", TEACHER_HOT, first_step=1, fix_contains="checkpoint",
                      absent=("teacher_overflow",))),
    Scenario("NaN embedding row of a rare token", "user loop: fp32 GPT-2 (untied head) whose checkpoint has a NaN "
             "embedding row for a token first seen at step 3", "fp32", "user loop", nan_embedding_row_user_loop,
             Expected("nonfinite_input", "critical", "student", "transformer.wte", first_step=1,
                      fix_contains="checkpoint", absent=("optimizer_nonfinite",))),
    Scenario("RMSE feature loss, student initialised from its teacher", "user loop: fp32; CE + sqrt(mse(student, "
             "teacher hidden states after block 0)), the student's embeddings and block 0 copied from the teacher",
             "fp32", "user loop", rmse_feature_kd_user_loop,
             Expected("divergence", "critical", "student", "transformer.h.0.mlp.c_proj", first_step=1,
                      fix_contains="derivative", fix_lacks="autocast", absent=("gradient_overflow",))),
    Scenario("RMSE feature loss, student a whole copy of its teacher", "user loop: fp32; CE + sqrt(mse(student, "
             "teacher last hidden states)), the student a copy of the teacher: every gradient of step 1 NaN",
             "fp32", "user loop", functools.partial(rmse_feature_kd_user_loop, whole_copy=True),
             Expected("divergence", "critical", "student", "lm_head", first_step=1, fix_contains="applies sqrt",
                      fix_lacks="autocast", absent=("gradient_overflow",), evidence_contains="loss_operation")),
    Scenario("RMSE feature loss, clipping that raises on NaN", "user loop: fp32; the same RMSE feature loss (student "
             "initialised from its teacher), `clip_grad_norm_(..., error_if_nonfinite=True)`: raises on step 1's NaN "
             "gradients before the optimizer step", "fp32", "user loop",
             functools.partial(rmse_feature_kd_user_loop, clip_raises=True),
             Expected("divergence", "critical", "student", "transformer.h.0.mlp.c_proj", first_step=1,
                      fix_contains="sqrt", fix_lacks="GradScaler", absent=("gradient_overflow",))),
    Scenario("weight decay typed 1e2", "user loop: fp32 GPT-2, `AdamW(lr=1e-3, weight_decay=1e2)` (meant 1e-2), "
             "10 steps", "fp32", "user loop", weight_decay_typo_user_loop,
             Expected("weight_collapse", "warning", "student", ANY, first_step=(6, 10), fix_contains="weight_decay",
                      evidence_contains="weight_decay")),
    Scenario("lr schedule sized for 0 steps", "user loop: fp32 GPT-2, AdamW under "
             "`get_linear_schedule_with_warmup(opt, 0, num_training_steps=0)`: lr 0 at every step", "fp32",
             "user loop", zero_step_schedule_user_loop,
             Expected("lr_zero", "warning", "student", ANY, first_step=1, fix_contains="schedule")),
    Scenario("warm-up to a mistyped peak lr", "user loop: fp32 GPT-2, `AdamW(lr=1.0)` (meant 1e-4) under a 10-step "
             "linear warm-up, 6 steps", "fp32", "user loop", warmup_to_mistyped_peak_user_loop,
             Expected("divergence", None, "student", ANY, first_step=2, fix_contains="at lr 0.1",
                      evidence_contains="update_ratio")),
    Scenario("fp16 attention scores overflow", "user loop: autocast fp16 + GradScaler, eager attention; block 1's "
             "query and key weights ×700: q, k fit fp16, q·k does not", "mixed", "user loop",
             fp16_attention_scores_overflow,
             Expected("activation_overflow", "critical", "student", "transformer.h.1.attn", first_step=1)),
    Scenario("RMSNorm eps 1e-12 in fp16", "user loop: fp16 weights, SGD; a hand-written RMSNorm (eps 1e-12, 0 in "
             "fp16) over a padded batch (zero embedding rows)", "pure-fp16", "user loop", rmsnorm_eps_pure_fp16,
             Expected("activation_overflow", "critical", "student", "norm", first_step=1, fix_contains="1e-12")),
    Scenario("RMSNorm's square beyond fp16", "user loop: fp16 weights, SGD; the hand-written RMSNorm (eps 1e-6) over "
             "embeddings with one channel at 300: x fits fp16, x² does not — mean(x²) Inf, the norm's output 0 "
             "everywhere, nothing NaN", "pure-fp16", "user loop", rmsnorm_square_beyond_fp16,
             Expected("activation_overflow", "warning", "student", "norm", first_step=1, fix_contains="fp32",
                      absent=("update_underflow", "no_gradients"))),
    Scenario("a division by zero in the model's own forward", "user loop: fp32; `CosineLM.forward` divides each "
             "embedding by its norm itself (no module does), a padded batch (zero embedding rows: 0/0)", "fp32",
             "user loop", root_forward_division_user_loop,
             Expected("divergence", "critical", "student", "CosineLM.forward", first_step=1,
                      fix_contains="division by zero", absent=("activation_overflow",))),
    Scenario("KD over a teacher with masked vocabulary", "user loop: fp32; teacher logits of 8 tokens set to −inf, "
             "KL with `log_target=True` (0 · −inf)", "fp32", "user loop", kd_masked_teacher_vocab,
             Expected("divergence", "critical", "student", "loss", first_step=1, fix_contains="log of 0",
                      absent=("teacher_overflow", "gradient_overflow"))),
    Scenario("KD at T = 0.05 with a hand-written softmax", "user loop: fp32; the teacher's softmax as exp(z/T)/Σ "
             "without the max subtracted, logits ~20 (exp overflows)", "fp32", "user loop",
             kd_exp_softmax_low_temperature,
             Expected("divergence", "critical", "student", "loss", first_step=1, fix_contains="exp()/sum()",
                      absent=("teacher_overflow", "gradient_overflow"))),
    Scenario("clip threshold typed 1e-12", "`train --precision fp32 --max-grad-norm 1e-12` (meant 1.0; dense "
             "teacher)", "fp32", "CLI", mistyped_clip_threshold,
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="--max-grad-norm",
                      fix_lacks="--precision")),
    Scenario("student lr typed 1e-9 beside SAR's routers", "`train --precision fp32 --student-lr 1e-9` (MoE "
             "teacher: its routers train at `--router-lr` 1e-4), 8 steps: the loss flat, every value finite", "fp32",
             "CLI", student_lr_typed_1e_9_sar,
             Expected("updates_too_small", "warning", "student", first_step=1, fix_contains="--student-lr` (now 1e-09)",
                      evidence_contains="update_ratio")),
    Scenario("loss weights near 0, mixed", "`train --precision mixed --alpha-kd 1e-30 --alpha-ce 0` (dense teacher)",
             "mixed", "CLI", loss_weighted_near_zero("mixed"),
             Expected("no_gradients", "warning", "student", ANY, first_step=1, fix_contains="--alpha-kd",
                      fix_lacks=".detach()")),
    Scenario("loss weights near 0, fp32", "`train --precision fp32 --alpha-kd 1e-30 --alpha-ce 0` (dense teacher)",
             "fp32", "CLI", loss_weighted_near_zero("fp32"),
             Expected("update_underflow", "warning", "student", ANY, first_step=1, fix_contains="--alpha-kd",
                      fix_lacks="--precision")),
    Scenario("loss weights near 0, pure-bf16", "`train --precision pure-bf16 --alpha-kd 1e-30 --alpha-ce 0` (dense "
             "teacher): squared gradients below float32's range, in the bf16 state and any other", "pure-bf16", "CLI",
             loss_weighted_near_zero("pure-bf16"),
             Expected("optimizer_state_underflow", "warning", "student", ANY, first_step=1, fix_contains="--alpha-kd",
                      fix_lacks="--precision", absent=("divergence",))),
    Scenario("checkpoint beyond fp16, mixed", f"a student saved in fp32 with one `{STUDENT_HOT}` weight of 1e5, "
             "`train --precision mixed`", "mixed", "CLI", checkpoint_beyond_fp16_mixed,
             Expected("activation_overflow", "critical", "student", STUDENT_HOT + ".weight", first_step=1,
                      fix_contains="checkpoint holds values", fix_lacks="--precision mixed",
                      evidence_contains="loaded_weight_amax")),
    Scenario("checkpoint beyond fp16, loaded with .half()", f"user loop: the same checkpoint (`{STUDENT_HOT}` weight "
             "1e5, saved in fp32) loaded with `model.half()`, SGD", "pure-fp16", "user loop",
             checkpoint_beyond_fp16_half_user_loop,
             Expected("nonfinite_input", "critical", "student", STUDENT_HOT + ".weight", first_step=1,
                      fix_contains="beyond float16's 65504", fix_lacks="GradScaler")),
    Scenario("feature KD, lr a little above stability", "user loop: fp32; a linear projection's MSE onto teacher "
             "features, full batch, SGD at 1.02 × 2/λmax: the loss falls, then climbs (finite, < 3x)", "fp32",
             "user loop", feature_kd_lr_above_stability,
             Expected("divergence", "warning", "student", None, first_step=(5, 9), fix_contains="climbs steadily",
                      evidence_contains="slope")),
    Scenario("unit-norm embeddings with a zero row", "user loop: fp32 GPT-2 (untied head), AdamW; after each step "
             "the loop divides the embeddings by their norms, a padding row all zero (0/0: NaN, a row no batch "
             "reads)", "fp32", "user loop", unit_norm_embeddings_with_a_zero_row,
             Expected("weights_edited", "critical", "student", "transformer.wte", first_step=2,
                      fix_contains="no_grad", absent=("optimizer_nonfinite",))),
    Scenario("head re-tied with the embedding scale", "user loop: fp32 GPT-2 (untied head), AdamW; after each step "
             "the loop copies `wte.weight * n_embd ** 0.5` into the head (√d applied to the weights)", "fp32",
             "user loop", head_retied_with_the_embedding_scale,
             Expected("weights_edited", None, "student", "lm_head", first_step=2,
                      fix_contains="outside the optimizer")),
    Scenario("AMP loop clips before unscaling", "user loop: autocast fp16 + GradScaler, AdamW; "
             "`clip_grad_norm_(..., 1.0)` with no `scaler.unscale_(opt)` before it", "mixed", "user loop",
             amp_loop_clips_before_unscaling,
             Expected("clip_before_unscale", "warning", first_step=1, fix_contains="scaler.unscale_(optimizer)",
                      absent=("update_underflow",))),
    Scenario("hidden-state KD with the teacher's states in fp16", "user loop: fp32; the teacher's hidden states "
             "(one massive-activation unit at 1e5) kept as `.half()` for an MSE term", "fp32", "user loop",
             hidden_state_kd_with_teacher_states_in_fp16,
             Expected("divergence", "critical", "teacher", "transformer.h.0.mlp.c_proj", first_step=1,
                      fix_contains=".half()", fix_lacks="autocast")),
    Scenario("AMP loop that also calls optimizer.step()", "user loop: autocast fp16 + GradScaler(init_scale=2**24), "
             "AdamW; `opt.step()` left after `scaler.step(opt)`", "mixed", "user loop",
             amp_loop_that_also_calls_optimizer_step,
             Expected("optimizer_stepped_twice", "critical", first_step=1, fix_contains="scaler.step(optimizer)` alone",
                      absent=("divergence", "gradient_overflow"))),
    Scenario("AMP loop that steps past its scaler", "user loop: autocast fp16 + GradScaler, SGD lr 1e-2; "
             "`scaler.scale(loss).backward()` then `opt.step()` (no `scaler.step(opt)`)", "mixed", "user loop",
             amp_loop_that_steps_past_its_scaler,
             Expected("scaler_bypassed", "critical", first_step=1, fix_contains="scaler.step(optimizer)",
                      absent=("divergence",))),
    Scenario("T5 feed-forward overflows fp16, one-token answers", "user loop: T5 (encoder-decoder), autocast fp16 + "
             f"GradScaler; `{T5_FF_OUT}` beyond fp16 (wi, wo ×300), labels one token per example", "mixed",
             "user loop", t5_feed_forward_overflow_amp_loop,
             Expected("activation_overflow", "critical", "student", T5_FF_OUT, first_step=1,
                      absent=("nonfinite_input",))),
    Scenario("MoE student's router overflows fp16", "user loop: Qwen2-MoE student (shared expert, router aux loss), "
             f"autocast fp16 + GradScaler; router `{MOE_STUDENT_ROUTER}` ×4e5 (weights within fp16, logits beyond)",
             "mixed", "user loop", moe_student_router_overflow_amp_loop,
             Expected("activation_overflow", "critical", "student", MOE_STUDENT_ROUTER, first_step=1,
                      fix_contains="router in fp32")),
    Scenario("GradScaler over model.half()", "user loop: `model.half()`, autocast fp16 + GradScaler, AdamW: "
             "`scaler.step(opt)` raises at step 1", "pure-fp16", "user loop", grad_scaler_over_half_weights,
             Expected("scaler_fp16_weights", "critical", "student", "transformer.wte", first_step=1,
                      fix_contains="load the model in fp32")),
    Scenario("AMP loop without zero_grad()", "user loop: autocast fp16 + GradScaler, AdamW, no `opt.zero_grad()`; "
             "a backward hook ×1e30 on `mid` at step 1 only", "mixed", "user loop", amp_loop_without_zero_grad,
             Expected("gradients_not_cleared", "critical", "student", ANY, first_step=2,
                      absent=("loss_scale_collapse",), fix_contains="optimizer.zero_grad()")),
    Scenario("accumulation summing micro-batch losses", "user loop: fp32 GPT-2, SGD lr 0.5, 8 micro-batches a step, "
             "`loss.backward()` on each undivided loss", "fp32", "user loop", accumulation_summing_micro_batches,
             Expected("micro_batches_summed", "critical", "student", None, first_step=1, absent=("divergence",),
                      fix_contains="(loss / accumulation_steps).backward()", fix_lacks="far too high")),
    Scenario("one forward's loss backpropagated twice", "user loop: fp32 GPT-2, AdamW, "
             "`loss.backward(retain_graph=True)` then `loss.backward()` on each step's loss", "fp32", "user loop",
             loss_backpropagated_twice,
             Expected("loss_backpropagated_twice", "warning", "student", None, first_step=1,
                      absent=("micro_batches_summed",), fix_contains="once per forward")),
    Scenario("EMA teacher held in bfloat16", "user loop: fp32 student; its EMA (t ← 0.999·t + 0.001·s, in place after "
             "each step) held in bfloat16 as the KD teacher", "fp32", "user loop", ema_teacher_in_bf16,
             Expected("update_underflow", "warning", "teacher", ANY, first_step=2, fix_contains="fp32",
                      evidence_contains="written_values_unchanged")),
    Scenario("teacher left in train mode", "user loop: fp32 KD from a GPT-2 teacher (dropout 0.1) left in `train()` "
             "mode, frozen, its forward under `no_grad`", "fp32", "user loop", teacher_left_in_train_mode,
             Expected("teacher_dropout", "warning", "teacher", "transformer.drop", first_step=1,
                      fix_contains="teacher.eval()")),
    Scenario("student frozen instead of the teacher", "user loop: fp32 KD; `student.requires_grad_(False)` (meant the "
             "teacher), the teacher's forward without `torch.no_grad()`", "fp32", "user loop",
             student_frozen_instead_of_the_teacher,
             Expected("no_gradients", "warning", "student", ANY, first_step=1, fix_contains="student is frozen")),
    Scenario("optimizer built over the frozen teacher", "user loop: fp32 KD; `AdamW(teacher.parameters())` (meant "
             "the student's), the teacher frozen", "fp32", "user loop", optimizer_over_the_frozen_teacher,
             Expected("no_gradients", "warning", "student", first_step=1, fix_contains="holds none of student's",
                      fix_lacks="requires_grad_(True)")),
    Scenario("clean fp32", "`train --precision fp32`", "fp32", "CLI", clean_cli("fp32"), CLEAN),
    Scenario("clean bf16-mixed", "`train --precision bf16-mixed`", "bf16-mixed", "CLI", clean_cli("bf16-mixed"), CLEAN),
    Scenario("clean mixed", "`train --precision mixed`", "mixed", "CLI", clean_cli("mixed"), CLEAN),
    Scenario("clean mixed, early scaler skips", "`train --precision mixed --alpha-kd 1e3`: the scaler halves its "
             "scale on the first steps, then trains", "mixed", "CLI", clean_mixed_early_skips, CLEAN),
    Scenario("self-distillation, KD alone", "`train --precision fp32 --alpha-ce 0` with the student as its own "
             "teacher: KD and every gradient exactly 0", "fp32", "CLI", self_distillation_kd_only, CLEAN),
    Scenario("self-distillation, KD alone, mixed", "`train --precision mixed --alpha-ce 0` with the student as its "
             "own teacher: KD starts at fp16 rounding's ~1e-7 and settles near 1e-3", "mixed", "CLI",
             self_distillation_kd_only_mixed, CLEAN),
    Scenario("clean AMP loop", "user loop: autocast fp16 + GradScaler, fp32 weights, AdamW 1e-3", "mixed",
             "user loop", clean_amp_user_loop, CLEAN),
    Scenario("clean bf16 autocast loop", "user loop: autocast bf16, fp32 weights, AdamW 1e-3", "bf16-mixed",
             "user loop", clean_bf16_user_loop, CLEAN),
    Scenario("clean warm-up with weight decay", "user loop: fp32 GPT-2, `AdamW(lr=1e-3, weight_decay=0.01)` under "
             "a linear warm-up from lr 0", "fp32", "user loop", clean_warmup_with_weight_decay, CLEAN),
    Scenario("SwiGLU product overflows fp16", "user loop: Llama, autocast fp16 + GradScaler; block 1's gate and up "
             "×2000: each output fits fp16, silu(gate)·up does not", "mixed", "user loop",
             swiglu_overflow(torch.float16),
             Expected("activation_overflow", "critical", "student", SWIGLU_MLP, first_step=1)),
    Scenario("SwiGLU product beyond fp16, in bf16", "user loop: the same Llama, autocast bf16: no module output beyond "
             "fp16, the product is", "bf16-mixed", "user loop", swiglu_overflow(torch.bfloat16),
             Expected("activation_overflow", "warning", "student", SWIGLU_MLP, first_step=1,
                      not_critical=("activation_overflow", "divergence"))),
    Scenario("KD loss weighted too high, tied head", "`train --precision mixed --alpha-kd 1e8`, a Llama student "
             "whose lm_head is tied to its embedding, 18 steps", "mixed", "CLI", kd_weighted_too_high_tied_head,
             Expected("loss_scale_collapse", "critical", "student", "lm_head", first_step=(1, 17))),
    Scenario("residual stream beyond fp16", "user loop: Llama `.half()`, SGD, non-finite steps skipped; both MLPs "
             "write ~4.7e4 and ~2.7e4 into one residual channel", "pure-fp16", "user loop",
             residual_stream_beyond_fp16,
             Expected("activation_overflow", "critical", "student", "model.layers.1", first_step=1)),
    Scenario("clean bf16-mixed, Llama student", "`train --precision bf16-mixed`, Llama student (tied head) and "
             "teacher", "bf16-mixed", "CLI", clean_llama_cli, CLEAN),
    Scenario("pure-bf16 norm gains never move", "`train --precision pure-bf16 --student-lr 1e-3`, a Llama student: "
             "RMSNorm gains at 1.0 lose every update, the run under 10%", "pure-bf16", "CLI", pure_bf16_norm_gains,
             Expected("update_underflow", "warning", "student", "model.layers.0.input_layernorm", first_step=1,
                      fix_contains="--precision bf16-mixed")),
    Scenario("clean fp32, teacher vocabulary padded", "`train --precision fp32`, a Llama teacher on the student's "
             "tokenizer, its head padded 32 rows past it", "fp32", "CLI", padded_teacher_vocabulary, CLEAN),
]
BY_NAME = {**{s.name: s for s in SCENARIOS}, **{s.slug: s for s in SCENARIOS}}


def run_scenario(scenario: Scenario, world: World, tmp: Path) -> tuple[Outcome, float]:
    """Run one scenario in `tmp`; an exception is recorded in the outcome, not raised."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        outcome = scenario.run(world, tmp)
    except Exception as exc:  # noqa: BLE001 - a scenario that crashes is reported, the others still run
        outcome = Outcome(error=f"{type(exc).__name__}: {exc}")
    return outcome, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the table
def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: str, limit: int = 90) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def table_row(scenario: Scenario, outcome: Outcome) -> str:
    if outcome.error:
        diag, loc, step, fix = f"error: {_short(outcome.error, 70)}", "-", "-", "-"
    else:
        top = next((c for c in outcome.diagnosis if c.get("severity") in ("warning", "critical")), None)
        if top is None or (scenario.expected.cause is not None and outcome.diagnosis):
            top = outcome.diagnosis[0] if outcome.diagnosis else None
        if top is None:
            diag, loc, step, fix = "no problems found", "-", "-", "-"
        else:
            diag = f"`{top['cause']}` ({top['severity']})"
            loc = f"{top.get('model') or '-'} / {where(top) or '-'}"
            step = top.get("first_step") if top.get("first_step") is not None else "-"
            fix = _short(top.get("fix") or "")
    wrong = mismatches(scenario.expected, outcome.diagnosis, scenario.via) if not outcome.error else ["crashed"]
    ok = "yes" if not wrong else f"**no**: expected {scenario.expected.describe()} ({'; '.join(wrong)})"
    cells = [scenario.name, f"{scenario.via}: {scenario.how}" if scenario.via == "CLI" else scenario.how,
             scenario.mode, diag, loc, step, fix, ok]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


HEADER = ("| pathology | how provoked | mode | diagnosis (cause, severity) | where (model / module) | first step | "
          "fix (shortened) | as expected? |\n|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this scenario (its name or slug, see --list; repeatable)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--list", action="store_true", help="list the scenarios and their expectations")
    args = parser.parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.slug}: {s.how} -> {s.expected.describe()}")
        return 0
    unknown = [n for n in args.only if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; --list shows them")
    chosen = [BY_NAME[n] for n in args.only] if args.only else SCENARIOS
    torch.set_num_threads(1)
    quiet_transformers()
    rows, report, passed = [], [], 0
    with tempfile.TemporaryDirectory(prefix="pathologies-") as tmp:
        world = build_world(Path(tmp) / "world")
        for i, scenario in enumerate(chosen):
            outcome, seconds = run_scenario(scenario, world, Path(tmp) / f"s{i:02d}")
            rows.append(table_row(scenario, outcome))
            wrong = mismatches(scenario.expected, outcome.diagnosis, scenario.via) if not outcome.error else ["crashed"]
            passed += not wrong
            failed_checks = [k for k, ok in outcome.checks.items() if not ok]
            report.append(f"- {scenario.name} ({seconds:.1f} s): "
                          + ("as expected" if not wrong else "NOT as expected: " + "; ".join(wrong))
                          + (f"; error {outcome.error}" if outcome.error else "")
                          + (f"; PROVOCATION NOT CONFIRMED: {failed_checks}" if failed_checks else "")
                          + f"; facts {json.dumps(outcome.facts, default=str)}"
                          + (f"; notes {outcome.notes}" if outcome.notes else ""))
            print(report[-1], file=sys.stderr, flush=True)
    table = HEADER + "\n" + "\n".join(rows) + "\n"
    print(table)
    print(f"{passed} of {len(chosen)} scenarios as expected")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
