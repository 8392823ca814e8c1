"""Find plaintext of protected files in the blobs of an OCI image layout.

The sample: every 32-byte window that starts at a multiple of 512 bytes in a protected file,
and its tail padded with zero bytes when fewer than 32 bytes are left there. A tar stream
stores a member's content from a 512-byte boundary and pads it with zeros. So a protected file
left in a layer, whole or in part, shows at least one of these windows at a 512-byte boundary of
the decompressed layer. Every file of 1 byte or more has at
least one window, so the sample covers each file. Layer blobs are checked at every 512-byte
boundary; other blobs (config, manifests, index), which are small, at every offset, and every
small protected file's whole content is also searched in them as a substring.

A window found is a leak unless it is explained: the same window also starts a 512-byte block
of content that is legitimately in the clear, namely a file outside the protected directories
or a file of the runtime the converter adds (which carries byte-identical copies of some
protected interpreter files). Windows of a single repeated byte carry no content and are
ignored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import zstandard

WINDOW = 32
BLOCK = 512
_READ = 1 << 20  # a multiple of BLOCK, so block boundaries stay aligned across reads
SMALL_FILE = 4096
MIN_SUBSTRING = 12


def sample_windows(content: bytes) -> Iterator[bytes]:
    """Yield the 32-byte windows at every 512-byte boundary of ``content`` (tail zero-padded)."""
    for offset in range(0, len(content), BLOCK):
        window = content[offset : offset + WINDOW]
        yield window.ljust(WINDOW, b"\x00")


def _is_constant(window: bytes) -> bool:
    return window.count(window[:1]) == len(window)


@dataclass
class ProtectedIndex:
    """The sample windows of the protected files, each with the file it came from."""

    windows: dict[bytes, str]
    small_files: dict[str, bytes]
    files: int
    excluded: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, files: Iterable[tuple[str, bytes]], excluded_digests: set[str]
    ) -> ProtectedIndex:
        """Index ``(path, content)`` pairs, leaving out files whose SHA-256 is excluded."""
        windows: dict[bytes, str] = {}
        small: dict[str, bytes] = {}
        excluded: list[str] = []
        count = 0
        for path, content in files:
            if not content:
                continue
            if hashlib.sha256(content).hexdigest() in excluded_digests:
                excluded.append(path)
                continue
            count += 1
            for window in sample_windows(content):
                if not _is_constant(window):
                    windows.setdefault(window, path)
            stripped = content.strip()
            if MIN_SUBSTRING <= len(stripped) <= SMALL_FILE:
                small[path] = stripped
        return cls(windows, small, count, excluded)


def background_windows(contents: Iterable[bytes]) -> set[bytes]:
    """Return the sample windows of content that is legitimately in the clear."""
    found: set[bytes] = set()
    for content in contents:
        found.update(sample_windows(content))
    return found


def open_blob(path: Path) -> IO[bytes]:
    """Open a blob for reading, decompressing gzip and zstd."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.open(path, "rb"))
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def _is_tar(path: Path) -> bool:
    with open_blob(path) as stream:
        head = stream.read(BLOCK)
    return len(head) == BLOCK and head[257:262] == b"ustar"


def _read_full(stream: IO[bytes], size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


@dataclass
class ScanReport:
    blobs: int
    layers: int
    scanned_bytes: int
    sample_windows: int
    found: dict[bytes, str]
    explained: int
    leaks: dict[str, int]
    excluded_files: list[str]

    def summary(self) -> str:
        return json.dumps(
            {
                "blobs": self.blobs,
                "layers": self.layers,
                "scanned_bytes": self.scanned_bytes,
                "sample_windows": self.sample_windows,
                "found": len(self.found),
                "explained": self.explained,
                "leaking_files": dict(sorted(self.leaks.items())[:20]),
                "leaking_file_count": len(self.leaks),
                "excluded_files": len(self.excluded_files),
            },
            indent=1,
        )


def layout_blobs(layout: Path) -> list[Path]:
    return sorted(path for path in (layout / "blobs").rglob("*") if path.is_file())


def scan(blobs: Iterable[Path], index: ProtectedIndex, background: set[bytes]) -> ScanReport:
    """Look for protected sample windows in ``blobs``; explain what ``background`` contains."""
    found: dict[bytes, str] = {}
    leaks: dict[str, int] = {}
    count = 0
    layers = 0
    scanned = 0
    for blob in blobs:
        count += 1
        if _is_tar(blob):
            layers += 1
            with open_blob(blob) as stream:
                while True:
                    data = _read_full(stream, _READ)
                    if not data:
                        break
                    scanned += len(data)
                    for offset in range(0, len(data) - WINDOW + 1, BLOCK):
                        window = data[offset : offset + WINDOW]
                        owner = index.windows.get(window)
                        if owner is not None:
                            found[window] = owner
            continue
        data = blob.read_bytes()
        scanned += len(data)
        for offset in range(len(data) - WINDOW + 1):
            window = data[offset : offset + WINDOW]
            owner = index.windows.get(window)
            if owner is not None:
                found[window] = owner
        for path, content in index.small_files.items():
            if content in data:
                leaks[path] = leaks.get(path, 0) + 1
    explained = 0
    for window, owner in found.items():
        if window in background:
            explained += 1
        else:
            leaks[owner] = leaks.get(owner, 0) + 1
    return ScanReport(
        blobs=count,
        layers=layers,
        scanned_bytes=scanned,
        sample_windows=len(index.windows),
        found=found,
        explained=explained,
        leaks=leaks,
        excluded_files=index.excluded,
    )


def tar_files(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(absolute path, content)`` of the regular files in a tar stream."""
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if member.isfile():
                extracted = archive.extractfile(member)
                if extracted is not None:
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    yield "/" + name.lstrip("/"), extracted.read()
