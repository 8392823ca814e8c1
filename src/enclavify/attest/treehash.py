"""Hashing a directory tree entry by entry: the input of the runtime digest.

:func:`tree_entries` lists every entry below a directory with its type, permission bits and
the SHA-256 of a regular file's content or a symlink's target. :mod:`.measurement` turns the
list into the runtime digest. This is a module of its own because it needs only hashlib:
the launcher's measuring child imports nothing else before it starts hashing.
:func:`sha256_and_compare` lets the launcher take the digest of a file that is a copy of one
it hashes anyway (see :mod:`enclavify.runtime.measuring`).

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from os import PathLike
    from typing import IO

    # Evaluated by type checkers only, so the newer syntax does not reach Python 3.8.
    TreeEntry = list[str | int]

# Files are hashed in blocks of this size.
BLOCK = 256 * 1024
# The digest of a deferred entry (see tree_entries) until the caller supplies it.
DEFERRED = "deferred"


def tree_entries(root: str | PathLike[str], deferred: str | None = None) -> list[TreeEntry]:
    """Return ``[type, relative path, mode, digest or target]`` for every entry below ``root``.

    Entries are sorted by path. The type is ``file``, ``dir``, ``symlink`` or ``other``. A
    file carries the SHA-256 of its content, a symlink its target (and mode 0), anything
    else an empty string. The regular file at the relative path ``deferred``, if there is
    one, is not read: its entry carries :data:`DEFERRED` for the caller to replace. Raises
    OSError when the tree cannot be read.
    """
    root = os.fspath(root)
    buffer = bytearray(BLOCK)
    entries: list[TreeEntry] = []
    for relative in _sorted_tree(root):
        if relative == deferred:
            info = os.lstat(os.path.join(root, relative))
            if stat.S_ISREG(info.st_mode):
                entries.append(["file", relative, stat.S_IMODE(info.st_mode), DEFERRED])
                continue
        entries.append(entry_of(root, relative, buffer))
    return entries


def entry_of(
    root: str | PathLike[str], relative: str, buffer: bytearray | None = None
) -> TreeEntry:
    """Return the :func:`tree_entries` entry of the ``/``-separated path ``relative`` in ``root``.

    Raises OSError when the entry cannot be read.
    """
    full = os.path.join(root, relative)
    info = os.lstat(full)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return ["symlink", relative, 0, os.readlink(full)]
    if stat.S_ISDIR(info.st_mode):
        return ["dir", relative, mode, ""]
    if stat.S_ISREG(info.st_mode):
        with open(full, "rb", buffering=0) as stream:
            return ["file", relative, mode, sha256_stream(stream, buffer)]
    return ["other", relative, mode, ""]


def _sorted_tree(root: str) -> list[str]:
    relatives = []
    for directory, dirnames, filenames in os.walk(root):
        base = os.path.relpath(directory, root)
        for name in dirnames + filenames:
            relatives.append(name if base == "." else posixpath.join(base, name))
    return sorted(relatives)


def sha256_and_compare(stream: IO[bytes], other: IO[bytes]) -> tuple[str, bool]:
    """Return the SHA-256 of what is left in ``stream``, and whether ``other`` has the same bytes.

    Comparing costs less than half of hashing (1.9 against 4.8 ms for 6.8 MB on the
    development machine), so a copy of a file hashed anyway need not be hashed again.
    Comparing stops at the first difference.
    """
    digest = hashlib.sha256()
    block, other_block = bytearray(BLOCK), bytearray(BLOCK)
    view = memoryview(block)
    identical = True
    while True:
        count = _read_into(stream, block)
        if identical:
            other_count = _read_into(other, other_block)
            # bytearray equality is a memcmp; the last, partial block is compared as copies.
            identical = other_count == count and (
                block == other_block if count == BLOCK else block[:count] == other_block[:count]
            )
        if not count:
            return digest.hexdigest(), identical
        digest.update(view[:count])


def _read_into(stream: IO[bytes], block: bytearray) -> int:
    """Fill ``block`` from ``stream`` as far as it goes; return the bytes read (0 at the end)."""
    view = memoryview(block)
    filled = 0
    while filled < len(block):
        count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled


def sha256_stream(stream: IO[bytes], buffer: bytearray | None = None) -> str:
    """Return the SHA-256 of what is left in ``stream``, read in blocks into ``buffer``.

    A reused buffer, because a fresh block per read costs page faults on every block.
    """
    digest = hashlib.sha256()
    block = buffer if buffer is not None else bytearray(BLOCK)
    view = memoryview(block)
    readinto = getattr(stream, "readinto", None)
    while True:
        if readinto is not None:
            count = readinto(block)
        else:
            data = stream.read(len(block))
            count = len(data)
            view[:count] = data
        if not count:
            break
        digest.update(view[:count])
    return digest.hexdigest()
