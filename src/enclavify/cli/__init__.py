"""The ``enclavify`` command line.

Each command group lives in its own module, named like the command, with a
``register(subparsers)`` function that adds its parser and sets ``handler`` on it. A handler
takes the parsed arguments and returns an exit code. :func:`main` imports only the group named
on the command line: the CAS server stack (asyncio, the PostgreSQL driver) costs about 0.15 s
to import, which ``image convert`` has no use for.

This module owns the one exit path: it sets up logging, turns
:class:`enclavify.errors.Error` into a message on stderr with exit code 1 (2 for usage
errors), and lets nothing else pass silently.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from enclavify import __version__
from enclavify.errors import Error, UsageError

log = logging.getLogger("enclavify")

# The command groups, in the order of the help text; each is the module of that name here.
GROUPS = ("image", "cas", "session", "run", "trace", "device", "evidence")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the command-line parser; with ``only``, a name in :data:`GROUPS`, that group alone."""
    parser = argparse.ArgumentParser(
        prog="enclavify",
        description="Make container images confidential and run them under attestation.",
    )
    parser.add_argument("--version", action="version", version=f"enclavify {__version__}")
    add_logging_flags(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS if only is None else (only,):
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """Return the command group named in ``argv`` (after the top-level flags), if known."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in GROUPS else None
    return None


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
    arguments = list(sys.argv[1:] if argv is None else argv)
    # A known command needs only its own group. Anything else (no command, --help, a typo)
    # gets the whole parser, so that the help and the error message list every command.
    parser = build_parser(only=_command(arguments))
    args = parser.parse_args(arguments)
    configure_logging(args.verbose)
    return run_handler(args.handler, args)
