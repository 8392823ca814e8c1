"""The stdlib client: address parsing, pinning, and retries only for connection failures."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavify import crypto
from enclavify.cas.client import (
    CONFIG_INFO,
    CasClient,
    _open_configuration,
    parse_address,
    pem_fingerprint,
)
from enclavify.cas.pki import ensure_server_pki
from enclavify.errors import CasError, CasRejected

from .conftest import CasProcess

# Every test runs with both ways enclavify.cas.tls makes connections.
pytestmark = pytest.mark.usefixtures("each_tls_path")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost", ("localhost", 8081)),
        ("localhost:9000", ("localhost", 9000)),
        ("https://cas.example:443", ("cas.example", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::1]", ("::1", 8081)),
    ],
)
def test_address_forms(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", ":80", "host:http", "host:70000", "http://host:80"])
def test_invalid_address_rejected(address: str) -> None:
    with pytest.raises(CasError, match="invalid CAS address"):
        parse_address(address)


def test_client_needs_a_trust_anchor() -> None:
    with pytest.raises(CasError, match="no CAS certificate"):
        CasClient("localhost")


def test_fingerprint_is_sha256_of_der(tmp_path: Path) -> None:
    pem = ensure_server_pki(tmp_path)[0].ca_pem()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert pem_fingerprint(b"comment line\n" + pem) == hashlib.sha256(der).hexdigest()


def test_fingerprint_rejects_second_certificate(tmp_path: Path) -> None:
    # Every certificate in a pinned PEM becomes a trust anchor, so a pin on the first one
    # must not let a second one in.
    first = ensure_server_pki(tmp_path / "one")[0].ca_pem()
    second = ensure_server_pki(tmp_path / "two")[0].ca_pem()
    with pytest.raises(CasError, match="exactly one PEM block, found 2"):
        pem_fingerprint(first + second)
    with pytest.raises(CasError, match="exactly one PEM block"):
        CasClient("localhost", ca_pem=first + second, fingerprint=pem_fingerprint(first))


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nQUJD\n",
        b"-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----\n",
    ],
)
def test_fingerprint_rejects_non_certificate(pem: bytes) -> None:
    with pytest.raises(CasError, match="not a PEM certificate"):
        pem_fingerprint(pem)


def test_connection_failure_retried_then_raised(shared_cas: CasProcess) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = CasClient(f"127.0.0.1:{port}", ca_pem=shared_cas.ca_pem, attempts=3, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(CasError, match="after 3 attempts") as caught:
        client.public_values("x")
    assert not isinstance(caught.value, CasRejected)
    # Two waits between three attempts: 0.05 s, then 0.1 s.
    assert time.monotonic() - started >= 0.15


def test_rejection_is_not_retried(shared_cas: CasProcess) -> None:
    client = shared_cas.client(None, attempts=5, backoff=1.0)
    started = time.monotonic()
    with pytest.raises(CasRejected) as caught:
        client.get_session("anything")
    assert caught.value.status == 403
    assert time.monotonic() - started < 1.0


def test_fingerprint_pin_fetches_ca(shared_cas: CasProcess) -> None:
    fingerprint = pem_fingerprint(shared_cas.ca_pem)
    client = CasClient(shared_cas.address, fingerprint=fingerprint.upper())
    with pytest.raises(CasRejected) as caught:
        client.public_values("no-such-session")
    assert caught.value.status == 404


CHALLENGE = b"c" * 32


def _sealed_answer(plaintext: bytes, launcher_public: bytes) -> dict[str, str]:
    # What the CAS sends back: the configuration sealed to the launcher's X25519 key.
    cas_private, cas_public = crypto.x25519_generate()
    key = crypto.hkdf_sha256(
        crypto.x25519_exchange(cas_private, launcher_public), salt=CHALLENGE, info=CONFIG_INFO
    )
    nonce = bytes(12)
    ciphertext = crypto.aes_gcm_encrypt(key, nonce, plaintext, b"")
    return {
        "cas_public_key": cas_public.hex(),
        "nonce": nonce.hex(),
        "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
    }


def test_sealed_configuration_opens() -> None:
    private, public = crypto.x25519_generate()
    answer = _sealed_answer(b'{"env": {"A": "1"}}', public)
    assert _open_configuration(answer, private, CHALLENGE) == {"env": {"A": "1"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cas_public_key": "00" * 31}, "unusable public key"),
        ({"cas_public_key": "00" * 32}, "unusable public key"),
        ({"nonce": "00" * 11}, "malformed configuration"),
        ({"ciphertext": "AAAA"}, "failed authentication"),
    ],
)
def test_malformed_sealed_configuration_rejected(change: dict[str, str], message: str) -> None:
    private, public = crypto.x25519_generate()
    answer = _sealed_answer(b"{}", public) | change
    with pytest.raises(CasError, match=message):
        _open_configuration(answer, private, CHALLENGE)


def test_non_json_configuration_hides_plaintext() -> None:
    private, public = crypto.x25519_generate()
    answer = _sealed_answer(b'{"secret": "hunter2\xff"}', public)
    with pytest.raises(CasError, match="not valid JSON") as caught:
        _open_configuration(answer, private, CHALLENGE)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert "hunter2" not in str(caught.value)


def test_unusable_ca_certificate_is_a_cas_error() -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    client = CasClient("127.0.0.1:9", ca_pem=pem, attempts=1)

    with pytest.raises(CasError, match="not a usable PEM certificate"):
        client.challenge()
