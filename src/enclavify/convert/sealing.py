"""The ciphertext layer: every protected entry sealed, the pack streamed straight into the layer.

No plaintext touches the disk here: file content is read from the source image's layers,
sealed chunk by chunk by :class:`enclavify.protect.Sealer`, and the chunks are written into
the new layer's pack as they are produced.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from enclavify.errors import ImageError, ProtectError
from enclavify.image import FileEntry, LayerWriter, MergedFilesystem
from enclavify.progress import Task
from enclavify.protect import CHUNK_SIZE, SealedVolume, Sealer, sealed_size

from .options import ENCLAVIFY_DATA_DIR, FSPF_PATH, PACK_PATH, is_within
from .regions import Inventory

# Added files carry a fixed time: the real one would only tell when the conversion ran.
ADDED_MTIME = 0.0


class _PackStream(io.RawIOBase):
    """The pack as a readable stream over the sealer's chunks, counting bytes into a task."""

    def __init__(self, chunks: Iterable[bytes], task: Task | None = None) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")
        self._task = task

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
            if self._task is not None:
                self._task.advance(len(chunk))
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def at_end(self) -> bool:
        """Return whether every chunk was read, running the iterator on to its end."""
        if self._pending:
            return False
        return next(self._chunks, None) is None


def sealed_total(
    filesystem: MergedFilesystem, inventory: Inventory, regions: Sequence[str]
) -> int:
    """Return the bytes of ciphertext objects the inventory will produce."""
    total = 0
    for entry in inventory.entries:
        if entry.type == "file":
            total += sealed_size(entry.size, CHUNK_SIZE)
        elif entry.type == "hardlink" and not _in_regions(entry.linkname, regions):
            target = filesystem.entry(entry.linkname)
            if target is not None:
                total += sealed_size(target.size, CHUNK_SIZE)
    return total


def _in_regions(path: str, regions: Sequence[str]) -> bool:
    return any(is_within(path, region) for region in regions)


def write_sealed_layer(
    writer: LayerWriter,
    filesystem: MergedFilesystem,
    inventory: Inventory,
    regions: Sequence[str],
    *,
    task: Task | None = None,
    shuffle: Callable[[list[FileEntry]], None] | None = None,
) -> SealedVolume:
    """Seal the inventory into ``writer`` under ``/.enclavify`` and return the volume key and tag.

    The pack is one layer entry, streamed from the sealer as the layer writer reads it. Files
    are sealed in a random order (``shuffle``, :class:`random.SystemRandom` by default); the
    layer shows only the pack's total size, not those of the files in it.
    """
    writer.add_directory(ENCLAVIFY_DATA_DIR, mode=0o755, uid=0, gid=0, mtime=ADDED_MTIME)
    sealer = Sealer(list(regions))

    files: list[FileEntry] = []
    links: list[FileEntry] = []
    for entry in inventory.entries:
        if entry.type == "dir":
            sealer.add_directory(
                entry.path, mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime=entry.mtime
            )
        elif entry.type == "file":
            files.append(entry)
        elif entry.type == "symlink":
            sealer.add_symlink(
                entry.path, entry.linkname or "", uid=entry.uid, gid=entry.gid, mtime=entry.mtime
            )
        else:
            links.append(entry)
    (shuffle or random.SystemRandom().shuffle)(files)

    pack_size = sealed_total(filesystem, inventory, regions)
    pack = _PackStream(_pack_chunks(sealer, filesystem, files, links, regions), task)
    writer.add_file(
        PACK_PATH,
        io.BufferedReader(pack, buffer_size=1 << 16),
        pack_size,
        mode=0o444,
        uid=0,
        gid=0,
        mtime=ADDED_MTIME,
    )
    # The layer took exactly `pack_size` bytes. Running the chunks to their end lets the
    # sealer check that the last source file contained no more than it declared.
    if not pack.at_end() or sealer.pack_size != pack_size:
        raise ProtectError(
            f"the sealed pack does not have the {pack_size} bytes its files declared"
        )

    volume = sealer.finish()
    writer.add_bytes(FSPF_PATH, volume.fspf, mode=0o444, uid=0, gid=0, mtime=ADDED_MTIME)
    return volume


def _pack_chunks(
    sealer: Sealer,
    filesystem: MergedFilesystem,
    files: list[FileEntry],
    links: list[FileEntry],
    regions: Sequence[str],
) -> Iterator[bytes]:
    """Seal ``files``, then ``links``, and yield the pack's chunks as they are made."""
    for entry in files:
        with filesystem.open(entry.path) as stream:
            yield from sealer.seal_file(
                entry.path,
                stream,
                entry.size,
                mode=entry.mode,
                uid=entry.uid,
                gid=entry.gid,
                mtime=entry.mtime,
            )

    for entry in links:
        target = entry.linkname or ""
        if _in_regions(target, regions):
            linked = filesystem.entry(target)
            if linked is not None and linked.type == "symlink":
                # A tar hard link may name a symbolic link; the copy is the same link.
                sealer.add_symlink(
                    entry.path, linked.linkname, uid=linked.uid, gid=linked.gid, mtime=linked.mtime
                )
            else:
                sealer.add_hardlink(entry.path, target)
            continue
        # The target stays in the clear outside the regions. Inside them the link's content is
        # sealed as a file of its own, because a protected entry cannot point into clear layers.
        target_entry = filesystem.entry(target)
        if target_entry is None or target_entry.type != "file":
            raise _dangling_hardlink(entry)
        with filesystem.open(target) as stream:
            yield from sealer.seal_file(
                entry.path,
                stream,
                target_entry.size,
                mode=target_entry.mode,
                uid=target_entry.uid,
                gid=target_entry.gid,
                mtime=target_entry.mtime,
            )


def _dangling_hardlink(entry: FileEntry) -> Exception:
    return ImageError(
        f"hard link {entry.path!r} points to {entry.linkname!r}, which is not a regular file "
        f"in the image"
    )
