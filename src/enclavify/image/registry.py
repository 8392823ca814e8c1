"""The OCI distribution API: pull manifests and blobs, push an image.

HTTPS with certificate verification is the default. Plain HTTP is used for loopback hosts
(the traffic never leaves the machine) and, for any other host, only when the caller passes
``insecure_http=True``, which logs a WARNING on every use. Registry authentication (token
or basic) is not implemented: a 401 response becomes an ImageError that says so.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, cast

from enclavify.errors import ImageError
from enclavify.image import blobs
from enclavify.image.blobs import VerifyingReader
from enclavify.image.model import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from enclavify.image.reference import ImageReference
from enclavify.image.stores import MAX_JSON, BlobStore, Root

if TYPE_CHECKING:
    from enclavify.image.builder import BuiltImage

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds without progress on one connection
MAX_REDIRECTS = 5
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))


class RegistryClient:
    """A minimal client for one repository on one registry."""

    def __init__(self, reference: ImageReference, *, insecure_http: bool = False) -> None:
        assert reference.host is not None and reference.repository is not None
        self.host = reference.host
        self.repository = reference.repository
        self._insecure = insecure_http
        if reference.is_loopback:
            self.scheme = "http"
        elif insecure_http:
            log.warning(
                "using plain HTTP to registry %s (insecure_http): images can be read and "
                "altered in transit",
                self.host,
            )
            self.scheme = "http"
        else:
            self.scheme = "https"
        self.base = f"{self.scheme}://{self.host}/v2/{self.repository}/"

    def _connection(self, url: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        host = url.hostname or ""
        if url.scheme == "https":
            return http.client.HTTPSConnection(
                host,
                url.port,
                timeout=TIMEOUT,
                context=ssl.create_default_context(),
                blocksize=blobs.CHUNK,
            )
        if url.scheme == "http" and (
            self.scheme == "http"
            and (
                self._insecure
                or host in ("localhost", "127.0.0.1", "::1")
                or host.startswith("127.")
            )
        ):
            return http.client.HTTPConnection(
                host, url.port, timeout=TIMEOUT, blocksize=blobs.CHUNK
            )
        raise ImageError(f"registry {self.host}: refusing to follow a redirect to {url.geturl()!r}")

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: IO[bytes] | bytes | None = None,
        expected: tuple[int, ...] = (200,),
        what: str,
    ) -> http.client.HTTPResponse:
        """Send a request, following redirects for GET and HEAD, and check the status.

        The caller reads and closes the returned response.
        """
        target = urllib.parse.urljoin(self.base, url)
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(target)
            connection = self._connection(parts)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                connection.request(method, path, body=body, headers=dict(headers or {}))
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise ImageError(f"registry {self.host}: {what} failed: {exc}") from exc
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.getheader("Location")
                # Closed unread: a redirect's body is not needed and may be of any size.
                response.close()
                connection.close()
                if not location:
                    break
                target = urllib.parse.urljoin(target, location)
                continue
            if response.status in expected:
                return response
            detail = response.read(2000).decode("utf-8", "replace").strip()
            connection.close()
            if response.status == 401:
                raise ImageError(
                    f"registry {self.host}: {what} needs authentication (HTTP 401); "
                    "registry login is not supported yet"
                )
            raise ImageError(
                f"registry {self.host}: {what} failed with HTTP {response.status}: "
                f"{detail[:300] or response.reason}"
            )
        raise ImageError(f"registry {self.host}: {what}: too many redirects")

    # -- reading -------------------------------------------------------------------------

    def get_manifest(self, reference: str) -> Root:
        response = self.request(
            "GET",
            f"manifests/{reference}",
            headers={"Accept": _ACCEPT},
            what=f"fetching manifest {self.repository}:{reference}",
        )
        with response:
            data = blobs.read_verified(
                response, name=f"manifest {reference}", digest=None, limit=MAX_JSON
            )
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip() or None
        # Pulled by digest, the manifest must match it; pulled by tag, the registry's
        # Docker-Content-Digest header (when sent) is checked, and the caller computes the
        # digest of what arrived.
        digest = reference if reference.startswith("sha256:") else None
        advertised = response.getheader("Docker-Content-Digest")
        if digest is None and advertised and advertised.startswith("sha256:"):
            digest = advertised
        return Root(data, media_type, digest)

    def open_blob(self, digest: str) -> IO[bytes]:
        return self.request("GET", f"blobs/{digest}", what=f"fetching blob {digest}")

    def open_manifest(self, digest: str) -> IO[bytes]:
        return self.request(
            "GET",
            f"manifests/{digest}",
            headers={"Accept": _ACCEPT},
            what=f"fetching manifest {digest}",
        )

    # -- writing -------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        response = self.request(
            "HEAD", f"blobs/{digest}", expected=(200, 404), what=f"checking blob {digest}"
        )
        response.close()
        return response.status == 200

    def push_blob(self, digest: str, size: int, stream: IO[bytes]) -> None:
        started = self.request(
            "POST",
            "blobs/uploads/",
            headers={"Content-Length": "0"},
            body=b"",
            expected=(202,),
            what=f"starting upload of {digest}",
        )
        started.close()
        location = started.getheader("Location")
        if not location:
            raise ImageError(f"registry {self.host}: upload of {digest} got no Location")
        separator = "&" if "?" in location else "?"
        url = urllib.parse.urljoin(self.base, location) + f"{separator}digest={digest}"
        finished = self.request(
            "PUT",
            url,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            body=stream,
            expected=(201,),
            what=f"uploading blob {digest}",
        )
        finished.close()

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        response = self.request(
            "PUT",
            f"manifests/{reference}",
            headers={"Content-Type": media_type},
            body=data,
            expected=(201,),
            what=f"pushing manifest {self.repository}:{reference}",
        )
        response.close()


class RegistryStore(BlobStore):
    """Reads an image from a registry."""

    def __init__(self, reference: ImageReference, *, insecure_http: bool = False) -> None:
        self.client = RegistryClient(reference, insecure_http=insecure_http)
        self.description = str(reference)

    def root(self, tag: str | None, digest: str | None) -> Root:
        return self.client.get_manifest(digest or tag or "latest")

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        return self.client.open_blob(digest)

    def open_manifest(self, digest: str) -> IO[bytes]:
        return self.client.open_manifest(digest)


def push_image(
    image: BuiltImage,
    reference: ImageReference,
    *,
    insecure_http: bool = False,
    progress: blobs.Progress | None = None,
) -> None:
    """Push the blobs the registry lacks, then the manifest (which makes the image visible)."""
    if reference.digest is not None and reference.digest != image.manifest_digest:
        raise ImageError(
            f"cannot push to {reference}: the image's manifest digest is {image.manifest_digest}"
        )
    client = RegistryClient(reference, insecure_http=insecure_http)
    items = [blob for blob in image.blobs() if blob.digest != image.manifest_digest]
    total = sum(blob.size for blob in items)
    done = 0
    for blob in items:
        if client.has_blob(blob.digest):
            log.debug("registry %s already has %s", client.host, blob.digest)
        else:
            log.debug("uploading %s (%d bytes) to %s", blob.digest, blob.size, client.host)
            with blob.opener() as raw:
                reader = VerifyingReader(raw, blob.digest, blob.size, blob.label)
                client.push_blob(blob.digest, blob.size, cast(IO[bytes], reader))
            if reader.count != blob.size or reader.digest != blob.digest:
                raise ImageError(
                    f"{blob.label} blob {blob.digest} failed verification while pushing"
                )
        done += blob.size
        if progress is not None:
            progress(done, total, "pushing blobs")
    client.put_manifest(reference.digest or reference.tag or "latest", image.manifest, OCI_MANIFEST)
