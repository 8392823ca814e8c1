"""``python -m enclavify.runtime run``: the entrypoint of a confidential image."""

from __future__ import annotations

import sys

from enclavify.runtime.launcher import main

sys.exit(main())
