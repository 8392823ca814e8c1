"""Attested configuration release: the good path and each reason for refusal, over real TLS."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from enclavify import crypto
from enclavify.attest import report_data
from enclavify.cas.client import CasClient, Identity
from enclavify.errors import CasRejected
from enclavify.runtime import launcher as launcher_module
from enclavify.runtime.casaccess import start_challenge
from enclavify.runtime.config import RuntimeConfig

from .conftest import MEASUREMENT, OTHER_MEASUREMENT, CasProcess, app_yaml, start_cas, unique

FSPF_KEY = "22" * 32


@pytest.fixture(scope="module")
def release_cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasProcess]:
    with start_cas(tmp_path_factory.mktemp("release") / "cas",
                   extra_env={"PYTHONWARNINGS": "ignore"}) as server:
        yield server


def simulation(measurement: str = MEASUREMENT) -> Callable[[bytes], tuple[str, bytes]]:
    def produce(data: bytes) -> tuple[str, bytes]:
        body = {"measurement": measurement, "report_data": data.hex()}
        return "simulation", json.dumps(body).encode()

    return produce


def _create(server: CasProcess, identity: Identity, **options: str) -> tuple[CasClient, str]:
    client = server.client(identity)
    name = unique("rel")
    client.create_session(app_yaml(name, **options))
    return client, name


def _attest_raw(
    server: CasProcess, body: dict[str, object]
) -> CasRejected:
    with pytest.raises(CasRejected) as caught:
        server.client(None)._request("POST", "/v1/attest", json.dumps(body).encode())
    return caught.value


def _challenge(server: CasProcess) -> bytes:
    answer = server.client(None)._request("POST", "/v1/attest/challenge", b"{}")
    return bytes.fromhex(answer["nonce"])


def _request_body(
    config_id: str, nonce: bytes, public: bytes, measurement: str = MEASUREMENT,
    bound: bytes | None = None, evidence_type: str = "simulation",
) -> dict[str, object]:
    data = report_data.bind(nonce, public) if bound is None else bound
    evidence = json.dumps({"measurement": measurement, "report_data": data.hex()}).encode()
    return {
        "config_id": config_id,
        "nonce": nonce.hex(),
        "public_key": public.hex(),
        "evidence": {"type": evidence_type, "data": base64.b64encode(evidence).decode()},
    }


def test_early_nonce_serves_first_attempt(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    launcher = release_cas.client(None)
    nonce = launcher.challenge()
    configuration = launcher.request_configuration(f"{name}/api", simulation(), nonce=nonce)
    assert configuration["fspf_key"] == FSPF_KEY
    # The nonce given is the one used, because the CAS accepts each nonce once.
    with pytest.raises(CasRejected, match="nonce"):
        launcher.request_configuration(f"{name}/api", simulation(), nonce=nonce)


def test_early_challenge_from_runtime_settings(
    release_cas: CasProcess, identities: dict[str, Identity], tmp_path: Path
) -> None:
    _, name = _create(release_cas, identities["alice"])
    runtime = tmp_path / "opt" / "enclavify"
    runtime.mkdir(parents=True)
    (runtime / "cas-ca.pem").write_bytes(release_cas.ca_pem)
    RuntimeConfig(
        binary="/usr/bin/python3", heap=1 << 30, stack=4 << 20, dlopen=2,
        cas_address=release_cas.address, cas_certificate="/opt/enclavify/cas-ca.pem",
        config_id=f"{name}/api",
    ).write(runtime / "runtime.json")

    early = start_challenge({}, runtime)
    assert early is not None
    nonce = early.nonce()
    assert nonce is not None
    # The thread connected once, and the launcher's own requests retry as usual.
    assert early.client.attempts == release_cas.client(None).attempts > 1
    configuration = early.client.request_configuration(f"{name}/api", simulation(), nonce=nonce)
    assert configuration["fspf_key"] == FSPF_KEY

    # No early challenge for the debug configuration file or for invalid settings.
    assert start_challenge({"ENCLAVIFY_INSECURE_CONFIG_FILE": "/x.json"}, runtime) is None
    assert start_challenge({}, tmp_path / "missing") is None
    unreachable = start_challenge({"ENCLAVIFY_CAS_ADDR": "127.0.0.1:1"}, runtime)
    assert unreachable is not None
    assert unreachable.nonce() is None


def test_early_challenge_other_settings_unused(
    release_cas: CasProcess, identities: dict[str, Identity], tmp_path: Path
) -> None:
    _, first = _create(release_cas, identities["alice"])
    _, second = _create(release_cas, identities["alice"])
    runtime = tmp_path / "opt" / "enclavify"
    runtime.mkdir(parents=True)
    (runtime / "cas-ca.pem").write_bytes(release_cas.ca_pem)
    config = RuntimeConfig(
        binary="/usr/bin/python3", heap=1 << 30, stack=4 << 20, dlopen=2,
        cas_address=release_cas.address, cas_certificate="/opt/enclavify/cas-ca.pem",
        config_id=f"{first}/api",
    )
    config.write(runtime / "runtime.json")
    early = start_challenge({}, runtime)
    assert early is not None

    # The environment names another service than the early challenge was requested for.
    configuration = launcher_module.obtain_configuration(
        config, lambda: MEASUREMENT, {"ENCLAVIFY_CONFIG_ID": f"{second}/api"}, runtime, early
    )
    assert configuration.fspf_key == bytes.fromhex(FSPF_KEY)
    assert not early._done.locked()  # the thread was waited for anyway


def test_right_measurement_gets_configuration(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    launcher = release_cas.client(None)
    configuration = launcher.request_configuration(f"{name}/api", simulation())
    assert configuration["fspf_key"] == FSPF_KEY
    assert configuration["pwd"] == "/app"
    password = configuration["command"][-1]
    assert len(password) == 24
    assert "$$SCONE" not in password
    token = configuration["environment"]["TOKEN"]
    assert len(bytes.fromhex(token)) == 16
    # Secrets stay the same across releases.
    again = launcher.request_configuration(f"{name}/api", simulation())
    assert again["command"] == configuration["command"]
    assert "INSECURE release" in release_cas.log()

    # No secret value reaches the CAS log or the audit log.
    audit_text = subprocess.run(
        [sys.executable, "-m", "enclavify", "cas", "audit", "--data", str(release_cas.data)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert f"{name}/api" in audit_text
    time.sleep(0.2)
    for secret in (password, token, FSPF_KEY):
        assert secret not in release_cas.log()
        assert secret not in audit_text
    assert password.encode() not in (release_cas.data / "cas.db").read_bytes()


def test_secrets_kept_across_updates(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    client, name = _create(release_cas, identities["alice"])
    launcher = release_cas.client(None)
    before = launcher.request_configuration(f"{name}/api", simulation())
    digest = client.get_session(name)["hash"]
    updated = app_yaml(name, environment="\n      MODE: production") + f"predecessor: {digest}\n"
    client.update_session(updated)
    after = launcher.request_configuration(f"{name}/api", simulation())
    assert after["command"] == before["command"]
    assert after["environment"]["MODE"] == "production"
    # Changing a secret's definition makes a new value.
    digest = client.get_session(name)["hash"]
    changed = app_yaml(name).replace("size: 24", "size: 30") + f"predecessor: {digest}\n"
    client.update_session(changed)
    third = launcher.request_configuration(f"{name}/api", simulation())
    assert len(third["command"][-1]) == 30


def test_public_values_exported(release_cas: CasProcess, identities: dict[str, Identity]) -> None:
    _, name = _create(release_cas, identities["alice"])
    values = release_cas.client(None).public_values(name)
    assert set(values) == {"ca"}
    assert values["ca"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in values["ca"]


def test_reused_nonce_refused(release_cas: CasProcess, identities: dict[str, Identity]) -> None:
    _, name = _create(release_cas, identities["alice"])
    _, public = crypto.x25519_generate()
    nonce = _challenge(release_cas)
    body = _request_body(f"{name}/api", nonce, public)
    release_cas.client(None)._request("POST", "/v1/attest", json.dumps(body).encode())
    error = _attest_raw(release_cas, body)
    assert error.status == 403
    assert "nonce already used" in str(error)


def test_nonce_consumed_by_failed_attempt(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    _, public = crypto.x25519_generate()
    nonce = _challenge(release_cas)
    wrong = _attest_raw(release_cas, _request_body(f"{name}/api", nonce, public, OTHER_MEASUREMENT))
    assert wrong.status == 403
    retry = _attest_raw(release_cas, _request_body(f"{name}/api", nonce, public))
    assert "nonce already used" in str(retry)


def test_unknown_nonce_refused(release_cas: CasProcess, identities: dict[str, Identity]) -> None:
    _, name = _create(release_cas, identities["alice"])
    _, public = crypto.x25519_generate()
    error = _attest_raw(release_cas, _request_body(f"{name}/api", b"\x01" * 32, public))
    assert error.status == 403
    assert "nonce not issued by this CAS" in str(error)


def test_expired_nonce_refused(tmp_path: Path, identities: dict[str, Identity]) -> None:
    with start_cas(tmp_path / "cas", extra_args=("--nonce-lifetime", "1")) as server:
        _, name = _create(server, identities["alice"])
        nonce = _challenge(server)
        _, public = crypto.x25519_generate()
        time.sleep(1.5)
        error = _attest_raw(server, _request_body(f"{name}/api", nonce, public))
    assert error.status == 403
    assert "nonce expired" in str(error)


def test_report_data_mismatch_refused(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    _, public = crypto.x25519_generate()
    _, other_public = crypto.x25519_generate()
    nonce = _challenge(release_cas)
    body = _request_body(
        f"{name}/api", nonce, public, bound=report_data.bind(nonce, other_public)
    )
    error = _attest_raw(release_cas, body)
    assert error.status == 403
    assert "report data" in str(error)


def test_unknown_measurement_refused(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    with pytest.raises(CasRejected) as caught:
        release_cas.client(None).request_configuration(
            f"{name}/api", simulation(OTHER_MEASUREMENT)
        )
    assert caught.value.status == 403
    assert OTHER_MEASUREMENT in str(caught.value) or "measurement" in str(caught.value)
    assert "rejected attestation for" in release_cas.log()


def test_simulation_refused_when_not_allowed(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"], mode="hardware")
    with pytest.raises(CasRejected) as caught:
        release_cas.client(None).request_configuration(f"{name}/api", simulation())
    assert caught.value.status == 403
    assert "simulation evidence is not accepted" in str(caught.value)


def test_unknown_service_and_session_refused(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    launcher = release_cas.client(None)
    with pytest.raises(CasRejected, match="no service 'nope'"):
        launcher.request_configuration(f"{name}/nope", simulation())
    with pytest.raises(CasRejected, match="unknown session"):
        launcher.request_configuration("no-such/api", simulation())


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"config_id": "a/b", "nonce": "zz", "public_key": "00" * 32,
         "evidence": {"type": "simulation", "data": ""}},
        {"config_id": "a/b", "nonce": "00" * 32, "public_key": "00" * 31,
         "evidence": {"type": "simulation", "data": ""}},
        {"config_id": "a/b", "nonce": "00" * 32, "public_key": "00" * 32,
         "evidence": {"type": "simulation", "data": "!!"}},
        {"config_id": "a/b", "nonce": "00" * 32, "public_key": "00" * 32, "extra": 1,
         "evidence": {"type": "simulation", "data": ""}},
        {"config_id": "a/b", "nonce": "", "public_key": "00" * 32,
         "evidence": {"type": "simulation", "data": ""}},
        {"config_id": "a/b", "nonce": "00" * 257, "public_key": "00" * 32,
         "evidence": {"type": "simulation", "data": ""}},
        {"config_id": "a/b", "nonce": "0" * 81, "public_key": "00" * 32,
         "evidence": {"type": "simulation", "data": ""}},
    ],
    ids=["empty", "nonce-not-hex", "short-key", "evidence-not-base64", "unknown-field",
         "empty-nonce", "nonce-too-long", "nonce-odd-digits"],
)
def test_malformed_attest_request_is_400(release_cas: CasProcess, body: dict[str, object]) -> None:
    assert _attest_raw(release_cas, body).status == 400


def test_racing_nonce_reuse_releases_once(
    release_cas: CasProcess, identities: dict[str, Identity]
) -> None:
    _, name = _create(release_cas, identities["alice"])
    _, public = crypto.x25519_generate()
    nonce = _challenge(release_cas)
    body = json.dumps(_request_body(f"{name}/api", nonce, public)).encode()
    barrier = threading.Barrier(8)

    def attempt(_: int) -> int:
        barrier.wait()
        try:
            release_cas.client(None)._request("POST", "/v1/attest", body)
        except CasRejected as error:
            assert "nonce already used" in str(error)
            return error.status
        return 200

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(attempt, range(8)))
    assert statuses == [200] + [403] * 7


@pytest.mark.parametrize("evidence_type", ["sgx-dcap", "tdx", "sev-snp", "no-such-type"])
def test_junk_hardware_evidence_refused(
    release_cas: CasProcess, identities: dict[str, Identity], evidence_type: str
) -> None:
    _, name = _create(release_cas, identities["alice"], mode="hardware")
    _, public = crypto.x25519_generate()
    nonce = _challenge(release_cas)
    body = _request_body(f"{name}/api", nonce, public, evidence_type=evidence_type)
    error = _attest_raw(release_cas, body)
    assert error.status == 403, str(error)
    assert str(error)
