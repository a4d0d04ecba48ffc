"""User-facing errors.

Every problem caused by the user's input (a bad flag, a file of the wrong kind, a store
recorded under another configuration) raises :class:`QDriftError`. The command line prints
its message on one line and exits with code 2; library users can catch it.
"""

from __future__ import annotations


class QDriftError(Exception):
    """Bad input: the message is one line that says what is wrong and, where it helps, what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
