"""One module per ``neurocurate`` sub-command (see :mod:`pipeline.cli`)."""

from __future__ import annotations

from typing import Any


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave (not None): the command-line overrides of one config section."""
    return {k: v for k, v in flags.items() if v is not None}
