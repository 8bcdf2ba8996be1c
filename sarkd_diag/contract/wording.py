"""How the tool words a count for the reader: `1 step`, `2 steps`, `0 causes` — never `1 steps` or `run(s)`.

Every message, console line and report that prints a count of something goes through `counted`; every refusal of
a mistyped choice offers the one meant through `did_you_mean`."""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable

IRREGULAR = {"process": "processes", "entry": "entries", "batch": "batches"}


def plural(noun: str) -> str:
    """`noun` in the plural: `step` → `steps`, `process` → `processes`, `entry` → `entries`."""
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    head, _, last = noun.rpartition(" ")  # `nonfinite_param event` → `nonfinite_param events`
    return (head + " " if head else "") + IRREGULAR.get(last, last + "s")


def counted(n: int, noun: str, *, number: str | None = None) -> str:
    """`n noun` with the noun agreeing: `counted(1, "step")` is `1 step`, `counted(3, "cause")` `3 causes`.

    `number` replaces how `n` is written (`f"{n:,}"`, say) while `n` still decides singular or plural."""
    shown = str(n) if number is None else number
    return f"{shown} {noun if n == 1 else plural(noun)}"


def evaluated_at_step_0_only(steps: int) -> str:
    """How a run whose one evaluation is step 0's reports its perplexity: 'A → A' would claim a second one."""
    why = "its first step" if steps == 0 else "its first --eval-steps evaluation"
    return f"at step 0; no evaluation after step 0 (the run ended before {why})"


def shell_command(*words: object) -> str:
    """`sarkd-diag WORDS...` as a line to paste into a shell: a word the shell would split or expand (a run directory
    `my runs/a`) quoted, so the command every message offers runs as printed."""
    return " ".join(["sarkd-diag", *(shlex.quote(str(word)) for word in words)])


def did_you_mean(typed: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)` when what was typed is a near miss of one choice (`ful` of `full`, `bf16mixed` of
    `bf16-mixed`), as a mistyped option name gets; '' otherwise. The list of choices alone leaves the reader to spot
    the typo, among 37 event kinds. A part of the name of several (`nonfinite` of `nonfinite_grad`, `nonfinite_param`,
    ...) names them all: the nearest one alone (`nonfinite_lr`) would send the reader after one of them."""
    choices = list(choices)
    word = typed.strip().lower()
    holding = [c for c in choices if len(word) >= 3 and word in c.lower()] if word not in choices else []
    if len(holding) > 1:
        return f" (did you mean one of {', '.join(holding)}?)"
    close = closest(typed, choices)
    return f" (did you mean {close}?)" if close else ""


def closest(typed: str, choices: Iterable[str]) -> str | None:
    """The one choice `typed` is a near miss of, or None."""
    close = difflib.get_close_matches(typed.strip().lower(), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None
