"""Images for the conversion tests, built from the local Python base image with podman.

    app_image        "localhost/enclavify-test/app:latest": the base plus /app (a script that
                     prints a data file, a 300 KiB random file), a secret-looking ENV and a
                     build step whose command line names the secret (session)
    app_archive      the same image as an oci-archive file (session)
    nopython_image   "localhost/enclavify-test/nopython:latest": only /app files, no Python

Every test here runs with ``XDG_CACHE_HOME`` set to a directory of the test session, so
conversions through the command line fill a private runtime cache.
"""

from __future__ import annotations

import io
import secrets
import shutil
import subprocess
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

APP_IMAGE = "localhost/enclavify-test/app:latest"
NOPYTHON_IMAGE = "localhost/enclavify-test/nopython:latest"
APP_TOKEN = "token-5b0c1e-must-never-reach-the-image"
# Printed by the app from the decrypted /app: proves the container read the protected file.
MESSAGE = "enclavify test message: the protected file system was decrypted\n"

APP_SCRIPT = textwrap.dedent(
    """\
    import hashlib, json, os, sys
    with open("/app/data/message.txt") as stream:
        sys.stdout.write(stream.read())
    with open("/app/data/random.bin", "rb") as stream:
        print("random", hashlib.sha256(stream.read()).hexdigest())
    print("token", os.environ.get("APP_TOKEN", "<unset>"))
    print("cwd", os.getcwd())
    print("uid", os.getuid())
    """
)


def run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    process = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if process.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({process.returncode}):\n{process.stdout}\n{process.stderr}"
        )
    return process


@pytest.fixture(scope="session")
def runtime_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache home shared by this session's conversions, never the user's own."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _private_runtime_cache(runtime_cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(runtime_cache_home))


@pytest.fixture(scope="session")
def app_random() -> bytes:
    return secrets.token_bytes(300 * 1024)


@pytest.fixture(scope="session")
def app_image(
    podman: str, python_base_image: str, tmp_path_factory: pytest.TempPathFactory, app_random: bytes
) -> Iterator[str]:
    context = tmp_path_factory.mktemp("app-context")
    (context / "app" / "data").mkdir(parents=True)
    (context / "app" / "main.py").write_text(APP_SCRIPT)
    (context / "app" / "data" / "message.txt").write_text(MESSAGE)
    (context / "app" / "data" / "random.bin").write_bytes(app_random)
    (context / "Containerfile").write_text(
        textwrap.dedent(
            f"""\
            FROM {python_base_image}
            COPY app /app
            RUN echo "{APP_TOKEN}" > /app/data/token.txt && useradd -u 1234 -M app
            ENV APP_TOKEN={APP_TOKEN}
            LABEL org.example.team=records
            USER app
            WORKDIR /app
            EXPOSE 8080
            CMD ["python3", "/app/main.py"]
            """
        )
    )
    run(podman, "build", "--network=none", "-q", "-t", APP_IMAGE, str(context))
    yield APP_IMAGE


@pytest.fixture(scope="session")
def app_archive(app_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    archive = tmp_path_factory.mktemp("app-archive") / "app.tar"
    run("skopeo", "copy", "-q", f"containers-storage:{app_image}", f"oci-archive:{archive}:app")
    return archive


@pytest.fixture(scope="session")
def nopython_image(podman: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("nopython")
    archive = directory / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("app/hello.txt", b"hello from an image without Python\n"),
                           ("app/tool", b"#!/bin/false\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    run(podman, "import", "--change", 'CMD ["/app/tool"]', str(archive), NOPYTHON_IMAGE)
    return NOPYTHON_IMAGE
