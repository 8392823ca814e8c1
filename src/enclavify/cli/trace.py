"""`enclavify trace`: command-line front end."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser("trace", help="(not yet available)")
    parser.set_defaults(handler=_not_available)


def _not_available(args: argparse.Namespace) -> int:
    from enclavify.errors import UsageError

    raise UsageError("'enclavify trace' is not available yet")
