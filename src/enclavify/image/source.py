"""Open an image from any transport and unpack its layers once into the work directory.

Opening resolves the reference to one manifest (choosing a platform from an index), reads
and verifies the config, then streams every layer blob once: its digest and size are
checked against the manifest, it is decompressed into ``<workdir>/image-*/layers/N.tar``
and the uncompressed digest is checked against the config's ``rootfs.diff_ids``. Each tar
is then indexed (see :mod:`enclavify.image.tarindex`), so the merged view reads files with a
seek instead of decompressing again. Nothing is extracted: the only files written are the
uncompressed tars, inside the work directory.

An uncompressed blob that lies in a local file (a docker archive's layers, an OCI layout's
plain blobs) is its own tar, so it is checked and indexed where it is, not copied: the index
then contains positions in that file. The file must not change while the image is open.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

from enclavify.errors import ImageError
from enclavify.image import blobs, tarindex
from enclavify.image.engine import export_image
from enclavify.image.filesystem import MergedFilesystem
from enclavify.image.model import (
    DOCKER_LAYER,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    ImageConfig,
    Platform,
    check_digest,
    load_json,
    sha256_digest,
)
from enclavify.image.reference import (
    DOCKER_ARCHIVE,
    ENGINE,
    OCI,
    OCI_ARCHIVE,
    REGISTRY,
    ImageReference,
    parse_reference,
)
from enclavify.image.stores import (
    MAX_JSON,
    BlobStore,
    LayoutStore,
    OciArchiveStore,
    TarMembers,
    descriptor_root,
    uncompressed_archive,
)

log = logging.getLogger(__name__)


def _closed_source() -> IO[bytes]:
    raise ImageError("the source image is closed")


@dataclass
class Layer:
    """One layer of a source image, unpacked into the work directory.

    ``digest``/``size``/``media_type`` describe the blob as stored; ``diff_id`` is the
    digest of the uncompressed tar at ``tar_path``; ``entries`` is its index.
    """

    index: int
    media_type: str
    digest: str
    size: int
    diff_id: str
    compression: str
    tar_path: Path
    uncompressed_size: int
    entries: list[tarindex.TarEntry] = field(repr=False)
    annotations: dict[str, str] = field(default_factory=dict, repr=False)
    opener: Callable[[], IO[bytes]] = field(repr=False, default=_closed_source)
    tar_offset: int = 0

    def open_blob(self) -> IO[bytes]:
        """Open the original blob again (for a verbatim copy); the reader checks the digest."""
        return self.opener()

    def open_tar(self) -> BinaryIO:
        """Open the uncompressed tar: ``uncompressed_size`` bytes of ``tar_path`` from
        ``tar_offset``. The entries' offsets are positions in ``tar_path``, not in this stream.
        """
        return blobs.open_slice(self.tar_path, self.tar_offset, self.uncompressed_size)


@dataclass
class _LayerSource:
    media_type: str
    digest: str | None
    size: int | None
    open: Callable[[], IO[bytes]]
    annotations: dict[str, str]
    location: blobs.FileRange | None = None


@dataclass
class _Unpacked:
    """A layer blob checked against its descriptor, with its uncompressed tar and index."""

    digest: str
    size: int
    compression: str
    diff_id: str
    tar_path: Path
    tar_offset: int
    uncompressed_size: int
    entries: list[tarindex.TarEntry]
    # For a tar used where it lies: its file's identity when the check began (see
    # SourceImage.check_unchanged).
    identity: tuple[int, int, int, int] | None = None


@dataclass
class _Resolved:
    manifest: dict[str, Any] | None
    manifest_digest: str | None
    config_bytes: bytes
    layers: list[_LayerSource]
    platform_from_index: Platform | None


# GIL switch interval in seconds while a layer is decompressed and indexed (see _unpack_layer).
_SWITCH_INTERVAL = 0.0005


class _ShortSwitchInterval:
    """Context manager that sets the GIL switch interval to :data:`_SWITCH_INTERVAL`.

    The interval applies to the whole process, so threads that unpack layers at the same
    time share one change. The first to enter saves the old interval, and the last to leave
    restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(_SWITCH_INTERVAL)
            self._users += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_short_switch_interval = _ShortSwitchInterval()


class SourceImage:
    """An opened image. Use as a context manager: closing removes its work files."""

    def __init__(
        self,
        reference: ImageReference,
        work: Path,
        store: BlobStore | None,
        resolved: _Resolved,
    ) -> None:
        self.reference = reference
        self.work = work
        self._store = store
        self.manifest = resolved.manifest
        self.manifest_digest = resolved.manifest_digest
        raw = load_json(resolved.config_bytes, f"{reference}: config")
        self.config = ImageConfig(raw)
        self.config_digest = sha256_digest(resolved.config_bytes)
        self.platform = resolved.platform_from_index or self.config.platform
        self.history: list[dict[str, Any]] = self.config.history
        self.layers: list[Layer] = []
        self._sources = resolved.layers
        self._filesystem: MergedFilesystem | None = None
        self._read_in_place: dict[Path, tuple[int, int, int, int]] = {}

    def _unpack(self, progress: blobs.Progress | None) -> None:
        """Check, unpack and index every layer, two at a time, one of them inflating.

        Checking a layer that lies in a local file is hashing, which releases the GIL, so
        it runs beside another layer on the second core. From bench/convert's large docker
        archive opening took 0.20 s instead of 0.30 s. A compressed layer already keeps two
        cores busy (inflating, hashing, indexing), so two of them at once gained 2.5 % and
        cost 3 to 4 MiB more memory: they take turns.
        """
        diff_ids = self.config.diff_ids
        if len(diff_ids) != len(self._sources):
            raise ImageError(
                f"{self.reference}: the manifest lists {len(self._sources)} layers but the "
                f"config's rootfs lists {len(diff_ids)} diff_ids"
            )
        for number, diff_id in enumerate(diff_ids):
            check_digest(diff_id, f"{self.reference}: config rootfs.diff_ids[{number}]")
        layer_dir = self.work / "layers"
        layer_dir.mkdir()
        total = sum(source.size or 0 for source in self._sources)
        done = 0
        counting = threading.Lock()
        inflating = threading.Lock()

        def advance(n: int) -> None:
            nonlocal done
            with counting:
                done += n
                if progress is not None:
                    progress(done, total, "unpacking layers")

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="enclavify-layer") as pool:
            opening = [
                pool.submit(
                    self._open_layer,
                    number,
                    source,
                    diff_id,
                    layer_dir=layer_dir,
                    advance=advance,
                    inflating=inflating,
                )
                for number, (source, diff_id) in enumerate(
                    zip(self._sources, diff_ids, strict=True)
                )
            ]
            try:
                self.layers = [future.result() for future in opening]
            except BaseException:
                for future in opening:
                    future.cancel()
                raise

    def _open_layer(
        self,
        number: int,
        source: _LayerSource,
        diff_id: str,
        *,
        layer_dir: Path,
        advance: Callable[[int], None],
        inflating: threading.Lock,
    ) -> Layer:
        name = source.digest or diff_id
        target = layer_dir / f"{number}.tar"
        log.debug("unpacking layer %d/%d %s", number + 1, len(self._sources), name)
        unpacked = _unpack_layer(
            source, target, name=name, diff_id=diff_id, progress=advance, inflating=inflating
        )
        if unpacked.identity is not None:
            self._read_in_place.setdefault(unpacked.tar_path, unpacked.identity)
        log.debug(
            "layer %d: %s, %d bytes %s, %d bytes uncompressed, %d entries%s",
            number,
            unpacked.digest,
            unpacked.size,
            unpacked.compression,
            unpacked.uncompressed_size,
            len(unpacked.entries),
            "" if unpacked.tar_path == target else f", read in place from {unpacked.tar_path}",
        )
        return Layer(
            index=number,
            media_type=source.media_type,
            digest=unpacked.digest,
            size=unpacked.size,
            diff_id=unpacked.diff_id,
            compression=unpacked.compression,
            tar_path=unpacked.tar_path,
            tar_offset=unpacked.tar_offset,
            uncompressed_size=unpacked.uncompressed_size,
            entries=unpacked.entries,
            annotations=source.annotations,
            opener=source.open,
        )

    def check_unchanged(self) -> None:
        """Check that no file whose layers are read where they lie has changed since opening.

        Their content was verified when the image was opened and is read again afterwards
        (by the merged view and by rewrites), so a file replaced or written to in between
        would hand out bytes that were never checked. Size, modification time and inode
        catch a file written to or replaced by another export.

        Raises:
            ImageError: such a file changed or is gone.
        """
        for path, identity in self._read_in_place.items():
            try:
                now = _identity(path)
            except OSError as exc:
                raise ImageError(f"{self.reference}: {path} can no longer be read: {exc}") from exc
            if now != identity:
                raise ImageError(
                    f"{self.reference}: {path} changed while the image was being converted "
                    "(its size, modification time or inode differ from when it was opened)"
                )

    def filesystem(self) -> MergedFilesystem:
        """Return the merged view of all layers (built once, then cached)."""
        if self._filesystem is None:
            self._filesystem = MergedFilesystem.from_layers(
                [(layer.tar_path, layer.entries) for layer in self.layers],
                identities=[(layer.diff_id, layer.tar_offset) for layer in self.layers],
                check_sources=self.check_unchanged,
            )
        return self._filesystem

    def close(self) -> None:
        """Close the source and remove the unpacked layers."""
        if self._store is not None:
            self._store.close()
            self._store = None
        for layer in self.layers:
            layer.opener = _closed_source
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SourceImage({str(self.reference)!r}, {self.platform}, {len(self.layers)} layers)"


def _unpack_layer(
    source: _LayerSource,
    target: Path,
    *,
    name: str,
    diff_id: str,
    progress: Callable[[int], None],
    inflating: threading.Lock,
) -> _Unpacked:
    """Check a layer blob's digests and index its tar, decompressing it to ``target`` unless
    it is an uncompressed blob in a local file, which is used where it lies. Decompressing
    acquires the ``inflating`` lock first.

    A worker thread indexes the tar as it reaches the disk. Header parsing holds the GIL,
    while inflating and hashing release it for each chunk and need it back between chunks.
    At the default switch interval of 5 ms the parser would hold them up that long each
    time, so :data:`_SWITCH_INTERVAL` applies while both run. On the small image of
    bench/convert, opening took 0.39 s this way against 0.46 s one step after the other.
    """
    location = source.location
    if location is not None:
        head = location.head(4)
        if blobs.sniff_compression(head) == blobs.UNCOMPRESSED:
            return _index_in_place(source, location, name=name, diff_id=diff_id, progress=progress)
    growing = blobs.GrowingFile(target)
    reader = io.BufferedReader(growing, buffer_size=blobs.CHUNK)
    try:
        with (
            inflating,
            _short_switch_interval,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclavify-index") as pool,
        ):
            indexing = pool.submit(tarindex.index_layer, target, name, reader)
            try:
                with source.open() as stream:
                    unpacked = blobs.decompress_blob(
                        stream,
                        target,
                        blob_name=name,
                        expected_digest=source.digest,
                        expected_size=source.size,
                        expected_diff_id=diff_id,
                        progress=progress,
                        written=growing.grew,
                    )
            except BaseException:
                # The indexer stops at once, and its error is dropped so that it cannot hide
                # this one.
                growing.complete(failed=True)
                raise
            growing.complete()
            digest, size, compression, actual_diff_id, uncompressed_size = unpacked
            return _Unpacked(
                digest,
                size,
                compression,
                actual_diff_id,
                target,
                0,
                uncompressed_size,
                indexing.result(),
            )
    finally:
        reader.close()


def _index_in_place(
    source: _LayerSource,
    location: blobs.FileRange,
    *,
    name: str,
    diff_id: str,
    progress: Callable[[int], None],
) -> _Unpacked:
    """Check and index an uncompressed layer blob where it lies, without copying it.

    The blob is its own tar, so its digest is also its diff_id. A worker indexes the tar's
    headers, seeking over the content, while this thread hashes every byte. Copying the
    tar to the work directory first, as a compressed blob needs, took about 0.1 s for the
    324 MiB of bench/convert's large docker archive, and as much disk again.
    """
    identity = _identity(location.path)
    # The stream is closed last, after the pool has waited for the indexer.
    with (
        location.open() as headers,
        _short_switch_interval,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclavify-index") as pool,
    ):
        indexing = pool.submit(
            tarindex.index_layer, location.path, name, headers, start=location.offset
        )
        digest = blobs.hash_range(location, progress)
        # The digests are compared before the index is used, so that a blob that differs
        # from its descriptor is reported as such, whatever the indexer made of it. On an
        # error the pool still waits for the indexer, and what it raised is dropped.
        blobs.check_layer_blob(
            name,
            digest=digest,
            size=location.size,
            diff_id=digest,
            expected_digest=source.digest,
            expected_size=source.size,
            expected_diff_id=diff_id,
        )
        entries = indexing.result()
    return _Unpacked(
        digest,
        location.size,
        blobs.UNCOMPRESSED,
        digest,
        location.path,
        location.offset,
        location.size,
        entries,
        identity,
    )


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def open_image(
    ref: str | ImageReference,
    *,
    platform: str | None = None,
    workdir: Path,
    progress: blobs.Progress | None = None,
    insecure_http: bool = False,
) -> SourceImage:
    """Open an image for reading and unpack its layers into a new folder under ``workdir``.

    ``platform`` (``os/arch[/variant]``) selects from a multi-platform index; the default is
    this machine's platform. ``insecure_http`` allows plain HTTP to a registry that is not on
    a loopback address (logged as a WARNING each time). ``progress(done, total, label)`` is
    called while layers are read.

    Raises:
        UsageError: the reference or platform is malformed.
        ImageError: the image cannot be found, read or verified.
        HostileEntryError: a layer contains an entry that would escape the root.
    """
    reference = parse_reference(ref) if isinstance(ref, str) else ref
    wanted = Platform.parse(platform) if platform else None
    workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="image-", dir=workdir))
    store: BlobStore | None = None
    image: SourceImage | None = None
    try:
        if reference.transport == DOCKER_ARCHIVE:
            assert reference.path is not None
            members = TarMembers(
                uncompressed_archive(reference.path, work, str(reference)), str(reference)
            )
            resolved = _resolve_docker_archive(members, reference)
        else:
            opened = _open_store(reference, work, insecure_http)
            if isinstance(opened, TarMembers):  # an engine export: one image, whatever its name
                resolved = _resolve_docker_archive(opened, reference, sole_image=True)
            else:
                store = opened
                resolved = _resolve_manifest(store, reference, wanted)
        image = SourceImage(reference, work, store, resolved)
        single = resolved.platform_from_index is None
        if wanted is not None and single and not wanted.matches(image.config.platform):
            raise ImageError(
                f"{reference} is a single-platform image for {image.config.platform}, not {wanted}"
            )
        image._unpack(progress)
        return image
    except OSError as exc:
        _discard(image, store, work)
        raise ImageError(f"reading {reference} failed: {exc}") from exc
    except BaseException:
        _discard(image, store, work)
        raise


def _discard(image: SourceImage | None, store: BlobStore | None, work: Path) -> None:
    if image is not None:
        image.close()
        return
    if store is not None:
        store.close()
    shutil.rmtree(work, ignore_errors=True)


def _open_store(
    reference: ImageReference, work: Path, insecure_http: bool
) -> BlobStore | TarMembers:
    if reference.transport == OCI:
        assert reference.path is not None
        return LayoutStore(reference.path)
    if reference.transport == OCI_ARCHIVE:
        assert reference.path is not None
        return OciArchiveStore(reference.path, work)
    if reference.transport == REGISTRY:
        # Imported here: the registry client (http.client) takes about 12 ms to import.
        from enclavify.image.registry import RegistryStore  # noqa: PLC0415

        return RegistryStore(reference, insecure_http=insecure_http)
    if reference.transport == ENGINE:
        return export_image(reference, work)
    raise ImageError(f"cannot read from transport {reference.transport!r}")


def _resolve_manifest(
    store: BlobStore, reference: ImageReference, wanted: Platform | None
) -> _Resolved:
    where = str(reference)
    root = store.root(reference.tag, reference.digest)
    if root.digest is None:
        # Nothing to check a manifest pulled by tag against; record what arrived.
        root = dataclasses.replace(root, digest=reference.digest or sha256_digest(root.data))
    blobs.read_verified(
        io.BytesIO(root.data), name=f"manifest {root.digest}", digest=root.digest, limit=MAX_JSON
    )
    document = load_json(root.data, f"{where}: manifest")
    media_type = document.get("mediaType") or root.media_type
    chosen: Platform | None = None
    if media_type in INDEX_TYPES or ("manifests" in document and "layers" not in document):
        descriptor, chosen = _select_platform(document, wanted or Platform.host(), where)
        root = descriptor_root(descriptor, store, where)
        document = load_json(root.data, f"{where}: manifest {root.digest}")
        media_type = document.get("mediaType") or root.media_type
    if document.get("schemaVersion") == 1:
        raise ImageError(f"{where}: Docker schema 1 manifests are not supported")
    if media_type not in (*MANIFEST_TYPES, None) or "layers" not in document:
        raise ImageError(f"{where}: unsupported manifest type {media_type!r}")

    config_descriptor = document.get("config")
    if not isinstance(config_descriptor, dict):
        raise ImageError(f"{where}: the manifest has no config descriptor")
    config_digest = check_digest(config_descriptor.get("digest"), f"{where}: config")
    with store.open_blob(config_digest) as stream:
        config_bytes = blobs.read_verified(
            stream, name=f"config {config_digest}", digest=config_digest, limit=MAX_JSON
        )

    layers: list[_LayerSource] = []
    for number, descriptor in enumerate(document.get("layers") or []):
        if not isinstance(descriptor, dict):
            raise ImageError(f"{where}: layer {number} has an invalid descriptor")
        layer_type = descriptor.get("mediaType")
        digest = check_digest(descriptor.get("digest"), f"{where}: layer {number}")
        if layer_type not in LAYER_TYPES:
            raise ImageError(f"{where}: layer {digest} has unsupported media type {layer_type!r}")
        size = descriptor.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{where}: layer {digest} has an invalid size {size!r}")
        layers.append(
            _LayerSource(
                str(layer_type),
                digest,
                size,
                _blob_opener(store, digest, size),
                dict(descriptor.get("annotations") or {}),
                store.locate(digest),
            )
        )
    return _Resolved(document, root.digest, config_bytes, layers, chosen)


def _blob_opener(store: BlobStore, digest: str, size: int | None) -> Callable[[], IO[bytes]]:
    return lambda: store.open_blob(digest, size)


def _select_platform(
    index: dict[str, Any], wanted: Platform, where: str
) -> tuple[dict[str, Any], Platform]:
    available: list[Platform] = []
    for descriptor in index.get("manifests") or []:
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("platform"), dict):
            continue
        candidate = Platform.from_json(descriptor["platform"])
        if candidate.os == "unknown":
            continue  # attestation manifests that buildkit adds to indexes
        available.append(candidate)
        if wanted.matches(candidate):
            log.debug("%s: selected platform %s from the index", where, candidate)
            return descriptor, candidate
    listed = ", ".join(str(p) for p in available) or "none"
    raise ImageError(
        f"{where}: no image for platform {wanted} in the index (available: {listed}); "
        "choose one with --platform"
    )


def _resolve_docker_archive(
    members: TarMembers, reference: ImageReference, *, sole_image: bool = False
) -> _Resolved:
    where = str(reference)
    entries = load_list(members.read("manifest.json"), f"{where}: manifest.json")
    chosen: dict[str, Any] | None = None
    if sole_image and len(entries) == 1:
        chosen = entries[0]
    elif reference.repository is not None:
        wanted = _archive_names(reference)
        for entry in entries:
            if wanted & set(entry.get("RepoTags") or []):
                chosen = entry
                break
        if chosen is None:
            tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
            raise ImageError(
                f"{where}: no image named {reference.name!r} (names: {', '.join(tags) or 'none'})"
            )
    elif len(entries) == 1:
        chosen = entries[0]
    else:
        tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
        raise ImageError(
            f"{where}: contains {len(entries)} images; name one (names: {', '.join(tags)})"
        )

    config_name = _member_name(chosen.get("Config"), f"{where}: Config")
    basename = config_name.rsplit("/", 1)[-1].removesuffix(".json")
    expected = f"sha256:{basename}" if len(basename) == 64 else None
    with members.open(config_name) as stream:
        config_bytes = blobs.read_verified(
            stream, name=f"config {config_name}", digest=expected, limit=MAX_JSON
        )
    layers = []
    for number, name in enumerate(chosen.get("Layers") or []):
        member = _member_name(name, f"{where}: Layers[{number}]")
        if not members.has(member):
            raise ImageError(f"{where}: layer {member!r} is missing from the archive")
        layers.append(
            _LayerSource(
                DOCKER_LAYER,
                None,
                members.size(member),
                _member_opener(members, member),
                {},
                members.locate(member),
            )
        )
    return _Resolved(None, None, config_bytes, layers, None)


def _archive_names(reference: ImageReference) -> set[str]:
    """Return the spellings under which engines record ``reference`` in a docker archive.

    podman writes local names as ``localhost/x:tag``; docker and skopeo write Docker Hub
    names in full (``docker.io/library/x:tag``, ``docker.io/team/x:tag``).
    """
    name = reference.name
    assert name is not None
    names = {name, f"localhost/{name}"}
    first = name.split("/", 1)[0]
    if "/" not in name:
        names.add(f"docker.io/library/{name}")
    elif not ("." in first or ":" in first or first == "localhost"):
        names.add(f"docker.io/{name}")
    return names


def _member_opener(members: TarMembers, name: str) -> Callable[[], IO[bytes]]:
    return lambda: members.open(name)


def _member_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ImageError(f"{where}: expected a file name, found {value!r}")
    return "/".join(p for p in value.split("/") if p not in ("", "."))


def load_list(data: bytes, where: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ImageError(f"{where}: expected a non-empty list of images")
    return value
