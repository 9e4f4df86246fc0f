"""Exceptions that the command line turns into a one-line message."""

from __future__ import annotations

from pathlib import Path

__all__ = ["NeurocurateError", "InputError"]


class NeurocurateError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits 2."""


class InputError(NeurocurateError):
    """A bad input file: the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
