"""What a person sees while a run goes: a progress bar (in a terminal) or a log line every N steps (anywhere
else), one line per evaluation, a one-line notice for every decision and warning as it happens, the diagnosis
panel at the end, and — last — the run directory.

Everything arrives through the trainer's calls (`start`, `update`, `eval_line`, `summary`) and the event log's
listener (`alert`): there is no second channel.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable

from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..contract.rundir import resume_command
from ..contract.wording import counted, evaluated_at_step_0_only
from .terminal import Console

# Kinds that are a decision or a change of plan, told whatever their severity (setup warnings are told too).
DECISIONS = ("dual_tokenizer", "router_frozen_dual", "policy_skip", "policy_rollback", "policy_stop", "interrupted",
             "checkpoint_fallback", "out_of_memory")
NOTICES_PER_KIND = 10  # then one line saying the rest are counted at the end (a run skipping every step)


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def where_of(model=None, module=None, tensor=None) -> str:
    """`model/module` without repeating a part (an optimizer group named like its model: `student`, not
    `student/student`)."""
    parts = []
    for part in (model, module or tensor):
        if part and str(part) not in parts:
            parts.append(str(part))
    return "/".join(parts)


def _message(where: str, message: str) -> str:
    """The event's message without a leading `where: ` that the line already says."""
    last = where.rsplit("/", 1)[-1] if where else ""
    return message[len(last) + 2:] if last and message.startswith(last + ": ") else message


def default_log_every(total: int) -> int:
    """Log lines of a run without a terminal: about ten, at least every 50 steps."""
    return max(1, min(50, total // 10))


class TrainingDisplay:
    """The console of a training run.

    `log_every`: a line (step, loss, eval ppl, lr, tokens/s, ETA) every N steps; None chooses — none in a
    terminal, where the progress bar shows the same, else `default_log_every` — and 0 turns lines off.
    `wording`: how the run's messages and fixes are shown — as written, in the command line's options, by default;
    a caller of `distill()` reads them as keyword arguments (`contract.config.worded_for_distill`).
    """

    def __init__(self, console: Console | None = None, quiet: bool = False, log_every: int | None = None,
                 wording: Callable[[str], str] = str):
        self.console = console or Console(highlight=False)
        self.quiet = quiet
        self.log_every = log_every
        self.wording = wording
        self._progress: Progress | None = None
        self._task = None
        self._alerted = False
        self._last_ppl: float | None = None
        self._evals: list[int] = []
        self._notices: Counter = Counter()
        self._warned_checks: set[str] = set()  # the checks (event codes) a warning was printed for
        self.actions: Counter = Counter()  # policy decisions seen: skipped, restored, rolled back
        self._total = self._first_step = 0
        self._started = 0.0
        self._tokens = 0
        self._lines = 0
        self.output_closed = False  # the reader of the output went away (`train | head`): quiet from then on
        self._on_closed: list = []

    # ------------------------------------------------------------------------------------ progress
    def start(self, total: int, done: int, run_dir) -> None:
        self._total, self._first_step, self._started, self._tokens = total, done, time.perf_counter(), 0
        if self.quiet:
            return
        self._line(f"[bold]sarkd-diag[/] training → {run_dir}")
        terminal = self.console.is_terminal
        self._lines = self.log_every if self.log_every is not None else (0 if terminal else default_log_every(total))
        if not terminal:
            return  # a live progress bar draws nothing without a terminal: the log lines say it instead
        self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console, transient=True)
        self._task = self._progress.add_task("train", total=total, completed=done, status="")
        self._progress.start()

    def _rate_and_eta(self, step: int) -> tuple[float | None, float | None]:
        """Tokens per second since the steps began — evaluations and checkpoints included, what the ETA needs —, said
        as `tok/s overall`: the report's `tokens_per_s` is the median step's, a training step's own speed."""
        elapsed = time.perf_counter() - self._started
        done = step - self._first_step
        if elapsed <= 0 or done <= 0:
            return None, None
        return self._tokens / elapsed, (self._total - step) * elapsed / done

    def update(self, step: int, row: dict) -> None:
        self._tokens += int(row.get("tokens") or 0)
        if self.quiet:
            return
        rate, eta = self._rate_and_eta(step)
        scale = row.get("loss_scale")
        if self._progress is not None:
            status = (f"loss {_fmt(row.get('loss'))}  ppl {_fmt(self._last_ppl, '.2f')}  "
                      f"lr {_fmt(row.get('lr'), '.2e')}  {_fmt(rate, ',.0f')} tok/s overall"
                      + (f"  scale {_fmt(scale, '.0f')}" if scale is not None else ""))
            self._progress.update(self._task, completed=step, status=status)
        if self._lines and (step % self._lines == 0 or step == self._total):
            self._line(f"step {step}/{self._total}  loss {_fmt(row.get('loss'))}  "
                               f"eval ppl {_fmt(self._last_ppl, '.3f')}  lr {_fmt(row.get('lr'), '.2e')}  "
                               f"{_fmt(rate, ',.0f')} tok/s overall  ETA {_duration(eta) if eta is not None else '-'}"
                               + (f"  loss scale {_fmt(scale, '.0f')}" if scale is not None else ""))

    def eval_line(self, step: int, ppl: float, loss: float) -> None:
        self._last_ppl = ppl
        self._evals.append(step)
        if not self.quiet:
            self._line(f"eval @ step {step}: validation perplexity {ppl:.3f} (loss {loss:.4f})")

    # ------------------------------------------------------------------------------- events
    def alert(self, event) -> None:
        """A listener of the run's event log: the first critical event, every decision (a policy action, the
        switch to dual-tokenizer mode, a resume) and every warning of setup, each as one line when it happens;
        of other warnings the first of each check (its code: a kind such as `setup_note` holds several, and a
        warning of setup must not silence a different one found while training)."""
        kind, severity = event.kind, event.severity
        message = str(event.message or "")
        if kind == "policy_skip":
            self.actions["restored" if getattr(event, "code", None) == "skip_undone_update" else "skipped"] += 1
        elif kind == "policy_rollback":
            self.actions["rolled back"] += 1
        if self.quiet or kind == "run_error":  # `error` has said it, on stderr, as the exception ended the run
            return
        where = where_of(event.model, event.module, event.tensor)
        text = escape(_message(where, self.wording(message)))
        at = f" in {escape(where)}" if where else ""
        if severity == "critical" and not self._alerted:
            self._alerted = True
            self._line(f"[bold red]CRITICAL[/] step {event.step} {kind}{at}: {text}")
            return
        resumed = getattr(event, "code", None) == "resumed"
        setup = getattr(event, "phase", "setup") == "setup"
        check = getattr(event, "code", None) or kind
        first_of_its_check = check not in self._warned_checks
        if not (kind in DECISIONS or resumed or (severity == "warning" and (setup or first_of_its_check))):
            return
        if severity == "warning":
            self._warned_checks.add(check)
        self._notices[kind] += 1
        if self._notices[kind] > NOTICES_PER_KIND:
            if self._notices[kind] == NOTICES_PER_KIND + 1:
                self._line(f"[dim]note: further {kind} events are not printed; the final panel counts "
                                   f"them (`sarkd-diag events RUN --kind {kind}` lists them)[/]")
            return
        style = {"critical": "bold red", "warning": "yellow"}.get(severity, "cyan")
        label = {"critical": "critical", "warning": "warning"}.get(severity, "note")
        step = f"step {event.step} " if event.step else ""
        self._line(f"[{style}]{label}[/]: {step}{kind}{at}: {text}")

    def _line(self, text: str) -> None:
        """One record of the run — a log line, an evaluation, a notice — as one line however long: the console
        does not fold it at its width (a log file's 80 columns), so each stays one line to read or grep."""
        self._print(text, soft_wrap=True)

    def _print(self, *renderables, **options) -> None:
        """Print, unless the reader has gone: a closed pipe (`sarkd-diag train | head`) makes the display quiet
        and tells `when_closed`'s listener (the run then stops after its step, state saved, and exits 141)."""
        try:
            self.console.print(*renderables, **options)
        except BrokenPipeError:
            self.quiet, self.output_closed = True, True
            for listener in self._on_closed:
                listener()

    def when_closed(self, listener) -> None:
        """Call `listener()` once the output is closed (at once when it already is)."""
        self._on_closed.append(listener)
        if self.output_closed:
            listener()

    def error(self, message: str) -> None:
        print("sarkd-diag: " + " ".join(message.split()), file=sys.stderr)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ----------------------------------------------------------------------------- the end
    def _eval_line(self, summary: dict) -> str | None:
        final = summary.get("final") or {}
        first, last = final.get("first_eval_ppl"), final.get("eval_ppl")
        if first is None or last is None:
            return None
        steps = summary.get("steps_completed") or 0
        evaluated_since_start = any(s > 0 for s in self._evals) if self._evals else None
        if steps == 0 or evaluated_since_start is False or (evaluated_since_start is None and first == last):
            return f"validation perplexity: {first:.3f} {evaluated_at_step_0_only(steps)}"
        return f"validation perplexity: {first:.3f} → {last:.3f}"

    def _policy_line(self, summary: dict) -> str | None:
        counts = summary.get("event_counts") or {}
        actions = Counter(self.actions)
        if not actions and counts.get("policy_skip"):  # a display that did not watch the run: the summary's count
            actions["skipped"] = counts["policy_skip"]
        if not actions.get("rolled back") and counts.get("policy_rollback"):
            actions["rolled back"] = counts["policy_rollback"]
        parts = []
        if actions.get("skipped"):
            parts.append(f"{counted(actions['skipped'], 'step')} skipped (non-finite gradients)")
        if actions.get("restored"):
            parts.append(f"{counted(actions['restored'], 'step')} undone (weights restored from the pre-step copy)")
        if actions.get("rolled back"):
            parts.append(f"rolled back {counted(actions['rolled back'], 'time')} to a checkpoint")
        by_the_loop = counts.get("caller_skip", 0)  # `Probes.step(skipped=True)`: Lightning's None training_step
        if by_the_loop:
            parts.append(f"{counted(by_the_loop, 'step')} skipped by the training loop")
        scaler = ((summary.get("final") or {}).get("skipped_steps") or 0) - actions.get("skipped", 0) \
            - actions.get("restored", 0) - by_the_loop
        if scaler > 0 and summary.get("precision", {}).get("loss_scaling"):
            parts.append(f"{counted(scaler, 'step')} skipped by the loss scaler")
        if not parts:
            return None
        steps = summary.get("steps_completed") or 0
        return f"[yellow]--on-nonfinite / scaler[/]: {'; '.join(parts)} (of {counted(steps, 'step')})"

    def summary(self, summary: dict) -> None:
        if self.quiet:
            return
        steps = summary.get("steps_completed") or 0
        precision = summary.get("precision") or {}
        lines = [f"status: {summary.get('status')} after {counted(steps, 'step')} ({precision.get('mode')})"]
        ppl = self._eval_line(summary)
        if ppl:
            lines.append(ppl)
        policy = self._policy_line(summary)
        if policy:
            lines.append(policy)
        diagnosis, findings = summary.get("diagnosis") or [], summary.get("findings") or []
        lines += [_cause_line(d) for d in diagnosis]
        error = summary.get("error")
        if error:
            lines.append(f"[red]error[/] at step {error.get('step')} ({error.get('phase')}): "
                         + escape(str(error.get("message"))))
        if not diagnosis:
            lines.append(_no_cause_line(summary, policy is not None))
        lines += [_cause_line(d, " (a finding: the loop or the setup)") for d in findings]
        resume = resume_command(summary["run_dir"]) if summary.get("status") == "interrupted" \
            and summary.get("run_dir") else None
        if resume:
            lines.append(f"continue it: {escape(resume)}")
        self._print(Panel(self.wording("\n".join(lines)), title="diagnosis", expand=False))
        self._line(f"run directory: {summary.get('run_dir')}")


def _cause_line(d: dict, kind: str = "") -> str:
    """A cause (or, `kind` said, a finding) in the panel: severity, code, where and when, and its fix."""
    severity = d.get("severity") or "warning"
    where = where_of(d.get("model"), d.get("module"), d.get("tensor"))
    step = d.get("first_step")
    return (f"[{'red' if severity == 'critical' else 'yellow'}]{severity}[/] {escape(str(d.get('cause')))}{kind}"
            + (f" at step {step}" if step is not None else "") + (f" in {escape(where)}" if where else "")
            + (f"\n  fix: {escape(str(d['fix']))}" if d.get("fix") else ""))


def _no_cause_line(summary: dict, steps_left_out: bool) -> str:
    """The panel's line for an empty diagnosis. A run that failed or crashed ended on something the logs do not
    measure: "no numerical problems found" would read as a healthy run."""
    if steps_left_out:
        return "[yellow]no cause diagnosed, but steps were left out: see above[/]"
    if summary.get("status") not in ("failed", "crashed"):
        return "[green]no numerical problems found[/]"
    unknown = "" if summary.get("error") else \
        " — read the error that ended it (traceback.txt, or what killed the process)"
    return f"[yellow]no numerical cause: what was measured stayed finite up to step " \
           f"{summary.get('steps_completed') or 0}{escape(unknown)}[/]"
