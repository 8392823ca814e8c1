"""Image sources that blobs are read from: OCI layouts, tar archives, registries.

A store hands out the top-level manifest (or index) for a reference and opens blobs by
digest. Digests are checked by the caller while it reads, so a store returns raw streams.
"""

from __future__ import annotations

import logging
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from enclavify.errors import ImageError
from enclavify.image import blobs
from enclavify.image.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    REF_NAME_ANNOTATION,
    check_digest,
    load_json,
)

log = logging.getLogger(__name__)

MAX_JSON = 4 << 20  # manifests, indexes and configs are small; refuse absurd ones


@dataclass(frozen=True)
class Root:
    """The manifest or index a reference points to."""

    data: bytes
    media_type: str | None
    digest: str | None  # expected digest, when the pointer carried one


class BlobStore(ABC):
    """Read access to one image source."""

    description: str

    @abstractmethod
    def root(self, tag: str | None, digest: str | None) -> Root:
        """Return the manifest or index the reference's tag or digest names."""

    @abstractmethod
    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        """Open a blob by digest (not yet verified)."""

    def open_manifest(self, digest: str) -> IO[bytes]:
        """Open a manifest by digest (registries keep manifests apart from blobs)."""
        return self.open_blob(digest)

    def locate(self, digest: str) -> blobs.FileRange | None:
        """Return where the blob lies in a local file, or ``None`` if it is not in one."""
        return None

    def close(self) -> None:  # noqa: B027 (most stores hold nothing open)
        """Release what the store holds open."""


def pick_from_index(index: dict[str, Any], tag: str | None, where: str) -> dict[str, Any]:
    """Choose the descriptor for ``tag`` from an OCI layout's ``index.json``.

    Without a tag, a layout holding exactly one image is unambiguous; the tag ``latest``
    also matches an unnamed sole image.
    """
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{where}: index.json lists no images")
    named: dict[str, dict[str, Any]] = {}
    for descriptor in manifests:
        if not isinstance(descriptor, dict):
            raise ImageError(f"{where}: index.json has an invalid entry {descriptor!r}")
        name = (descriptor.get("annotations") or {}).get(REF_NAME_ANNOTATION)
        if isinstance(name, str):
            named[name] = descriptor
            # Engines write either a bare tag or a full name; match "x:tag" by its tag too.
            last = name.rsplit("/", 1)[-1]
            if ":" in last:
                named.setdefault(last.rsplit(":", 1)[1], descriptor)
    if tag is not None:
        if tag in named:
            return named[tag]
        if tag == "latest" and len(manifests) == 1 and not named:
            return manifests[0]  # type: ignore[no-any-return]
        available = ", ".join(sorted(named)) or "none"
        raise ImageError(f"{where}: no image tagged {tag!r} (tags: {available})")
    if len(manifests) == 1:
        return manifests[0]  # type: ignore[no-any-return]
    available = ", ".join(sorted(named)) or "none"
    raise ImageError(
        f"{where}: contains {len(manifests)} images; name one with a tag (tags: {available})"
    )


def descriptor_root(descriptor: dict[str, Any], store: BlobStore, where: str) -> Root:
    digest = check_digest(descriptor.get("digest"), where)
    media_type = descriptor.get("mediaType")
    if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES, None):
        raise ImageError(f"{where}: unsupported manifest media type {media_type!r}")
    with store.open_manifest(digest) as stream:
        data = blobs.read_verified(stream, name=f"manifest {digest}", digest=digest, limit=MAX_JSON)
    return Root(data, media_type if isinstance(media_type, str) else None, digest)


class LayoutStore(BlobStore):
    """An OCI image layout directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"OCI layout {str(path)!r}"
        if not (path / "index.json").is_file():
            raise ImageError(f"{self.description}: not an OCI image layout (no index.json)")

    def root(self, tag: str | None, digest: str | None) -> Root:
        index = load_json((self.path / "index.json").read_bytes(), f"{self.description} index.json")
        if digest is not None:
            return descriptor_root({"digest": digest}, self, self.description)
        return descriptor_root(
            pick_from_index(index, tag, self.description), self, self.description
        )

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        try:
            return open(self._blob_path(digest), "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.description}: blob {digest} is missing") from None

    def locate(self, digest: str) -> blobs.FileRange | None:
        path = self._blob_path(digest)
        try:
            return blobs.FileRange(path, 0, path.stat().st_size)
        except FileNotFoundError:
            return None  # open_blob reports the missing blob when it is read

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = check_digest(digest, self.description).partition(":")
        return self.path / "blobs" / algorithm / hexdigest


class TarMembers:
    """Random access to the regular files of an uncompressed tar, by normalised name."""

    def __init__(self, path: Path, description: str) -> None:
        self.path = path
        self.description = description
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    name = "/".join(p for p in member.name.split("/") if p not in ("", "."))
                    if member.isreg():
                        self.members[name] = (member.offset_data, member.size)
                    elif member.islnk():
                        target = "/".join(
                            p for p in member.linkname.split("/") if p not in ("", ".")
                        )
                        if target in self.members:
                            self.members[name] = self.members[target]
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{description}: cannot read the archive: {exc}") from exc

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> IO[bytes]:
        try:
            offset, size = self.members[name]
        except KeyError:
            raise ImageError(f"{self.description}: {name!r} is missing from the archive") from None
        return blobs.open_slice(self.path, offset, size)

    def size(self, name: str) -> int:
        return self.members[name][1]

    def locate(self, name: str) -> blobs.FileRange:
        offset, size = self.members[name]
        return blobs.FileRange(self.path, offset, size)

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        with self.open(name) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{self.description}: {name!r} is larger than {limit} bytes")
        return data


def uncompressed_archive(path: Path, workdir: Path, description: str) -> Path:
    """Return ``path`` if it is an uncompressed tar, else a decompressed copy in ``workdir``."""
    try:
        with open(path, "rb") as stream:
            compression = blobs.sniff_compression(stream.read(4))
            if compression == blobs.UNCOMPRESSED:
                return path
            stream.seek(0)
            target = workdir / "archive.tar"
            log.debug("%s is %s-compressed; decompressing to %s", description, compression, target)
            with open(target, "wb") as out:
                reader = blobs.decompressing_reader(stream, compression)
                while chunk := reader.read(blobs.CHUNK):
                    out.write(chunk)
            return target
    except FileNotFoundError:
        raise ImageError(f"{description}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{description}: is a directory, not an archive") from None


class OciArchiveStore(BlobStore):
    """A tar file holding an OCI image layout (``oci-archive:``)."""

    def __init__(self, path: Path, workdir: Path) -> None:
        self.description = f"OCI archive {str(path)!r}"
        self.tar = TarMembers(
            uncompressed_archive(path, workdir, self.description), self.description
        )
        if not self.tar.has("index.json"):
            raise ImageError(f"{self.description}: not an OCI archive (no index.json)")

    def root(self, tag: str | None, digest: str | None) -> Root:
        if digest is not None:
            return descriptor_root({"digest": digest}, self, self.description)
        index = load_json(self.tar.read("index.json"), f"{self.description} index.json")
        return descriptor_root(
            pick_from_index(index, tag, self.description), self, self.description
        )

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        name = self._member(digest)
        if not self.tar.has(name):
            raise ImageError(f"{self.description}: blob {digest} is missing")
        return self.tar.open(name)

    def locate(self, digest: str) -> blobs.FileRange | None:
        name = self._member(digest)
        return self.tar.locate(name) if self.tar.has(name) else None

    def _member(self, digest: str) -> str:
        algorithm, _, hexdigest = check_digest(digest, self.description).partition(":")
        return f"blobs/{algorithm}/{hexdigest}"
