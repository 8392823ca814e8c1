"""The conversion result file: what the session tooling needs, including the fspf key.

The file holds the volume key and tag of the protected file system, so it is created with mode
0600 from the first byte (never chmod-ed after the fact) and appears under its final name only
once complete (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class PendingResult:
    """A result file written to a temporary name beside its destination, not yet published."""

    def __init__(self, destination: Path, document: dict[str, Any]) -> None:
        self.destination = destination
        directory = destination.parent if str(destination.parent) else Path.cwd()
        descriptor, name = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=".tmp", dir=directory
        )
        self.temporary = Path(name)
        try:
            # mkstemp creates the file with mode 0600; fchmod keeps it so under any umask.
            os.fchmod(descriptor, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                descriptor = -1
                json.dump(document, stream, indent=2, sort_keys=True)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
        except BaseException:
            if descriptor >= 0:
                os.close(descriptor)
            self.discard()
            raise

    def publish(self) -> None:
        """Move the file to its destination name."""
        os.replace(self.temporary, self.destination)

    def discard(self) -> None:
        """Remove the temporary file; safe to call more than once."""
        with contextlib.suppress(FileNotFoundError):
            self.temporary.unlink()
