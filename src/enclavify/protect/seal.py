"""Sealing: turn files into a pack of ciphertext objects and an fspf (format in :mod:`.format`).

:class:`Sealer` takes entries one at a time from any source, such as a directory tree or the
merged view of an image. Each file's object is the next part of the pack, produced one sealed
chunk at a time, so no file is ever held in memory whole. :func:`seal_tree` seals parts of a
directory tree into ``output/fspf`` and ``output/pack``.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from enclavify import crypto
from enclavify.errors import ProtectError
from enclavify.protect.format import (
    CHUNK_SIZE,
    FILE_ID_SIZE,
    FSPF_HEADER,
    FSPF_NAME,
    KEY_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    NONCE_SIZE,
    PACK_NAME,
    TAG_SIZE,
    Entry,
    Manifest,
    check_metadata,
    check_path,
    chunk_aad,
    chunk_count,
    chunk_nonce,
    read_exactly,
    region_of,
    sealed_size,
)

log = logging.getLogger(__name__)

WritePack = Callable[[bytes], object]

# Buffer size for writing the pack in seal_tree: large writes keep syscalls off the profile.
_WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class SealedVolume:
    """A sealed fspf with the secrets that open it.

    ``key`` and ``tag`` go into the session and never into the image.
    """

    fspf: bytes
    key: bytes = field(repr=False)
    tag: bytes


class Sealer:
    """Seal entries of the protected ``regions`` into a pack and, at :meth:`finish`, an fspf.

    Each regular file's object is the next part of the pack. :meth:`add_file` passes its
    sealed chunks to ``write`` as they are made; :meth:`seal_file` returns them as an iterator
    instead, for a caller that reads the pack as a stream. ``randbytes`` supplies every key,
    id and nonce, so tests can make sealing deterministic.

    Raises (from every ``add_*`` and :meth:`seal_file`):
        ProtectError: the path is not absolute and normalized, lies outside every region,
            was added before, or the file's stream does not hold exactly ``size`` bytes.
    """

    def __init__(
        self,
        regions: Sequence[str],
        write: WritePack | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size must be in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}, got {chunk_size}"
            )
        self._regions = tuple(check_path(region, "region") for region in regions)
        if not self._regions:
            raise ProtectError("no protected region given")
        self._write = write
        self._chunk_size = chunk_size
        self._randbytes = randbytes
        self._entries: list[Entry] = []
        self._kinds: dict[str, str] = {}
        self._pack_size = 0
        # The path of a file whose chunks seal_file() is still producing, if any.
        self._sealing: str | None = None
        self._finished = False

    @property
    def pack_size(self) -> int:
        """The bytes of the objects sealed so far."""
        return self._pack_size

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("Sealer.finish() was already called")
        if self._sealing is not None:
            raise RuntimeError(f"the object of {self._sealing!r} was not read to its end")

    def _admit(self, path: str) -> str:
        self._check_open()
        check_path(path)
        if region_of(path, self._regions) is None:
            raise ProtectError(
                f"{path!r} lies outside every protected region {list(self._regions)!r}"
            )
        if path in self._kinds:
            raise ProtectError(f"{path!r} was added twice")
        return path

    def _random(self, size: int) -> bytes:
        value = self._randbytes(size)
        if len(value) != size:
            raise RuntimeError(f"randbytes returned {len(value)} bytes instead of {size}")
        return bytes(value)

    def _record(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._kinds[entry.path] = entry.type

    def add_directory(self, path: str, *, mode: int, uid: int, gid: int, mtime: float) -> None:
        """Add a directory entry."""
        self._admit(path)
        check_metadata(repr(path), mode=stat.S_IMODE(mode), uid=uid, gid=gid, mtime=mtime)
        self._record(
            Entry(type="dir", path=path, mode=stat.S_IMODE(mode), uid=uid, gid=gid, mtime=mtime)
        )

    def add_symlink(self, path: str, target: str, *, uid: int, gid: int, mtime: float) -> None:
        """Add a symlink; ``target`` is stored as given and resolved only inside the container."""
        self._admit(path)
        if not target or "\x00" in target:
            raise ProtectError(f"symlink {path!r} has an empty target or one with a NUL byte")
        check_metadata(repr(path), mode=0o777, uid=uid, gid=gid, mtime=mtime)
        self._record(
            Entry(
                type="symlink", path=path, target=target, mode=0o777, uid=uid, gid=gid, mtime=mtime
            )
        )

    def add_hardlink(self, path: str, target: str) -> None:
        """Add a hardlink to ``target``, a regular file added before."""
        self._admit(path)
        if self._kinds.get(target) != "file":
            raise ProtectError(
                f"hardlink {path!r} points to {target!r}, which is not a protected file added "
                "before it"
            )
        self._record(Entry(type="hardlink", path=path, target=target))

    def add_file(
        self,
        path: str,
        stream: BinaryIO,
        size: int,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: float,
    ) -> None:
        """Seal a regular file of ``size`` bytes read from ``stream`` and record it.

        Passes the object to the ``write`` given at construction, one sealed chunk at a time.
        """
        if self._write is None:
            raise RuntimeError("this Sealer has no pack writer; use seal_file()")
        for chunk in self.seal_file(path, stream, size, mode=mode, uid=uid, gid=gid, mtime=mtime):
            self._write(chunk)

    def seal_file(
        self,
        path: str,
        stream: BinaryIO,
        size: int,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: float,
    ) -> Iterator[bytes]:
        """Return the sealed chunks of a regular file of ``size`` bytes read from ``stream``.

        They are the next object of the pack. The file is recorded when the iterator ends,
        and it must be run to its end before anything else is added.
        """
        self._admit(path)
        if size < 0:
            raise ProtectError(f"file {path!r} has a negative size {size}")
        check_metadata(repr(path), mode=stat.S_IMODE(mode), uid=uid, gid=gid, mtime=mtime)
        entry = Entry(
            type="file",
            path=path,
            mode=stat.S_IMODE(mode),
            uid=uid,
            gid=gid,
            mtime=mtime,
            size=size,
            offset=self._pack_size,
            key=self._random(KEY_SIZE),
            file_id=self._random(FILE_ID_SIZE),
        )
        self._sealing = path
        return self._seal_chunks(entry, stream)

    def _seal_chunks(self, entry: Entry, stream: BinaryIO) -> Iterator[bytes]:
        cipher = crypto.AesGcm(entry.key)
        size = entry.size
        count = chunk_count(size, self._chunk_size)
        remaining = size
        for index in range(count):
            want = min(self._chunk_size, remaining)
            plaintext = read_exactly(stream.read, want)
            if len(plaintext) != want:
                raise ProtectError(
                    f"file {entry.path!r} ended after {size - remaining + len(plaintext)} "
                    f"bytes, expected {size}"
                )
            remaining -= want
            last = index == count - 1
            yield cipher.encrypt(
                chunk_nonce(index), plaintext, chunk_aad(entry.file_id, index, last)
            )
        if stream.read(1):
            raise ProtectError(f"file {entry.path!r} is longer than the expected {size} bytes")
        self._sealing = None
        self._pack_size += sealed_size(size, self._chunk_size)
        self._record(entry)
        log.debug("sealed %s (%d bytes) at offset %d of the pack", entry.path, size, entry.offset)

    def finish(self) -> SealedVolume:
        """Encrypt the manifest under a fresh volume key and return the fspf with key and tag."""
        self._check_open()
        self._finished = True
        manifest = Manifest(
            regions=self._regions, entries=tuple(self._entries), chunk_size=self._chunk_size
        )
        key = self._random(KEY_SIZE)
        nonce = self._random(NONCE_SIZE)
        sealed = crypto.aes_gcm_encrypt(key, nonce, manifest.to_bytes(), FSPF_HEADER)
        fspf = FSPF_HEADER + nonce + sealed
        log.debug(
            "sealed fspf with %d entries in %d regions", len(self._entries), len(self._regions)
        )
        return SealedVolume(fspf=fspf, key=key, tag=sealed[-TAG_SIZE:])


def _sorted_scandir(directory: str) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as iterator:
        return sorted(iterator, key=lambda item: item.name)


class _TreeWalker:
    """Feed a region of a directory tree to a Sealer, without following symlinks."""

    def __init__(self, root: Path, sealer: Sealer) -> None:
        self._root = str(root)
        self._sealer = sealer
        self._inodes: dict[tuple[int, int], str] = {}

    def add(self, path: str, host_path: str) -> None:
        info = os.lstat(host_path)
        mode = info.st_mode
        uid, gid, mtime = info.st_uid, info.st_gid, info.st_mtime
        if stat.S_ISDIR(mode):
            self._sealer.add_directory(path, mode=mode, uid=uid, gid=gid, mtime=mtime)
            for item in _sorted_scandir(host_path):
                self.add(path.rstrip("/") + "/" + item.name, item.path)
        elif stat.S_ISLNK(mode):
            self._sealer.add_symlink(path, os.readlink(host_path), uid=uid, gid=gid, mtime=mtime)
        elif stat.S_ISREG(mode):
            inode = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and inode in self._inodes:
                self._sealer.add_hardlink(path, self._inodes[inode])
                return
            with open(host_path, "rb", buffering=0) as stream:
                self._sealer.add_file(
                    path, stream, info.st_size, mode=mode, uid=uid, gid=gid, mtime=mtime
                )
            if info.st_nlink > 1:
                self._inodes[inode] = path
        else:
            raise ProtectError(
                f"{path!r} is a special file (mode {mode:o}); only directories, regular "
                "files and symlinks can be protected"
            )


def seal_tree(root: Path, regions: Sequence[str], output: Path) -> SealedVolume:
    """Seal ``root/<region>`` for every region into ``output/fspf`` and ``output/pack``.

    Paths in the fspf are absolute below ``root`` (``root/app/x`` is ``/app/x``). ``output``
    must not exist; it is built next to itself and renamed into place when complete, so a
    failure leaves nothing behind.

    Raises:
        ProtectError: a region is missing or not a directory, a special file lies in a
            region, or ``output`` already exists.
    """
    root = Path(root)
    output = Path(output)
    if output.exists() or output.is_symlink():
        raise ProtectError(f"output {str(output)!r} already exists")
    checked = [check_path(region, "region") for region in regions]
    for region in checked:
        for other in checked:
            if other != region and region_of(other, (region,)) is not None:
                raise ProtectError(f"region {other!r} lies inside region {region!r}")
    for region in checked:
        host = root / region.lstrip("/")
        if host.is_symlink() or not host.is_dir():
            raise ProtectError(f"region {region!r} is not a directory under {str(root)!r}")

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        # mkdtemp makes the directory private; the output holds only ciphertext and is meant
        # to be copied into an image layer.
        staging.chmod(0o755)
        with open(staging / PACK_NAME, "xb", buffering=_WRITE_BUFFER) as pack:
            sealer = Sealer(checked, pack.write)
            walker = _TreeWalker(root, sealer)
            for region in checked:
                walker.add(region, str(root / region.lstrip("/")))
        volume = sealer.finish()
        (staging / FSPF_NAME).write_bytes(volume.fspf)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return volume
