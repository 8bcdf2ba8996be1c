"""Which processes of this machine are writing a run: read from /proc, so that a run still training is neither
closed as crashed (`report`), replaced (`train --overwrite`) nor resumed twice, and `events --follow` knows a
killed run from a quiet one."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def holds_open(files: list[Path]) -> bool | None:
    """Whether a process of this machine has one of `files` open for writing: True, False, or None when that
    cannot be known (no /proc; a process of the files' owner whose open files cannot be read; no such files yet)."""
    found, unknown = _writers(files)
    return True if found else None if unknown else False


def writing_processes(files: list[Path], besides: Iterable[int] = ()) -> list[int]:
    """The ids of the other processes of this machine that hold one of `files` open for writing: a run they are
    still writing (as far as /proc shows; empty where it cannot be read). `besides`: processes that write the run
    with this one (the other ranks of its torchrun job), not counted."""
    ours = {os.getpid(), *besides}
    return sorted(pid for pid in _writers(files)[0] if pid not in ours)


def _writers(files: list[Path]) -> tuple[set[int], bool]:
    """The processes holding one of `files` open for writing (a reader such as `tail -f` is not one), and whether
    some could not be looked at (no /proc, no such files yet, or a process of the owner whose files are hidden)."""
    proc = Path("/proc")
    targets = set()
    owners = set()
    for f in files:
        try:
            owners.add(f.stat().st_uid)
            targets.add(os.path.realpath(f))
        except OSError:
            continue
    if not targets or not (proc / "self" / "fd").is_dir():
        return set(), True
    found, unknown = set(), False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid not in owners:  # a run is written by the user who owns its files
                continue
            fds = list((entry / "fd").iterdir())
        except PermissionError:
            unknown = True
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in targets and _open_for_writing(entry / "fdinfo" / fd.name):
                    found.add(int(entry.name))
                    break
            except OSError:
                continue
    return found, unknown


def _open_for_writing(fdinfo: Path) -> bool:
    """Whether a descriptor was opened to write (its `flags:` line in /proc/PID/fdinfo, octal open(2) flags)."""
    for line in fdinfo.read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY
    return True  # no flags shown: a writer, to be safe


def run_logs(run_dir: Path) -> list[Path]:
    """The files a live run holds open for writing: its events logs (one per rank) and metrics.jsonl."""
    return [*sorted(Path(run_dir).glob("events*.jsonl")), Path(run_dir) / "metrics.jsonl"]
