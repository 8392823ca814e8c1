"""Checks against the source image's file system, and the inventory of what gets protected.

Everything here reads metadata only. It runs before the first irreversible step, so a bad
``--dir``, ``--plain`` or ``--binary`` is reported before any layer is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from enclavify.errors import UsageError
from enclavify.image import FileEntry, MergedFilesystem

from .options import FSPF_PATH, RUNTIME_DIR, is_within

log = logging.getLogger(__name__)

_SUPPORTED_TYPES = ("file", "dir", "symlink", "hardlink")


@dataclass(frozen=True)
class Inventory:
    """The entries under the protected regions, in walk order, and their plaintext bytes."""

    entries: tuple[FileEntry, ...]
    file_count: int
    plain_bytes: int


def check_directory(filesystem: MergedFilesystem, path: str, *, option: str) -> None:
    """Check that ``path`` is a real directory of the image, reached without symbolic links.

    Raises:
        UsageError: the path is absent, not a directory, or goes through a symbolic link
            (the message names the real path to give instead).
    """
    resolved = filesystem.resolve(path)
    entry = filesystem.entry(path)
    if resolved is not None and resolved != path:
        raise UsageError(
            f"{option} {path!r} goes through a symbolic link to {resolved!r} in the image; "
            f"give the real path {resolved!r}"
        )
    if entry is None:
        raise UsageError(f"{option} {path!r} does not exist in the image")
    if entry.type != "dir":
        raise UsageError(
            f"{option} {path!r} is not a directory in the image (it is a {entry.type})"
        )


def check_binary(filesystem: MergedFilesystem, path: str) -> str:
    """Check that ``path`` is a regular file of the image and return its resolved path.

    Raises:
        UsageError: the binary is absent, a dangling link, or not a regular file.
    """
    resolved = filesystem.resolve(path)
    if resolved is None:
        raise UsageError(f"--binary {path!r} does not exist in the image")
    entry = filesystem.entry(resolved)
    if entry is None or entry.type not in ("file", "hardlink"):
        kind = entry.type if entry is not None else "missing entry"
        raise UsageError(f"--binary {path!r} is not a regular file in the image (it is a {kind})")
    return resolved


def check_not_confidential(filesystem: MergedFilesystem) -> None:
    """Reject a source that already is a confidential image.

    Raises:
        UsageError: the image has the fspf or the runtime directory.
    """
    for marker in (FSPF_PATH, RUNTIME_DIR):
        if filesystem.entry(marker) is not None:
            raise UsageError(
                f"the source image already contains {marker}: it is a confidential image "
                f"(convert the native image instead)"
            )


def _region_of(path: str, regions: Sequence[str]) -> str | None:
    for region in regions:
        if is_within(path, region):
            return region
    return None


def take_inventory(filesystem: MergedFilesystem, regions: Sequence[str]) -> Inventory:
    """List what lies under ``regions`` and check that it can be sealed and removed.

    Walks the whole image once, because a hard link outside the regions whose target is inside
    one would keep the target's content in the clear once the target is removed.

    Raises:
        UsageError: a hard link crosses a region boundary from outside, or an entry has a type
            the protected file system cannot hold.
    """
    entries: list[FileEntry] = []
    file_count = 0
    plain_bytes = 0
    for entry in filesystem.walk("/"):
        region = _region_of(entry.path, regions)
        if region is None:
            if entry.type == "hardlink" and entry.linkname is not None:
                target_region = _region_of(entry.linkname, regions)
                if target_region is not None:
                    raise UsageError(
                        f"{entry.path!r} is a hard link to {entry.linkname!r} inside --dir "
                        f"{target_region!r}: the same content would stay readable outside "
                        f"the protected directory; protect {entry.path!r} too or remove the link"
                    )
            continue
        if entry.type not in _SUPPORTED_TYPES:
            raise UsageError(
                f"{entry.path!r} under --dir {region!r} is a {entry.type}, which a protected "
                f"directory cannot hold"
            )
        entries.append(entry)
        if entry.type in ("file", "hardlink"):
            file_count += 1
        if entry.type == "file":
            plain_bytes += entry.size
    log.debug("inventory: %d entries, %d files, %d bytes", len(entries), file_count, plain_bytes)
    return Inventory(tuple(entries), file_count, plain_bytes)
