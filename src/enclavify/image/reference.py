"""Image references: where an image is read from or written to.

Accepted forms (the part after the first ``:`` of a path transport is split at the first
``:``, as skopeo does, so a path must not contain ``:``):

    oci:PATH[:TAG]                       an OCI image layout directory
    oci-archive:PATH[:TAG]               a tar file holding an OCI image layout
    docker-archive:PATH[:NAME[:TAG]]     what ``docker save`` and ``podman save`` write
    docker://HOST[:PORT]/REPO[:TAG]      an OCI distribution registry
    docker://HOST[:PORT]/REPO@sha256:HEX
    containers-storage:NAME              podman's local store
    docker-daemon:NAME                   the Docker engine's local store
    NAME                                 a local engine's store: podman if installed, else docker

A bare NAME follows the engines' naming: ``native_image``, ``localhost/x:tag``,
``registry.example:5000/team/x:tag`` and ``x@sha256:HEX`` all name local images.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from enclavify.errors import UsageError

OCI = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
REGISTRY = "docker"
ENGINE = "engine"

TRANSPORTS = (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE, REGISTRY, ENGINE)

_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference.

    ``transport`` is one of :data:`TRANSPORTS`. ``path`` is set for the layout and archive
    transports; ``host`` for a registry; ``repository`` is the image name without tag
    (``x`` for ``docker-archive:a.tar:x:1``, ``team/app`` for ``docker://h:5000/team/app``,
    ``localhost/app`` for an engine name). ``engine`` is ``podman``, ``docker`` or ``None``
    (whichever is installed).
    """

    transport: str
    path: Path | None = None
    host: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    engine: str | None = None

    @property
    def name(self) -> str | None:
        """Return ``repository:tag`` (or ``repository@digest``) when a repository is set."""
        if self.repository is None:
            return None
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"

    @property
    def is_loopback(self) -> bool:
        """Return whether a registry host is a loopback address (plain HTTP is allowed there)."""
        if self.host is None:
            return False
        host = self.host.rsplit(":", 1)[0] if not self.host.endswith("]") else self.host
        if host.startswith("[") and "]" in host:
            host = host[1 : host.index("]")]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.transport in (OCI, OCI_ARCHIVE):
            return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")
        if self.transport == DOCKER_ARCHIVE:
            return f"{self.transport}:{self.path}" + (f":{self.name}" if self.repository else "")
        if self.transport == REGISTRY:
            return f"docker://{self.host}/{self.name}"
        prefix = {"podman": "containers-storage:", "docker": "docker-daemon:"}.get(
            self.engine or "", ""
        )
        return f"{prefix}{self.name}"


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference in one of the forms listed in the module documentation.

    Raises:
        UsageError: the text is empty, names an unknown transport or is malformed.
    """
    if not text or text != text.strip():
        raise UsageError(f"invalid image reference {text!r}: empty or surrounded by spaces")
    if text.startswith("docker://"):
        return _parse_registry(text, text[len("docker://") :])
    for transport in (OCI_ARCHIVE, OCI):
        if text.startswith(transport + ":"):
            path, _, tag = text[len(transport) + 1 :].partition(":")
            if not path:
                raise UsageError(f"invalid image reference {text!r}: the path is missing")
            if tag and not _TAG.match(tag):
                raise UsageError(f"invalid image reference {text!r}: invalid tag {tag!r}")
            return ImageReference(transport, path=Path(path), tag=tag or None)
    if text.startswith(DOCKER_ARCHIVE + ":"):
        path, _, name = text[len(DOCKER_ARCHIVE) + 1 :].partition(":")
        if not path:
            raise UsageError(f"invalid image reference {text!r}: the path is missing")
        if not name:
            return ImageReference(DOCKER_ARCHIVE, path=Path(path))
        repository, archive_tag, digest = _split_name(text, name)
        if digest is not None:
            raise UsageError(f"invalid image reference {text!r}: an archive name takes no digest")
        return ImageReference(
            DOCKER_ARCHIVE, path=Path(path), repository=repository, tag=archive_tag
        )
    for prefix, engine in (("containers-storage:", "podman"), ("docker-daemon:", "docker")):
        if text.startswith(prefix):
            return _parse_engine(text, text[len(prefix) :], engine)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise UsageError(f"invalid image reference {text!r}: unknown transport")
    return _parse_engine(text, text, None)


def _parse_registry(text: str, rest: str) -> ImageReference:
    host, slash, name = rest.partition("/")
    if not slash or not name or not _HOST.match(host):
        raise UsageError(
            f"invalid image reference {text!r}: expected docker://HOST[:PORT]/REPOSITORY[:TAG]"
        )
    repository, tag, digest = _split_name(text, name)
    return ImageReference(REGISTRY, host=host, repository=repository, tag=tag, digest=digest)


def _parse_engine(text: str, name: str, engine: str | None) -> ImageReference:
    repository, tag, digest = _split_name(text, name)
    return ImageReference(ENGINE, repository=repository, tag=tag, digest=digest, engine=engine)


def _split_name(text: str, name: str) -> tuple[str, str | None, str | None]:
    """Split ``[HOST[:PORT]/]PATH[:TAG][@DIGEST]`` into repository, tag and digest."""
    digest: str | None = None
    if "@" in name:
        name, _, digest_text = name.partition("@")
        digest = digest_text
        if not _DIGEST.match(digest_text):
            raise UsageError(
                f"invalid image reference {text!r}: invalid digest {digest!r} "
                "(expected sha256: and 64 lowercase hex digits)"
            )
    tag: str | None = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise UsageError(f"invalid image reference {text!r}: invalid tag {tag!r}")
    parts = name.split("/")
    path_parts = parts[1:] if len(parts) > 1 and _looks_like_host(parts[0]) else parts
    if not name or not all(_COMPONENT.match(part) for part in path_parts):
        raise UsageError(
            f"invalid image reference {text!r}: invalid repository name {name!r} "
            "(lowercase letters, digits and separators . _ - between them)"
        )
    if len(parts) > 1 and _looks_like_host(parts[0]) and not _HOST.match(parts[0]):
        raise UsageError(f"invalid image reference {text!r}: invalid host {parts[0]!r}")
    return name, tag, digest


def _looks_like_host(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or (component != component.lower())
    )
