"""The entrypoint of a confidential image: ``python3 .../enclavify/runtime/__main__.py run``.

The image runs this file by its path rather than with ``-m enclavify.runtime``, which would
import runpy first. ``python -m enclavify.runtime`` works as well.
"""

from __future__ import annotations

import os
import sys

from enclavify.runtime.measuring import PendingMeasurement


def _main() -> int:
    if sys.argv[1:2] not in ([], ["run"]):
        from enclavify.runtime.launcher import main  # noqa: PLC0415

        return main()
    # The measurement starts in a child process and the CAS challenge in a thread before the
    # launcher's other modules are imported. Hashing and the CAS round trip then overlap them.
    pending = PendingMeasurement()
    from enclavify import logs  # noqa: PLC0415
    from enclavify.runtime.casaccess import start_challenge  # noqa: PLC0415

    # Set before the thread starts, because a record logged earlier would import logging.
    logs.to_stderr(os.environ.get("ENCLAVIFY_LOG_LEVEL", "warning"))
    early = start_challenge(os.environ)
    from enclavify.runtime.launcher import main  # noqa: PLC0415

    return main(pending=pending, early=early)


sys.exit(_main())
