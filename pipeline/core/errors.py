"""Exceptions that the command line turns into a one-line message, and the exit codes (their one owner)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_TERMINATED", "InputError", "NeurocurateError"]

#: Everything done.
EXIT_OK = 0
#: A usage or input error, or a stage that failed as a whole (nothing after it ran).
EXIT_ERROR = 2
#: Partial: some subjects or scans failed, every other one finished.
EXIT_PARTIAL = 3
#: Stopped by Ctrl-C / SIGINT (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Stopped by SIGTERM (128 + SIGTERM), after cleaning up.
EXIT_TERMINATED = 143


class NeurocurateError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits 2."""


class InputError(NeurocurateError):
    """A bad input file: the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        # one line, whatever the underlying library put into its message
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")
