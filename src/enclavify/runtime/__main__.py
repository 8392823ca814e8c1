"""The entrypoint of a confidential image: ``python3 .../enclavify/runtime/__main__.py run``.

The image runs this file by its path rather than with ``-m enclavify.runtime``, which would
import runpy first. ``python -m enclavify.runtime`` works as well.
"""

from __future__ import annotations

import sys

from enclavify.runtime.measuring import PendingMeasurement


def _main() -> int:
    # The measurement starts in a child process before the launcher's other modules are
    # imported, so that hashing the runtime overlaps importing them.
    pending = PendingMeasurement() if sys.argv[1:2] in ([], ["run"]) else None
    from enclavify.runtime.launcher import main  # noqa: PLC0415

    return main(pending=pending)


sys.exit(_main())
