"""Shared fixtures: podman, the local Python base image, the test registry, the native example.

Every fixture that needs a tool or service the machine lacks skips with the reason, so a
missing podman shows up as skipped tests, never as passing ones.

    podman               path of a podman that can run a container (session)
    python_base_image    "localhost/enclavify/python-base:bookworm", built by
                         scripts/build-base-image on first use (session)
    registry             host:port of the loopback registry in $ENCLAVIFY_TEST_REGISTRY (session)
    native_flask_image   "localhost/native_flask_restapi_image:latest", the Flask example's
                         native image built by its create_native_image.sh (session)
    flask_example_dir    path of examples/flask-restapi
    docker_host          DOCKER_HOST of a Docker API that podman serves, for the docker CLI
                         and docker-compose (session)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = TOP / "tests" / "fixtures" / "containers.conf"
FLASK_EXAMPLE = TOP / "examples" / "flask-restapi"
BASE_IMAGE = "localhost/enclavify/python-base:bookworm"
NATIVE_FLASK_IMAGE = "localhost/native_flask_restapi_image:latest"


def pytest_configure(config: pytest.Config) -> None:
    # Same rule as scripts/env: machines without systemd need the test containers.conf.
    if not os.environ.get("CONTAINERS_CONF") and not Path("/run/systemd/system").is_dir():
        os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)


# Tests name the images they make below this prefix, so the session can remove them all.
TEST_IMAGE_PREFIX = "localhost/enclavify-test"


@pytest.fixture(scope="session", autouse=True)
def _remove_test_images() -> Iterator[None]:
    """Remove, after the whole session, the test images it made and stopped containers on them.

    Only images that did not exist when the session began count, so a user's images and
    those of earlier sessions stay. An image counts when every name it ever had is below
    TEST_IMAGE_PREFIX: that includes images a later build or load under the same name left
    untagged. Running containers, and the images they use, are left alone: they may belong
    to a test session running beside this one.
    """
    podman = shutil.which("podman")
    before = _image_ids(podman) if podman else set()
    yield
    if podman is None:
        return
    for image in _test_images(podman, _image_ids(podman) - before):
        _remove_image(podman, image)


def _remove_image(podman: str, image: str) -> None:
    """Remove ``image`` and its stopped containers. An image that a container still uses stays."""
    containers = subprocess.run(
        [podman, "ps", "-a", "-q", "--filter", f"ancestor={image}",
         "--filter", "status=exited", "--filter", "status=created"],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout.split()
    if containers:
        subprocess.run([podman, "rm", *containers], capture_output=True, timeout=120,
                       check=False)
    subprocess.run([podman, "rmi", image], capture_output=True, timeout=300, check=False)


def _image_ids(podman: str) -> set[str]:
    """Return the IDs of podman's images, named and untagged, but not intermediate layers."""
    listed = subprocess.run([podman, "images", "-q", "--no-trunc"], capture_output=True,
                            text=True, timeout=120, check=False)
    return set(listed.stdout.split())


def _test_images(podman: str, ids: set[str]) -> list[str]:
    """Return those of ``ids`` whose every name, past or present, is below TEST_IMAGE_PREFIX."""
    if not ids:
        return []
    inspected = subprocess.run(
        [podman, "image", "inspect", "--format", "{{.Id}} {{json .NamesHistory}}", *ids],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = []
    for line in inspected.stdout.splitlines():
        image, _, names = line.partition(" ")
        history = json.loads(names or "null") or []
        if history and all(name.startswith(TEST_IMAGE_PREFIX) for name in history):
            found.append(image)
    return found


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _probe_rootfs(directory: Path) -> None:
    """Fill ``directory`` with /bin/true and the libraries it loads, for a run probe."""
    true = Path(shutil.which("true") or "/bin/true").resolve()
    needed = [true]
    ldd = subprocess.run(["ldd", str(true)], capture_output=True, text=True, check=False)
    for line in ldd.stdout.splitlines():
        for word in line.split():
            if word.startswith("/"):
                needed.append(Path(word))
    for source in needed:
        target = directory / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.resolve(), target)
    (directory / "true").symlink_to(true)


@pytest.fixture(scope="session")
def podman() -> str:
    """The podman executable, once it has started a container on this machine."""
    path = shutil.which("podman")
    if path is None:
        pytest.skip("podman is not installed")
    with tempfile.TemporaryDirectory(prefix="enclavify-probe-") as tmp:
        rootfs = Path(tmp)
        _probe_rootfs(rootfs)
        probe = subprocess.run(
            [path, "run", "--rm", "--network=none", "--rootfs", str(rootfs), "/true"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {_tail(probe.stderr, 3)}")
    return path


@pytest.fixture(scope="session")
def python_base_image(podman: str) -> str:
    """The Debian-based Python image from scripts/build-base-image (built once, then cached)."""
    build = subprocess.run(
        [str(TOP / "scripts" / "build-base-image")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if build.returncode != 0:
        pytest.skip(f"scripts/build-base-image failed:\n{_tail(build.stderr)}")
    return os.environ.get("ENCLAVIFY_BASE_IMAGE", BASE_IMAGE)


@pytest.fixture(scope="session")
def registry() -> str:
    """host:port of the loopback test registry (started by scripts/services)."""
    address = os.environ.get("ENCLAVIFY_TEST_REGISTRY")
    if not address:
        pytest.skip("ENCLAVIFY_TEST_REGISTRY is not set (source scripts/services)")
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=5):
            pass
    except (urllib.error.URLError, OSError) as error:
        pytest.skip(f"the test registry at {address} does not answer: {error}")
    return address


@pytest.fixture(scope="session")
def flask_example_dir() -> Path:
    return FLASK_EXAMPLE


@pytest.fixture(scope="session")
def native_flask_image(podman: str, python_base_image: str) -> Iterator[str]:
    """The Flask example's native image, built with podman from the local base image.

    It carries the walk-through's name, outside the test prefix, so it is removed here after
    the session, unless an image of that name was there before.
    """
    existed = subprocess.run(
        [podman, "image", "exists", NATIVE_FLASK_IMAGE], capture_output=True, timeout=120,
        check=False,
    ).returncode == 0
    env = dict(os.environ, ENGINE=podman, BASE=python_base_image)
    build = subprocess.run(
        [str(FLASK_EXAMPLE / "create_native_image.sh")],
        cwd=FLASK_EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"create_native_image.sh failed:\n{_tail(build.stdout + build.stderr, 30)}")
    yield NATIVE_FLASK_IMAGE
    if not existed:
        _remove_image(podman, NATIVE_FLASK_IMAGE)


@pytest.fixture(scope="session")
def docker_host(podman: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``DOCKER_HOST`` of a Docker API served by ``podman system service`` for this session.

    No Docker engine runs on the test machines, so the docker CLI and docker-compose reach
    podman through its Docker-compatible API instead. Skips when the docker CLI is missing.
    """
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    socket = tmp_path_factory.mktemp("docker-api") / "podman.sock"
    address = f"unix://{socket}"
    log = socket.with_name("service.log")
    with log.open("wb") as stream:
        service = subprocess.Popen(
            [podman, "system", "service", "--time=0", address],
            stdin=subprocess.DEVNULL, stdout=stream, stderr=stream,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                [docker, "version", "--format", "{{.Server.Version}}"],
                env=dict(os.environ, DOCKER_HOST=address),
                capture_output=True, text=True, timeout=30, check=False,
            )
            if probe.returncode == 0:
                break
            if service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"podman's Docker API service failed to start:\n{_tail(log.read_text())}"
                    f"\n{probe.stderr}"
                )
            time.sleep(0.2)
        yield address
    finally:
        service.terminate()
        service.wait(timeout=30)
