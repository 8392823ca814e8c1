"""The registry transport against the loopback test registry, and its error handling."""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavify.errors import ImageError
from enclavify.image import ImageBuilder, open_image, parse_reference
from enclavify.image.registry import RegistryClient

from .conftest import OpenLayers, require_tool
from .helpers import directory, file, tar_bytes, write_multiplatform_layout

LAYERS = [
    tar_bytes([directory("app"), file("app/main.py", b"print('registry')\n")]),
    tar_bytes([file("etc/motd", b"hello\n")]),
]


def _repository(registry: str) -> str:
    return f"docker://{registry}/enclavify-test/{uuid.uuid4().hex[:10]}"


@pytest.mark.registry
def test_push_then_pull_round_trip(open_layers: OpenLayers, registry: str, workdir: Path) -> None:
    source = open_layers(LAYERS)
    builder = ImageBuilder(source)
    builder.copy_layer(source.layers[0])
    builder.copy_layer_without(source.layers[1], ["/etc"])
    builder.add_layer(lambda w: w.add_bytes("/added", b"added"), created_by="test")
    builder.config = source.config.replace(cmd=["/added"])
    reference = f"{_repository(registry)}:v1"
    digest = builder.commit(reference)
    # A second push finds every blob present and only writes the manifest again.
    assert builder.commit(reference) == digest
    for pulled_reference in (reference, reference.rsplit(":", 1)[0] + f"@{digest}"):
        with open_image(pulled_reference, workdir=workdir) as image:
            assert image.manifest_digest == digest
            assert image.config.cmd == ["/added"]
            files = image.filesystem()
            assert files.read_bytes("/app/main.py") == b"print('registry')\n"
            assert files.read_bytes("/added") == b"added"
            assert files.entry("/etc/motd") is None


@pytest.mark.registry
def test_registry_interop_with_skopeo(
    open_layers: OpenLayers, registry: str, tmp_path: Path, workdir: Path
) -> None:
    skopeo = require_tool("skopeo")
    source = open_layers(LAYERS)
    builder = ImageBuilder(source)
    for layer in source.layers:
        builder.copy_layer(layer)
    ours = f"{_repository(registry)}:ours"
    builder.commit(ours)
    inspected = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", ours.replace("docker://", "docker://", 1)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert inspected.returncode == 0, inspected.stderr
    assert len(json.loads(inspected.stdout)["Layers"]) == 2

    write_multiplatform_layout(
        tmp_path / "multi",
        {
            "linux/amd64": [tar_bytes([file("arch", b"amd64")])],
            "linux/arm64": [tar_bytes([file("arch", b"arm64")])],
        },
    )
    theirs = f"{_repository(registry)}:multi"
    pushed = subprocess.run(
        [
            skopeo,
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            f"oci:{tmp_path / 'multi'}:latest",
            theirs,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert pushed.returncode == 0, pushed.stderr
    with open_image(theirs, platform="linux/arm64", workdir=workdir) as image:
        assert image.filesystem().read_bytes("/arch") == b"arm64"


@pytest.mark.registry
def test_missing_image_is_clear(registry: str, workdir: Path) -> None:
    with pytest.raises(ImageError, match="HTTP 404"):
        open_image(f"{_repository(registry)}:absent", workdir=workdir)
    assert list(workdir.iterdir()) == []


class _AuthRequired(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer realm="http://127.0.0.1/token"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def auth_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _RedirectWithEndlessBody(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.endswith("/manifests/moved"):
            self.send_response(302)
            self.send_header("Location", self.path.replace("/moved", "/here"))
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            self.release.wait(30)  # the rest of the announced body never comes
            return
        body = b'{"here": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_redirect_body_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A redirect announcing a terabyte body must not be read (or waited for) before it is
    # followed.
    monkeypatch.setattr("enclavify.image.registry.TIMEOUT", 3.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RedirectWithEndlessBody)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = RegistryClient(parse_reference(f"docker://127.0.0.1:{server.server_address[1]}/a"))
        with client.request("GET", "manifests/moved", what="fetching manifest moved") as response:
            assert response.read() == b'{"here": true}'
    finally:
        _RedirectWithEndlessBody.release.set()
        server.shutdown()
        server.server_close()


def test_authentication_required_is_clear(auth_registry: str, workdir: Path) -> None:
    with pytest.raises(ImageError, match=r"needs authentication \(HTTP 401\)"):
        open_image(f"docker://{auth_registry}/private/app:1", workdir=workdir)


def test_plain_http_needs_loopback_or_insecure_flag(caplog: pytest.LogCaptureFixture) -> None:
    remote = parse_reference("docker://registry.example:5000/team/app:1")
    assert RegistryClient(remote).scheme == "https"
    with caplog.at_level(logging.WARNING):
        assert RegistryClient(parse_reference("docker://127.0.0.1:5000/a")).scheme == "http"
        assert caplog.text == ""
        assert RegistryClient(remote, insecure_http=True).scheme == "http"
    assert "plain HTTP to registry registry.example:5000" in caplog.text
