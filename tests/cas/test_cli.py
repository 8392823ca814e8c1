"""The `enclavify cas` and `enclavify session` commands against a real CAS."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.cas.client import Identity, pem_fingerprint
from enclavify.errors import CasRejected

from .conftest import CasProcess, app_yaml, namespace_yaml, unique
from .test_release import simulation


def _enclavify(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                       XDG_DATA_HOME=str(home / ".local" / "share"), **env)
    environment.pop("ENCLAVIFY_CAS_DATA", None)
    environment.pop("ENCLAVIFY_CAS_CERT", None)
    return subprocess.run(
        [sys.executable, "-m", "enclavify", *args], capture_output=True, text=True,
        timeout=60, env=environment, check=False,
    )


def test_show_certificate(shared_cas: CasProcess, tmp_path: Path) -> None:
    pem = _enclavify("cas", "show-certificate", "--data", str(shared_cas.data), home=tmp_path)
    assert pem.returncode == 0, pem.stderr
    assert pem.stdout.encode() == shared_cas.ca_pem
    fingerprint = _enclavify(
        "cas", "show-certificate", "--data", str(shared_cas.data), "--fingerprint", home=tmp_path
    )
    assert fingerprint.stdout.strip() == pem_fingerprint(shared_cas.ca_pem)
    assert fingerprint.stdout.strip() in shared_cas.log()
    for key in ("ca-key.pem", "server-key.pem", "master.key"):
        assert stat.S_IMODE((shared_cas.data / key).stat().st_mode) == 0o600
    missing = _enclavify("cas", "show-certificate", "--data", str(tmp_path / "none"),
                         home=tmp_path)
    assert missing.returncode == 2
    assert "run 'enclavify cas serve' first" in missing.stderr


def test_session_commands(shared_cas: CasProcess, tmp_path: Path) -> None:
    common = ["--cas", shared_cas.address, "--cas-cert", str(shared_cas.data / "ca.pem")]
    name = unique("cli")
    session_file = tmp_path / "session.yml"
    session_file.write_text(app_yaml(name))

    created = _enclavify("session", "create", *common, str(session_file), home=tmp_path)
    assert created.returncode == 0, created.stderr
    first_hash = created.stdout.strip()
    identity = tmp_path / ".config" / "enclavify" / "identity.pem"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600

    session_file.write_text(app_yaml(name, environment="\n      MODE: two"))
    updated = _enclavify("session", "update", *common, str(session_file), home=tmp_path)
    assert updated.returncode == 0, updated.stderr
    second_hash = updated.stdout.strip()
    assert second_hash != first_hash

    shown = _enclavify("session", "show", *common, name, home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["hash"] == second_hash
    assert document["session"]["services"][0]["fspf_key"] == "<redacted>"
    assert "22" * 32 not in shown.stdout

    history = _enclavify("session", "history", *common, name, home=tmp_path)
    assert [r["hash"] for r in json.loads(history.stdout)] == [first_hash, second_hash]

    values = _enclavify("session", "values", *common, name, home=tmp_path)
    assert "BEGIN CERTIFICATE" in json.loads(values.stdout)["ca"]

    # The key hash printed for the identity is the session's creator.
    whoami = _enclavify("session", "identity", home=tmp_path)
    assert whoami.stdout.strip() == document["creator"]

    # Another identity can neither read nor update.
    other = ["--identity", str(tmp_path / "other.pem")]
    refused = _enclavify("session", "show", *common, *other, name, home=tmp_path)
    assert refused.returncode == 1
    assert "not found or not readable" in refused.stderr
    refused = _enclavify("session", "update", *common, *other, str(session_file), home=tmp_path)
    assert refused.returncode == 1


def test_session_without_certificate_is_usage_error(tmp_path: Path) -> None:
    completed = _enclavify("session", "show", "--cas", "127.0.0.1:1", "x", home=tmp_path)
    assert completed.returncode == 2
    assert "--cas-cert" in completed.stderr


def test_malformed_session_file_is_named_before_any_upload(tmp_path: Path) -> None:
    # No CAS listens on port 1: the file is checked before any connection is made.
    broken = tmp_path / "broken-session.yml"
    broken.write_text("name: x\nservices: [\n")

    completed = _enclavify("session", "create", "--cas", "127.0.0.1:1", str(broken),
                           home=tmp_path)

    assert completed.returncode == 1
    assert f"{broken}: invalid YAML" in completed.stderr


def test_export_and_import(shared_cas: CasProcess, identities: dict[str, Identity]) -> None:
    alice = shared_cas.client(identities["alice"])
    exporter = unique("exp")
    importer = unique("imp")
    export_secret = f"""  - name: shared
    kind: ascii
    size: 16
    export:
      - session: {importer}
"""
    alice.create_session(app_yaml(exporter, extra_secrets=export_secret))
    import_secret = f"""  - name: shared
    kind: ascii
    import:
      session: {exporter}
      secret: shared
"""
    text = app_yaml(importer, extra_secrets=import_secret).replace(
        "--password $$SCONE::password$$", "--password $$SCONE::shared$$"
    )
    alice.create_session(text)
    launcher = shared_cas.client(None)
    exported = launcher.request_configuration(f"{exporter}/api", simulation())
    imported = launcher.request_configuration(f"{importer}/api", simulation())
    assert len(imported["command"][-1]) == 16
    assert exported["command"][-1] != imported["command"][-1]

    # A session the exporter does not name cannot import.
    stranger = unique("str")
    with pytest.raises(CasRejected, match="does not export"):
        alice.create_session(app_yaml(stranger, extra_secrets=import_secret))
    # Withdrawing the export stops later releases to the importer.
    digest = alice.get_session(exporter)["hash"]
    withdrawn = app_yaml(exporter, extra_secrets=export_secret.replace(
        f"session: {importer}", f"session: {stranger}")) + f"predecessor: {digest}\n"
    alice.update_session(withdrawn)
    with pytest.raises(CasRejected, match="does not export"):
        launcher.request_configuration(f"{importer}/api", simulation())


def test_namespace_via_cli(shared_cas: CasProcess, tmp_path: Path) -> None:
    common = ["--cas", shared_cas.address, "--cas-cert", str(shared_cas.data / "ca.pem")]
    name = unique("ns")
    (tmp_path / "ns.yml").write_text(namespace_yaml(name))
    (tmp_path / "child.yml").write_text(namespace_yaml(f"{name}/child"))
    assert _enclavify("session", "create", *common, str(tmp_path / "ns.yml"),
                      home=tmp_path).returncode == 0
    child = _enclavify("session", "create", *common, str(tmp_path / "child.yml"), home=tmp_path)
    assert child.returncode == 0, child.stderr
