"""Bad input, the one failure raised as an exception: a run that finds a problem ends with exit 1 through
its status (train/loop.py `exit_code`), not by raising."""


class BadInput(ValueError):
    """The user's input cannot work: the CLI prints the message as one line and exits 2."""
