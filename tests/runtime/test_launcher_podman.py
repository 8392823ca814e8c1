"""The launcher end to end: a confidential image assembled with podman, run with podman.

The image is the Python base image plus the sealed protected file system and the carried
runtime. The application and the interpreter's standard library are both protected regions,
so nothing the application needs is readable before the launcher decrypts it.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enclavify.attest import measurement
from enclavify.cas.client import pem_fingerprint
from enclavify.cas.identity import load_or_create_identity
from enclavify.errors import CasRejected
from enclavify.protect import seal_tree
from enclavify.protect.unseal import open_fspf
from enclavify.runtime.builder import DirectoryFiles, build_runtime
from enclavify.runtime.config import RuntimeConfig
from tests.cas.conftest import start_cas

pytestmark = [pytest.mark.podman, pytest.mark.slow]

REGIONS = ["/app", "/usr/lib/python3.11"]
TMPFS = [arg for region in REGIONS for arg in ("--tmpfs", region)]

APP = r"""
import os, signal, stat, sys, time
print("data", open("/app/data.txt").read().strip())
token = "/app/secrets/token"
if os.path.exists(token):
    print("token", open(token).read(), oct(stat.S_IMODE(os.stat(token).st_mode)))
print("ids", os.getuid(), os.getgid())
print("cwd", os.getcwd())
print("env", ",".join(sorted(os.environ)))
print("argv", " ".join(sys.argv))
sys.stdout.flush()
if sys.argv[1] == "wait":
    def stop(number, frame):
        print("got SIGTERM", flush=True)
        sys.exit(42)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
sys.exit(int(sys.argv[1]))
"""


@dataclass
class Confidential:
    image: str
    tampered: str
    context: Path
    measurement: str
    key: str
    tag: str
    config: RuntimeConfig


def _podman(podman: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [podman, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def confidential(
    podman: str, python_base_image: str, base_rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Confidential]:
    work = tmp_path_factory.mktemp("launcher")
    plain = work / "plain"
    (plain / "app").mkdir(parents=True)
    (plain / "app" / "main.py").write_text(APP)
    (plain / "app" / "data.txt").write_text("decrypted data\n")
    (plain / "usr" / "lib").mkdir(parents=True)
    shutil.copytree(base_rootfs / "usr/lib/python3.11", plain / "usr/lib/python3.11", symlinks=True)

    context = work / "context"
    context.mkdir()
    volume = seal_tree(plain, REGIONS, context / "enclavify")
    runtime = context / "runtime"
    info = build_runtime(DirectoryFiles(base_rootfs), runtime, source="base")
    config = RuntimeConfig(
        binary="/usr/bin/python3",
        heap=measurement.GIB,
        stack=4 * measurement.MIB,
        dlopen=1,
        regions=REGIONS,
        user="nobody",
        runtime_version=info.runtime_version,
        interpreter=info.to_json(),
    )
    config.write(runtime / "runtime.json")
    expected = measurement.compute(
        runtime_digest=measurement.runtime_digest(runtime),
        binary=config.binary,
        binary_digest=measurement.binary_digest(
            DirectoryFiles(base_rootfs), config.binary, REGIONS
        ),
        fspf_digest=measurement.fspf_digest(context / "enclavify" / "fspf"),
        heap=config.heap,
        stack=config.stack,
        dlopen=config.dlopen,
    )
    # The base image's own copies are hidden, so only the sealed ones can serve.
    (context / "Containerfile").write_text(
        f"FROM {python_base_image}\n"
        "RUN rm -rf /usr/lib/python3.11 /app\n"
        "COPY enclavify /.enclavify\n"
        "COPY runtime /opt/enclavify\n"
        f"ENTRYPOINT {json.dumps(info.entrypoint)}\n"
        "CMD []\n"
    )
    tag = uuid.uuid4().hex[:12]
    image = f"localhost/enclavify-test/launcher:{tag}"
    build = _podman(podman, "build", "-q", "-t", image, str(context))
    assert build.returncode == 0, build.stderr

    # The same image with one flipped ciphertext byte in /app/data.txt's object.
    manifest = open_fspf((context / "enclavify" / "fspf").read_bytes(), volume.key, volume.tag)
    data_offset = next(e.offset for e in manifest.entries if e.path == "/app/data.txt")
    tampered_context = work / "tampered"
    shutil.copytree(context, tampered_context, symlinks=True)
    pack_path = tampered_context / "enclavify" / "pack"
    content = bytearray(pack_path.read_bytes())
    content[data_offset + 3] ^= 0x01
    pack_path.write_bytes(bytes(content))
    tampered = f"localhost/enclavify-test/launcher-tampered:{tag}"
    build = _podman(podman, "build", "-q", "-t", tampered, str(tampered_context))
    assert build.returncode == 0, build.stderr

    yield Confidential(image, tampered, work, expected, volume.key.hex(), volume.tag.hex(), config)
    _podman(podman, "rmi", "-f", image, tampered)


def _config_file(app: Confidential, name: str, arg: str, **changes: object) -> Path:
    document: dict[str, object] = {
        "command": ["python3", "/app/main.py", arg],
        "environment": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "GREETING": "hi",
        },
        "pwd": "/app",
        "fspf_key": app.key,
        "fspf_tag": app.tag,
        "injection_files": [
            {"path": "/app/secrets/token", "content": base64.b64encode(b"s3cret").decode()}
        ],
        "measurement": app.measurement,
    }
    document.update(changes)
    path = app.context / name
    path.write_text(json.dumps(document))
    os.chmod(path, 0o644)
    return path


def _run_args(path: Path) -> list[str]:
    return [
        "run",
        "--rm",
        "--network=none",
        "-v",
        f"{path}:/run/enclavify-config.json:ro",
        "-e",
        "ENCLAVIFY_INSECURE_CONFIG_FILE=/run/enclavify-config.json",
    ]


def test_app_runs_on_decrypted_files(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "exit7.json", "7")
    result = _podman(podman, *_run_args(config), *TMPFS, confidential.image)
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert "data decrypted data" in lines
    assert "token s3cret 0o600" in lines
    assert "ids 65534 65534" in lines
    assert "cwd /app" in lines
    # Exactly the configuration's environment: nothing of the launcher's or podman's.
    assert "env GREETING,LANG,PATH" in lines
    assert "argv /app/main.py 7" in lines
    assert "INSECURE" in result.stderr


def test_sigterm_reaches_app(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "wait.json", "wait")
    name = f"enclavify-sigterm-{uuid.uuid4().hex[:8]}"
    args = _run_args(config)
    args[args.index("--rm")] = "-d"
    started = _podman(podman, *args, "--name", name, *TMPFS, confidential.image)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while "ready" not in logs and time.monotonic() < deadline:
            time.sleep(0.2)
            logs = _podman(podman, "logs", name).stdout
        assert "ready" in logs
        assert _podman(podman, "kill", "--signal", "TERM", name).returncode == 0
        waited = _podman(podman, "wait", name, timeout=60)
        assert waited.stdout.strip() == "42"
        assert "got SIGTERM" in _podman(podman, "logs", name).stdout
    finally:
        _podman(podman, "rm", "-f", name)


def test_region_not_in_memory_is_rejected(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "nomem.json", "0")
    result = _podman(podman, *_run_args(config), confidential.image)
    assert result.returncode == 1
    assert "--tmpfs /app" in result.stderr
    assert "Traceback" not in result.stderr
    assert "decrypted data" not in result.stdout


def test_flipped_ciphertext_byte_is_rejected(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "tampered.json", "0", measurement=None)
    result = _podman(podman, *_run_args(config), *TMPFS, confidential.tampered)
    assert result.returncode == 1
    assert "/app/data.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert confidential.key not in result.stderr
    assert result.stdout == ""


def test_wrong_measurement_is_rejected(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "other.json", "0", measurement="0" * 64)
    result = _podman(podman, *_run_args(config), *TMPFS, confidential.image)
    assert result.returncode == 1
    assert confidential.measurement in result.stderr
    assert result.stdout == ""


SESSION = """\
name: {name}
version: "0.3"
services:
  - name: app
    mrenclaves: ["{measurement}"]
    command: python3 /app/main.py 9
    environment:
      PATH: /usr/local/bin:/usr/bin:/bin
      LANG: C.UTF-8
      GREETING: $$SCONE::greeting$$
    pwd: /app
    fspf_path: /.enclavify/fspf
    fspf_key: "{key}"
    fspf_tag: "{tag}"
secrets:
  - name: greeting
    kind: ascii
    size: 12
security:
  attestation:
    mode: simulation
"""


def test_app_starts_after_attesting_to_cas(
    podman: str, confidential: Confidential, base_rootfs: Path, tmp_path: Path
) -> None:
    cas = start_cas(tmp_path / "cas", extra_env={"PYTHONWARNINGS": "ignore"})
    image = f"localhost/enclavify-test/launcher-cas:{uuid.uuid4().hex[:12]}"
    try:
        # The image pins this CAS: its certificate is part of the runtime and the measurement.
        context = tmp_path / "context"
        shutil.copytree(confidential.context / "context", context, symlinks=True)
        runtime = context / "runtime"
        (runtime / "cas-ca.pem").write_bytes(cas.ca_pem)
        name = f"launcher{uuid.uuid4().hex[:8]}"
        config = RuntimeConfig(
            **dict(
                confidential.config.to_json(),
                cas_address="127.0.0.1:1",
                cas_certificate="/opt/enclavify/cas-ca.pem",
                cas_fingerprint=pem_fingerprint(cas.ca_pem),
                config_id=f"{name}/app",
            )
        )
        config.write(runtime / "runtime.json")
        measured = measurement.compute(
            runtime_digest=measurement.runtime_digest(runtime),
            binary=config.binary,
            binary_digest=measurement.binary_digest(
                DirectoryFiles(base_rootfs), config.binary, config.regions
            ),
            fspf_digest=measurement.fspf_digest(context / "enclavify" / "fspf"),
            heap=config.heap,
            stack=config.stack,
            dlopen=config.dlopen,
        )
        build = _podman(podman, "build", "-q", "-t", image, str(context))
        assert build.returncode == 0, build.stderr
        identity = load_or_create_identity(tmp_path / "owner.pem")
        session = SESSION.format(
            name=name, measurement=measured, key=confidential.key, tag=confidential.tag
        )
        try:
            cas.client(identity).create_session(session)
        except CasRejected as error:
            pytest.fail(f"the CAS rejected the session: {error}\n{cas.log()}")

        # The address baked in is wrong on purpose: the environment overrides it.
        result = _podman(
            podman,
            "run",
            "--rm",
            "--network=host",
            "-e",
            f"ENCLAVIFY_CAS_ADDR={cas.address}",
            *TMPFS,
            image,
        )
        assert result.returncode == 9, result.stderr + cas.log()
        assert "data decrypted data" in result.stdout.splitlines()
        assert "env GREETING,LANG,PATH" in result.stdout.splitlines()
        assert "ENCLAVIFY_INSECURE_CONFIG_FILE" not in result.stderr
        # Without a TEE the evidence is simulated, and the launcher logs a warning.
        assert "simulation evidence" in result.stderr
    finally:
        cas.stop()
        _podman(podman, "rmi", "-f", image)


def test_launcher_mounts_tmpfs_when_allowed(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "selfmount.json", "5")
    result = _podman(podman, *_run_args(config), "--cap-add", "SYS_ADMIN", confidential.image)
    if result.returncode == 1 and "may not mount" in result.stderr:
        pytest.skip(
            f"this container runtime forbids mounts even with CAP_SYS_ADMIN: {result.stderr}"
        )
    assert result.returncode == 5, result.stderr
    assert "data decrypted data" in result.stdout.splitlines()


def test_preloaded_library_is_rejected(podman: str, confidential: Confidential) -> None:
    config = _config_file(confidential, "preload.json", "0")
    preload = f"/usr/lib/{platform.machine()}-linux-gnu/libz.so.1"
    result = _podman(
        podman, *_run_args(config), "-e", f"LD_PRELOAD={preload}", *TMPFS, confidential.image
    )
    assert result.returncode == 1
    assert "is loaded from outside /opt/enclavify" in result.stderr
    assert result.stdout == ""
