"""What a person sees while a run goes: a progress bar, one line per evaluation, an alert on the first
critical event, the diagnosis panel at the end, and — last — the run directory."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .events import Event


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


class TrainingDisplay:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console()
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._alerted = False
        self._last_ppl: float | None = None

    def start(self, total: int, done: int, run_dir) -> None:
        if self.quiet:
            return
        self.console.print(f"[bold]sarkd-diag[/] training → {run_dir}")
        self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        self._task = self._progress.add_task("train", total=total, completed=done, status="")
        self._progress.start()

    def update(self, step: int, row: dict) -> None:
        if self._progress is None:
            return
        scale = row.get("loss_scale")
        status = (f"loss {_fmt(row['loss'])}  ppl {_fmt(self._last_ppl, '.2f')}  lr {_fmt(row['lr'], '.2e')}"
                  + (f"  scale {_fmt(scale, '.0f')}" if scale is not None else ""))
        self._progress.update(self._task, completed=step, status=status)

    def eval_line(self, step: int, ppl: float, loss: float) -> None:
        self._last_ppl = ppl
        if not self.quiet:
            self.console.print(f"eval @ step {step}: validation perplexity {ppl:.3f} (loss {loss:.4f})")

    def alert(self, event: Event) -> None:
        if event.severity == "critical" and not self._alerted and not self.quiet:
            self._alerted = True
            where = "/".join(x for x in (event.model, event.module or event.tensor) if x)
            self.console.print(f"[bold red]CRITICAL[/] step {event.step} {event.kind}"
                               + (f" in {where}" if where else "") + f": {event.message}")

    def error(self, message: str) -> None:
        print("sarkd-diag: " + " ".join(message.split()), file=sys.stderr)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, summary: dict) -> None:
        if self.quiet:
            return
        final = summary["final"]
        lines = [f"status: {summary['status']} after {summary['steps_completed']} steps "
                 f"({summary['precision']['mode']})"]
        if final.get("first_eval_ppl") is not None and final.get("eval_ppl") is not None:
            lines.append(f"validation perplexity: {final['first_eval_ppl']:.3f} → {final['eval_ppl']:.3f}")
        if summary["diagnosis"]:
            for d in summary["diagnosis"]:
                where = " ".join(x for x in (d.get("model"), d.get("module")) if x)
                lines.append(f"[{'red' if d['severity'] == 'critical' else 'yellow'}]{d['severity']}[/] "
                             f"{d['cause']} at step {d['first_step']} {where}\n  fix: {d['fix']}")
        else:
            lines.append("[green]no numerical problems found[/]")
        self.console.print(Panel("\n".join(lines), title="diagnosis", expand=False))
        self.console.print(f"run directory: {summary['run_dir']}")
