"""Streams over blobs: digest verification, (de)compression and file slices."""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard
from isal import igzip, igzip_lib

from enclavify.errors import ImageError

CHUNK = 1 << 20

Progress = Callable[[int, int, str], None]

GZIP = "gzip"
ZSTD = "zstd"
UNCOMPRESSED = "none"

# The type stubs declare ISA-L's error as an instance, not the class it is.
_ISAL_ERROR = cast(type[Exception], igzip_lib.IsalError)

# Exceptions that reading corrupt compressed data raises, besides OSError (gzip.BadGzipFile).
DECOMPRESSION_ERRORS = (EOFError, zlib.error, _ISAL_ERROR, zstandard.ZstdError)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff_compression(head: bytes) -> str:
    """Return the compression of a layer stream from its first bytes."""
    if head.startswith(_GZIP_MAGIC):
        return GZIP
    if head.startswith(_ZSTD_MAGIC):
        return ZSTD
    return UNCOMPRESSED


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through and counts the bytes."""

    def __init__(self, inner: IO[bytes], on_read: Callable[[int], None] | None = None) -> None:
        self._inner = inner
        self._on_read = on_read
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        readinto = getattr(self._inner, "readinto", None)
        n: int | None
        if readinto is not None:
            n = readinto(view)
            if n is None:
                # Only a non-blocking stream returns None, and blobs are read from files.
                raise BlockingIOError(
                    "reading the blob failed: its stream is non-blocking and returned no data"
                )
        else:
            data = self._inner.read(len(view))
            n = len(data)
            view[:n] = data
        self.hash.update(view[:n])
        self.count += n
        if self._on_read is not None and n:
            self._on_read(n)
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class CountingWriter(io.RawIOBase):
    """A write-only stream that counts what passes through to ``inner``."""

    def __init__(self, inner: _Writable) -> None:
        self._inner = inner
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self._inner.write(view)
        self.count += len(view)
        return len(view)

    def tell(self) -> int:
        return self.count


class HashingWriter(CountingWriter):
    """A write-only stream that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner: _Writable) -> None:
        super().__init__(inner)
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = bytes(data)
        self.hash.update(view)
        return super().write(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class BackgroundWriter(io.RawIOBase):
    """Hands what is written, in chunks of about :data:`CHUNK`, to a worker thread.

    The worker writes the chunks to ``inner`` in order. Compressors, hashlib and file writes
    release the GIL on large buffers, so what ``inner`` does (compress, hash, write) runs on
    a second core while this thread produces the next chunks. At most a few chunks
    wait in the queue, so memory does not grow with the layer. An error in the worker is
    raised again by the next :meth:`write` or by :meth:`finish`.
    """

    _QUEUED = 4

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self._buffer = bytearray()
        self._count = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self._QUEUED)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="layer-compress", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        self._count += len(data)
        if not self._buffer and len(data) >= CHUNK and isinstance(data, bytes):
            # A whole chunk that cannot change under us goes to the worker without a copy.
            self._queue.put(data)
            return len(data)
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self._queue.put(bytes(self._buffer))
            self._buffer.clear()
        return len(data)

    def tell(self) -> int:
        return self._count

    def finish(self) -> None:
        """Hand over the rest, wait for the worker, and raise its error if it had one."""
        if self._thread.is_alive():
            if self._buffer and self._error is None:
                self._queue.put(bytes(self._buffer))
            self._buffer.clear()
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._inner.write(chunk)
                except BaseException as error:  # raised again in the writing thread
                    self._error = error


class _Announcing:
    """Writer to ``content`` that flushes ``file`` and reports the byte count to ``written``."""

    def __init__(
        self, content: CountingWriter, file: IO[bytes], written: Callable[[int], None]
    ) -> None:
        self._content, self._file, self._written = content, file, written

    def write(self, data: bytes, /) -> int:
        count = self._content.write(data)
        self._file.flush()
        self._written(self._content.count)
        return count


class GrowingFile(io.RawIOBase):
    """Reader of a file that another thread is still writing: each read waits for its bytes.

    The writer calls :meth:`grew` with the file's size whenever more bytes are in it, and
    :meth:`complete` at the end, successful or not. A read past the end of a complete file
    returns what there is, as at the end of any file. After a failed write a read raises
    OSError, so that the reader stops instead of reporting an error of its own.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[bytes] | None = None
        self._position = 0
        self._size = 0
        self._complete = False
        self._failed = False
        self._changed = threading.Condition()

    def grew(self, size: int) -> None:
        with self._changed:
            self._size = size
            self._changed.notify_all()

    def complete(self, *, failed: bool = False) -> None:
        with self._changed:
            self._complete, self._failed = True, failed
            self._changed.notify_all()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._position
        elif whence == io.SEEK_END:
            with self._changed:
                self._changed.wait_for(lambda: self._complete)
                pos += self._size
        self._position = max(0, pos)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        end = self._position + len(buffer)
        if end > self._size:
            with self._changed:
                self._changed.wait_for(lambda: self._complete or self._size >= end)
        if self._failed:
            raise OSError(f"{self._path}: read stopped because writing the file failed")
        available = min(end, self._size) - self._position
        if available <= 0:
            return 0
        if self._file is None:
            self._file = open(self._path, "rb", buffering=0)  # noqa: SIM115 (closed in close)
        count = os.preadv(self._file.fileno(), [memoryview(buffer)[:available]], self._position)
        self._position += count
        return count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class SliceReader(io.RawIOBase):
    """``size`` bytes of a file starting at ``offset``, read with its own file descriptor."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._path = path
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        count = os.preadv(self._fd, [memoryview(buffer)[:want]], self._offset + self._pos)
        if count != want:
            raise ImageError(
                f"{self._path}: {self._size} bytes expected at offset {self._offset}, but the "
                "file ended early"
            )
        self._pos += count
        return count

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_slice(path: Path, offset: int, size: int) -> BinaryIO:
    """Open ``size`` bytes of ``path`` from ``offset`` as a buffered binary stream."""
    return cast(BinaryIO, io.BufferedReader(SliceReader(path, offset, size), buffer_size=CHUNK))


@dataclass(frozen=True)
class FileRange:
    """A stored blob's place in a local file: ``size`` bytes of ``path`` from ``offset``.

    A blob file of an OCI layout is a whole file; a blob in an archive is one of its members.
    """

    path: Path
    offset: int
    size: int

    def open(self) -> BinaryIO:
        return open_slice(self.path, self.offset, self.size)

    def head(self, count: int) -> bytes:
        """Return the first ``count`` bytes (fewer if the range is shorter)."""
        with open(self.path, "rb", buffering=0) as stream:
            return os.pread(stream.fileno(), min(count, self.size), self.offset)


# Piece size of hash_range. Each read and each hash update releases the GIL and must take it
# back, while a layer's indexer, which holds it, gives it up only every switch interval.
# Opening the small docker archive of bench/convert took 0.17 s with 1 MiB pieces, 0.13 s
# with 4 MiB and 0.12 s with 8 MiB.
_HASH_PIECE = 4 << 20


def hash_range(location: FileRange, progress: Callable[[int], None] | None = None) -> str:
    """Return the SHA-256 digest of the bytes at ``location``, reading them in pieces.

    Raises:
        ImageError: the file is shorter than the range.
    """
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_PIECE))
    with SliceReader(location.path, location.offset, location.size) as reader:
        while count := reader.readinto(buffer):
            digest.update(buffer[:count])
            if progress is not None:
                progress(count)
    return "sha256:" + digest.hexdigest()


def decompressing_reader(stream: IO[bytes], compression: str) -> IO[bytes]:
    """Wrap ``stream`` so that reads return the decompressed bytes."""
    if compression == GZIP:
        # ISA-L inflates about twice as fast as zlib (0.26 s against 0.56 s for a 123 MiB
        # layer) and raises IsalError, not zlib.error, on corrupt data.
        inflating = igzip.IGzipFile(fileobj=stream, mode="rb")  # type: ignore[no-untyped-call]
        return cast(IO[bytes], inflating)
    if compression == ZSTD:
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(
            stream, read_across_frames=True, closefd=False
        )
        return reader
    return stream


def decompress_blob(
    stream: IO[bytes],
    target: Path,
    *,
    blob_name: str,
    expected_digest: str | None,
    expected_size: int | None,
    expected_diff_id: str | None,
    progress: Callable[[int], None] | None = None,
    written: Callable[[int], None] | None = None,
) -> tuple[str, int, str, str, int]:
    """Decompress a layer blob into ``target`` while checking both its digests.

    Returns ``(blob digest, blob size, compression, diff_id, uncompressed size)``.
    ``written`` is called from a worker thread with the size of ``target`` each time more
    bytes are in the file, so that a :class:`GrowingFile` can read it meanwhile.

    Raises:
        ImageError: the blob's digest, size or uncompressed digest differ from what the
            manifest and config say, or the compressed data is corrupt. ``target`` is removed.
    """
    raw = HashingReader(stream, progress)
    buffered = io.BufferedReader(raw, buffer_size=CHUNK)
    compression = sniff_compression(buffered.peek(4)[:4])
    try:
        with open(target, "wb") as out:
            # Hashing and writing the content happen in a worker while this thread reads,
            # hashes and inflates the next chunk. An uncompressed blob is its own content,
            # so the blob's digest is also the diff_id and the content is only counted.
            content = HashingWriter(out) if compression != UNCOMPRESSED else CountingWriter(out)
            sink: _Writable = content
            if written is not None:
                sink = _Announcing(content, out, written)
            background = BackgroundWriter(cast(IO[bytes], sink))
            try:
                reader = decompressing_reader(buffered, compression)
                while chunk := reader.read(CHUNK):
                    background.write(chunk)
                # Read whatever follows the compressed stream so the blob digest covers it.
                while buffered.read(CHUNK):
                    pass
            finally:
                background.finish()
    except (OSError, *DECOMPRESSION_ERRORS) as exc:
        target.unlink(missing_ok=True)
        raise ImageError(f"layer blob {blob_name}: corrupt {compression} data: {exc}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    uncompressed_size = content.count
    diff_id = content.digest if isinstance(content, HashingWriter) else raw.digest
    try:
        check_layer_blob(
            blob_name,
            digest=raw.digest,
            size=raw.count,
            diff_id=diff_id,
            expected_digest=expected_digest,
            expected_size=expected_size,
            expected_diff_id=expected_diff_id,
        )
    except ImageError:
        target.unlink(missing_ok=True)
        raise
    return raw.digest, raw.count, compression, diff_id, uncompressed_size


def check_layer_blob(
    blob_name: str,
    *,
    digest: str,
    size: int,
    diff_id: str,
    expected_digest: str | None,
    expected_size: int | None,
    expected_diff_id: str | None,
) -> None:
    """Compare the digests and size found by reading a layer blob with the expected ones.

    Raises:
        ImageError: naming the first value that differs.
    """
    problem = None
    if expected_digest is not None and digest != expected_digest:
        problem = f"its content has digest {digest}"
    elif expected_size is not None and size != expected_size:
        problem = f"it is {size} bytes long, the manifest says {expected_size}"
    elif expected_diff_id is not None and diff_id != expected_diff_id:
        problem = (
            f"its uncompressed content has digest {diff_id}, the config says {expected_diff_id}"
        )
    if problem is not None:
        raise ImageError(f"layer blob {blob_name} failed verification: {problem}")


def read_verified(stream: IO[bytes], *, name: str, digest: str | None, limit: int) -> bytes:
    """Read a small blob (manifest, config) fully and check its digest.

    Raises:
        ImageError: the blob is larger than ``limit`` bytes or its digest differs.
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{name} is larger than {limit} bytes")
    if digest is not None:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ImageError(f"{name} failed verification: its content has digest {actual}")
    return data


class VerifyingReader(HashingReader):
    """A hashing reader that raises as soon as more bytes arrive than the blob's size.

    The caller compares :attr:`digest` and :attr:`count` with the expected values at the end.
    """

    def __init__(
        self,
        inner: IO[bytes],
        digest: str,
        size: int,
        label: str,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(inner, on_read)
        self.expected_digest, self.expected_size, self.label = digest, size, label

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        if self.count > self.expected_size:
            raise ImageError(
                f"{self.label} blob {self.expected_digest} is longer than "
                f"{self.expected_size} bytes"
            )
        return int(n)


class Blob:
    """A blob to copy: its digest and size, a way to open it, and a label for messages.

    ``path``, when given, is a file in a builder's private work directory holding exactly
    this blob, whose digest was taken while this process wrote it; a destination on the same
    file system may link it instead of copying and hashing it again.
    """

    def __init__(
        self,
        digest: str,
        size: int,
        opener: Callable[[], IO[bytes]],
        label: str,
        *,
        path: Path | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.opener = opener
        self.label = label
        self.path = path


class FullReader:
    """Wraps a stream so that ``read(n)`` returns ``n`` bytes unless the stream ends.

    tarfile treats a short read as a truncated member, but sockets, decompressors and
    generator-backed streams may return fewer bytes than asked for.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return bytes(self._inner.read())
        parts = []
        remaining = size
        while remaining > 0:
            chunk = self._inner.read(remaining)
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)
