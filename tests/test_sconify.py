"""sconify_image as a command: flags, output streams, uploads and the files it writes.

The tests run the installed console script with stdin closed and no terminal, against a CAS
on 127.0.0.1 over TLS, converting the Flask example's native image.
"""

from __future__ import annotations

import logging
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclavify import sconify as sconify_module
from enclavify.cas.client import CasClient
from enclavify.cas.identity import load_or_create_identity
from enclavify.errors import CasRejected
from enclavify.policy import parse_session, session_hash
from tests.cas_process import CasProcess, start_cas
from tests.sconify_support import (
    compose_service,
    example_hooks,
    flask_arguments,
    free_port,
    remove_images,
    run_sconify,
    sconify_environment,
)

PROBE_VARIABLES = {"HOSTNAME", "TERM", "HOME", "SHLVL"}


@dataclass
class Setup:
    podman: str
    native: str
    cas: CasProcess
    home: Path
    identity: Path
    made_images: list[str]

    def client(self) -> CasClient:
        return self.cas.client(load_or_create_identity(self.identity))

    def sconify(self, work: Path, *, target: str, namespace: str, name: str = "flask",
                extra: tuple[str, ...] = (), cas: CasProcess | None = None,
                hooks: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        self.made_images.append(target)
        return run_sconify(
            flask_arguments(source=self.native, target=target, cas=cas or self.cas,
                            namespace=namespace, name=name, identity=self.identity,
                            extra=extra),
            cwd=work, env=sconify_environment(self.home, example_hooks() if hooks is None
                                              else hooks),
        )

    def image_exists(self, name: str) -> bool:
        done = subprocess.run([self.podman, "image", "exists", name], capture_output=True,
                              timeout=60, check=False)
        return done.returncode == 0


@pytest.fixture(scope="module")
def setup(
    podman: str, native_flask_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("sconify-home")
    cas = start_cas(tmp_path_factory.mktemp("sconify-cas") / "data")
    made: list[str] = []
    try:
        yield Setup(podman, native_flask_image, cas, home, home / "identity.pem", made)
    finally:
        remove_images(podman, *made)
        cas.stop()


@dataclass
class Converted:
    work: Path
    target: str
    namespace: str
    result: subprocess.CompletedProcess[str]
    session: dict[str, Any]


@pytest.fixture(scope="module")
def converted(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """One conversion and upload; its --to has '/' and ':' in it."""
    work = tmp_path_factory.mktemp("sconify-work")
    suffix = uuid.uuid4().hex[:8]
    target = f"localhost/enclavify-test/sconify/{suffix}:v1.2-rc"
    namespace = f"sconify-{suffix}"
    done = setup.sconify(work, target=target, namespace=namespace)
    assert done.returncode == 0, done.stderr[-4000:]
    session = yaml.safe_load((work / "session.yml").read_text())
    return Converted(work, target, namespace, done, session)


def test_required_flags_are_named(tmp_path: Path) -> None:
    env = sconify_environment(tmp_path)
    for missing in ("--from", "--to", "--binary", "--name"):
        arguments = {"--from": "--from=a", "--to": "--to=b", "--binary": "--binary=/bin/sh",
                     "--name": "--name=n"}
        del arguments[missing]
        done = run_sconify(list(arguments.values()), cwd=tmp_path, env=env, timeout=60)
        assert done.returncode == 2
        assert done.stdout == ""
        assert missing in done.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "config"] or not list(tmp_path.iterdir())


def test_prints_only_the_session_name_on_stdout(setup: Setup, converted: Converted) -> None:
    assert converted.result.stdout == f"{converted.namespace}/flask\n"
    # Progress, the simulation warning and the file names all go to stderr.
    assert "INSECURE: the session accepts simulation evidence" in converted.result.stderr
    assert "Wrote session.yml and docker-compose.yml" in converted.result.stderr
    # The session on the CAS is the one written to session.yml.
    stored = setup.client().get_session(f"{converted.namespace}/flask")
    text = (converted.work / "session.yml").read_text()
    assert stored["hash"] == session_hash(parse_session(text))


def test_target_names_with_slash_and_colon(setup: Setup, converted: Converted) -> None:
    assert setup.image_exists(converted.target)
    _, service = compose_service(converted.work / "docker-compose.yml")
    assert service["image"] == converted.target
    # The session names the image by a name the session language accepts.
    (definition,) = converted.session["services"]
    assert definition["image_name"] == "localhost_enclavify-test_sconify_" + \
        converted.target.rsplit("/", 1)[1].replace(":", "_")


def test_written_files_and_modes(converted: Converted) -> None:
    session_file = converted.work / "session.yml"
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    # The fspf key is in the session file only: no conversion result is left beside it.
    assert sorted(path.name for path in converted.work.iterdir()) == [
        "docker-compose.yml", "session.yml"]


def test_hooks_land_where_the_session_language_puts_them(converted: Converted) -> None:
    session = converted.session
    secrets = {secret["name"]: secret for secret in session["secrets"]}
    assert set(secrets) == {"api_ca_key", "api_ca_cert", "flask_key", "flask"}
    assert secrets["flask"]["dns"] == ["api"]
    assert secrets["api_ca_cert"]["export_public"] is True
    (definition,) = session["services"]
    (image,) = session["images"]
    assert image["name"] == definition["image_name"]
    assert image["injection_files"] == [
        {"path": "/tls/flask.crt", "content": "$$SCONE::flask.crt$$"},
        {"path": "/tls/flask.key", "content": "$$SCONE::flask.key$$"},
    ]


def test_policy_has_no_probe_container_variables(converted: Converted) -> None:
    (definition,) = converted.session["services"]
    assert "PATH" in definition["environment"]
    assert not PROBE_VARIABLES & set(definition["environment"])
    assert definition["command"] == ["python3", "-B", "/app/rest_api.py"]


def test_update_names_the_current_hash_as_predecessor(
    setup: Setup, converted: Converted, tmp_path: Path
) -> None:
    name = f"{converted.namespace}/flask"
    before = setup.client().get_session(name)["hash"]
    target = f"localhost/enclavify-test/sconify-update-{uuid.uuid4().hex[:8]}"
    done = setup.sconify(tmp_path, target=target, namespace=converted.namespace)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout == f"{name}\n"
    session = yaml.safe_load((tmp_path / "session.yml").read_text())
    assert session["predecessor"] == before
    after = setup.client().get_session(name)["hash"]
    assert after != before
    history = setup.client().session_history(name)
    assert [revision["hash"] for revision in history][-2:] == [before, after]


def test_unreachable_cas_fails_before_converting(setup: Setup, tmp_path: Path) -> None:
    target = f"localhost/enclavify-test/sconify-unreached-{uuid.uuid4().hex[:8]}"
    port = free_port()
    arguments = flask_arguments(source=setup.native, target=target, cas=setup.cas,
                                namespace="unreached", identity=setup.identity)
    arguments = [f"--cas=127.0.0.1:{port}" if a.startswith("--cas=") else a for a in arguments]
    done = run_sconify(arguments, cwd=tmp_path, env=sconify_environment(setup.home,
                                                                        example_hooks()))
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"cannot connect to the CAS at 127.0.0.1:{port}" in done.stderr
    assert "Opening" not in done.stderr
    assert not setup.image_exists(target)
    assert list(tmp_path.iterdir()) == []


def test_wrong_cas_certificate_fails_before_converting(
    setup: Setup, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = start_cas(tmp_path_factory.mktemp("other-cas") / "data")
    try:
        target = f"localhost/enclavify-test/sconify-wrong-cert-{uuid.uuid4().hex[:8]}"
        arguments = flask_arguments(source=setup.native, target=target, cas=setup.cas,
                                    namespace="wrong-cert", identity=setup.identity)
        arguments = [f"--cas-cert={other.certificate}" if a.startswith("--cas-cert=") else a
                     for a in arguments]
        done = run_sconify(arguments, cwd=tmp_path,
                           env=sconify_environment(setup.home, example_hooks()))
    finally:
        other.stop()
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"CAS at {setup.cas.address} failed certificate verification" in done.stderr
    assert "Opening" not in done.stderr
    assert not setup.image_exists(target)


def test_dry_run_uploads_nothing(setup: Setup, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    namespace = f"dry-{suffix}"
    target = f"localhost/enclavify-test/sconify-dry-{suffix}"
    done = setup.sconify(tmp_path, target=target, namespace=namespace, extra=("--dry-run",))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout == f"{namespace}/flask\n"
    assert (tmp_path / "session.yml").exists()
    assert (tmp_path / "docker-compose.yml").exists()
    for name in (namespace, f"{namespace}/flask"):
        with pytest.raises(CasRejected) as refused:
            setup.client().get_session(name)
        assert refused.value.status == 404


def test_bad_hook_fails_before_converting(setup: Setup, tmp_path: Path) -> None:
    target = f"localhost/enclavify-test/sconify-bad-hook-{uuid.uuid4().hex[:8]}"
    hooks = example_hooks()
    hooks["SECRETS"] = "secrets:\n    - name: [not, a, name]\n"
    done = setup.sconify(tmp_path, target=target, namespace="bad-hook", hooks=hooks)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "secrets" in done.stderr
    assert "Opening" not in done.stderr
    assert not setup.image_exists(target)


# --- the pipeline's checks, without podman ------------------------------------------------


def test_auto_mode_without_device_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("enclavify.attest.devices.detect", lambda: [])
    with caplog.at_level(logging.WARNING, logger="enclavify.sconify"):
        assert sconify_module.choose_attestation_mode("auto") == "simulation"
    assert "no TEE device on this machine" in caplog.text


def test_hardware_mode_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="enclavify.sconify"):
        assert sconify_module.choose_attestation_mode("hardware") == "hardware"
    assert caplog.text == ""


def test_missing_cas_certificate_names_the_flag(tmp_path: Path) -> None:
    env = sconify_environment(tmp_path, {"ENCLAVIFY_CAS_DATA": str(tmp_path / "no-cas")})
    done = run_sconify(
        ["--from=oci:/nonexistent", "--to=oci:/nonexistent-too", "--binary=/bin/sh",
         "--name=n", "--namespace=ns"],
        cwd=tmp_path, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--cas-cert" in done.stderr


def test_bad_hook_rejected_without_podman(tmp_path: Path) -> None:
    env = sconify_environment(tmp_path, {"SECRETS": "secrets: [unclosed"})
    done = run_sconify(
        ["--from=oci:/nonexistent", "--to=oci:/nonexistent-too", "--binary=/bin/sh",
         "--name=n", "--namespace=ns", "--dry-run", f"--cas-cert={tmp_path / 'none.pem'}"],
        cwd=tmp_path, env=env, timeout=60,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "SECRETS" in done.stderr or "secrets" in done.stderr
    assert not (tmp_path / "session.yml").exists()
