"""The ``enclavify`` command line.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parser and sets ``handler`` on it. A handler takes the parsed arguments and returns an exit
code. This module owns the one exit path: it sets up logging, turns :class:`enclavify.errors.Error`
into a message on stderr with exit code 1 (2 for usage errors), and lets nothing else pass silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from enclavify import __version__
from enclavify.errors import Error, UsageError

from . import cas, device, evidence, image, run, session, trace

log = logging.getLogger("enclavify")

GROUPS = (image, cas, session, run, trace, device, evidence)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclavify",
        description="Make container images confidential and run them under attestation.",
    )
    parser.add_argument("--version", action="version", version=f"enclavify {__version__}")
    add_logging_flags(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(subparsers)
    return parser


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``-v``/``--verbose`` and ``--no-color``, shared by every front end."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log debug detail to stderr"
    )
    parser.add_argument(
        "--no-color", action="store_true", help="no colours or progress bars on stderr"
    )


def configure_logging(verbose: int) -> None:
    """Send log records to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_handler(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str = "enclavify"
) -> int:
    """Run a command handler and map enclavify's errors to exit codes."""
    try:
        return handler(args)
    except UsageError as error:
        print(f"{prog}: error: {error.diagnostics()}", file=sys.stderr)
        return 2
    except Error as error:
        print(f"{prog}: error: {error.diagnostics()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_handler(args.handler, args)
