"""Unsealing: verify an fspf and restore the protected files it describes.

:func:`open_fspf` checks the fspf against the volume key and the expected tag before
anything else is read. :func:`unseal_tree` then restores every entry below a target root.
A file of up to 1 MiB is decrypted and verified whole in memory before its name is created
with ``O_EXCL``. A longer one is decrypted into a temporary file next to its destination and
renamed into place only after every chunk verified. Either way a tampered object leaves no
plaintext of that file. With many files and more than one CPU, a forked child restores
half of them.

The manifest may come from a hostile source that has the key, so writing never follows a
symlink: every directory is opened relative to its parent with ``O_NOFOLLOW``, and entries are
created and renamed through those directory descriptors. Symlink targets are restored as
stored because they are resolved only inside the container.

This module is carried into confidential images, so it uses only the standard library,
:mod:`enclavify.crypto` and Python 3.8 syntax.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from enclavify import crypto
from enclavify.errors import IntegrityError, ProtectError
from enclavify.protect.format import (
    KEY_SIZE,
    TAG_SIZE,
    Entry,
    Manifest,
    chunk_aad,
    chunk_count,
    chunk_nonce,
    parse_manifest,
    sealed_size,
    split_fspf,
)

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SEGMENT = 1 << 20
# With this many files or more, and more than one CPU, a forked child restores half of them.
_FORK_FILES = 64
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
# Cost of restoring a file besides its bytes, in bytes of decryption (a rough estimate).
_FILE_COST = 32768
# Directory descriptors kept open while restoring; entries arrive grouped by directory.
_DIR_CACHE_SIZE = 32


def open_fspf(data: bytes, key: bytes, tag: bytes, *, name: str = "fspf") -> Manifest:
    """Verify an fspf against the volume ``key`` and expected ``tag`` and return its manifest.

    ``name`` is how messages refer to the fspf (its path, usually).

    Raises:
        IntegrityError: the fspf's tag is not ``tag`` (altered, or another version such as
            an older one put back), or it does not decrypt under ``key``.
        ProtectError: not an fspf, an unsupported format version, or a malformed manifest.
    """
    if len(key) != KEY_SIZE or len(tag) != TAG_SIZE:
        raise ProtectError(f"an fspf key is {KEY_SIZE} bytes and its tag {TAG_SIZE} bytes")
    try:
        header, nonce, sealed = split_fspf(data)
    except ProtectError as exc:
        raise ProtectError(f"{name!r}: {exc}") from None
    if not hmac.compare_digest(sealed[-TAG_SIZE:], tag):
        raise IntegrityError(f"{name!r} failed verification: it is not the expected fspf")
    try:
        plaintext = crypto.aes_gcm_decrypt(key, nonce, sealed, header)
    except crypto.AuthenticationError:
        raise IntegrityError(f"{name!r} failed verification") from None
    try:
        return parse_manifest(plaintext)
    except ProtectError as exc:
        raise ProtectError(f"{name!r}: {exc}") from None


def unseal_tree(sealed: Path, key: bytes, tag: bytes, target_root: Path) -> Manifest:
    """Verify ``sealed/fspf`` and restore its entries at ``target_root/<path>``.

    ``sealed`` contains ``fspf`` and ``objects/``. Owners are restored only when running as
    root. Modes and mtimes are restored, those of directories after their contents.

    Raises:
        IntegrityError: the fspf or a file's object failed verification; the message names
            the fspf or the file's path. No plaintext of that file is left behind.
        ProtectError: the fspf is malformed, or an entry cannot be restored (for example a
            symlink or a non-directory is where a directory is needed).
    """
    sealed = Path(sealed)
    fspf_path = sealed / "fspf"
    try:
        data = fspf_path.read_bytes()
    except OSError as exc:
        raise ProtectError(f"cannot read {str(fspf_path)!r}: {exc.strerror}") from exc
    manifest = open_fspf(data, key, tag, name=str(fspf_path))
    log.debug("fspf %s verified: %d entries", fspf_path, len(manifest.entries))
    with _Restorer(Path(target_root), sealed / "objects", manifest) as restorer:
        restorer.restore()
    return manifest


def _components(path: str) -> tuple[str, ...]:
    return tuple(path[1:].split("/")) if path != "/" else ()


def _split(path: str) -> tuple[tuple[str, ...], str]:
    """Split an absolute normalized path into parent components and the last name."""
    parts = _components(path)
    if not parts:
        return (), ""
    return parts[:-1], parts[-1]


class _Restorer:
    def __init__(self, target_root: Path, objects: Path, manifest: Manifest) -> None:
        self._manifest = manifest
        self._as_root = os.geteuid() == 0
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._root_fd = -1
        self._objects_fd = -1
        # Files of up to this many chunks are decrypted whole in memory; longer ones in
        # segments of this many chunks.
        self._segment_chunks = max(1, _SEGMENT // manifest.chunk_size)
        self._local = threading.local()
        try:
            self._root_fd = os.open(str(target_root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ProtectError(
                f"target root {str(target_root)!r} is not a directory: {exc.strerror}"
            ) from exc
        try:
            self._objects_fd = os.open(str(objects), _DIR_FLAGS)
        except OSError as exc:
            self.close()
            raise ProtectError(f"cannot open {str(objects)!r}: {exc.strerror}") from exc

    def __enter__(self) -> _Restorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        for fd in (self._root_fd, self._objects_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._objects_fd = -1

    def _directory(self, parts: tuple[str, ...], path: str) -> int:
        """Return a descriptor of ``target_root/<parts>``, creating missing directories.

        No component is followed if it is a symlink; the descriptor stays owned by the cache.
        """
        if not parts:
            return self._root_fd
        cached = self._dirs.get(parts)
        if cached is not None:
            self._dirs.move_to_end(parts)
            return cached
        parent = self._directory(parts[:-1], path)
        name = parts[-1]
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self._cannot(path, parts, exc) from exc
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._cannot(path, parts, exc) from exc
        self._dirs[parts] = fd
        if len(self._dirs) > _DIR_CACHE_SIZE:
            _, oldest = self._dirs.popitem(last=False)
            os.close(oldest)
        return fd

    @staticmethod
    def _cannot(path: str, parts: tuple[str, ...], exc: OSError) -> ProtectError:
        where = "/" + "/".join(parts)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return ProtectError(
                f"cannot restore {path!r}: {where!r} is a symlink or not a directory"
            )
        return ProtectError(f"cannot restore {path!r}: {where!r}: {exc.strerror}")

    def restore(self) -> None:
        for region in self._manifest.regions:
            self._directory(_components(region), region)
        directories: list[Entry] = []
        files: list[Entry] = []
        # Files come after directories and symlinks, hardlinks after every file they may name.
        hardlinks: list[Entry] = []
        for entry in self._manifest.entries:
            try:
                if entry.type == "dir":
                    self._restore_directory(entry)
                    directories.append(entry)
                elif entry.type == "file":
                    files.append(entry)
                elif entry.type == "symlink":
                    self._restore_symlink(entry)
                else:
                    hardlinks.append(entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc

        if len(files) >= _FORK_FILES and _CPUS > 1 and hasattr(os, "fork"):
            self._restore_files_in_two(files)
        else:
            self._restore_files(files)

        for entry in hardlinks:
            try:
                self._restore_hardlink(entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc
        # Deepest first, so that setting a child's metadata cannot disturb its parent's mtime
        # and a read-only directory is made read-only only after its contents exist.
        directories.sort(key=lambda item: item.path.count("/"), reverse=True)
        for entry in directories:
            try:
                self._apply_directory_metadata(entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc

    def _restore_directory(self, entry: Entry) -> None:
        parents, name = _split(entry.path)
        if name:
            self._directory((*parents, name), entry.path)

    def _apply_directory_metadata(self, entry: Entry) -> None:
        parents, name = _split(entry.path)
        if name:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._directory(parents, entry.path))
        else:
            fd = os.dup(self._root_fd)
        try:
            self._apply_metadata(fd, entry)
        finally:
            os.close(fd)

    def _apply_metadata(self, fd: int, entry: Entry) -> None:
        # chown before chmod, because chown clears the set-user-ID and set-group-ID bits.
        if self._as_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        os.utime(fd, times=(entry.mtime, entry.mtime))

    def _restore_files(self, files: list[Entry]) -> None:
        for entry in files:
            parents, name = _split(entry.path)
            try:
                self._write_file(self._directory(parents, entry.path), name, entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc

    def _restore_files_in_two(self, files: list[Entry]) -> None:
        """Restore the second half of ``files`` in a forked child and the first half here.

        Threads gain nothing, because the Python work per file holds the GIL; a second process
        has its own. Both only create files, in directories that already exist. The child
        reports a failure through a pipe; this waits for the child in every case, so nothing
        is written after this returns or raises.

        NOTE: forking is safe only while no other thread of this process holds a lock (inside
        OpenSSL, say); the launcher runs no other threads while it unseals.
        """
        # Split where about half the work is done: a file costs its size and a fixed amount.
        total = sum(entry.size + _FILE_COST for entry in files)
        half = done = 0
        while half < len(files) and done < total // 2:
            done += files[half].size + _FILE_COST
            half += 1
        reading, writing = os.pipe()
        try:
            child = os.fork()
        except BaseException:
            os.close(reading)
            os.close(writing)
            raise
        if child == 0:  # pragma: no cover - runs in the child, which ends with os._exit
            os.close(reading)
            status = 0
            try:
                self._restore_files(files[half:])
            except BaseException as exc:
                status = 1
                kind = "IntegrityError" if isinstance(exc, IntegrityError) else "ProtectError"
                message = str(exc) if isinstance(exc, ProtectError) else f"cannot restore: {exc}"
                with contextlib.suppress(BaseException):
                    _write_all(writing, memoryview(f"{kind}\0{message}".encode(errors="replace")))
            finally:
                os._exit(status)
        os.close(writing)
        try:
            self._restore_files(files[:half])
        finally:
            report = b""
            with contextlib.suppress(OSError):
                while True:
                    data = os.read(reading, 65536)
                    if not data:
                        break
                    report += data
            os.close(reading)
            _, status = os.waitpid(child, 0)
        if report or status != 0:
            kind, _, message = report.decode(errors="replace").partition("\0")
            if not message:
                message = f"unsealing in a child process failed with status {status}"
            raise (IntegrityError if kind == "IntegrityError" else ProtectError)(message)

    def _write_file(self, parent: int, name: str, entry: Entry) -> None:
        """Decrypt the object of ``entry`` into ``name`` in the directory ``parent``."""
        failed = IntegrityError(f"protected file {entry.path!r} failed verification")
        try:
            # O_NONBLOCK so that a FIFO planted in place of the object cannot block the open.
            source = os.open(
                entry.object,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._objects_fd,
            )
        except OSError:
            raise failed from None
        try:
            if not stat.S_ISREG(os.fstat(source).st_mode):
                raise IntegrityError(
                    f"protected file {entry.path!r} failed verification:"
                    " its object is not a regular file"
                )
            os.set_blocking(source, True)
            chunk_size = self._manifest.chunk_size
            if os.fstat(source).st_size != sealed_size(entry.size, chunk_size):
                raise failed
            sealed = _Sealed(source, entry, crypto.AesGcm(entry.key), chunk_size, failed)
            if sealed.count <= self._segment_chunks:
                # The whole file is verified in memory before its name is created.
                plain = self._decrypt_segment(sealed, 0, sealed.count)
                if not self._write_new(parent, name, entry, plain):
                    self._write_replacing(parent, name, sealed, plain)
            else:
                self._write_replacing(parent, name, sealed, None)
        finally:
            os.close(source)

    def _write_new(self, parent: int, name: str, entry: Entry, plain: memoryview) -> bool:
        """Create ``name`` holding ``plain``; return False if something is already there.

        ``O_EXCL`` makes the kernel refuse any existing entry, a symlink included.
        """
        try:
            sink = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
        except FileExistsError:
            return False
        try:
            _write_all(sink, plain)
            self._apply_metadata(sink, entry)
        except BaseException:
            os.close(sink)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            raise
        os.close(sink)
        return True

    def _write_replacing(
        self, parent: int, name: str, sealed: _Sealed, plain: memoryview | None
    ) -> None:
        """Decrypt into a temporary file and rename it to ``name`` once every chunk verified.

        ``plain`` is the already verified content of a file of one segment, else None.
        """
        temporary = _temporary_name()
        sink = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            try:
                if plain is not None:
                    _write_all(sink, plain)
                else:
                    step = self._segment_chunks
                    for first in range(0, sealed.count, step):
                        end = min(sealed.count, first + step)
                        _write_all(sink, self._decrypt_segment(sealed, first, end))
                self._apply_metadata(sink, sealed.entry)
            finally:
                os.close(sink)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=parent)
            raise

    def _decrypt_segment(self, sealed: _Sealed, first: int, end: int) -> memoryview:
        """Read, verify and decrypt chunks ``first`` to ``end - 1`` of an object.

        Returns a view of this thread's plaintext buffer, valid until its next call. After
        the last chunk the object must end.
        """
        entry, failed, count = sealed.entry, sealed.failed, sealed.count
        chunk_size = sealed.chunk_size
        plain_size = min(entry.size, end * chunk_size) - first * chunk_size
        size_sealed = plain_size + (end - first) * TAG_SIZE
        sealed_buffer, plain_buffer = self._buffers()
        # One byte more than expected at the end of the object shows whether it goes on.
        want = size_sealed + 1 if end == count else size_sealed
        if _read_into(sealed.fd, sealed_buffer[:want]) != size_sealed:
            raise failed
        offset = 0
        plain_offset = 0
        for index in range(first, end):
            size = min(chunk_size, entry.size - index * chunk_size)
            try:
                sealed.cipher.decrypt_into(
                    chunk_nonce(index),
                    sealed_buffer[offset : offset + size + TAG_SIZE],
                    chunk_aad(entry.file_id, index, index == count - 1),
                    plain_buffer[plain_offset : plain_offset + size],
                )
            except crypto.AuthenticationError:
                raise failed from None
            offset += size + TAG_SIZE
            plain_offset += size
        return plain_buffer[:plain_size]

    def _buffers(self) -> tuple[memoryview, memoryview]:
        """Return this thread's buffers for one segment: sealed (plus one byte) and plain."""
        buffers: tuple[memoryview, memoryview] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            plain = self._segment_chunks * self._manifest.chunk_size
            buffers = (
                memoryview(bytearray(plain + self._segment_chunks * TAG_SIZE + 1)),
                memoryview(bytearray(plain)),
            )
            self._local.buffers = buffers
        return buffers

    @staticmethod
    def _replace_with(parent: int, name: str, create: Callable[[str], None]) -> None:
        """Create an entry under a temporary name with ``create(temporary)``, then rename it."""
        temporary = _temporary_name()
        try:
            create(temporary)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=parent)
            raise

    def _restore_symlink(self, entry: Entry) -> None:
        parents, name = _split(entry.path)
        parent = self._directory(parents, entry.path)

        def create(temporary: str) -> None:
            os.symlink(entry.target, temporary, dir_fd=parent)
            if self._as_root:
                os.chown(temporary, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(
                temporary, times=(entry.mtime, entry.mtime), dir_fd=parent, follow_symlinks=False
            )

        self._replace_with(parent, name, create)

    def _restore_hardlink(self, entry: Entry) -> None:
        source_parents, source_name = _split(entry.target)
        # A copy, because opening the link's own parent may evict this one from the cache.
        source_parent = os.dup(self._directory(source_parents, entry.target))
        try:
            parents, name = _split(entry.path)
            parent = self._directory(parents, entry.path)

            def create(temporary: str) -> None:
                os.link(
                    source_name,
                    temporary,
                    src_dir_fd=source_parent,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )

            self._replace_with(parent, name, create)
        finally:
            os.close(source_parent)


class _Sealed:
    """An open object with what decrypting it needs."""

    def __init__(
        self, fd: int, entry: Entry, cipher: crypto.AesGcm, chunk_size: int, failed: IntegrityError
    ) -> None:
        self.fd = fd
        self.entry = entry
        self.cipher = cipher
        self.chunk_size = chunk_size
        self.count = chunk_count(entry.size, chunk_size)
        self.failed = failed


def _read_into(fd: int, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``fd`` until it is full or the file ends; return the bytes read."""
    filled = 0
    total = len(buffer)
    while filled < total:
        count = os.readv(fd, [buffer[filled:]])
        if not count:
            break
        filled += count
    return filled


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def _temporary_name() -> str:
    # Independent of the entry's name, which may already be 255 bytes long.
    return f".enclavify-{os.urandom(8).hex()}.tmp"
