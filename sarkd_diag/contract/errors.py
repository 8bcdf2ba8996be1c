"""Bad input, the one failure raised as an exception: a run that finds a problem ends with exit 1 through
its status (train/loop.py `exit_code`), not by raising. And the one failure of the machine that is no bug of this
tool wherever it strikes: a full disk (`no_space_left`)."""

import errno
import re

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# how a library written in Rust (safetensors, tokenizers) words the OS error under its own exception type
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class BadInput(ValueError):
    """The user's input cannot work: the CLI prints the message as one line and exits 2."""


def no_space_left(exc: BaseException | None) -> bool:
    """The error, or one it was raised from, is a write that found the disk (or the user's quota) full: an OSError,
    or safetensors' SafetensorError of a checkpoint or the student ('I/O error: ... (os error 28)')."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        if any(int(number) in NO_SPACE for number in RUST_OS_ERROR.findall(str(exc))):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
