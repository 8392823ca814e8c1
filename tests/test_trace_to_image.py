"""From a recorded strace log to a confidential image that serves.

``enclavify trace`` reads the strace log of the native Flask example, recorded under podman;
the directories it prints are passed to ``sconify_image`` as they are. The resulting image
must start under attestation and answer over TLS verified against the session's CA.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from enclavify.cas.identity import load_or_create_identity
from enclavify.trace import analyze
from tests.cas_process import start_cas
from tests.sconify_support import (
    FLASK_BINARY,
    compose_service,
    example_hooks,
    podman_run_arguments,
    remove_containers,
    remove_images,
    run_sconify,
    sconify_environment,
    wait_for_free_port,
)

pytestmark = [pytest.mark.podman, pytest.mark.slow]

STRACE_LOG = Path(__file__).parent / "fixtures" / "strace" / "flask-native-podman.log"
PORT = 4996


def _status(cafile: Path, path: str) -> int:
    """The HTTP status of a GET over TLS whose certificate must verify for the name api."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="api") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n".encode())
        status_line = tls.recv(64).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_traced_directories_make_an_image_that_serves(
    podman: str, native_flask_image: str, tmp_path: Path
) -> None:
    result = analyze(STRACE_LOG.read_text(), initial_cwd="/", after_first_execve=True)
    assert "/app" in result.directories
    assert "/tls" in result.directories

    cas = start_cas(tmp_path / "cas")
    suffix = uuid.uuid4().hex[:8]
    image = f"localhost/enclavify-test/traced-{suffix}"
    namespace = f"traced-{suffix}"
    identity = tmp_path / "identity.pem"
    container = f"enclavify-test-traced-{suffix}"
    work = tmp_path / "work"
    work.mkdir()
    try:
        done = run_sconify(
            [
                f"--namespace={namespace}", "--create-namespace", "--name=flask",
                f"--from={native_flask_image}", f"--to={image}", f"--cas={cas.address}",
                f"--cas-cert={cas.certificate}", f"--identity={identity}",
                *(f"--dir={directory}" for directory in result.directories),
                f"--binary={FLASK_BINARY}",
            ],
            cwd=work,
            env=sconify_environment(tmp_path, example_hooks()),
        )
        assert done.returncode == 0, done.stderr[-4000:]

        client = cas.client(load_or_create_identity(identity))
        cafile = tmp_path / "api-ca.crt"
        cafile.write_text(client.public_values(f"{namespace}/flask")["api_ca_cert"])

        if not wait_for_free_port(PORT):
            pytest.skip(f"127.0.0.1:{PORT} stays in use by another process; the example needs it")
        _, service = compose_service(work / "docker-compose.yml")
        subprocess.run(
            [podman, "run", "-d", "--name", container, *podman_run_arguments(service), image],
            capture_output=True, text=True, timeout=120, check=True,
        )

        # An unknown patient is a 404 once the app serves from its decrypted files.
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            try:
                status = _status(cafile, "/patient/none")
            except OSError:
                status = 0
            if status == 404:
                break
            time.sleep(0.3)
        logs = subprocess.run([podman, "logs", container], capture_output=True, text=True,
                              check=False)
        assert status == 404, logs.stderr[-4000:]
    finally:
        remove_containers(podman, container)
        remove_images(podman, image)
        cas.stop()
