"""Reading from and writing to a Docker engine's store through the docker CLI.

No Docker engine runs here, so podman serves the Docker API (the ``docker_host`` fixture) and
the real docker CLI talks to it through ``DOCKER_HOST``. The converter then goes the way it
goes on a Docker host: ``docker save``, ``docker load``, ``docker tag``, and the image runs
with ``docker run``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from enclavify.convert import ConvertOptions, convert_image

from .conftest import MESSAGE

pytestmark = [pytest.mark.podman, pytest.mark.slow]

REGIONS = ("/app", "/usr/lib/python3.11")


def docker(docker_host: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *argv], env=dict(os.environ, DOCKER_HOST=docker_host),
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_docker_store_round_trip(
    docker_host: str,
    app_image: str,
    app_random: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    target = f"localhost/enclavify-test/docker-{uuid.uuid4().hex[:8]}:v1"
    result_path = tmp_path / "result.json"
    try:
        convert_image(
            ConvertOptions(
                source=f"docker-daemon:{app_image}",
                destination=f"docker-daemon:{target}",
                binary="/usr/bin/python3",
                protected=REGIONS,
                result_path=result_path,
            )
        )

        entrypoint = docker(docker_host, "image", "inspect", "--format",
                            "{{json .Config.Entrypoint}}", target)
        assert entrypoint.returncode == 0, entrypoint.stderr
        assert "/opt/enclavify/" in entrypoint.stdout

        argv = ["run", "--rm", "--network=none",
                "-e", "ENCLAVIFY_INSECURE_CONFIG_FILE=/run/enclavify-config.json",
                "-v", f"{result_path}:/run/enclavify-config.json:ro"]
        for region in REGIONS:
            argv += ["--tmpfs", region]
        process = docker(docker_host, *argv, target)
        assert process.returncode == 0, process.stderr
        assert process.stdout.startswith(MESSAGE)
        assert f"random {hashlib.sha256(app_random).hexdigest()}" in process.stdout.splitlines()
        assert "INSECURE" in process.stderr
    finally:
        docker(docker_host, "rmi", "-f", target)
