"""Where decrypted files may go: memory-backed mounts only.

The launcher never writes plaintext to a disk-backed file system. A protected region must be
a tmpfs or ramfs mount (``podman run --tmpfs /app``); when it is not, and the launcher may
mount (CAP_SYS_ADMIN), it mounts a tmpfs there itself.

This module is carried into confidential images: standard library only, Python 3.8 syntax.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from enclavify import logs
from enclavify.errors import LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
    from typing import List, Optional, Tuple

log = logs.get_logger(__name__)

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
_TMPFS_MAGIC = 0x01021994
_RAMFS_MAGIC = 0x858458F6
_MS_NOSUID = 2
_MS_NODEV = 4
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as three-digit octal escapes.
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def read_mounts(mountinfo: str = MOUNTINFO) -> List[Tuple[str, str]]:
    """Return ``(mount point, file system type)`` pairs from ``mountinfo``, in mount order."""
    mounts = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as stream:
        for line in stream:
            left, _, right = line.partition(" - ")
            fields = left.split()
            kinds = right.split()
            if len(fields) >= 5 and kinds:
                mounts.append((_unescape(fields[4]), kinds[0]))
    return mounts


def _existing_ancestor(path: str) -> str:
    current = os.path.realpath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


class MountTable:
    """The mount table as read once, for looking up the file systems of several paths.

    Reading and parsing ``mountinfo`` for each of the launcher's regions and injected files
    took about 0.15 ms a path in a container. Read it again after mounting something.
    """

    def __init__(self, mountinfo: str = MOUNTINFO) -> None:
        try:
            self._mounts: Optional[List[Tuple[str, str]]] = read_mounts(mountinfo)
        except OSError:
            self._mounts = None  # each lookup calls statfs(2) instead

    def filesystem_type(self, path: str) -> Optional[str]:
        """Return the type of the file system that contains ``path`` (or would, once created).

        Uses the mount table when it was readable, else statfs(2) (then only tmpfs and ramfs
        are recognized, and other types are reported as ``"other"``). None when neither works.
        """
        target = _existing_ancestor(path)
        if self._mounts is None:
            return _statfs_type(target)
        best: Optional[Tuple[str, str]] = None
        for point, kind in self._mounts:
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            # A later mount on the same or a deeper point hides the earlier ones.
            if inside and (best is None or len(point) >= len(best[0])):
                best = (point, kind)
        return best[1] if best else None

    def is_memory_backed(self, path: str) -> bool:
        """Return whether files written at ``path`` stay in memory."""
        return self.filesystem_type(path) in MEMORY_FILESYSTEMS


def filesystem_type(path: str, mountinfo: str = MOUNTINFO) -> Optional[str]:
    """Return the type of the file system that contains ``path``; see :class:`MountTable`."""
    return MountTable(mountinfo).filesystem_type(path)


def _statfs_type(path: str) -> Optional[str]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(512)
        if libc.statfs(path.encode(), buffer) != 0:
            return None
    except (OSError, AttributeError):
        return None
    # f_type is the first field of struct statfs, a long on most 64-bit architectures (glibc
    # and musl). Its low 32 bits, read as a native unsigned int, hold the magic number on
    # little-endian and 32-bit systems. NOTE: on big-endian 64-bit systems with a long
    # f_type this misreads, but the mount table is read first and /proc is normally there.
    magic = struct.unpack_from("=I", buffer.raw)[0]
    if magic == _TMPFS_MAGIC:
        return "tmpfs"
    if magic == _RAMFS_MAGIC:
        return "ramfs"
    return "other"


def is_memory_backed(
    path: str, mountinfo: str = MOUNTINFO, table: Optional[MountTable] = None
) -> bool:
    """Return whether files written at ``path`` stay in memory.

    ``table`` is the mount table if the caller read it already.
    """
    return (table or MountTable(mountinfo)).is_memory_backed(path)


def ensure_memory_backed(
    region: str, mountinfo: str = MOUNTINFO, table: Optional[MountTable] = None
) -> bool:
    """Make sure ``region`` is memory-backed, mounting a tmpfs there if allowed.

    ``table`` is the mount table if the caller read it already. Returns whether a tmpfs was
    mounted, which makes the table out of date. Raises LaunchError naming the region and the
    ``--tmpfs`` fix when it is not memory-backed and the launcher cannot mount.
    """
    if (table or MountTable(mountinfo)).is_memory_backed(region):
        log.debug("region %s is memory-backed", region)
        return False
    advice = (
        f"protected region {region!r} is not on a memory-backed file system and the "
        f"launcher may not mount one; run the container with --tmpfs {region} "
        f"(compose: tmpfs: [{region}])"
    )
    try:
        os.makedirs(region, exist_ok=True)
    except OSError as error:
        raise LaunchError(advice) from error
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(b"tmpfs", region.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755")
    if result != 0:
        code = ctypes.get_errno()
        if code in (errno.EPERM, errno.EACCES):
            raise LaunchError(advice)
        raise LaunchError(f"mounting a tmpfs on {region!r} failed: {os.strerror(code)}")
    if not is_memory_backed(region, mountinfo):
        raise LaunchError(advice)
    log.debug("mounted a tmpfs on region %s", region)
    return True
