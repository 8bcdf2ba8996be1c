"""SIGINT/SIGTERM ask the loop to stop after the current step (state saved), instead of killing it mid-write.

The loop looks at `signal` between steps: it then writes a checkpoint, the logs and summary.json (status
`interrupted`) and exits 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C stops at once (KeyboardInterrupt), in a
step or while the run closes: the student is not saved (unless it already was), the logs stay as written, and the
newest checkpoint is the one to resume from. A closed output (`sarkd-diag train | head`, once `head`
has exited) is asked for the same way, as SIGPIPE, exit 141 (`output_closed`): where a Unix tool would die of
SIGPIPE at its next write, the run stops after its step with its state saved. A signal the run was started
ignoring (a script's `sarkd-diag train ... &`, `nohup`) stays ignored, as the one who started it asked.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGPIPE: 141}
HANDLED = (signal.SIGINT, signal.SIGTERM)  # SIGPIPE stays ignored, as Python has it: a closed pipe raises instead


class StopRequests:
    """Remembers the first stop signal; a second SIGINT falls through to Python's default (a hard stop)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in HANDLED:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # `cmd &` in a script, nohup: asked not to stop
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum)
            os.write(2, f"sarkd-diag: {self.signal.name}: stopping after this step, saving state (Ctrl-C again "
                        "stops at once)\n".encode())  # unbuffered: safe inside a signal handler

    def output_closed(self) -> None:
        """The reader of the run's output went away: stop after this step, as on SIGPIPE (exit 141)."""
        if self.signal is None:
            self.signal = signal.SIGPIPE
            try:  # stderr may be the same closed pipe (`2>&1 | head`)
                os.write(2, b"sarkd-diag: the output was closed (SIGPIPE): stopping after this step, saving state\n")
            except OSError:
                pass

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 130)
