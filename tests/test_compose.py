"""The compose file sconify_image writes for a confidential service."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from enclavify.cas.identity import load_or_create_identity
from enclavify.compose import (
    ComposeSettings,
    compose_document,
    is_loopback_address,
    render_compose,
    split_host,
)
from tests.cas_process import start_cas
from tests.sconify_support import (
    example_hooks,
    flask_arguments,
    remove_images,
    run_sconify,
    sconify_environment,
    wait_for_free_port,
)

REGIONS = ("/app", "/tls", "/usr/lib/python3.11")
# Service keys of the Compose specification that docker compose and podman-compose both
# implement; the file uses no others.
PORTABLE_KEYS = {"image", "environment", "tmpfs", "devices", "network_mode", "ports"}


def settings(cas: str, **changes: object) -> ComposeSettings:
    values: dict[str, object] = {
        "service": "service", "image": "localhost/app/flask:v1", "regions": REGIONS,
        "cas_address": cas, "config_id": "ns/flask/service", "exposed_ports": ("4996/tcp",),
    }
    values.update(changes)
    return ComposeSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "host", "loopback"),
    [
        ("localhost:8081", "localhost", True),
        ("127.0.0.1:8081", "127.0.0.1", True),
        ("127.8.9.1", "127.8.9.1", True),
        ("[::1]:8081", "::1", True),
        ("::1", "::1", True),
        ("cas.internal:8081", "cas.internal", False),
        ("10.1.2.3:8081", "10.1.2.3", False),
        ("[2001:db8::1]:8081", "2001:db8::1", False),
    ],
)
def test_loopback_addresses(address: str, host: str, loopback: bool) -> None:
    assert split_host(address) == host
    assert is_loopback_address(address) is loopback


def test_loopback_cas_shares_the_host_network() -> None:
    document = compose_document(settings("localhost:8081"))
    service = document["services"]["service"]
    assert service["network_mode"] == "host"
    # docker compose refuses networks beside network_mode, and host networking publishes
    # every port already.
    assert "ports" not in service
    assert "networks" not in service
    assert service["environment"] == {"ENCLAVIFY_CAS_ADDR": "localhost:8081",
                                      "ENCLAVIFY_CONFIG_ID": "ns/flask/service"}
    assert service["tmpfs"] == [f"{region}:mode=0755" for region in REGIONS]
    assert set(service) <= PORTABLE_KEYS


def test_remote_cas_publishes_ports_on_loopback_only() -> None:
    service = compose_document(settings("cas.internal:8081"))["services"]["service"]
    assert "network_mode" not in service
    assert service["ports"] == ["127.0.0.1:4996:4996"]


def test_devices_and_tmpfs_size() -> None:
    service = compose_document(
        settings("cas.internal", devices=("/dev/sgx_enclave", "/dev/sgx_provision"),
                 tmpfs_size="256m")
    )["services"]["service"]
    assert service["devices"] == ["/dev/sgx_enclave", "/dev/sgx_provision"]
    assert service["tmpfs"][0] == "/app:mode=0755,size=256m"


def test_rendered_file_parses_and_says_who_wrote_it() -> None:
    text = render_compose(settings("localhost:8081"))
    assert text.startswith("# Written by sconify_image.")
    assert yaml.safe_load(text) == compose_document(settings("localhost:8081"))


def _podman_compose() -> list[str]:
    beside = Path(sys.executable).parent / "podman-compose"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("podman-compose")
    if found is None:
        pytest.skip("podman-compose is not installed")
    return [found]


@pytest.mark.parametrize("cas", ["localhost:8081", "cas.internal:8081"])
def test_podman_compose_reads_the_file(cas: str, tmp_path: Path) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman-compose needs podman")
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(render_compose(settings(cas)))
    done = subprocess.run(
        [*_podman_compose(), "-f", str(compose_file), "config"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    parsed = yaml.safe_load(done.stdout)
    assert parsed["services"]["service"]["image"] == "localhost/app/flask:v1"


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed")
    return found


@pytest.mark.parametrize("cas", ["localhost:8081", "cas.internal:8081"])
def test_docker_compose_reads_the_file(cas: str, tmp_path: Path) -> None:
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(render_compose(settings(cas)))
    done = subprocess.run(
        [_docker_compose(), "-f", str(compose_file), "config"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["services"]["service"]["image"] == "localhost/app/flask:v1"


def _answers(cafile: Path) -> int | None:
    """The HTTP status of a verified GET for an unknown patient, or None while it starts."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the example's certificate names "api", not 127.0.0.1
    try:
        with urllib.request.urlopen("https://127.0.0.1:4996/patient/none", context=context,
                                    timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.mark.podman
@pytest.mark.slow
def test_docker_compose_starts_the_confidential_service(
    docker_host: str, native_flask_image: str, tmp_path: Path
) -> None:
    # Docker's own compose implementation, talking to podman's Docker API, starts the
    # service from the file sconify_image wrote. The launcher attests to the CAS, and the
    # service responds over TLS with the session's certificate.
    compose = _docker_compose()
    podman = shutil.which("podman") or "podman"
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    image = f"localhost/enclavify-test/compose-{uuid.uuid4().hex[:8]}"
    environment = dict(os.environ, DOCKER_HOST=docker_host)
    project = ["-p", f"enclavify-test-{uuid.uuid4().hex[:8]}"]
    with start_cas(tmp_path / "cas") as cas:
        try:
            identity = home / "identity.pem"
            done = run_sconify(
                flask_arguments(source=native_flask_image, target=image, cas=cas,
                                namespace="compose", identity=identity),
                cwd=work, env=sconify_environment(home, example_hooks()),
            )
            assert done.returncode == 0, done.stderr[-4000:]
            cafile = work / "api-ca.crt"
            values = cas.client(load_or_create_identity(identity)).public_values("compose/flask")
            cafile.write_text(values["api_ca_cert"])
            if not wait_for_free_port(4996):
                pytest.skip("127.0.0.1:4996 stays in use by another process; the example needs it")

            up = subprocess.run([compose, *project, "up", "-d"], cwd=work, env=environment,
                                capture_output=True, text=True, timeout=300, check=False)
            assert up.returncode == 0, up.stderr
            deadline = time.monotonic() + 90
            while (status := _answers(cafile)) is None and time.monotonic() < deadline:
                time.sleep(0.3)
            logs = subprocess.run([compose, *project, "logs"], cwd=work, env=environment,
                                  capture_output=True, text=True, timeout=60, check=False)
            assert status == 404, logs.stdout[-3000:]
        finally:
            subprocess.run([compose, *project, "down"], cwd=work, env=environment,
                           capture_output=True, timeout=120, check=False)
            remove_images(podman, image)
