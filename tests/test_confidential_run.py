"""A confidential Flask container under podman, attesting to a real CAS over TLS on 127.0.0.1.

One conversion of the example's native image is shared by the whole module. Around it:
the service starts with exactly the session's environment and injected files; a changed
ciphertext byte, a changed measurement, a session without simulation and an unreachable
CAS each stop the container with a reason; no secret reaches image metadata, layers, logs
or the host's disk (except the session file, which contains the fspf key by design, mode
0600).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard

from enclavify.cas.client import CasClient
from enclavify.cas.identity import load_or_create_identity
from enclavify.protect import open_fspf, sealed_size
from tests.cas_process import CasProcess, start_cas
from tests.sconify_support import (
    compose_service,
    example_hooks,
    flask_arguments,
    free_port,
    podman_run_arguments,
    remove_containers,
    remove_images,
    run_sconify,
    sconify_environment,
    wait_for_free_port,
)

pytestmark = [pytest.mark.podman, pytest.mark.slow]

# Test-only addition to the example's hooks: the CA's private key is injected too, so that
# the test can read it from the container's memory and look for it everywhere else.
CA_KEY_INJECTION = '\n        - path: "/tls/ca.key"\n          content: "$$SCONE::api_ca_key$$"'
PORT = 4996


@dataclass
class Deployment:
    podman: str
    cas: CasProcess
    work: Path
    identity: Path
    image: str
    namespace: str
    session_name: str
    session_file: Path
    session: dict[str, Any]
    service_name: str
    service: dict[str, Any]
    made_images: list[str]

    def client(self) -> CasClient:
        return self.cas.client(load_or_create_identity(self.identity))

    def run_arguments(self, **environment: str) -> list[str]:
        service = dict(self.service, environment={**self.service["environment"], **environment})
        return podman_run_arguments(service)

    def run_to_end(self, image: str | None = None, timeout: float = 180,
                   **environment: str) -> subprocess.CompletedProcess[str]:
        """Run the confidential container in the foreground until it exits."""
        name = f"enclavify-test-refused-{uuid.uuid4().hex[:8]}"
        try:
            return subprocess.run(
                [self.podman, "run", "--name", name, *self.run_arguments(**environment),
                 image or self.image],
                capture_output=True, text=True, timeout=timeout, check=False,
            )
        finally:
            remove_containers(self.podman, name)

    def derived_image(self, files: dict[str, bytes], mode: int = 0o644) -> str:
        """An image that is this one with ``files`` (image path: content) replaced."""
        context = self.work / f"derived-{uuid.uuid4().hex[:8]}"
        context.mkdir()
        lines = [f"FROM {self.image}"]
        for index, (path, content) in enumerate(files.items()):
            local = context / f"file{index}"
            local.write_bytes(content)
            local.chmod(mode)
            lines.append(f"COPY file{index} {path}")
        (context / "Containerfile").write_text("\n".join(lines) + "\n")
        name = f"localhost/enclavify-test/derived-{uuid.uuid4().hex[:8]}"
        self.made_images.append(name)
        subprocess.run(
            [self.podman, "build", "--layers=false", "-q", "-t", name, "-f",
             str(context / "Containerfile"), str(context)],
            capture_output=True, text=True, timeout=300, check=True,
        )
        return name

    def read_from_image(self, path: str) -> bytes:
        """A file's bytes as stored in the image (ciphertext for protected files)."""
        container = subprocess.run(
            [self.podman, "create", self.image], capture_output=True, text=True, timeout=120,
            check=True,
        ).stdout.strip()
        try:
            target = self.work / f"copied-{uuid.uuid4().hex[:8]}"
            subprocess.run([self.podman, "cp", f"{container}:{path}", str(target)],
                           capture_output=True, timeout=120, check=True)
            data = target.read_bytes()
            target.unlink()
            return data
        finally:
            remove_containers(self.podman, container)


@pytest.fixture(scope="module")
def deployment(
    podman: str, native_flask_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("confidential-home")
    work = tmp_path_factory.mktemp("confidential-work")
    cas = start_cas(tmp_path_factory.mktemp("confidential-cas") / "data")
    suffix = uuid.uuid4().hex[:8]
    image = f"localhost/enclavify-test/confidential-{suffix}"
    namespace = f"confidential-{suffix}"
    identity = home / "identity.pem"
    hooks = example_hooks()
    hooks["INJECTED_FILES"] += CA_KEY_INJECTION
    made: list[str] = [image]
    try:
        done = run_sconify(
            flask_arguments(source=native_flask_image, target=image, cas=cas,
                            namespace=namespace, identity=identity),
            cwd=work, env=sconify_environment(home, hooks),
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout == f"{namespace}/flask\n"
        session_file = work / "session.yml"
        service_name, service = compose_service(work / "docker-compose.yml")
        yield Deployment(
            podman=podman, cas=cas, work=work, identity=identity, image=image,
            namespace=namespace, session_name=f"{namespace}/flask", session_file=session_file,
            session=yaml.safe_load(session_file.read_text()), service_name=service_name,
            service=service, made_images=made,
        )
    finally:
        remove_images(podman, *made)
        cas.stop()


@dataclass
class Running:
    name: str
    cafile: Path


def _https(cafile: Path, method: str, path: str, form: str | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the name is checked below, against the certificate
    request = urllib.request.Request(
        f"https://127.0.0.1:{PORT}{path}", method=method,
        data=form.encode() if form is not None else None,
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def running(deployment: Deployment) -> Iterator[Running]:
    name = f"enclavify-test-confidential-{uuid.uuid4().hex[:8]}"
    values = deployment.client().public_values(deployment.session_name)
    cafile = deployment.work / "api-ca.crt"
    cafile.write_text(values["api_ca_cert"])
    # The example listens on 4996 in the host's network, which the CAS on 127.0.0.1 requires.
    if not wait_for_free_port(PORT):
        pytest.skip(f"127.0.0.1:{PORT} stays in use by another process; the example needs it")
    subprocess.run(
        [deployment.podman, "run", "-d", "--name", name, *deployment.run_arguments(),
         deployment.image],
        capture_output=True, text=True, timeout=120, check=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _https(cafile, "GET", "/patient/none")
                if status == 404:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run([deployment.podman, "logs", name], capture_output=True,
                                      text=True, check=False)
                pytest.fail(f"the confidential service did not answer:\n{logs.stderr[-4000:]}")
            time.sleep(0.3)
        yield Running(name, cafile)
    finally:
        remove_containers(deployment.podman, name)


def _exec(deployment: Deployment, running: Running, *command: str) -> bytes:
    return subprocess.run(
        [deployment.podman, "exec", running.name, *command],
        capture_output=True, timeout=60, check=True,
    ).stdout


def test_service_runs_with_the_session_configuration(
    deployment: Deployment, running: Running
) -> None:
    status, body = _https(running.cafile, "POST", "/patient/patient_7", "fname=Ann&lname=Lee")
    assert status == 201, body
    assert json.loads(body)["id"] == "patient_7"
    status, body = _https(running.cafile, "GET", "/patient/patient_7")
    assert (status, json.loads(body)["fname"]) == (200, "Ann")

    # The application is PID 1 (the launcher replaced itself) with exactly the session's
    # environment and working directory, not the container engine's.
    (definition,) = deployment.session["services"]
    environ = _exec(deployment, running, "cat", "/proc/1/environ").split(b"\0")
    found = dict(item.decode().split("=", 1) for item in environ if item)
    assert found == definition["environment"]
    assert "HOSTNAME" not in found
    cwd = _exec(deployment, running, "readlink", "/proc/1/cwd").decode().strip()
    assert cwd == definition["pwd"]
    cmdline = _exec(deployment, running, "cat", "/proc/1/cmdline").decode().split("\0")
    assert cmdline[: len(definition["command"])] == definition["command"]

    # Injected files default to 0600; the key is the CAS's, not the image's placeholder.
    listing = _exec(deployment, running, "stat", "-c", "%a %n", "/tls/flask.key",
                    "/tls/flask.crt").decode().split("\n")
    assert listing[0] == "600 /tls/flask.key"
    key = _exec(deployment, running, "cat", "/tls/flask.key")
    assert key.startswith(b"-----BEGIN")
    assert b"PRIVATE KEY" in key
    mounts = _exec(deployment, running, "cat", "/proc/mounts").decode()
    for region in ("/app", "/tls", "/usr/lib/python3.11"):
        assert f" {region} tmpfs " in mounts


def _pem_needles(pem: bytes) -> list[bytes]:
    """Forms a PEM secret could leak in: a PEM line, raw DER, the whole PEM in base64."""
    lines = [line for line in pem.strip().splitlines() if not line.startswith(b"-----")]
    der = base64.b64decode(b"".join(lines))
    whole = base64.b64encode(pem)
    return [lines[1][8:56], der[len(der) // 2 : len(der) // 2 + 24],
            whole[len(whole) // 2 : len(whole) // 2 + 48]]


def _key_needles(key: bytes) -> list[bytes]:
    """Forms a raw key could leak in: raw, hex, upper-case hex, base64."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)[:40]]


def _decompressed(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _found_in(data: bytes, needles: dict[str, list[bytes]]) -> list[str]:
    return sorted({name for name, forms in needles.items() for form in forms if form in data})


def _scan_tree(root: Path, needles: dict[str, list[bytes]], exclude: set[Path]) -> list[str]:
    """Files under ``root`` (no symlinks followed, regular files only) holding a needle."""
    longest = max(len(form) for forms in needles.values() for form in forms)
    hits = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if path in exclude:
                continue
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                with path.open("rb") as stream:
                    tail = b""
                    while chunk := stream.read(1 << 24):
                        found = _found_in(tail + chunk, needles)
                        if found:
                            hits.append(f"{path}: {', '.join(found)}")
                            break
                        tail = chunk[-longest:]
            except OSError:
                continue  # files that vanish or cannot be read while containers run
    return hits


def test_no_secret_outside_memory(
    deployment: Deployment, running: Running, tmp_path: Path
) -> None:
    secrets = {
        "/tls/flask.key": _exec(deployment, running, "cat", "/tls/flask.key"),
        "api_ca_key": _exec(deployment, running, "cat", "/tls/ca.key"),
    }
    (definition,) = deployment.session["services"]
    needles = {name: _pem_needles(pem) for name, pem in secrets.items()}
    needles["fspf key"] = _key_needles(bytes.fromhex(definition["fspf_key"]))
    assert all(len(form) >= 16 for forms in needles.values() for form in forms)
    podman = deployment.podman

    def output(*command: str) -> bytes:
        return subprocess.run([podman, *command], capture_output=True, timeout=300,
                              check=True).stdout

    places = {
        "podman inspect (image)": output("image", "inspect", deployment.image),
        "podman inspect (container)": output("container", "inspect", running.name),
        "podman history": output("history", "--no-trunc", "--format", "json", deployment.image),
        "container logs": subprocess.run([podman, "logs", running.name], capture_output=True,
                                         timeout=60, check=True).stderr
        + output("logs", running.name),
    }
    for place, data in places.items():
        assert not _found_in(data, needles), f"secret in {place}"

    layers = tmp_path / "layers"
    output("save", "--format", "oci-dir", "-o", str(layers), deployment.image)
    blobs = sorted((layers / "blobs" / "sha256").iterdir())
    assert len(blobs) >= 3
    for blob in blobs:
        found = _found_in(_decompressed(blob.read_bytes()), needles)
        assert not found, f"{', '.join(found)} in layer blob {blob.name}"

    # The host's disk: the container storage (every image, layer and container's files) and
    # the directories the test worked in. session.yml contains the fspf key by design (mode
    # 0600): sconify_image writes it for the operator who deploys the session.
    assert stat.S_IMODE(deployment.session_file.stat().st_mode) == 0o600
    graphroot = output("info", "--format", "{{.Store.GraphRoot}}").decode().strip()
    exclude = {deployment.session_file}
    roots = [Path(graphroot), deployment.work, deployment.cas.data, deployment.identity.parent,
             tmp_path]
    hits = [hit for root in roots for hit in _scan_tree(root, needles, exclude)]
    assert not hits, "secrets on disk:\n" + "\n".join(hits)
    # The scan does find a key where one is: the excluded session file.
    assert _found_in(deployment.session_file.read_bytes(), needles) == ["fspf key"]


def test_changed_ciphertext_byte_stops_start_naming_the_file(deployment: Deployment) -> None:
    from enclavify.convert.options import FSPF_PATH, PACK_PATH  # noqa: PLC0415

    (definition,) = deployment.session["services"]
    manifest = open_fspf(
        deployment.read_from_image(FSPF_PATH), bytes.fromhex(definition["fspf_key"]),
        bytes.fromhex(definition["fspf_tag"]),
    )
    (entry,) = [entry for entry in manifest.entries if entry.path == "/app/rest_api.py"]
    pack = bytearray(deployment.read_from_image(PACK_PATH))
    pack[entry.offset + sealed_size(entry.size) // 2] ^= 0x01
    tampered = deployment.derived_image({PACK_PATH: bytes(pack)})

    done = deployment.run_to_end(tampered)
    assert done.returncode != 0
    assert "protected file '/app/rest_api.py' failed verification" in done.stderr, done.stderr


def test_unknown_measurement_rejected_by_cas(deployment: Deployment) -> None:
    # The same image with one byte appended to the interpreter the session measured.
    real = subprocess.run(
        [deployment.podman, "run", "--rm", "--network=none", "--entrypoint", "readlink",
         deployment.image, "-f", "/usr/bin/python3"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    changed = deployment.derived_image({real: deployment.read_from_image(real) + b"\0"},
                                       mode=0o755)

    done = deployment.run_to_end(changed)
    assert done.returncode != 0
    (definition,) = deployment.session["services"]
    measured = definition["attestation"]["mrenclave"][0]
    assert re.search(r"measurement [0-9a-f]{64} of .* is not in its mrenclave list",
                     done.stderr), done.stderr
    assert measured in done.stderr  # the CAS lists the measurements it accepts


def test_session_without_simulation_refuses_simulation_evidence(
    deployment: Deployment,
) -> None:
    text = deployment.session_file.read_text()
    text = re.sub(r"(?m)^name: .*$", f"name: {deployment.namespace}/flask-hardware", text)
    text, count = re.subn(r"(?m)^(\s+mode: )\S+$", r"\1hardware", text)
    assert count == 1
    deployment.client().create_session(text)

    done = deployment.run_to_end(
        ENCLAVIFY_CONFIG_ID=f"{deployment.namespace}/flask-hardware/{deployment.service_name}")
    assert done.returncode != 0
    assert "simulation evidence is not accepted" in done.stderr, done.stderr
    assert "'hardware'" in done.stderr


def test_unreachable_cas_gives_up_with_a_clear_error(deployment: Deployment) -> None:
    port = free_port()
    started = time.monotonic()
    done = deployment.run_to_end(ENCLAVIFY_CAS_ADDR=f"127.0.0.1:{port}", timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert f"cannot connect to the CAS at 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "attempts" in done.stderr
    assert elapsed < 120


def test_stop_signal_reaches_the_application(deployment: Deployment, running: Running) -> None:
    # Runs last in this module: it stops the shared container. The application gets the
    # image's stop signal (SIGINT) itself and exits 0; a launcher in between would leave
    # podman to kill it after the timeout (exit 137).
    started = time.monotonic()
    subprocess.run([deployment.podman, "stop", "-t", "30", running.name], capture_output=True,
                   timeout=120, check=True)
    assert time.monotonic() - started < 20
    code = subprocess.run(
        [deployment.podman, "inspect", "--format", "{{.State.ExitCode}}", running.name],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    assert code == "0"
