"""Build a new image from a source image: copy, rewrite and add layers, then commit.

Layers are added in order: call :meth:`ImageBuilder.copy_layer` or
:meth:`ImageBuilder.copy_layer_without` for each source layer to keep, then
:meth:`ImageBuilder.add_layer` for new ones, set :attr:`ImageBuilder.config`, and
:meth:`ImageBuilder.commit` to a destination. :meth:`ImageBuilder.make_layer` writes a new
layer without adding it, so that it can be written in one thread while another copies or
rewrites the source layers, and added with :meth:`ImageBuilder.append` afterwards.

Compression: the layers a builder writes, rewritten or new, are all gzip or all plain tars,
as chosen when it is made. Copied layers keep the blob they had.

History: the source's entries are kept for layers copied unchanged, including the
``empty_layer`` entries (ENV, CMD, ...) that precede them. A rewritten layer keeps its
entry's date and author but its ``created_by`` is replaced by a neutral note, because the
original command may name or contain what was removed. New layers get the given
``created_by``. ``container_config`` and ``container`` (the state of the last build step,
which may quote a command) are dropped from the config.
"""

from __future__ import annotations

import copy
import functools
import gzip
import io
import itertools
import logging
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from isal import igzip

from enclavify.errors import ImageError
from enclavify.image import blobs, destinations, tarindex
from enclavify.image.model import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    ImageConfig,
    canonical_json,
    sha256_digest,
)
from enclavify.image.reference import ImageReference, parse_reference
from enclavify.image.source import Layer, SourceImage

log = logging.getLogger(__name__)

# gzip level (zlib's scale) for new and rewritten layers; see _gzip_writer for how it is used.
DEFAULT_COMPRESSION_LEVEL = 1

REWRITTEN_CREATED_BY = "enclavify: layer rewritten without the protected directories"

_MEDIA_TYPES = {
    blobs.GZIP: OCI_LAYER_GZIP,
    blobs.ZSTD: OCI_LAYER_ZSTD,
    blobs.UNCOMPRESSED: OCI_LAYER,
}


@dataclass
class OutputLayer:
    """A layer of the image being built, with ways to read it compressed and uncompressed."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    compression: str
    open_blob: Callable[[], IO[bytes]]
    open_uncompressed: Callable[[], IO[bytes]]
    history: list[dict[str, Any]]
    path: Path | None = None  # the blob's file when this builder wrote it (see blobs.Blob)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class BuiltImage:
    """The config and manifest bytes and the layers that a destination writes."""

    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    layers: list[OutputLayer]

    def blobs(self) -> list[blobs.Blob]:
        """Return the distinct blobs to store: config, layers, then the manifest."""
        config, manifest = self.config, self.manifest
        items = [blobs.Blob(self.config_digest, len(config), lambda: io.BytesIO(config), "config")]
        seen = {self.config_digest}
        for number, layer in enumerate(self.layers):
            if layer.digest not in seen:
                seen.add(layer.digest)
                items.append(
                    blobs.Blob(
                        layer.digest,
                        layer.size,
                        layer.open_blob,
                        f"layer {number}",
                        path=layer.path,
                    )
                )
        items.append(
            blobs.Blob(
                self.manifest_digest, len(manifest), lambda: io.BytesIO(manifest), "manifest"
            )
        )
        return items


class LayerWriter:
    """Writes entries into a new layer tar (PAX format), streamed through gzip to a file.

    Paths are absolute image paths; parent directories are not created implicitly, so add
    them first when their owner or mode matters (container engines create missing parents
    as root-owned 0755 directories).
    """

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar
        self._paths: set[str] = set()

    def _info(
        self, path: str, kind: bytes, *, mode: int, uid: int, gid: int, mtime: float
    ) -> tarfile.TarInfo:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not path.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"layer paths are absolute paths below '/', got {path!r}")
        normalized = "/" + "/".join(parts)
        if normalized in self._paths:
            raise ValueError(f"{normalized!r} was already added to this layer")
        self._paths.add(normalized)
        info = tarfile.TarInfo("/".join(parts))
        info.type = kind
        info.mode = mode & 0o7777
        info.uid, info.gid = uid, gid
        info.mtime = int(mtime)
        return info

    def add_directory(
        self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = 0
    ) -> None:
        self._tar.addfile(
            self._info(path, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime)
        )

    def add_file(
        self,
        path: str,
        stream: BinaryIO | IO[bytes],
        size: int,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 0,
    ) -> None:
        """Add a regular file of exactly ``size`` bytes read from ``stream``."""
        info = self._info(path, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime)
        info.size = size
        try:
            self._tar.addfile(info, blobs.FullReader(stream))
        except OSError as exc:
            raise ImageError(f"adding {path!r} to a layer failed: {exc}") from exc

    def add_bytes(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 0,
    ) -> None:
        self.add_file(path, io.BytesIO(data), len(data), mode=mode, uid=uid, gid=gid, mtime=mtime)

    def add_symlink(
        self, path: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float = 0
    ) -> None:
        info = self._info(path, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime)
        info.linkname = target
        self._tar.addfile(info)

    def add_hardlink(self, path: str, target: str) -> None:
        """Add ``path`` as a hardlink to ``target``, a file added earlier to this layer."""
        parts = [p for p in target.split("/") if p not in ("", ".")]
        normalized = "/" + "/".join(parts)
        if normalized not in self._paths or ".." in parts:
            raise ValueError(f"hardlink target {target!r} was not added to this layer before")
        info = self._info(path, tarfile.LNKTYPE, mode=0o644, uid=0, gid=0, mtime=0)
        info.linkname = "/".join(parts)
        self._tar.addfile(info)


class RewriteStopped(Exception):
    """Error raised when a layer rewrite ends early because its caller set the stop event."""


class ImageBuilder:
    """Assembles a new image from a source image (see the module documentation)."""

    def __init__(
        self,
        source: SourceImage,
        *,
        created: datetime | None = None,
        compression: str = blobs.GZIP,
        progress: blobs.Progress | None = None,
    ) -> None:
        if compression not in (blobs.GZIP, blobs.UNCOMPRESSED):
            raise ValueError(
                f"invalid layer compression {compression!r}: expected 'gzip' or 'none'"
            )
        self.source = source
        # The gzip level of the layers this builder writes, or None to write plain tars.
        self._level = DEFAULT_COMPRESSION_LEVEL if compression == blobs.GZIP else None
        self.progress = progress
        self.config: ImageConfig = source.config
        self.layers: list[OutputLayer] = []
        self._created = (created or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._work = Path(tempfile.mkdtemp(prefix="build-", dir=source.work))
        self._history_groups = _history_groups(source)
        # Blob names are numbered from a counter, which two threads may use at once.
        self._blob_numbers = itertools.count(1)
        self.config_digest: str | None = None

    # -- layers --------------------------------------------------------------------------

    def copy_layer(self, layer: Layer) -> None:
        """Append a source layer unchanged (same blob, same digest)."""
        self._check_layer(layer)
        self.layers.append(
            OutputLayer(
                media_type=_MEDIA_TYPES[layer.compression],
                digest=layer.digest,
                size=layer.size,
                diff_id=layer.diff_id,
                uncompressed_size=layer.uncompressed_size,
                compression=layer.compression,
                open_blob=layer.open_blob,
                open_uncompressed=layer.open_tar,
                history=self._history_for(layer, rewritten=False),
            )
        )

    def copy_layer_without(
        self, layer: Layer, excluded: Sequence[str], *, stop: threading.Event | None = None
    ) -> bool:
        """Append a source layer without any entry below the ``excluded`` directories.

        The entries are removed from the blob itself, not hidden by whiteouts, and whiteouts
        and opaque markers aimed at those directories are dropped. An excluded directory's
        own entry is kept (empty) so the mount point keeps its owner and mode; a regular file
        at exactly an excluded path is removed. A kept hardlink whose target is removed
        becomes a regular file with the same content. A rewritten layer also drops device
        nodes and FIFOs.

        A layer with no entry at or below an excluded directory is copied verbatim (same
        blob, same digest), device nodes included: it holds nothing to protect, and the copy
        gives a container nothing the source image did not. Whether a device node can be
        opened is up to the runtime's device rules, not its presence in a layer, and the
        merged view that the conversion reads never contains one.
        Returns whether the layer was rewritten. Setting ``stop`` from another thread ends a
        rewrite early with :class:`RewriteStopped`.
        """
        self._check_layer(layer)
        prefixes = _normalize_excluded(excluded)
        if not any(_excluded(e, prefixes) for e in layer.entries):
            self.copy_layer(layer)
            return False
        log.debug("rewriting layer %d (%s) without %s", layer.index, layer.digest, prefixes)
        blob = self._new_blob_path(f"rewrite-{layer.index}")
        with _TarOutput(blob, self._level) as output:
            _rewrite_tar(layer, prefixes, output.stream, self.progress, stop)
        self.layers.append(output.layer(history=self._history_for(layer, rewritten=True)))
        return True

    def add_layer(
        self, fill: Callable[[LayerWriter], None], *, created_by: str, compressed: bool = True
    ) -> None:
        """Append a new layer whose entries ``fill`` writes (see :meth:`make_layer`)."""
        self.append(self.make_layer(fill, created_by=created_by, compressed=compressed))

    def make_layer(
        self, fill: Callable[[LayerWriter], None], *, created_by: str, compressed: bool = True
    ) -> OutputLayer:
        """Write a new layer whose entries ``fill`` writes, streamed to its blob, without adding it.

        The blob has the builder's compression. With ``compressed`` false it is the tar
        itself in any case, for content that does not compress, such as ciphertext, which
        gzip would only frame and checksum.
        """
        blob = self._new_blob_path("new")
        level = self._level if compressed else None
        with _TarOutput(blob, level) as output, _tar_writer(output.stream) as tar:
            fill(LayerWriter(tar))
        entry = {"created": self._created, "created_by": created_by, "comment": "enclavify"}
        return output.layer(history=[entry])

    def append(self, layer: OutputLayer) -> None:
        """Add a layer from :meth:`make_layer` after the layers added so far."""
        self.layers.append(layer)

    def _check_layer(self, layer: Layer) -> None:
        if layer.index >= len(self.source.layers) or self.source.layers[layer.index] is not layer:
            raise ValueError("the layer does not belong to this builder's source image")

    def _new_blob_path(self, kind: str) -> Path:
        # Every blob gets its own file: earlier output layers keep pointing at theirs.
        return self._work / f"{kind}-{next(self._blob_numbers)}.blob"

    def _history_for(self, layer: Layer, *, rewritten: bool) -> list[dict[str, Any]]:
        group = [dict(entry) for entry in self._history_groups[layer.index]]
        if layer.index == len(self.source.layers) - 1:
            group.extend(dict(entry) for entry in self._history_groups[-1])
        if rewritten:
            for entry in group:
                if not entry.get("empty_layer"):
                    entry["created_by"] = REWRITTEN_CREATED_BY
                    entry["comment"] = "rewritten by enclavify"
        return group

    # -- output --------------------------------------------------------------------------

    def build(self) -> BuiltImage:
        """Return the config and manifest for the layers added so far."""
        raw = self.config.raw
        raw.pop("container_config", None)
        raw.pop("container", None)
        raw["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]}
        raw["history"] = [entry for layer in self.layers for entry in layer.history]
        config = canonical_json(raw)
        config_digest = sha256_digest(config)
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [layer.descriptor() for layer in self.layers],
            }
        )
        return BuiltImage(
            config, config_digest, manifest, sha256_digest(manifest), list(self.layers)
        )

    def commit(
        self,
        dst: str | ImageReference,
        *,
        insecure_http: bool = False,
        progress: blobs.Progress | None = None,
    ) -> str:
        """Write the image to ``dst`` and return its manifest digest.

        Writes are atomic: layouts and archives are assembled next to the target and renamed
        into place; a registry receives the manifest last; an engine loads a finished archive.
        For ``docker-archive:`` and engine destinations, which store no OCI manifest, the
        digest returned is that of the OCI manifest describing the same config and layers;
        :attr:`config_digest` (the engines' image ID) is set after every commit.

        Raises:
            ImageError: the destination cannot be written, or a source file read in place
                changed since it was opened; nothing is left behind.
        """
        reference = parse_reference(dst) if isinstance(dst, str) else dst
        if not self.layers:
            raise ImageError("the image has no layers; copy or add at least one")
        # Everything read from the source without a digest check was read by now. Layers
        # copied verbatim while writing are checked against their digests as they are read.
        self.source.check_unchanged()
        image = self.build()
        destinations.write(
            image,
            reference,
            self._work,
            insecure_http=insecure_http,
            progress=progress or self.progress,
        )
        self.config_digest = image.config_digest
        log.debug("committed %s as %s", reference, image.manifest_digest)
        return image.manifest_digest

    def close(self) -> None:
        """Remove the builder's temporary blobs."""
        shutil.rmtree(self._work, ignore_errors=True)


def _open_binary(path: Path) -> IO[bytes]:
    return open(path, "rb")


def _history_groups(source: SourceImage) -> list[list[dict[str, Any]]]:
    """Split the source history into one group per layer plus a trailing group.

    Group ``i`` contains the ``empty_layer`` entries before layer ``i`` and layer ``i``'s own
    entry. A history that does not match the layers is replaced by one neutral entry each.
    """
    history = source.history
    groups: list[list[dict[str, Any]]] = [[] for _ in range(len(source.layers) + 1)]
    layers_in_history = sum(1 for entry in history if not entry.get("empty_layer"))
    if layers_in_history != len(source.layers):
        log.debug(
            "%s: history describes %d layers, the image has %d; history replaced",
            source.reference,
            layers_in_history,
            len(source.layers),
        )
        neutral = [
            [{"created_by": f"layer {i} of the source image"}] for i in range(len(source.layers))
        ]
        return [*neutral, []]
    current = 0
    for entry in history:
        groups[current].append(dict(entry))
        if not entry.get("empty_layer"):
            current += 1
    return groups


def _normalize_excluded(excluded: Iterable[str]) -> list[str]:
    prefixes = []
    for path in excluded:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not path.startswith("/") or ".." in parts:
            raise ValueError(f"excluded directories are absolute paths, got {path!r}")
        prefixes.append("/" + "/".join(parts))
    return prefixes


def _below(path: str, prefixes: Sequence[str]) -> bool:
    return any(prefix == "/" or path.startswith(prefix + "/") for prefix in prefixes)


def _at(path: str, prefixes: Sequence[str]) -> bool:
    return path in prefixes


def _excluded(entry: tarindex.TarEntry, prefixes: Sequence[str]) -> bool:
    """Return whether ``entry`` is at or below an excluded directory and must go."""
    if _below(entry.path, prefixes):
        return True
    if _at(entry.path, prefixes):
        # Keep the directory itself (and a symlink, which carries no content); drop the
        # rest, including whiteouts and opaque markers aimed at the excluded directory.
        return entry.kind not in (tarindex.DIR, tarindex.SYMLINK)
    return False


def _dropped(entry: tarindex.TarEntry, prefixes: Sequence[str]) -> bool:
    """Return whether a rewrite leaves ``entry`` out."""
    return entry.kind in (tarindex.SPECIAL, tarindex.META) or _excluded(entry, prefixes)


def _rewrite_tar(
    layer: Layer,
    prefixes: Sequence[str],
    out: IO[bytes],
    progress: blobs.Progress | None,
    stop: threading.Event | None = None,
) -> None:
    """Copy the members of ``layer`` to ``out`` byte for byte, leaving dropped ones out.

    The layer's index already gives each member's byte range, so the headers are not parsed
    a second time (0.15 s of CPU for a 123 MiB Debian layer). Only a hardlink is read again,
    because its target may be left out. Bytes between indexed members (the root directory's
    own entry, which the index skips) are copied as they are.

    Kept members that follow one another are copied as one range: a Debian base layer
    without ``/usr/lib/python3.11`` is a few large copies instead of 6000 small ones.
    """
    label = f"rewriting layer {layer.index}"
    total = layer.uncompressed_size
    latest: dict[str, tarindex.TarEntry] = {}
    # The bytes from `copied` up to the current member are not yet copied. Offsets are
    # positions in the file that contains the tar, which starts at `tar_offset` in it.
    copied = layer.tar_offset
    with open(layer.tar_path, "rb") as source:
        # The reader of hardlink headers shares the file; every read seeks first.
        source.seek(layer.tar_offset)
        tar = tarfile.open(fileobj=source, mode="r:")  # noqa: SIM115 (closing leaves source open)
        for entry in layer.entries:
            if progress is not None:
                progress(entry.header_offset - layer.tar_offset, total, label)
            if stop is not None and stop.is_set():
                raise RewriteStopped(f"rewriting layer {layer.index} was stopped")
            if entry.kind not in (tarindex.WHITEOUT, tarindex.OPAQUE, tarindex.META):
                latest[entry.path] = entry
            if _dropped(entry, prefixes):
                _copy_range(source, out, copied, entry.header_offset)
                copied = entry.end_offset
                continue
            if entry.kind in (tarindex.HARDLINK, tarindex.SYMLINK):
                member = _hardlink_member(tar, source, entry)
                if member is not None:
                    target_path, _ = tarindex.normalize_name(member.linkname, layer=layer.digest)
                    target = latest.get(target_path)
                    if target is not None and _dropped(target, prefixes):
                        _copy_range(source, out, copied, entry.header_offset)
                        _write_materialized(member, entry, source, out)
                        copied = entry.end_offset
        if layer.entries:
            _copy_range(source, out, copied, layer.entries[-1].end_offset)
    out.write(b"\0" * 1024)
    if progress is not None:
        progress(total, total, label)


# Offset of the type flag in a ustar header block.
_TYPEFLAG_OFFSET = 156


def _hardlink_member(
    tar: tarfile.TarFile, source: IO[bytes], entry: tarindex.TarEntry
) -> tarfile.TarInfo | None:
    """Return the tar header of ``entry`` if the member is a hardlink, else ``None``.

    A hardlink to a symlink is indexed as a symlink, so the check reads the type flag of the
    member's own header block (the last block before its data offset).
    """
    source.seek(entry.end_offset - tarfile.BLOCKSIZE + _TYPEFLAG_OFFSET)
    if source.read(1) != tarfile.LNKTYPE:
        return None
    tar.fileobj.seek(entry.header_offset)
    member = tarfile.TarInfo.fromtarfile(tar)
    if member.offset != entry.header_offset or not member.islnk():
        raise ImageError(f"{entry.name!r}: the layer tar changed since it was indexed")
    return member


def _write_materialized(
    member: tarfile.TarInfo, entry: tarindex.TarEntry, source: IO[bytes], out: IO[bytes]
) -> None:
    """Write a hardlink whose target was removed as a copy of that target."""
    info = copy.copy(member)
    info.pax_headers = {
        k: v for k, v in member.pax_headers.items() if k not in ("linkpath", "size")
    }
    info.linkname = ""
    if entry.kind == tarindex.SYMLINK:
        info.type, info.linkname, info.size = tarfile.SYMTYPE, entry.linkname, 0
    else:
        info.type, info.size = tarfile.REGTYPE, entry.size
    out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    if info.type == tarfile.REGTYPE:
        _copy_range(source, out, entry.data_offset, entry.data_offset + entry.size)
        padding = (-entry.size) % 512
        out.write(b"\0" * padding)


def _copy_range(source: IO[bytes], out: IO[bytes], start: int, end: int) -> None:
    source.seek(start)
    remaining = end - start
    while remaining > 0:
        chunk = source.read(min(blobs.CHUNK, remaining))
        if not chunk:
            raise ImageError(
                f"a layer tar ended {remaining} bytes early at offset {end - remaining} of its "
                "file; did the file change while the image was open?"
            )
        out.write(chunk)
        remaining -= len(chunk)


def _tar_writer(out: IO[bytes]) -> tarfile.TarFile:
    """Return a PAX tar writer over ``out``, which must count its bytes in ``tell()``.

    tarfile's stream mode ("w|") passes everything on in 10 KiB records and copies content
    in 16 KiB pieces by default. For a 224 MiB pack that meant tens of thousands of calls
    through the hashing and background writers. Plain "w" mode writes what it is given, and
    content goes in :data:`blobs.CHUNK` pieces. Both modes pad the archive to whole records,
    so the bytes are the same.
    """
    return tarfile.TarFile(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=blobs.CHUNK
    )


def _gzip_writer(out: IO[bytes] | blobs.HashingWriter, level: int) -> IO[bytes]:
    """Return a gzip stream (no name, time 0) writing to ``out`` at zlib-style ``level``.

    Levels 1 to 9 use ISA-L, whose four levels are mapped from zlib's (1-3 to 1, 4-6 to 2,
    7-9 to 3). Its level 1 compresses a 123 MiB Debian layer in 0.33 s against 1.43 s for
    zlib's level 1, to about the same size. Level 0 stores without compression, which ISA-L
    has no level for, so zlib writes it.
    """
    if level <= 0:
        return cast(
            IO[bytes],
            gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=0, mtime=0),
        )
    isal_level = min(3, (level + 2) // 3)
    stream = igzip.IGzipFile(  # type: ignore[no-untyped-call]
        filename="", fileobj=out, mode="wb", compresslevel=isal_level, mtime=0
    )
    return cast(IO[bytes], stream)


class _TarOutput:
    """Layer blob being written, with the digests of both the blob and its content.

    With a gzip ``level``, the calling thread hashes the content, and a
    :class:`blobs.BackgroundWriter` compresses, hashes the blob and writes it to disk. With
    ``level`` None the blob is the uncompressed tar, so one hash in the background writer is
    both the blob digest and the diff_id.
    """

    def __init__(self, path: Path, level: int | None) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._blob = blobs.HashingWriter(self._file)
        self._gzip: IO[bytes] | None = None
        if level is None:
            self._background = blobs.BackgroundWriter(cast(IO[bytes], self._blob))
            self._content = self._blob
            self.stream = cast(IO[bytes], self._background)
        else:
            self._gzip = _gzip_writer(self._blob, level)
            self._background = blobs.BackgroundWriter(self._gzip)
            self._content = blobs.HashingWriter(self._background)
            self.stream = cast(IO[bytes], self._content)

    def __enter__(self) -> _TarOutput:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._background.finish()
            if self._gzip is not None:
                self._gzip.close()
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            self._file.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)

    def layer(self, history: list[dict[str, Any]]) -> OutputLayer:
        path = self.path
        compression = blobs.UNCOMPRESSED if self._gzip is None else blobs.GZIP
        open_blob = functools.partial(_open_binary, path)

        def uncompressed() -> IO[bytes]:
            if compression == blobs.UNCOMPRESSED:
                return open_blob()
            return cast(IO[bytes], igzip.open(path, "rb"))  # type: ignore[no-untyped-call]

        return OutputLayer(
            media_type=_MEDIA_TYPES[compression],
            digest=self._blob.digest,
            size=self._blob.count,
            diff_id=self._content.digest,
            uncompressed_size=self._content.count,
            compression=compression,
            open_blob=open_blob,
            open_uncompressed=uncompressed,
            history=history,
            path=path,
        )
