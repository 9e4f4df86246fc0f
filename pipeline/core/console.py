"""User-facing messages of the stages.

Stages never print: they log what a user should see to :data:`USER_LOG` (one line per message).
The command line shows those records plain, ``INFO`` on standard output and ``WARNING`` or worse on
standard error; a library caller sees them as ordinary records of the ``neurocurate.user`` logger.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["USER_LOG", "attach_console"]

USER_LOG = logging.getLogger("neurocurate.user")


class _ConsoleHandler(logging.Handler):
    """Writes each record's message to the *current* ``sys.stdout`` (``INFO``) or ``sys.stderr`` (``WARNING``+),
    looked up at every record so that redirection and capture work."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def attach_console() -> None:
    """Show :data:`USER_LOG` on the console (idempotent; called by the CLI)."""
    if not any(isinstance(h, _ConsoleHandler) for h in USER_LOG.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        USER_LOG.addHandler(handler)
    USER_LOG.setLevel(logging.INFO)
    USER_LOG.propagate = False
