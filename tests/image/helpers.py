"""Build small images byte by byte for the image tests, independently of enclavify.image.

Layer entries are ``(TarInfo, data)`` pairs made with :func:`file`, :func:`directory`,
:func:`symlink`, :func:`hardlink`, :func:`whiteout`, :func:`opaque`, :func:`fifo` and
:func:`device`; :func:`tar_bytes` packs them exactly as given, hostile names included.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zstandard

Entry = tuple[tarfile.TarInfo, bytes | None]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode)
    info.size = len(data)
    info.uid = uid
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode), None


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def whiteout(directory_name: str, deleted: str) -> Entry:
    prefix = f"{directory_name.rstrip('/')}/" if directory_name else ""
    return file(f"{prefix}.wh.{deleted}")


def opaque(directory_name: str) -> Entry:
    return file(f"{directory_name.rstrip('/')}/.wh..wh..opq")


def fifo(name: str) -> Entry:
    return _info(name, tarfile.FIFOTYPE, 0o644), None


def device(name: str, major: int = 1, minor: int = 3) -> Entry:
    info = _info(name, tarfile.CHRTYPE, 0o666)
    info.devmajor, info.devminor = major, minor
    return info, None


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(
    layers: Sequence[bytes],
    *,
    architecture: str = "amd64",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "config": config or {"Env": ["PATH=/usr/bin"], "Cmd": ["/app/run"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]},
        "history": history
        if history is not None
        else [{"created_by": f"test layer {i}"} for i in range(len(layers))],
    }
    if variant:
        document["variant"] = variant
    return document


class LayoutWriter:
    """Writes blobs into an OCI layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes) -> str:
        name = digest(data)
        (self.root / "blobs" / "sha256" / name.split(":")[1]).write_bytes(data)
        return name

    def image(
        self,
        layers: Sequence[bytes],
        *,
        compression: str = "gzip",
        docker_types: bool = False,
        **config_options: Any,
    ) -> tuple[dict[str, Any], bytes]:
        """Store one image's blobs; return its manifest descriptor and manifest bytes."""
        config = json.dumps(config_for(layers, **config_options)).encode()
        descriptors = []
        for layer in layers:
            blob = compress(layer, compression)
            media_type = LAYER_TYPES[compression]
            if docker_types:
                media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
            descriptors.append(
                {"mediaType": media_type, "digest": self.blob(blob), "size": len(blob)}
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker_types else OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json"
                if docker_types
                else "application/vnd.oci.image.config.v1+json",
                "digest": self.blob(config),
                "size": len(config),
            },
            "layers": descriptors,
        }
        data = json.dumps(manifest).encode()
        descriptor = {
            "mediaType": manifest["mediaType"],
            "digest": self.blob(data),
            "size": len(data),
        }
        return descriptor, data

    def index(self, descriptors: Sequence[dict[str, Any]]) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)})
        )


def write_layout(
    root: Path, layers: Sequence[bytes], *, tag: str | None = "latest", **options: Any
) -> dict[str, Any]:
    """Write a single-image OCI layout and return its manifest descriptor."""
    writer = LayoutWriter(root)
    descriptor, _ = writer.image(layers, **options)
    if tag is not None:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    writer.index([descriptor])
    return descriptor


def write_multiplatform_layout(
    root: Path, platforms: dict[str, Sequence[bytes]], *, tag: str = "latest"
) -> None:
    """Write a layout whose tag points to an image index with one image per platform."""
    writer = LayoutWriter(root)
    entries = []
    for name, layers in platforms.items():
        _, architecture, *rest = name.split("/")
        variant = rest[0] if rest else None
        descriptor, _ = writer.image(layers, architecture=architecture, variant=variant)
        descriptor["platform"] = {"os": "linux", "architecture": architecture}
        if variant:
            descriptor["platform"]["variant"] = variant
        entries.append(descriptor)
    # buildkit adds attestation manifests with an unknown platform; they must be skipped
    attestation, _ = writer.image([tar_bytes([file("x", b"x")])])
    attestation["platform"] = {"os": "unknown", "architecture": "unknown"}
    entries.append(attestation)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    writer.index(
        [
            {
                "mediaType": OCI_INDEX,
                "digest": writer.blob(index),
                "size": len(index),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ]
    )


def write_docker_archive(
    path: Path, layers: Sequence[bytes], *, repo_tags: Sequence[str] = (), **config_options: Any
) -> None:
    """Write what ``docker save`` writes for one image, with uncompressed layers."""
    config = json.dumps(config_for(layers, **config_options)).encode()
    config_name = digest(config).split(":")[1] + ".json"
    members = {config_name: config}
    names = []
    for layer in layers:
        name = digest(layer).split(":")[1] + "/layer.tar"
        members[name] = layer
        names.append(name)
    members["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), to check that nothing appeared."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}
