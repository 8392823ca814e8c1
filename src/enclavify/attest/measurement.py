"""The launcher's measurement: what the CAS matches a simulation launcher against.

The measurement is the SHA-256 of a canonical JSON object holding the digest of the carried
runtime tree (``/opt/enclavify``), the application binary and its digest, the digest of the
sealed fspf file and the heap, stack and dlopen settings. The converter computes it from the
image it writes; the launcher computes it again at start from what it finds on disk, before
anything is decrypted, so both sides must see exactly the same inputs.

A binary that lies in a protected region is encrypted in the image. Its digest is then the
marker :data:`PROTECTED_BINARY`, and the fspf digest, which commits to every protected file
through the per-file keys, stands for its content.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat

from enclavify import jsontext
from enclavify.attest.treehash import sha256_stream, tree_entries
from enclavify.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from collections.abc import Sequence
    from os import PathLike
    from typing import IO, Any

    from enclavify.attest.treehash import TreeEntry

    _PathText = str | PathLike[str]

MEASUREMENT_VERSION = 1
PROTECTED_BINARY = "protected"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
HEAP_MIN, HEAP_MAX, HEAP_DEFAULT = 8 * MIB, 60 * GIB, 1 * GIB
STACK_MIN, STACK_MAX, STACK_DEFAULT = 32 * KIB, 8 * MIB, 4 * MIB
DLOPEN_VALUES = (0, 1, 2)
DLOPEN_DEFAULT = 2

# Pattern of a size such as 512k (see parse_size).
_SIZE = r"([0-9]+)([kKmMgG]?)"
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}
_MAX_SYMLINKS = 40


def parse_size(text: str, *, name: str = "size") -> int:
    """Parse a size such as ``1G``, ``4M``, ``512k`` or ``65536`` into bytes.

    Suffixes are binary (k = 1024) and case-insensitive. Raises UsageError on anything else.
    """
    # Imported here because the launcher's measuring child imports this module but never
    # parses a size, and importing re costs it several ms.
    import re  # noqa: PLC0415

    match = re.fullmatch(_SIZE, text.strip())
    if match is None:
        raise UsageError(
            f"invalid {name} {text!r}: expected a number with an optional suffix k, M or G"
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def check_heap(size: int) -> int:
    """Return ``size`` if it is a valid heap size (8 MiB to 60 GiB), else raise UsageError."""
    if not HEAP_MIN <= size <= HEAP_MAX:
        raise UsageError(f"invalid heap size {size} bytes: must be between 8M and 60G")
    return size


def check_stack(size: int) -> int:
    """Return ``size`` if it is a valid stack size (32 KiB to 8 MiB), else raise UsageError."""
    if not STACK_MIN <= size <= STACK_MAX:
        raise UsageError(f"invalid stack size {size} bytes: must be between 32k and 8M")
    return size


def check_dlopen(value: int) -> int:
    """Return ``value`` if it is a valid dlopen mode (0, 1 or 2), else raise UsageError."""
    if value not in DLOPEN_VALUES:
        raise UsageError(f"invalid dlopen mode {value!r}: must be 0, 1 or 2")
    return value


def compute(
    *,
    runtime_digest: str,
    binary: str,
    binary_digest: str,
    fspf_digest: str | None,
    heap: int,
    stack: int,
    dlopen: int,
) -> str:
    """Return the hex measurement of a launcher configuration.

    ``fspf_digest`` is None for an image without protected regions. Raises UsageError when
    heap, stack or dlopen is out of range.
    """
    fields = {
        "version": MEASUREMENT_VERSION,
        "runtime_digest": runtime_digest,
        "binary": binary,
        "binary_digest": binary_digest,
        "fspf_digest": fspf_digest,
        "heap": check_heap(heap),
        "stack": check_stack(stack),
        "dlopen": check_dlopen(dlopen),
    }
    # jsontext.dumps returns what json.dumps(sort_keys=True, separators=(",", ":")) returns.
    encoded = jsontext.dumps(fields).encode()
    return hashlib.sha256(encoded).hexdigest()


def runtime_digest(root: _PathText) -> str:
    """Return the tree hash of the runtime directory ``root``.

    Every entry below ``root`` counts, ``runtime.json`` included: its relative path, type and
    permission bits, the SHA-256 of a regular file's content and a symlink's target. Owners
    and times do not count, because they change when an image is rebuilt or unpacked.
    Raises OSError when the tree cannot be read.
    """
    return entries_digest(tree_entries(root))


def entries_digest(entries: list[TreeEntry]) -> str:
    """Return the runtime digest of the entries :func:`treehash.tree_entries` listed."""
    encoded = jsontext.dumps(entries).encode()
    return hashlib.sha256(encoded).hexdigest()


def fspf_digest(path: _PathText) -> str | None:
    """Return the SHA-256 of the sealed fspf file at ``path``, or None when there is none."""
    try:
        with open(path, "rb") as stream:
            return sha256_stream(stream)
    except FileNotFoundError:
        return None


def in_regions(path: str, regions: Sequence[str]) -> bool:
    """Return whether the absolute ``path`` is a protected region or lies below one."""
    for region in regions:
        top = region.rstrip("/") or "/"
        if top in ("/", path) or path.startswith(top + "/"):
            return True
    return False


def binary_digest(files: Any, binary: str, regions: Sequence[str]) -> str:
    """Return the digest of ``binary`` as the plain part of a confidential image shows it.

    ``files`` has the ``entry(path)`` and ``open(path)`` methods of an image's merged file
    system (or :class:`RootFiles`). Symlinks are followed inside the image root. When the
    path, or any link on the way, lies in one of ``regions``, the binary is encrypted in the
    image and the result is :data:`PROTECTED_BINARY`. Raises UsageError when the binary is
    missing or not a regular file.
    """
    resolved = resolve_binary(files, binary, regions)
    if resolved is None:
        return PROTECTED_BINARY
    with files.open(resolved) as stream:
        return sha256_stream(stream)


def resolve_binary(files: Any, binary: str, regions: Sequence[str]) -> str | None:
    """Return the path of the regular file that ``binary`` names, or None when it is protected.

    ``files`` and ``regions`` are as for :func:`binary_digest`. Raises UsageError when the
    binary is missing or not a regular file.
    """
    if not posixpath.isabs(binary):
        raise UsageError(f"binary {binary!r} must be an absolute path")
    resolved = resolve_path(files, binary, regions)
    if resolved is None:
        return None
    entry = files.entry(resolved)
    if entry is None:
        raise UsageError(f"binary {binary!r} not found in the image")
    if entry.type not in ("file", "hardlink"):
        raise UsageError(f"binary {binary!r} is not a regular file")
    return str(resolved)


def resolve_path(files: Any, path: str, regions: Sequence[str] = ()) -> str | None:
    """Return ``path`` with every symlink followed inside the root of ``files``.

    Returns None when the path, or a link on the way, enters one of ``regions``. A missing
    final component is returned as it is (the caller checks it); a missing directory on the
    way, or a symlink loop, raises UsageError.
    """
    pending = [part for part in path.split("/") if part]
    current = "/"
    links = 0
    while pending:
        part = pending.pop(0)
        candidate = posixpath.normpath(posixpath.join(current, part))
        if in_regions(candidate, regions):
            return None
        entry = files.entry(candidate)
        if entry is None:
            if pending:
                raise UsageError(f"{path!r} not found in the image: {candidate!r} is missing")
            return candidate
        if entry.type == "symlink":
            links += 1
            if links > _MAX_SYMLINKS:
                raise UsageError(f"{path!r}: too many levels of symbolic links")
            target = posixpath.normpath(posixpath.join(current, entry.linkname))
            pending = [p for p in target.split("/") if p] + pending
            current = "/"
            continue
        current = candidate
    return current


class _Entry:
    def __init__(self, path: str, type_: str, mode: int, size: int, linkname: str) -> None:
        self.path = path
        self.type = type_
        self.mode = mode
        self.size = size
        self.linkname = linkname
        self.uid = 0
        self.gid = 0
        self.mtime = 0.0


class RootFiles:
    """Read-only view of a directory tree as if it were an image root.

    Absolute paths are taken relative to ``root``; ``..`` never leaves it.
    """

    def __init__(self, root: _PathText) -> None:
        self.root = os.fspath(root)

    def host_path(self, path: str) -> str:
        """Return the host path of the image path ``path`` (no symlink following)."""
        normal = posixpath.normpath("/" + path.lstrip("/"))
        return os.path.join(self.root, normal.lstrip("/")) if normal != "/" else self.root

    def entry(self, path: str) -> _Entry | None:
        """Return the entry at ``path`` without following a final symlink, or None."""
        try:
            info = os.lstat(self.host_path(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        normal = posixpath.normpath("/" + path.lstrip("/"))
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(self.host_path(path))
            return _Entry(normal, "symlink", mode, 0, target)
        if stat.S_ISDIR(info.st_mode):
            return _Entry(normal, "dir", mode, 0, "")
        if stat.S_ISREG(info.st_mode):
            return _Entry(normal, "file", mode, info.st_size, "")
        return _Entry(normal, "other", mode, 0, "")

    def resolve(self, path: str) -> str | None:
        """Return ``path`` with every symlink followed inside the root, or None if missing."""
        try:
            resolved = resolve_path(self, path)
        except UsageError:
            return None
        if resolved is None or self.entry(resolved) is None:
            return None
        return resolved

    def open(self, path: str) -> IO[bytes]:
        """Open the regular file at ``path`` (symlinks followed inside the root)."""
        resolved = self.resolve(path)
        if resolved is None:
            raise FileNotFoundError(path)
        return open(self.host_path(resolved), "rb")
