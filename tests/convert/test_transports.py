"""Every transport as destination (and as source), read back with skopeo and podman."""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from enclavify.convert import ConvertOptions, convert_image
from enclavify.image import open_image
from enclavify.progress import for_stream

from .conftest import run
from .test_convert import podman_run

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def convert(source: str, destination: str, tmp_path: Path) -> str:
    result = convert_image(
        ConvertOptions(
            source=source,
            destination=destination,
            binary="/usr/bin/python3",
            protected=("/app",),
            result_path=tmp_path / "result.json",
        )
    )
    return result.measurement


def labels_of(skopeo_reference: str, *extra: str) -> dict[str, str]:
    inspected = json.loads(run("skopeo", "inspect", *extra, skopeo_reference).stdout)
    labels: dict[str, str] = inspected["Labels"]
    return labels


def test_oci_layout(app_archive: Path, tmp_path: Path) -> None:
    measurement = convert(f"oci-archive:{app_archive}:app", f"oci:{tmp_path}/layout:v1", tmp_path)
    labels = labels_of(f"oci:{tmp_path}/layout:v1")
    assert labels["org.enclavify.measurement"] == measurement


def test_oci_archive(app_archive: Path, tmp_path: Path) -> None:
    archive = tmp_path / "out.tar"
    measurement = convert(f"oci-archive:{app_archive}:app", f"oci-archive:{archive}:v1", tmp_path)
    assert labels_of(f"oci-archive:{archive}:v1")["org.enclavify.measurement"] == measurement


def test_docker_archive_loads_into_podman(
    podman: str, app_archive: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "docker.tar"
    name = "localhost/enclavify-test/from-archive:v2"
    measurement = convert(
        f"oci-archive:{app_archive}:app", f"docker-archive:{archive}:{name}", tmp_path
    )
    assert labels_of(f"docker-archive:{archive}")["org.enclavify.measurement"] == measurement
    run(podman, "load", "-q", "-i", str(archive))
    inspected = json.loads(run(podman, "image", "inspect", name).stdout)
    assert inspected[0]["Config"]["Labels"]["org.enclavify.measurement"] == measurement
    process = podman_run(podman, name, tmp_path / "result.json", ("/app", ))
    assert process.returncode == 0, process.stderr
    assert "the protected file system was decrypted" in process.stdout


def test_registry_round_trip(registry: str, app_archive: Path, tmp_path: Path) -> None:
    destination = f"docker://{registry}/enclavify-test/confidential:v1"
    measurement = convert(f"oci-archive:{app_archive}:app", destination, tmp_path)
    labels = labels_of(destination, "--tls-verify=false")
    assert labels["org.enclavify.measurement"] == measurement
    # For a registry the rewritten layers and the runtime layer are gzip. Ciphertext is not.
    raw = run("skopeo", "inspect", "--raw", "--tls-verify=false", destination).stdout
    media_types = [layer["mediaType"] for layer in json.loads(raw)["layers"]]
    gzip_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    assert media_types[-1] == gzip_type, media_types
    assert media_types[-2] == "application/vnd.oci.image.layer.v1.tar", media_types

    # Read back from the registry: the ciphertext layer is there.
    with open_image(destination, workdir=tmp_path / "read") as image:
        assert image.filesystem().entry("/.enclavify/fspf") is not None


def test_registry_as_source(registry: str, app_archive: Path, tmp_path: Path) -> None:
    native = f"docker://{registry}/enclavify-test/native:v1"
    run("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci-archive:{app_archive}:app",
        native)
    measurement = convert(native, f"oci:{tmp_path}/from-registry:v1", tmp_path)
    labels = labels_of(f"oci:{tmp_path}/from-registry:v1")
    assert labels["org.enclavify.measurement"] == measurement


@pytest.mark.parametrize(
    "name",
    [
        "enclavify-test-plain-name",
        "localhost/enclavify-test/with-slash:and-tag",
        "127.0.0.1:5999/team/app:1.0",
    ],
)
def test_engine_names(podman: str, app_archive: Path, tmp_path: Path, name: str) -> None:
    measurement = convert(f"oci-archive:{app_archive}:app", name, tmp_path)
    inspected = json.loads(run(podman, "image", "inspect", name).stdout)
    assert inspected[0]["Config"]["Labels"]["org.enclavify.measurement"] == measurement
    run(podman, "rmi", name)


def test_engine_destination_reports_the_listed_image_id(
    podman: str, app_archive: Path, tmp_path: Path
) -> None:
    # The engine stores a manifest of its own, so the OCI manifest digest would match nothing
    # that podman lists. The last progress line names the image ID instead.
    name = "localhost/enclavify-test/reports-id:v1"
    lines = io.StringIO()
    convert_image(
        ConvertOptions(
            source=f"oci-archive:{app_archive}:app",
            destination=name,
            binary="/usr/bin/python3",
            protected=("/app",),
            result_path=tmp_path / "result.json",
        ),
        progress=for_stream(lines, bars=False),
    )
    image_id = json.loads(run(podman, "image", "inspect", name).stdout)[0]["Id"]
    run(podman, "rmi", name)

    assert f"Wrote {name} (image ID sha256:{image_id})" in lines.getvalue()


def wait_for_https(port: int, context: ssl.SSLContext, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="api"),
            ):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered TLS on 127.0.0.1:{port}")


def https_request(
    port: int, context: ssl.SSLContext, method: str, path: str, body: bytes = b""
) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    # The certificate names "api"; connect to the loopback address but check that name.
    connection.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="api"
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    connection.request(method, path, body=body or None, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_flask_example_serves_https_from_protected_files(
    podman: str, native_flask_image: str, tmp_path: Path
) -> None:
    regions = ("/app", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/tls")
    target = "localhost/enclavify-test/flask-confidential:v1"
    result_path = tmp_path / "result.json"
    convert_image(
        ConvertOptions(
            source=native_flask_image,
            destination=target,
            binary="/usr/bin/python3",
            protected=regions,
            result_path=result_path,
        )
    )
    with open_image(native_flask_image, workdir=tmp_path / "native") as native:
        certificate = native.filesystem().read_bytes("/tls/flask.crt")
    (tmp_path / "ca.pem").write_bytes(certificate)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    port = free_port()
    name = f"enclavify-flask-{port}"
    argv = [
        podman, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:4996",
        "-e", "ENCLAVIFY_INSECURE_CONFIG_FILE=/run/enclavify-config.json",
        "-v", f"{result_path}:/run/enclavify-config.json:ro",
    ]
    for region in regions:
        argv += ["--tmpfs", region]
    run(*argv, target)
    try:
        wait_for_https(port, context, time.monotonic() + 60)
        form = urllib.parse.urlencode({"fname": "Jane", "lname": "Doe", "ssn": "123-223-2345"})
        status, body = https_request(port, context, "POST", "/patient/patient_3", form.encode())
        assert status == 201, body
        status, body = https_request(port, context, "GET", "/patient/patient_3")
        assert status == 200, body
        assert json.loads(body)["fname"] == "Jane"
    finally:
        logs = subprocess.run([podman, "logs", name], capture_output=True, text=True, check=False)
        subprocess.run([podman, "rm", "-f", name], capture_output=True, check=False)
        # Shown by pytest only when the test fails.
        print(logs.stdout[-2000:], logs.stderr[-2000:])
