"""The console every command prints through, and what happens when the reader of its output goes away.

`sarkd-diag events RUN | head`: once `head` has its lines and exits, the next write to standard output
fails (EPIPE). A Unix tool dies of SIGPIPE there, quietly, and the shell reports 141 (128 + SIGPIPE).
Python ignores SIGPIPE and raises BrokenPipeError instead; left alone, rich turns it into a silent
`SystemExit(1)`, click into exit 1, and Python's last flush at exit into a traceback-like line and exit 120.
Here every printing path lets BrokenPipeError rise to the CLI's entry point (`cli.main`), the one place that
ends the command: quietly, with `PIPE_CLOSED` (141). `train` does not die mid-step: its display goes quiet
and the run stops after the step with its state saved, as on SIGINT (train/signals.py), then exits 141.
"""

from __future__ import annotations

import errno
import os
import select
import sys

from rich.console import Console as RichConsole

PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


class Console(RichConsole):
    """rich's Console, except that a closed standard output raises BrokenPipeError (rich's own default
    redirects stdout to /dev/null and raises SystemExit(1), which reads as a failure)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write: every later print is dropped
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output has gone")


def output_closed() -> bool:
    """Whether standard output (or error) is a pipe or socket whose reader has gone: a BrokenPipeError from
    anything else is not the reader going away, and stays an error."""
    if not hasattr(select, "poll"):  # Windows: no way to ask; a broken pipe there is standard output's
        return True
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a StringIO (tests), a closed stream
            continue
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(flags & (select.POLLERR | select.POLLHUP) for _, flags in poll.poll(0)):
            return True
    return False


def discard_output() -> None:
    """Point standard output's file descriptor at /dev/null, so that what is still buffered — and Python's own
    flush at exit — goes nowhere instead of failing again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
