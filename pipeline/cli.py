"""``neurocurate`` command line.

Each sub-command lives in ``pipeline/commands/<name>.py`` and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; ``run``
turns the arguments into a typed call of its stage (``pipeline/stages/<stage>.py``)
and does nothing else. Argument parsing and printing happen here and in the
commands only; the stages' user-facing messages (``neurocurate.user`` logger) are
shown on standard output. Command modules import heavy libraries inside ``run`` so
``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from pipeline import __version__
from pipeline.core.config import ConfigError
from pipeline.core.console import attach_console
from pipeline.core.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, NeurocurateError

# (sub-command name, module); order is the order shown in --help.
COMMANDS: list[tuple[str, str]] = [
    ("prep", "pipeline.commands.prep"),
    ("import-timeseries", "pipeline.commands.import_timeseries"),
    ("qc", "pipeline.commands.qc"),
    ("gradients", "pipeline.commands.gradients"),
    ("shards", "pipeline.commands.shards"),
    ("pretrain", "pipeline.commands.pretrain"),
    ("evaluate", "pipeline.commands.evaluate"),
    ("run", "pipeline.commands.run"),
    ("demo", "pipeline.commands.demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurocurate",
        description="BIDS dataset -> preprocessing -> QC/curation -> shards -> MoE-JEPA pretraining -> evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"neurocurate {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    # nipype would otherwise ask a web service for updates at import time.
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    attach_console()
    previous = _stop_on_sigterm()
    try:
        return int(args._module.run(args) or 0)
    except (NeurocurateError, ConfigError) as exc:
        print(f"neurocurate {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print(f"neurocurate {args.command}: stopped by SIGTERM; nothing half-written is left, "
              "run the same command again to continue", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"neurocurate {args.command}: interrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so every ``finally`` and atomic write cleans up before exit."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated


def _stop_on_sigterm():
    """Turn SIGTERM (a scheduler's stop, ``kill``) into :class:`Terminated`; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
