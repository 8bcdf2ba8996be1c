"""The two kinds of failure a user sees: their input was wrong (exit 2), or a run found a problem (exit 1)."""


class BadInput(ValueError):
    """The user's input cannot work: the CLI prints the message as one line and exits 2."""


class RunFailed(RuntimeError):
    """A run ended because of what it found (a policy stop, a critical diagnosis): exit 1."""
