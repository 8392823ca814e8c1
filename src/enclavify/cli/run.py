"""`enclavify run`: the launcher of a confidential image, started from the command line.

Inside an image the entrypoint runs the carried ``enclavify/runtime/__main__.py run`` on the
carried interpreter. This front end runs the same code from an installed enclavify, which is
useful for tests and for checking a runtime directory's measurement.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from enclavify.runtime import launcher
from enclavify.runtime.config import CONFIG_NAME, RUNTIME_DIR, RuntimeConfig
from enclavify.runtime.measuring import measure


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="start the application of a confidential image (the image's entrypoint)",
        description=(
            "Attest to the CAS, decrypt the protected regions into memory and replace this "
            "process with the application. Inside a confidential image this is the "
            "entrypoint. The insecure debug source ENCLAVIFY_INSECURE_CONFIG_FILE replaces "
            "the CAS with a JSON file and logs a warning each time."
        ),
    )
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=RUNTIME_DIR,
        help=f"directory of the carried runtime and its {CONFIG_NAME} (default: %(default)s)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="root of the image's file system (default: %(default)s)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="print the measurement of the runtime and exit instead of starting anything",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.measure:
        config = RuntimeConfig.load(args.runtime_dir / CONFIG_NAME)
        print(measure(config, args.runtime_dir, args.root))
        return 0
    launcher.launch(environ=os.environ, runtime_dir=args.runtime_dir, root=args.root)
    return 1
