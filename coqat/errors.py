"""User-facing errors.

A ``CoqatError`` is a problem with what the user gave us (a file, a flag, a missing
dataset), not a bug. The CLI prints its message as one line and exits with code 2,
without a traceback. Messages name the problem *and* the fix.
"""

from __future__ import annotations


class CoqatError(Exception):
    """Bad input or environment; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: multi-line messages break the "one-line error" contract.
        super().__init__(" ".join(str(message).split()))
