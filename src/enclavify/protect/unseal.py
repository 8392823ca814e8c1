"""Unsealing: verify an fspf and restore the protected files it describes.

:func:`open_fspf` checks the fspf against the volume key and the expected tag before
anything else is read. :func:`unseal_tree` then checks that the pack contains exactly the
objects the manifest lists, and restores every entry below a target root. A file of up to
1 MiB is decrypted and verified whole in memory before its name is created with ``O_EXCL``.
A longer one is decrypted into a temporary file next to its destination and renamed into
place only after every chunk verified. Either way a tampered object leaves no plaintext of
that file. With many files and more than one CPU, forked children restore part of them.

This runs at every confidential start, so it keeps system calls few: files are restored in
batches in the order of their objects in the pack, and the objects of a batch are read with
one call. While the umask is 0, a new entry is
created with its final permission bits, and when the kernel already gives it the right owner
it needs no chown or chmod. Below a directory with a default ACL or the set-group-ID bit,
owner and mode are set explicitly.

The manifest may come from a hostile source that has the key, so writing never follows a
symlink: every directory is opened relative to its parent with ``O_NOFOLLOW``, and entries are
created and renamed through those directory descriptors. Symlink targets are restored as
stored because they are resolved only inside the container.

This module is carried into confidential images, so it uses only the standard library,
:mod:`enclavify.crypto` and Python 3.8 syntax.
"""

from __future__ import annotations

import errno
import hmac
import os
import stat

from enclavify import crypto, logs
from enclavify.errors import IntegrityError, ProtectError
from enclavify.protect.format import (
    FSPF_NAME,
    KEY_SIZE,
    PACK_NAME,
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

# typing, pathlib, contextlib and collections (which collections.abc imports) cost about 8 ms
# at every container start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from os import PathLike

    _PathText = str | PathLike[str]

log = logs.get_logger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK so that a FIFO planted in place of the pack cannot block the open (tested in
# tests/protect/test_tampering.py).
_PACK_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# O_EXCL makes the kernel refuse any existing entry, a symlink included.
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_FIRST_NONCE = chunk_nonce(0)
# The report of a forked child that restored all its files. An error report never starts
# with a NUL.
_DONE = b"\0"
_SEGMENT = 1 << 20
# With this many files or more, and more than one CPU, forked children restore part of them:
# one process per CPU, at most _MAX_PROCESSES, each with at least half of _FORK_FILES files.
_FORK_FILES = 64
_MAX_PROCESSES = 4
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
# With several processes, files are handed out in batches from one queue that every process
# reads, so that one that falls behind (a child's copy-on-write faults, another job on its
# CPU) takes fewer batches. A batch is about _BATCH_WORK of work, where a file costs its size
# and _FILE_COST more; both are estimates for small files on 2 CPUs. The queue is a pipe of
# 4-byte batch numbers, at most _MAX_BATCHES of them, so it fits in the 64 KiB a Linux pipe
# buffers before anyone reads.
_FILE_COST = 32768
_BATCH_WORK = 512 << 10
_MAX_BATCHES = 4096
_BATCH_RECORD = 4
# The objects of a batch are read with one call when they fit in this many bytes: a batch of
# about _BATCH_WORK, its last file up to _SEGMENT bytes, with the tags of 64 KiB chunks. A
# larger batch (a large file, or more than _MAX_BATCHES batches of work) is read file by file.
_BATCH_READ = _BATCH_WORK + _SEGMENT + (_BATCH_WORK + _SEGMENT) // 65536 * TAG_SIZE
# Directories kept open while restoring. Files come in pack order, which the converter
# shuffles, so the cache should have room for every directory of a tree. A quarter of the
# descriptors this process may open leaves plenty for the rest.
_DIR_CACHE_SIZE = max(16, min(1024, os.sysconf("SC_OPEN_MAX") // 4))

if TYPE_CHECKING:
    # A file to restore: its parent directory's path ("" for the target root), its name and
    # its entry.
    _File = tuple[str, str, Entry]


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


def unseal_tree(sealed: _PathText, key: bytes, tag: bytes, target_root: _PathText) -> Manifest:
    """Verify ``sealed/fspf`` and restore its entries at ``target_root/<path>``.

    ``sealed`` contains ``fspf`` and ``pack``. Owners are restored only when running as
    root. Modes and mtimes are restored, those of directories after their contents.

    Raises:
        IntegrityError: the fspf, the pack or a file's object failed verification; the
            message names the fspf, the pack or the file's path. No plaintext of that file is
            left behind, and nothing at all when the fspf or the pack as a whole is rejected.
        ProtectError: the fspf is malformed, or an entry cannot be restored (for example a
            symlink or a non-directory is where a directory is needed).
    """
    fspf_path = os.path.join(sealed, FSPF_NAME)
    try:
        with open(fspf_path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ProtectError(f"cannot read {fspf_path!r}: {exc.strerror}") from exc
    manifest = open_fspf(data, key, tag, name=fspf_path)
    log.debug("fspf %s verified: %d entries", fspf_path, len(manifest.entries))
    with _Restorer(os.fspath(target_root), os.path.join(sealed, PACK_NAME), manifest) as restorer:
        restorer.restore()
    return manifest


class _Directory:
    """An open directory of the target and what the kernel gives entries created in it.

    ``new_owner`` is the (uid, gid) of a new entry: the effective ids, or the directory's group
    if it has the set-group-ID bit, which new directories then inherit (``new_dir_bits``).
    It is None when a default ACL decides the permission bits of new entries instead of the
    umask. Then nothing is predicted, and every entry gets all its metadata set explicitly.
    """

    __slots__ = ("fd", "new_dir_bits", "new_owner")

    def __init__(self, fd: int, new_owner: tuple[int, int] | None, new_dir_bits: int) -> None:
        self.fd = fd
        self.new_owner = new_owner
        self.new_dir_bits = new_dir_bits


class _Restorer:
    def __init__(self, target_root: str, pack: str, manifest: Manifest) -> None:
        self._manifest = manifest
        self._chunk_size = manifest.chunk_size
        self._euid = os.geteuid()
        self._egid = os.getegid()
        self._as_root = self._euid == 0
        # Open directories below the target root by path, least recently used first. Files
        # come in pack order, where those of one directory mostly follow each other.
        self._dirs: dict[str, _Directory] = {}
        self._pack_fd = -1
        # Files of up to this many chunks are decrypted whole in memory; longer ones in
        # segments of this many chunks.
        self._segment_chunks = max(1, _SEGMENT // manifest.chunk_size)
        self._buffers: crypto.Buffers | None = None
        # Named once, so that the buffers of every process use the same backend.
        self._backend = crypto.backend_name()
        # Directories made only to hold restored entries (for example the parents of
        # regions) get what the caller's umask would have given them.
        self._implicit_mode = 0o755
        # Directories made by _make_directory, by path: what they give new entries (see there).
        self._made: dict[str, tuple[tuple[int, int] | None, int]] = {}
        # Forked children that reported success but may still be exiting.
        self._reporting_done: list[int] = []
        # The range of the pack in the ciphertext buffer, read for the batch being restored.
        self._batch: tuple[int, int] | None = None
        try:
            root_fd = os.open(target_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ProtectError(
                f"target root {target_root!r} is not a directory: {exc.strerror}"
            ) from exc
        self._root = _Directory(root_fd, None, 0)
        try:
            self._root = self._describe(root_fd)
        except OSError as exc:
            self.close()
            raise ProtectError(f"cannot inspect {target_root!r}: {exc.strerror}") from exc
        try:
            self._open_pack(pack)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _Restorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for directory in self._dirs.values():
            os.close(directory.fd)
        self._dirs.clear()
        for fd in (self._root.fd, self._pack_fd):
            if fd >= 0:
                os.close(fd)
        self._root.fd = self._pack_fd = -1

    def _open_pack(self, pack: str) -> None:
        """Open the pack and check that its size is that of the manifest's objects.

        A pack of the wrong size is rejected before anything is restored, naming the first
        file whose object does not verify where the manifest puts it.
        """
        try:
            self._pack_fd = os.open(pack, _PACK_FLAGS)
            status = os.fstat(self._pack_fd)
        except OSError as exc:
            raise IntegrityError(f"pack {pack!r} failed verification: {exc.strerror}") from None
        # Checked before reading, so a device planted as the pack is never read.
        if not stat.S_ISREG(status.st_mode):
            raise IntegrityError(f"pack {pack!r} failed verification: not a regular file")
        expected = self._manifest.pack_size()
        if status.st_size == expected:
            return
        # Something was cut out, inserted or appended: find the first file it broke.
        self._allocate_buffers(self._segment_chunks * self._chunk_size, self._segment_chunks)
        for entry in self._manifest.entries:
            if entry.type == "file":
                for _ in self._segments(entry, chunk_count(entry.size, self._chunk_size)):
                    pass
        raise IntegrityError(
            f"pack {pack!r} failed verification: it has {status.st_size} bytes, "
            f"its objects {expected}"
        )

    def _describe(self, fd: int) -> _Directory:
        """Return a :class:`_Directory` for the open directory ``fd``."""
        if _has_default_acl(fd):
            return _Directory(fd, None, 0)
        status = os.fstat(fd)
        setgid = status.st_mode & stat.S_ISGID
        gid = status.st_gid if setgid else self._egid
        return _Directory(fd, (self._euid, gid), setgid)

    def _directory(self, path: str, entry_path: str) -> _Directory:
        """Return the open directory ``target_root/<path>``, making it if it is missing.

        ``path`` is "" for the target root. No component is followed if it is a symlink. The
        descriptor stays owned by the cache, so use it before asking for another directory.
        """
        if not path:
            return self._root
        cached = self._dirs.pop(path, None)
        if cached is not None:
            self._dirs[path] = cached  # now the most recently used
            return cached
        parent_path, _, name = path.rpartition("/")
        parent = self._directory(parent_path, entry_path).fd
        try:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                # Not restored from an entry of its own, for example a parent of a region.
                try:  # noqa: SIM105 - contextlib is not imported, see above
                    os.mkdir(name, self._implicit_mode, dir_fd=parent)
                except FileExistsError:
                    pass
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._cannot(entry_path, path, exc) from exc
        made = self._made.get(path)
        if made is not None:
            directory = _Directory(fd, *made)
        else:
            try:
                directory = self._describe(fd)
            except OSError as exc:
                os.close(fd)
                raise self._cannot(entry_path, path, exc) from exc
        self._dirs[path] = directory
        if len(self._dirs) > _DIR_CACHE_SIZE:
            oldest = self._dirs.pop(next(iter(self._dirs)))
            os.close(oldest.fd)
        return directory

    @staticmethod
    def _cannot(path: str, where: str, exc: OSError) -> ProtectError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return ProtectError(
                f"cannot restore {path!r}: {where!r} is a symlink or not a directory"
            )
        return ProtectError(f"cannot restore {path!r}: {where!r}: {exc.strerror}")

    def restore(self) -> None:
        # Under umask 0 a new entry gets exactly the permission bits asked for, so most
        # files and directories are created with their final mode and need no chmod.
        # NOTE: the umask belongs to the process; the launcher runs no other threads while it
        # unseals.
        umask = os.umask(0)
        try:
            self._implicit_mode = 0o755 & ~umask
            self._restore()
        finally:
            os.umask(umask)
            # Children that reported success write nothing more, and are left to exit
            # while this process finishes the directories.
            for child in self._reporting_done:
                os.waitpid(child, 0)
            self._reporting_done.clear()

    def _restore(self) -> None:
        for region in self._manifest.regions:
            if region != "/":
                self._directory(region, region)
        # For each directory made here: its (uid, gid, mode) right after mkdir, or None if
        # that is unknown (it existed before, or a default ACL applied).
        after_mkdir: dict[str, tuple[int, int, int] | None] = {}
        directories: list[Entry] = []
        # Files in manifest order, which is the order of their objects in the pack.
        files: list[_File] = []
        # Files come after directories and symlinks, hardlinks after every file they may name.
        hardlinks: list[Entry] = []
        for entry in self._manifest.entries:
            kind = entry.type
            try:
                if kind == "file":
                    parent, _, name = entry.path.rpartition("/")
                    files.append((parent, name, entry))
                elif kind == "dir":
                    after_mkdir[entry.path] = self._make_directory(entry)
                    directories.append(entry)
                elif kind == "symlink":
                    self._restore_symlink(entry)
                else:
                    hardlinks.append(entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc

        processes = min(_CPUS, _MAX_PROCESSES, 2 * len(files) // _FORK_FILES)
        if processes > 1 and hasattr(os, "fork"):
            self._restore_files_in_parallel(files, processes)
        else:
            self._restore_files(files)

        for entry in hardlinks:
            try:
                self._restore_hardlink(entry)
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc
        # Descendants first (a path sorts after every path it starts with), so that a
        # directory becomes read-only or unsearchable only after everything in it is done.
        directories.sort(key=lambda item: item.path, reverse=True)
        for entry in directories:
            try:
                self._apply_directory_metadata(entry, after_mkdir[entry.path])
            except OSError as exc:
                raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc

    def _make_directory(self, entry: Entry) -> tuple[int, int, int] | None:
        """Make the directory of ``entry``; return its (uid, gid, mode) if they are known.

        It gets its final permission bits plus the owner's, because this process may need
        them to fill it. The final mode and owner are set after its contents.
        """
        path = entry.path
        parent_path, _, name = path.rpartition("/")
        if not name:  # the target root itself
            return None
        parent = self._directory(parent_path, path)
        mode = (entry.mode & 0o777) | stat.S_IRWXU
        try:
            os.mkdir(name, mode, dir_fd=parent.fd)
        except FileExistsError:
            # It must be a directory, not a symlink; its metadata is whatever it was.
            self._directory(path, path)
            return None
        except OSError as exc:
            raise self._cannot(path, path, exc) from exc
        # A new directory gives new entries what its parent gives them: the same owner, the
        # set-group-ID bit it inherited, and a copy of the parent's default ACL if any.
        self._made[path] = (parent.new_owner, parent.new_dir_bits)
        if parent.new_owner is None:
            return None
        return (*parent.new_owner, mode | parent.new_dir_bits)

    def _apply_directory_metadata(
        self, entry: Entry, after_mkdir: tuple[int, int, int] | None
    ) -> None:
        """Set the owner, mode and mtime of a directory; skip what mkdir already got right."""
        parent_path, _, name = entry.path.rpartition("/")
        if not name:
            self._apply_metadata(self._root.fd, entry)
            return
        parent = self._directory(parent_path, entry.path).fd
        chown = self._as_root and (
            after_mkdir is None or after_mkdir[:2] != (entry.uid, entry.gid)
        )
        # None of these calls follows a symlink: fchownat and utimensat get
        # AT_SYMLINK_NOFOLLOW, and the chmod goes through a descriptor opened with O_NOFOLLOW.
        if chown:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        # After a chown, because chown may clear the set-user-ID and set-group-ID bits.
        if chown or after_mkdir is None or after_mkdir[2] != entry.mode:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                os.fchmod(fd, entry.mode)
            finally:
                os.close(fd)
        os.utime(
            name, times=(entry.mtime, entry.mtime), dir_fd=parent, follow_symlinks=False
        )

    def _apply_metadata(self, fd: int, entry: Entry) -> None:
        # chown before chmod, because chown clears the set-user-ID and set-group-ID bits.
        if self._as_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        os.utime(fd, times=(entry.mtime, entry.mtime))

    def _restore_files(self, files: list[_File]) -> None:
        self._allocate_buffers_for(files)
        for batch in _batches(files):
            self._restore_batch(batch)

    def _allocate_buffers_for(self, files: list[_File]) -> None:
        # Buffers for the largest segment of these files and the objects of a batch, made
        # once: a buffer is filled with zeros when made, and growing it costs more.
        largest = max((entry.size for _, _, entry in files), default=0)
        chunks = min(self._segment_chunks, chunk_count(largest, self._chunk_size))
        plain_size = min(largest, self._segment_chunks * self._chunk_size)
        objects = _objects_size(files, self._chunk_size) if files else 0
        self._allocate_buffers(
            plain_size, chunks, max(plain_size + chunks * TAG_SIZE, min(objects, _BATCH_READ))
        )

    def _restore_batch(self, files: list[_File]) -> None:
        """Restore consecutive files of the manifest, whose objects follow each other."""
        if not files:
            return
        self._batch = self._read_batch(files)
        current = None
        directory = self._root
        try:
            for parent, name, entry in files:
                if parent != current:
                    directory = self._directory(parent, entry.path)
                    current = parent
                try:
                    self._restore_file(directory, name, entry)
                except OSError as exc:
                    raise ProtectError(f"cannot restore {entry.path!r}: {exc.strerror}") from exc
        finally:
            self._batch = None

    def _read_batch(self, files: list[_File]) -> tuple[int, int] | None:
        """Read the objects of ``files`` into the ciphertext buffer with one call if they fit.

        Returns the range of the pack now in the buffer, or None when the objects are read
        file by file instead.
        """
        buffers = self._buffers
        assert buffers is not None
        start = files[0][2].offset
        size = _objects_size(files, self._chunk_size)
        if size > buffers.sealed.nbytes:
            return None
        got = os.preadv(self._pack_fd, [buffers.sealed[:size]], start)
        if got < size:
            got += _read_at(self._pack_fd, buffers.sealed[got:size], start + got)
        # A short read means the pack changed since its size was checked; each file's own
        # read then names the file it breaks.
        return (start, start + size) if got == size else None

    def _allocate_buffers(self, plain_size: int, chunks: int, batch_size: int = 0) -> None:
        """Make this process's buffers for ``chunks`` chunks of ``plain_size`` bytes in all.

        The ciphertext buffer has at least ``batch_size`` bytes, for reading a batch.
        """
        # At least a byte each: an empty buffer has no address to pin.
        self._buffers = crypto.Buffers(
            bytearray(max(plain_size + chunks * TAG_SIZE, batch_size)),
            bytearray(max(1, plain_size)),
            backend=self._backend,
        )

    def _restore_files_in_parallel(self, files: list[_File], processes: int) -> None:
        """Restore ``files`` in ``processes`` processes: forked children and this one.

        Threads gain nothing, because the Python work per file holds the GIL; another process
        has its own. Every process takes batches of files from one queue until it is empty.
        All only create files, in directories that already exist. A child reports success or a
        failure through its pipe, and a process that fails empties the queue so that the
        others stop early. This waits for every report in every case, so nothing is written
        after this returns or raises; restore() reaps the children.

        NOTE: forking is safe only while no other thread of this process holds a lock (inside
        OpenSSL, say); the launcher runs no other threads while it unseals.
        """
        batches = _batches(files)
        # Every batch number is in the pipe before the first child exists, and no process
        # keeps its writing end, so a read returns nothing once all batches are taken.
        queue, writing = os.pipe()
        try:
            _write_all(
                writing,
                memoryview(b"".join(n.to_bytes(_BATCH_RECORD, "big") for n in range(len(batches)))),
            )
        finally:
            os.close(writing)
        self._allocate_buffers_for(files)
        children: list[tuple[int, int]] = []
        try:
            for _ in range(processes - 1):
                children.append(self._fork_restoring(queue, batches))
            self._restore_queued(queue, batches)
        finally:
            failures = [
                _collect(child, reading, self._reporting_done) for child, reading in children
            ]
            os.close(queue)
        for failure in failures:
            if failure is not None:
                raise failure

    def _restore_queued(self, queue: int, batches: list[list[_File]]) -> None:
        """Restore the batches whose numbers this process reads from ``queue``."""
        try:
            while True:
                # A pipe serves one read at a time. The queue contains whole 4-byte records and
                # every read takes 4 bytes (or all that is left), so no number is split.
                record = os.read(queue, _BATCH_RECORD)
                if not record:
                    return
                self._restore_batch(batches[int.from_bytes(record, "big")])
        except BaseException:
            try:
                while os.read(queue, 65536):
                    pass
            except OSError:
                pass
            raise

    def _fork_restoring(self, queue: int, batches: list[list[_File]]) -> tuple[int, int]:
        """Fork a child that restores batches from ``queue``; return its pid and report pipe."""
        reading, writing = os.pipe()
        try:
            child = os.fork()
        except BaseException:
            os.close(reading)
            os.close(writing)
            raise
        if child == 0:  # pragma: no cover - runs in the child, which ends with os._exit
            status = 0
            try:
                os.close(reading)
                self._restore_queued(queue, batches)
                _write_all(writing, memoryview(_DONE))
            except BaseException as exc:
                status = 1
                kind = "IntegrityError" if isinstance(exc, IntegrityError) else "ProtectError"
                message = str(exc) if isinstance(exc, ProtectError) else f"cannot restore: {exc}"
                try:  # noqa: SIM105 - contextlib is not imported, see above
                    _write_all(writing, memoryview(f"{kind}\0{message}".encode(errors="replace")))
                except BaseException:  # noqa: S110 - the exit status still reports the failure
                    pass
            finally:
                os._exit(status)
        os.close(writing)
        return child, reading

    def _restore_file(self, directory: _Directory, name: str, entry: Entry) -> None:
        """Decrypt the object of ``entry`` into ``name`` in ``directory``."""
        count = chunk_count(entry.size, self._chunk_size)
        if count > self._segment_chunks:
            segments = self._segments(entry, count)
            self._write_replacing(directory.fd, name, entry, segments)
            return
        # The whole file is verified in memory before its name is created.
        plain = self._decrypt_segment(entry, 0, count, count)
        if not self._write_new(directory, name, entry, plain):
            self._write_replacing(directory.fd, name, entry, iter((plain,)))

    def _write_new(
        self, directory: _Directory, name: str, entry: Entry, plain: memoryview
    ) -> bool:
        """Create ``name`` holding ``plain``; return False if something is already there."""
        owner = directory.new_owner
        if owner is not None and (
            not self._as_root or (entry.uid == owner[0] and entry.gid == owner[1])
        ):
            # Created with its final owner and, under umask 0 without a default ACL, its
            # final permission bits; only set-ID and sticky bits need a chmod.
            create_mode = entry.mode & 0o777
            chown = False
            chmod = entry.mode & _SPECIAL_BITS
        else:
            create_mode = 0o600
            chown = self._as_root
            chmod = True
        try:
            sink = os.open(name, _NEW_FLAGS, create_mode, dir_fd=directory.fd)
        except FileExistsError:
            return False
        try:
            written = os.write(sink, plain)
            if written < len(plain):
                _write_all(sink, plain[written:])
            # chown before chmod, because chown clears the set-user-ID and set-group-ID bits.
            if chown:
                os.fchown(sink, entry.uid, entry.gid)
            if chmod:
                os.fchmod(sink, entry.mode)
            os.utime(sink, times=(entry.mtime, entry.mtime))
        except BaseException:
            os.close(sink)
            _unlink_if_present(name, directory.fd)
            raise
        os.close(sink)
        return True

    def _write_replacing(
        self, parent: int, name: str, entry: Entry, segments: Iterator[memoryview]
    ) -> None:
        """Write ``segments`` to a temporary file and rename it to ``name`` once all verified.

        ``segments`` yields verified plaintext and raises if a chunk fails verification.
        """
        temporary = _temporary_name()
        sink = os.open(temporary, _NEW_FLAGS, 0o600, dir_fd=parent)
        try:
            try:
                for plain in segments:
                    _write_all(sink, plain)
                self._apply_metadata(sink, entry)
            finally:
                os.close(sink)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            _unlink_if_present(temporary, parent)
            raise

    def _segments(self, entry: Entry, count: int) -> Iterator[memoryview]:
        step = self._segment_chunks
        for first in range(0, count, step):
            yield self._decrypt_segment(entry, first, min(count, first + step), count)

    def _decrypt_segment(
        self, entry: Entry, first: int, end: int, count: int
    ) -> memoryview:
        """Read, verify and decrypt chunks ``first`` to ``end - 1`` of the object of ``entry``.

        ``count`` is the object's number of chunks. Returns a view of this process's plaintext
        buffer, valid until the next call.
        """
        chunk_size = self._chunk_size
        plain_size = min(entry.size, end * chunk_size) - first * chunk_size
        segment_size = plain_size + (end - first) * TAG_SIZE
        buffers = self._buffers
        assert buffers is not None
        sealed = buffers.sealed
        position = entry.offset + first * (chunk_size + TAG_SIZE)
        batch = self._batch
        if batch is not None and batch[0] <= position and position + segment_size <= batch[1]:
            offset = position - batch[0]  # read with the batch
        else:
            # One call reads the segment; only a short read needs more. Reading at an offset
            # leaves the descriptor's position alone, so forked children share it.
            self._batch = None  # the buffer no longer contains it
            got = os.preadv(self._pack_fd, [sealed[:segment_size]], position)
            if got < segment_size:
                got += _read_at(self._pack_fd, sealed[got:segment_size], position + got)
            if got != segment_size:
                raise _failed(entry)
            offset = 0
        key = entry.key
        file_id = entry.file_id
        plain_offset = 0
        for index in range(first, end):
            size = min(chunk_size, entry.size - index * chunk_size)
            try:
                buffers.decrypt(
                    key,
                    _FIRST_NONCE if index == 0 else chunk_nonce(index),
                    chunk_aad(file_id, index, index == count - 1),
                    sealed_offset=offset,
                    size=size,
                    plain_offset=plain_offset,
                )
            except crypto.AuthenticationError:
                raise _failed(entry) from None
            offset += size + TAG_SIZE
            plain_offset += size
        return buffers.plain[:plain_size]

    @staticmethod
    def _replace_with(parent: int, name: str, create: Callable[[str], None]) -> None:
        """Create an entry under a temporary name with ``create(temporary)``, then rename it."""
        temporary = _temporary_name()
        try:
            create(temporary)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            _unlink_if_present(temporary, parent)
            raise

    def _restore_symlink(self, entry: Entry) -> None:
        parent_path, _, name = entry.path.rpartition("/")
        parent = self._directory(parent_path, entry.path).fd

        def create(temporary: str) -> None:
            os.symlink(entry.target, temporary, dir_fd=parent)
            if self._as_root:
                os.chown(temporary, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(
                temporary, times=(entry.mtime, entry.mtime), dir_fd=parent, follow_symlinks=False
            )

        self._replace_with(parent, name, create)

    def _restore_hardlink(self, entry: Entry) -> None:
        source_path, _, source_name = entry.target.rpartition("/")
        # A copy, because opening the link's own parent may evict this one from the cache.
        source_parent = os.dup(self._directory(source_path, entry.target).fd)
        try:
            parent_path, _, name = entry.path.rpartition("/")
            parent = self._directory(parent_path, entry.path).fd

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


def _objects_size(files: list[_File], chunk_size: int) -> int:
    """Return the bytes from the first object of ``files`` to the end of the last one."""
    last = files[-1][2]
    return last.offset + sealed_size(last.size, chunk_size) - files[0][2].offset


def _batches(files: list[_File]) -> list[list[_File]]:
    """Cut ``files`` (in pack order) into consecutive batches of about equal work."""
    total = sum(entry.size + _FILE_COST for _, _, entry in files)
    target = max(_BATCH_WORK, -(-total // _MAX_BATCHES))
    batches: list[list[_File]] = [[]]
    work = 0
    for item in files:
        if work >= target:
            batches.append([])
            work = 0
        batches[-1].append(item)
        work += item[2].size + _FILE_COST
    return batches


def _has_default_acl(fd: int) -> bool:
    """Return whether the directory ``fd`` may have a default ACL (True when unsure)."""
    try:
        return "system.posix_acl_default" in os.listxattr(fd)
    except OSError as exc:
        # No extended attributes on this file system means no ACLs either.
        return exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP)
    except AttributeError:  # no os.listxattr on this platform
        return True


def _collect(child: int, reading: int, done: list[int]) -> ProtectError | None:
    """Wait for the report of a child restoring files; return the error it reported, if any.

    A child that reported success is appended to ``done``, to be reaped later.
    """
    report = b""
    try:
        report = os.read(reading, 65536)
        if report == _DONE:
            os.close(reading)
            done.append(child)
            return None
        while report:
            data = os.read(reading, 65536)
            if not data:
                break
            report += data
    except OSError:
        pass  # the exit status reports what happened
    os.close(reading)
    _, status = os.waitpid(child, 0)
    if not report and status == 0:
        return None
    kind, _, message = report.decode(errors="replace").partition("\0")
    if not message:
        message = f"unsealing in a child process failed with status {status}"
    return (IntegrityError if kind == "IntegrityError" else ProtectError)(message)


def _failed(entry: Entry) -> IntegrityError:
    return IntegrityError(f"protected file {entry.path!r} failed verification")


def _read_at(fd: int, buffer: memoryview, position: int) -> int:
    """Fill ``buffer`` from ``fd`` at ``position`` until it is full or the file ends.

    Returns the bytes read.
    """
    filled = 0
    total = len(buffer)
    while filled < total:
        count = os.preadv(fd, [buffer[filled:]], position + filled)
        if not count:
            break
        filled += count
    return filled


def _write_all(fd: int, data: memoryview) -> None:
    written = os.write(fd, data)
    while written < len(data):
        written += os.write(fd, data[written:])


def _unlink_if_present(name: str, parent: int) -> None:
    try:  # noqa: SIM105 - contextlib is not imported, see above
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


def _temporary_name() -> str:
    # Independent of the entry's name, which may already be 255 bytes long.
    return f".enclavify-{os.urandom(8).hex()}.tmp"
