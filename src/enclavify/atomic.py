"""Atomic file writes: a reader sees the old file or the whole new one, never part of either.

The data goes to a temporary file in the target's directory, created with mode 0600 so a
private file is never readable by others while it is written. The file is synced, given its
final mode and renamed (or, with ``replace=False``, hard-linked) into place, and the
directory is synced so the new name survives a crash. On any error the temporary file is
removed and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def writer(path: Path, *, mode: int = 0o644, replace: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary stream whose contents become ``path`` when the block ends without error.

    With ``replace=False`` an existing ``path`` is kept, because the new file is linked to
    the name only while the name is free. Of two processes creating the same file at once,
    exactly one succeeds and the other gets :class:`FileExistsError`.

    Raises:
        FileExistsError: ``replace`` is false and ``path`` already exists.
        OSError: the temporary file cannot be created, written or moved into place.
    """
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
        _sync_directory(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; see :func:`writer` for ``mode`` and ``replace``."""
    with writer(path, mode=mode, replace=replace) as stream:
        stream.write(data)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
