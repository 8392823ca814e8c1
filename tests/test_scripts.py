"""The checkout's scripts: the test services that scripts/services starts, stop-services stops."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


@pytest.fixture
def state() -> Iterator[Path]:
    # Not below pytest's 0700 temporary directory: PostgreSQL runs as its own user when the
    # tests run as root, and it must reach its data directory.
    directory = Path(tempfile.mkdtemp(prefix="enclavify-services-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    subprocess.run([TOP / "scripts" / "stop-services"], check=False, capture_output=True,
                   env=dict(os.environ, ENCLAVIFY_TEST_STATE=str(directory)))
    shutil.rmtree(directory, ignore_errors=True)


def test_stop_services_stops_what_services_started(state: Path) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (scripts/setup installs it)")
    env = dict(os.environ, ENCLAVIFY_TEST_STATE=str(state))
    started = subprocess.run(
        ["bash", "-c", 'top="$1"; source "$1/scripts/services" && '
         'echo "$ENCLAVIFY_TEST_REGISTRY" && echo "${ENCLAVIFY_TEST_POSTGRES:-}"',
         "services", str(TOP)],
        env=env, capture_output=True, text=True, check=True, timeout=180,
    )
    registry, postgres = started.stdout.splitlines()[:2]
    with urllib.request.urlopen(f"http://{registry}/v2/", timeout=10):
        pass
    postgres_address = postgres.rpartition("@")[2].partition("/")[0]
    assert not postgres or _answers(postgres_address)

    stopped = subprocess.run(
        [TOP / "scripts" / "stop-services"], env=env, capture_output=True, text=True,
        check=True, timeout=60,
    )

    assert "stopped the registry" in stopped.stdout
    assert not _answers(registry)
    if postgres:
        assert "stopped PostgreSQL" in stopped.stdout
        assert not _answers(postgres_address)
    again = subprocess.run(
        [TOP / "scripts" / "stop-services"], env=env, capture_output=True, text=True,
        check=True, timeout=60,
    )
    assert "stopped" not in again.stdout
