"""Which processes of this machine are writing a run: read from /proc, so that a run still training is neither
closed as crashed (`report`), replaced (`train --overwrite`) nor resumed twice, and `events --follow` knows a
killed run from a quiet one."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable
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
    """The files a live run holds open for writing: its events logs (one per rank), metrics.jsonl, and the lock file
    of its claim (held open from before its setup: `claim_run_dir`)."""
    return [*sorted(Path(run_dir).glob("events*.jsonl")), Path(run_dir) / "metrics.jsonl", Path(run_dir) / LOCK_FILE]


# A run directory's claim: the process writing a run holds an exclusive flock(2) on this hidden file inside it, from
# the moment the directory is checked (before the slow setup, when none of the logs above exists yet) until the run
# has closed. The kernel drops the lock with the process, so a killed run leaves no stale claim, only the empty file.
LOCK_FILE = ".sarkd-diag.lock"
CLAIM_WAIT_S = 1.0  # how long a claim waits out a lock held that briefly; a run holds it far longer


def lock_holder(run_dir: Path, besides: Iterable[int] = ()) -> int | None:
    """The process (its id; 0 where it has not written it yet) that holds `run_dir`'s claim, other than this one and
    `besides`; None when no other process holds it (no such file, or nobody locks it)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _claimant(fd)
            return None if pid in {os.getpid(), *besides} else pid
        except OSError:  # a filesystem without flock: the /proc checks alone speak
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _claimant(fd: int) -> int:
    """The id the holder wrote into its lock file; it writes it just after taking the lock, so wait a moment for it."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return 0


class RunClaim:
    """This process's claim on a run directory (`claim_run_dir`); `release` gives it up and removes the lock file, so a
    run that closed leaves none (one killed leaves it, unlocked: the next claim takes it over)."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]) -> None:
        self.run_dir, self.fd, self.created = run_dir, fd, created

    def release(self, unused: bool = False) -> None:
        """Give the claim up. `unused`: nothing was written (setup failed), so the directories the claim created
        go again, as they were before it (a directory that holds anything else stays)."""
        if self.fd < 0:
            return
        lock = self.run_dir / LOCK_FILE
        try:  # unlinked while still locked: a claimant that opened it meanwhile sees it replaced (`claim_run_dir`)
            if os.stat(lock).st_ino == os.fstat(self.fd).st_ino:
                lock.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        if _claims.get(os.path.realpath(self.run_dir)) is self:
            del _claims[os.path.realpath(self.run_dir)]
        if unused:
            for directory in self.created:  # deepest first
                try:
                    directory.rmdir()
                except OSError:
                    break


def claim_run_dir(run_dir: Path, refusal: Callable[[int], Exception]) -> RunClaim:
    """Create `run_dir` if needed and claim it: an exclusive lock on its LOCK_FILE, held until released or this
    process ends. Two processes that check the same new directory at once both find it free; only one gets the lock,
    the other gets `refusal(pid of the holder)` raised, before it has written anything."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    mine = _claims.pop(key, None)
    if mine is not None and mine.fd >= 0:  # its own, unreleased (a Trainer built, never run): taken over
        taken, mine.fd = RunClaim(run_dir, mine.fd, []), -1
        _claims[key] = taken
        return taken
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < deadline:  # a reader's test of the lock (`lock_holder`) takes it for an instant
                os.close(fd)
                time.sleep(0.02)
                continue
            pid = _claimant(fd)
            os.close(fd)
            raise refusal(pid) from None
        except OSError:  # a filesystem without flock: claimed as far as it can be
            break
        try:  # the file unlinked by a holder that gave an unused directory up: lock the one there now
            if os.fstat(fd).st_ino == os.stat(run_dir / LOCK_FILE).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _claims[key] = claim = RunClaim(run_dir, fd, [p for p in created if p.is_dir()])
    return claim


_claims: dict[str, RunClaim] = {}  # this process's claims, by real path: a flock conflicts with another of its own
